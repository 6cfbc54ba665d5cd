// Launcher interface of the group-advantages CUDA kernel. Plain C++ types only (the stream is a
// void* holding a cudaStream_t) so the torch-facing binding compiles without any CUDA header.
#pragma once
#include <cstdint>

#include "dtypes.h"

namespace negkernels {

// Kernel codes: positions in negkernels.reference.advantages.ESTIMATORS and SCALES (a test holds
// the two in step).
enum Estimator : int { kGrpo = 0, kDrGrpo, kRloo, kNgrpo, kReinforcePpBaseline };
enum Scale : int { kScaleGroup = 0, kScaleBatch, kScaleNone, kScaleWhiten };

struct GroupAdvantagesArgs {
  const void* rewards = nullptr;
  int rewards_dtype = kValueF32;
  const void* group_index = nullptr;  // null: contiguous groups of group_size
  int group_index_bits = 64;          // 32 or 64
  float* out = nullptr;               // [n]
  float* mean = nullptr;              // [num_groups]
  float* std = nullptr;               // [num_groups]
  int64_t* count = nullptr;           // [num_groups]
  int64_t* work = nullptr;            // [4 * (num_groups + 2)], cleared by the kernel
  const float* positive_scale = nullptr;  // [n] or null
  const float* negative_scale = nullptr;  // [n] or null
  const double* batch_stats = nullptr;    // [2] (mean, std) or null
  int64_t n = 0;
  int64_t num_groups = 0;
  int64_t group_size = 1;
  int estimator = kGrpo;  // an Estimator
  int scale = kScaleGroup;  // a Scale
  int headroom = 2;   // fixed-point sums stay below 2**(62 - headroom); headroom > log2(n)
  int vmax_exponent = -126;
  double eps = 1e-6, virtual_max_reward = 1.0, num_virtual = 1.0;
  double positive_value = 1.0, negative_value = 1.0;
  int device = 0;
};

// Returns a cudaError_t as int (0 on success).
int launch_group_advantages(const GroupAdvantagesArgs& args, void* stream);
const char* cuda_error_string(int error);

}  // namespace negkernels
