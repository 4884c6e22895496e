#!/usr/bin/env bash
# Question: does an 8-bit or paged optimizer cost quality (eval loss) or save memory (peak_GiB)
# against plain AdamW? Same model, data, seed and schedule; only the optimizer differs.
#
# The answer means something only for a real model on a CUDA GPU (last example below). The default
# tiny-model CPU run finishes every job, but compares AdamW with itself (bitsandbytes 0.50.2; each
# job logs an `optim:` line saying so):
#   - paging exists only on CUDA: on CPU bitsandbytes keeps "paged" states in ordinary memory.
#     Even on a GPU, paging changes peak memory under pressure, never the losses;
#   - 8-bit states are kept only for tensors of >= 4096 elements (min_8bit_size). The tiny model's
#     LoRA matrices (16x64 .. 192x16) are all smaller, so every job runs 32-bit AdamW, on CPU or GPU.
# So the tiny run's curves coincide (compare's legend says "identical to" / "overlaps"): it checks
# the sweep machinery, it is not evidence that 8-bit costs nothing.
#
#   multirun_examples/optimizer_comparison.sh                     # tiny Mistral on CPU (mechanics only)
#   multirun_examples/optimizer_comparison.sh model=mistral_7b quant=nf4 trainer=gpu dataset=alpaca dataset.path=...
#   multirun_examples/optimizer_comparison.sh model=mixtral quant=nf4 trainer=default hydra/launcher=slurm
set -euo pipefail
SWEEP_DIR="${SWEEP_DIR:-multirun/examples/optimizer_comparison}"

python -m fine_tune -m \
  optim=paged_adamw_8bit,paged_adamw_32bit,adamw_8bit,adamw_torch \
  trainer=cpu trainer.eval_steps=5 \
  hydra.sweep.dir="$SWEEP_DIR" \
  "$@" || echo "(every job failed: see $SWEEP_DIR/sweep_summary.md)"

python -m fine_tune.compare "$SWEEP_DIR"
