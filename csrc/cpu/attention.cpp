// Cross-modal attention on CPU tensors (contract: csrc/attention.h).
//
// Work runs over the real lengths only: a task is one sample's block of query rows for one head (forward), or
// one sample's key/value head with every query head of its group (backward, so that dK and dV have a single
// writer and no atomics are needed). Inside a task, blocks of keys are visited with an online softmax and the
// products go through BLAS (MKL's sgemm/dgemm, which torch's CPU build exports) on tiles that stay in cache;
// exp and the row reductions use at::vec. Tasks differ in size by the product of their lengths, so they are
// dealt to the threads longest first (LPT), not in index order.
//
// float32 and float64 run natively; bfloat16 and float16 run on float32 copies (this is the precision their
// sums need anyway, and BLAS has no fast half-precision path on CPUs without AVX512-BF16/AMX).
#include "../attention.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

extern "C" {
// Fortran BLAS as exported by torch's CPU library (MKL); weak, so that a torch without them still loads and
// the tiles then go through ATen.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace mmfast::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;

// Tiles of 128 query rows by 128 keys (a 64 KiB float score tile, resident in L2): measured on the ragged
// benchmark batch against 32-128 x 64-512, the fastest forward and backward, by 5-10 %.
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 128;

// Row-major C (m x n, ldc) = alpha * op(A) @ op(B) + beta * C, with op(A) m x k and op(B) k x n; A is stored
// k x m when trans_a, B is stored n x k when trans_b.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  auto blas = [] {
    if constexpr (std::is_same_v<T, float>) return sgemm_; else return dgemm_;
  }();
  if (blas != nullptr && k > 0) {
    // Column-major BLAS sees the row-major matrices transposed: C^T = op(B)^T @ op(A)^T.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int mi = n, ni = m, ki = k, la = ldb, lb = lda, lc = ldc;
    blas(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    auto t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  auto out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  auto product = at::mm(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b));
  if (beta == T(0)) {
    out.copy_(product.mul_(alpha));
  } else {
    out.mul_(beta).add_(product, alpha);
  }
}

// Keys [0, limit) are allowed for query row i of a sample with lq rows and lk keys.
int64_t key_limit(int64_t i, int64_t lq, int64_t lk, bool causal) {
  return causal ? std::clamp<int64_t>(i + lk - lq + 1, 0, lk) : lk;
}

// Deals tasks of the given costs to the threads, longest first onto the least loaded, and runs
// fn(task) for each; every thread runs its own list in order.
template <typename Fn>
void run_balanced(const std::vector<double>& costs, const Fn& fn) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), costs.size()));
  std::vector<int64_t> order(costs.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return costs[a] > costs[b]; });
  std::vector<std::vector<int64_t>> lists(threads);
  std::vector<double> load(threads, 0.0);
  for (int64_t task : order) {
    const auto least = std::min_element(load.begin(), load.end()) - load.begin();
    lists[least].push_back(task);
    load[least] += costs[task] + 1.0;
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t task : lists[t]) fn(task);
  });
}

template <typename T>
T row_max(const T* x, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n >= Vec::size())
      return at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
  }
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x[j] = exp(x[j] - shift); returns the sum. float uses at::vec's exp_u20 (as torch's own CPU flash attention):
// a softmax needs no last-ulp exp, and the exponential is the one non-GEMM cost per score.
template <typename T>
T exp_shifted(T* x, int64_t n, T shift) {
  int64_t j = 0;
  T sum = 0;
  if constexpr (std::is_same_v<T, float>) {
    Vec total(0.0f), s(shift);
    for (; j + Vec::size() <= n; j += Vec::size()) {
      Vec e = (Vec::loadu(x + j) - s).exp_u20();
      e.store(x + j);
      total = total + e;
    }
    sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, total);
  }
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

// ds = p * (ds - delta) * scale: the score gradient from the probability gradient, in place.
template <typename T>
void softmax_grad(const T* p, T* ds, int64_t n, T delta, T scale) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    const Vec d(delta), c(scale);
    for (; j + Vec::size() <= n; j += Vec::size())
      (Vec::loadu(p + j) * (Vec::loadu(ds + j) - d) * c).store(ds + j);
  }
  for (; j < n; ++j) ds[j] = p[j] * (ds[j] - delta) * scale;
}

template <typename T>
void scale_row(T* x, int64_t n, T factor) {
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

struct Lengths {
  std::vector<int64_t> q_start, q_len, k_start, k_len;
};

Lengths lengths(const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k) {
  auto cq = cu_seqlens_q.to(at::kLong).contiguous(), ck = cu_seqlens_k.to(at::kLong).contiguous();
  const int64_t batch = cq.numel() - 1;
  Lengths l;
  for (int64_t b = 0; b < batch; ++b) {
    l.q_start.push_back(cq.data_ptr<int64_t>()[b]);
    l.q_len.push_back(cq.data_ptr<int64_t>()[b + 1] - l.q_start.back());
    l.k_start.push_back(ck.data_ptr<int64_t>()[b]);
    l.k_len.push_back(ck.data_ptr<int64_t>()[b + 1] - l.k_start.back());
  }
  return l;
}

struct Task {
  int64_t sample, head, row0;
};

// Sizes and pointers of one call, in the compute type T (inputs converted before, outputs after).
template <typename T>
struct Problem {
  const T *q, *k, *v;
  int64_t total_q, heads_q, heads_k, dim;
  bool causal;
  T scale;
  const T* gate;  // (heads_q,) or null
  int64_t group() const { return heads_q / heads_k; }
  int64_t ldq() const { return heads_q * dim; }
  int64_t ldk() const { return heads_k * dim; }
};

// Every row of attn and (when out is not null) out = residual + g * attn (residual null: 0); lse for the rows
// that have keys, the others keep the -inf they were allocated with.
template <typename T>
void forward_kernel(const Problem<T>& p, const Lengths& len, T* attn, T* lse, const T* residual, T* out) {
  const int64_t dim = p.dim, ldq = p.ldq(), ldk = p.ldk();
  std::vector<Task> tasks;
  std::vector<double> costs;
  for (int64_t b = 0; b < static_cast<int64_t>(len.q_len.size()); ++b)
    for (int64_t h = 0; h < p.heads_q; ++h)
      for (int64_t r = 0; r < len.q_len[b]; r += kBlockQ) {
        const int64_t rows = std::min(kBlockQ, len.q_len[b] - r);
        const int64_t keys = key_limit(r + rows - 1, len.q_len[b], len.k_len[b], p.causal);
        tasks.push_back({b, h, r});
        costs.push_back(static_cast<double>(rows) * (keys + 1));
      }
  const T neg_inf = -std::numeric_limits<T>::infinity();
  run_balanced(costs, [&](int64_t index) {
    const auto [b, h, r0] = tasks[index];
    const int64_t lq = len.q_len[b], lk = len.k_len[b], rows = std::min(kBlockQ, lq - r0);
    const int64_t keys = key_limit(r0 + rows - 1, lq, lk, p.causal);
    const T* q_tile = p.q + (len.q_start[b] + r0) * ldq + h * dim;
    const T* k_head = p.k + len.k_start[b] * ldk + (h / p.group()) * dim;
    const T* v_head = p.v + len.k_start[b] * ldk + (h / p.group()) * dim;
    std::vector<T> scores(kBlockQ * kBlockK), acc(kBlockQ * dim, T(0)), running_max(kBlockQ, neg_inf),
        running_sum(kBlockQ, T(0));
    for (int64_t n0 = 0; n0 < keys; n0 += kBlockK) {
      const int64_t cols = std::min(kBlockK, keys - n0);
      gemm<T>(false, true, rows, cols, dim, p.scale, q_tile, ldq, k_head + n0 * ldk, ldk, T(0), scores.data(), cols);
      for (int64_t i = 0; i < rows; ++i) {
        T* s = scores.data() + i * cols;
        const int64_t allowed = std::clamp<int64_t>(key_limit(r0 + i, lq, lk, p.causal) - n0, 0, cols);
        std::fill(s + allowed, s + cols, T(0));  // masked keys weigh nothing in the product below
        if (allowed == 0) continue;
        const T m = std::max(running_max[i], row_max(s, allowed));
        const T correction = std::exp(running_max[i] - m);  // 0 on the row's first keys: exp(-inf)
        running_sum[i] = running_sum[i] * correction + exp_shifted(s, allowed, m);
        running_max[i] = m;
        scale_row(acc.data() + i * dim, dim, correction);
      }
      gemm<T>(false, false, rows, dim, cols, T(1), scores.data(), cols, v_head + n0 * ldk, ldk, T(1), acc.data(), dim);
    }
    const T g = p.gate != nullptr ? std::tanh(p.gate[h]) : T(1);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t t = len.q_start[b] + r0 + i, offset = t * ldq + h * dim;
      T* a = attn + offset;
      const T inv = running_sum[i] > 0 ? T(1) / running_sum[i] : T(0);  // no allowed key: exactly zero attention
      for (int64_t d = 0; d < dim; ++d) a[d] = acc[i * dim + d] * inv;
      if (running_sum[i] > 0) lse[h * p.total_q + t] = running_max[i] + std::log(running_sum[i]);
      if (out != nullptr) {
        T* o = out + offset;
        for (int64_t d = 0; d < dim; ++d) o[d] = (residual != nullptr ? residual[offset + d] : T(0)) + g * a[d];
      }
    }
  });
}

// Every row of grad_q, grad_k and grad_v, and per (sample, query head) sums of rowsum(grad_out * attn) for the
// gate's gradient (zero-filled by the caller).
template <typename T>
void backward_kernel(const Problem<T>& p, const Lengths& len, const T* grad_out, const T* attn, const T* lse,
                     T* grad_q, T* grad_k, T* grad_v, T* gate_sums) {
  const int64_t dim = p.dim, ldq = p.ldq(), ldk = p.ldk(), group = p.group();
  const int64_t batch = len.q_len.size();
  std::vector<Task> tasks;
  std::vector<double> costs;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t hk = 0; hk < p.heads_k; ++hk)
      if (len.q_len[b] > 0 || len.k_len[b] > 0) {
        tasks.push_back({b, hk, 0});
        costs.push_back(static_cast<double>(group) * (len.q_len[b] + 1) * (len.k_len[b] + 1));
      }
  run_balanced(costs, [&](int64_t index) {
    const int64_t b = tasks[index].sample, hk = tasks[index].head;
    const int64_t lq = len.q_len[b], lk = len.k_len[b];
    const T* k_head = p.k + len.k_start[b] * ldk + hk * dim;
    const T* v_head = p.v + len.k_start[b] * ldk + hk * dim;
    std::vector<T> dk(lk * dim, T(0)), dv(lk * dim, T(0)), dq(kBlockQ * dim), d_out(kBlockQ * dim), delta(kBlockQ),
        probs(kBlockQ * kBlockK), d_scores(kBlockQ * kBlockK);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      const T g = p.gate != nullptr ? std::tanh(p.gate[h]) : T(1);
      T gate_sum = 0;
      for (int64_t r0 = 0; r0 < lq; r0 += kBlockQ) {
        const int64_t rows = std::min(kBlockQ, lq - r0), t0 = len.q_start[b] + r0;
        const int64_t keys = key_limit(r0 + rows - 1, lq, lk, p.causal);
        const T* q_tile = p.q + t0 * ldq + h * dim;
        for (int64_t i = 0; i < rows; ++i) {
          const T* go = grad_out + (t0 + i) * ldq + h * dim;
          const T raw = dot(go, attn + (t0 + i) * ldq + h * dim, dim);
          gate_sum += raw;
          delta[i] = g * raw;
          for (int64_t d = 0; d < dim; ++d) d_out[i * dim + d] = g * go[d];
        }
        std::fill(dq.begin(), dq.end(), T(0));
        for (int64_t n0 = 0; n0 < keys; n0 += kBlockK) {
          const int64_t cols = std::min(kBlockK, keys - n0);
          const T* k_tile = k_head + n0 * ldk;
          const T* v_tile = v_head + n0 * ldk;
          gemm<T>(false, true, rows, cols, dim, p.scale, q_tile, ldq, k_tile, ldk, T(0), probs.data(), cols);
          gemm<T>(false, true, rows, cols, dim, T(1), d_out.data(), dim, v_tile, ldk, T(0), d_scores.data(), cols);
          for (int64_t i = 0; i < rows; ++i) {
            T* s = probs.data() + i * cols;
            T* ds = d_scores.data() + i * cols;
            const T row_lse = lse[h * p.total_q + t0 + i];
            const int64_t allowed = std::clamp<int64_t>(key_limit(r0 + i, lq, lk, p.causal) - n0, 0, cols);
            if (allowed == 0 || std::isinf(row_lse)) {
              std::fill(s, s + cols, T(0));
              std::fill(ds, ds + cols, T(0));
              continue;
            }
            exp_shifted(s, allowed, row_lse);
            std::fill(s + allowed, s + cols, T(0));
            softmax_grad(s, ds, cols, delta[i], p.scale);
          }
          gemm<T>(true, false, cols, dim, rows, T(1), probs.data(), cols, d_out.data(), dim, T(1), dv.data() + n0 * dim,
                  dim);
          gemm<T>(false, false, rows, dim, cols, T(1), d_scores.data(), cols, k_tile, ldk, T(1), dq.data(), dim);
          gemm<T>(true, false, cols, dim, rows, T(1), d_scores.data(), cols, q_tile, ldq, T(1), dk.data() + n0 * dim,
                  dim);
        }
        for (int64_t i = 0; i < rows; ++i)
          std::copy_n(dq.data() + i * dim, dim, grad_q + (t0 + i) * ldq + h * dim);
      }
      gate_sums[b * p.heads_q + h] = gate_sum;
    }
    for (int64_t j = 0; j < lk; ++j) {
      std::copy_n(dk.data() + j * dim, dim, grad_k + (len.k_start[b] + j) * ldk + hk * dim);
      std::copy_n(dv.data() + j * dim, dim, grad_v + (len.k_start[b] + j) * ldk + hk * dim);
    }
  });
}

// float64 runs in double, everything else in float.
at::ScalarType compute_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor to_compute(const at::Tensor& t, at::ScalarType type) {
  return t.defined() ? t.to(type).contiguous() : t;
}

template <typename T>
Problem<T> problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& gate,
                   const AttentionOptions& options) {
  return {q.data_ptr<T>(), k.data_ptr<T>(),  v.data_ptr<T>(), q.size(0), q.size(1), k.size(1), q.size(2),
          options.causal,  static_cast<T>(options.scale), gate.defined() ? gate.data_ptr<T>() : nullptr};
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "cross_modal_attention: expected q, k, v of shape (T, H, D)");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(2) == k.size(2), "cross_modal_attention: q, k, v shapes disagree");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "cross_modal_attention: Hq must be a multiple of Hk");
}

}  // namespace

AttentionForwardResult cross_modal_attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                     const at::Tensor& cu_seqlens_k, const AttentionOptions& options,
                                                     const at::Tensor& gate_in, const at::Tensor& residual) {
  check(q_in, k_in, v_in);
  const auto type = compute_type(q_in);
  auto q = to_compute(q_in, type), k = to_compute(k_in, type), v = to_compute(v_in, type);
  auto gate = to_compute(gate_in, type);
  auto attn = at::empty_like(q);
  auto lse = at::full({q.size(1), q.size(0)}, -std::numeric_limits<double>::infinity(), q.options());
  at::Tensor out;
  const auto residual_t = to_compute(residual, type);
  if (gate.defined() || residual.defined()) out = at::empty_like(q);
  const auto len = lengths(cu_seqlens_q, cu_seqlens_k);
  AT_DISPATCH_FLOATING_TYPES(type, "cross_modal_attention_forward", [&] {
    forward_kernel<scalar_t>(problem<scalar_t>(q, k, v, gate, options), len, attn.data_ptr<scalar_t>(),
                             lse.data_ptr<scalar_t>(), residual_t.defined() ? residual_t.data_ptr<scalar_t>() : nullptr,
                             out.defined() ? out.data_ptr<scalar_t>() : nullptr);
  });
  const auto dtype = q_in.scalar_type();
  return {out.defined() ? out.to(dtype) : out, attn.to(dtype), type == at::kDouble ? lse : lse.to(at::kFloat)};
}

AttentionBackwardResult cross_modal_attention_backward(const at::Tensor& grad_out_in, const at::Tensor& q_in,
                                                       const at::Tensor& k_in, const at::Tensor& v_in,
                                                       const at::Tensor& attn_in, const at::Tensor& lse_in,
                                                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                       const AttentionOptions& options, const at::Tensor& gate_in) {
  check(q_in, k_in, v_in);
  const auto type = compute_type(q_in);
  auto q = to_compute(q_in, type), k = to_compute(k_in, type), v = to_compute(v_in, type);
  auto grad_out = to_compute(grad_out_in, type), attn = to_compute(attn_in, type), lse = to_compute(lse_in, type);
  auto gate = to_compute(gate_in, type);
  auto grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  const auto len = lengths(cu_seqlens_q, cu_seqlens_k);
  auto gate_sums = at::zeros({static_cast<int64_t>(len.q_len.size()), q.size(1)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(type, "cross_modal_attention_backward", [&] {
    backward_kernel<scalar_t>(problem<scalar_t>(q, k, v, gate, options), len, grad_out.data_ptr<scalar_t>(),
                              attn.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), grad_q.data_ptr<scalar_t>(),
                              grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(), gate_sums.data_ptr<scalar_t>());
  });
  at::Tensor grad_gate;
  if (gate.defined()) {
    auto g = at::tanh(gate);
    grad_gate = ((1 - g * g) * gate_sums.sum(0)).to(gate_in.scalar_type());
  }
  const auto dtype = q_in.scalar_type();
  return {grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), grad_gate};
}

}  // namespace mmfast::cpu
