"""Predicted (fine_tune.plan, as it is now) vs measured peaks of memory_bench.py JSON files.

Why separate from the bench: predictions can be recomputed for old measurements after the planner
changes, and the table in docs/memory.md is this script's output.

  python benchmarks/compare.py results/*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    from memory_bench import cfg_for

    from fine_tune.plan import GIB, plan_memory

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    print(
        f"{'model':<8} {'layers':>6} {'batch':>5} {'ckpt':>5} {'optim':>8} {'predicted GiB':>13} "
        f"{'measured GiB':>12} {'error':>7} {'tokens/s':>9}"
    )
    worst = 0.0
    for f in args.files:
        doc = json.loads(Path(f).read_text())
        if "rows" not in doc:  # e.g. a run's metrics.json: not a memory_bench.py result
            continue
        bench_args = argparse.Namespace(**doc["args"])
        for r in doc["rows"]:
            plan = plan_memory(cfg_for(bench_args, r["batch"], r["ckpt"], r["optim"]))
            meas = r["peak_bytes"]
            ok = r["status"] == "ok"
            err = (plan.total_bytes - meas) / meas
            if ok:
                worst = max(worst, abs(err))
            print(
                f"{bench_args.model:<8} {bench_args.layers or 'all':>6} {r['batch']:>5} {str(r['ckpt']):>5} "
                f"{r['optim']:>8} {plan.total_bytes / GIB:>13.2f} {meas / GIB:>12.2f} "
                f"{f'{err:+.1%}' if ok else '(OOM)':>7} {r['tokens_per_s'] if ok else 0:>9.0f}"
            )
    print(f"largest |error| over runs that trained: {worst:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
