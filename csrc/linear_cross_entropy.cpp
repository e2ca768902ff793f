// Linear cross-entropy for the cpu and cuda backends: one chunk loop over ATen GEMMs (MKL / cuBLAS)
// and each backend's cross-entropy kernels as the epilogue (contract: linear_cross_entropy.h).
//
// Per chunk of rows: the chunk's logits are written into one reused buffer, the cross-entropy kernel
// reduces them to loss and logsumexp, and, when gradients are asked for, overwrites them in place with
// their gradient G; then grad_hidden[chunk] = G @ W and grad_weight += G^T @ h[chunk] in place.
// So a step costs the three GEMMs of the unfused version plus two passes over a chunk that is small
// next to the weight.
#include "linear_cross_entropy.h"

#include <algorithm>

#include "cpu/native_gemm.h"

namespace mmfast {
namespace {

using ChunkForward = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&,
                                                             const CrossEntropyOptions&);
using ChunkBackward = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               at::Tensor&, const CrossEntropyOptions&);

struct Epilogue {
  ChunkForward forward;
  ChunkBackward backward;
  // Whether the chunk is stored vocab-major, (V, c) row-major, seen as (c, V) logits with strides (1, c):
  // MKL's GEMMs are faster writing that layout at chunk sizes, and the CPU kernels read it natively.
  bool vocab_major;
};

// Rows of the weight per partial product when G^T @ h cannot accumulate into float32 directly
// (bf16/fp16 GEMMs produce their own dtype): bounds that product to a small buffer.
constexpr int64_t kVocabBlock = 4096;

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& target, const at::Tensor& grad_loss) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be contiguous (n, H)");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == hidden.size(1),
              "weight must be contiguous (V, H)");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type() && weight.device() == hidden.device(),
              "weight must match hidden's dtype and device");
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == weight.size(0) && bias.is_contiguous() &&
                                  bias.scalar_type() == hidden.scalar_type() && bias.device() == hidden.device()),
              "bias must be contiguous (V,) of hidden's dtype and device");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == hidden.size(0) && target.scalar_type() == at::kLong &&
                  target.is_contiguous() && target.device() == hidden.device(),
              "target must be contiguous int64 (n,) on hidden's device");
  TORCH_CHECK(!grad_loss.defined() || (grad_loss.dim() == 1 && grad_loss.size(0) == hidden.size(0) &&
                                       grad_loss.is_contiguous() &&
                                       grad_loss.scalar_type() == cross_entropy_stat_dtype(hidden)),
              "grad_loss must be contiguous (n,) of the loss dtype");
}

// grad_weight (float32 or float64) += g_t @ h, where g_t (V, c) and h (c, H) may be of a narrower dtype.
void accumulate_weight_grad(at::Tensor& grad_weight, const at::Tensor& g_t, const at::Tensor& h,
                            at::Tensor& product) {
  if (g_t.scalar_type() == grad_weight.scalar_type()) {
    grad_weight.addmm_(g_t, h);
    return;
  }
  const int64_t vocab = g_t.size(0);
  for (int64_t v0 = 0; v0 < vocab; v0 += kVocabBlock) {
    const int64_t rows = std::min(kVocabBlock, vocab - v0);
    at::Tensor part = product.narrow(0, 0, rows);
    at::mm_out(part, g_t.narrow(0, v0, rows), h);
    grad_weight.narrow(0, v0, rows).add_(part);
  }
}

LinearCrossEntropyResult run_chunks(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                                    const at::Tensor& target, const at::Tensor& grad_loss,
                                    const LinearCrossEntropyRequest& request, const Epilogue& epilogue) {
  check_inputs(hidden, weight, bias, target, grad_loss);
  TORCH_CHECK(request.chunk_size > 0, "chunk_size must be positive");
  const int64_t n = hidden.size(0), vocab = weight.size(0), width = hidden.size(1);
  const auto stat_dtype = cross_entropy_stat_dtype(hidden);
  const auto stat_options = hidden.options().dtype(stat_dtype);
  const bool grads = grad_loss.defined();
  const bool exact_accumulation = hidden.scalar_type() == stat_dtype;

  at::Tensor loss = at::empty({n}, stat_options), lse = at::empty({n}, stat_options);
  at::Tensor argmax = request.return_argmax ? at::empty({n}, hidden.options().dtype(at::kLong)) : at::Tensor();
  at::Tensor grad_hidden = grads && request.need_grad_hidden ? at::empty_like(hidden) : at::Tensor();
  at::Tensor grad_weight, grad_bias, product;
  if (grads && request.need_grad_weight) {
    grad_weight = at::zeros({vocab, width}, stat_options);
    if (!exact_accumulation) product = at::empty({std::min(kVocabBlock, vocab), width}, hidden.options());
  }
  if (grads && request.need_grad_bias && bias.defined()) grad_bias = at::zeros({vocab}, stat_options);

  const int64_t chunk = std::min(request.chunk_size, n);
  at::Tensor storage = at::empty({chunk * vocab}, hidden.options());
  const at::Tensor weight_t = weight.t();
  // No row is ignored here: the caller dropped them, and -1 never equals a target in [0, V).
  const CrossEntropyOptions options{-1, request.label_smoothing, request.z_loss, request.softcap};

  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t rows = std::min(chunk, n - start);
    const at::Tensor h = hidden.narrow(0, start, rows), t = target.narrow(0, start, rows);
    at::Tensor buffer = storage.narrow(0, 0, rows * vocab);
    at::Tensor logits = epilogue.vocab_major ? buffer.view({vocab, rows}).t() : buffer.view({rows, vocab});
    if (bias.defined()) {
      at::addmm_out(logits, bias, h, weight_t);
    } else {
      at::mm_out(logits, h, weight_t);
    }
    auto [chunk_loss, chunk_lse] = epilogue.forward(logits, t, options);
    loss.narrow(0, start, rows).copy_(chunk_loss);
    lse.narrow(0, start, rows).copy_(chunk_lse);
    if (argmax.defined()) {
      at::Tensor out = argmax.narrow(0, start, rows);
      at::argmax_out(out, logits, 1);
    }
    if (!grads) continue;
    epilogue.backward(logits, t, chunk_lse, grad_loss.narrow(0, start, rows), logits, options);  // logits := G
    if (grad_hidden.defined()) {
      at::Tensor out = grad_hidden.narrow(0, start, rows);
      at::mm_out(out, logits, weight);
    }
    if (grad_weight.defined()) accumulate_weight_grad(grad_weight, logits.t(), h, product);
    if (grad_bias.defined()) grad_bias.add_(at::sum(logits, {0}, false, stat_dtype));
  }
  if (grad_weight.defined()) grad_weight = grad_weight.to(weight.scalar_type());
  if (grad_bias.defined()) grad_bias = grad_bias.to(bias.scalar_type());
  return {loss, lse, argmax, grad_hidden, grad_weight, grad_bias};
}

}  // namespace

namespace cpu {

LinearCrossEntropyResult linear_cross_entropy_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                      const at::Tensor& bias, const at::Tensor& target,
                                                      const at::Tensor& grad_loss,
                                                      const LinearCrossEntropyRequest& request) {
  TORCH_CHECK(hidden.device().is_cpu(), "the cpu backend needs CPU tensors");
  const Epilogue epilogue{cpu::cross_entropy_forward, cpu::cross_entropy_backward, /*vocab_major=*/true};
  const auto dtype = hidden.scalar_type();
  if (native_gemm(dtype)) return run_chunks(hidden, weight, bias, target, grad_loss, request, epilogue);
  // Without native support, float32 copies of the inputs are the faster trade: the weight's copy costs
  // as much memory as its gradient's float32 accumulator.
  auto [loss, lse, argmax, grad_hidden, grad_weight, grad_bias] =
      run_chunks(to_dtype(hidden, at::kFloat), to_dtype(weight, at::kFloat), to_dtype(bias, at::kFloat), target,
                 grad_loss, request, epilogue);
  return {loss, lse, argmax, to_dtype(grad_hidden, dtype), to_dtype(grad_weight, dtype), to_dtype(grad_bias, dtype)};
}
}  // namespace cpu

#ifdef MMFAST_WITH_CUDA
namespace cuda {
LinearCrossEntropyResult linear_cross_entropy_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                      const at::Tensor& bias, const at::Tensor& target,
                                                      const at::Tensor& grad_loss,
                                                      const LinearCrossEntropyRequest& request) {
  TORCH_CHECK(hidden.device().is_cuda(), "the cuda backend needs CUDA tensors");
  return run_chunks(hidden, weight, bias, target, grad_loss, request,
                    {cuda::cross_entropy_forward, cuda::cross_entropy_backward, /*vocab_major=*/false});
}
}  // namespace cuda
#endif

}  // namespace mmfast
