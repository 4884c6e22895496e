"""How a metric is shown to people (console tables, Markdown, HTML, model cards), in one place.

Files meant for programs (metrics.json, compare.json) keep full precision; what people read gets
as many digits as the number deserves: `11.2655` not `11.265545845031738`, `10` steps not `10.0`.
"""

from __future__ import annotations

import math
from typing import Any

# Counts: shown as integers, whatever type they were stored as.
_COUNTS = {
    "#",
    "rank",
    "step",
    "steps",
    "tokens_seen",
    "tokens_per_second",
    "trainable_params",
    "total_params",
}
# Decimal places for quantities that are neither losses nor counts.
_DECIMALS = {"eval_perplexity": 2, "perplexity": 2, "peak_memory_gib": 2, "runtime_s": 1}
LOSS_DECIMALS = 4


def finite_number(value: Any) -> float | None:
    """`value` as a finite float; None for anything else (missing, text, a bool, NaN, infinity)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def format_metric(key: str, value: Any) -> str:
    """`value` of metric `key` as text; None is `-`, non-numbers pass through as text.

    Keys may be metrics.json names (`eval_loss`) or metrics.jsonl names (`eval/loss`)."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return str(value)
    name = key.rsplit("/", 1)[-1]
    if key in _COUNTS or name in _COUNTS:
        return str(round(value))
    if "loss" in key:
        return f"{value:.{LOSS_DECIMALS}f}"
    for candidate in (key, name):
        if candidate in _DECIMALS:
            return f"{value:.{_DECIMALS[candidate]}f}"
    return str(value) if isinstance(value, int) else f"{value:.4g}"
