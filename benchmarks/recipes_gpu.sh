#!/usr/bin/env bash
# The issue-13 recipes (conf/experiment/) on one GPU: real shapes, random weights (no hub), rows in each
# recipe's own layout that fill its max_length (benchmarks/make_recipe_data.py), 6 steps with the
# recipe's batch, accumulation, checkpointing and optimizer. Prints plan=true's line, then the measured
# peak (metrics.json peak_memory_gib): the check that meta_review_mixtral fits one 80 GB GPU with the
# room its header states. Not run yet (no GPU time in the session that wrote it).
#   OUT=/tmp/recipes_out bash benchmarks/recipes_gpu.sh                    # every recipe
#   bash benchmarks/recipes_gpu.sh meta_review_mixtral arxiv_mixtral_qlora  # some
set -o pipefail
OUT=${OUT:-/tmp/recipes_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
PY=${PY:-python3}
RECIPES=${*:-dolly_mistral_qlora law_title_mistral_instruct arxiv_mixtral_qlora meta_review_mixtral journal_qa_fsdp}
$PY benchmarks/make_recipe_data.py "$OUT/data" || exit 1
for r in $RECIPES; do
  A="experiment=$r model.init=random model.tokenizer=mistral_v1 dataset.path=$OUT/data/$r.jsonl
     ++dataset.truncation=truncate logger=none trainer.max_steps=6 trainer.logging_steps=1 trainer.eval_steps=1000
     trainer.save_steps=1000 dataset.max_eval_samples=4 dataset.num_prompts=1 trainer.generation.max_new_tokens=4"
  rm -rf "$OUT/run_$r"
  $PY -m fine_tune $A plan=true 2>&1 | grep '^plan:' | sed "s/^/$r /" | tee -a "$OUT/summary.txt"
  $PY -m fine_tune $A hydra.run.dir="$OUT/run_$r" > "$OUT/$r.log" 2>&1; rc=$?
  $PY -c "import json,sys; m=json.load(open(sys.argv[1])); print(sys.argv[2], 'rc', sys.argv[3], 'peak',
    round(m['peak_memory_gib'], 2), 'GiB,', round(m['tokens_per_second']), 'tokens/s')" \
    "$OUT/run_$r/metrics.json" "$r" "$rc" 2>/dev/null | tee -a "$OUT/summary.txt" || echo "$r rc $rc (see $OUT/$r.log)"
done
cat "$OUT/summary.txt"
