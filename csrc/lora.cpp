// LoRA linear for the cpu and cuda backends (contract: lora.h): the base's GEMMs through ATen (MKL /
// cuBLAS), writing into their outputs in place, and every rank-r term through the device's three
// products with dropout fused in (lora_kernels.h).
//
// Forward:  out = addmm(bias, x, W^T);  xa = project(x, A);  out += scaling * xa @ B^T.
// Backward: gxa = scaling * grad_out @ B;  grad_B = scaling * grad_out^T @ xa;
//           grad_x = grad_out @ W, then += drop(gxa @ A);  grad_A = gxa^T @ drop(x).
// dropout(x) is never kept: the cpu kernels apply the packed mask a row at a time, the cuda ones
// one chunk of rows at a time, redrawing it from the seed.
#include "lora.h"

#include <ATen/OpMathType.h>

#include "cpu/native_gemm.h"
#include "lora_kernels.h"

namespace mmfast {
namespace {

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

// The three rank-r products (lora_kernels.h): ATen's GEMMs without dropout, the device's kernels with it.
template <typename Device>
at::Tensor project(const at::Tensor& src, const at::Tensor& mat, double scale, Dropout& dropout) {
  if (dropout.dropout_p > 0) return Device::project(src, mat, scale, dropout);
  at::Tensor out = at::mm(src, mat.t());
  return scale == 1 ? out : out.mul_(scale);
}

template <typename Device>
void expand_add(at::Tensor& dst, const at::Tensor& coeff, const at::Tensor& mat, double scale, Dropout& dropout) {
  if (dropout.dropout_p > 0) {
    Device::expand_add(dst, coeff, mat, scale, dropout);
  } else {
    dst.addmm_(coeff, mat, 1, scale);
  }
}

template <typename Device>
at::Tensor outer_sum(const at::Tensor& coeff, const at::Tensor& src, double scale, Dropout& dropout) {
  if (dropout.dropout_p > 0) return Device::outer_sum(coeff, src, scale, dropout);
  at::Tensor out = at::mm(coeff.t(), src);
  return scale == 1 ? out : out.mul_(scale);
}

template <typename Device>
LoRAForwardResult run_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& lora_A, const at::Tensor& lora_B, const LoRAOptions& options) {
  check_inputs(x, weight, bias, lora_A, lora_B, options);
  at::Tensor out = bias.defined() ? at::addmm(bias, x, weight.t()) : at::mm(x, weight.t());
  Dropout dropout{options.dropout_p, options.seed, empty_mask(x), /*draw=*/true};
  Dropout none{0, 0, at::Tensor(), false};
  at::Tensor xa = project<Device>(x, lora_A, 1.0, dropout);
  expand_add<Device>(out, xa, lora_B.t(), options.scaling, none);
  return {out, xa, dropout.mask};
}

template <typename Device>
LoRABackwardResult run_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
                                const at::Tensor& mask, const LoRAOptions& options, at::Tensor grad_x,
                                const LoRAGradRequest& need) {
  check_inputs(x, weight, at::Tensor(), lora_A, lora_B, options);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == weight.size(0) &&
                  grad_out.is_contiguous() && grad_out.scalar_type() == x.scalar_type(),
              "grad_out must be contiguous (N, M) of x's dtype");
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == x.size(0) && xa.size(1) == lora_A.size(0) &&
                  xa.scalar_type() == x.scalar_type(),
              "xa must be (N, r) of x's dtype");
  TORCH_CHECK(!grad_x.defined() || (grad_x.sizes() == x.sizes() && grad_x.stride(1) == 1 &&
                                    grad_x.scalar_type() == x.scalar_type()),
              "grad_x must be (N, K) of x's dtype");
  Dropout dropout{options.dropout_p, options.seed, mask, /*draw=*/false};
  Dropout none{0, 0, at::Tensor(), false};
  const at::Tensor gxa = need.x || need.lora_A ? project<Device>(grad_out, lora_B.t(), options.scaling, none) : at::Tensor();
  at::Tensor grad_weight = need.weight ? at::mm(grad_out.t(), x) : at::Tensor();
  at::Tensor grad_bias;
  if (need.bias) grad_bias = at::sum(grad_out, {0}, false, at::toOpMathType(x.scalar_type())).to(x.scalar_type());
  at::Tensor grad_B = need.lora_B ? outer_sum<Device>(xa, grad_out, options.scaling, none).t().contiguous() : at::Tensor();
  if (need.x) {
    if (grad_x.defined()) {
      grad_x.addmm_(grad_out, weight);
    } else {
      grad_x = at::mm(grad_out, weight);
    }
    expand_add<Device>(grad_x, gxa, lora_A, 1.0, dropout);
  } else {
    grad_x = at::Tensor();
  }
  at::Tensor grad_A = need.lora_A ? outer_sum<Device>(gxa, x, 1.0, dropout) : at::Tensor();
  return {grad_x, grad_weight, grad_bias, grad_A, grad_B};
}

// The keep mask as the kernels draw it: a projection of ones draws it (cpu: into the packed mask), then
// ones expanded through it come out as keep / (1 - dropout_p).
template <typename Device>
at::Tensor run_mask(int64_t seed, int64_t rows, int64_t cols, double dropout_p, at::Device where) {
  const auto options = at::TensorOptions().device(where).dtype(at::kFloat);
  if (dropout_p == 0) return at::ones({rows, cols}, options.dtype(at::kBool));
  at::Tensor dropped = at::zeros({rows, cols}, options);
  Dropout dropout{dropout_p, seed, at::Tensor(), /*draw=*/true};
  project<Device>(at::ones({rows, cols}, options), at::ones({1, cols}, options), 1.0, dropout);  // draws the mask
  dropout.draw = false;
  expand_add<Device>(dropped, at::ones({rows, 1}, options), at::ones({1, cols}, options), 1.0, dropout);
  return dropped.ne(0);
}

}  // namespace

namespace cpu {
namespace {
struct Device {
  static constexpr auto project = cpu::project;
  static constexpr auto expand_add = cpu::expand_add;
  static constexpr auto outer_sum = cpu::outer_sum;
};
}  // namespace

LoRAForwardResult lora_linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      const at::Tensor& lora_A, const at::Tensor& lora_B, const LoRAOptions& options) {
  TORCH_CHECK(x.device().is_cpu(), "the cpu backend needs CPU tensors");
  const auto dtype = x.scalar_type();
  if (native_gemm(dtype)) return run_forward<Device>(x, weight, bias, lora_A, lora_B, options);
  const auto f = at::kFloat;
  auto [out, xa, mask] = run_forward<Device>(x.to(f), weight.to(f), to_dtype(bias, f), lora_A.to(f), lora_B.to(f),
                                             options);
  return {out.to(dtype), xa.to(dtype), mask};
}

LoRABackwardResult lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
                                        const at::Tensor& mask, const LoRAOptions& options, at::Tensor grad_x,
                                        const LoRAGradRequest& need) {
  TORCH_CHECK(x.device().is_cpu(), "the cpu backend needs CPU tensors");
  const auto dtype = x.scalar_type();
  if (native_gemm(dtype)) {
    return run_backward<Device>(grad_out, x, weight, lora_A, lora_B, xa, mask, options, grad_x, need);
  }
  const auto f = at::kFloat;
  auto [gx, gw, gb, ga, gB] = run_backward<Device>(grad_out.to(f), x.to(f), weight.to(f), lora_A.to(f),
                                                   lora_B.to(f), xa.to(f), mask, options, to_dtype(grad_x, f), need);
  if (grad_x.defined() && gx.defined()) {
    grad_x.copy_(gx);
    gx = grad_x;
  }
  return {to_dtype(gx, dtype), to_dtype(gw, dtype), to_dtype(gb, dtype), to_dtype(ga, dtype), to_dtype(gB, dtype)};
}

at::Tensor lora_linear_mask(int64_t seed, int64_t rows, int64_t cols, double dropout_p, at::Device device) {
  return run_mask<Device>(seed, rows, cols, dropout_p, device);
}

}  // namespace cpu

#ifdef MMFAST_WITH_CUDA
namespace cuda {
namespace {
struct Device {
  static constexpr auto project = cuda::project;
  static constexpr auto expand_add = cuda::expand_add;
  static constexpr auto outer_sum = cuda::outer_sum;
};
}  // namespace

LoRAForwardResult lora_linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      const at::Tensor& lora_A, const at::Tensor& lora_B, const LoRAOptions& options) {
  TORCH_CHECK(x.device().is_cuda(), "the cuda backend needs CUDA tensors");
  return run_forward<Device>(x, weight, bias, lora_A, lora_B, options);
}

LoRABackwardResult lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
                                        const at::Tensor& mask, const LoRAOptions& options, at::Tensor grad_x,
                                        const LoRAGradRequest& need) {
  TORCH_CHECK(x.device().is_cuda(), "the cuda backend needs CUDA tensors");
  return run_backward<Device>(grad_out, x, weight, lora_A, lora_B, xa, mask, options, grad_x, need);
}

at::Tensor lora_linear_mask(int64_t seed, int64_t rows, int64_t cols, double dropout_p, at::Device device) {
  return run_mask<Device>(seed, rows, cols, dropout_p, device);
}

}  // namespace cuda
#endif

}  // namespace mmfast
