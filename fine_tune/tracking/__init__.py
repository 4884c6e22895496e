"""Experiment trackers: one small interface (`base.Tracker`), one module per backend.

Backends are picked by `conf/logger/*.yaml` (`_target_`), so importing this package must stay
cheap: wandb / tensorboard are imported only when a run starts.
"""
