"""Training: arguments from the `trainer` group, the optimizer factory from `optim`, callbacks that
write the run's own metrics log, and the Trainer that ties them together."""

from fine_tune.training.arguments import build_training_arguments

__all__ = ["build_training_arguments"]
