// Read element i of a float array of any ValueDtype as fp32 (every kernel accumulates in fp32 or wider).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "dtypes.h"

namespace negkernels {

__device__ __forceinline__ float load_value(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kValueF64: return static_cast<float>(static_cast<const double*>(p)[i]);
    case kValueF16: return __half2float(static_cast<const __half*>(p)[i]);
    case kValueBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

}  // namespace negkernels
