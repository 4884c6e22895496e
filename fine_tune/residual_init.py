"""PiSSA / OLoRA adapters as plain LoRA on the original base, so users load them like any adapter.

PiSSA (SVD) and OLoRA (QR) start the adapter from the adapted weight's principal part and subtract
it: the run trains `W_res + s * B @ A` with `W_res = W - s * B0 @ A0`. An adapter saved as trained
only works on that residual base, which no one else has. Since `W_res + s * B @ A = W + s * (B @ A -
B0 @ A0)`, the same model is the plain LoRA `B' = [B, -B0]`, `A' = [A; A0]` of rank 2r (scaling
unchanged: lora_alpha doubles, or grows by sqrt(2) with rsLoRA) on the original W: what PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)` writes (`subtract_mutated_init`).
Doing it on the files rather than through PEFT's save lets the same conversion serve the run's
`adapter/`, `fine_tune.export` and a checkpoint read by `generate`/`export checkpoint=...`.

What a run keeps: `adapter_init/` (the adapter as initialised, written before the first step),
`adapter/` (converted: plain LoRA of rank 2r, `init_lora_weights: true`, loads on the original base)
and `checkpoints/*/` (as trained, rank r, for resume: a resumed run repeats the initialisation,
which rebuilds the same residual base). DoRA's magnitudes need no change: the converted weight is the
same matrix, so are its norms (fine_tune refuses DoRA with these inits anyway).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fine_tune.adapters import ADAPTER_CONFIG, changes_base
from fine_tune.errors import UserError

INITIAL = "adapter_init"  # in the run directory


def save_initial_adapter(model: Any, run_dir: Path) -> Path | None:
    """Before the first step of a PiSSA/OLoRA run: the adapter as initialised, which the conversion
    subtracts. A resumed run keeps the one of its first attempt (the initialisation is repeatable:
    the products B0 @ A0 are equal, whatever signs an SVD picks)."""
    config = getattr(model, "peft_config", {}).get("default")
    if not changes_base(getattr(config, "init_lora_weights", True)):
        return None
    from fine_tune.utils.io import publish_dir

    target = Path(run_dir) / INITIAL
    if not (target / ADAPTER_CONFIG).is_file():
        publish_dir(target, lambda d: model.save_pretrained(d))
    return target


def to_plain_lora(config: dict, tensors: dict[str, Any], initial_dir: Path) -> tuple[dict, dict[str, Any]]:
    """(adapter_config, tensors) of a saved adapter as plain LoRA on the original base; an adapter
    that needs no conversion (any other init, or converted already) is returned as it is."""
    if not changes_base(config.get("init_lora_weights", True)):
        return config, tensors
    from fine_tune.models.moe.adapter_files import read_peft_adapter

    if not (Path(initial_dir) / ADAPTER_CONFIG).is_file():
        raise UserError(
            f"this {config['init_lora_weights']} adapter trained on a residual base and needs the adapter "
            f"as initialised to convert it, which is missing: {initial_dir}",
            where="run",
            hint="export the run's adapter/ (converted when the run finished), not a checkpoint",
        )
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("rank_pattern / alpha_pattern adapters are not converted (fine_tune writes none)")
    import torch

    _, initial = read_peft_adapter(initial_dir)
    converted = {}
    for key, value in tensors.items():
        if ".lora_A." in key:
            converted[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0)
        elif ".lora_B." in key:
            converted[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1)
        else:  # biases, modules_to_save: full tensors, already what the model computes with
            converted[key] = value
    growth = math.sqrt(2) if config.get("use_rslora") else 2
    plain = {**config, "init_lora_weights": True, "r": 2 * config["r"]}
    plain["lora_alpha"] = config["lora_alpha"] * growth
    return plain, converted


def convert_saved_adapter(directory: Path, initial_dir: Path) -> None:
    """Rewrite the adapter PEFT just saved in `directory` as plain LoRA, if its init needs it."""
    from fine_tune.models.moe.adapter_files import read_peft_adapter, write_peft_adapter

    config, tensors = read_peft_adapter(directory)
    plain, converted = to_plain_lora(config, tensors, initial_dir)
    if plain is not config:
        write_peft_adapter(directory, plain, converted)


@contextlib.contextmanager
def plain_adapter_dir(adapter_dir: Path, run_dir: Path) -> Iterator[Path]:
    """`adapter_dir`, or a converted copy of it when it was saved as trained (a PiSSA/OLoRA checkpoint)."""
    from fine_tune.utils.io import read_json

    if not changes_base((read_json(Path(adapter_dir) / ADAPTER_CONFIG) or {}).get("init_lora_weights", True)):
        yield Path(adapter_dir)
        return
    from fine_tune.models.moe.adapter_files import read_peft_adapter, write_peft_adapter

    with tempfile.TemporaryDirectory() as converted:
        write_peft_adapter(
            converted, *to_plain_lora(*read_peft_adapter(adapter_dir), Path(run_dir) / INITIAL)
        )
        yield Path(converted)
