#!/usr/bin/env bash
# One device call on 2 GPUs: speed peers on GPU0 || MoE kernel, one-GPU baseline, DPO on GPU1; then DDP, FSDP.
set -u
T0=$SECONDS
lscpu | grep -o 'avx512_bf16\|amx_bf16\|Model name.*' | sort -u > $OUT/cpu.txt; nvidia-smi -L > $OUT/gpus.txt
pip() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
pip /tmp/site .whl_speed/*.whl && pip /tmp/unsloth_site .whl_unsloth/*.whl || { echo "pip failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD UNSLOTH_SITE=/tmp/unsloth_site TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/data && for f in .bench_data/*.gz; do gunzip -c "$f" > /tmp/data/$(basename "${f%.gz}"); done
TOK=$PWD/.bench_data/tokenizer_mistral_v1
echo "setup done at $((SECONDS - T0)) s"
( export CUDA_VISIBLE_DEVICES=0
  timeout ${SPEED_S:-330} python3 -u benchmarks/speed.py --data-dir /tmp/data --tokenizer $TOK --work /tmp/speed_work \
    --steps 12 --warmup 4 --json $OUT/speed.json --systems "${SPEED_SYSTEMS:-fine_tune_nf4,trl,trl_liger,unsloth,plain}" > $OUT/speed.log 2>&1
  echo "speed exit $? at $((SECONDS - T0)) s" ) &
( export CUDA_VISIBLE_DEVICES=1
  timeout 60 python3 -u benchmarks/moe_kernel_bench.py --json $OUT/moe_kernel.json > $OUT/moe_kernel.log 2>&1
  echo "moe kernel exit $? at $((SECONDS - T0)) s"
  OUT=$OUT/mg STEPS=10 SHARED_DATA=/tmp/data TOKENIZER=$TOK timeout 120 bash benchmarks/multi_gpu.sh one > $OUT/mg_one.log 2>&1
  echo "one exit $? at $((SECONDS - T0)) s"
  timeout ${DPO_S:-150} python3 -u benchmarks/dpo_bench.py --tokenizer $TOK --systems sft_mistral,dpo_mistral --steps 10 \
    --json $OUT/dpo.json > $OUT/dpo.log 2>&1
  echo "dpo exit $? at $((SECONDS - T0)) s" ) &
wait
OUT=$OUT/mg STEPS=10 SHARED_DATA=/tmp/data TOKENIZER=$TOK timeout ${MG_S:-200} bash benchmarks/multi_gpu.sh ddp fsdp > $OUT/mg.log 2>&1
echo "ddp/fsdp exit $? at $((SECONDS - T0)) s"
ls -R $OUT | head -60
