"""Turn a `model` node into weights in memory: tiny random models, real checkpoints, quantized or not.

Tiny random models are written once to a cache directory and loaded back through `from_pretrained`,
so they travel the exact path real checkpoints take (quantization included)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fine_tune.errors import UserError
from fine_tune.families import is_moe
from fine_tune.hardware import local_device
from fine_tune.models.architecture import check_local_path
from fine_tune.models.quant import QuantSpec
from fine_tune.models.tokenizer import cache_root
from fine_tune.utils.io import publish_dir

# Above this many parameters a random model is built layer by layer on the GPU, never on disk.
MATERIALISE_LIMIT = 500_000_000


def materialise_random(architecture: Any, seed: int) -> Path:
    """Save a random model for `architecture` and `seed` once; later runs reuse the same directory."""
    import torch
    from transformers import AutoModelForCausalLM

    key = json.dumps({"config": architecture.to_dict(), "seed": seed}, sort_keys=True, default=str)
    target = cache_root() / "random_models" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (target / "config.json").exists():
        return target
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(architecture, dtype=torch.float32)
    # replace=False: a concurrent job may write the same weights first
    return publish_dir(target, lambda d: model.save_pretrained(d, safe_serialization=True), replace=False)


@contextlib.contextmanager
def weights_from(path: str | Path) -> Iterator[None]:
    """A missing or unreadable checkpoint is the user's to fix: say which, without a traceback."""
    check_local_path(str(path))
    try:
        yield
    except OSError as error:
        from fine_tune.models.hub import offline_note

        raise UserError(
            f"cannot load weights from '{path}' ({str(error).splitlines()[0][:200]}{offline_note(path)})",
            where="model.name_or_path",
            hint="give a local directory with safetensors weights, or a hub id with hub access",
        ) from None


def load_weights(
    architecture: Any,
    name_or_path: str | None,
    init: str,
    quant: QuantSpec,
    dtype: Any,
    attn_implementation: str,
    trust_remote_code: bool,
    seed: int,
    device: str | None = None,
) -> Any:
    """The weights of a validated `model` node (fine_tune.validate checked init and the path)."""
    from fine_tune.families.shapes import config_shapes, parameter_counts

    device = device or local_device()

    if init == "random" and parameter_counts(config_shapes(architecture)).total > MATERIALISE_LIMIT:
        # Real shapes: built and quantized layer by layer on the device, never written to disk.
        from fine_tune.models.moe import build_random_model

        return build_random_model(
            architecture,
            quant_type=None,
            quant=quant if quant.enabled else None,
            dtype=dtype,
            attn_implementation=attn_implementation,
            seed=seed,
            device=device,
        )
    path = name_or_path if init == "pretrained" else materialise_random(architecture, seed)
    with weights_from(path):
        if quant.is_4bit and quant.quant_experts and is_moe(architecture.to_dict()):
            # Streamed tensor by tensor, experts quantized as they arrive: from_pretrained with
            # bitsandbytes would first place every fused expert on the GPU in bf16 (~84 GiB for
            # Mixtral-8x7B).
            from fine_tune.models.moe import load_pretrained_moe_4bit

            return load_pretrained_moe_4bit(
                path, quant=quant, dtype=dtype, attn_implementation=attn_implementation, device=device
            )
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            quantization_config=quant.bnb_config,
            # quantized weights are placed while loading: on this rank's GPU, or where the run chose
            # (the CPU, for FSDP to shard from)
            device_map={"": device} if device != "cpu" else ("cpu" if quant.enabled else None),
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
