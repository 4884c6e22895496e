#!/usr/bin/env bash
# Several GPUs, measured: the real CLI under torchrun on a machine with >= 2 GPUs (ran one, ddp and
# fsdp with STEPS=8 on 2 x H100, 2026-11-25: docs/scaling.md; mixtral not run yet).
#
#   one      Mistral-7B shape (32 layers, random weights, nf4, LoRA r=16 on all projections), 1 GPU
#   ddp      the same on 2 GPUs, trainer=ddp (a whole model per GPU)              -> scaling vs one
#   fsdp     the same on 2 GPUs, trainer=fsdp (QLoRA: 4-bit weights stored in bf16, sharded)
#   mixtral  Mixtral-8x7B shape on 2 GPUs, trainer=fsdp, nf4 attention, bf16 experts sharded
#            (quant.quant_experts=false; ~85 GiB of weights, more than one 80 GB GPU holds)
#
# Usage, from the repo root (each case is one command; each takes a few minutes):
#   OUT=/tmp/mg SHARED_DATA=../shared/data bash benchmarks/multi_gpu.sh one ddp fsdp
#   OUT=/tmp/mg bash benchmarks/multi_gpu.sh mixtral
# Per case it keeps <case>.log, <case>_metrics.json, <case>_nvidia_smi.csv (memory.used of every
# GPU every second) and prints tokens/s (training tokens of all GPUs per second of training: steady =
# the mean of the logging windows after the first, and over the whole run), the
# per-GPU peak (rank 0's max_memory_allocated, and the largest memory.used nvidia-smi saw on any
# GPU, CUDA context and allocator cache included) and, for ddp/fsdp, the ratio to `one`.
# Mixtral loads into host RAM first on GPUs under 100 GiB (trainer.fsdp.load_on_cpu=true: every
# rank builds the whole model in host RAM, ~87 GiB each, then FSDP moves the shards), on the GPU
# otherwise; MIXTRAL_LOAD_ON_CPU=true|false overrides.
set -uo pipefail
OUT=${OUT:-/tmp/multi_gpu}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export FINE_TUNE_CACHE=${FINE_TUNE_CACHE:-/tmp/fine_tune_cache} TOKENIZERS_PARALLELISM=false
D=${SHARED_DATA:-../shared/data}
STEPS=${STEPS:-30}
DATA="dataset=shared_alpaca dataset.path=[$D/gsm8k_train.alpaca.json,$D/gpteacher_roleplay.alpaca.json]
      dataset.max_samples=4000 dataset.max_length=2048 dataset.packing=true"
# Every case: the same per-GPU batch (4 packed rows of 2048 tokens), no accumulation, no eval or
# checkpoint inside the timed steps, the non-paged AdamW (FSDP refuses bitsandbytes optimizers).
RUN="logger=none trainer.max_steps=$STEPS trainer.per_device_train_batch_size=4
     trainer.gradient_accumulation_steps=1 trainer.logging_steps=10 trainer.eval_steps=100000
     trainer.save_steps=100000 trainer.generation.num_prompts=0 optim=adamw_torch"
TOKENIZER=${TOKENIZER:-mistral_v1}  # or a saved tokenizer dir, where mistral-common is not installed
MISTRAL="model=mistral_7b model.init=random model.tokenizer=$TOKENIZER quant=nf4 lora=default"
MIXTRAL="model=mixtral model.init=random model.tokenizer=$TOKENIZER quant=nf4 quant.quant_experts=false lora=attn_only"

gpu_gib() { nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | awk '{print int($1/1024)}'; }

run_case() {  # name, processes, overrides...
  local name=$1 nproc=$2; shift 2
  export FINE_TUNE_RUN_DIR=/tmp/multi_gpu_run_$name
  rm -rf "$FINE_TUNE_RUN_DIR"
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -l 1 > "$OUT/${name}_nvidia_smi.csv" &
  local sampler=$!
  local start=$SECONDS
  torchrun --standalone --nproc_per_node "$nproc" -m fine_tune $RUN $DATA "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  kill "$sampler" 2>/dev/null
  echo "$name: exit $code after $((SECONDS - start)) s (nproc $nproc)"
  cp "$FINE_TUNE_RUN_DIR/metrics.json" "$OUT/${name}_metrics.json" 2>/dev/null
  cp "$FINE_TUNE_RUN_DIR/metrics.jsonl" "$OUT/${name}_metrics.jsonl" 2>/dev/null
  cp "$FINE_TUNE_RUN_DIR/status.json" "$OUT/${name}_status.json" 2>/dev/null
  grep -E "effective batch|memory plan|fine_tune error|Error" "$OUT/$name.log" | head -5
}

summary() {
  python3 - "$OUT" "$@" <<'EOF'
import csv, json, sys
from pathlib import Path
out, cases = Path(sys.argv[1]), sys.argv[2:]
def load(case):
    path = out / f"{case}_metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None
def steady(case):
    """Mean tokens/s of the logging windows after the first (warm-up: allocation, autotuning)."""
    path = out / f"{case}_metrics.jsonl"
    rows = [json.loads(line) for line in path.open()] if path.is_file() else []
    speeds = [r["perf/tokens_per_second"] for r in rows if "perf/tokens_per_second" in r][1:]
    return sum(speeds) / len(speeds) if speeds else None
one = load("one")
base = steady("one")
print(f"{'case':<9}{'GPUs':>5}{'steady tok/s':>13}{'ratio':>8}{'whole-run tok/s':>16}{'peak GiB (rank 0)':>19}{'max used GiB (smi)':>20}{'loss':>9}")
for case in cases:
    m = load(case)
    if m is None:
        print(f"{case:<9} no metrics.json: see {case}.log"); continue
    used = [int(r[1]) for r in csv.reader((out / f"{case}_nvidia_smi.csv").open()) if len(r) == 2 and r[1].strip().isdigit()]
    speed = steady(case)
    ratio = speed / base if speed and base and case in ("ddp", "fsdp") else None
    print(f"{case:<9}{m.get('world_size', 1):>5}{(f'{speed:.0f}' if speed else '-'):>13}"
          f"{(f'{ratio:.2f}x' if ratio else '-'):>8}{m['tokens_per_second']:>16.0f}{m['peak_memory_gib']:>19.2f}"
          f"{(max(used) / 1024 if used else float('nan')):>20.2f}{m['train_loss']:>9.4f}")
EOF
}

cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(one ddp fsdp mixtral)
for case in "${cases[@]}"; do
  case $case in
    one) run_case one 1 $MISTRAL trainer=gpu ;;
    ddp) run_case ddp 2 $MISTRAL trainer=ddp ;;
    fsdp) run_case fsdp 2 $MISTRAL trainer=fsdp ;;
    mixtral)
      load=${MIXTRAL_LOAD_ON_CPU:-$([ "$(gpu_gib)" -lt 100 ] && echo true || echo false)}
      run_case mixtral 2 $MIXTRAL trainer=fsdp trainer.fsdp.load_on_cpu=$load ;;
    *) echo "unknown case $case (one, ddp, fsdp, mixtral)"; exit 2 ;;
  esac
done
summary "${cases[@]}"
