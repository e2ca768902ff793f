// Cross-entropy on logits for CPU tensors, in the two layouts of csrc/cross_entropy.h. Both read the logits
// once and call exp once per element in the forward, and read and write them once, possibly in place, in
// the backward.
//
// Rows (unit stride over V): at::parallel_for over rows, at::vec along each row. A row is walked in
// L1-sized chunks; a chunk is loaded once (converted to float for bf16/fp16, soft-capped if asked), then
// reduced twice while it is hot: its max, then sum(exp(x - running max)).
//
// Token-contiguous (unit stride over N, element (r, v) at r + v * ld): at::vec across the tokens, one token
// per lane, and at::parallel_for over ranges of vocab rows, so that each thread streams through whole vocab
// rows (in panels of kPanel tokens). The forward keeps per lane a running max and sum(exp(x - max)), and
// rescales a vector's sums only when its max moves, which soon becomes rare: still about one exp per element.
// The threads' forward states merge at the end; in the backward each thread owns its vocab rows outright.
#include "cross_entropy.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace mmfast::cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 2048;
// Vocab rows whose exps the token forward sums on their own before adding them to the running sums: two
// short sums round far less than one over the whole vocabulary.
constexpr int64_t kSumRows = 64;

// Tokens per panel: the token forward's four arrays of per-token state for one panel, 16 KiB, stay in L1.
template <typename acc_t>
constexpr int64_t kPanel = 4096 / sizeof(acc_t);

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

template <typename acc_t>
acc_t softcapped(acc_t z, acc_t softcap) {
  return softcap > 0 ? softcap * std::tanh(z / softcap) : z;
}

template <typename acc_t>
void apply_softcap(const acc_t* x, int64_t n, acc_t softcap, acc_t* dst) {
  using Vec = Vectorized<acc_t>;
  const Vec cap(softcap), inv(acc_t(1) / softcap);
  at::vec::map([&](Vec v) { return cap * (v * inv).tanh(); }, dst, x, n);
}

// n consecutive logits (of a row, or of the tokens in a vocab row) as acc_t with the softcap applied: the
// logits themselves when they already are, else `buf`.
template <typename scalar_t, typename acc_t>
const acc_t* load_chunk(const scalar_t* src, int64_t n, acc_t softcap, acc_t* buf) {
  const acc_t* x;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    x = src;
  } else {
    at::vec::convert(src, buf, n);
    x = buf;
  }
  if (softcap > 0) {
    apply_softcap(x, n, softcap, buf);
    x = buf;
  }
  return x;
}

template <typename acc_t>
acc_t row_loss(acc_t lse, acc_t x_target, acc_t sum_x, int64_t vocab, const CrossEntropyOptions& opt) {
  const acc_t eps = opt.label_smoothing, z_loss = opt.z_loss;
  return lse - (1 - eps) * x_target - eps * sum_x / vocab + z_loss * lse * lse;
}

// dloss/dx_j = p_j * (1 + 2 z lse) - eps / V - (1 - eps) [j == t] with p = exp(x - lse), times grad_loss,
// times dx/dz = 1 - (x / softcap)^2: scale and offset are the row's constants of the first two terms.
template <typename acc_t>
struct RowGradient {
  acc_t lse, grad_loss, scale, offset;

  RowGradient(acc_t lse, acc_t grad_loss, int64_t vocab, const CrossEntropyOptions& opt)
      : lse(lse),
        grad_loss(grad_loss),
        scale(grad_loss * (1 + 2 * acc_t(opt.z_loss) * lse)),
        offset(grad_loss * acc_t(opt.label_smoothing) / vocab) {}

  acc_t at_target(acc_t x_target, const CrossEntropyOptions& opt) const {
    const acc_t cap = opt.softcap, u = cap > 0 ? x_target / cap : 0;
    const acc_t eps = opt.label_smoothing;
    return (std::exp(x_target - lse) * scale - offset - grad_loss * (1 - eps)) * (1 - u * u);
  }
};

// The vector form of RowGradient, for every class but the target; inv_cap is 0 without softcap.
template <typename acc_t>
Vectorized<acc_t> gradient(Vectorized<acc_t> x, Vectorized<acc_t> lse, Vectorized<acc_t> scale,
                           Vectorized<acc_t> offset, Vectorized<acc_t> inv_cap, bool capped) {
  using Vec = Vectorized<acc_t>;
  const Vec grad = (x - lse).exp_u20() * scale - offset;
  if (!capped) return grad;
  const Vec u = x * inv_cap;
  return grad * (Vec(1) - u * u);
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
  const acc_t softcap = opt.softcap;
  const bool smoothing = opt.label_smoothing > 0;

  at::parallel_for(0, rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    auto buf = std::make_unique<acc_t[]>(kChunk);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = target_ptr[r];
      if (cross_entropy_ignored(t, vocab, opt.ignore_index)) {
        loss_ptr[r] = lse_ptr[r] = 0;
        continue;
      }
      const scalar_t* row = logits_ptr + r * row_stride;
      acc_t running_max = kNegInf<acc_t>, sum_exp = 0, sum_x = 0;
      for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
        const int64_t n = std::min(kChunk, vocab - c0);
        const acc_t* x = load_chunk(row + c0, n, softcap, buf.get());
        const acc_t chunk_max =
            at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, x, n);
        if (chunk_max > running_max) {
          sum_exp *= std::exp(running_max - chunk_max);
          running_max = chunk_max;
        }
        if (running_max == kNegInf<acc_t>) continue;
        const Vec shift(running_max);
        sum_exp += at::vec::map_reduce_all<acc_t>([&](Vec v) { return (v - shift).exp_u20(); },
                                                   [](Vec a, Vec b) { return a + b; }, x, n);
        if (smoothing) sum_x += at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, x, n);
      }
      lse_ptr[r] = running_max + std::log(sum_exp);
      loss_ptr[r] = row_loss(lse_ptr[r], softcapped(static_cast<acc_t>(row[t]), softcap), sum_x, vocab, opt);
    }
  });
}

// Per token (lane): max, sum(exp(x - max)) and sum(x) over the vocab rows seen so far. The max starts at
// the lowest finite value, not -inf, so that a lane of -inf logits adds exp(-inf) = 0 and ends at lse = -inf
// without ever computing -inf - -inf.
template <typename acc_t>
struct TokenLogsumexp {
  using Vec = Vectorized<acc_t>;
  std::vector<acc_t> max, sum_exp, sum_x;

  explicit TokenLogsumexp(int64_t tokens)
      : max(round_up(tokens, Vec::size()), std::numeric_limits<acc_t>::lowest()),
        sum_exp(max.size(), 0),
        sum_x(max.size(), 0) {}

  // Vocab rows [v_begin, v_end) of all `tokens`, `ld` apart from `logits`.
  template <typename scalar_t>
  void add_rows(const scalar_t* logits, int64_t ld, int64_t tokens, int64_t v_begin, int64_t v_end, acc_t softcap,
                bool smoothing) {
    constexpr int64_t panel = kPanel<acc_t>;
    auto buf = std::make_unique<acc_t[]>(2 * panel);  // a converted vocab row, then rows_sum
    acc_t* rows_sum = buf.get() + panel;
    for (int64_t v0 = v_begin; v0 < v_end; v0 += kSumRows) {
      for (int64_t p = 0; p < tokens; p += panel) {
        const int64_t width = std::min(panel, tokens - p);
        std::fill(rows_sum, rows_sum + width, acc_t(0));
        for (int64_t v = v0; v < std::min(v0 + kSumRows, v_end); ++v) {
          add_row(load_chunk(logits + p + v * ld, width, softcap, buf.get()), p, width, smoothing, rows_sum);
        }
        for (int64_t j = 0; j < width; ++j) sum_exp[p + j] += rows_sum[j];
      }
    }
  }

  // One vocab row of lanes [p, p + width); rows_sum holds their exps since the last fold into sum_exp. The
  // last, partial vector goes through Vectorized's counted loadu, so nothing past `width` is read; the state
  // is padded to whole vectors.
  void add_row(const acc_t* x, int64_t p, int64_t width, bool smoothing, acc_t* rows_sum) {
    acc_t *max_p = &max[p], *sum_exp_p = &sum_exp[p], *sum_x_p = &sum_x[p];
    const auto add = [=](int64_t j, Vec v) {
      Vec m = Vec::loadu(max_p + j), partial = Vec::loadu(rows_sum + j);
      if ((v <= m).zero_mask() != 0) {  // some lane's max moves (or is nan): rescale its sums once
        const Vec new_max = at::vec::maximum(m, v), scale = (m - new_max).exp_u20();
        (Vec::loadu(sum_exp_p + j) * scale).store(sum_exp_p + j);
        partial = partial * scale;
        m = new_max;
        m.store(max_p + j);
      }
      (partial + (v - m).exp_u20()).store(rows_sum + j);
      if (smoothing) (Vec::loadu(sum_x_p + j) + v).store(sum_x_p + j);
    };
    int64_t j = 0;
    for (; j + Vec::size() <= width; j += Vec::size()) add(j, Vec::loadu(x + j));
    if (j < width) add(j, Vec::loadu(x + j, width - j));
  }

  void merge(const TokenLogsumexp& other) {
    for (size_t j = 0; j < max.size(); ++j) {
      const acc_t m = std::max(max[j], other.max[j]);
      sum_exp[j] = sum_exp[j] * std::exp(max[j] - m) + other.sum_exp[j] * std::exp(other.max[j] - m);
      max[j] = m;
      sum_x[j] += other.sum_x[j];
    }
  }
};

template <typename scalar_t>
void forward_tokens(const at::Tensor& logits, const at::Tensor& target, at::Tensor& loss, at::Tensor& lse,
                    const CrossEntropyOptions& opt) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = logits.size(0), vocab = logits.size(1), ld = logits.stride(1);
  const scalar_t* logits_ptr = logits.const_data_ptr<scalar_t>();
  const int64_t* target_ptr = target.const_data_ptr<int64_t>();
  acc_t* loss_ptr = loss.data_ptr<acc_t>();
  acc_t* lse_ptr = lse.data_ptr<acc_t>();
  const acc_t softcap = opt.softcap;

  // As many parts as threads when there is work for them, each a fixed range of vocab rows, so that the
  // result does not depend on which thread runs which part.
  const int64_t parts = std::clamp<int64_t>(rows * vocab / 32768, 1, at::get_num_threads());
  std::vector<TokenLogsumexp<acc_t>> states(parts, TokenLogsumexp<acc_t>(rows));
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      states[part].add_rows(logits_ptr, ld, rows, vocab * part / parts, vocab * (part + 1) / parts, softcap,
                            opt.label_smoothing > 0);
    }
  });
  TokenLogsumexp<acc_t>& state = states[0];
  for (int64_t part = 1; part < parts; ++part) state.merge(states[part]);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = target_ptr[r];
    if (cross_entropy_ignored(t, vocab, opt.ignore_index)) {
      loss_ptr[r] = lse_ptr[r] = 0;
      continue;
    }
    lse_ptr[r] = state.max[r] + std::log(state.sum_exp[r]);
    const acc_t x_target = softcapped(static_cast<acc_t>(logits_ptr[r + t * ld]), softcap);
    loss_ptr[r] = row_loss(lse_ptr[r], x_target, state.sum_x[r], vocab, opt);
  }
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
  const acc_t softcap = opt.softcap;
  const Vec inv_cap(softcap > 0 ? 1 / softcap : 0);

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
      const RowGradient<acc_t> grad(lse_ptr[r], grad_ptr[r], vocab, opt);
      // before the in-place pass overwrites the target's logit
      const acc_t target_grad = grad.at_target(softcapped(static_cast<acc_t>(row[t]), softcap), opt);
      const Vec v_lse(grad.lse), v_scale(grad.scale), v_offset(grad.offset);
      for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
        const int64_t n = std::min(kChunk, vocab - c0);
        const acc_t* x = load_chunk(row + c0, n, softcap, buf.get());
        acc_t* dst = same_type ? reinterpret_cast<acc_t*>(out + c0) : buf.get();
        at::vec::map([&](Vec v) { return gradient(v, v_lse, v_scale, v_offset, inv_cap, softcap > 0); }, dst, x, n);
        if constexpr (!same_type) at::vec::convert(buf.get(), out + c0, n);
      }
      out[t] = static_cast<scalar_t>(target_grad);
    }
  });
}

// The backward's per-token (lane) constants. `keep` has all bits set for the tokens not ignored: the other
// lanes, padding included, are masked to exact zeros even where their lse or grad_loss would give nan.
// at_target is the gradient at the target for the targets in [v_begin, v_end), taken before the pass over
// those vocab rows overwrites the target's logit in place.
template <typename acc_t>
struct TokenGradients {
  using Vec = Vectorized<acc_t>;
  std::vector<acc_t> lse, scale, offset, keep, at_target;

  template <typename scalar_t>
  TokenGradients(const scalar_t* logits, int64_t ld, int64_t tokens, const int64_t* target, const acc_t* lse_ptr,
                 const acc_t* grad_ptr, int64_t vocab, int64_t v_begin, int64_t v_end,
                 const CrossEntropyOptions& opt) {
    const int64_t padded = round_up(tokens, Vec::size());
    for (auto* lanes : {&lse, &scale, &offset, &keep, &at_target}) lanes->assign(padded, 0);
    for (int64_t j = 0; j < tokens; ++j) {
      const int64_t t = target[j];
      if (cross_entropy_ignored(t, vocab, opt.ignore_index)) continue;
      const RowGradient<acc_t> grad(lse_ptr[j], grad_ptr[j], vocab, opt);
      lse[j] = grad.lse;
      scale[j] = grad.scale;
      offset[j] = grad.offset;
      keep[j] = 1;
      if (t >= v_begin && t < v_end) {
        at_target[j] = grad.at_target(softcapped(static_cast<acc_t>(logits[j + t * ld]), acc_t(opt.softcap)), opt);
      }
    }
    for (int64_t j = 0; j < padded; j += Vec::size()) (Vec::loadu(&keep[j]) != Vec(0)).store(&keep[j]);
  }

  // The gradient of lanes [p, p + width) of one vocab row (the targets' entries aside) into `dst`. The last,
  // partial vector goes through Vectorized's counted loadu and store, so nothing past `width` is touched.
  void write(const acc_t* x, int64_t p, int64_t width, Vec inv_cap, bool capped, acc_t* dst) const {
    const acc_t *lse_p = &lse[p], *scale_p = &scale[p], *offset_p = &offset[p], *keep_p = &keep[p];
    const auto grad = [=](int64_t j, Vec v) {
      const Vec g = gradient(v, Vec::loadu(lse_p + j), Vec::loadu(scale_p + j), Vec::loadu(offset_p + j), inv_cap,
                             capped);
      return g & Vec::loadu(keep_p + j);
    };
    int64_t j = 0;
    for (; j + Vec::size() <= width; j += Vec::size()) grad(j, Vec::loadu(x + j)).store(dst + j);
    if (j < width) grad(j, Vec::loadu(x + j, width - j)).store(dst + j, width - j);
  }
};

template <typename scalar_t>
void backward_tokens(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                     const at::Tensor& grad_loss, at::Tensor& grad_logits, const CrossEntropyOptions& opt) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
  constexpr int64_t panel = kPanel<acc_t>;
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const int64_t in_ld = logits.stride(1), out_ld = grad_logits.stride(1);
  const scalar_t* logits_ptr = logits.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = grad_logits.data_ptr<scalar_t>();
  const int64_t* target_ptr = target.const_data_ptr<int64_t>();
  const acc_t softcap = opt.softcap;
  const Vec inv_cap(softcap > 0 ? 1 / softcap : 0);

  at::parallel_for(0, vocab, row_grain(rows), [&](int64_t v_begin, int64_t v_end) {
    const TokenGradients<acc_t> grads(logits_ptr, in_ld, rows, target_ptr, lse.const_data_ptr<acc_t>(),
                                      grad_loss.const_data_ptr<acc_t>(), vocab, v_begin, v_end, opt);
    auto buf = std::make_unique<acc_t[]>(panel);
    for (int64_t v = v_begin; v < v_end; ++v) {
      for (int64_t p = 0; p < rows; p += panel) {
        const int64_t width = std::min(panel, rows - p);
        const acc_t* x = load_chunk(logits_ptr + p + v * in_ld, width, softcap, buf.get());
        scalar_t* out = out_ptr + p + v * out_ld;
        // In place over the row just read, whether it lies in the logits or in `buf`.
        grads.write(x, p, width, inv_cap, softcap > 0, same_type ? reinterpret_cast<acc_t*>(out) : buf.get());
        if constexpr (!same_type) at::vec::convert(buf.get(), out, width);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = target_ptr[r];
      if (!cross_entropy_ignored(t, vocab, opt.ignore_index) && t >= v_begin && t < v_end) {
        out_ptr[r + t * out_ld] = static_cast<scalar_t>(grads.at_target[r]);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         const CrossEntropyOptions& opt) {
  check_cross_entropy_inputs(logits, target, /*token_layout_ok=*/true);
  TORCH_CHECK(logits.device().is_cpu(), "the cpu backend needs CPU tensors");
  const auto stat_options = logits.options().dtype(cross_entropy_stat_dtype(logits));
  at::Tensor loss = at::empty({logits.size(0)}, stat_options), lse = at::empty({logits.size(0)}, stat_options);
  const bool rows = cross_entropy_rows_layout(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mmfast_cross_entropy_forward", [&] {
    if (rows) {
      forward_rows<scalar_t>(logits, target, loss, lse, opt);
    } else {
      forward_tokens<scalar_t>(logits, target, loss, lse, opt);
    }
  });
  return {loss, lse};
}

void cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                            const at::Tensor& grad_loss, at::Tensor& grad_logits, const CrossEntropyOptions& opt) {
  check_cross_entropy_backward(logits, target, lse, grad_loss, grad_logits, /*token_layout_ok=*/true);
  TORCH_CHECK(logits.device().is_cpu(), "the cpu backend needs CPU tensors");
  const bool rows = cross_entropy_rows_layout(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mmfast_cross_entropy_backward", [&] {
    if (rows) {
      backward_rows<scalar_t>(logits, target, lse, grad_loss, grad_logits, opt);
    } else {
      backward_tokens<scalar_t>(logits, target, lse, grad_loss, grad_logits, opt);
    }
  });
}

}  // namespace mmfast::cpu
