#!/usr/bin/env bash
# The one prepared check for a lent GPU (run it first whenever a session has a device; about
# 8 minutes or less on an H100/H200). Everything it prints, and the files under $OUT (or
# benchmarks/results), go into BENCHMARKS.md.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu      # rehearsal on a CPU machine: tiny sizes, same steps
#
# Steps, each bounded by `timeout` so that one stuck step cannot eat the device budget:
#   1. the CUDA tests (tests/test_cuda.py, tests/test_cuda_host.py: host-resident input);
#   2. the reduced CUDA sweep: ResNet-34 at 8192 px fp32 (TF32 on), plain vs lightstream vs
#      fxstream recompute vs fxstream carry, tile 2880, and 32768 px with the image in host
#      memory (fxstream-host, carry);
#   3. the TF32-off error run at 4096 px against float64 plain autograd.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
MODE=cuda
[ "${1:-}" = "--cpu" ] && MODE=cpu
status=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2; shift 2
  echo "=== $name (limit ${seconds}s): $*"
  local start=$SECONDS
  timeout "$seconds" "$@" 2>&1 | tee "$OUT/gpu_check-$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  [ "$rc" = 0 ] || status=1
}

"$PY" -c "import torch, fxstream; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'fxstream', fxstream.__version__)"

if [ "$MODE" = cuda ]; then
  step tests 150 "$PY" -m pytest -q -x tests/test_cuda.py tests/test_cuda_host.py
  step sweep-8192 170 "$PY" benchmarks/bench.py --device cuda --arch resnet34 --precision fp32 --full-trunk-only \
    --sizes 8192 --tile 2880 --reps 2 --no-error-run --no-append --out-dir "$OUT" \
    --methods plain lightstream fxstream-recompute fxstream
  step host-32768 100 "$PY" benchmarks/bench.py --device cuda --arch resnet34 --precision fp32 --full-trunk-only \
    --sizes 32768 --tile 2880 --reps 1 --warmup 1 --no-error-run --no-append --out-dir "$OUT" \
    --methods fxstream-host
  step errors-tf32-off 60 "$PY" benchmarks/bench.py --device cuda --arch resnet34 --precision fp32 --full-trunk-only \
    --sizes 4096 --tile 2880 --reps 1 --error-size 4096 --no-append --out-dir "$OUT" \
    --methods plain fxstream-recompute fxstream
else
  step tests 120 "$PY" -m pytest -q tests/test_cuda.py tests/test_cuda_host.py
  step sweep-cpu 300 "$PY" benchmarks/bench.py --device cpu --arch resnet18 --precision fp32 --full-trunk-only \
    --sizes 640 --tile 480 --reps 1 --threads 1 --no-append --out-dir "$OUT" \
    --methods plain fxstream-recompute fxstream
fi
echo "gpu_check: $([ $status = 0 ] && echo all steps passed || echo SOME STEPS FAILED)"
exit $status
