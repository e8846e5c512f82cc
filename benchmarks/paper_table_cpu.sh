#!/usr/bin/env bash
# The paper's table at the scale a 2-core CPU affords (about 25 minutes): dense, SDT and STT
# variants of SmolLM2-135M-Instruct, each fine-tuned for the same steps on the train split
# (base weights at --lr; the fresh routing adapter at --adapter-lr), then measured side by side
# on held-out validation blocks. On a GPU, raise STEPS/BATCH/BLOCK (DESIGN.md §11).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-40} BATCH=${BATCH:-2} BLOCK=${BLOCK:-256} RUNS=${RUNS:-runs/paper}
BASE=models/SmolLM2-135M-Instruct
SUBJECTIVE=${SUBJECTIVE:-.venv/bin/subjective}
PYTHON=${PYTHON:-.venv/bin/python}
train() {  # model output [extra options]
    "$SUBJECTIVE" train "$1" --data data/train.txt --output "$2" --steps "$STEPS" \
        --batch-size "$BATCH" --block-size "$BLOCK" --lr 1e-5 --adapter-lr 1e-3 \
        --save-every "$STEPS" "${@:3}"
}
for kind in sdt stt; do
    [ -f "$RUNS/$kind-init/config.json" ] || "$SUBJECTIVE" model convert --to "$kind" "$BASE" "$RUNS/$kind-init"
done
[ -f "$RUNS/dense/model/config.json" ] || train "$BASE" "$RUNS/dense"
[ -f "$RUNS/sdt/model/config.json" ] || train "$RUNS/sdt-init" "$RUNS/sdt"
[ -f "$RUNS/stt/model/config.json" ] || train "$RUNS/stt-init" "$RUNS/stt"
# The same, distilled from the dense model (KL to its next-token distribution).
for kind in sdt stt; do
    [ -f "$RUNS/$kind-distill/model/config.json" ] ||
        train "$RUNS/$kind-init" "$RUNS/$kind-distill" --teacher "$BASE"
done
"$PYTHON" benchmarks/paper_table.py --dense "$RUNS/dense/model" \
    --model "$RUNS/sdt/model" --model "$RUNS/stt/model" \
    --model "$RUNS/sdt-distill/model" --model "$RUNS/stt-distill/model" --text data/validation.txt \
    --threshold 0 --threshold 0.45 \
    --command "STEPS=$STEPS BATCH=$BATCH BLOCK=$BLOCK benchmarks/paper_table_cpu.sh" \
    --training "subjective train: $STEPS steps x $BATCH x $BLOCK tokens of data/train.txt each, lr 1e-5 (adapter 1e-3)" \
    --notes "${NOTES:-CPU scale: $((STEPS * BATCH * BLOCK)) fine-tuning tokens per variant, not the ~100M that the paper targets need. The compute reductions are real (meter counts of the executed routing); the quality is far from the +2% perplexity target and says nothing about it. Threshold 0 (every token kept) isolates the conversion loss from the routing loss.}"
