// Block-sparse flash-attention backward for CPUs, FlashAttention-2's algorithm: float32, or
// bfloat16 q, k, v, dO on MKL's bfloat16 GEMM (dq, dk, dv float32 either way).
//
// One work unit per (batch, kv head, kv tile), taken by threads dynamically (causal masks
// make units unequal). A unit keeps its tile's dK and dV in registers-to-L2 buffers and, for
// every query head of its group, walks the runs of non-empty query tiles in its column
// (at most max_rows rows per step), recomputing the probabilities from the saved LSE:
//   S  = Q_rows · K_tileᵀ · scale·log2(e)      mask: on PARTIAL tiles (TileMask)
//        (one GEMM per query tile, as the forward's tile_scores made S for the LSE: sgemm
//        rounds by call shape, and P must sum to 1 as that LSE has it)
//        (with ALiBi / softcap: the same mods as the forward, tanh kept for dS)
//   P  = exp2(S - LSE·log2(e))                 (rows with no key have LSE = -inf: passed as 0)
//   dV += Pᵀ · dO_rows          dP = dO_rows · V_tileᵀ   (P∘Z and dP∘Z with dropout)
//   dS = P ∘ (dP - delta)       delta = rowsum(dO ∘ O) - dLSE, computed by the caller
//        ∘ (1 - tanh²)          with a softcap
//   dK += scale · dSᵀ · Q_rows  dQ_rows += scale · dS · K_tile
// dQ rows are shared between units of different kv tiles: each adds its part under the query
// tile's lock, or, deterministic, in kv-tile order. Saved state is O(N): no Lq×Lk buffer exists.
// bfloat16: S and dP multiply the inputs as they are (exact products, float32 sums); P and dS,
// float32, go in as their hi and lo bfloat16 parts (split_bf16), two GEMMs each.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cpu_common.h"
#include "tile_mask.h"

using namespace attnkit_cpu;

namespace {
void add_rows(float* dst, const float* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> tiled_backward(
    const at::Tensor& dout,         // (B, Hq, Lq, Dv) float32 or bfloat16 (as q, k, v), contiguous
    const at::Tensor& q,            // (B, Hq, Lq, D)
    const at::Tensor& k,            // (B, Hkv, Lk, D)
    const at::Tensor& v,            // (B, Hkv, Lk, Dv)
    const at::Tensor& lse2,         // (B, Hq, Lq): LSE·log2(e), 0 where LSE = -inf
    const at::Tensor& delta,        // (B, Hq, Lq): rowsum(dO ∘ O) - dLSE
    const at::Tensor& kinds,        // (Bm, Hm, nQ, nK) int8: 0 empty, 1 partial, 2 full
    const at::Tensor& tile_index,   // (Bm, Hm, nQ, nK) int64: row of `bitmaps` or -1
    const at::Tensor& bitmaps,      // (nPartial, block_q, block_k) bool
    const at::Tensor& slopes,       // (Hq,) float32 ALiBi slopes, or empty: no ALiBi
    int64_t block_q, int64_t block_k, int64_t max_rows, double scale, double softcap,
    int64_t alibi_offset,  // query i sits at key i + alibi_offset (ALiBi's distance)
    int64_t dropout_seed, int64_t dropout_threshold, double dropout_p,  // seed < 0: none
    bool band, int64_t band_lo, int64_t band_hi,  // band: lo <= j - i <= hi, no kinds/bitmaps
    const std::optional<at::Tensor>& keys,        // with a band or ranges: (B or 1, Lk) bool
    const std::optional<at::Tensor>& ranges,      // per-row first, last keys: (B or 1, 2, Lq)
    bool deterministic) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || (dtype == at::kBFloat16 && has_gemm_bf16()),
              "tiled_backward: float32 inputs, or bfloat16 where torch links MKL's bfloat16 "
              "GEMM, expected; got ", dtype);
  for (const auto* t : {&dout, &q, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous(),
                "tiled_backward: contiguous dout, q, k, v of one dtype expected");
  }
  for (const auto* t : {&lse2, &delta}) {
    TORCH_CHECK(t->dtype() == at::kFloat && t->is_contiguous(),
                "tiled_backward: contiguous float32 lse2 and delta expected");
  }
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3);
  const int64_t G = Hq / Hkv;
  const TileMask mask = tile_mask_for(kinds, tile_index, bitmaps, B, Lq, Lk, block_q, block_k,
                                      band, band_lo, band_hi, keys, ranges, "tiled_backward");
  const int64_t nQ = mask.nQ, nK = mask.nK;
  const int64_t tiles_per_step = std::max<int64_t>(1, max_rows / block_q);
  const int64_t rows_max = tiles_per_step * block_q;

  const auto f32 = q.options().dtype(at::kFloat);
  auto dq = at::zeros(q.sizes(), f32);
  auto dk = at::empty(k.sizes(), f32);
  auto dv = at::empty(v.sizes(), f32);
  const float *lp = lse2.data_ptr<float>(), *dlp = delta.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const ScoreMods mods = score_mods_for(slopes, Hq, softcap, alibi_offset, "tiled_backward");
  const Dropout dropout = dropout_for(dropout_seed, dropout_threshold, dropout_p, "tiled_backward");
  const float alpha_qk = static_cast<float>(mods.any() ? scale : scale * 1.4426950408889634);
  const float fscale = static_cast<float>(scale);
  // one lock per (b, query head, query tile): guards that tile's rows of dQ
  std::unique_ptr<std::mutex[]> dq_locks(deterministic ? nullptr : new std::mutex[B * Hq * nQ]);
  // Deterministic (torch.use_deterministic_algorithms): a query tile's dQ rows take the kv
  // tiles' parts in kv-tile order, the same sums on every run and any thread count. The
  // tile's baton holds the last kv tile that added; a unit waits for the one before it, which
  // has a lower unit index: schedule(dynamic) hands units out in increasing order, so that
  // one is already running and never waits for a later one (no deadlock).
  std::unique_ptr<std::atomic<int64_t>[]> batons;
  if (deterministic) {
    batons.reset(new std::atomic<int64_t>[B * Hq * nQ]);
    for (int64_t i = 0; i < B * Hq * nQ; ++i) batons[i].store(-1, std::memory_order_relaxed);
  }

  const int64_t units = B * Hkv * nK;
  auto run = [&](auto dtype_tag) {
    using In = decltype(dtype_tag);  // the inputs' dtype
    constexpr bool kBf16 = std::is_same_v<In, at::BFloat16>;
    const In *dop = dout.data_ptr<In>(), *qp = q.data_ptr<In>();
    const In *kp = k.data_ptr<In>(), *vp = v.data_ptr<In>();
    // C = alpha·A·Bᵀ of two inputs (S = Q·Kᵀ, dP = dO·Vᵀ)
    auto gemm_inputs = [&](int m, int n, int kd, float alpha, const In* a, const In* b, float* c) {
      if constexpr (kBf16) {
        gemm_bf16_rowmajor(false, true, m, n, kd, alpha, a, kd, b, kd, 0.0f, c, n);
      } else {
        gemm_rowmajor(false, true, m, n, kd, alpha, a, kd, b, kd, 0.0f, c, n);
      }
    };
#pragma omp parallel num_threads(at::get_num_threads())
    {
      const OneBlasThread one_blas_thread;
      // bfloat16: the hi and lo parts of P (then dS)
      std::vector<at::BFloat16> Ph(kBf16 ? rows_max * block_k : 0), Pl(Ph.size());
      // C (+)= alpha·op(A)·op(B): A float32 scores (P, dS), B the inputs; bfloat16: A as its
      // parts in Ph, Pl (split: made from A here, else the last call's, of the same A)
      auto gemm_scores = [&](bool trans_a, bool trans_b, int m, int n, int kd, float alpha,
                             const float* a, int lda, const In* b, int ldb, float beta, float* c,
                             int ldc, bool split) {
        if constexpr (kBf16) {
          at::BFloat16 *hi = Ph.data(), *lo = Pl.data();
          if (split) split_bf16(a, static_cast<int64_t>(trans_a ? kd : m) * lda, hi, lo);
          gemm_bf16_rowmajor(trans_a, trans_b, m, n, kd, alpha, hi, lda, b, ldb, beta, c, ldc);
          gemm_bf16_rowmajor(trans_a, trans_b, m, n, kd, alpha, lo, lda, b, ldb, 1.0f, c, ldc);
        } else {
          gemm_rowmajor(trans_a, trans_b, m, n, kd, alpha, a, lda, b, ldb, beta, c, ldc);
        }
      };
      std::vector<float> P(rows_max * block_k), dP(rows_max * block_k), dq_part(rows_max * D);
      std::vector<float> T(mods.softcap > 0.0f ? rows_max * block_k : 0);  // tanh(s / c)
      // dropout: Z (0 or 1/(1-p) per score) and P∘Z, regenerated from the counter-based hash
      std::vector<float> Z(dropout.on() ? rows_max * block_k : 0), PZ(Z.size());
      std::vector<float> dk_acc(block_k * D), dv_acc(block_k * Dv);
#pragma omp for schedule(dynamic, 1)
      for (int64_t unit = 0; unit < units; ++unit) {
        const int64_t kt = unit % nK, hk = (unit / nK) % Hkv, b = unit / (nK * Hkv);
        const int64_t k0 = kt * block_k, tk = std::min(block_k, Lk - k0);
        const In* ktile = kp + ((b * Hkv + hk) * Lk + k0) * D;
        const In* vtile = vp + ((b * Hkv + hk) * Lk + k0) * Dv;
        std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
        for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
          const int64_t map = mask.map_of(b, h);
          const int64_t row_base = (b * Hq + h) * Lq;
          auto [qt, qt_end] = mask.q_tiles(kt);
          while (qt < qt_end) {
            if (mask.kind(map, qt, kt) == kEmpty) { ++qt; continue; }
            const int64_t qt0 = qt;
            while (qt < qt_end && mask.kind(map, qt, kt) != kEmpty && qt - qt0 < tiles_per_step) {
              ++qt;
            }
            const int64_t r0 = qt0 * block_q, rows = std::min(qt * block_q, Lq) - r0;
            const In* qrows = qp + (row_base + r0) * D;
            const In* dorows = dop + (row_base + r0) * Dv;
            float* p = P.data();
            float* dp = dP.data();
            for (int64_t t = qt0; t < qt; ++t) {  // S per query tile: the forward's GEMM calls
              const int64_t tr = (t - qt0) * block_q, tq = std::min(block_q, rows - tr);
              gemm_inputs(tq, tk, D, alpha_qk, qrows + tr * D, ktile, p + tr * tk);
            }
            if (mods.any()) {
              for (int64_t r = 0; r < rows; ++r) {
                apply_score_mods(p + r * tk, tk, h, r0 + r, k0, mods,
                                 T.empty() ? nullptr : T.data() + r * tk);
              }
            }
            for (int64_t t = qt0; t < qt; ++t) {
              if (mask.kind(map, t, kt) != kPartial) continue;
              mask.apply(p + (t * block_q - r0) * tk, tk, map, t, kt);
            }
            for (int64_t r = 0; r < rows; ++r) {
              exp2_shifted_row(p + r * tk, tk, lp[row_base + r0 + r]);
            }
            const float* pv = p;  // the probabilities that multiplied V in the forward
            if (dropout.on()) {
              for (int64_t r = 0; r < rows; ++r) {
                float* zrow = Z.data() + r * tk;
                float* pzrow = PZ.data() + r * tk;
                const float* prow = p + r * tk;
                dropout.row_scales(zrow, tk, dropout.row_state(b, h, r0 + r), k0);
#pragma omp simd
                for (int64_t c = 0; c < tk; ++c) pzrow[c] = prow[c] * zrow[c];
              }
              pv = PZ.data();
            }
            // dV += (P∘Z)ᵀ·dO ; dP = dO·Vᵀ (∘Z)
            gemm_scores(true, false, tk, Dv, rows, 1.0f, pv, tk, dorows, Dv, 1.0f, dv_acc.data(),
                        Dv, true);
            gemm_inputs(rows, tk, Dv, 1.0f, dorows, vtile, dp);
            if (dropout.on()) {
#pragma omp simd
              for (int64_t i = 0; i < rows * tk; ++i) dp[i] *= Z[i];
            }
            for (int64_t r = 0; r < rows; ++r) {  // dS = P∘(dP - delta), in place of P
              const float d = dlp[row_base + r0 + r];
              float* prow = p + r * tk;
              const float* dprow = dp + r * tk;
#pragma omp simd
              for (int64_t c = 0; c < tk; ++c) prow[c] *= dprow[c] - d;
              if (!T.empty()) {  // through the softcap: d(c·tanh(s/c))/ds = 1 - tanh²
                const float* trow = T.data() + r * tk;
#pragma omp simd
                for (int64_t c = 0; c < tk; ++c) prow[c] *= 1.0f - trow[c] * trow[c];
              }
            }
            // dK += scale·dSᵀ·Q ; dQ_rows += scale·dS·K (added under each query tile's lock)
            gemm_scores(true, false, tk, D, rows, fscale, p, tk, qrows, D, 1.0f, dk_acc.data(), D,
                        true);
            gemm_scores(false, false, rows, D, tk, fscale, p, tk, ktile, D, 0.0f, dq_part.data(), D,
                        false);  // dS's parts, split just above
            for (int64_t t = qt0; t < qt; ++t) {
              const int64_t a = t * block_q - r0, z = std::min((t + 1) * block_q, Lq) - r0;
              float* dst = dqp + (row_base + r0 + a) * D;
              const float* src = dq_part.data() + a * D;
              const int64_t slot = (b * Hq + h) * nQ + t;
              if (deterministic) {
                const int64_t before = mask.visited_before(map, t, kt);
                while (batons[slot].load(std::memory_order_acquire) != before) {
                  std::this_thread::yield();
                }
                add_rows(dst, src, (z - a) * D);
                batons[slot].store(kt, std::memory_order_release);
              } else {
                std::lock_guard<std::mutex> guard(dq_locks[slot]);
                add_rows(dst, src, (z - a) * D);
              }
            }
          }
        }
        std::copy(dk_acc.begin(), dk_acc.begin() + tk * D, dkp + ((b * Hkv + hk) * Lk + k0) * D);
        std::copy(dv_acc.begin(), dv_acc.begin() + tk * Dv, dvp + ((b * Hkv + hk) * Lk + k0) * Dv);
      }
    }
  };
  if (dtype == at::kFloat) {
    run(float{});
  } else {
    run(at::BFloat16{});
  }
  return {dq, dk, dv};
}
