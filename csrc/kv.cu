// Per-row radix selection of the tokens a KV cache keeps, in one launch: one block per
// (batch, head) row. Scores (given, or TRIM-KV's (step − pos)·log β computed on the fly) become
// 32-bit order-preserving keys; four 8-bit passes of shared-memory histograms find the key T of
// the k-th best unprotected token and how many of the tokens tied at T to keep (the most recent);
// a last pass writes the kept indices in position order with block-wide prefix sums. The same
// ordering as negkernels/reference/kv.py: protected first, NaN above +inf, ties to the recent.
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <cstdint>

#include "kv.h"
#include "device_guard.cuh"
#include "load_value.cuh"

namespace negkernels {
namespace {

constexpr int kThreads = 1024;
constexpr uint64_t kNoThreshold = uint64_t(1) << 32;

__device__ __forceinline__ int64_t load_index(const void* p, int kind, int64_t i) {
  return kind == kIndexI32 ? static_cast<const int32_t*>(p)[i] : static_cast<const int64_t*>(p)[i];
}

__device__ __forceinline__ float token_score(const SelectRetainedArgs& a, int64_t row, int64_t b, int64_t h, int64_t i) {
  if (a.scores != nullptr) return a.scores[row * a.seq + i];
  const float lb = load_value(a.log_beta, a.log_beta_dtype, b * a.lb_stride_b + h * a.lb_stride_h + i * a.lb_stride_s);
  const int64_t p = b * a.pos_stride_b + h * a.pos_stride_h + i * a.pos_stride_s;
  const bool float_step = a.step != nullptr && a.step_kind >= kIndexF32;
  float age;
  if (a.positions_kind >= kIndexF32 || float_step) {
    const float pos = a.positions_kind == kIndexF32 ? static_cast<const float*>(a.positions)[p]
                    : a.positions_kind == kIndexF64 ? static_cast<float>(static_cast<const double*>(a.positions)[p])
                                                    : static_cast<float>(load_index(a.positions, a.positions_kind, p));
    float step = static_cast<float>(a.step_value);
    if (a.step != nullptr) {
      step = a.step_kind == kIndexF32 ? static_cast<const float*>(a.step)[b]
           : a.step_kind == kIndexF64 ? static_cast<float>(static_cast<const double*>(a.step)[b])
                                      : static_cast<float>(load_index(a.step, a.step_kind, b));
    }
    age = __fsub_rn(step, pos);
  } else {
    const int64_t step = a.step != nullptr ? load_index(a.step, a.step_kind, b) : a.step_value;
    age = static_cast<float>(step - load_index(a.positions, a.positions_kind, p));  // exact, then one rounding
  }
  return __fmul_rn(age, lb);
}

// fp32 → [0, 2^32) with the floats' order; −0 and +0 share a key; every NaN gets the largest key.
__device__ __forceinline__ uint64_t ordered_key(float x) {
  if (x != x) return 0xFFFFFFFFull;
  if (x == 0.0f) x = 0.0f;
  const int64_t bits = static_cast<int64_t>(__float_as_int(x));
  return static_cast<uint64_t>(bits >= 0 ? bits + 2147483648ll : -1 - bits);
}

__global__ void __launch_bounds__(kThreads) select_retained_kernel(SelectRetainedArgs a) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ unsigned int hist[256];
  __shared__ uint64_t s_prefix;
  __shared__ int64_t s_need, s_ties;

  const int64_t row = blockIdx.x;
  const int64_t b = row / a.heads, h = row % a.heads;
  const int tid = threadIdx.x;
  int64_t length = a.seq;
  if (a.lengths != nullptr) {
    length = load_index(a.lengths, a.lengths_kind, b);
    length = length < 0 ? 0 : (length > a.seq ? a.seq : length);
  }
  const int64_t n_sink = a.sink < length ? a.sink : length;
  const int64_t n_window = a.window < length - n_sink ? a.window : length - n_sink;
  const int64_t total = a.kept < length ? a.kept : length;
  const int64_t k = total - n_sink - n_window;  // unprotected tokens to choose
  const int64_t window_start = length - n_window;

  if (tid == 0) {
    s_prefix = 0;
    s_need = k;
    s_ties = 0;
  }
  for (int pass = 0; pass < 4 && k > 0; ++pass) {
    const int shift = 24 - 8 * pass;
    for (int d = tid; d < 256; d += kThreads) hist[d] = 0;
    __syncthreads();
    const uint64_t prefix = s_prefix;
    for (int64_t i = n_sink + tid; i < window_start; i += kThreads) {
      const uint64_t key = ordered_key(token_score(a, row, b, h, i));
      if (pass > 0 && (key >> (shift + 8)) != (prefix >> (shift + 8))) continue;
      atomicAdd(&hist[(key >> shift) & 255], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      // the largest digit d whose candidates at or above it number at least `need`
      int64_t at_least = 0;
      int digit = 0;
      for (int d = 255; d >= 0; --d) {
        if (at_least + hist[d] >= s_need) {
          digit = d;
          break;
        }
        at_least += hist[d];
      }
      s_prefix = prefix | (static_cast<uint64_t>(digit) << shift);
      s_need -= at_least;
      s_ties = hist[digit];
    }
    __syncthreads();
  }
  __syncthreads();
  const uint64_t threshold = k > 0 ? s_prefix : kNoThreshold;
  const int64_t first_kept_tie = s_ties - s_need;

  int64_t written = 0, ties_seen = 0;
  int64_t* out = a.out + row * a.kept;
  for (int64_t base = 0; base < length; base += kThreads) {
    const int64_t i = base + tid;
    bool protected_token = false, candidate = false, tie = false, above = false;
    if (i < length) {
      protected_token = i < n_sink || i >= window_start;
      candidate = !protected_token;
      if (candidate && k > 0) {
        const uint64_t key = ordered_key(token_score(a, row, b, h, i));
        tie = key == threshold;
        above = key > threshold;
      }
    }
    int64_t tie_rank, tie_total;
    Scan(scan_storage).ExclusiveSum(static_cast<int64_t>(tie), tie_rank, tie_total);
    __syncthreads();
    const bool keep = protected_token || above || (tie && ties_seen + tie_rank >= first_kept_tie);
    int64_t slot, keep_total;
    Scan(scan_storage).ExclusiveSum(static_cast<int64_t>(keep), slot, keep_total);
    __syncthreads();
    if (keep) out[written + slot] = i;
    written += keep_total;
    ties_seen += tie_total;
  }
  for (int64_t j = written + tid; j < a.kept; j += kThreads) out[j] = -1;
}

}  // namespace

int launch_select_retained(const SelectRetainedArgs& args, void* stream) {
  if (args.rows == 0 || args.kept == 0) return cudaSuccess;
  DeviceGuard guard(args.device);
  if (guard.error() != cudaSuccess) return guard.error();
  select_retained_kernel<<<static_cast<unsigned int>(args.rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return cudaGetLastError();
}

}  // namespace negkernels
