// Cross-modal attention: the contract every backend implements (C++ here, Triton and torch in Python).
//
// Layout: packed varlen, as flash_attn_varlen. B samples; sample b has lq = cu_seqlens_q[b+1] - cu_seqlens_q[b]
// query rows (q rows cu_seqlens_q[b] ...) and lk = cu_seqlens_k[b+1] - cu_seqlens_k[b] keys. Either may be 0.
//
// cross_modal_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
//                               gate, residual) -> (out, attn, lse)
//   q (Tq, Hq, D), k and v (Tk, Hk, D): contiguous, one floating dtype, one device; Hq a multiple of Hk; query
//   head h reads key/value head h / (Hq / Hk). cu_seqlens_q / cu_seqlens_k: int32 (B + 1,) on q's device,
//   starting at 0, non-decreasing, ending at Tq / Tk (checked by the caller). max_seqlen_q / max_seqlen_k:
//   at least the longest sample (grid sizes); scale > 0.
//   Key j is allowed for query row i of its sample when !causal or j <= i + lk - lq (bottom-right aligned).
//     attn[t, h] = sum_j softmax_j(scale * q[t, h] . k[j, h']) v[j, h'] over the allowed j;
//                  exactly 0 for a row with no allowed key (never NaN).                    (Tq, Hq, D), q's dtype
//     lse[h, t]  = log sum_j exp(scale * q[t, h] . k[j, h']) over the allowed j (natural log);
//                  -inf for a row with no allowed key.       (Hq, Tq), float32 (float64 for float64 inputs)
//   gate: undefined or (Hq,) float32 (float64 for float64 inputs); residual: undefined or (Tq, Hq, D) of q's
//   dtype. With g_h = tanh(gate[h]) (1 when gate is undefined) and r = residual (0 when undefined):
//     out[t, h] = r[t, h] + g_h * attn[t, h]                                                (Tq, Hq, D), q's dtype
//   computed in the same pass; undefined when both gate and residual are (the caller uses attn).
//
// cross_modal_attention_backward(grad_out, q, k, v, attn, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
//                                max_seqlen_k, causal, scale, gate) -> (grad_q, grad_k, grad_v, grad_gate)
//   grad_out (Tq, Hq, D) contiguous of q's dtype: the gradient of out (of attn when out is undefined);
//   attn and lse as the forward returned them (only these are saved: softmax is recomputed). With
//   dA = g_h * grad_out and delta[t, h] = sum_d grad_out[t, h, d] * attn[t, h, d]:
//     grad_q, grad_k, grad_v: the gradients of attn for the upstream gradient dA, in their inputs' dtypes;
//       zero for rows with no allowed key and for keys no query reads.
//     grad_gate[h] = (1 - g_h^2) * sum_t delta[t, h]      gate's dtype (Hq,), undefined when gate is undefined.
//   (grad_residual is grad_out itself; the caller passes it on.)
//   Sums and softmax statistics in float32 (float64 for float64 inputs) whatever the dtype.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace mmfast {

using AttentionForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using AttentionBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct AttentionOptions {
  int64_t max_seqlen_q;
  int64_t max_seqlen_k;
  bool causal;
  double scale;
};

#define MMFAST_ATTENTION_DECLARATIONS                                                                            \
  AttentionForwardResult cross_modal_attention_forward(                                                         \
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,            \
      const at::Tensor& cu_seqlens_k, const AttentionOptions& options, const at::Tensor& gate,                  \
      const at::Tensor& residual);                                                                              \
  AttentionBackwardResult cross_modal_attention_backward(                                                       \
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,                \
      const at::Tensor& attn, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,                            \
      const at::Tensor& cu_seqlens_k, const AttentionOptions& options, const at::Tensor& gate);

namespace cpu {
MMFAST_ATTENTION_DECLARATIONS
}  // namespace cpu

#ifdef MMFAST_WITH_CUDA
namespace cuda {
MMFAST_ATTENTION_DECLARATIONS
}  // namespace cuda
#endif

#undef MMFAST_ATTENTION_DECLARATIONS

}  // namespace mmfast
