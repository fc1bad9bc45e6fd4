#!/usr/bin/env bash
# The README's results table on CUB-200-2011: train on classes 1-15, pick the epoch on classes
# 16-20 (validation), test on classes 21-30 (never seen in training or selection).
#   bash scripts/cub_results.sh [CUB_DIR] [OUT]          (default ../shared/data/cub-dev, out/cub)
#   FINETUNE_EPOCHS=5 bash scripts/cub_results.sh   also fine-tunes the whole network (DEVICE=cuda)
# A finished run is reused (--resume); delete OUT to start again. Prints the Markdown tables.
set -euo pipefail
cd "$(dirname "$0")/.."
cub=${1:-../shared/data/cub-dev}
out=${2:-out/cub}
device=${DEVICE:-cpu}
diml=.venv/bin/diml
mkdir -p "$out"

train() {  # NAME, then diml train options
    local name=$1
    shift
    local resume=()
    [ -f "$out/$name/run.json" ] && resume=(--resume)
    "$diml" train --data "$cub" --classes 1-15 --val-classes 16-20 --device "$device" \
        --out "$out/$name" --quiet "${resume[@]}" "$@"
    "$diml" evaluate --data "$cub" --classes 21-30 --device "$device" \
        --checkpoint "$out/$name/best.safetensors" --json "$out/$name.json"
}

"$diml" evaluate --data "$cub" --classes 21-30 --device "$device" --json "$out/imagenet.json"
"$diml" evaluate --data "$cub" --classes 21-30 --device "$device" --grid 7 \
    --json "$out/imagenet-g7.json"
for loss in ms-diml margin-diml ms margin; do
    train "head-$loss" --loss "$loss" --freeze-backbone --epochs 25 --head-lr 1e-4
done
if [ -n "${FINETUNE_EPOCHS:-}" ]; then
    train finetune-ms-diml --loss ms-diml --epochs "$FINETUNE_EPOCHS" --lr "${FINETUNE_LR:-5e-5}" \
        --head-lr 1e-4
fi
.venv/bin/python scripts/results_table.py "$out"
