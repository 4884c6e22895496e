"""The data report printed before training: what was read, what was dropped and why, how long."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def percentiles(values: list[int], qs: tuple[int, ...] = (50, 90, 95, 99)) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    out: dict[str, float] = {}
    for q in qs:
        # nearest-rank: a value that really occurs, as people expect from "p90 = 242 tokens"
        k = max(0, min(len(s) - 1, -(-q * len(s) // 100) - 1))
        out[f"p{q}"] = float(s[k])
    out["min"], out["max"], out["mean"] = float(s[0]), float(s[-1]), round(sum(s) / len(s), 1)
    return out


def _spread(lengths: dict[str, float]) -> str:
    L = lengths
    return (
        f"p50 {L.get('p50', 0):.0f}, p90 {L.get('p90', 0):.0f}, p99 {L.get('p99', 0):.0f}, "
        f"max {L.get('max', 0):.0f}, mean {L.get('mean', 0):.1f}"
    )


@dataclass
class Report:
    """What every data report says; `trained_tokens` are the tokens the loss sees."""

    source: str = ""
    data_format: str = ""
    template: str = ""
    encoder: str = ""
    max_length: int = 0
    rows_read: int = 0
    rows_dropped: dict[str, int] = field(default_factory=dict)
    train_examples: int = 0
    eval_examples: int = 0
    test_examples: int = 0
    truncated: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0
    from_cache: bool = False
    seconds: float = 0.0
    dropped_examples: list[str] = field(default_factory=list)

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.total_tokens if self.total_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trained_share"] = round(self.trained_share, 4)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Back from `to_dict()` (the cache's copy); derived keys are recomputed, not stored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def _head(self, noun: str) -> list[str]:
        dropped = sum(self.rows_dropped.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.rows_dropped.items())) or "none"
        return [
            f"data: {self.source} (format {self.data_format}, template {self.template}, "
            f"encoder {self.encoder})",
            f"  {noun} read {self.rows_read}; dropped {dropped} ({reasons}); "
            f"train {self.train_examples}, eval {self.eval_examples}"
            + (f", test {self.test_examples}" if self.test_examples else ""),
        ]

    def _tail(self) -> list[str]:
        lines = []
        if self.dropped_examples:
            lines.append("  first dropped rows: " + "; ".join(self.dropped_examples[:3]))
        lines.append(f"  prepared in {self.seconds:.1f}s" + (" (from cache)" if self.from_cache else ""))
        return lines


@dataclass
class DataReport(Report):
    """Supervised data: one sequence per example, trained on its answer tokens."""

    chunks_split: int = 0
    token_lengths: dict[str, float] = field(default_factory=dict)
    packing: bool = False
    packed_rows: int = 0
    packing_efficiency: float | None = None
    padding_efficiency: float | None = None

    def format(self) -> str:
        lines = [
            *self._head("rows"),
            f"  tokens per example: {_spread(self.token_lengths)} (max_length {self.max_length});"
            f" truncated {self.truncated}"
            + (f"; split into chunks {self.chunks_split}" if self.chunks_split else ""),
            f"  tokens {self.total_tokens:,}, trained {self.trained_tokens:,} ({self.trained_share:.1%})",
        ]
        if self.packing:
            lines.append(
                f"  packing: {self.packed_rows} rows of <= {self.max_length} tokens, "
                f"efficiency {self.packing_efficiency or 0:.1%}"
            )
        elif self.padding_efficiency is not None:
            lines.append(
                f"  no packing: padding to the longest row can waste up to {1 - self.padding_efficiency:.0%} "
                "of a batch (dataset.packing=true wastes none)"
            )
        return "\n".join([*lines, *self._tail()])


IDENTICAL = "identical_answers"  # the drop reason of pairs whose chosen and rejected ids are the same


@dataclass
class PreferenceReport(Report):
    """Preference pairs. Lengths are measured before truncation; `total_tokens` counts what the
    forward passes see (the prompt twice, both answers), `trained_tokens` the answers' tokens."""

    max_prompt_length: int = 0
    prompt_lengths: dict[str, float] = field(default_factory=dict)
    chosen_lengths: dict[str, float] = field(default_factory=dict)
    rejected_lengths: dict[str, float] = field(default_factory=dict)

    @property
    def identical_pairs(self) -> int:
        return self.rows_dropped.get(IDENTICAL, 0)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "identical_pairs": self.identical_pairs}

    def format(self) -> str:
        lines = [
            *self._head("pairs"),
            f"  prompt tokens: {_spread(self.prompt_lengths)}",
            f"  chosen tokens: {_spread(self.chosen_lengths)}",
            f"  rejected tokens: {_spread(self.rejected_lengths)}",
            f"  max_length {self.max_length} (prompt + each answer), max_prompt_length "
            f"{self.max_prompt_length}; truncated {self.truncated}; identical chosen and rejected "
            f"{self.identical_pairs} (dropped)",
            f"  tokens {self.total_tokens:,} (prompt twice + both answers), answer tokens "
            f"{self.trained_tokens:,} ({self.trained_share:.1%})",
        ]
        return "\n".join([*lines, *self._tail()])
