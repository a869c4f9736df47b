#!/usr/bin/env bash
# GPU check: ONE script, under ten minutes, for a person with a GPU machine (Jetson or CUDA host).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Records what is installed (TensorRT, libnvinfer, the GPU, pycuda, onnxruntime providers), then
# builds the TensorRT engine, runs `appliance selftest --json` and `benchmarks/inference.py`,
# each under its own time limit. Everything lands in OUT_DIR (default
# gpu-check-<host>-<UTC time>/) with summary.txt listing each step's exit code. A failing step
# does not stop the others. Send the folder back. See docs/engines.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-$(hostname)-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
APPLIANCE=("$PY" -m appliance)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

step() {  # step NAME LIMIT_S CMD...: run CMD with a time limit, output to OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$OUT/$name.txt" >&2
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.txt" 2>&1
  local rc=$? cmd="$*"
  printf '%-16s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "${cmd%%$'\n'*}" \
    | tee -a "$SUMMARY"
}

# 1. what is there (seconds)
step system 20 bash -c 'date -u; uname -a; cat /etc/nv_tegra_release 2>/dev/null; nproc; free -m'
step tensorrt 30 "$PY" -c 'import tensorrt; print("tensorrt", tensorrt.__version__)'
step nvinfer 10 bash -c 'ldconfig -p | grep -i nvinfer'
step nvidia-smi 20 bash -c 'nvidia-smi || timeout 3 tegrastats --interval 1000 || true'
step pycuda 30 "$PY" -c 'from appliance.infer import cuda; r = cuda.unavailable_reason()
print("unavailable:", r) if r else print(cuda.gpu_info())'
step onnxruntime 30 "$PY" -c 'import onnxruntime as ort; print(ort.__version__, ort.get_device())
print(ort.get_available_providers())'
step pip-freeze 30 "$PY" -m pip freeze

# 2. a config whose engine cache persists between runs of this script
CACHE=${ENGINE_CACHE:-$HOME/.cache/appliance-engines}
cat >"$OUT/appliance.toml" <<TOML
[[devices]]
name = "cnc-1"
profile = "cnc-sim"

[batch]
max_batch = ${MAX_BATCH:-1024}

[engine]
backend = "auto"
cache_dir = "$CACHE"
TOML

# 3. build (TensorRT first; minutes on a Jetson the first time), list, selftest, benchmark
step engine-build 300 "${APPLIANCE[@]}" engine build -c "$OUT/appliance.toml"
step engine-list 30 "${APPLIANCE[@]}" engine list -c "$OUT/appliance.toml" --json
step selftest 120 "${APPLIANCE[@]}" selftest -c "$OUT/appliance.toml" --json "$OUT/selftest.json"
step inference-bench 180 "$PY" benchmarks/inference.py --json "$OUT/inference.json"

echo "results in $OUT" >&2
cat "$SUMMARY"
