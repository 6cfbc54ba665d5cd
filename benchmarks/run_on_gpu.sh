#!/usr/bin/env bash
# Everything a GPU machine has to confirm, in one command; logs under ${OUT:-gpu-results}:
# the CUDA extension build, the GPU test suite, `negkernels check`, compute-sanitizer (memcheck on
# every kernel, racecheck and initcheck on the CUDA kernels) and `negkernels bench`.
# Runs the package from this source tree with the python that holds a CUDA build of torch.
set -u
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" NEGKERNELS_CACHE_DIR="${TMPDIR:-/tmp}/negkernels-ext"
py=${PYTHON:-python3}
status=0
step() {
  local name=$1
  shift
  echo "== $name: $*"
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-12}" "$out/$name.log"
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step build-ext "$py" -m negkernels build-ext --arch 90
step pytest-gpu "$py" -m pytest -q -p no:cacheprovider -m gpu tests
step check "$py" -m negkernels check
step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$py" benchmarks/sanitize.py
step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 "$py" benchmarks/sanitize.py --cuda-only
step initcheck compute-sanitizer --tool initcheck --error-exitcode 1 "$py" benchmarks/sanitize.py --cuda-only
TAIL=40 step bench "$py" -m negkernels bench --out "$out"
exit $status
