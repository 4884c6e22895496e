#!/usr/bin/env bash
# Question: does an 8-bit or paged optimizer cost quality against plain AdamW? Same model, data,
# seed and schedule; only the optimizer differs. Peak memory is in the table (peak_GiB) and in W&B.
# The paged bitsandbytes optimizers need a CUDA GPU: on CPU those jobs fail, are recorded as failed
# in the summary, and the sweep finishes the others (use optim=adamw_torch,adamw_8bit there).
#
#   multirun_examples/optimizer_comparison.sh                     # tiny Mistral on CPU
#   multirun_examples/optimizer_comparison.sh model=mixtral quant=nf4 trainer=default hydra/launcher=slurm
set -euo pipefail
SWEEP_DIR="${SWEEP_DIR:-multirun/examples/optimizer_comparison}"

python -m fine_tune -m \
  optim=paged_adamw_8bit,paged_adamw_32bit,adamw_torch \
  trainer=cpu \
  hydra.sweep.dir="$SWEEP_DIR" \
  "$@" || echo "(every job failed: see $SWEEP_DIR/sweep_summary.md)"

python -m fine_tune.compare "$SWEEP_DIR"
