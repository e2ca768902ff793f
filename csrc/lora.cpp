// LoRA linear for the cpu and cuda backends (contract: lora.h): ATen GEMMs (MKL / cuBLAS) writing
// into their outputs in place, and each device's dropout pass (lora_dropout.h) between them.
//
// Forward: out = addmm(bias, x, W^T), then out += scaling * xa @ B^T in place (beta = 1), where
// xa = dropout(x) @ A^T is built one chunk of rows at a time. Backward: grad_x = grad_out @ W, then the
// low-rank term added in place; grad_A from dropout(x) rebuilt chunk by chunk. So dropout(x) never
// exists beyond one chunk, and the low-rank path adds only rank-r GEMMs to the base's two.
#include "lora.h"

#include <ATen/OpMathType.h>

#include <algorithm>

#include "cpu/native_gemm.h"
#include "lora_dropout.h"

namespace mmfast {
namespace {

using DropoutRows = void (*)(const at::Tensor&, at::Tensor&, bool, int64_t, const LoRAOptions&, at::Tensor&, bool);

struct Device {
  DropoutRows dropout_rows;
  bool keeps_mask;  // packs the mask in the forward (cpu), rather than redrawing it from the seed (cuda)
};

// Elements of one chunk of dropout(x): small enough to stay in cache between the dropout pass and the
// GEMM that reads it, large enough for that GEMM to run at speed.
constexpr int64_t kChunkElements = 1 << 20;

int64_t chunk_rows(const at::Tensor& x) { return std::max<int64_t>(1, kChunkElements / std::max<int64_t>(x.size(1), 1)); }

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& lora_A,
                  const at::Tensor& lora_B, const LoRAOptions& options) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be contiguous (N, K)");
  const auto same = [&](const at::Tensor& t) {
    return t.is_contiguous() && t.scalar_type() == x.scalar_type() && t.device() == x.device();
  };
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && same(weight), "weight must be contiguous (M, K) like x");
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == weight.size(0) && same(bias)),
              "bias must be contiguous (M,) like x");
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == x.size(1) && same(lora_A), "lora_A must be contiguous (r, K) like x");
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == weight.size(0) && lora_B.size(1) == lora_A.size(0) && same(lora_B),
              "lora_B must be contiguous (M, r) like x");
  TORCH_CHECK(options.dropout_p >= 0 && options.dropout_p < 1, "dropout_p must be in [0, 1)");
  TORCH_CHECK(options.seed >= 0, "seed must be non-negative");
}

at::Tensor empty_mask(const at::Tensor& x) { return at::empty({0}, x.options().dtype(at::kByte)); }

LoRAForwardResult run_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& lora_A, const at::Tensor& lora_B, const LoRAOptions& options,
                              const Device& device) {
  check_inputs(x, weight, bias, lora_A, lora_B, options);
  const int64_t n = x.size(0), k = x.size(1);
  at::Tensor out = bias.defined() ? at::addmm(bias, x, weight.t()) : at::mm(x, weight.t());
  at::Tensor xa, mask = empty_mask(x);
  if (options.dropout_p == 0) {
    xa = at::mm(x, lora_A.t());
  } else {
    if (device.keeps_mask) mask = at::empty({n, (k + 7) / 8}, x.options().dtype(at::kByte));
    xa = at::empty({n, lora_A.size(0)}, x.options());
    const int64_t chunk = std::min(chunk_rows(x), n);
    at::Tensor storage = at::empty({chunk, k}, x.options());
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t rows = std::min(chunk, n - start);
      at::Tensor dropped = storage.narrow(0, 0, rows), xa_rows = xa.narrow(0, start, rows);
      device.dropout_rows(x.narrow(0, start, rows), dropped, false, start, options, mask, /*draw=*/true);
      at::mm_out(xa_rows, dropped, lora_A.t());
    }
  }
  out.addmm_(xa, lora_B.t(), 1, options.scaling);
  return {out, xa, mask};
}

// result (float32 or float64) += a @ b, where a and b may be of a narrower dtype: ATen's GEMMs write
// their inputs' dtype, so the product goes through `product` first.
void accumulate_product(at::Tensor& result, const at::Tensor& a, const at::Tensor& b, at::Tensor& product) {
  if (a.scalar_type() == result.scalar_type()) {
    result.addmm_(a, b);
    return;
  }
  at::mm_out(product, a, b);
  result.add_(product);
}

LoRABackwardResult run_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
                                const at::Tensor& mask, const LoRAOptions& options, at::Tensor grad_x,
                                const LoRAGradRequest& need, const Device& device) {
  check_inputs(x, weight, at::Tensor(), lora_A, lora_B, options);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == weight.size(0) &&
                  grad_out.is_contiguous() && grad_out.scalar_type() == x.scalar_type(),
              "grad_out must be contiguous (N, M) of x's dtype");
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == x.size(0) && xa.size(1) == lora_A.size(0) && xa.scalar_type() == x.scalar_type(),
              "xa must be (N, r) of x's dtype");
  TORCH_CHECK(!device.keeps_mask || options.dropout_p == 0 || mask.size(0) == x.size(0),
              "mask must be the one the forward returned");
  TORCH_CHECK(!grad_x.defined() || (grad_x.sizes() == x.sizes() && grad_x.stride(1) == 1 &&
                                    grad_x.scalar_type() == x.scalar_type()),
              "grad_x must be (N, K) of x's dtype");
  const int64_t n = x.size(0), k = x.size(1), rank = lora_A.size(0);
  const bool dropout = options.dropout_p > 0;
  at::Tensor mask_rows = mask;  // the cpu kernel reads it; cuda redraws from the seed and ignores it
  at::Tensor gxa = at::mm(grad_out, lora_B).mul_(options.scaling);

  at::Tensor grad_weight = need.weight ? at::mm(grad_out.t(), x) : at::Tensor();
  at::Tensor grad_bias;
  if (need.bias) grad_bias = at::sum(grad_out, {0}, false, at::toOpMathType(x.scalar_type())).to(x.scalar_type());
  at::Tensor grad_B = need.lora_B ? at::mm(grad_out.t(), xa).mul_(options.scaling) : at::Tensor();

  const int64_t chunk = std::min(chunk_rows(x), std::max<int64_t>(n, 1));
  at::Tensor storage = dropout && (need.x || need.lora_A) ? at::empty({chunk, k}, x.options()) : at::Tensor();
  if (need.x) {
    if (grad_x.defined()) {
      grad_x.addmm_(grad_out, weight);
    } else {
      grad_x = at::mm(grad_out, weight);
    }
    if (!dropout) {
      grad_x.addmm_(gxa, lora_A);
    } else {
      for (int64_t start = 0; start < n; start += chunk) {
        const int64_t rows = std::min(chunk, n - start);
        at::Tensor product = storage.narrow(0, 0, rows), grad_rows = grad_x.narrow(0, start, rows);
        at::mm_out(product, gxa.narrow(0, start, rows), lora_A);
        device.dropout_rows(product, grad_rows, true, start, options, mask_rows, /*draw=*/false);
      }
    }
  } else {
    grad_x = at::Tensor();
  }

  at::Tensor grad_A;
  if (need.lora_A) {
    if (!dropout) {
      grad_A = at::mm(gxa.t(), x);
    } else {
      const auto acc_type = at::toOpMathType(x.scalar_type());
      grad_A = at::zeros({rank, k}, x.options().dtype(acc_type));
      at::Tensor product = acc_type == x.scalar_type() ? at::Tensor() : at::empty({rank, k}, x.options());
      for (int64_t start = 0; start < n; start += chunk) {
        const int64_t rows = std::min(chunk, n - start);
        at::Tensor dropped = storage.narrow(0, 0, rows);
        device.dropout_rows(x.narrow(0, start, rows), dropped, false, start, options, mask_rows, /*draw=*/false);
        accumulate_product(grad_A, gxa.narrow(0, start, rows).t(), dropped, product);
      }
      grad_A = grad_A.to(x.scalar_type());
    }
  }
  return {grad_x, grad_weight, grad_bias, grad_A, grad_B};
}

at::Tensor run_mask(int64_t seed, int64_t rows, int64_t cols, double dropout_p, at::Device where, const Device& device) {
  const auto options = at::TensorOptions().device(where).dtype(at::kFloat);
  if (dropout_p == 0) return at::ones({rows, cols}, options.dtype(at::kBool));
  at::Tensor ones = at::ones({rows, cols}, options), dropped = at::empty({rows, cols}, options);
  at::Tensor mask = device.keeps_mask ? at::empty({rows, (cols + 7) / 8}, options.dtype(at::kByte)) : at::Tensor();
  device.dropout_rows(ones, dropped, false, 0, {1.0, dropout_p, seed}, mask, /*draw=*/true);
  return dropped.ne(0);
}

}  // namespace

namespace cpu {
namespace {
constexpr Device kDevice{dropout_rows, /*keeps_mask=*/true};
}  // namespace

LoRAForwardResult lora_linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      const at::Tensor& lora_A, const at::Tensor& lora_B, const LoRAOptions& options) {
  TORCH_CHECK(x.device().is_cpu(), "the cpu backend needs CPU tensors");
  const auto dtype = x.scalar_type();
  if (native_gemm(dtype)) return run_forward(x, weight, bias, lora_A, lora_B, options, kDevice);
  const auto f = at::kFloat;
  auto [out, xa, mask] = run_forward(x.to(f), weight.to(f), to_dtype(bias, f), lora_A.to(f), lora_B.to(f), options,
                                     kDevice);
  return {out.to(dtype), xa.to(dtype), mask};
}

LoRABackwardResult lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
                                        const at::Tensor& mask, const LoRAOptions& options, at::Tensor grad_x,
                                        const LoRAGradRequest& need) {
  TORCH_CHECK(x.device().is_cpu(), "the cpu backend needs CPU tensors");
  const auto dtype = x.scalar_type();
  if (native_gemm(dtype)) {
    return run_backward(grad_out, x, weight, lora_A, lora_B, xa, mask, options, grad_x, need, kDevice);
  }
  const auto f = at::kFloat;
  auto [gx, gw, gb, ga, gB] = run_backward(grad_out.to(f), x.to(f), weight.to(f), lora_A.to(f), lora_B.to(f),
                                           xa.to(f), mask, options, to_dtype(grad_x, f), need, kDevice);
  if (grad_x.defined() && gx.defined()) {
    grad_x.copy_(gx);
    gx = grad_x;
  }
  return {to_dtype(gx, dtype), to_dtype(gw, dtype), to_dtype(gb, dtype), to_dtype(ga, dtype), to_dtype(gB, dtype)};
}

at::Tensor lora_linear_mask(int64_t seed, int64_t rows, int64_t cols, double dropout_p, at::Device device) {
  return run_mask(seed, rows, cols, dropout_p, device, kDevice);
}

}  // namespace cpu

#ifdef MMFAST_WITH_CUDA
namespace cuda {
namespace {
constexpr Device kDevice{dropout_rows, /*keeps_mask=*/false};
}  // namespace

LoRAForwardResult lora_linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      const at::Tensor& lora_A, const at::Tensor& lora_B, const LoRAOptions& options) {
  TORCH_CHECK(x.device().is_cuda(), "the cuda backend needs CUDA tensors");
  return run_forward(x, weight, bias, lora_A, lora_B, options, kDevice);
}

LoRABackwardResult lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
                                        const at::Tensor& mask, const LoRAOptions& options, at::Tensor grad_x,
                                        const LoRAGradRequest& need) {
  TORCH_CHECK(x.device().is_cuda(), "the cuda backend needs CUDA tensors");
  return run_backward(grad_out, x, weight, lora_A, lora_B, xa, mask, options, grad_x, need, kDevice);
}

at::Tensor lora_linear_mask(int64_t seed, int64_t rows, int64_t cols, double dropout_p, at::Device device) {
  return run_mask(seed, rows, cols, dropout_p, device, kDevice);
}

}  // namespace cuda
#endif

}  // namespace mmfast
