#!/usr/bin/env bash
# Speed peers on GPU0 || one-GPU baseline on GPU1; then DDP and FSDP on both. Few files under $OUT.
set -u
T0=$SECONDS
pip() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
pip /tmp/site .whl_speed/*.whl && pip /tmp/unsloth_site .whl_unsloth/*.whl || { echo "pip failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD UNSLOTH_SITE=/tmp/unsloth_site TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/data && for f in .bench_data/*.gz; do gunzip -c "$f" > /tmp/data/$(basename "${f%.gz}"); done
TOK=$PWD/.bench_data/tokenizer_mistral_v1
MG="env OUT=/tmp/mg STEPS=${MG_STEPS:-8} SHARED_DATA=/tmp/data TOKENIZER=$TOK bash benchmarks/multi_gpu.sh"
( export CUDA_VISIBLE_DEVICES=0
  timeout ${SPEED_S:-370} python3 -u benchmarks/speed.py --data-dir /tmp/data --tokenizer $TOK --work /tmp/speed_work \
    --steps 10 --warmup 3 --json $OUT/speed.json --systems "${SPEED_SYSTEMS:-fine_tune_nf4,unsloth,trl_liger,trl,plain}" > $OUT/speed.log 2>&1
  echo "speed exit $? at $((SECONDS - T0)) s" >> $OUT/mg.log ) &
( export CUDA_VISIBLE_DEVICES=1; timeout 120 $MG one > /tmp/mg_one.log 2>&1; echo "one exit $? at $((SECONDS - T0)) s" >> $OUT/mg.log ) &
wait
timeout ${MG_S:-150} $MG ddp fsdp >> $OUT/mg.log 2>&1
echo "ddp/fsdp exit $? at $((SECONDS - T0)) s" >> $OUT/mg.log
cat /tmp/mg_one.log >> $OUT/mg.log; for f in /tmp/mg/*.log; do echo "== $f"; grep -E "step |final|error|Error" $f | tail -6; done >> $OUT/mg.log 2>&1
for f in /tmp/mg/*_nvidia_smi.csv; do echo "$f max MiB per GPU:"; awk -F, '{if($2+0>m[$1])m[$1]=$2+0} END{for(g in m)print " gpu"g, m[g]}' $f; done >> $OUT/mg.log
tail -3 $OUT/mg.log
