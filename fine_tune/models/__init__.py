"""Model + tokenizer builders; `build_model` is the `_target_` of every `model` option."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fine_tune.errors import UserError
from fine_tune.schema import ModelSchema, default

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    architecture: Any
    quant: Any


def build_model(
    family: str = default(ModelSchema, "family"),
    name_or_path: str | None = None,
    init: str = default(ModelSchema, "init"),
    tokenizer: Any = None,
    dtype: str = default(ModelSchema, "dtype"),
    attn_implementation: str = default(ModelSchema, "attn_implementation"),
    trust_remote_code: bool = default(ModelSchema, "trust_remote_code"),
    config: dict | None = None,
    architecture: dict | None = None,
    quant: Any = None,
    *,
    seed: int,
    lr: float = default(ModelSchema, "lr"),
    device: str | None = None,
) -> LoadedModel:
    """Tokenizer first (cheap, catches a wrong path early), then the architecture, then the weights.

    `quant` is the quant node (or its QuantSpec), `seed` the run's; `lr` is the model's suggested
    learning rate, read by `optim.lr`, accepted and unused here; `device`: where the weights load
    (default: this process's GPU, or the CPU), set by the run (trainer.fsdp.load_on_cpu).
    """
    from fine_tune.hardware import resolve_dtype
    from fine_tune.models import attention
    from fine_tune.models.architecture import load_architecture
    from fine_tune.models.loading import load_weights
    from fine_tune.models.quant import build_quant_config, pin_portable_4bit_layout
    from fine_tune.models.tokenizer import build_tokenizer

    quant = quant if quant is not None else build_quant_config()
    shape = load_architecture(family, name_or_path, init, architecture, config, trust_remote_code)
    # The run passes the tokenizer it already built for the data; alone, the node names one.
    tok = (
        tokenizer
        if not isinstance(tokenizer, (str, type(None)))
        else build_tokenizer(tokenizer, name_or_path, trust_remote_code)
    )
    if len(tok) > shape.vocab_size:
        raise UserError(
            f"tokenizer has {len(tok)} tokens but the model's vocab_size is {shape.vocab_size}",
            where="model.config.vocab_size",
            hint="make them match (Mistral v1: 32000)",
        )
    model = load_weights(
        shape,
        name_or_path,
        init,
        quant,
        resolve_dtype(dtype),
        attention.resolve(attn_implementation),
        trust_remote_code,
        seed,
        device,
    )
    pin_portable_4bit_layout(model)  # the same 4-bit numerics on every CPU (fine_tune/models/quant.py)
    # Both configs, as the Trainer would align them (with a warning) on finding them unset.
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedModel(model=model, tokenizer=tok, architecture=shape, quant=quant)
