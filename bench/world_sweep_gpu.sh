#!/bin/bash
# The [world] design sweep as it was run on a lent GPU machine (python3 with torch/transformers/tokenizers but no
# seqedit install and no package index): copies the packages into the installed layout, then runs every variant of
# bench/world_variants.json at once (training and editing on CUDA) and leaves sweep.json, sweep.log and logs.tgz in
# $OUT. Results of the 2026-11-26 run: bench/results/world_sweep_*.log. Knobs: SWEEP_S (hard limit), SWEEP_MIN
# (edit loops stop this many minutes after the start).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
OUT=${OUT:-$PWD/sweep-out}; mkdir -p "$OUT"
mkdir -p /tmp/pk && cp -rL seqedit /tmp/pk/ && for d in editors downstream analysis; do cp -r $d /tmp/pk/seqedit/$d; done
export PYTHONPATH=/tmp/pk
nvidia-smi -L; nproc
python3 -c "import torch, transformers, tokenizers; print(torch.__version__, transformers.__version__, tokenizers.__version__, torch.cuda.is_available())"
timeout "${SWEEP_S:-540}" python3 bench/world_sweep.py bench/world_variants.json --out "$OUT/sweep.json" --work /tmp/sw \
  --device cuda --minutes "${SWEEP_MIN:-7.3}" --jobs 15 2>&1 | tee "$OUT/sweep.log"
cd /tmp/sw && tar czf "$OUT/logs.tgz" --exclude=cache . ; ls -la "$OUT"
