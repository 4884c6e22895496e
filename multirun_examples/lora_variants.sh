#!/usr/bin/env bash
# Question: which LoRA variant trains best on this data, at which rank? lora=default,dora,pissa x
# lora.r=8,16,32, every job its own W&B run named by its variant and rank, then a comparison.
# The variants' costs are in each conf/lora/<variant>.yaml header and docs/memory.md; add
# optim=adamw_torch,loraplus to cross them with LoRA+.
#
#   multirun_examples/lora_variants.sh                                # tiny Mistral on CPU
#   multirun_examples/lora_variants.sh model=mistral_7b trainer=default dataset=alpaca dataset.path=data.jsonl
#   multirun_examples/lora_variants.sh lora=default,dora,loftq quant=nf4   # QLoRA: LoftQ, not PiSSA
#
# Extra arguments are Hydra overrides and win over the defaults below. Rerunning with the same
# SWEEP_DIR skips the jobs that finished and retries the others.
set -euo pipefail
SWEEP_DIR="${SWEEP_DIR:-multirun/examples/lora_variants}"

python -m fine_tune -m \
  lora=default,dora,pissa lora.r=8,16,32 \
  trainer=cpu \
  hydra.sweep.dir="$SWEEP_DIR" \
  "$@"

python -m fine_tune.compare "$SWEEP_DIR"
