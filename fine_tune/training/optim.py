"""The `optim.optimizer` node is a factory (`_partial_: true`): any optimizer class path works, and
the Trainer gets exactly the optimizer the config names.

Every shipped `optim` option inherits the reference AdamW's keys (`betas`, `eps`, ...). A class that
has no such argument (`optim.optimizer._target_=torch.optim.SGD`) is simply not given it, with a
one-line note; a key the user added that the class cannot take is a mistake and stops the run; a
key set to null is not passed, so the class's own default applies (`conf/optim/sgd.yaml`).

When the optimizer is created (the first training step), a bitsandbytes optimizer that does less
than its name says on this machine (no paging on CPU, 32-bit states for small tensors) says so in
one line, so an optimizer comparison is not misread.

`optim.loraplus_lr_ratio` (LoRA+, conf/optim/loraplus.yaml) splits the trainable parameters into two
groups here, where the optimizer is built, so it works with any optimizer class and with fine_tune's
4-bit expert adapters, whose B matrices PEFT's `create_loraplus_optimizer` does not recognise."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from fine_tune.errors import UserError

log = logging.getLogger("fine_tune")
REFERENCE = Path(__file__).resolve().parents[1] / "conf" / "optim" / "adamw_torch.yaml"


@cache
def inherited_keys() -> frozenset[str]:
    """The optimizer keys of the reference option, which every other option starts from."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(REFERENCE).optimizer
    return frozenset(str(key) for key in node if not str(key).startswith("_"))


def passed_arguments(target: Any, kwargs: dict[str, Any], note: bool = True) -> dict[str, Any]:
    """The keyword arguments of `kwargs` that the optimizer class `target` is given (see above)."""
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature to read: pass everything, the class decides
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return kwargs
    name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)}"
    unknown = [key for key in kwargs if key not in parameters]
    mistakes = [key for key in unknown if key not in inherited_keys()]
    if mistakes:
        known = [p for p in parameters if p != "params"]
        raise UserError(
            f"{name} takes no argument '{mistakes[0]}'",
            where=f"optim.optimizer.{mistakes[0]}",
            hint=f"its arguments are {known}",
        )
    if unknown and note:
        log.warning(
            "optim.optimizer: %s takes no %s; not passed (they come from optim=adamw_torch)",
            name,
            ", ".join(unknown),
        )
    return {key: value for key, value in kwargs.items() if key not in unknown}


def raises_lr(name: str, param: Any) -> bool:
    """LoRA+'s faster group: PEFT's rule (`create_loraplus_optimizer`: `lora_B`, and every 1-D tensor:
    biases, DoRA magnitudes) plus the B of fine_tune's 4-bit expert adapters (`...adapters.<tensor>.B`,
    [experts, out, r]: fine_tune/models/moe/lora.py), which PEFT's rule would leave at the base rate."""
    return "lora_B" in name or param.ndim == 1 or (".adapters." in name and name.endswith(".B"))


def loraplus_groups(named: list[tuple[str, Any]], ratio: float) -> list[tuple[list[Any], float]]:
    """(parameters, lr multiplier) groups of (name, parameter) pairs: the rest at 1, B at `ratio`."""
    fast = [p for n, p in named if raises_lr(n, p)]
    rest = [p for n, p in named if not raises_lr(n, p)]
    return [(group, scale) for group, scale in ((rest, 1.0), (fast, ratio)) if group]


def build_optimizer_factory(
    optimizer_node: Any, loraplus_lr_ratio: float | None = None
) -> Callable[[list], Any]:
    """`make(params)`: the configured optimizer over `params`, trainable parameters or (name,
    parameter) pairs. With `loraplus_lr_ratio` (LoRA+, Hayou et al. 2024) the pairs are needed: the
    B matrices get their own parameter group at lr x ratio (the weight decay, scheduler and the
    logged learning rate stay those of the rest; PEFT's version resets the weight decay to 0)."""
    from hydra.utils import get_object
    from omegaconf import DictConfig, OmegaConf

    from fine_tune.utils.build import build

    node = dict(
        OmegaConf.to_container(optimizer_node, resolve=True)
        if isinstance(optimizer_node, DictConfig)
        else optimizer_node
    )
    try:
        target = get_object(str(node["_target_"]))
    except Exception:  # noqa: BLE001 - build() reports an unimportable target as the user's to fix
        target = None
    if target is not None:
        hydra_keys = {key: value for key, value in node.items() if key.startswith("_")}
        arguments = {key: value for key, value in node.items() if not key.startswith("_")}
        node = {**hydra_keys, **passed_arguments(target, arguments)}
    factory = build(node, _convert_="all")
    if not callable(factory):
        raise UserError(
            "the optimizer node must be a factory",
            where="optim.optimizer._partial_",
            hint="set _partial_: true",
        )

    def make(params: list) -> Any:
        named = [p if isinstance(p, tuple) else (None, p) for p in params]
        if not loraplus_lr_ratio:
            optimizer = factory([p for _, p in named])
        else:
            if any(name is None for name, _ in named):
                raise ValueError("LoRA+ groups parameters by name: pass (name, parameter) pairs")
            groups = loraplus_groups(named, loraplus_lr_ratio)
            optimizer = factory([{"params": group} for group, _ in groups])
            for group, (_, scale) in zip(optimizer.param_groups, groups, strict=True):
                group["lr"] *= scale
            fast = sum(raises_lr(n, p) for n, p in named)
            log.info(
                "optim: LoRA+: %d B tensors at lr x %g, %d others at lr",
                fast,
                loraplus_lr_ratio,
                len(named) - fast,
            )
        for note in fallback_notes(optimizer):
            log.warning("optim: %s", note)
        return optimizer

    return make


def fallback_notes(optimizer: Any) -> list[str]:
    """Where a bitsandbytes optimizer does less than its name says, on these parameters.

    bitsandbytes 0.50 (optim/optimizer.py) pages states only on CUDA: on CPU `get_state_buffer`
    returns plain tensors. And it keeps 8-bit states only for tensors of at least `min_8bit_size`
    (4096) elements, on any device; smaller ones get 32-bit states and the same AdamW math. A sweep
    over these optimizers on a tiny model then compares one optimizer with itself."""
    name = type(optimizer).__name__
    params = [p for group in optimizer.param_groups for p in group["params"]]
    notes = []
    if getattr(optimizer, "is_paged", False) and any(p.device.type == "cpu" for p in params):
        notes.append(f"{name} does not page on CPU: bitsandbytes keeps its states in ordinary CPU memory")
    args = getattr(optimizer, "args", None)
    if getattr(args, "optim_bits", 32) == 8:
        small = sum(p.numel() < args.min_8bit_size for p in params)
        if small:
            notes.append(
                f"{name}: {small} of {len(params)} trainable tensors have fewer than "
                f"{args.min_8bit_size} elements (min_8bit_size), so their states stay 32-bit"
            )
    return notes
