#!/usr/bin/env bash
# The short GPU verification: at most 8 minutes on a bare H200 and at most 8 result files in
# ${OUT:-gpu-check} (no subfolder). In priority order:
#   1. a 60 s hang guard on the kernels that synchronise their programs on the device;
#   2. every Triton kernel at its bench shape with device time, wall time and the floor;
#   3. the CUDA backend's kernels, once the extension has built in the background meanwhile;
#   4. a bounded subset of the GPU parity tests;
#   5. compute-sanitizer memcheck on every kernel, in whatever time is left.
# The full run (every GPU test, racecheck, initcheck, the whole bench) is benchmarks/run_on_gpu.sh.
set -u
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export NEGKERNELS_CACHE_DIR="${TMPDIR:-/tmp}/negkernels-ext"  # the extension cache never goes to $out
py=${PYTHON:-python3}
budget=${BUDGET_S:-470}
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
summary="$out/summary.txt"
: >"$summary"
step() {  # step NAME SECONDS command...: run under a timeout, log to $out/NAME.log, one summary line
  local name=$1 limit=$2
  shift 2
  if [ "$limit" -le 5 ]; then echo "$name: skipped, no time left" | tee -a "$summary"; return; fi
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$summary"
  tail -n "${TAIL:-8}" "$out/$name.log"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee -a "$summary"
( timeout 300 "$py" -m negkernels build-ext --arch 90 >"$out/build-ext.log" 2>&1; echo "build-ext: exit $?" >>"$summary" ) &
build=$!
step hang-guard 60 "$py" benchmarks/hang_guard.py
wait "$build"
cuda_impl=()
grep -q "build-ext: exit 0" "$summary" && cuda_impl=(--impl cuda)
TAIL=30 step bench $(( $(left) > 200 ? 200 : $(left) )) "$py" -m negkernels bench --impl triton "${cuda_impl[@]}" --out "$out"
step pytest-gpu $(( $(left) - 60 > 150 ? 150 : $(left) - 60 )) "$py" -m pytest -q -x -p no:cacheprovider -m gpu \
  tests/test_gpu_logprobs.py tests/test_gpu_kv.py tests/test_gpu_contrastive.py tests/test_gpu.py -k "not compile"
step memcheck "$(left)" compute-sanitizer --tool memcheck --error-exitcode 1 "$py" benchmarks/sanitize.py
echo "total: $(( $(date +%s) - start )) s" | tee -a "$summary"
! grep -q "exit [1-9]" "$summary"
