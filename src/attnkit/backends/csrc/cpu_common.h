// Helpers shared by the CPU forward and backward kernels: row-major sgemm (MKL, as torch's own
// CPU attention uses), the partial-tile bitmap, and the two vectorised row passes of softmax.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

// MKL's mkl_set_num_threads_local in C (mkl_service.h's name for it; the lower-case symbol is
// the Fortran one, taking a pointer). torch links MKL in statically where it uses it; weak, so
// builds on another BLAS still load.
extern "C" int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));

// MKL's bfloat16 GEMM with float32 output (CBLAS layout and transpose codes). On CPUs with
// AMX it runs on the tile units, ~3x sgemm's speed on the kernels' tiles; weak, as above.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k,
                                       float alpha, const uint16_t* a, int lda,
                                       const uint16_t* b, int ldb, float beta, float* c,
                                       int ldc) __attribute__((weak));

namespace attnkit_cpu {

// While alive, MKL runs this thread's sgemm calls on one thread. The kernels' own threads
// share out the tiles; left to itself MKL chose its code path, and with it the order it sums
// in, by how many threads it could use (the team's size: on AVX-512 machines this gave
// last-bit differences by torch.get_num_threads(), even under deterministic algorithms).
// Restores the thread's previous setting: the caller's thread is in the team.
class OneBlasThread {
 public:
  OneBlasThread() : prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int prev_;
};


constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int8_t kEmpty = 0, kPartial = 1;

// sgemm on row-major data: C[m×n] (ldc) = alpha·op(A)·op(B) + beta·C, op = transpose or not.
inline void gemm_rowmajor(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                          const float* a, int lda, const float* b, int ldb, float beta, float* c,
                          int ldc) {
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap operands, keep flags.
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  sgemm_(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// Whether this torch links a bfloat16 GEMM (MKL's): the kernels' bf16_gemm path needs it.
inline bool has_gemm_bf16() { return cblas_gemm_bf16bf16f32 != nullptr; }

// gemm_rowmajor with bfloat16 A and B: products exact in float32, sums in float32.
inline void gemm_bf16_rowmajor(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                               const at::BFloat16* a, int lda, const at::BFloat16* b, int ldb,
                               float beta, float* c, int ldc) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  cblas_gemm_bf16bf16f32(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m,
                         n, k, alpha, reinterpret_cast<const uint16_t*>(a), lda,
                         reinterpret_cast<const uint16_t*>(b), ldb, beta, c, ldc);
}

// float32 -> bfloat16 bits, rounded to nearest even, NaN kept NaN; written with integer ops
// and a select so that row loops vectorise (c10's conversion branches on NaN: scalar loops).
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
}

inline float bf16_value(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// x as the sum of two bfloat16 numbers, hi + lo, within ~2^-16 of x (relative): a float32
// operand (probabilities, dS) of a bfloat16 GEMM goes in as two GEMMs, hi's and lo's, and the
// result keeps float32-like accuracy where rounding x to bfloat16 alone would lose 8 bits.
inline void split_bf16(const float* x, int64_t n, at::BFloat16* hi, at::BFloat16* lo) {
  uint16_t* h = reinterpret_cast<uint16_t*>(hi);
  uint16_t* l = reinterpret_cast<uint16_t*>(lo);
  int64_t i = 0;
#if defined(__AVX512BF16__) && !defined(ATTNKIT_PORTABLE_SIMD)  // every CPU with AMX has it
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m256i hv = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
    const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hv), 16));
    const __m256i lv = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + i), hv);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(l + i), lv);
  }
#endif
#pragma omp simd
  for (int64_t j = i; j < n; ++j) {  // the tail (all, without AVX512-BF16)
    const uint16_t bits = bf16_bits(x[j]);
    h[j] = bits;
    l[j] = bf16_bits(x[j] - bf16_value(bits));
  }
}

// Copy rows × cols elements of src (rows ld apart) into dst (as float32, or as they are),
// rows cols apart.
template <typename T, typename U>
inline void copy_rows(const T* src, int64_t rows, int64_t cols, int64_t ld, U* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld;
    U* d = dst + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<U>(s[c]);
  }
}

// A rows×cols block whose rows start `ld` elements apart, as float32 rows `ld_out` apart:
// float32 input is used in place, 16-bit input is widened into dense `scratch` (ld_out = cols).
template <typename T>
inline const float* widen_rows(const T* src, int64_t rows, int64_t cols, int64_t ld,
                               float* scratch, int64_t& ld_out) {
  if constexpr (std::is_same_v<T, float>) {
    ld_out = ld;
    return src;
  } else {
    copy_rows(src, rows, cols, ld, scratch);
    ld_out = cols;
    return scratch;
  }
}

// Element stride between rows (dim 2) of a (B, H, L, D) tensor whose last dim is contiguous;
// a single row may carry any stride, so it reports D (BLAS needs ld >= D).
inline int64_t row_stride(const at::Tensor& t, const char* who, const char* name) {
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, who, ": ", name,
              " needs a contiguous last dim, got strides ", t.strides());
  const int64_t ld = t.size(2) > 1 ? t.stride(2) : t.size(3);
  TORCH_CHECK(ld >= t.size(3), who, ": ", name, " rows overlap, got strides ", t.strides());
  return ld;
}

// Partial tile: scores where the bitmap (block_k columns per row) says "masked" become -inf.
inline void apply_bitmap(float* s, int64_t ld, const bool* bits, int64_t block_k, int64_t rows,
                         int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* srow = s + r * ld;
    // bytes, not bool, and an unconditional load: only then does g++ vectorise the select
    const uint8_t* brow = reinterpret_cast<const uint8_t*>(bits + r * block_k);
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const float x = srow[c];
      srow[c] = brow[c] ? x : kNegInf;
    }
  }
}

// 2^x for x <= 0 (or -inf): exact 0 below -126; NaN stays NaN (as in the reference).
inline float exp2_nonpositive(float x) {
  const float xc = x >= -126.0f ? x : -126.0f;  // NaN too: keeps the int conversion defined
  const float xi = std::nearbyint(xc);
  const float f = xc - xi;  // in [-0.5, 0.5]
  float p = 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(xi) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x >= -126.0f ? p * scale : (x < -126.0f ? 0.0f : x);
}

// tanh(x) = ±(1 - e) / (1 + e) with e = exp(-2|x|). Its error is absolute (~1e-7; relative
// error grows near 0 where 1 - e cancels), which is what softcapped scores need: the softmax
// sees c·tanh with an absolute error ~c·1e-7. Branch-free, so row loops vectorise.
inline float tanh_float(float x) {
  const float e = exp2_nonpositive(-2.8853900817779268f * std::fabs(x));  // 2^(-2|x|·log2 e)
  return std::copysign((1.0f - e) / (1.0f + e), x);
}

// Score mods the kernels apply themselves (FlexAttention order: after scaling, before the mask).
struct ScoreMods {
  const float* slopes;  // (Hq,) ALiBi slopes, or nullptr
  float softcap;        // c of c·tanh(s/c), or 0
  int64_t offset;       // ALiBi's alignment: query i sits at key i + offset
  bool any() const { return slopes != nullptr || softcap > 0.0f; }
};

// The mods of one kernel call from its arguments (slopes: empty, or float32 (Hq,) contiguous).
inline ScoreMods score_mods_for(const at::Tensor& slopes, int64_t Hq, double softcap,
                                int64_t offset, const char* who) {
  TORCH_CHECK(slopes.numel() == 0 || (slopes.dtype() == at::kFloat && slopes.is_contiguous() &&
                                      slopes.numel() == Hq),
              who, ": slopes must be empty or float32 (Hq,)");
  TORCH_CHECK(softcap >= 0.0, who, ": softcap must be >= 0 (0: none)");
  return {slopes.numel() ? slopes.data_ptr<float>() : nullptr, static_cast<float>(softcap),
          offset};
}

// One row of scores in natural units (Q·Kᵀ·scale) for query `i` (head h) and keys j0, j0+1, ...:
// ALiBi subtracts slope_h·|i + offset - j|, softcap maps s to c·tanh(s/c) (tanh kept in `trow`,
// when given, for the backward's factor 1 - tanh²); the row ends in log2 units.
inline void apply_score_mods(float* s, int64_t n, int64_t h, int64_t i, int64_t j0,
                             const ScoreMods& mods, float* trow) {
  constexpr float kLog2e = 1.4426950408889634f;
  if (mods.slopes != nullptr) {
    const float slope = mods.slopes[h];
    const float base = static_cast<float>(i + mods.offset - j0);
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) s[c] -= slope * std::fabs(base - static_cast<float>(c));
  }
  if (mods.softcap > 0.0f) {
    const float cap = mods.softcap, inv = 1.0f / mods.softcap;
    if (trow != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        trow[c] = tanh_float(s[c] * inv);
        s[c] = cap * trow[c];
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) s[c] = cap * tanh_float(s[c] * inv);
    }
  }
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) s[c] *= kLog2e;
}

// Counter-based attention dropout, the same decisions as attnkit/_dropout.py: score (b, h, i, j)
// is kept when lowbias32(lowbias32(lowbias32(lowbias32(seed + b) + h) + i) + j) >> 8 is at
// least threshold = p·2^24. seed + b may pass 2^32 (Python adds them unmasked), so the first
// hash takes 64 bits; its first step is the only one where bits above 32 matter.
inline uint32_t lowbias32_tail(uint32_t x) {  // all but the first xor-shift
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}
inline uint32_t lowbias32(uint32_t x) { return lowbias32_tail(x ^ (x >> 16)); }
inline uint32_t lowbias32_wide(uint64_t x) {  // for seed + b, which may need 33 bits
  return lowbias32_tail(static_cast<uint32_t>(x ^ (x >> 16)));
}

struct Dropout {
  int64_t seed;        // < 0: no dropout
  int64_t threshold;   // keep when hash >> 8 >= threshold
  float keep_scale;    // 1 / (1 - p)
  bool on() const { return seed >= 0; }
  // Row i of head h, batch b: the hash state before the key index is mixed in.
  uint32_t row_state(int64_t b, int64_t h, int64_t i) const {
    uint32_t x = lowbias32_wide(static_cast<uint64_t>(seed) + static_cast<uint64_t>(b));
    x = lowbias32(static_cast<uint32_t>(x + static_cast<uint32_t>(h)));
    return lowbias32(static_cast<uint32_t>(x + static_cast<uint32_t>(i)));
  }
  // z[c] = keep_scale where key j0 + c is kept, else 0.
  void row_scales(float* z, int64_t n, uint32_t state, int64_t j0) const {
    const uint32_t thr = static_cast<uint32_t>(threshold), first = state + uint32_t(j0);
    const float kept = keep_scale;  // a local: a member read inside the select blocks SIMD
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const uint32_t x = lowbias32(first + static_cast<uint32_t>(c));
      z[c] = (x >> 8) >= thr ? kept : 0.0f;
    }
  }
};

inline Dropout dropout_for(int64_t seed, int64_t threshold, double p, const char* who) {
  TORCH_CHECK(seed < 0 || (seed < (int64_t(1) << 32) && p > 0.0 && p < 1.0 && threshold >= 0),
              who, ": dropout needs a 32-bit seed and 0 < p < 1");
  return {seed, threshold, seed < 0 ? 1.0f : static_cast<float>(1.0 / (1.0 - p))};
}

// Whether a row holds a NaN (rows whose max is -inf: masked, or NaN scores that max skipped).
inline bool any_nan(const float* s, int64_t n) {
  bool nan = false;
#pragma omp simd reduction(| : nan)
  for (int64_t c = 0; c < n; ++c) nan |= s[c] != s[c];
  return nan;
}

// The two row passes of the online softmax: the row max, then P = 2^(S - max) in place with
// its sum. The max must use several vector accumulators: a single `std::max` reduction runs at
// the latency of one max per element and cost more than the exp pass (measured: 0.56 vs
// 0.06 ns/element).
#if defined(__AVX512F__) && !defined(ATTNKIT_PORTABLE_SIMD)

// 16 lanes of 2^x for x <= 0 or -inf: 0 below -126, as exp2_nonpositive. Lanes below -126
// (-inf: masked scores) are zeroed by the mask, not computed: 2^x there would underflow, and
// each vscalefps whose result underflows costs a microcode assist (on a Sapphire Rapids VM an
// exp pass over rows a fifth of which was -inf ran at 4.7 ns per element, 0.16 without).
inline __m512 exp2_16(__m512 x) {
  // NaN compares unordered (not below -126), and maxps returns its second operand when either
  // is NaN, so x goes second: a NaN score stays NaN (as in the reference), not probability 0.
  const __mmask16 computed = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  x = _mm512_max_ps(_mm512_set1_ps(-126.0f), x);
  const __m512 xi = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, xi);  // in [-0.5, 0.5]
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(computed, p, xi);
}

inline __mmask16 tail_mask(int64_t count) {
  return static_cast<__mmask16>((1u << count) - 1u);
}

inline float row_max(const float* s, int64_t n) {
  __m512 m0 = _mm512_set1_ps(kNegInf), m1 = m0;
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + c));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s + c + 16));
  }
  for (; c + 16 <= n; c += 16) m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + c));
  if (c < n) m1 = _mm512_mask_max_ps(m1, tail_mask(n - c), m1, _mm512_loadu_ps(s + c));
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

inline float exp2_shifted_row(float* s, int64_t n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 p = exp2_16(_mm512_sub_ps(_mm512_loadu_ps(s + c), mv));
    _mm512_storeu_ps(s + c, p);
    sum = _mm512_add_ps(sum, p);
  }
  if (c < n) {
    const __mmask16 tail = tail_mask(n - c);
    const __m512 p = exp2_16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + c), mv));
    _mm512_mask_storeu_ps(s + c, tail, p);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, p));
  }
  return _mm512_reduce_add_ps(sum);
}

#else  // portable: plain loops the compiler vectorises for the target (AVX2, NEON, ...)

inline float row_max(const float* s, int64_t n) {
  constexpr int64_t kLanes = 16;  // independent accumulators, kept in vector registers
  float acc[kLanes];
  std::fill(acc, acc + kLanes, kNegInf);
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] = acc[j] > s[c + j] ? acc[j] : s[c + j];
  for (; c < n; ++c) acc[0] = acc[0] > s[c] ? acc[0] : s[c];
  return *std::max_element(acc, acc + kLanes);
}

inline float exp2_shifted_row(float* s, int64_t n, float m) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    const float p = exp2_nonpositive(s[c] - m);
    s[c] = p;
    sum += p;
  }
  return sum;
}

#endif

}  // namespace attnkit_cpu
