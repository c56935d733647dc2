#!/usr/bin/env bash
# The one prepared check for a lent GPU (run it first whenever a session has a device; about
# 8 minutes or less on an H100/H200). Everything it prints, and the files under $OUT (or
# benchmarks/results), go into BENCHMARKS.md.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu      # rehearsal on a CPU machine: tiny sizes, same steps
#
# Steps, each bounded by `timeout` so that one stuck step cannot eat the device budget (the
# limits add up to 470 s):
#   1. the CUDA tests (tests/test_cuda.py, tests/test_cuda_host.py: host-resident input,
#      tests/test_cuda_stripes.py: carry's stripes in pinned host memory and banded, exact and
#      with the device peak the memory model predicts);
#   2. the reduced CUDA sweep: ResNet-34 at 8192 px fp32 (TF32 on), plain vs lightstream vs
#      fxstream recompute vs fxstream carry, tile 2880;
#   3. the memory truth on CUDA (benchmarks/stripes.py): ResNet-34 at 8192 px, tile 2048, the
#      image in pinned host memory; max_memory_allocated of one step against the prediction
#      (device_bytes) and the step time, for plain, recompute and carry with its stripes on the
#      device, in host memory and banded (one tile row per band);
#   4. one training step of ResNet-34 on a 32768 px image in host memory, tile 2048, carry with
#      host stripes and output_device="cpu" (the trunk output and the head on the host): time,
#      device peak against device_bytes, host peak RSS;
#   5. the TF32-off error run at 4096 px against float64 plain autograd.
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
  step tests 110 "$PY" -m pytest -q -x tests/test_cuda.py tests/test_cuda_host.py tests/test_cuda_stripes.py
  step sweep-8192 140 "$PY" benchmarks/bench.py --device cuda --arch resnet34 --precision fp32 --full-trunk-only \
    --sizes 8192 --tile 2880 --reps 2 --no-error-run --no-append --out-dir "$OUT" \
    --methods plain lightstream fxstream-recompute fxstream
  step memory-8192 85 "$PY" benchmarks/stripes.py --device cuda --arch resnet34 --size 8192 --tile 2048 \
    --reps 1 --band-rows 1 --schedules plain recompute device host banded --json "$OUT/gpu_check-stripes.jsonl"
  step host-32768 90 "$PY" benchmarks/stripes.py --device cuda --arch resnet34 --size 32768 --tile 2048 \
    --reps 1 --schedules host --output-device cpu --json "$OUT/gpu_check-stripes.jsonl"
  step errors-tf32-off 45 "$PY" benchmarks/bench.py --device cuda --arch resnet34 --precision fp32 --full-trunk-only \
    --sizes 4096 --tile 2880 --reps 1 --error-size 4096 --no-append --out-dir "$OUT" \
    --methods plain fxstream-recompute fxstream
else
  step tests 120 "$PY" -m pytest -q tests/test_cuda.py tests/test_cuda_host.py tests/test_cuda_stripes.py
  step sweep-cpu 300 "$PY" benchmarks/bench.py --device cpu --arch resnet18 --precision fp32 --full-trunk-only \
    --sizes 640 --tile 480 --reps 1 --threads 1 --no-append --out-dir "$OUT" \
    --methods plain fxstream-recompute fxstream
  step memory-cpu 150 "$PY" benchmarks/stripes.py --dry-run --json "$OUT/gpu_check-stripes.jsonl"
  step host-cpu 120 "$PY" benchmarks/stripes.py --device cpu --arch resnet18 --size 1024 --tile 480 --reps 0 \
    --threads 1 --schedules host --output-device cpu --json "$OUT/gpu_check-stripes.jsonl"
fi
echo "gpu_check: $([ $status = 0 ] && echo all steps passed || echo SOME STEPS FAILED)"
exit $status
