// Element dtypes of the float inputs the kernels read, as codes shared by the bindings and the
// kernels (plain C++: the binding includes it without any CUDA header).
#pragma once

namespace negkernels {

enum ValueDtype : int { kValueF32 = 0, kValueF64 = 1, kValueF16 = 2, kValueBF16 = 3 };

}  // namespace negkernels
