// Whether this CPU multiplies bf16/fp16 matrices natively (AVX512-BF16 or AMX, AVX512-FP16). Elsewhere
// MKL emulates those GEMMs several times slower than float32, so the cpu backends run them on float32
// copies instead.
#pragma once

#include <ATen/ATen.h>

namespace mmfast::cpu {

inline bool native_gemm(at::ScalarType dtype) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (dtype == at::kBFloat16) return __builtin_cpu_supports("avx512bf16");
  if (dtype == at::kHalf) return __builtin_cpu_supports("avx512fp16");
#endif
  return true;
}

// t in `dtype`, or undefined when t is.
inline at::Tensor to_dtype(const at::Tensor& t, at::ScalarType dtype) { return t.defined() ? t.to(dtype) : t; }

}  // namespace mmfast::cpu
