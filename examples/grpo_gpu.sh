#!/usr/bin/env bash
# Issue 7: time per RL step on one GPU (rollout / weight sync / train) for the Qwen3-0.6B shape.
#
# Run from the repo root on the GPU machine (no internet: the model is random weights of the real
# shape, written locally), after `pip install -e .`:
#
#     bash examples/grpo_gpu.sh            # writes into $OUT (default /tmp/grpo_gpu_out)
#
# Writes: env.txt, make_model.log, grpo_gpu.log (stdout+stderr of the run, one JSON line per step),
# steps.jsonl, summary.json (means over steps 2..N), gpu_mem.csv (nvidia-smi used MiB every 0.5 s,
# both processes). COMPARE_NO_SLEEP=1 adds a shorter run with the engine kept awake (no sleep/wake):
# grpo_gpu_nosleep.log, summary_nosleep.json. SLEEP_KEEPS_GRAPHS=0: the engine's sleep frees its CUDA
# graphs and wake captures them again (RunnerConfig(sleep_keeps_graphs=False); kept by default).
# Expected: a few minutes in all on an H100.
set -euo pipefail

OUT="${OUT:-/tmp/grpo_gpu_out}"
MODEL_DIR="${MODEL_DIR:-/tmp/qwen3-0.6b-random}"
STEPS="${STEPS:-6}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export ROLLOUT_CACHE="${ROLLOUT_CACHE:-/tmp/rollout-cache}"

{
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1

MEM_PID=""
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 500 \
    > "$OUT/gpu_mem.csv" 2> /dev/null &
  MEM_PID=$!
fi
stop_sampler() { if [ -n "$MEM_PID" ]; then kill "$MEM_PID" 2> /dev/null || true; fi; }
trap stop_sampler EXIT

# (a) random-weight Qwen3-0.6B directory (bf16 safetensors + offline byte-level tokenizer)
if [ ! -f "$MODEL_DIR/model.safetensors" ]; then
  "$PY" examples/make_random_model.py "$MODEL_DIR" --shape qwen3-0.6b --dtype bfloat16 --device cuda \
    2>&1 | tee "$OUT/make_model.log"
fi

# (b) colocated GRPO: 32 prompts x n=8, 256 new tokens, sleep(2) during training, CUDA IPC sync.
# --random-rewards: a random model never earns the task's reward; coin flips make every step a real
# weight change (so logprob_mismatch in each step's line also checks that the sync landed).
timeout 420 "$PY" examples/grpo_gpu.py "$MODEL_DIR" --device cuda --steps "$STEPS" \
  --prompts-per-step 32 --n 8 --max-tokens 256 --micro-batch 16 --gpu-memory-utilization 0.35 \
  --random-rewards --lr 1e-6 --log "$OUT/steps.jsonl" --summary "$OUT/summary.json" \
  $([ "${SLEEP_KEEPS_GRAPHS:-1}" = 0 ] && echo --no-sleep-keeps-graphs) 2>&1 | tee "$OUT/grpo_gpu.log"

# (c) optional: the same with the engine awake throughout (weight update alone, no sleep/wake)
if [ "${COMPARE_NO_SLEEP:-0}" = "1" ]; then
  timeout 300 "$PY" examples/grpo_gpu.py "$MODEL_DIR" --device cuda --steps 4 \
    --prompts-per-step 32 --n 8 --max-tokens 256 --micro-batch 16 --gpu-memory-utilization 0.35 \
    --random-rewards --lr 1e-6 --no-sleep --log "$OUT/steps_nosleep.jsonl" \
    --summary "$OUT/summary_nosleep.json" 2>&1 | tee "$OUT/grpo_gpu_nosleep.log"
fi
