"""The data report printed before training: what was read, what was dropped and why, how long."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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


@dataclass
class DataReport:
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
    chunks_split: int = 0
    token_lengths: dict[str, float] = field(default_factory=dict)
    total_tokens: int = 0
    trained_tokens: int = 0
    packing: bool = False
    packed_rows: int = 0
    packing_efficiency: float | None = None
    padding_efficiency: float | None = None
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

    def format(self) -> str:
        dropped = sum(self.rows_dropped.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.rows_dropped.items())) or "none"
        L = self.token_lengths
        lines = [
            f"data: {self.source} (format {self.data_format}, template {self.template}, "
            f"encoder {self.encoder})",
            f"  rows read {self.rows_read}; dropped {dropped} ({reasons}); "
            f"train {self.train_examples}, eval {self.eval_examples}"
            + (f", test {self.test_examples}" if self.test_examples else ""),
            f"  tokens per example: p50 {L.get('p50', 0):.0f}, p90 {L.get('p90', 0):.0f}, "
            f"p99 {L.get('p99', 0):.0f},"
            f" max {L.get('max', 0):.0f}, mean {L.get('mean', 0):.1f} (max_length {self.max_length});"
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
        if self.dropped_examples:
            lines.append("  first dropped rows: " + "; ".join(self.dropped_examples[:3]))
        lines.append(f"  prepared in {self.seconds:.1f}s" + (" (from cache)" if self.from_cache else ""))
        return "\n".join(lines)
