"""Time tokenizing the shared public data (GSM8K train + GPTeacher role-play, 10,619 Alpaca rows) with
Mistral's v1 tokenizer in the [INST] format, and print the data report.

    python benchmarks/tokenize_shared_data.py [--max-length 512] [--repeat 3]

Figures: the cold build (read + validate + tokenize + mask + Dataset), the same with packing, the HF
fast-tokenizer encoder for comparison, and a warm build from the preprocessing cache. Threads:
sentencepiece and the HF tokenizer use all cores of this machine (os.cpu_count()).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data"
FILES = ["gsm8k_train.alpaca.json", "gpteacher_roleplay.alpaca.json"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    paths = [SHARED / f for f in FILES]
    if not all(p.is_file() for p in paths):
        print(f"shared data not found under {SHARED.resolve()}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(REPO))
    from fine_tune.data import build_data
    from fine_tune.models.tokenizer import mistral_common_tokenizer

    tok = mistral_common_tokenizer("mistral_v1")
    common = {
        "format": "alpaca",
        "path": [str(p) for p in paths],
        "template": "mistral",
        "tokenizer": tok,
        "max_length": args.max_length,
    }
    build_data(**{**common, "max_samples": 50})  # warm-up: imports, sentencepiece lookup

    def timed(label: str, **extra):
        times, bundle = [], None
        for _ in range(args.repeat):
            start = time.perf_counter()
            bundle = build_data(**{**common, **extra})
            times.append(time.perf_counter() - start)
        rows = bundle.report.rows_read
        best, med = min(times), statistics.median(times)
        print(
            f"{label:38s} best {best:6.2f}s  median {med:6.2f}s  {rows / best:8.0f} rows/s  "
            f"{bundle.report.total_tokens / best:9.0f} tokens/s"
        )
        return bundle

    print(f"cores: {os.cpu_count()}, rows: 10,619, max_length {args.max_length}, repeat {args.repeat}\n")
    bundle = timed("cold build, sentencepiece encoder")
    timed("cold build + packing", packing=True)
    timed("cold build, HF fast-tokenizer encoder", encoder="hf")
    with tempfile.TemporaryDirectory() as cache:
        build_data(**common, cache_dir=cache)
        timed("warm build from the cache", cache_dir=cache)
    print("\ndata report (cold build):\n" + bundle.report.format())
    packed = build_data(**common, packing=True)
    print(
        f"\npacking at max_length {args.max_length}: {packed.report.packed_rows} rows, "
        f"efficiency {packed.report.packing_efficiency:.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
