"""`hydra.utils.instantiate`, but a `UserError` raised inside a builder reaches the user as itself,
not wrapped in Hydra's InstantiationException with a traceback."""

from __future__ import annotations

from typing import Any

from fine_tune.errors import UserError


def build(node: Any, **kwargs: Any) -> Any:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, UserError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if _is_config_mistake(cause):
            target = node.get("_target_") if hasattr(node, "get") else None
            raise UserError(
                str(cause).splitlines()[0][:300],
                where=f"_target_: {target}",
                hint="check the option's keys against the builder's arguments "
                "(python -m fine_tune validate=true)",
            ) from None
        if cause is not None:
            raise cause from None  # a bug, not a config mistake: keep its traceback
        raise


def _is_config_mistake(error: BaseException | None) -> bool:
    """A wrong key or an unimportable `_target_`: the user's to fix. Anything else is our bug."""
    if isinstance(error, ImportError):
        return True
    text = str(error)
    return isinstance(error, TypeError) and any(
        marker in text for marker in ("unexpected keyword argument", "required positional argument")
    )
