#!/usr/bin/env bash
# The results tables of docs/measured.md on CUB-200-2011: train on classes 1-15, select epochs and calibrate
# the structural weight on classes 16-20 (validation), test on classes 21-30 (never seen in
# training, selection or calibration).
#   bash scripts/cub_results.sh [CUB_DIR] [OUT]          (default ../shared/data/cub-dev, out/cub)
#   GRID7=1 ...            also trains the compact recipe at 7 x 7 (slower: 49 parts)
#   SEEDS="1 2" ...        also trains the default, the tail and the compact recipe with these
#                          seeds (how much a run varies)
#   On one GPU: DEVICE=cuda WORKERS=8 bash scripts/cub_results.sh
# A finished run is reused (--resume); delete OUT to start again. Prints the Markdown tables.
set -euo pipefail
cd "$(dirname "$0")/.."
cub=${1:-../shared/data/cub-dev}
out=${2:-out/cub}
device=${DEVICE:-cpu}
workers=${WORKERS:-0}  # image decoding processes (8 on a GPU machine)
diml=.venv/bin/diml
mkdir -p "$out"

test_on() {  # NAME CHECKPOINT-OR-EMPTY [diml evaluate options]
    local name=$1 checkpoint=$2
    shift 2
    # A report written before the greying-out check (deletion.ranking_score) is evaluated again.
    [ -f "$out/$name.json" ] && grep -q '"ranking_score"' "$out/$name.json" && return
    local model=()
    [ -n "$checkpoint" ] && model=(--checkpoint "$checkpoint")
    "$diml" evaluate --data "$cub" --classes 21-30 --device "$device" --workers "$workers" \
        "${model[@]}" --json "$out/$name.json" "$@"
}

train() {  # NAME, then diml train options
    local name=$1
    shift
    local resume=()
    [ -f "$out/$name/run.json" ] && resume=(--resume)
    "$diml" train --data "$cub" --classes 1-15 --val-classes 16-20 --device "$device" \
        --workers "$workers" --out "$out/$name" --quiet "${resume[@]}" "$@"
    test_on "$name" "$out/$name/best.safetensors"
}

# The training-free default model (its structural weight was calibrated on classes 1-20).
test_on imagenet ""
test_on imagenet-g7 "" --grid 7
# The default recipe of `diml train` (the whole network, 512-d; about 17 minutes on 2 cores),
# the earlier default that trains the last stage on cached maps, the compact one (128-d), then
# what each part of the recipe adds (at 128-d).
train default
train tail --train tail
train compact --train tail --dim 128
train head-pca --train head --dim 128
train head-random --train head --head-init random --head-lr 1e-3 --dim 128
if [ -n "${GRID7:-}" ]; then
    train compact-g7 --train tail --grid 7 --dim 128
fi
for seed in ${SEEDS:-}; do
    train "default-seed$seed" --seed "$seed"
    train "tail-seed$seed" --train tail --seed "$seed"
    train "compact-seed$seed" --train tail --seed "$seed" --dim 128
done
.venv/bin/python scripts/results_table.py "$out"
