#!/usr/bin/env bash
# The capacity sweep of issue 22 (docs/lab.md, "The paper's premise: capacity"): LoRA rank R x {TSCD, one-stage
# Eq. 7, CD} at equal iterations (1000), one `hsd ablate` per (rank, seed), each on one thread. Finished seeds are
# reused (hsd ablate skips a run folder whose table.csv and config.yaml match), so the sweep can span sessions.
#   bash scripts/capacity_sweep.sh 1:0 4:0 16:0 ...     (rank:seed items, run in this order)
# Results: experiments/capacity/r<R>/<arm>_seed<S>/ (table.csv and config.yaml are committed; the rest is ignored).
# Map and tests: .venv/bin/python scripts/capacity_map.py
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$PWD"  # this checkout's hsd, whatever the venv points at
for item in "$@"; do
  rank=${item%%:*} seed=${item##*:}
  .venv/bin/hsd ablate experiments/ablations/tscd.yaml experiments/ablations/one_stage.yaml \
    experiments/ablations/cd.yaml "lora.rank=$rank" "lora.alpha=$rank" trainer.progress_bar=false \
    --seeds "$seed" --out "experiments/capacity/r$rank" > /dev/null
  echo "$(date -u +%H:%M:%S) rank $rank seed $seed done"
done
