#!/usr/bin/env bash
# End to end through the real CLI on one GPU: Mixtral-8x7B shape, random weights built layer by layer,
# nf4 (experts too), LoRA r=16 on attention + experts, packed 4 x 2048, checkpointing, paged 8-bit AdamW,
# 5 steps; prints the plan first, then trains and shows metrics.json (peak_memory_gib).
# Also checks the streaming checkpoint loader on CUDA (benchmarks/loader_smoke.py).
#   bash benchmarks/e2e_cli.sh                        # tokenizer: mistral_v1 (needs mistral-common)
#   TOKENIZER=/path/to/tokenizer_dir bash benchmarks/e2e_cli.sh
# OUT=dir keeps the logs (default /tmp/e2e_out); EXTRA="quant.expert_kernel=loop trainer.max_steps=20" adds overrides.
set -o pipefail
OUT=${OUT:-/tmp/e2e_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
python benchmarks/loader_smoke.py 2>&1 | grep -v -i warn | tee "$OUT/loader_smoke.log"
python benchmarks/make_corpus.py /tmp/corpus.jsonl
O="model=mixtral_8x7b model.init=random model.tokenizer=${TOKENIZER:-mistral_v1} quant=nf4 lora=attn_experts
 trainer=gpu trainer.max_steps=5 trainer.per_device_train_batch_size=4 trainer.gradient_accumulation_steps=1
 dataset.max_length=2048 dataset.packing=true trainer.logging_steps=1 trainer.eval_steps=1000 trainer.save_steps=1000
 logger=none optim=paged_adamw_8bit dataset=text dataset.path=/tmp/corpus.jsonl dataset.max_eval_samples=4
 dataset.num_prompts=1 trainer.generation.max_new_tokens=4"
python -m fine_tune $O ${EXTRA:-} plan=true 2>&1 | tail -25 | tee "$OUT/e2e_plan.log"
python -m fine_tune $O ${EXTRA:-} hydra.run.dir=/tmp/e2e_run 2>&1 | grep -v -i warn | tail -60 | tee "$OUT/e2e_train.log"
cp /tmp/e2e_run/metrics.json /tmp/e2e_run/status.json "$OUT/" 2>/dev/null
cat "$OUT/metrics.json"
