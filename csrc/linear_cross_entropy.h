// Linear cross-entropy: the contract every backend implements (C++ here, Triton and torch in Python).
//
// linear_cross_entropy_forward(hidden, weight, bias, target, grad_loss, label_smoothing, z_loss, softcap,
//                              chunk_size, need_grad_hidden, need_grad_weight, need_grad_bias, return_argmax)
//   hidden (n, H) and weight (V, H) contiguous, of one floating dtype; bias (V,) of that dtype or undefined;
//   target (n,) contiguous int64, every value in [0, V): the caller has already dropped ignored rows.
//   Per row r, with z = hidden[r] @ weight.T + bias and x = softcap ? softcap * tanh(z / softcap) : z:
//     lse[r]  = logsumexp(x)
//     loss[r] = lse - (1 - eps) * x[t] - eps * mean(x) + z_loss * lse^2        (as cross_entropy.h)
//   loss and lse are float32 (float64 for float64 inputs); argmax[r] = argmax_v z (first of ties),
//   int64, only when return_argmax, else undefined.
//   grad_loss: undefined, or (n,) contiguous of lse's dtype. When defined, the gradients of
//   sum_r grad_loss[r] * loss[r] with respect to hidden, weight and bias are returned too, each only when
//   its need_grad_* flag is set (else undefined), in the dtype of its input. Sums over rows accumulate
//   in float32 (float64 for float64) whatever the input dtype.
//   The (n, V) logits never exist at once: at most chunk_size rows of them do (backends that tile on
//   chip may ignore chunk_size).
// Returns (loss, lse, argmax, grad_hidden, grad_weight, grad_bias); undefined tensors reach Python as None.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "cross_entropy.h"

namespace mmfast {

using LinearCrossEntropyResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct LinearCrossEntropyRequest {
  double label_smoothing;
  double z_loss;
  double softcap;  // <= 0 means no softcap
  int64_t chunk_size;
  bool need_grad_hidden;
  bool need_grad_weight;
  bool need_grad_bias;
  bool return_argmax;
};

namespace cpu {
LinearCrossEntropyResult linear_cross_entropy_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                      const at::Tensor& bias, const at::Tensor& target,
                                                      const at::Tensor& grad_loss,
                                                      const LinearCrossEntropyRequest& request);
}  // namespace cpu

#ifdef MMFAST_WITH_CUDA
namespace cuda {
LinearCrossEntropyResult linear_cross_entropy_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                      const at::Tensor& bias, const at::Tensor& target,
                                                      const at::Tensor& grad_loss,
                                                      const LinearCrossEntropyRequest& request);
}  // namespace cuda
#endif

}  // namespace mmfast
