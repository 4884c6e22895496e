"""Fail in a second, not a minute, when a config names the Hugging Face hub and there is no hub.

Without a network, `from_pretrained("mistralai/...")` retries for about a minute (five attempts with
back-off, ~46 lines of warnings) before it raises what fine_tune turns into a one-line error. So
before anything loads, `use_cache_only_if_unreachable(cfg)` asks the hub once, with a short timeout
and no retries, whenever the config names something on it; when it cannot be reached, the process
switches the hub libraries to offline mode (what HF_HUB_OFFLINE=1 does), says so in one line, and
every later load answers at once: from the local cache, or with fine_tune's error and hint.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("fine_tune")

PROBE_TIMEOUT_S = 2.0


def is_hub_id(name: Any) -> bool:
    """`org/name` or `name` that is no path here: looked up on the hub (a missing local path is not)."""
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(("/", ".", "~"))
        and name.count("/") <= 1
        and not Path(name).exists()
    )


def named_in(cfg: Any) -> list[str]:
    """The hub models, tokenizers and data sets a composed config would load."""
    from fine_tune.models.tokenizer import MISTRAL_COMMON_TOKENIZERS

    model, dataset = cfg.get("model") or {}, cfg.get("dataset") or {}
    names = [model.get("name_or_path"), dataset.get("hub_name")]
    if model.get("tokenizer") not in MISTRAL_COMMON_TOKENIZERS:
        names.append(model.get("tokenizer"))
    return [name for name in names if is_hub_id(name)]


@functools.cache
def offline_reason() -> str | None:
    """Why this process cannot use the hub, or None when it answers (asked once per process).

    Any HTTP answer counts as reachable (a gated model's 401 is the loader's to explain); proxies
    in the environment are used, as the hub client uses them.
    """
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    request = urllib.request.Request(constants.ENDPOINT, method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as error:  # no route, no DNS, refused, timed out, a bad HF_ENDPOINT
        return f"{constants.ENDPOINT} cannot be reached: {getattr(error, 'reason', error)}"
    return None


def use_cache_only_if_unreachable(cfg: Any) -> None:
    """Offline mode for this process when the config needs the hub and the hub does not answer."""
    names = named_in(cfg)
    if not names:
        return
    from huggingface_hub import constants

    if constants.is_offline_mode() or offline_reason() is None:  # offline already, or online
        return
    os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries imported later, and child processes
    constants.HF_HUB_OFFLINE = True  # huggingface_hub read the variable at import: set it there too
    log.warning("%s: %s load from the local cache only", offline_reason(), ", ".join(names))


def offline_note(name: Any) -> str:
    """For error messages about `name`: why it was only looked for in the local cache ('' if not)."""
    from huggingface_hub import constants

    if not is_hub_id(name) or not constants.is_offline_mode():
        return ""
    return f"; hub offline ({offline_reason()}) and not in the local cache"
