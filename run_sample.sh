#!/usr/bin/env bash
# Offline smoke run (CPU is fine, about 8 minutes on 2 idle cores): builds data/sample from the Python standard library's
# docstrings with its own 1024-piece BPE tokenizer, then trains, quantizes and scores a small model on it (its MLP
# matrices are big enough to be exported as int6 by GPTQ, with the embedding as int8).
# The numbers it prints are for that sample, never FineWeb. Any variable below can be overridden from the shell.
# Training is bounded by ITERATIONS alone (no wall-clock cap), so a slow or busy machine gives the same numbers.
# Each call is a new RUN_ID (train_gpt.py refuses a used one); it writes logs/sample_cpu_<time>.* and submission.json.
set -euo pipefail
cd "$(dirname "$0")"
[ -f data/sample/fineweb_val_000000.bin ] || python data/make_sample.py --out data/sample
export DATA_PATH=data/sample TOKENIZER_PATH=data/sample/tokenizer.model
export DATA_LABEL="${DATA_LABEL:-offline sample: Python stdlib docstrings, own 1024 BPE (not FineWeb)}"
export RUN_ID="${RUN_ID:-sample_cpu_$(date +%Y%m%d_%H%M%S)}" SUBMISSION_JSON="${SUBMISSION_JSON:-submission.json}"
export NUM_LAYERS="${NUM_LAYERS:-4}" MODEL_DIM="${MODEL_DIM:-192}" NUM_HEADS="${NUM_HEADS:-4}" NUM_KV_HEADS="${NUM_KV_HEADS:-2}"
export TRAIN_SEQ_LEN="${TRAIN_SEQ_LEN:-128}" TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-8192}"
export ITERATIONS="${ITERATIONS:-150}" MAX_WALLCLOCK_SECONDS="${MAX_WALLCLOCK_SECONDS:-0}" WARMUP_STEPS="${WARMUP_STEPS:-0}"
export VAL_LOSS_EVERY="${VAL_LOSS_EVERY:-50}" TRAIN_LOG_EVERY="${TRAIN_LOG_EVERY:-25}" VOCAB_SIZE="${VOCAB_SIZE:-1024}"
# the default stack's recurrence and two-lane blocks, scaled to 4 layers: order 0 1 2 1 | 2 1 2 3, block 3 two-lane
export LOOP_START="${LOOP_START:-1}" LOOP_END="${LOOP_END:-2}" PARALLEL_START_LAYER="${PARALLEL_START_LAYER:-3}"
export QAT="${QAT:-1}" QAT_START_FRAC="${QAT_START_FRAC:-0.8}"
# the sample is plain text with its own tokenizer (no CaseOps); eval and TTT context 1.25x training's, as 2560 / 2048
export CASEOPS_ENABLED="${CASEOPS_ENABLED:-0}" EVAL_SEQ_LEN="${EVAL_SEQ_LEN:-160}" TTT_EVAL_SEQ_LEN="${TTT_EVAL_SEQ_LEN:-160}"
exec python train_gpt.py
