// The LoRA kernels on CPU (lora_kernels.h): each rank-r product runs as one pass over its (n, K)
// operand, a row (or a block of columns) at a time, with the dropout mask applied as the row is read or
// written. So dropout(x) never exists beyond one row in cache, the mask is kept packed (a bit per
// element, drawn once in the forward), and there is no small GEMM for MKL to run slowly.
#include "../lora_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace mmfast::cpu {
namespace {

constexpr int kLanes = 8;                 // Philox blocks drawn at once
constexpr int64_t kTileColumns = 4 * kLanes;  // the columns they cover (lora_kernels.h)

// The keeps of one tile of 32 columns, one byte per block word: bit l of byte w is column 8 w + l.
#ifdef __AVX2__
// Eight blocks in the lanes of four AVX2 registers: a scalar block at a time costs several times more
// than the GEMMs this pass sits between.
void draw_tile(uint64_t seed, uint64_t row, uint64_t first_group, uint32_t threshold, uint8_t (&bytes)[4]) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first_group)), lanes);
  // The group's high word: first_group is a multiple of 8, so the eight groups share it.
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(first_group >> 32));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(row));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(row >> 32));
  const __m256i sa = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i sb = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  // mulhilo of eight 32-bit lanes: even lanes from one 64-bit product, odd lanes from another.
  const auto mulhilo = [](__m256i a, __m256i m, __m256i& hi) {
    const __m256i even = _mm256_mul_epu32(a, m);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    return _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  };
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, hi1;
    const __m256i lo0 = mulhilo(c0, sa, hi0);
    const __m256i lo1 = mulhilo(c2, sb, hi1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const __m256i bound = _mm256_set1_epi32(static_cast<int>(threshold));
  const auto keeps = [&](__m256i words) {  // unsigned words >= threshold, one bit per lane
    const __m256i kept = _mm256_cmpeq_epi32(_mm256_max_epu32(words, bound), words);
    return static_cast<uint8_t>(_mm256_movemask_ps(_mm256_castsi256_ps(kept)));
  };
  bytes[0] = keeps(c0);
  bytes[1] = keeps(c1);
  bytes[2] = keeps(c2);
  bytes[3] = keeps(c3);
}
#else
void draw_tile(uint64_t seed, uint64_t row, uint64_t first_group, uint32_t threshold, uint8_t (&bytes)[4]) {
  bytes[0] = bytes[1] = bytes[2] = bytes[3] = 0;
  for (int l = 0; l < kLanes; ++l) {
    at::Philox4_32 engine(seed, row, first_group + l);
    for (int w = 0; w < 4; ++w) bytes[w] |= static_cast<uint8_t>(engine() >= threshold) << l;
  }
}
#endif

void draw_row(int64_t seed, int64_t row, int64_t cols, uint32_t threshold, uint8_t* bits) {
  uint8_t tile[4];
  for (int64_t j0 = 0; j0 < cols; j0 += kTileColumns) {
    draw_tile(static_cast<uint64_t>(seed), static_cast<uint64_t>(row), static_cast<uint64_t>(j0 / 4), threshold, tile);
    const int64_t bytes = std::min<int64_t>(4, (cols - j0 + 7) / 8);
    std::copy(tile, tile + bytes, bits + j0 / 8);
  }
  if (cols % 8 != 0) bits[cols / 8] &= static_cast<uint8_t>((1u << (cols % 8)) - 1);  // no keeps past the row
}

// The eight keeps of each mask byte as 0/1 floats: expanding a row's keeps is then a copy per byte.
using ByteKeeps = std::array<std::array<float, 8>, 256>;

const ByteKeeps& byte_keeps() {
  static const ByteKeeps table = [] {
    ByteKeeps t{};
    for (int byte = 0; byte < 256; ++byte)
      for (int bit = 0; bit < 8; ++bit) t[byte][bit] = static_cast<float>((byte >> bit) & 1);
    return t;
  }();
  return table;
}

// keeps[j] = scale or 0, for `cols` columns from the packed bits (the first column at bit 0 of bits[0]).
template <typename acc_t>
void expand_keeps(const uint8_t* bits, int64_t cols, acc_t scale, acc_t* keeps) {
  const ByteKeeps& table = byte_keeps();
  for (int64_t j0 = 0; j0 < cols; j0 += 8) {
    const float* byte = table[bits[j0 / 8]].data();
    const int64_t n = std::min<int64_t>(8, cols - j0);
    for (int64_t t = 0; t < n; ++t) keeps[j0 + t] = static_cast<acc_t>(byte[t]) * scale;
  }
}

// The packed mask of d, drawn into on request: uint8 (rows, ceil(cols / 8)).
struct Mask {
  uint8_t* bits;
  int64_t row_bytes;
  double scale;
  int64_t seed;
  uint32_t threshold;
  bool draw;

  Mask(Dropout& dropout, int64_t rows, int64_t cols)
      : row_bytes((cols + 7) / 8),
        scale(1.0 / (1.0 - dropout.dropout_p)),
        seed(dropout.seed),
        threshold(lora_keep_threshold(dropout.dropout_p)),
        draw(dropout.draw) {
    if (draw) dropout.mask = at::empty({rows, row_bytes}, at::TensorOptions().dtype(at::kByte));
    TORCH_CHECK(dropout.mask.defined() && dropout.mask.scalar_type() == at::kByte && dropout.mask.is_contiguous() &&
                    dropout.mask.dim() == 2 && dropout.mask.size(0) == rows && dropout.mask.size(1) == row_bytes,
                "mask must be the packed mask the forward returned");
    bits = dropout.mask.mutable_data_ptr<uint8_t>();
  }
  uint8_t* row(int64_t i) const { return bits + i * row_bytes; }
};

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

template <typename acc_t>
acc_t sum_lanes(Vec<acc_t> v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return a + b; }, v);
}

// out[k] = scale * <row, mat[k]> for k < r: four rows of mat at a time share each load of `row`.
template <typename acc_t>
void dots(const acc_t* row, const acc_t* mat, int64_t rank, int64_t cols, acc_t scale, acc_t* out) {
  constexpr int64_t kWidth = Vec<acc_t>::size();
  int64_t k = 0;
  for (; k + 4 <= rank; k += 4) {
    const acc_t* m = mat + k * cols;
    Vec<acc_t> s0(0), s1(0), s2(0), s3(0);
    for (int64_t j = 0; j < cols; j += kWidth) {
      const int64_t n = std::min(kWidth, cols - j);  // a partial load fills the rest with zeros
      const auto v = Vec<acc_t>::loadu(row + j, n);
      s0 = at::vec::fmadd(v, Vec<acc_t>::loadu(m + j, n), s0);
      s1 = at::vec::fmadd(v, Vec<acc_t>::loadu(m + cols + j, n), s1);
      s2 = at::vec::fmadd(v, Vec<acc_t>::loadu(m + 2 * cols + j, n), s2);
      s3 = at::vec::fmadd(v, Vec<acc_t>::loadu(m + 3 * cols + j, n), s3);
    }
    out[k] = scale * sum_lanes(s0);
    out[k + 1] = scale * sum_lanes(s1);
    out[k + 2] = scale * sum_lanes(s2);
    out[k + 3] = scale * sum_lanes(s3);
  }
  for (; k < rank; ++k) {
    Vec<acc_t> s(0);
    for (int64_t j = 0; j < cols; j += kWidth) {
      const int64_t n = std::min(kWidth, cols - j);
      s = at::vec::fmadd(Vec<acc_t>::loadu(row + j, n), Vec<acc_t>::loadu(mat + k * cols + j, n), s);
    }
    out[k] = scale * sum_lanes(s);
  }
}

// out[j] = sum_k coeff[k] * mat[k, j]: four output vectors at a time, so four FMA chains run at once.
template <typename acc_t>
void combine(const acc_t* coeff, const acc_t* mat, int64_t rank, int64_t cols, acc_t* out) {
  constexpr int64_t kWidth = Vec<acc_t>::size();
  int64_t j = 0;
  for (; j + 4 * kWidth <= cols; j += 4 * kWidth) {
    Vec<acc_t> a0(0), a1(0), a2(0), a3(0);
    for (int64_t k = 0; k < rank; ++k) {
      const Vec<acc_t> c(coeff[k]);
      const acc_t* m = mat + k * cols + j;
      a0 = at::vec::fmadd(c, Vec<acc_t>::loadu(m), a0);
      a1 = at::vec::fmadd(c, Vec<acc_t>::loadu(m + kWidth), a1);
      a2 = at::vec::fmadd(c, Vec<acc_t>::loadu(m + 2 * kWidth), a2);
      a3 = at::vec::fmadd(c, Vec<acc_t>::loadu(m + 3 * kWidth), a3);
    }
    a0.store(out + j);
    a1.store(out + j + kWidth);
    a2.store(out + j + 2 * kWidth);
    a3.store(out + j + 3 * kWidth);
  }
  for (; j < cols; j += kWidth) {
    const int64_t n = std::min(kWidth, cols - j);
    Vec<acc_t> a(0);
    for (int64_t k = 0; k < rank; ++k) a = at::vec::fmadd(Vec<acc_t>(coeff[k]), Vec<acc_t>::loadu(mat + k * cols + j, n), a);
    a.store(out + j, n);
  }
}

at::ScalarType accumulation_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

template <typename scalar_t>
void project_impl(const at::Tensor& src, const at::Tensor& mat, double scale, const Mask& mask, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = src.size(0), cols = src.size(1), rank = mat.size(0);
  const at::Tensor matrix = mat.to(accumulation_type(src)).contiguous();  // small, and read once per row
  const acc_t* m = matrix.const_data_ptr<acc_t>();
  const scalar_t* s = src.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(cols), dot(rank);
    for (int64_t i = begin; i < end; ++i) {
      if (mask.draw) draw_row(mask.seed, i, cols, mask.threshold, mask.row(i));
      expand_keeps(mask.row(i), cols, static_cast<acc_t>(mask.scale), row.data());
      const scalar_t* in = s + i * cols;
      for (int64_t j = 0; j < cols; ++j) row[j] *= static_cast<acc_t>(in[j]);
      dots(row.data(), m, rank, cols, static_cast<acc_t>(scale), dot.data());
      for (int64_t k = 0; k < rank; ++k) o[i * rank + k] = static_cast<scalar_t>(dot[k]);
    }
  });
}

template <typename scalar_t>
void expand_add_impl(at::Tensor& dst, const at::Tensor& coeff, const at::Tensor& mat, double scale, const Mask& mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = dst.size(0), cols = dst.size(1), rank = mat.size(0), stride = dst.stride(0);
  const auto acc_type = accumulation_type(dst);
  const at::Tensor matrix = mat.to(acc_type).contiguous();
  const at::Tensor coefficients = coeff.to(acc_type).mul(scale).contiguous();
  const acc_t* m = matrix.const_data_ptr<acc_t>();
  const acc_t* c = coefficients.const_data_ptr<acc_t>();
  scalar_t* d = dst.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(cols), keeps(cols);
    for (int64_t i = begin; i < end; ++i) {
      combine(c + i * rank, m, rank, cols, row.data());
      expand_keeps(mask.row(i), cols, static_cast<acc_t>(mask.scale), keeps.data());
      scalar_t* out = d + i * stride;
      for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<scalar_t>(static_cast<acc_t>(out[j]) + row[j] * keeps[j]);
    }
  });
}

// Columns per block of outer_sum: each thread owns whole blocks of the (r, K) result, so no two
// threads add into one element, and a block's sums stay in cache while every row of src streams by.
constexpr int64_t kOuterColumns = 256;
constexpr int64_t kOuterRows = 4;  // rows folded into the sums per load and store of them

template <typename scalar_t>
void outer_sum_impl(const at::Tensor& coeff, const at::Tensor& src, double scale, const Mask& mask, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kWidth = Vec<acc_t>::size();
  const int64_t rows = src.size(0), cols = src.size(1), rank = coeff.size(1);
  const at::Tensor coefficients = coeff.to(out.scalar_type()).mul(scale).contiguous();
  const acc_t* c = coefficients.const_data_ptr<acc_t>();
  const scalar_t* s = src.const_data_ptr<scalar_t>();
  acc_t* o = out.mutable_data_ptr<acc_t>();
  const int64_t blocks = (cols + kOuterColumns - 1) / kOuterColumns;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // kOuterRows dropped row segments; rows past the end are zeros with weight zero.
    std::vector<acc_t> segments(kOuterRows * kOuterColumns), sums(rank * kOuterColumns);
    std::vector<acc_t> weights(kOuterRows * rank);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t j0 = block * kOuterColumns, width = std::min(kOuterColumns, cols - j0);
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t i0 = 0; i0 < rows; i0 += kOuterRows) {
        std::fill(weights.begin(), weights.end(), acc_t(0));
        for (int64_t q = 0; q < kOuterRows; ++q) {
          acc_t* segment = segments.data() + q * kOuterColumns;
          if (i0 + q >= rows) {
            std::fill(segment, segment + kOuterColumns, acc_t(0));
            continue;
          }
          expand_keeps(mask.row(i0 + q) + j0 / 8, width, static_cast<acc_t>(mask.scale), segment);
          const scalar_t* in = s + (i0 + q) * cols + j0;
          for (int64_t j = 0; j < width; ++j) segment[j] *= static_cast<acc_t>(in[j]);
          std::copy_n(c + (i0 + q) * rank, rank, weights.data() + q * rank);
        }
        const acc_t* seg = segments.data();
        for (int64_t k = 0; k < rank; ++k) {
          const Vec<acc_t> w0(weights[k]), w1(weights[rank + k]), w2(weights[2 * rank + k]), w3(weights[3 * rank + k]);
          acc_t* sum = sums.data() + k * kOuterColumns;
          for (int64_t j = 0; j < width; j += kWidth) {
            const int64_t n = std::min(kWidth, width - j);
            auto acc = Vec<acc_t>::loadu(sum + j, n);
            acc = at::vec::fmadd(w0, Vec<acc_t>::loadu(seg + j, n), acc);
            acc = at::vec::fmadd(w1, Vec<acc_t>::loadu(seg + kOuterColumns + j, n), acc);
            acc = at::vec::fmadd(w2, Vec<acc_t>::loadu(seg + 2 * kOuterColumns + j, n), acc);
            acc = at::vec::fmadd(w3, Vec<acc_t>::loadu(seg + 3 * kOuterColumns + j, n), acc);
            acc.store(sum + j, n);
          }
        }
      }
      for (int64_t k = 0; k < rank; ++k) std::copy_n(sums.data() + k * kOuterColumns, width, o + k * cols + j0);
    }
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1, name, " must be a CPU (n, K) tensor with unit stride along K");
}

}  // namespace

at::Tensor project(const at::Tensor& src, const at::Tensor& mat, double scale, Dropout& dropout) {
  const at::Tensor rows = src.contiguous();
  check_rows(rows, "src");
  TORCH_CHECK(mat.dim() == 2 && mat.size(1) == src.size(1), "mat must be (r, K)");
  const Mask mask(dropout, src.size(0), src.size(1));
  at::Tensor out = at::empty({src.size(0), mat.size(0)}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "lora_project",
                                  [&] { project_impl<scalar_t>(rows, mat, scale, mask, out); });
  return out;
}

void expand_add(at::Tensor& dst, const at::Tensor& coeff, const at::Tensor& mat, double scale, Dropout& dropout) {
  check_rows(dst, "dst");
  TORCH_CHECK(coeff.dim() == 2 && coeff.size(0) == dst.size(0) && mat.dim() == 2 && coeff.size(1) == mat.size(0) &&
                  mat.size(1) == dst.size(1),
              "coeff must be (n, r) and mat (r, K) for dst (n, K)");
  const Mask mask(dropout, dst.size(0), dst.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dst.scalar_type(), "lora_expand_add",
                                  [&] { expand_add_impl<scalar_t>(dst, coeff, mat, scale, mask); });
}

at::Tensor outer_sum(const at::Tensor& coeff, const at::Tensor& src, double scale, Dropout& dropout) {
  const at::Tensor rows = src.contiguous();
  check_rows(rows, "src");
  TORCH_CHECK(coeff.dim() == 2 && coeff.size(0) == src.size(0), "coeff must be (n, r) for src (n, K)");
  const Mask mask(dropout, src.size(0), src.size(1));
  at::Tensor out = at::empty({coeff.size(1), src.size(1)}, src.options().dtype(accumulation_type(src)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "lora_outer_sum",
                                  [&] { outer_sum_impl<scalar_t>(coeff, rows, scale, mask, out); });
  return out.to(src.scalar_type());
}

}  // namespace mmfast::cpu
