// Cross-modal attention on CUDA tensors, forward pass (contract: csrc/attention.h; backward in
// attention_backward.cu). Flash-style: softmax is never materialised; the forward keeps a running
// (max, sum) per row in fp32 (fp64 for fp64) and saves only attn and the row logsumexp.
//
// Thread mapping (one scheme for all three attention kernels, clarity over peak speed):
//   * a block has kWarps = 4 warps (128 threads); tiles live in dynamic shared memory, upcast to
//     acc_t once at the load, rows padded to an odd stride `ld` so that lane-indexed rows hit
//     distinct banks;
//   * forward: grid (ceil(max_seqlen_q / 16), B, Hq). A block owns 16 query rows of one sample and
//     head, each warp 4 of them. Key/value tiles of 32 keys are staged in shared memory up to the
//     causal limit of the block's last row. For each of its rows a warp scores the tile with one
//     key per lane (a full dot product over D), merges the tile into the row's online softmax with
//     two warp reductions, then accumulates P V with lanes over D (lane owns d = lane + 32 c, so a
//     row's accumulator is kChunks = ceil(D / 32) registers per lane).
//   * D is a runtime value up to a compile-time bound: kernels are instantiated for D <= 64, 128,
//     256 (kChunks = 2, 4, 8). D > 256 is refused.
//
// Rows with no allowed key (lk = 0, or causal with lq > lk) never see a finite score: their
// accumulator stays 0, so attn is exactly 0 and lse = -inf.
#include "attention_common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace mmfast::cuda {

using namespace attention_detail;


namespace {

constexpr int kRowsPerWarp = 4;
constexpr int kBlockM = kWarps * kRowsPerWarp;  // query rows per forward block
constexpr int kBlockN = kWarp;                  // keys per tile: lane j scores key j


template <typename scalar_t, typename acc_t, int kChunks>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
    const int32_t* __restrict__ cu_q, const int32_t* __restrict__ cu_k, scalar_t* __restrict__ attn,
    acc_t* __restrict__ lse, scalar_t* __restrict__ out, const scalar_t* __restrict__ residual,
    const acc_t* __restrict__ gate_tanh, int64_t total_q, int64_t total_k, int64_t num_heads, int64_t num_kv_heads,
    int head_dim, int ld, bool causal, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* qs = reinterpret_cast<acc_t*>(smem);  // kBlockM x ld
  acc_t* ks = qs + kBlockM * ld;               // kBlockN x ld
  acc_t* vs = ks + kBlockN * ld;               // kBlockN x ld

  const int b = blockIdx.y;
  const int64_t h = blockIdx.z;
  const Span qspan = sample_span(cu_q, b, total_q), kspan = sample_span(cu_k, b, total_k);
  const int64_t lq = qspan.len, lk = kspan.len;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  if (m0 >= lq) return;  // block-uniform, before any barrier
  const int rows = static_cast<int>(lq - m0 < kBlockM ? lq - m0 : kBlockM);
  const int64_t hk = h / (num_heads / num_kv_heads);
  const int64_t diag = lk - lq;  // key j is allowed for row i iff j <= i + diag (when causal)
  int64_t n_end = lk;            // keys any row of this block may attend to
  if (causal) {
    const int64_t limit = m0 + rows + diag;  // last row's limit + 1
    n_end = limit < 0 ? 0 : (limit < lk ? limit : lk);
  }

  const int64_t q_row_stride = num_heads * head_dim, kv_row_stride = num_kv_heads * head_dim;
  load_tile<scalar_t, acc_t>(qs, ld, q + (qspan.start + m0) * q_row_stride + h * head_dim, q_row_stride, rows, kBlockM,
                             head_dim);

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  acc_t row_max[kRowsPerWarp], row_sum[kRowsPerWarp], acc[kRowsPerWarp][kChunks];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    row_max[rr] = neg_inf<acc_t>();
    row_sum[rr] = acc_t(0);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) acc[rr][c] = acc_t(0);
  }

  for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
    const int keys = static_cast<int>(n_end - n0 < kBlockN ? n_end - n0 : kBlockN);
    __syncthreads();  // the previous tile is no longer read (and, the first time, Q is complete)
    const int64_t kv_offset = (kspan.start + n0) * kv_row_stride + hk * head_dim;
    load_tile<scalar_t, acc_t>(ks, ld, k + kv_offset, kv_row_stride, keys, kBlockN, head_dim);
    load_tile<scalar_t, acc_t>(vs, ld, v + kv_offset, kv_row_stride, keys, kBlockN, head_dim);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      if (r >= rows) continue;  // warp-uniform
      const int64_t i = m0 + r, j = n0 + lane;
      const bool allowed = lane < keys && (!causal || j <= i + diag);
      const acc_t s = allowed ? scale * dot(qs + r * ld, ks + lane * ld, head_dim) : neg_inf<acc_t>();
      const acc_t tile_max = warp_max(s);
      if (tile_max == neg_inf<acc_t>()) continue;  // no allowed key in this tile (same in every lane)
      const acc_t new_max = max_(row_max[rr], tile_max);
      const acc_t alpha = exp_(row_max[rr] - new_max);  // 0 while the row was empty (-inf - finite)
      const acc_t p = allowed ? exp_(s - new_max) : acc_t(0);
      row_sum[rr] = row_sum[rr] * alpha + warp_sum(p);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) acc[rr][c] *= alpha;
      for (int jj = 0; jj < keys; ++jj) {
        const acc_t pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const int d = lane + c * kWarp;
          if (d < head_dim) acc[rr][c] += pj * vs[jj * ld + d];
        }
      }
      row_max[rr] = new_max;
    }
  }

  const acc_t g = gate_tanh != nullptr ? gate_tanh[h] : acc_t(1);
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    if (r >= rows) continue;
    const int64_t t = qspan.start + m0 + r;
    const bool has_keys = row_sum[rr] > acc_t(0);
    const acc_t inv = has_keys ? acc_t(1) / row_sum[rr] : acc_t(0);
    const int64_t base = t * q_row_stride + h * head_dim;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int d = lane + c * kWarp;
      if (d >= head_dim) continue;
      const acc_t a = acc[rr][c] * inv;
      attn[base + d] = static_cast<scalar_t>(a);
      if (out != nullptr) {
        const acc_t res = residual != nullptr ? static_cast<acc_t>(residual[base + d]) : acc_t(0);
        out[base + d] = static_cast<scalar_t>(res + g * a);
      }
    }
    if (lane == 0) lse[h * total_q + t] = has_keys ? row_max[rr] + log_(row_sum[rr]) : neg_inf<acc_t>();
  }
}

// f(std::integral_constant<int, kChunks>) with kChunks * 32 >= head_dim.

}  // namespace

namespace attention_detail {

constexpr int64_t kMaxHeadDim = 256;

AttentionShape check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                      const AttentionOptions& options) {
  TORCH_CHECK(q.defined() && k.defined() && v.defined(), op, ": q, k and v must be defined");
  TORCH_CHECK(q.is_cuda(), "the cuda backend needs CUDA tensors, got q on ", q.device());
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, ": q must be (Tq, Hq, D) and k, v (Tk, Hk, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have one shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(2) == q.size(2), op, ": q and k must have one head dim, got ", q.size(2), " and ", k.size(2));
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": q must be floating point, got ", q.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": q, k and v must be on one device");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), op, ": q, k and v must be contiguous");
  const int64_t head_dim = q.size(2), num_heads = q.size(1), num_kv_heads = k.size(1);
  TORCH_CHECK(head_dim >= 1 && head_dim <= kMaxHeadDim, op, ": the cuda backend supports head dims 1 to ", kMaxHeadDim,
              ", got D = ", head_dim);
  TORCH_CHECK(num_kv_heads >= 1 && num_heads >= num_kv_heads && num_heads % num_kv_heads == 0, op,
              ": the number of query heads must be a positive multiple of the number of key/value heads, got Hq = ",
              num_heads, " and Hk = ", num_kv_heads);
  for (const at::Tensor* cu : {&cu_seqlens_q, &cu_seqlens_k}) {
    const char* name = cu == &cu_seqlens_q ? "cu_seqlens_q" : "cu_seqlens_k";
    TORCH_CHECK(cu->defined() && cu->dim() == 1 && cu->size(0) >= 1, op, ": ", name, " must be 1-D of length B + 1");
    TORCH_CHECK(cu->scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", cu->scalar_type());
    TORCH_CHECK(cu->device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
                cu->device());
    TORCH_CHECK(cu->is_contiguous(), op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK(cu_seqlens_q.size(0) == cu_seqlens_k.size(0), op,
              ": cu_seqlens_q and cu_seqlens_k must have one length B + 1, got ", cu_seqlens_q.size(0), " and ",
              cu_seqlens_k.size(0));
  TORCH_CHECK(options.max_seqlen_q >= 0 && options.max_seqlen_k >= 0, op, ": max_seqlen_q / max_seqlen_k must be >= 0");
  TORCH_CHECK(options.scale > 0 && std::isfinite(options.scale), op, ": scale must be positive and finite, got ",
              options.scale);
  return {q.size(0), k.size(0), num_heads, num_kv_heads, head_dim, cu_seqlens_q.size(0) - 1};
}

at::Tensor gate_tanh(const char* op, const at::Tensor& gate, const at::Tensor& q, int64_t num_heads) {
  if (!gate.defined()) return at::Tensor();
  TORCH_CHECK(gate.dim() == 1 && gate.size(0) == num_heads, op, ": gate must be (Hq,) = (", num_heads, ",), got ",
              gate.sizes());
  TORCH_CHECK(at::isFloatingType(gate.scalar_type()), op, ": gate must be floating point, got ", gate.scalar_type());
  TORCH_CHECK(gate.device() == q.device(), op, ": gate must be on q's device ", q.device(), ", got ", gate.device());
  return at::tanh(gate.to(at::toOpMathType(q.scalar_type()))).contiguous();
}

void reserve_shared_memory(const char* op, const void* kernel, size_t bytes, int64_t head_dim, at::ScalarType dtype) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const size_t limit = std::max<size_t>(props->sharedMemPerBlockOptin, props->sharedMemPerBlock);
  TORCH_CHECK(bytes <= limit, op, ": head dim D = ", head_dim, " in ", dtype, " needs ", bytes,
              " bytes of shared memory per block, this GPU allows ", limit, "; use a smaller head dim or dtype");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

dim3 attention_grid(const char* op, int64_t max_seqlen, int64_t block_rows, int64_t batch, int64_t heads) {
  const int64_t tiles = (max_seqlen + block_rows - 1) / block_rows;
  TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(), op, ": sequence too long: ", max_seqlen);
  TORCH_CHECK(batch <= 65535, op, ": the cuda backend takes at most 65535 samples per call, got ", batch);
  TORCH_CHECK(heads <= 65535, op, ": the cuda backend takes at most 65535 heads, got ", heads);
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(batch), static_cast<unsigned>(heads));
}

}  // namespace attention_detail

AttentionForwardResult cross_modal_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                     const AttentionOptions& options, const at::Tensor& gate,
                                                     const at::Tensor& residual) {
  constexpr const char* op = "cross_modal_attention_forward";
  const AttentionShape shape = check_attention_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, options);
  if (residual.defined()) {
    TORCH_CHECK(residual.sizes() == q.sizes() && residual.scalar_type() == q.scalar_type() &&
                    residual.device() == q.device(),
                op, ": residual must be ", q.sizes(), " of q's dtype ", q.scalar_type(), " on ", q.device(), ", got ",
                residual.sizes(), " ", residual.scalar_type(), " on ", residual.device());
  }
  const c10::cuda::CUDAGuard device_guard(q.device());
  const auto acc_type = at::toOpMathType(q.scalar_type());
  const at::Tensor g = gate_tanh(op, gate, q, shape.num_heads);
  const at::Tensor res = residual.defined() ? residual.contiguous() : at::Tensor();
  const bool has_out = gate.defined() || residual.defined();

  // Initialised here as well as by the kernel: rows outside every sample (never the case for valid
  // cu_seqlens) still come back defined.
  at::Tensor attn = at::zeros_like(q);
  at::Tensor lse = at::full({shape.num_heads, shape.total_q}, -std::numeric_limits<double>::infinity(),
                            q.options().dtype(acc_type));
  at::Tensor out = has_out ? (res.defined() ? res.clone() : at::zeros_like(q)) : at::Tensor();
  if (shape.total_q == 0 || shape.batch == 0 || options.max_seqlen_q == 0) return {out, attn, lse};

  const dim3 grid = attention_grid(op, options.max_seqlen_q, kBlockM, shape.batch, shape.num_heads);
  const int ld = shared_ld(shape.head_dim);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "mmfast_cross_modal_attention_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_chunks(shape.head_dim, [&](auto chunks) {
      constexpr int kChunks = decltype(chunks)::value;
      const auto kernel = attention_forward_kernel<scalar_t, acc_t, kChunks>;
      const size_t bytes = static_cast<size_t>(kBlockM + 2 * kBlockN) * ld * sizeof(acc_t);
      reserve_shared_memory(op, reinterpret_cast<const void*>(kernel), bytes, shape.head_dim, q.scalar_type());
      kernel<<<grid, kThreads, bytes, stream>>>(
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
          cu_seqlens_q.const_data_ptr<int32_t>(), cu_seqlens_k.const_data_ptr<int32_t>(),
          attn.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>(),
          has_out ? out.mutable_data_ptr<scalar_t>() : nullptr, res.defined() ? res.const_data_ptr<scalar_t>() : nullptr,
          g.defined() ? g.const_data_ptr<acc_t>() : nullptr, shape.total_q, shape.total_k, shape.num_heads,
          shape.num_kv_heads, static_cast<int>(shape.head_dim), ld, options.causal, static_cast<acc_t>(options.scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, attn, lse};
}

}  // namespace mmfast::cuda
