// Cross-entropy on logits for CPU tensors: at::vec over the vocabulary, at::parallel_for over rows.
//
// Each row is walked in L1-sized chunks. A chunk is loaded once (converted to float for bf16/fp16,
// soft-capped if asked), then reduced twice while it is hot: its max, then sum(exp(x - running max)).
// So the forward reads the logits once and calls exp once per element, and the backward reads
// and writes them once, possibly in place.
#include "cross_entropy.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

namespace mmfast::cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 2048;

template <typename acc_t>
acc_t softcapped(acc_t z, acc_t softcap) {
  return softcap > 0 ? softcap * std::tanh(z / softcap) : z;
}

// logits[0, n) of one row as acc_t with the softcap applied: the row itself when it already is, else `buf`.
template <typename scalar_t, typename acc_t>
const acc_t* load_chunk(const scalar_t* src, int64_t n, acc_t softcap, acc_t* buf) {
  using Vec = Vectorized<acc_t>;
  const acc_t* x;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    x = src;
  } else {
    at::vec::convert(src, buf, n);
    x = buf;
  }
  if (softcap > 0) {
    const Vec cap(softcap), inv(acc_t(1) / softcap);
    at::vec::map([&](Vec v) { return cap * (v * inv).tanh(); }, buf, x, n);
    x = buf;
  }
  return x;
}


int64_t row_grain(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

template <typename scalar_t>
void forward_rows(const at::Tensor& logits, const at::Tensor& target, at::Tensor& loss, at::Tensor& lse,
                  const CrossEntropyOptions& opt) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t rows = logits.size(0), vocab = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* logits_ptr = logits.const_data_ptr<scalar_t>();
  const int64_t* target_ptr = target.const_data_ptr<int64_t>();
  acc_t* loss_ptr = loss.data_ptr<acc_t>();
  acc_t* lse_ptr = lse.data_ptr<acc_t>();
  const acc_t eps = opt.label_smoothing, z_loss = opt.z_loss, softcap = opt.softcap;

  at::parallel_for(0, rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    auto buf = std::make_unique<acc_t[]>(kChunk);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = target_ptr[r];
      if (cross_entropy_ignored(t, vocab, opt.ignore_index)) {
        loss_ptr[r] = lse_ptr[r] = 0;
        continue;
      }
      const scalar_t* row = logits_ptr + r * row_stride;
      acc_t running_max = -std::numeric_limits<acc_t>::infinity(), sum_exp = 0, sum_x = 0;
      for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
        const int64_t n = std::min(kChunk, vocab - c0);
        const acc_t* x = load_chunk(row + c0, n, softcap, buf.get());
        const acc_t chunk_max =
            at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, x, n);
        if (chunk_max > running_max) {
          sum_exp *= std::exp(running_max - chunk_max);
          running_max = chunk_max;
        }
        if (running_max == -std::numeric_limits<acc_t>::infinity()) continue;
        const Vec shift(running_max);
        sum_exp += at::vec::map_reduce_all<acc_t>([&](Vec v) { return (v - shift).exp_u20(); },
                                                   [](Vec a, Vec b) { return a + b; }, x, n);
        if (eps > 0) sum_x += at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, x, n);
      }
      const acc_t row_lse = running_max + std::log(sum_exp);
      const acc_t x_target = softcapped(static_cast<acc_t>(row[t]), softcap);
      lse_ptr[r] = row_lse;
      loss_ptr[r] = row_lse - (1 - eps) * x_target - eps * sum_x / vocab + z_loss * row_lse * row_lse;
    }
  });
}

template <typename scalar_t>
void backward_rows(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                   const at::Tensor& grad_loss, at::Tensor& grad_logits, const CrossEntropyOptions& opt) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const int64_t in_stride = logits.stride(0), out_stride = grad_logits.stride(0);
  const scalar_t* logits_ptr = logits.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = grad_logits.data_ptr<scalar_t>();
  const int64_t* target_ptr = target.const_data_ptr<int64_t>();
  const acc_t* lse_ptr = lse.const_data_ptr<acc_t>();
  const acc_t* grad_ptr = grad_loss.const_data_ptr<acc_t>();
  const acc_t eps = opt.label_smoothing, z_loss = opt.z_loss, softcap = opt.softcap;

  at::parallel_for(0, rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    auto buf = std::make_unique<acc_t[]>(kChunk);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* out = out_ptr + r * out_stride;
      const int64_t t = target_ptr[r];
      if (cross_entropy_ignored(t, vocab, opt.ignore_index)) {
        std::fill(out, out + vocab, scalar_t(0));
        continue;
      }
      const scalar_t* row = logits_ptr + r * in_stride;
      const acc_t row_lse = lse_ptr[r], g = grad_ptr[r];
      // dloss/dx_j = p_j * (1 + 2 z lse) - eps / V - (1 - eps) [j == t], times dx/dz = 1 - (x / softcap)^2.
      const acc_t scale = g * (1 + 2 * z_loss * row_lse), offset = g * eps / vocab;
      const acc_t x_target = softcapped(static_cast<acc_t>(row[t]), softcap);  // read before an in-place write
      const Vec v_lse(row_lse), v_scale(scale), v_offset(offset), v_inv_cap(softcap > 0 ? 1 / softcap : 0);
      for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
        const int64_t n = std::min(kChunk, vocab - c0);
        const acc_t* x = load_chunk(row + c0, n, softcap, buf.get());
        acc_t* dst = same_type ? reinterpret_cast<acc_t*>(out + c0) : buf.get();
        if (softcap > 0) {
          at::vec::map(
              [&](Vec v) {
                const Vec u = v * v_inv_cap;
                return ((v - v_lse).exp_u20() * v_scale - v_offset) * (Vec(1) - u * u);
              },
              dst, x, n);
        } else {
          at::vec::map([&](Vec v) { return (v - v_lse).exp_u20() * v_scale - v_offset; }, dst, x, n);
        }
        if constexpr (!same_type) at::vec::convert(buf.get(), out + c0, n);
      }
      const acc_t cap_grad = softcap > 0 ? 1 - (x_target / softcap) * (x_target / softcap) : 1;
      out[t] = static_cast<scalar_t>((std::exp(x_target - row_lse) * scale - offset - g * (1 - eps)) * cap_grad);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         const CrossEntropyOptions& opt) {
  check_cross_entropy_inputs(logits, target);
  TORCH_CHECK(logits.device().is_cpu(), "the cpu backend needs CPU tensors");
  const auto stat_options = logits.options().dtype(cross_entropy_stat_dtype(logits));
  at::Tensor loss = at::empty({logits.size(0)}, stat_options), lse = at::empty({logits.size(0)}, stat_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mmfast_cross_entropy_forward",
                                  [&] { forward_rows<scalar_t>(logits, target, loss, lse, opt); });
  return {loss, lse};
}

void cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                            const at::Tensor& grad_loss, at::Tensor& grad_logits, const CrossEntropyOptions& opt) {
  check_cross_entropy_backward(logits, target, lse, grad_loss, grad_logits);
  TORCH_CHECK(logits.device().is_cpu(), "the cpu backend needs CPU tensors");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "mmfast_cross_entropy_backward",
      [&] { backward_rows<scalar_t>(logits, target, lse, grad_loss, grad_logits, opt); });
}

}  // namespace mmfast::cpu
