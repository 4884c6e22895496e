#!/usr/bin/env bash
# Question: which rank, alpha, learning rate and dropout minimize eval loss? An Optuna (TPE)
# search defined in conf/hparams_search/lora_optuna.yaml; the best parameters are printed at the
# end and written to $SWEEP_DIR/optimization_results.yaml.
#
#   multirun_examples/optuna_search.sh                                   # 8 trials, tiny model, CPU
#   multirun_examples/optuna_search.sh hydra.sweeper.n_trials=4
#   multirun_examples/optuna_search.sh model=mixtral quant=nf4 trainer=default hydra/launcher=slurm \
#       hydra.sweeper.n_jobs=4 hydra.sweeper.storage=sqlite:///lora_optuna.db   # resumable study
set -euo pipefail
SWEEP_DIR="${SWEEP_DIR:-multirun/examples/optuna_search}"

python -m fine_tune \
  hparams_search=lora_optuna \
  trainer=cpu \
  hydra.sweep.dir="$SWEEP_DIR" \
  "$@"

echo "best:" && cat "$SWEEP_DIR/optimization_results.yaml"
python -m fine_tune.compare "$SWEEP_DIR"
