// Cross-modal attention on CUDA tensors, backward pass (contract: csrc/attention.h; forward and the
// shared host checks in attention.cu). Softmax is recomputed from q, k and the saved lse:
//   P = exp(scale q k^T - lse),  dP = dA v^T,  dS = P (dP - delta) scale,
//   grad_q = dS k,  grad_k = dS^T q,  grad_v = P^T dA,
// with dA = g_h grad_out and delta = rowsum(dA * attn) = g_h rowsum(grad_out * attn).
//
// Three kernels, no atomics, so every result is deterministic:
//   * delta: one warp per (t, h) entry, lanes over D, a warp reduction. The gate gradient is then
//     (1 - g^2) * delta.sum(0) with ATen's deterministic reduction.
//   * dK/dV: grid (ceil(max_seqlen_k / 16), B, Hk). A block owns 16 keys of one sample and kv head
//     (each warp 4 of them, accumulators in registers with lanes over D) and loops over every q
//     head of its GQA group and every query tile of 32 rows that can see its keys (causal: from
//     the first row whose limit reaches the block's first key). Per tile, Q, g dO, lse and delta
//     are staged in shared memory; for each of its keys a warp computes P and dS with one query
//     row per lane, then accumulates dV += P^T dO and dK += dS^T Q with lanes over D.
//   * dQ: grid (ceil(max_seqlen_q / 16), B, Hq), the forward's mapping: a warp owns 4 query rows,
//     scores key tiles of 32 keys with one key per lane and accumulates dQ += dS K with lanes over D.
// Rows with no allowed key have lse = -inf and attn = 0: their P and dS are 0, so they contribute
// nothing and get a zero gradient; keys no row reads get zero gradients.
#include "attention_common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace mmfast::cuda {

using namespace attention_detail;


namespace {

constexpr int kRowsPerWarp = 4;                 // dQ: query rows per warp
constexpr int kBlockM = kWarps * kRowsPerWarp;  // dQ: query rows per block
constexpr int kBlockN = kWarp;                  // dQ: keys per tile, one per lane
constexpr int kKeysPerWarp = 4;                 // dK/dV: keys per warp
constexpr int kBlockKeys = kWarps * kKeysPerWarp;  // dK/dV: keys per block
constexpr int kBlockQ = kWarp;                  // dK/dV: query rows per tile, one per lane
constexpr int kDeltaThreads = 256;


// delta[e] = sum_d grad_out[e, d] * attn[e, d] for the entries e = t * Hq + h.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kDeltaThreads)
    attention_delta_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ attn,
                           acc_t* __restrict__ delta, int64_t entries, int head_dim) {
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (e >= entries) return;  // warp-uniform
  const int64_t base = e * head_dim;
  acc_t s = 0;
  for (int d = lane; d < head_dim; d += kWarp) s += static_cast<acc_t>(grad_out[base + d]) * static_cast<acc_t>(attn[base + d]);
  s = warp_sum(s);
  if (lane == 0) delta[e] = s;
}

template <typename scalar_t, typename acc_t, int kChunks>
__global__ void __launch_bounds__(kThreads) attention_backward_dkdv_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
    const scalar_t* __restrict__ v, const acc_t* __restrict__ lse, const acc_t* __restrict__ delta,
    const acc_t* __restrict__ gate_tanh, const int32_t* __restrict__ cu_q, const int32_t* __restrict__ cu_k,
    scalar_t* __restrict__ grad_k, scalar_t* __restrict__ grad_v, int64_t total_q, int64_t total_k,
    int64_t num_heads, int64_t num_kv_heads, int head_dim, int ld, bool causal, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* ks = reinterpret_cast<acc_t*>(smem);  // kBlockKeys x ld
  acc_t* vs = ks + kBlockKeys * ld;            // kBlockKeys x ld
  acc_t* qs = vs + kBlockKeys * ld;            // kBlockQ x ld
  acc_t* dos = qs + kBlockQ * ld;              // kBlockQ x ld, times g_h
  acc_t* lse_s = dos + kBlockQ * ld;           // kBlockQ
  acc_t* delta_s = lse_s + kBlockQ;            // kBlockQ, times g_h

  const int b = blockIdx.y;
  const int64_t hk = blockIdx.z;
  const Span qspan = sample_span(cu_q, b, total_q), kspan = sample_span(cu_k, b, total_k);
  const int64_t lq = qspan.len, lk = kspan.len;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBlockKeys;
  if (n0 >= lk) return;  // block-uniform, before any barrier
  const int keys = static_cast<int>(lk - n0 < kBlockKeys ? lk - n0 : kBlockKeys);
  const int64_t diag = lk - lq;  // key j is allowed for row i iff j <= i + diag (when causal)
  const int64_t group = num_heads / num_kv_heads;
  const int64_t q_row_stride = num_heads * head_dim, kv_row_stride = num_kv_heads * head_dim;

  const int64_t kv_offset = (kspan.start + n0) * kv_row_stride + hk * head_dim;
  load_tile<scalar_t, acc_t>(ks, ld, k + kv_offset, kv_row_stride, keys, kBlockKeys, head_dim);
  load_tile<scalar_t, acc_t>(vs, ld, v + kv_offset, kv_row_stride, keys, kBlockKeys, head_dim);

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  acc_t dk[kKeysPerWarp][kChunks], dv[kKeysPerWarp][kChunks];
#pragma unroll
  for (int kk = 0; kk < kKeysPerWarp; ++kk) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) dk[kk][c] = dv[kk][c] = acc_t(0);
  }

  // The first row that may see key n0 (every later key of the block needs a later row).
  int64_t i_begin = 0;
  if (causal && n0 - diag > 0) i_begin = n0 - diag;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const acc_t g = gate_tanh != nullptr ? gate_tanh[h] : acc_t(1);
    for (int64_t m0 = i_begin; m0 < lq; m0 += kBlockQ) {
      const int rows = static_cast<int>(lq - m0 < kBlockQ ? lq - m0 : kBlockQ);
      __syncthreads();  // the previous tile is no longer read (and, the first time, K and V are complete)
      const int64_t q_offset = (qspan.start + m0) * q_row_stride + h * head_dim;
      load_tile<scalar_t, acc_t>(qs, ld, q + q_offset, q_row_stride, rows, kBlockQ, head_dim);
      load_tile<scalar_t, acc_t>(dos, ld, grad_out + q_offset, q_row_stride, rows, kBlockQ, head_dim, g);
      for (int r = threadIdx.x; r < kBlockQ; r += blockDim.x) {
        const int64_t t = qspan.start + m0 + r;
        lse_s[r] = r < rows ? lse[h * total_q + t] : neg_inf<acc_t>();
        delta_s[r] = r < rows ? g * delta[t * num_heads + h] : acc_t(0);
      }
      __syncthreads();
      const int64_t i = m0 + lane;
      const acc_t row_lse = lse_s[lane], row_delta = delta_s[lane];
#pragma unroll
      for (int kk = 0; kk < kKeysPerWarp; ++kk) {
        const int jl = warp * kKeysPerWarp + kk;
        if (jl >= keys) continue;  // warp-uniform
        const int64_t j = n0 + jl;
        const bool allowed = lane < rows && (!causal || j <= i + diag) && row_lse != neg_inf<acc_t>();
        acc_t p = 0, ds = 0;
        if (allowed) {
          p = exp_(scale * dot(qs + lane * ld, ks + jl * ld, head_dim) - row_lse);
          const acc_t dp = dot(dos + lane * ld, vs + jl * ld, head_dim);
          ds = p * (dp - row_delta) * scale;
        }
        for (int ii = 0; ii < rows; ++ii) {
          const acc_t pi = __shfl_sync(0xffffffffu, p, ii);
          const acc_t dsi = __shfl_sync(0xffffffffu, ds, ii);
#pragma unroll
          for (int c = 0; c < kChunks; ++c) {
            const int d = lane + c * kWarp;
            if (d < head_dim) {
              dv[kk][c] += pi * dos[ii * ld + d];
              dk[kk][c] += dsi * qs[ii * ld + d];
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int kk = 0; kk < kKeysPerWarp; ++kk) {
    const int jl = warp * kKeysPerWarp + kk;
    if (jl >= keys) continue;
    const int64_t base = (kspan.start + n0 + jl) * kv_row_stride + hk * head_dim;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int d = lane + c * kWarp;
      if (d >= head_dim) continue;
      grad_k[base + d] = static_cast<scalar_t>(dk[kk][c]);
      grad_v[base + d] = static_cast<scalar_t>(dv[kk][c]);
    }
  }
}

template <typename scalar_t, typename acc_t, int kChunks>
__global__ void __launch_bounds__(kThreads) attention_backward_dq_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
    const scalar_t* __restrict__ v, const acc_t* __restrict__ lse, const acc_t* __restrict__ delta,
    const acc_t* __restrict__ gate_tanh, const int32_t* __restrict__ cu_q, const int32_t* __restrict__ cu_k,
    scalar_t* __restrict__ grad_q, int64_t total_q, int64_t total_k, int64_t num_heads, int64_t num_kv_heads,
    int head_dim, int ld, bool causal, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* qs = reinterpret_cast<acc_t*>(smem);  // kBlockM x ld
  acc_t* dos = qs + kBlockM * ld;              // kBlockM x ld, times g_h
  acc_t* ks = dos + kBlockM * ld;              // kBlockN x ld
  acc_t* vs = ks + kBlockN * ld;               // kBlockN x ld

  const int b = blockIdx.y;
  const int64_t h = blockIdx.z;
  const Span qspan = sample_span(cu_q, b, total_q), kspan = sample_span(cu_k, b, total_k);
  const int64_t lq = qspan.len, lk = kspan.len;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  if (m0 >= lq) return;  // block-uniform, before any barrier
  const int rows = static_cast<int>(lq - m0 < kBlockM ? lq - m0 : kBlockM);
  const int64_t hk = h / (num_heads / num_kv_heads);
  const int64_t diag = lk - lq;
  int64_t n_end = lk;
  if (causal) {
    const int64_t limit = m0 + rows + diag;  // last row's limit + 1
    n_end = limit < 0 ? 0 : (limit < lk ? limit : lk);
  }
  const acc_t g = gate_tanh != nullptr ? gate_tanh[h] : acc_t(1);
  const int64_t q_row_stride = num_heads * head_dim, kv_row_stride = num_kv_heads * head_dim;
  const int64_t q_offset = (qspan.start + m0) * q_row_stride + h * head_dim;
  load_tile<scalar_t, acc_t>(qs, ld, q + q_offset, q_row_stride, rows, kBlockM, head_dim);
  load_tile<scalar_t, acc_t>(dos, ld, grad_out + q_offset, q_row_stride, rows, kBlockM, head_dim, g);

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  acc_t row_lse[kRowsPerWarp], row_delta[kRowsPerWarp], dq[kRowsPerWarp][kChunks];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    const int64_t t = qspan.start + m0 + r;
    row_lse[rr] = r < rows ? lse[h * total_q + t] : neg_inf<acc_t>();
    row_delta[rr] = r < rows ? g * delta[t * num_heads + h] : acc_t(0);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) dq[rr][c] = acc_t(0);
  }

  for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
    const int keys = static_cast<int>(n_end - n0 < kBlockN ? n_end - n0 : kBlockN);
    __syncthreads();  // the previous tile is no longer read (and, the first time, Q and dO are complete)
    const int64_t kv_offset = (kspan.start + n0) * kv_row_stride + hk * head_dim;
    load_tile<scalar_t, acc_t>(ks, ld, k + kv_offset, kv_row_stride, keys, kBlockN, head_dim);
    load_tile<scalar_t, acc_t>(vs, ld, v + kv_offset, kv_row_stride, keys, kBlockN, head_dim);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      if (r >= rows) continue;  // warp-uniform
      const int64_t i = m0 + r, j = n0 + lane;
      const bool allowed = lane < keys && (!causal || j <= i + diag) && row_lse[rr] != neg_inf<acc_t>();
      acc_t ds = 0;
      if (allowed) {
        const acc_t p = exp_(scale * dot(qs + r * ld, ks + lane * ld, head_dim) - row_lse[rr]);
        const acc_t dp = dot(dos + r * ld, vs + lane * ld, head_dim);
        ds = p * (dp - row_delta[rr]) * scale;
      }
      for (int jj = 0; jj < keys; ++jj) {
        const acc_t dsj = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const int d = lane + c * kWarp;
          if (d < head_dim) dq[rr][c] += dsj * ks[jj * ld + d];
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    if (r >= rows) continue;
    const int64_t base = (qspan.start + m0 + r) * q_row_stride + h * head_dim;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int d = lane + c * kWarp;
      if (d < head_dim) grad_q[base + d] = static_cast<scalar_t>(dq[rr][c]);
    }
  }
}


}  // namespace

AttentionBackwardResult cross_modal_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                       const at::Tensor& k, const at::Tensor& v, const at::Tensor& attn,
                                                       const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
                                                       const at::Tensor& cu_seqlens_k, const AttentionOptions& options,
                                                       const at::Tensor& gate) {
  constexpr const char* op = "cross_modal_attention_backward";
  const AttentionShape shape = check_attention_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, options);
  for (const at::Tensor* t : {&grad_out, &attn}) {
    const char* name = t == &grad_out ? "grad_out" : "attn";
    TORCH_CHECK(t->defined() && t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() &&
                    t->device() == q.device(),
                op, ": ", name, " must be ", q.sizes(), " of q's dtype ", q.scalar_type(), " on ", q.device());
  }
  TORCH_CHECK(lse.defined() && lse.dim() == 2 && lse.size(0) == shape.num_heads && lse.size(1) == shape.total_q &&
                  at::isFloatingType(lse.scalar_type()) && lse.device() == q.device(),
              op, ": lse must be floating (Hq, Tq) = (", shape.num_heads, ", ", shape.total_q, ") on ", q.device(),
              ", got ", lse.sizes());
  const c10::cuda::CUDAGuard device_guard(q.device());
  const auto acc_type = at::toOpMathType(q.scalar_type());
  const at::Tensor g = gate_tanh(op, gate, q, shape.num_heads);
  const at::Tensor dout = grad_out.contiguous(), saved_attn = attn.contiguous();
  const at::Tensor saved_lse = lse.to(acc_type).contiguous();

  at::Tensor grad_q = at::zeros_like(q), grad_k = at::zeros_like(k), grad_v = at::zeros_like(v);
  at::Tensor delta = at::zeros({shape.total_q, shape.num_heads}, q.options().dtype(acc_type));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int ld = shared_ld(shape.head_dim);
  const int64_t entries = shape.total_q * shape.num_heads;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "mmfast_cross_modal_attention_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (entries > 0) {
      const int64_t blocks = (entries + kDeltaThreads / kWarp - 1) / (kDeltaThreads / kWarp);
      TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": too many rows: ", shape.total_q);
      attention_delta_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kDeltaThreads, 0, stream>>>(
          dout.const_data_ptr<scalar_t>(), saved_attn.const_data_ptr<scalar_t>(), delta.mutable_data_ptr<acc_t>(),
          entries, static_cast<int>(shape.head_dim));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (shape.total_q == 0 || shape.total_k == 0 || shape.batch == 0) return;  // every gradient is zero
    dispatch_chunks(shape.head_dim, [&](auto chunks) {
      constexpr int kChunks = decltype(chunks)::value;
      const acc_t scale = static_cast<acc_t>(options.scale);
      const acc_t* gate_ptr = g.defined() ? g.const_data_ptr<acc_t>() : nullptr;
      if (options.max_seqlen_k > 0) {
        const auto kernel = attention_backward_dkdv_kernel<scalar_t, acc_t, kChunks>;
        const size_t bytes = (static_cast<size_t>(2 * kBlockKeys + 2 * kBlockQ) * ld + 2 * kBlockQ) * sizeof(acc_t);
        reserve_shared_memory(op, reinterpret_cast<const void*>(kernel), bytes, shape.head_dim, q.scalar_type());
        const dim3 grid = attention_grid(op, options.max_seqlen_k, kBlockKeys, shape.batch, shape.num_kv_heads);
        kernel<<<grid, kThreads, bytes, stream>>>(
            dout.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
            v.const_data_ptr<scalar_t>(), saved_lse.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(), gate_ptr,
            cu_seqlens_q.const_data_ptr<int32_t>(), cu_seqlens_k.const_data_ptr<int32_t>(),
            grad_k.mutable_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>(), shape.total_q, shape.total_k,
            shape.num_heads, shape.num_kv_heads, static_cast<int>(shape.head_dim), ld, options.causal, scale);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (options.max_seqlen_q > 0) {
        const auto kernel = attention_backward_dq_kernel<scalar_t, acc_t, kChunks>;
        const size_t bytes = static_cast<size_t>(2 * kBlockM + 2 * kBlockN) * ld * sizeof(acc_t);
        reserve_shared_memory(op, reinterpret_cast<const void*>(kernel), bytes, shape.head_dim, q.scalar_type());
        const dim3 grid = attention_grid(op, options.max_seqlen_q, kBlockM, shape.batch, shape.num_heads);
        kernel<<<grid, kThreads, bytes, stream>>>(
            dout.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
            v.const_data_ptr<scalar_t>(), saved_lse.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(), gate_ptr,
            cu_seqlens_q.const_data_ptr<int32_t>(), cu_seqlens_k.const_data_ptr<int32_t>(),
            grad_q.mutable_data_ptr<scalar_t>(), shape.total_q, shape.total_k, shape.num_heads, shape.num_kv_heads,
            static_cast<int>(shape.head_dim), ld, options.causal, scale);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });

  at::Tensor grad_gate;
  if (g.defined()) grad_gate = g.mul(g).neg_().add_(1).mul_(delta.sum(0)).to(gate.scalar_type());  // (1 - g^2) sum_t delta
  return {grad_q, grad_k, grad_v, grad_gate};
}

}  // namespace mmfast::cuda
