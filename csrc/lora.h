// LoRA linear: the contract every backend implements (C++ here, Triton and torch in Python).
//
// lora_linear_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> (out, xa, mask)
//   x (N, K), weight (M, K), bias (M,) or undefined, lora_A (r, K), lora_B (M, r): contiguous, of one
//   floating dtype, on one device. 0 <= dropout_p < 1; seed >= 0.
//   keep (N, K): all true when dropout_p == 0; else keep[i, j] is a Bernoulli(1 - dropout_p) draw that
//   depends only on (seed, i, j, K), the same in forward and backward; lora_linear_mask returns it.
//     xa  = ((x * keep) / (1 - dropout_p)) @ lora_A.T                        (N, r), x's dtype
//     out = x @ weight.T + bias + scaling * xa @ lora_B.T                    (N, M), x's dtype
//   mask: keep packed 8 per byte, uint8 (N, ceil(K / 8)), bit j % 8 of byte j / 8, from backends that
//   keep it (cpu); an empty uint8 tensor from those that redraw it from the seed (cuda, triton, torch)
//   and whenever dropout_p == 0. dropout(x) itself is never kept.
//
// lora_linear_backward(grad_out, x, weight, lora_A, lora_B, scaling, xa, mask, dropout_p, seed, grad_x,
//                      need_grad_x, need_grad_weight, need_grad_bias, need_grad_A, need_grad_B)
//     -> (grad_x, grad_weight, grad_bias, grad_A, grad_B)
//   grad_out (N, M) contiguous of x's dtype; the rest as the forward took and returned them. With
//   gxa = scaling * grad_out @ lora_B (N, r):
//     grad_x      = grad_out @ weight + ((gxa @ lora_A) * keep) / (1 - dropout_p)
//     grad_weight = grad_out.T @ x          grad_bias = grad_out summed over rows
//     grad_A      = gxa.T @ ((x * keep) / (1 - dropout_p))
//     grad_B      = scaling * grad_out.T @ xa
//   each only when its need_* flag is set, else undefined; in its input's dtype. When grad_x is defined
//   (N, K) and need_grad_x, the gradient is added into it and it is returned: projections of one
//   input share one buffer.
//   Sums accumulate in float32 (float64 for float64 inputs) whatever the dtype.
//
// lora_linear_mask(seed, rows, cols, dropout_p, device) -> keep (rows, cols) bool, as the kernels draw it.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace mmfast {

using LoRAForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using LoRABackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct LoRAOptions {
  double scaling;
  double dropout_p;
  int64_t seed;
};

struct LoRAGradRequest {
  bool x;
  bool weight;
  bool bias;
  bool lora_A;
  bool lora_B;
};

#define MMFAST_LORA_DECLARATIONS                                                                              \
  LoRAForwardResult lora_linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, \
                                        const at::Tensor& lora_A, const at::Tensor& lora_B,                    \
                                        const LoRAOptions& options);                                           \
  LoRABackwardResult lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,                     \
                                          const at::Tensor& weight, const at::Tensor& lora_A,                  \
                                          const at::Tensor& lora_B, const at::Tensor& xa,                      \
                                          const at::Tensor& mask, const LoRAOptions& options,                  \
                                          at::Tensor grad_x, const LoRAGradRequest& need);                     \
  at::Tensor lora_linear_mask(int64_t seed, int64_t rows, int64_t cols, double dropout_p, at::Device device);

namespace cpu {
MMFAST_LORA_DECLARATIONS
}  // namespace cpu

#ifdef MMFAST_WITH_CUDA
namespace cuda {
MMFAST_LORA_DECLARATIONS
}  // namespace cuda
#endif

#undef MMFAST_LORA_DECLARATIONS

}  // namespace mmfast
