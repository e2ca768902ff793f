// The LoRA dropout pass on CUDA (lora_dropout.h): no mask is kept; each thread redraws the Philox
// block of four columns it applies, so the forward and the backward see the same keeps for free.
#include "../lora_dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace mmfast::cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, bool kAccumulate>
__global__ void dropout_rows_kernel(const scalar_t* __restrict__ src, int64_t src_stride, scalar_t* __restrict__ dst,
                                    int64_t dst_stride, int64_t rows, int64_t cols, int64_t row0, uint64_t seed,
                                    uint32_t threshold, float scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t blocks_per_row = (cols + 3) / 4;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (block >= rows * blocks_per_row) return;
  const int64_t i = block / blocks_per_row, j0 = (block % blocks_per_row) * 4;
  at::Philox4_32 engine(seed, static_cast<uint64_t>(row0 + i), static_cast<uint64_t>(j0 / 4));
  const scalar_t* s = src + i * src_stride;
  scalar_t* d = dst + i * dst_stride;
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const uint32_t draw = engine();  // drawn even past the row's end, so lanes stay aligned with the cpu scheme
    const int64_t j = j0 + t;
    if (j >= cols) continue;
    const acc_t value = draw >= threshold ? static_cast<acc_t>(s[j]) * scale : acc_t(0);
    d[j] = static_cast<scalar_t>(kAccumulate ? static_cast<acc_t>(d[j]) + value : value);
  }
}

}  // namespace

void dropout_rows(const at::Tensor& src, at::Tensor& dst, bool accumulate, int64_t row0, const LoRAOptions& options,
                  at::Tensor& /*mask: redrawn from the seed instead*/, bool /*draw*/) {
  TORCH_CHECK(src.is_cuda() && dst.is_cuda(), "the cuda backend needs CUDA tensors");
  TORCH_CHECK(src.dim() == 2 && src.stride(1) == 1 && dst.sizes() == src.sizes() && dst.stride(1) == 1 &&
                  dst.scalar_type() == src.scalar_type(),
              "dropout_rows: src and dst must be (rows, K) of one dtype with unit stride along K");
  const int64_t rows = src.size(0), cols = src.size(1);
  const int64_t threads = rows * ((cols + 3) / 4);
  if (threads == 0) return;
  const c10::cuda::CUDAGuard device_guard(src.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto grid = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
  const uint32_t threshold = lora_keep_threshold(options.dropout_p);
  const float scale = static_cast<float>(1.0 / (1.0 - options.dropout_p));
  const auto seed = static_cast<uint64_t>(options.seed);
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

}  // namespace mmfast::cuda
