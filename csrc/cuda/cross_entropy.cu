// Cross-entropy on logits for CUDA tensors (contract: csrc/cross_entropy.h).
//
// One thread block per row. The forward reads each logit once: every thread folds its elements
// into a running (max, sum of exp) pair with one exp per element, then the block merges the pairs
// with warp shuffles. The backward needs no reduction (softmax comes back from the saved lse), so
// it is a single streaming pass that may write over the logits it reads.
//
// Loads and stores are 16 bytes wide. Rows need not start on a 16-byte boundary (odd V, sliced
// logits): each row peels the few elements before its first boundary and after its last one, so
// only the backward with input and output rows misaligned differently drops to scalar accesses.
#include "cross_entropy.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace mmfast::cuda {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kWarp = 32;
constexpr int kVecBytes = 16;

// Explicit float/double overloads: an unqualified call on a float could silently run in double.
// (The extension is built without --use_fast_math, so these are the accurate versions.)
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return static_cast<acc_t>(-INFINITY);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

// Elements before the row's first (sizeof(T) * N)-byte boundary (all of them when the row is
// shorter). Tensor data is always element-aligned, so the distance is a whole number of elements.
template <int N, typename T>
__device__ __forceinline__ int64_t peel(const T* row, int64_t vocab) {
  constexpr int64_t kBytes = sizeof(T) * N, kElem = sizeof(T);
  const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % kBytes);
  const int64_t head = misalign == 0 ? 0 : (kBytes - misalign) / kElem;
  return head < vocab ? head : vocab;
}

// f(j, x) for every column j of a row, x = row[j] as acc_t; columns are split among the block's threads.
template <int N, typename acc_t, typename scalar_t, typename F>
__device__ __forceinline__ void for_each_column(const scalar_t* row, int64_t vocab, F&& f) {
  const int64_t head = peel<N>(row, vocab);
  const int64_t packs = (vocab - head) / N;
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) f(j, static_cast<acc_t>(row[j]));
  const auto* body = reinterpret_cast<const Pack<scalar_t, N>*>(row + head);
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<scalar_t, N> v = body[p];
#pragma unroll
    for (int k = 0; k < N; ++k) f(head + p * N + k, static_cast<acc_t>(v.val[k]));
  }
  for (int64_t j = head + packs * N + threadIdx.x; j < vocab; j += blockDim.x) f(j, static_cast<acc_t>(row[j]));
}

// out[j] = f(j, in[j]) for every column j. `in` and `out` may be the same row; when they differ
// the caller guarantees they are misaligned by the same amount, so one peel serves both. Each
// element is read and then written by the same thread, so aliasing needs no synchronisation.
template <int N, typename acc_t, typename scalar_t, typename F>
__device__ __forceinline__ void map_columns(const scalar_t* in, scalar_t* out, int64_t vocab, F&& f) {
  const int64_t head = peel<N>(in, vocab);
  const int64_t packs = (vocab - head) / N;
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) out[j] = static_cast<scalar_t>(f(j, static_cast<acc_t>(in[j])));
  const auto* in_body = reinterpret_cast<const Pack<scalar_t, N>*>(in + head);
  auto* out_body = reinterpret_cast<Pack<scalar_t, N>*>(out + head);
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<scalar_t, N> v = in_body[p];
    Pack<scalar_t, N> o;
#pragma unroll
    for (int k = 0; k < N; ++k) o.val[k] = static_cast<scalar_t>(f(head + p * N + k, static_cast<acc_t>(v.val[k])));
    out_body[p] = o;
  }
  for (int64_t j = head + packs * N + threadIdx.x; j < vocab; j += blockDim.x) {
    out[j] = static_cast<scalar_t>(f(j, static_cast<acc_t>(in[j])));
  }
}

template <int N, typename scalar_t>
__device__ __forceinline__ void zero_columns(scalar_t* out, int64_t vocab) {
  const int64_t head = peel<N>(out, vocab);
  const int64_t packs = (vocab - head) / N;
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) out[j] = scalar_t(0);
  Pack<scalar_t, N> zeros;
#pragma unroll
  for (int k = 0; k < N; ++k) zeros.val[k] = scalar_t(0);
  auto* body = reinterpret_cast<Pack<scalar_t, N>*>(out + head);
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) body[p] = zeros;
  for (int64_t j = head + packs * N + threadIdx.x; j < vocab; j += blockDim.x) out[j] = scalar_t(0);
}

// Partial logsumexp of a set of values: sum_exp = sum(exp(x - max)); sum_x only with label smoothing.
template <typename acc_t>
struct RowStats {
  acc_t max;
  acc_t sum_exp;
  acc_t sum_x;
};

// Merges the set (m2, s2) into (m, s) with a single exp, exp(smaller max - larger max). The guard
// keeps an all -inf set at sum 0 instead of exp(-inf - -inf) = NaN; a NaN logit still turns the
// sum into NaN (it fails `x > m` and lands in `lo`), as torch.logsumexp would.
template <typename acc_t>
__device__ __forceinline__ void merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  const bool bigger = m2 > m;
  const acc_t hi = bigger ? m2 : m, lo = bigger ? m : m2;
  const acc_t scale = lo == neg_inf<acc_t>() ? acc_t(0) : exp_(lo - hi);
  s = bigger ? s * scale + s2 : s + s2 * scale;
  m = hi;
}

template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> warp_reduce(RowStats<acc_t> st) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const acc_t other_max = __shfl_xor_sync(0xffffffffu, st.max, offset);
    const acc_t other_sum = __shfl_xor_sync(0xffffffffu, st.sum_exp, offset);
    st.sum_x += __shfl_xor_sync(0xffffffffu, st.sum_x, offset);
    merge(st.max, st.sum_exp, other_max, other_sum);
  }
  return st;
}

// The row's totals, valid in thread 0 only. blockDim.x must be a multiple of 32 (the launcher's
// block sizes are powers of two from 32 up) and every thread of the block must call it.
template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> block_reduce(RowStats<acc_t> st) {
  __shared__ acc_t shared_max[kMaxThreads / kWarp], shared_sum[kMaxThreads / kWarp], shared_x[kMaxThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  st = warp_reduce(st);
  if (lane == 0) {
    shared_max[warp] = st.max;
    shared_sum[warp] = st.sum_exp;
    shared_x[warp] = st.sum_x;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < warps ? RowStats<acc_t>{shared_max[lane], shared_sum[lane], shared_x[lane]}
                      : RowStats<acc_t>{neg_inf<acc_t>(), acc_t(0), acc_t(0)};
    st = warp_reduce(st);
  }
  return st;
}

template <typename scalar_t, int N>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_forward_kernel(const scalar_t* __restrict__ logits, int64_t row_stride,
                                 const int64_t* __restrict__ target, at::opmath_type<scalar_t>* __restrict__ loss,
                                 at::opmath_type<scalar_t>* __restrict__ lse, int64_t vocab, int64_t ignore_index,
                                 at::opmath_type<scalar_t> eps, at::opmath_type<scalar_t> z_loss,
                                 at::opmath_type<scalar_t> softcap, at::opmath_type<scalar_t> inv_softcap) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;
  const int64_t t = target[r];
  // The same t for the whole block, so the early exit never strands a thread at block_reduce's barrier.
  if (cross_entropy_ignored(t, vocab, ignore_index)) {
    if (threadIdx.x == 0) loss[r] = lse[r] = acc_t(0);
    return;
  }
  const scalar_t* row = logits + r * row_stride;
  const bool has_softcap = softcap > 0, has_smoothing = eps > 0;
  RowStats<acc_t> st{neg_inf<acc_t>(), acc_t(0), acc_t(0)};
  for_each_column<N, acc_t>(row, vocab, [&](int64_t, acc_t x) {
    if (has_softcap) x = softcap * tanh_(x * inv_softcap);
    merge(st.max, st.sum_exp, x, acc_t(1));
    // Only with smoothing: eps * sum_x would be 0 * -inf = NaN for a row holding -inf.
    if (has_smoothing) st.sum_x += x;
  });
  st = block_reduce(st);
  if (threadIdx.x == 0) {
    const acc_t row_lse = st.max + log_(st.sum_exp);
    acc_t x_target = static_cast<acc_t>(row[t]);
    if (has_softcap) x_target = softcap * tanh_(x_target * inv_softcap);
    lse[r] = row_lse;
    loss[r] = row_lse - (acc_t(1) - eps) * x_target - eps * st.sum_x / static_cast<acc_t>(vocab) +
              z_loss * row_lse * row_lse;
  }
}

// No __restrict__ on logits / grad: they are the same memory in the in-place backward.
template <typename scalar_t, int N>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_backward_kernel(const scalar_t* logits, int64_t in_stride, scalar_t* grad, int64_t out_stride,
                                  const int64_t* __restrict__ target, const at::opmath_type<scalar_t>* __restrict__ lse,
                                  const at::opmath_type<scalar_t>* __restrict__ grad_loss, int64_t vocab,
                                  int64_t ignore_index, at::opmath_type<scalar_t> eps,
                                  at::opmath_type<scalar_t> z_loss, at::opmath_type<scalar_t> softcap,
                                  at::opmath_type<scalar_t> inv_softcap) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;
  const int64_t t = target[r];
  scalar_t* out = grad + r * out_stride;
  if (cross_entropy_ignored(t, vocab, ignore_index)) {
    zero_columns<N>(out, vocab);
    return;
  }
  const scalar_t* in = logits + r * in_stride;
  const acc_t row_lse = lse[r], g = grad_loss[r];
  // dloss/dx_j = p_j (1 + 2 z lse) - eps / V - (1 - eps) [j == t], times dx/dz = 1 - (x / softcap)^2.
  const acc_t scale = g * (acc_t(1) + acc_t(2) * z_loss * row_lse);
  const acc_t offset = g * eps / static_cast<acc_t>(vocab);
  const acc_t target_term = g * (acc_t(1) - eps);
  const bool has_softcap = softcap > 0;
  // The target column is handled inside the pass, not patched afterwards: the thread that owns
  // column t reads x_t before it writes grad_t and no other thread touches that column, so the
  // in-place case needs neither a second read of x_t nor a barrier.
  map_columns<N, acc_t>(in, out, vocab, [&](int64_t j, acc_t x) {
    if (has_softcap) x = softcap * tanh_(x * inv_softcap);
    acc_t d = exp_(x - row_lse) * scale - offset;
    if (j == t) d -= target_term;
    if (has_softcap) {
      const acc_t u = x * inv_softcap;
      d *= acc_t(1) - u * u;
    }
    return d;
  });
}

// Power of two in [32, 1024]: enough threads for one pack each when the row is short.
int threads_for(int64_t vocab, int elems_per_access) {
  const int64_t accesses = (vocab + elems_per_access - 1) / elems_per_access;
  int threads = kWarp;
  while (threads < kMaxThreads && threads < accesses) threads *= 2;
  return threads;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "the cuda backend needs CUDA tensors, got ", name, " on ", t.device());
}

unsigned int grid_for(int64_t rows) {
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "cross_entropy: at most 2^31 - 1 rows, got ", rows);
  return static_cast<unsigned int>(rows);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         const CrossEntropyOptions& opt) {
  check_cross_entropy_inputs(logits, target);
  check_cuda(logits, "logits");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const auto stat_options = logits.options().dtype(cross_entropy_stat_dtype(logits));
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor loss = at::empty({rows}, stat_options), lse = at::empty({rows}, stat_options);
  if (rows == 0) return {loss, lse};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mmfast_cross_entropy_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = kVecBytes / sizeof(scalar_t);
    cross_entropy_forward_kernel<scalar_t, kVec><<<grid_for(rows), threads_for(vocab, kVec), 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), target.const_data_ptr<int64_t>(),
        loss.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(), vocab, opt.ignore_index,
        static_cast<acc_t>(opt.label_smoothing), static_cast<acc_t>(opt.z_loss),
        static_cast<acc_t>(opt.softcap > 0 ? opt.softcap : 0.0),
        static_cast<acc_t>(opt.softcap > 0 ? 1.0 / opt.softcap : 0.0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse};
}

void cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                            const at::Tensor& grad_loss, at::Tensor& grad_logits, const CrossEntropyOptions& opt) {
  check_cross_entropy_backward(logits, target, lse, grad_loss, grad_logits);
  check_cuda(logits, "logits");
  TORCH_CHECK(lse.device() == logits.device() && grad_loss.device() == logits.device(),
              "lse and grad_loss must be on logits' device");
  TORCH_CHECK(lse.scalar_type() == cross_entropy_stat_dtype(logits), "lse must be ",
              cross_entropy_stat_dtype(logits), " for ", logits.scalar_type(), " logits, got ", lse.scalar_type());
  // Blocks write their rows concurrently: rows sharing memory (stride 0) or grad_logits overlapping
  // logits other than exactly (the in-place case) would be a data race.
  at::assert_no_internal_overlap(grad_logits);
  TORCH_CHECK(at::get_overlap_status(logits, grad_logits) != at::MemOverlapStatus::Partial,
              "grad_logits must be logits itself or not overlap it");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (rows == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mmfast_cross_entropy_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = kVecBytes / sizeof(scalar_t);
    const scalar_t* in = logits.const_data_ptr<scalar_t>();
    scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();
    // One peel per row serves both only if every input row and its output row share their offset
    // from a 16-byte boundary: same base offset and row strides differing by whole 16-byte units.
    // (Unsigned wrap-around keeps the modulo right when out < in.)
    const bool same_misalignment =
        (reinterpret_cast<uintptr_t>(in) - reinterpret_cast<uintptr_t>(out)) % kVecBytes == 0 &&
        ((logits.stride(0) - grad_logits.stride(0)) * static_cast<int64_t>(sizeof(scalar_t))) % kVecBytes == 0;
    const auto launch = [&](auto vec) {
      constexpr int N = decltype(vec)::value;
      cross_entropy_backward_kernel<scalar_t, N><<<grid_for(rows), threads_for(vocab, N), 0, stream>>>(
          in, logits.stride(0), out, grad_logits.stride(0), target.const_data_ptr<int64_t>(),
          lse.const_data_ptr<acc_t>(), grad_loss.const_data_ptr<acc_t>(), vocab, opt.ignore_index,
          static_cast<acc_t>(opt.label_smoothing), static_cast<acc_t>(opt.z_loss),
          static_cast<acc_t>(opt.softcap > 0 ? opt.softcap : 0.0),
          static_cast<acc_t>(opt.softcap > 0 ? 1.0 / opt.softcap : 0.0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (same_misalignment) {
      launch(std::integral_constant<int, kVec>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
}

}  // namespace mmfast::cuda
