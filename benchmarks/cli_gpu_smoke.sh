#!/usr/bin/env bash
# One GPU, the real CLI under torchrun: packed vs padded batches on a 4-layer Mistral-7B-shape model
# (random weights, nf4), to see what packing costs or saves in the Trainer loop.
# Usage: OUT=/tmp/out SHARED_DATA=../shared/data bash benchmarks/cli_gpu_smoke.sh
set -uo pipefail
OUT=${OUT:-/tmp/cli_out}; mkdir -p "$OUT"
export FINE_TUNE_CACHE=${FINE_TUNE_CACHE:-/tmp/fine_tune_cache} TOKENIZERS_PARALLELISM=false
D=${SHARED_DATA:-../shared/data}
ARGS="model=mistral_7b model.init=random model.architecture.num_hidden_layers=4 model.tokenizer=mistral_v1
      quant=nf4 logger=none trainer=gpu trainer.max_steps=30 trainer.per_device_train_batch_size=8
      trainer.gradient_accumulation_steps=1 dataset.max_length=512 trainer.eval_steps=1000 trainer.save_steps=1000
      trainer.logging_steps=10 dataset=shared_alpaca dataset.path=[$D/gsm8k_train.alpaca.json,$D/gpteacher_roleplay.alpaca.json]"
for packing in false true; do
  export FINE_TUNE_RUN_DIR=/tmp/cli_run_$packing; rm -rf "$FINE_TUNE_RUN_DIR"
  torchrun --standalone --nproc_per_node 1 -m fine_tune $ARGS dataset.packing=$packing > "$OUT/cli_packing_$packing.log" 2>&1
  echo "packing=$packing exit=$?"
  cp "$FINE_TUNE_RUN_DIR/metrics.json" "$OUT/cli_packing_${packing}_metrics.json" 2>/dev/null
  cp "$FINE_TUNE_RUN_DIR/status.json" "$OUT/cli_packing_${packing}_status.json" 2>/dev/null
  python3 -c "import json;m=json.load(open('$OUT/cli_packing_${packing}_metrics.json'));print({k:m[k] for k in ('steps','train_loss','eval_loss','tokens_seen','tokens_per_second','peak_memory_gib')})" 2>&1
done
