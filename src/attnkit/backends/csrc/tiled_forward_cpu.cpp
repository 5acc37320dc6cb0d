// Block-sparse flash-attention forward for CPUs (float32).
//
// One work unit per (batch, query head, query tile), spread over threads by at::parallel_for.
// Within a unit, maximal runs of non-empty kv tiles (at most max_chunk keys) form a chunk:
//   S = Q_tile · K_chunkᵀ · scale·log2(e)      one sgemm (MKL, as torch's own CPU kernels)
//   mask: EMPTY tiles (for this b, h) -> -inf, PARTIAL tiles -> precomputed bitmap, FULL: none
//   online softmax in log2 units: m, l per row; P = exp2(S - m) in place, fused with row sums
//   acc = acc·exp2(m_old - m_new) + P · V_chunk  one sgemm
// Output acc / l; LSE = (m + log2 l)·ln 2, -inf for rows with no key (output row 0).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// Tests build a second copy with -DATTNKIT_PORTABLE_SIMD under another op namespace.
#ifndef ATTNKIT_OP_NAMESPACE
#define ATTNKIT_OP_NAMESPACE attnkit
#endif

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int8_t kEmpty = 0, kPartial = 1;

// Column-major sgemm on row-major data: C[m×n] (ldc) = alpha·A·B + beta·C.
void gemm_rowmajor(bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                   const float* b, int ldb, float beta, float* c, int ldc) {
  // Row-major C = A·op(B) is column-major Cᵀ = op(B)ᵀ·Aᵀ.
  const char ta = trans_b ? 'T' : 'N', tb = 'N';
  sgemm_(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// The two row passes of the online softmax: the row max, then P = 2^(S - max) in place with
// its sum. The max must use several vector accumulators: a single `std::max` reduction runs at
// the latency of one max per element and cost more than the exp pass (measured: 0.56 vs
// 0.06 ns/element).
#if defined(__AVX512F__) && !defined(ATTNKIT_PORTABLE_SIMD)

// 16 lanes of 2^x for x <= 0 or -inf. vscalefps computes p·2^round(x) with correct underflow
// (exactly 0 below 2^-149), so no exponent-bit arithmetic and no select are needed.
inline __m512 exp2_16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f));  // -inf -> -150 -> exactly 0
  const __m512 xi = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, xi);  // in [-0.5, 0.5]
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, xi);
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

// 2^x for x <= 0 (or -inf): exact 0 below -126.
inline float exp2_nonpositive(float x) {
  const float xc = x < -126.0f ? -126.0f : x;
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
  return x < -126.0f ? 0.0f : p * scale;
}

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

}  // namespace

std::tuple<at::Tensor, at::Tensor> tiled_forward(
    const at::Tensor& q,            // (B, Hq, Lq, D) float32, contiguous
    const at::Tensor& k,            // (B, Hkv, Lk, D)
    const at::Tensor& v,            // (B, Hkv, Lk, Dv)
    const at::Tensor& kinds,        // (Bm, Hm, nQ, nK) int8: 0 empty, 1 partial, 2 full
    const at::Tensor& tile_index,   // (Bm, Hm, nQ, nK) int64: row of `bitmaps` or -1
    const at::Tensor& bitmaps,      // (nPartial, block_q, block_k) bool
    int64_t block_q, int64_t block_k, int64_t max_chunk, double scale) {
  TORCH_CHECK(q.dtype() == at::kFloat && k.dtype() == at::kFloat && v.dtype() == at::kFloat,
              "tiled_forward: float32 inputs expected");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "tiled_forward: contiguous inputs expected");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3);
  const int64_t G = Hq / Hkv;
  const int64_t nQ = kinds.size(2), nK = kinds.size(3);
  const int64_t Bm = kinds.size(0), Hm = kinds.size(1);
  TORCH_CHECK(nQ == (Lq + block_q - 1) / block_q && nK == (Lk + block_k - 1) / block_k,
              "tiled_forward: kinds does not match the tile grid");
  const int64_t tiles_per_chunk = std::max<int64_t>(1, max_chunk / block_k);

  auto out = at::zeros({B, Hq, Lq, Dv}, q.options());
  auto lse = at::full({B, Hq, Lq}, -std::numeric_limits<float>::infinity(), q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int8_t* kindp = kinds.data_ptr<int8_t>();
  const int64_t* tip = tile_index.data_ptr<int64_t>();
  const bool* bmp = bitmaps.numel() ? bitmaps.data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float alpha_qk = static_cast<float>(scale * 1.4426950408889634);

  at::parallel_for(0, B * Hq * nQ, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(block_q * tiles_per_chunk * block_k);
    std::vector<float> acc(block_q * Dv), m(block_q), l(block_q);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t qt = unit % nQ, h = (unit / nQ) % Hq, b = unit / (nQ * Hq);
      const int64_t hk = h / G;
      const int64_t q0 = qt * block_q, tq = std::min(block_q, Lq - q0);
      const int64_t map_row = (((Bm > 1 ? b : 0) * Hm + (Hm > 1 ? h : 0)) * nQ + qt) * nK;
      const int8_t* kind_row = kindp + map_row;
      const int64_t* index_row = tip + map_row;
      const float* qtile = qp + ((b * Hq + h) * Lq + q0) * D;
      const float* kbase = kp + (b * Hkv + hk) * Lk * D;
      const float* vbase = vp + (b * Hkv + hk) * Lk * Dv;
      std::fill(acc.begin(), acc.begin() + tq * Dv, 0.0f);
      std::fill(m.begin(), m.begin() + tq, kNegInf);
      std::fill(l.begin(), l.begin() + tq, 0.0f);
      bool any = false;
      int64_t kt = 0;
      while (kt < nK) {
        if (kind_row[kt] == kEmpty) { ++kt; continue; }
        const int64_t kt0 = kt;
        while (kt < nK && kind_row[kt] != kEmpty && kt - kt0 < tiles_per_chunk) ++kt;
        const int64_t k0 = kt0 * block_k, k1 = std::min(kt * block_k, Lk), n = k1 - k0;
        any = true;
        float* s = S.data();
        gemm_rowmajor(true, tq, n, D, alpha_qk, qtile, D, kbase + k0 * D, D, 0.0f, s, n);
        for (int64_t t = kt0; t < kt; ++t) {  // partial tiles: apply the predicate bitmap
          if (kind_row[t] != kPartial) continue;
          const bool* bits = bmp + index_row[t] * block_q * block_k;
          const int64_t c0 = t * block_k - k0, w = std::min(block_k, Lk - t * block_k);
          for (int64_t r = 0; r < tq; ++r) {
            float* srow = s + r * n + c0;
            const bool* brow = bits + r * block_k;
            for (int64_t c = 0; c < w; ++c) srow[c] = brow[c] ? srow[c] : kNegInf;
          }
        }
        for (int64_t r = 0; r < tq; ++r) {
          float* srow = s + r * n;
          const float m_new = std::max(m[r], row_max(srow, n));
          if (m_new == kNegInf) {  // nothing attended yet in this row: P = 0
            std::fill(srow, srow + n, 0.0f);
            continue;
          }
          const float sum = exp2_shifted_row(srow, n, m_new);
          const float rescale = std::exp2(m[r] - m_new);  // once per row: libm is fine
          l[r] = l[r] * rescale + sum;
          m[r] = m_new;
          if (rescale != 1.0f) {
            float* arow = acc.data() + r * Dv;
            for (int64_t c = 0; c < Dv; ++c) arow[c] *= rescale;
          }
        }
        gemm_rowmajor(false, tq, Dv, n, 1.0f, s, n, vbase + k0 * Dv, Dv, 1.0f, acc.data(), Dv);
      }
      if (!any) continue;
      float* orow = op + ((b * Hq + h) * Lq + q0) * Dv;
      float* lrow = lp + (b * Hq + h) * Lq + q0;
      for (int64_t r = 0; r < tq; ++r) {
        if (l[r] > 0.0f) {
          const float inv = 1.0f / l[r];
          for (int64_t c = 0; c < Dv; ++c) orow[r * Dv + c] = acc[r * Dv + c] * inv;
          lrow[r] = (m[r] + std::log2(l[r])) * 0.6931471805599453f;
        }
      }
    }
  });
  return {out, lse};
}

TORCH_LIBRARY(ATTNKIT_OP_NAMESPACE, m) {
  m.def(
      "tiled_forward(Tensor q, Tensor k, Tensor v, Tensor kinds, Tensor tile_index, "
      "Tensor bitmaps, int block_q, int block_k, int max_chunk, float scale) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ATTNKIT_OP_NAMESPACE, CPU, m) { m.impl("tiled_forward", &tiled_forward); }
