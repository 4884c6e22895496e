"""The `optim.optimizer` node is a factory (`_partial_: true`): any optimizer class path works, and
the Trainer gets exactly the optimizer the config names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fine_tune.errors import UserError


def build_optimizer_factory(optimizer_node: Any) -> Callable[[list], Any]:
    from fine_tune.utils.build import build

    factory = build(optimizer_node, _convert_="all")
    if not callable(factory):
        raise UserError(
            "the optimizer node must be a factory",
            where="optim.optimizer._partial_",
            hint="set _partial_: true",
        )
    return factory
