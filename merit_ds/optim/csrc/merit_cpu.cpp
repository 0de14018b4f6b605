// MERIT's fused CPU kernel (C++/OpenMP): two passes over each tensor or fragment.
//
// Built just-in-time at first use by merit_ds/optim/cpu_kernel.py (torch.utils.cpp_extension,
// as DeepSpeed builds its CPU ops). The math is the one of merit_ds/optim/formulas.py; this
// file only fuses it so that every element is read twice and written once per step:
//
//   pass 1 (statistics)  read w, g, m, v; compute m', v', u in registers (nothing written);
//                        partial row / column / tensor maxima of |w| and |u|; non-finite g?
//   -- the caller turns the (possibly all-reduced) maxima into trust ratios --
//   pass 2 (apply)       read w, g, m, v; recompute m', v', u; s from the ratios;
//                        write m <- m', v <- v', w <- w - lr * clip(s * u, -1, 1)
//
// Nothing is written before pass 2, so a step skipped for a non-finite gradient (found in
// pass 1, possibly on another rank) leaves the state untouched without any scratch buffer.
//
// A "fragment" is elements [start, start + n) of a parameter viewed as R rows of L = C*K
// elements (K = prod of trailing dims; vectors are handled by the *_vector functions).
// Element e lies in row i = e / L at offset o = e % L; its row statistic is
// row[i*K + o % K] and its column statistic col[o].
#include <torch/extension.h>

#include <omp.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

struct Hyper {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay;
};

Hyper make_hyper(double beta1, double beta2, double eps, double weight_decay) {
  return Hyper{static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(1.0 - beta1),
               static_cast<float>(1.0 - beta2), static_cast<float>(eps), static_cast<float>(weight_decay)};
}

// max that ignores NaN (maxps semantics): statistics never hold NaN, whatever the order of
// combination (so sharded and single-device maxima stay equal); non-finite gradients are
// reported by the pass-1 flag instead.
inline float max_ign(float a, float b) { return a > b ? a : b; }

// The formulas with explicit fused multiply-adds: fewer instructions than separate products
// and sums (both passes are compute-bound on sqrt, division and these), and explicit rather
// than left to -ffp-contract, so that the vectorised body of a loop and its scalar remainder
// round identically (a fragment that starts mid-row shifts elements between the two; the
// sharded and single-device steps stay bitwise equal only if they round the same).
inline float direction(float w, float g, float m, float v, const Hyper& h, float& m_new, float& v_new) {
  m_new = std::fma(m, h.beta1, h.one_minus_beta1 * g);
  v_new = std::fma(v, h.beta2, h.one_minus_beta2 * g * g);
  return std::fma(h.weight_decay, w, m_new / (std::sqrt(v_new) + h.eps));
}

// Below this many elements a tensor or fragment is stepped by one thread. A parallel region
// costs a fork and a barrier: microseconds on an idle machine, but a scheduler time slice when
// the cores are shared with other processes (a waiting thread spins, then sleeps), and GPT-2
// Small has 98 vectors of 768 to 3,072 elements, each worth less work than one barrier.
constexpr int64_t kParallelMin = 1 << 16;

inline int threads_for(int64_t n, int64_t rows) {
  if (n < kParallelMin) return 1;
  return static_cast<int>(std::min<int64_t>(omp_get_max_threads(), rows));
}

inline bool not_finite(float g) { return !(std::fabs(g) <= FLT_MAX); }

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "merit_cpu: ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, "merit_cpu: ", name, " must be float32");
  TORCH_CHECK(t.is_contiguous(), "merit_cpu: ", name, " must be contiguous");
}

// Pass 1 of a matrix fragment. row_w/row_u (R*K) and col_w/col_u (L) are combined with max
// (they hold zeros, or earlier fragments' maxima). Returns whether some g is not finite.
bool stats_matrix_raw(const float* pw, const float* pg, const float* pm, const float* pv, int64_t n, int64_t start,
                      int64_t row_len, int64_t inner, const Hyper& h, float* rw, float* ru, float* cw, float* cu) {
  if (n == 0) return false;
  const int64_t first_row = start / row_len, last_row = (start + n - 1) / row_len;
  const int64_t rows = last_row - first_row + 1;
  const int threads = threads_for(n, rows);
  std::vector<float> col_parts(static_cast<size_t>(threads) * 2 * row_len, 0.0f);
  int bad = 0;
#pragma omp parallel num_threads(threads) reduction(| : bad)
  {
    const int t = omp_get_thread_num();
    float* my_cw = col_parts.data() + static_cast<size_t>(t) * 2 * row_len;
    float* my_cu = my_cw + row_len;
#pragma omp for schedule(static)
    for (int64_t r = first_row; r <= last_row; ++r) {
      const int64_t e0 = std::max(start, r * row_len), e1 = std::min(start + n, (r + 1) * row_len);
      if (inner == 1) {
        // contiguous run of one row: vectorised (omp simd), max-reductions in registers
        float mw = 0.0f, mu = 0.0f;
        int row_bad = 0;
        const int64_t i0 = e0 - start, o0 = e0 - r * row_len, len = e1 - e0;
        const float *qw = pw + i0, *qg = pg + i0, *qm = pm + i0, *qv = pv + i0;
        float *qcw = my_cw + o0, *qcu = my_cu + o0;
#pragma omp simd reduction(max : mw, mu) reduction(| : row_bad)
        for (int64_t j = 0; j < len; ++j) {
          float mn, vn;
          const float u = direction(qw[j], qg[j], qm[j], qv[j], h, mn, vn);
          const float aw = std::fabs(qw[j]), au = std::fabs(u);
          row_bad |= not_finite(qg[j]);
          mw = max_ign(aw, mw);
          mu = max_ign(au, mu);
          qcw[j] = max_ign(aw, qcw[j]);
          qcu[j] = max_ign(au, qcu[j]);
        }
        bad |= row_bad;
        rw[r] = max_ign(mw, rw[r]);
        ru[r] = max_ign(mu, ru[r]);
      } else {
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t i = e - start, o = e - r * row_len, k = r * inner + o % inner;
          float mn, vn;
          const float u = direction(pw[i], pg[i], pm[i], pv[i], h, mn, vn);
          const float aw = std::fabs(pw[i]), au = std::fabs(u);
          bad |= not_finite(pg[i]);
          rw[k] = max_ign(aw, rw[k]);
          ru[k] = max_ign(au, ru[k]);
          my_cw[o] = max_ign(aw, my_cw[o]);
          my_cu[o] = max_ign(au, my_cu[o]);
        }
      }
    }
  }
  for (int t = 0; t < threads; ++t) {
    const float* pcw = col_parts.data() + static_cast<size_t>(t) * 2 * row_len;
    const float* pcu = pcw + row_len;
    for (int64_t o = 0; o < row_len; ++o) {
      cw[o] = max_ign(pcw[o], cw[o]);
      cu[o] = max_ign(pcu[o], cu[o]);
    }
  }
  return bad != 0;
}

bool stats_matrix(torch::Tensor w, torch::Tensor g, torch::Tensor m, torch::Tensor v, int64_t start, int64_t row_len,
                  int64_t inner, double beta1, double beta2, double eps, double weight_decay, torch::Tensor row_w,
                  torch::Tensor row_u, torch::Tensor col_w, torch::Tensor col_u) {
  for (auto* t : {&w, &g, &m, &v, &row_w, &row_u, &col_w, &col_u}) check(*t, "tensor");
  return stats_matrix_raw(w.data_ptr<float>(), g.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(),
                          w.numel(), start, row_len, inner, make_hyper(beta1, beta2, eps, weight_decay),
                          row_w.data_ptr<float>(), row_u.data_ptr<float>(), col_w.data_ptr<float>(),
                          col_u.data_ptr<float>());
}

// Pass 1 of a vector fragment: out[0] = max(out[0], max|w|), out[1] = max(out[1], max|u|).
bool stats_vector_raw(const float* pw, const float* pg, const float* pm, const float* pv, int64_t n, const Hyper& h,
                      float* po) {
  if (n == 0) return false;
  float mw = 0.0f, mu = 0.0f;
  int bad = 0;
#pragma omp parallel for simd schedule(static) reduction(max : mw, mu) reduction(| : bad) num_threads(threads_for(n, n))
  for (int64_t i = 0; i < n; ++i) {
    float mn, vn;
    const float u = direction(pw[i], pg[i], pm[i], pv[i], h, mn, vn);
    const float aw = std::fabs(pw[i]), au = std::fabs(u);
    bad |= not_finite(pg[i]);
    mw = max_ign(aw, mw);
    mu = max_ign(au, mu);
  }
  po[0] = max_ign(mw, po[0]);
  po[1] = max_ign(mu, po[1]);
  return bad != 0;
}

bool stats_vector(torch::Tensor w, torch::Tensor g, torch::Tensor m, torch::Tensor v, double beta1, double beta2,
                  double eps, double weight_decay, torch::Tensor out) {
  for (auto* t : {&w, &g, &m, &v, &out}) check(*t, "tensor");
  return stats_vector_raw(w.data_ptr<float>(), g.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(),
                          w.numel(), make_hyper(beta1, beta2, eps, weight_decay), out.data_ptr<float>());
}

// Trust-ratio statistics of a pass 2, when asked for (track_stats): the same five numbers as
// merit_ds.optim.trust_stats.partial_trust_stats over the elements updated -- count, sum of
// s (double), min and max of s, count of |s*u| > 1 (the elements the update clips).
struct TrustStats {
  double count = 0, sum = 0, clipped = 0;
  float lo = INFINITY, hi = -INFINITY;
};

inline float trust(float a, float b) { return (a < 0.0f || b < 0.0f) ? 1.0f : (a > b || a != a ? a : b); }

// One element of pass 2: recompute m', v', u; w <- w - lr * clip(s * u, -1, 1); returns s*u.
inline float apply_one(float& w, float g, float& m, float& v, float s, float neg_lr, const Hyper& h) {
  float mn, vn;
  const float u = direction(w, g, m, v, h, mn, vn);
  const float x = s * u;
  const float c = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);  // clamp; NaN passes through
  w = std::fma(neg_lr, c, w);
  m = mn;
  v = vn;
  return x;
}

void write_stats(double* p, const TrustStats& t) {
  p[0] = t.count, p[1] = t.sum, p[2] = t.lo, p[3] = t.hi, p[4] = t.clipped;
}

void write_stats(torch::Tensor out, const TrustStats& t) {
  TORCH_CHECK(out.scalar_type() == torch::kFloat64 && out.numel() == 5 && out.is_contiguous(),
              "merit_cpu: stats must be a contiguous float64 tensor of 5");
  write_stats(out.data_ptr<double>(), t);
}

// Pass 2 of a matrix fragment. row_ratio (R*K) / col_ratio (L): the trust ratios already
// clamped below by the tensor ratio, or -1 where a maximum is 0 (there s = 1). ``stats``:
// an empty tensor, or 5 float64 that receive the trust-ratio statistics.
template <bool Track>
void apply_matrix_impl(float* pw, const float* pg, float* pm, float* pv, int64_t n, int64_t start, int64_t row_len,
                       int64_t inner, const Hyper& h, float neg_lr, const float* rr, const float* cr,
                       TrustStats& out) {
  const int64_t first_row = start / row_len, last_row = (start + n - 1) / row_len;
  double count = 0, sum = 0, clipped = 0;
  float lo = INFINITY, hi = -INFINITY;
#pragma omp parallel for schedule(static) reduction(+ : count, sum, clipped) reduction(min : lo) reduction(max : hi) \
    num_threads(threads_for(n, last_row - first_row + 1))
  for (int64_t r = first_row; r <= last_row; ++r) {
    const int64_t e0 = std::max(start, r * row_len), e1 = std::min(start + n, (r + 1) * row_len);
    if (inner == 1) {
      const float a = rr[r];
      const int64_t i0 = e0 - start, o0 = e0 - r * row_len, len = e1 - e0;
      float *qw = pw + i0, *qm = pm + i0, *qv = pv + i0;
      const float *qg = pg + i0, *qc = cr + o0;
      if (Track) {
        for (int64_t j = 0; j < len; ++j) {
          const float s = trust(a, qc[j]);
          const float x = apply_one(qw[j], qg[j], qm[j], qv[j], s, neg_lr, h);
          sum += s;
          lo = s < lo ? s : lo;
          hi = s > hi ? s : hi;
          clipped += std::fabs(x) > 1.0f;
        }
        count += len;
      } else {
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) apply_one(qw[j], qg[j], qm[j], qv[j], trust(a, qc[j]), neg_lr, h);
      }
      continue;
    }
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t i = e - start, o = e - r * row_len;
      const float s = trust(rr[r * inner + o % inner], cr[o]);
      const float x = apply_one(pw[i], pg[i], pm[i], pv[i], s, neg_lr, h);
      if (Track) {
        sum += s;
        lo = s < lo ? s : lo;
        hi = s > hi ? s : hi;
        clipped += std::fabs(x) > 1.0f;
      }
    }
    if (Track) count += e1 - e0;
  }
  out.count = count, out.sum = sum, out.clipped = clipped, out.lo = lo, out.hi = hi;
}

// Pass 2 of a matrix fragment; ``stats``: null, or receives the trust-ratio statistics.
void apply_matrix_raw(float* pw, const float* pg, float* pm, float* pv, int64_t n, int64_t start, int64_t row_len,
                      int64_t inner, const Hyper& h, float neg_lr, const float* rr, const float* cr,
                      TrustStats* stats) {
  if (n == 0) return;
  TrustStats t;
  if (stats != nullptr) {
    apply_matrix_impl<true>(pw, pg, pm, pv, n, start, row_len, inner, h, neg_lr, rr, cr, *stats);
  } else {
    apply_matrix_impl<false>(pw, pg, pm, pv, n, start, row_len, inner, h, neg_lr, rr, cr, t);
  }
}

void apply_matrix(torch::Tensor w, torch::Tensor g, torch::Tensor m, torch::Tensor v, int64_t start, int64_t row_len,
                  int64_t inner, double beta1, double beta2, double eps, double weight_decay, double lr,
                  torch::Tensor row_ratio, torch::Tensor col_ratio, torch::Tensor stats) {
  for (auto* t : {&w, &g, &m, &v, &row_ratio, &col_ratio}) check(*t, "tensor");
  if (w.numel() == 0) return;
  TrustStats t;
  apply_matrix_raw(w.data_ptr<float>(), g.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(), w.numel(),
                   start, row_len, inner, make_hyper(beta1, beta2, eps, weight_decay), static_cast<float>(-lr),
                   row_ratio.data_ptr<float>(), col_ratio.data_ptr<float>(), stats.numel() > 0 ? &t : nullptr);
  if (stats.numel() > 0) write_stats(stats, t);
}

// Pass 2 of a vector fragment with its tensor-level ratio s (>= 0).
void apply_vector_raw(float* pw, const float* pg, float* pm, float* pv, int64_t n, const Hyper& h, float neg_lr,
                      float s, TrustStats* stats) {
  if (n == 0) return;
  double clipped = 0;
#pragma omp parallel for simd schedule(static) reduction(+ : clipped) num_threads(threads_for(n, n))
  for (int64_t i = 0; i < n; ++i) {
    const float x = apply_one(pw[i], pg[i], pm[i], pv[i], s, neg_lr, h);
    clipped += std::fabs(x) > 1.0f;
  }
  if (stats != nullptr) {
    stats->count = n, stats->sum = static_cast<double>(s) * n, stats->lo = s, stats->hi = s, stats->clipped = clipped;
  }
}

void apply_vector(torch::Tensor w, torch::Tensor g, torch::Tensor m, torch::Tensor v, double beta1, double beta2,
                  double eps, double weight_decay, double lr, double ratio, torch::Tensor stats) {
  for (auto* t : {&w, &g, &m, &v}) check(*t, "tensor");
  if (w.numel() == 0) return;
  TrustStats t;
  apply_vector_raw(w.data_ptr<float>(), g.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(), w.numel(),
                   make_hyper(beta1, beta2, eps, weight_decay), static_cast<float>(-lr), static_cast<float>(ratio),
                   stats.numel() > 0 ? &t : nullptr);
  if (stats.numel() > 0) write_stats(stats, t);
}

// max that propagates NaN (torch.max's and clamp's semantics, unlike max_ign above).
inline float max_nan(float a, float b) { return (a != a || b != b) ? NAN : (a > b ? a : b); }

// The trust ratios pass 2 reads, from a matrix's (reduced) maxima in MERIT's slot layout
// [row_w (r) | row_u (r) | col_w (c) | col_u (c)]: ratio w/u clamped below by the tensor ratio
// max(row_w)/max(row_u), and -1 where either maximum is 0. The same floats as the torch
// formulation in cpu_kernel.ratio_tables_reference (IEEE division; clamp and max propagate
// NaN), without its dozen small tensor operations per matrix.
void ratio_matrix_raw(const float* p, int64_t r, int64_t c, float* row, float* col) {
  const float *rw = p, *ru = p + r, *cw = p + 2 * r, *cu = p + 2 * r + c;
  float mw = rw[0], mu = ru[0];
  for (int64_t i = 1; i < r; ++i) mw = max_nan(mw, rw[i]), mu = max_nan(mu, ru[i]);
  const float floor = mw / mu;
  auto fill = [floor](const float* w, const float* u, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = (w[i] == 0.0f || u[i] == 0.0f) ? -1.0f : max_nan(w[i] / u[i], floor);
  };
  fill(rw, ru, row, r);
  fill(cw, cu, col, c);
}

std::vector<torch::Tensor> ratio_matrix(torch::Tensor slot, int64_t r, int64_t c) {
  check(slot, "slot");
  TORCH_CHECK(r > 0 && c > 0 && slot.numel() >= 2 * (r + c), "merit_cpu: slot too small");
  auto row = torch::empty({r}, slot.options()), col = torch::empty({c}, slot.options());
  ratio_matrix_raw(slot.data_ptr<float>(), r, c, row.data_ptr<float>(), col.data_ptr<float>());
  return {row, col};
}

// The tensor-level ratio of a vector: max|w| / max|u|, 1 if either is 0 (vector_trust_ratio).
inline float ratio_vector(const float* slot) {
  return (slot[0] == 0.0f || slot[1] == 0.0f) ? 1.0f : slot[0] / slot[1];
}

// A whole optimizer group in one call (a single device's MERIT step): per tensor, pass 1, the
// trust ratios, pass 2, without a Python round trip between them. ``row_len[i]`` = C*K of a
// matrix (0 for a vector), ``inner[i]`` = K. ``policy``: 0 "skip" (a tensor with a non-finite
// gradient is left untouched), 1 "propagate" (stepped anyway), 2 "raise" (pass 1 of every
// tensor first; if any gradient is not finite nothing is written). ``stats``: empty, or an
// (n, 5) float64 tensor that receives each tensor's trust-ratio statistics. Returns the
// indices of the tensors with a non-finite gradient.
std::vector<int64_t> step_tensors(std::vector<torch::Tensor> ws, std::vector<torch::Tensor> gs,
                                  std::vector<torch::Tensor> ms, std::vector<torch::Tensor> vs,
                                  std::vector<int64_t> row_len, std::vector<int64_t> inner, double beta1, double beta2,
                                  double eps, double weight_decay, double lr, int64_t policy, torch::Tensor stats) {
  const size_t n = ws.size();
  TORCH_CHECK(gs.size() == n && ms.size() == n && vs.size() == n && row_len.size() == n && inner.size() == n,
              "merit_cpu: step_tensors needs lists of one length");
  TORCH_CHECK(policy >= 0 && policy <= 2, "merit_cpu: policy must be 0 (skip), 1 (propagate) or 2 (raise)");
  const bool track = stats.numel() > 0;
  if (track) {
    TORCH_CHECK(stats.scalar_type() == torch::kFloat64 && stats.is_contiguous() &&
                    stats.numel() == static_cast<int64_t>(5 * n),
                "merit_cpu: stats must be a contiguous float64 tensor of 5 per tensor");
  }
  for (size_t i = 0; i < n; ++i) {
    for (auto* t : {&ws[i], &gs[i], &ms[i], &vs[i]}) check(*t, "tensor");
    const int64_t e = ws[i].numel();
    TORCH_CHECK(gs[i].numel() == e && ms[i].numel() == e && vs[i].numel() == e, "merit_cpu: sizes differ");
    TORCH_CHECK(row_len[i] == 0 || (inner[i] > 0 && row_len[i] % inner[i] == 0 && e % row_len[i] == 0),
                "merit_cpu: a matrix's size must be a multiple of its row length");
  }
  const Hyper h = make_hyper(beta1, beta2, eps, weight_decay);
  const float neg_lr = static_cast<float>(-lr);
  std::vector<int64_t> bad;
  // one scratch for every tensor's maxima ("raise": all of them are kept until pass 2)
  std::vector<size_t> offset(n + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    const int64_t rows = row_len[i] ? ws[i].numel() / row_len[i] * inner[i] : 0;
    offset[i + 1] = offset[i] + (row_len[i] ? 2 * (rows + row_len[i]) : 2);
  }
  std::vector<float> slots(policy == 2 ? offset[n] : 0), ratios;
  auto statistics = [&](size_t i, float* slot) {  // pass 1 into a zeroed slot -> non-finite gradient?
    const int64_t e = ws[i].numel();
    const float *pw = ws[i].data_ptr<float>(), *pg = gs[i].data_ptr<float>(), *pm = ms[i].data_ptr<float>(),
                *pv = vs[i].data_ptr<float>();
    if (row_len[i] == 0) return stats_vector_raw(pw, pg, pm, pv, e, h, slot);
    const int64_t r = e / row_len[i] * inner[i], c = row_len[i];
    return stats_matrix_raw(pw, pg, pm, pv, e, 0, c, inner[i], h, slot, slot + r, slot + 2 * r, slot + 2 * r + c);
  };
  auto apply = [&](size_t i, const float* slot) {  // trust ratios, then pass 2
    const int64_t e = ws[i].numel();
    float *pw = ws[i].data_ptr<float>(), *pm = ms[i].data_ptr<float>(), *pv = vs[i].data_ptr<float>();
    const float* pg = gs[i].data_ptr<float>();
    TrustStats t;
    TrustStats* tp = track ? &t : nullptr;
    if (row_len[i] == 0) {
      apply_vector_raw(pw, pg, pm, pv, e, h, neg_lr, ratio_vector(slot), tp);
    } else {
      const int64_t r = e / row_len[i] * inner[i], c = row_len[i];
      ratios.resize(static_cast<size_t>(r + c));
      if (e > 0) ratio_matrix_raw(slot, r, c, ratios.data(), ratios.data() + r);
      apply_matrix_raw(pw, pg, pm, pv, e, 0, c, inner[i], h, neg_lr, ratios.data(), ratios.data() + r, tp);
    }
    if (track) write_stats(stats.data_ptr<double>() + 5 * i, e == 0 ? TrustStats{} : t);
  };
  if (policy == 2) {
    for (size_t i = 0; i < n; ++i)
      if (statistics(i, slots.data() + offset[i])) bad.push_back(static_cast<int64_t>(i));
    if (!bad.empty()) return bad;
    for (size_t i = 0; i < n; ++i) apply(i, slots.data() + offset[i]);
    return bad;
  }
  // "skip" / "propagate": each tensor's pass 2 right after its pass 1, while the tensor may
  // still be in the last-level cache
  std::vector<float> slot;
  for (size_t i = 0; i < n; ++i) {
    slot.assign(offset[i + 1] - offset[i], 0.0f);
    const bool b = statistics(i, slot.data());
    if (b) bad.push_back(static_cast<int64_t>(i));
    if (b && policy == 0) {
      if (track) std::fill_n(stats.data_ptr<double>() + 5 * i, 5, 0.0);
      continue;
    }
    apply(i, slot.data());
  }
  return bad;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "MERIT's fused two-pass CPU kernel (merit_ds)";
  mod.def("stats_matrix", &stats_matrix, "pass 1, matrix fragment");
  mod.def("stats_vector", &stats_vector, "pass 1, vector fragment");
  mod.def("apply_matrix", &apply_matrix, "pass 2, matrix fragment");
  mod.def("apply_vector", &apply_vector, "pass 2, vector fragment");
  mod.def("ratio_matrix", &ratio_matrix, "trust-ratio tables of a matrix from its maxima");
  // the group step touches no Python object: other Python threads (the loop's prefetching loader,
  // its background checkpoint hashing) run meanwhile
  mod.def("step_tensors", &step_tensors, "a whole group: pass 1, trust ratios, pass 2 per tensor",
          py::call_guard<py::gil_scoped_release>());
}
