# Sourced by the device scripts (gpu_engine.sh, gpu_suite.sh) with their arguments: `what` (the
# first argument, default all), `out` ($OUT or bench-out), the offline wheels of .whl/ and an
# editable install of this checkout.
set -u
what=${1:-all}
out=${OUT:-bench-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 ROLLOUT_CACHE=/tmp/rollout-cache
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { echo "install failed"; tail "$out/install.log"; }
