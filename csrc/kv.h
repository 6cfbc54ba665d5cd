// Launcher interface of the KV retention selection kernel (plain C++ types: the binding includes
// it without any CUDA header).
#pragma once
#include <cstdint>

#include "dtypes.h"

namespace negkernels {

enum IndexKind : int { kIndexI32 = 0, kIndexI64 = 1, kIndexF32 = 2, kIndexF64 = 3 };

struct SelectRetainedArgs {
  const float* scores = nullptr;  // [rows, seq] contiguous fp32, or null: TRIM-KV scores from log β
  const void* log_beta = nullptr;  // [B, H, S], strides below
  int log_beta_dtype = kValueF32;
  int64_t lb_stride_b = 0, lb_stride_h = 0, lb_stride_s = 0;
  const void* positions = nullptr;  // broadcast to [B, H, S] by strides
  int positions_kind = kIndexI64;
  int64_t pos_stride_b = 0, pos_stride_h = 0, pos_stride_s = 0;
  const void* step = nullptr;  // [B] per-sequence step, or null: step_value
  int step_kind = kIndexI64;
  int64_t step_value = 0;
  const void* lengths = nullptr;  // [B] or null
  int lengths_kind = kIndexI64;
  int64_t* out = nullptr;  // [rows, kept]
  int64_t rows = 0, heads = 1, seq = 0, kept = 0, sink = 0, window = 0;
  int device = 0;
};

int launch_select_retained(const SelectRetainedArgs& args, void* stream);

}  // namespace negkernels
