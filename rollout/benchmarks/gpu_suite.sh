#!/usr/bin/env bash
# The GPU checks and benchmarks in one call (the device machine has no internet: missing wheels,
# pyzmq and msgpack, travel in .whl/). Usage: bash rollout/benchmarks/gpu_suite.sh [tests|alone|kernels|bench|host|all]
# or bash rollout/benchmarks/gpu_suite.sh compare|compare_w1 VARIANT... (each a quoted list of add_graph_args
# options, e.g. "--graph-sampling" "--graph-sampling --graph-inputs"): steady steps at 1-16 rows (two
# rounds), or W1 (2 repeats), with the defaults and with each variant, one process each, interleaved.
# `tests` runs every test of tests/kernels (their kernel tests run on CUDA where it is) and the -m gpu
# tests elsewhere, as 8 pytest processes in parallel on shards of the test ids (one process took
# longer than a 10-minute call, most of it compiling kernels on one CPU core): ~5 minutes on an H100.
# `alone` runs the tests that read the device's free memory (mem_get_info), which must have the GPU
# to themselves, in a call of their own (after the shards on the H100, 150 s did not finish them).
# `all` runs both, then the benchmarks: more than one call's 10 minutes.
. "$(dirname "$0")/device_setup.sh"
alone="tests/rollout/test_vmm_gpu.py tests/rollout/test_gpu_parity.py tests/weight_sync/test_weight_sync_gpu.py"
if [ "$what" = tests ] || [ "$what" = all ]; then
  logs=$(mktemp -d)
  ignore=$(printf -- "--ignore=%s " tests/kernels $alone)
  collect="python3 -m pytest --co -q -p no:cacheprovider"
  # shellcheck disable=SC2086  # word lists
  { $collect tests/kernels; $collect -m gpu tests $ignore; } | grep "::" >"$logs/ids"
  split -n r/8 "$logs/ids" "$logs/shard."
  for shard in "$logs"/shard.*; do
    xargs -a "$shard" -d '\n' timeout 400 python3 -m pytest -q -p no:cacheprovider -rfEX >"$shard.log" 2>&1 &
  done
  wait
  cat "$logs"/*.log >"$out/pytest_gpu.log"
  echo "$(wc -l <"$logs/ids") tests in 8 shards:"
  for log in "$logs"/*.log; do grep -E "^[0-9]+ (passed|failed)|^no tests ran" "$log" | tail -1; done
  grep -h -E "^(FAILED|ERROR|XPASS)" "$logs"/*.log
fi
if [ "$what" = alone ] || [ "$what" = all ]; then
  # shellcheck disable=SC2086
  timeout 540 python3 -m pytest $alone -q -m gpu -p no:cacheprovider -rfEX 2>&1 | tee "$out/pytest_alone.log" \
    | grep -E "^[0-9]+ (passed|failed)|^no tests ran|^(FAILED|ERROR|XPASS)"
fi
if [ "$what" = kernels ]; then
  timeout 150 python3 -m rollout.benchmarks.sampling_kernel --out "$out" 2>&1 | tail -14
  timeout 200 python3 -m rollout.benchmarks.gemv_chain --rows 1 2 4 --out "$out" 2>&1 | tail -25
  timeout 300 python3 -m rollout.benchmarks.attention_kernels --sweep --no-torch --out "$out" 2>&1 | grep -E "^sweep|^extend|^\{'name'" | tail -40
  timeout 150 python3 -m rollout.benchmarks.attention_kernels --extend --sweep --out "$out" 2>&1 | grep "name" | cut -c1-200
  timeout 200 python3 -m rollout.benchmarks.attention_kernels --ragged --out "$out" 2>&1 | grep "^ragged"
fi
if [ "$what" = host ]; then  # host-bound decode: per-phase host time, then what it costs end to end
  timeout 200 python3 -m rollout.benchmarks.host_overhead --model qwen3-0.6b --load-format dummy \
    --batches 1 8 32 64 256 --out "$out" 2>&1 | tee "$out/host_overhead.log" | grep "^batch"
  timeout 120 python3 -m rollout.benchmarks.host_overhead --model qwen3-0.6b --load-format dummy \
    --batches 1 --steps 2 --admission 256 --prompt-len 100 1024 --out "$out/admission" 2>&1 \
    | sed -n '/^admission/,$p'  # W1's admission phase: 256 prompts added at once, 8,192-token steps
  timeout 200 python3 -m rollout.benchmarks.host_overhead --model qwen3-0.6b --load-format dummy \
    --batches 32 256 --prompt-len 400 500 --sampling '{"repetition_penalty": 1.1}' \
    --out "$out/penalties" 2>&1 | tee "$out/host_overhead_penalties.log" | grep "^batch"
  timeout 200 python3 -m rollout.benchmarks.core_overhead --out "$out" 2>&1 | tail -5
  timeout 120 python3 -m rollout.benchmarks.step_profile --batches 1 32 256 --out "$out/profile" 2>&1 | grep "^batch"
  timeout 400 python3 -m rollout.benchmarks.throughput --workloads w1 --repeats 3 --out "$out" --timeout 150 2>&1 | tail -5
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 150 python3 -m rollout.benchmarks.decode --out "$out" --steps 10 2>&1 | tail -34
  timeout 60 python3 -m rollout.benchmarks.prefill --out "$out" 2>&1 | tail -2
  timeout 120 python3 -m rollout.benchmarks.rl --out "$out" 2>&1 | tail -2
  timeout 300 python3 -m rollout.benchmarks.throughput --workloads w1 peer256 --peer hf --out "$out" --timeout 200 2>&1 | tail -6
fi
if [ "$what" = compare ] || [ "$what" = compare_w1 ]; then
  shift
  variants=("" "$@")  # the defaults, then each argument (a quoted option list) as one variant
  if [ "$what" = compare ]; then
    for run in 1 2; do
      for i in "${!variants[@]}"; do
        opts=${variants[$i]}  # shellcheck disable=SC2086  # $opts: a word list
        timeout 150 python3 -m rollout.benchmarks.step_profile --batches 1 2 4 8 16 --steps 20 $opts \
          --out "$out/compare${run}_$i" 2>&1 | grep -E "^batch|host ms" | cut -c1-220 | sed "s/^/[${opts:-defaults}] /"
      done
    done
  else
    for i in "${!variants[@]}"; do
      opts=${variants[$i]}  # shellcheck disable=SC2086
      timeout 200 python3 -m rollout.benchmarks.throughput --workloads w1 --repeats 2 $opts --out "$out/w1_$i" \
        --timeout 150 2>&1 | tail -2 | sed "s/^/[${opts:-defaults}] /"
    done
  fi
fi
