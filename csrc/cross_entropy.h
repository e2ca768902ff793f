// Cross-entropy on logits: the contract every native backend implements.
//
// forward:  per row r of logits (N, V), with x = softcap ? softcap * tanh(z / softcap) : z,
//           lse[r]  = logsumexp(x)
//           loss[r] = lse - (1 - eps) * x[t] - eps * mean(x) + z_loss * lse^2
//           rows whose target is ignore_index (which may lie inside [0, V)) or outside [0, V)
//           are ignored: loss = lse = 0 and a zero gradient row.
//           loss and lse are float32 (float64 for float64 logits).
// backward: grad_logits[r] = grad_loss[r] * dloss/dz, written into grad_logits, which may be
//           logits itself (in-place backward). Softmax is recomputed from lse, never stored.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <tuple>

namespace mmfast {

struct CrossEntropyOptions {
  int64_t ignore_index;
  double label_smoothing;
  double z_loss;
  double softcap;  // <= 0 means no softcap
};

// Layouts of the (N, V) logits. Rows: unit stride over V, every backend reads it. Token-contiguous: unit
// stride over N and vocab rows at least N apart, element (r, v) at r + v * ld, i.e. the transpose of a
// (V, ld) row-major buffer, as a vocab-major matmul writes it; only the cpu backend reads it.
inline bool cross_entropy_rows_layout(const at::Tensor& logits) { return logits.stride(1) == 1; }

inline bool cross_entropy_token_layout(const at::Tensor& logits) {
  return logits.stride(0) == 1 && logits.stride(1) >= logits.size(0);
}

// Shape, dtype and layout guards shared by the backends (the Python layer gives the friendly errors).
inline void check_cross_entropy_inputs(const at::Tensor& logits, const at::Tensor& target,
                                       bool token_layout_ok = false) {
  TORCH_CHECK(logits.dim() == 2, "logits must be (N, V)");
  TORCH_CHECK(cross_entropy_rows_layout(logits) || (token_layout_ok && cross_entropy_token_layout(logits)),
              token_layout_ok ? "logits must have unit stride over V, or over N with rows of V at least N apart"
                              : "logits must have unit stride over V");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.scalar_type() == at::kLong &&
                  target.is_contiguous(),
              "target must be contiguous int64 of shape (N,)");
  TORCH_CHECK(target.device() == logits.device(), "logits and target must be on one device");
}

// grad_logits is written in logits' layout (its own row or vocab-row stride).
inline void check_cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                                         const at::Tensor& grad_loss, const at::Tensor& grad_logits,
                                         bool token_layout_ok = false) {
  check_cross_entropy_inputs(logits, target, token_layout_ok);
  const auto n = logits.size(0);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == n && lse.is_contiguous(), "lse must be contiguous (N,)");
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == n && grad_loss.is_contiguous() &&
                  grad_loss.scalar_type() == lse.scalar_type(),
              "grad_loss must be contiguous (N,) of lse's dtype");
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.scalar_type() == logits.scalar_type() &&
                  grad_logits.device() == logits.device(),
              "grad_logits must match logits");
  TORCH_CHECK(cross_entropy_rows_layout(logits) ? cross_entropy_rows_layout(grad_logits)
                                                : cross_entropy_token_layout(grad_logits),
              "grad_logits must have logits' layout");
}

// Host and device: the one place that says which rows are ignored.
C10_HOST_DEVICE inline bool cross_entropy_ignored(int64_t target, int64_t vocab, int64_t ignore_index) {
  return target == ignore_index || target < 0 || target >= vocab;
}

inline at::ScalarType cross_entropy_stat_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

namespace cpu {
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         const CrossEntropyOptions& opt);
void cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                            const at::Tensor& grad_loss, at::Tensor& grad_logits, const CrossEntropyOptions& opt);
}  // namespace cpu

#ifdef MMFAST_WITH_CUDA
namespace cuda {
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         const CrossEntropyOptions& opt);
void cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                            const at::Tensor& grad_loss, at::Tensor& grad_logits, const CrossEntropyOptions& opt);
}  // namespace cuda
#endif

}  // namespace mmfast
