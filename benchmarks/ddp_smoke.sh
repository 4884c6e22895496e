#!/usr/bin/env bash
# Multi-GPU check: the same `python -m fine_tune` command under torchrun on 1 and 2 GPUs.
# Usage (from the repo root, on a machine with >= 2 GPUs): OUT=/tmp/out bash benchmarks/ddp_smoke.sh
# What it shows: one run dir shared by every rank (FINE_TUNE_RUN_DIR), rank-0-only status/metrics,
# each rank's model on its own GPU, and the throughput of data parallelism on a real-shape cut model.
set -uo pipefail
OUT=${OUT:-/tmp/ddp_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export FINE_TUNE_CACHE=${FINE_TUNE_CACHE:-/tmp/fine_tune_cache} TOKENIZERS_PARALLELISM=false
# A real Mistral-7B layer shape, 4 layers, random weights built in 4-bit on each GPU.
MODEL="model=mistral_7b model.init=random model.architecture.num_hidden_layers=4 model.tokenizer=mistral_v1 quant=nf4"
ARGS="$MODEL logger=none trainer=gpu trainer.max_steps=20 trainer.per_device_train_batch_size=4
      trainer.gradient_accumulation_steps=1 dataset.max_length=1024 dataset.packing=true trainer.eval_steps=20
      trainer.save_steps=20 trainer.logging_steps=5 dataset=shared_alpaca dataset.max_samples=4000
      dataset.path=[${SHARED_DATA:-../shared/data}/gsm8k_train.alpaca.json,${SHARED_DATA:-../shared/data}/gpteacher_roleplay.alpaca.json]"
for n in 1 2; do
  export FINE_TUNE_RUN_DIR=/tmp/ddp_run_$n
  rm -rf "$FINE_TUNE_RUN_DIR"
  torchrun --standalone --nproc_per_node "$n" -m fine_tune $ARGS > "$OUT/ddp_$n.log" 2>&1
  echo "nproc=$n exit=$?"
  for f in metrics.json status.json metrics.jsonl; do cp "$FINE_TUNE_RUN_DIR/$f" "$OUT/ddp_${n}_$f" 2>/dev/null; done
  ls "$FINE_TUNE_RUN_DIR" "$FINE_TUNE_RUN_DIR/adapter" > "$OUT/ddp_${n}_files.txt" 2>&1
  python3 -c "import json;m=json.load(open('$OUT/ddp_${n}_metrics.json'));print({k:m[k] for k in ('steps','train_loss','eval_loss','tokens_seen','tokens_per_second','peak_memory_gib')})" 2>&1
done
