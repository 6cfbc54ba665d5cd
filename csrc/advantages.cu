// Group-normalized advantages as one cooperative launch: a segmented reduction over group ids in
// any order. Phases (separated by grid.sync()): clear → count and max|r| per group → fixed-point
// sums → squared deviations (and the numerators' sum for whitening) → [whitening spread] → output.
// Sums use integer atomics on fixed-point values scaled per group by a power of two, so every
// statistic is bit-identical run to run; see negkernels/triton/advantages.py for the numerics.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "advantages.h"
#include "device_guard.cuh"
#include "load_value.cuh"

namespace cg = cooperative_groups;

namespace negkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kRowCount = 0, kRowMaxBits = 1, kRowSum = 2, kRowSquares = 3;

__device__ __forceinline__ float load_reward(const GroupAdvantagesArgs& a, int64_t i) {
  return load_value(a.rewards, a.rewards_dtype, i);
}

__device__ __forceinline__ int64_t group_of(const GroupAdvantagesArgs& a, int64_t i) {
  if (a.group_index == nullptr) return i / a.group_size;
  return a.group_index_bits == 32 ? static_cast<const int32_t*>(a.group_index)[i] : static_cast<const int64_t*>(a.group_index)[i];
}

__device__ __forceinline__ long long abs_bits(float x) { return static_cast<long long>(__float_as_uint(x) & 0x7FFFFFFFu); }
__device__ __forceinline__ int exponent_bound(long long bits) { return static_cast<int>((bits >> 23) & 0xFF) - 126; }
__device__ __forceinline__ bool non_finite(long long bits) { return bits >= 0x7F800000LL; }
__device__ __forceinline__ long long quantize(double x, int shift) {
  double q = ldexp(x, shift);
  return (q == q && isfinite(q)) ? static_cast<long long>(q) : 0LL;  // truncation, like Triton's cast
}
__device__ __forceinline__ long long ld(const int64_t* p) { return static_cast<long long>(__ldcg(p)); }

struct Add {
  __device__ long long operator()(long long x, long long y) const { return x + y; }
};
struct Max {
  __device__ long long operator()(long long x, long long y) const { return max(x, y); }
};

// Integer reduction over the block (deterministic in any order); the result is valid in thread 0.
template <typename Op>
__device__ __forceinline__ long long block_reduce(long long v, long long* shared, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xFFFFFFFFu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  long long total = 0;  // identity of both Add and Max here: max operands are non-negative bit patterns
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total = op(total, shared[w]);
  return total;
}

struct GroupView {
  double n, mean;
  int e;
};

__device__ __forceinline__ GroupView read_group(const GroupAdvantagesArgs& a, int64_t slot, int64_t slots) {
  GroupView g;
  g.n = static_cast<double>(ld(a.work + kRowCount * slots + slot));
  const long long bits = ld(a.work + kRowMaxBits * slots + slot);
  g.e = exponent_bound(bits);
  g.mean = ldexp(static_cast<double>(ld(a.work + kRowSum * slots + slot)), g.e - (62 - a.headroom)) / fmax(g.n, 1.0);
  if (non_finite(bits)) g.mean = nan("");
  return g;
}

__device__ __forceinline__ double numerator(const GroupAdvantagesArgs& a, double r, const GroupView& g) {
  const double d = r - g.mean;
  // NGRPO's group augmented with num_virtual rewards has a baseline even for one member.
  if (a.estimator == kNgrpo) return r - (g.n * g.mean + a.num_virtual * a.virtual_max_reward) / (g.n + a.num_virtual);
  if (g.n < 2.0) return d * 0.0;
  if (a.estimator == kRloo) return g.n / (g.n - 1.0) * d;
  return d;
}

__device__ __forceinline__ double group_spread(const GroupAdvantagesArgs& a, const GroupView& g, double m2, bool augmented) {
  if (augmented) {
    const double k = a.num_virtual, v = a.virtual_max_reward;
    const double mean_aug = (g.n * g.mean + k * v) / (g.n + k);
    const double m2_aug = m2 + g.n * (g.mean - mean_aug) * (g.mean - mean_aug) + k * (v - mean_aug) * (v - mean_aug);
    return sqrt(m2_aug / fmax(g.n + k - 1.0, 1.0));
  }
  return g.n >= 2.0 ? sqrt(m2 / fmax(g.n - 1.0, 1.0)) : 0.0;
}

__global__ void __launch_bounds__(kThreads) group_advantages_kernel(GroupAdvantagesArgs a) {
  cg::grid_group grid = cg::this_grid();
  __shared__ long long shared[kThreads / 32];
  const int64_t slots = a.num_groups + 2, batch = a.num_groups, whiten = a.num_groups + 1;
  const bool external = a.batch_stats != nullptr;
  const bool need_batch = (a.scale == kScaleBatch || a.scale == kScaleWhiten) && !external;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int top = 62 - a.headroom;
  int64_t* count = a.work + kRowCount * slots;
  int64_t* maxbits = a.work + kRowMaxBits * slots;
  int64_t* sums = a.work + kRowSum * slots;
  int64_t* squares = a.work + kRowSquares * slots;
  auto valid_group = [&](int64_t g) { return g >= 0 && g < a.num_groups; };

  for (int64_t i = first; i < 4 * slots; i += stride) a.work[i] = 0;
  grid.sync();

  // Rewards whose id is out of range (unvalidated input) get NaN and join no statistic, the
  // batch's included.
  long long local_max = 0, local_count = 0;
  for (int64_t i = first; i < a.n; i += stride) {
    const int64_t g = group_of(a, i);
    const long long bits = abs_bits(load_reward(a, i));
    if (valid_group(g)) {
      atomicAdd(reinterpret_cast<unsigned long long*>(count + g), 1ULL);
      atomicMax(reinterpret_cast<long long*>(maxbits + g), bits);
      local_max = max(local_max, bits);
      ++local_count;
    }
  }
  if (need_batch) {
    const long long best = block_reduce(local_max, shared, Max{});
    if (threadIdx.x == 0) atomicMax(reinterpret_cast<long long*>(maxbits + batch), best);
    const long long members = block_reduce(local_count, shared, Add{});
    if (threadIdx.x == 0) atomicAdd(reinterpret_cast<unsigned long long*>(count + batch), static_cast<unsigned long long>(members));
  }
  grid.sync();

  const int batch_e = exponent_bound(ld(maxbits + batch));
  long long local_sum = 0;
  for (int64_t i = first; i < a.n; i += stride) {
    const int64_t g = group_of(a, i);
    const double r = load_reward(a, i);
    if (!valid_group(g)) continue;
    atomicAdd(reinterpret_cast<unsigned long long*>(sums + g),
              static_cast<unsigned long long>(quantize(r, top - exponent_bound(ld(maxbits + g)))));
    local_sum += quantize(r, top - batch_e);
  }
  if (need_batch) {
    const long long total = block_reduce(local_sum, shared, Add{});
    if (threadIdx.x == 0) atomicAdd(reinterpret_cast<unsigned long long*>(sums + batch), static_cast<unsigned long long>(total));
  }
  grid.sync();

  const GroupView batch_view = read_group(a, batch, slots);
  const int whiten_e = max(batch_e, a.vmax_exponent) + 2;  // |numerator| < 4·max(|r|max, |vmax|)
  long long local_sq = 0, local_num = 0;
  for (int64_t i = first; i < a.n; i += stride) {
    const int64_t g = group_of(a, i);
    const double r = load_reward(a, i);
    if (valid_group(g)) {
      const GroupView gv = read_group(a, g, slots);
      const double d = r - gv.mean;
      atomicAdd(reinterpret_cast<unsigned long long*>(squares + g),
                static_cast<unsigned long long>(quantize(d * d, top - (2 * gv.e + 2))));
      if (a.scale == kScaleWhiten) local_num += quantize(numerator(a, r, gv), top - whiten_e);
      const double db = r - batch_view.mean;
      local_sq += quantize(db * db, top - (2 * batch_e + 2));
    }
  }
  if (need_batch) {
    const long long total = block_reduce(a.scale == kScaleBatch ? local_sq : local_num, shared, Add{});
    if (threadIdx.x == 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(a.scale == kScaleBatch ? squares + batch : sums + whiten), static_cast<unsigned long long>(total));
  }
  grid.sync();

  const double batch_n = static_cast<double>(ld(count + batch));
  const double whiten_mean = ldexp(static_cast<double>(ld(sums + whiten)), whiten_e - top) / fmax(batch_n, 1.0);
  if (need_batch && a.scale == kScaleWhiten) {
    long long local = 0;
    for (int64_t i = first; i < a.n; i += stride) {
      const int64_t g = group_of(a, i);
      if (!valid_group(g)) continue;
      const double da = numerator(a, load_reward(a, i), read_group(a, g, slots)) - whiten_mean;
      local += quantize(da * da, top - (2 * whiten_e + 2));
    }
    const long long total = block_reduce(local, shared, Add{});
    if (threadIdx.x == 0) atomicAdd(reinterpret_cast<unsigned long long*>(squares + whiten), static_cast<unsigned long long>(total));
    grid.sync();
  }

  double center = 0.0, spread = 0.0;
  if (need_batch) {
    const double nb = batch_n;
    double m2b;
    if (a.scale == kScaleBatch) {
      m2b = ldexp(static_cast<double>(ld(squares + batch)), (2 * batch_e + 2) - top);
    } else {
      center = whiten_mean;
      m2b = ldexp(static_cast<double>(ld(squares + whiten)), (2 * whiten_e + 2) - top);
    }
    spread = nb >= 2.0 ? sqrt(m2b / fmax(nb - 1.0, 1.0)) : 0.0;
    if (non_finite(ld(maxbits + batch))) spread = nan("");
  } else if (external) {
    center = a.scale == kScaleWhiten ? a.batch_stats[0] : 0.0;
    spread = a.batch_stats[1];
  }
  for (int64_t i = first; i < a.n; i += stride) {
    const int64_t g = group_of(a, i);
    if (!valid_group(g)) {
      a.out[i] = nanf("");
      continue;
    }
    const double r = load_reward(a, i);
    const GroupView gv = read_group(a, g, slots);
    const double num = numerator(a, r, gv);
    double base;
    if (a.scale == kScaleGroup) {
      const double m2 = ldexp(static_cast<double>(ld(squares + g)), (2 * gv.e + 2) - top);
      base = num / (group_spread(a, gv, m2, a.estimator == kNgrpo) + a.eps);
    } else if (a.scale == kScaleNone) {
      base = num;
    } else {
      base = (num - center) / (spread + a.eps);
    }
    if (gv.n < 2.0 && a.estimator != kNgrpo) base = (r - gv.mean) * 0.0;
    const double pos = a.positive_scale ? static_cast<double>(a.positive_scale[i]) : a.positive_value;
    const double neg = a.negative_scale ? static_cast<double>(a.negative_scale[i]) : a.negative_value;
    a.out[i] = static_cast<float>(base > 0 ? base * pos : (base < 0 ? base * neg : base));
  }
  for (int64_t g = first; g < a.num_groups; g += stride) {
    const GroupView gv = read_group(a, g, slots);
    const double m2 = ldexp(static_cast<double>(ld(squares + g)), (2 * gv.e + 2) - top);
    const double mean = gv.n > 0 ? gv.mean : 0.0;
    a.mean[g] = static_cast<float>(mean);
    a.std[g] = mean == mean ? static_cast<float>(group_spread(a, gv, m2, false)) : nanf("");
    a.count[g] = static_cast<int64_t>(gv.n);
  }
}

}  // namespace

int launch_group_advantages(const GroupAdvantagesArgs& args, void* stream) {
  DeviceGuard guard(args.device);
  cudaError_t err = guard.error();
  if (err != cudaSuccess) return err;
  int sms = 0, per_sm = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, args.device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, group_advantages_kernel, kThreads, 0);
  if (err == cudaSuccess) {
    const int64_t slots = args.num_groups + 2;
    const int64_t work_items = args.n > 4 * slots ? args.n : 4 * slots;
    int64_t blocks = (work_items + kThreads - 1) / kThreads;
    const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
    if (blocks > resident) blocks = resident;  // cooperative launch: every block must be resident
    if (blocks < 1) blocks = 1;
    GroupAdvantagesArgs copy = args;
    void* params[] = {&copy};
    err = cudaLaunchCooperativeKernel(reinterpret_cast<void*>(group_advantages_kernel), dim3(static_cast<unsigned>(blocks)),
                                      dim3(kThreads), params, 0, static_cast<cudaStream_t>(stream));
  }
  return err;
}

const char* cuda_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace negkernels
