// The LoRA kernels on CUDA (lora_kernels.h): cuBLAS through ATen for the rank-r products, and one
// fused dropout kernel between them. No mask is kept: each thread redraws the Philox group of four
// columns it applies, so forward and backward see the same keeps for free. dropout(x) exists one
// chunk of rows at a time.
#include "../lora_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace mmfast::cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, bool kAccumulate>
__global__ void dropout_rows_kernel(const scalar_t* __restrict__ src, int64_t src_stride, scalar_t* __restrict__ dst,
                                    int64_t dst_stride, int64_t rows, int64_t cols, int64_t row0, uint64_t seed,
                                    uint32_t threshold, float scale) {
  using acc_t = at::opmath_type<scalar_t>;
  // One thread per Philox group: group g of a row draws columns 32 (g / 8) + 8 w + g % 8 (lora_kernels.h).
  const int64_t groups_per_row = (cols + 31) / 32 * 8;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (thread >= rows * groups_per_row) return;
  const int64_t i = thread / groups_per_row, group = thread % groups_per_row;
  const int64_t first_column = group / 8 * 32 + group % 8;
  at::Philox4_32 engine(seed, static_cast<uint64_t>(row0 + i), static_cast<uint64_t>(group));
  const scalar_t* s = src + i * src_stride;
  scalar_t* d = dst + i * dst_stride;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const uint32_t draw = engine();
    const int64_t j = first_column + 8 * w;
    if (j >= cols) continue;
    const acc_t value = draw >= threshold ? static_cast<acc_t>(s[j]) * scale : acc_t(0);
    d[j] = static_cast<scalar_t>(kAccumulate ? static_cast<acc_t>(d[j]) + value : value);
  }
}

// dst[i, j] = (accumulate ? dst[i, j] : 0) + src[i, j] * keep[row0 + i, j] / (1 - dropout_p), for (rows, K)
// src and dst with unit stride along K: what the three products are built from.
void dropout_rows(const at::Tensor& src, at::Tensor& dst, bool accumulate, int64_t row0, const Dropout& dropout) {
  TORCH_CHECK(src.is_cuda() && dst.is_cuda(), "the cuda backend needs CUDA tensors");
  TORCH_CHECK(src.dim() == 2 && src.stride(1) == 1 && dst.sizes() == src.sizes() && dst.stride(1) == 1 &&
                  dst.scalar_type() == src.scalar_type(),
              "dropout_rows: src and dst must be (rows, K) of one dtype with unit stride along K");
  const int64_t rows = src.size(0), cols = src.size(1);
  const int64_t threads = rows * ((cols + 31) / 32 * 8);
  if (threads == 0) return;
  const c10::cuda::CUDAGuard device_guard(src.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto grid = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
  const uint32_t threshold = lora_keep_threshold(dropout.dropout_p);
  const float scale = static_cast<float>(1.0 / (1.0 - dropout.dropout_p));
  const auto seed = static_cast<uint64_t>(dropout.seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "lora_dropout_rows", [&] {
    if (accumulate) {
      dropout_rows_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
          src.const_data_ptr<scalar_t>(), src.stride(0), dst.mutable_data_ptr<scalar_t>(), dst.stride(0), rows, cols,
          row0, seed, threshold, scale);
    } else {
      dropout_rows_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
          src.const_data_ptr<scalar_t>(), src.stride(0), dst.mutable_data_ptr<scalar_t>(), dst.stride(0), rows, cols,
          row0, seed, threshold, scale);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Rows of one chunk of dropout(src): bounded by elements so the chunk stays a small, reused buffer
// while the GEMM on it still runs at speed.
constexpr int64_t kChunkElements = 1 << 22;

int64_t chunk_rows(int64_t rows, int64_t cols) {
  return std::clamp<int64_t>(kChunkElements / std::max<int64_t>(cols, 1), 1, std::max<int64_t>(rows, 1));
}

}  // namespace

at::Tensor project(const at::Tensor& src, const at::Tensor& mat, double scale, Dropout& dropout) {
  const int64_t rows = src.size(0), cols = src.size(1), chunk = chunk_rows(rows, cols);
  at::Tensor out = at::empty({rows, mat.size(0)}, src.options());
  at::Tensor storage = at::empty({chunk, cols}, src.options());
  for (int64_t start = 0; start < rows; start += chunk) {
    const int64_t n = std::min(chunk, rows - start);
    at::Tensor dropped = storage.narrow(0, 0, n), part = out.narrow(0, start, n);
    dropout_rows(src.narrow(0, start, n), dropped, false, start, dropout);
    at::addmm_out(part, part, dropped, mat.t(), /*beta=*/0, /*alpha=*/scale);
  }
  return out;
}

void expand_add(at::Tensor& dst, const at::Tensor& coeff, const at::Tensor& mat, double scale, Dropout& dropout) {
  const int64_t rows = dst.size(0), cols = dst.size(1), chunk = chunk_rows(rows, cols);
  at::Tensor storage = at::empty({chunk, cols}, dst.options());
  for (int64_t start = 0; start < rows; start += chunk) {
    const int64_t n = std::min(chunk, rows - start);
    at::Tensor product = storage.narrow(0, 0, n), part = dst.narrow(0, start, n);
    at::addmm_out(product, product, coeff.narrow(0, start, n), mat, /*beta=*/0, /*alpha=*/scale);
    dropout_rows(product, part, true, start, dropout);
  }
}

at::Tensor outer_sum(const at::Tensor& coeff, const at::Tensor& src, double scale, Dropout& dropout) {
  // Sums over chunks in float32 (float64 for float64): each chunk's product is rounded once.
  const int64_t rows = src.size(0), cols = src.size(1), chunk = chunk_rows(rows, cols);
  const auto acc_type = at::toOpMathType(src.scalar_type());
  at::Tensor sum = at::zeros({coeff.size(1), cols}, src.options().dtype(acc_type));
  at::Tensor storage = at::empty({chunk, cols}, src.options());
  for (int64_t start = 0; start < rows; start += chunk) {
    const int64_t n = std::min(chunk, rows - start);
    at::Tensor dropped = storage.narrow(0, 0, n);
    dropout_rows(src.narrow(0, start, n), dropped, false, start, dropout);
    sum.add_(at::mm(coeff.narrow(0, start, n).t(), dropped), scale);
  }
  return sum.to(src.scalar_type());
}

}  // namespace mmfast::cuda
