"""Mixtral (mistralai/Mixtral-8x7B-v0.1): Mistral's attention, every MLP a sparse block of 8 experts
(top-2) behind a router `gate`; no shared expert."""

from fine_tune.families import CheckpointExperts, Family
from fine_tune.families.mistral import FAMILY as MISTRAL

FAMILY = Family(
    name="mixtral",
    config_class="MixtralConfig",
    model_types=("mixtral",),
    reference={**MISTRAL.reference, "num_local_experts": 8, "num_experts_per_tok": 2},
    calibration="mixtral",
    decoder_layer="MixtralDecoderLayer",
    checkpoint_experts=CheckpointExperts(block="block_sparse_moe", gate="w1", up="w3", down="w2"),
    peft_remaps_moe=True,
)
