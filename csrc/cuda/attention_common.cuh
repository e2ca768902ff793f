// What the forward (attention.cu) and the backward (attention_backward.cu) of the CUDA cross-modal attention
// share: the block shape, the device helpers of both passes, and the host checks defined in attention.cu.
#pragma once

#include "attention.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace mmfast::cuda::attention_detail {

constexpr int kWarp = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarp * kWarps;

struct AttentionShape {
  int64_t total_q, total_k, num_heads, num_kv_heads, head_dim, batch;
};

AttentionShape check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                      const AttentionOptions& options);
at::Tensor gate_tanh(const char* op, const at::Tensor& gate, const at::Tensor& q, int64_t num_heads);
void reserve_shared_memory(const char* op, const void* kernel, size_t bytes, int64_t head_dim, at::ScalarType dtype);
dim3 attention_grid(const char* op, int64_t max_seqlen, int64_t block_rows, int64_t batch, int64_t heads);

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float max_(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_(double a, double b) { return fmax(a, b); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return static_cast<acc_t>(-INFINITY);
}

// Butterfly reductions: every lane ends with the same value. All 32 lanes must call them.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = max_(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Copies `rows` rows of D elements (row r at src + r * src_row_stride) into dst (row stride ld) as
// acc_t, optionally times `mul`; rows [rows, tile_rows) are zero-filled. Every thread of the block
// takes part; the caller synchronises.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(acc_t* dst, int ld, const scalar_t* __restrict__ src, int64_t src_row_stride,
                                          int rows, int tile_rows, int head_dim, acc_t mul = acc_t(1)) {
  for (int idx = threadIdx.x; idx < tile_rows * head_dim; idx += blockDim.x) {
    const int r = idx / head_dim, d = idx % head_dim;
    dst[r * ld + d] = r < rows ? mul * static_cast<acc_t>(src[r * src_row_stride + d]) : acc_t(0);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t dot(const acc_t* a, const acc_t* b, int head_dim) {
  acc_t s = 0;
#pragma unroll 8
  for (int d = 0; d < head_dim; ++d) s += a[d] * b[d];
  return s;
}

// Sample b's rows [start, start + len) of a packed tensor with `total` rows, clamped to the tensor
// so that malformed cu_seqlens can never make a kernel read or write out of bounds.
struct Span {
  int64_t start, len;
};

__device__ __forceinline__ Span sample_span(const int32_t* __restrict__ cu, int b, int64_t total) {
  int64_t start = cu[b], end = cu[b + 1];
  start = start < 0 ? 0 : (start > total ? total : start);
  end = end < start ? start : (end > total ? total : end);
  return {start, end - start};
}

// Calls f with the number of 32-wide chunks of D each lane holds: kernels are instantiated for D <= 64, 128, 256.
template <typename F>
inline void dispatch_chunks(int64_t head_dim, F&& f) {
  if (head_dim <= 64) {
    f(std::integral_constant<int, 2>{});
  } else if (head_dim <= 128) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

// Odd row stride for shared tiles (bank-conflict-free lane-indexed rows).
inline int shared_ld(int64_t head_dim) { return static_cast<int>(head_dim % 2 == 0 ? head_dim + 1 : head_dim); }

}  // namespace mmfast::cuda::attention_detail
