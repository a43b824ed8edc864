// Fused knowledge-distillation loss for CPU tensors.
//
// One at::parallel_for over rows (token positions); a thread handles whole rows.
// Sweep 1 walks a row in blocks of kBlock entries: each block of student and teacher
// logits is loaded once from memory (converted to fp32 and divided by T), and while it
// is in L1 its exponentials are taken against the running maxima (an online softmax:
// sums are rescaled when a maximum grows). The scaled logits and exponentials stay in
// a per-thread scratch that fits L2, so the later sweeps (the jsd mixture and tvd terms,
// and the gradient, written with streaming stores) never touch the inputs again.
// Logit transforms (softcap, logit_scale: LogitTransform) are applied as sweep 1 stages a
// block, so the later sweeps see the transformed logits; the gradient sweep multiplies by
// the student's dz/dx, staged then too.
// The Python layer (kdfast/backends/cpu_ext.py) has already validated every input.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <sys/mman.h>

#include "kd_binding_checks.h"
#include "kd_cpu_common.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>

namespace {

using namespace kdfast_cpu;  // NOLINT: the shared codes and vector helpers
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// The jsd mixture m = beta p_t + (1 - beta) p_s seen from its lighter side A (the teacher when
// beta <= 0.5, else the student) and its heavier side B. Formed in double from the double beta:
// at beta = 1 - 1e-6, 1 - beta formed from a float beta is 1.3 % off.
struct JsdWeights {
  bool teacher_is_a;
  float w_small;  // A's weight, <= 0.5
  float log_w_small;
  float c;                  // log(w_big / w_small) >= 0: past it, A's term dominates m
  float split;              // max(c, 1): where jsd_log_ratios changes formula
  double teacher, student;  // beta and 1 - beta
};

JsdWeights jsd_weights(double beta) {
  const bool teacher_is_a = beta <= 0.5;
  const double w_small = teacher_is_a ? beta : 1.0 - beta;  // exact for beta > 0.5
  const double c = std::log1p(-w_small) - std::log(w_small);
  return {teacher_is_a, static_cast<float>(w_small), static_cast<float>(std::log(w_small)), static_cast<float>(c),
          static_cast<float>(std::max(c, 1.0)), beta, teacher_is_a ? 1.0 - beta : w_small};
}

struct LossParams {
  float temperature;
  float inv_temperature;    // the student's
  float inv_temperature_t;  // the teacher's
  JsdWeights jsd;
  int64_t ignore_index;
  int64_t vocab;
  int64_t vocab_padded;  // vocab rounded up to whole blocks
  float coef_kd;         // d(total loss)/d(row divergence), already divided by the reduction's count
  float coef_ce;         // d(total loss)/d(row cross-entropy)
  bool grad_in_cache;    // the gradient is written over the student logits, which sweep 1 just read
  LogitTransform student_transform, teacher_transform;
};

// Writes src[0:n] as fp32 into dst[0:kBlock], padded with -inf, and returns the block
// maximum (NaN if any entry is NaN). Logits stay unscaled: x - max is exact for the
// entries that matter, and is divided by T only afterwards, so huge logits lose nothing.
// TRANSFORM: what is written (and maximised) is the transformed logit z, and slope (unless
// null) receives dz/dx, which the gradient sweep needs after the raw logits are gone.
template <bool TRANSFORM, typename T>
float stage_block(const T* src, int64_t n, float* dst, const LogitTransform& tr, float* slope) {
  Vec vmax(-kInf);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    // Rows start at new pages, where the hardware prefetcher stalls: run ahead of it.
    __builtin_prefetch(reinterpret_cast<const char*>(src + i) + kPrefetchBytes);
    Vec x = load_float(src + i);
    if constexpr (TRANSFORM) {
      if (slope) tr.slope(x).store(slope + i);
      x = tr.apply(x);
    }
    x.store(dst + i);
    vmax = at::vec::maximum(vmax, x);
  }
  if (i < kBlock) {
    for (int64_t j = i; j < n; ++j) dst[j] = static_cast<float>(src[j]);
    for (int64_t j = n; j < kBlock; ++j) dst[j] = -kInf;
    if constexpr (TRANSFORM) {
      for (int64_t j = i; j < n; j += kLanes) {
        const Vec x = Vec::loadu(dst + j);
        if (slope) tr.slope(x).store(slope + j);
        tr.apply(x).store(dst + j);
      }
      for (int64_t j = n; j < kBlock; ++j) dst[j] = -kInf;  // the padding is no entry: not -cap
    }
    for (; i < kBlock; i += kLanes) vmax = at::vec::maximum(vmax, Vec::loadu(dst + i));
  }
  return hmax(vmax);
}

// Per-thread scratch for one row: logits, the exponentials exp((x - shift) / T) against
// the running shift (maximum) at their block, and those shifts. Forward KL without hard
// labels needs no logits after sweep 1, so they are staged a block at a time in L1
// (block_s, block_t) instead of kept for the whole row. With logit transforms and a
// gradient, dz holds the student's dz/dx (else it is null).
struct Scratch {
  std::unique_ptr<float[]> mem;
  float *xs, *xt, *es, *et, *ref_s, *ref_t, *block_s, *block_t, *dz;
  Scratch(int64_t padded, bool slopes)
      : mem(new float[(slopes ? 5 : 4) * padded + 2 * (padded / kBlock) + 2 * kBlock]) {
    xs = mem.get();
    xt = xs + padded;
    es = xt + padded;
    et = es + padded;
    ref_s = et + padded;
    ref_t = ref_s + padded / kBlock;
    block_s = ref_t + padded / kBlock;
    block_t = block_s + kBlock;
    dz = slopes ? block_t + kBlock : nullptr;
  }
};

// Everything is kept relative to the row maxima ("shifts"), so that the divergence is a
// sum of small terms instead of a difference of two log-sum-exps of the size of the logits.
struct RowStats {
  float shift_s = 0, shift_t = 0;  // running maxima of s and t; 0 while the row is all -inf so far
  bool seen_s = false, seen_t = false;
  double zs = 0, zt = 0;  // sum exp((x - shift) / T)
  double w = 0;           // forward: sum e_t (a_t - a_s); reverse: sum e_s (a_s - a_t); a = (x - shift) / T
  double z1 = 0;          // hard labels: sum exp(s - shift_s), at T = 1
  float log_zs = 0, log_zt = 0, log_z1 = 0, kd = 0, kl_student_mix = 0;
  float mass_below = 0, mass_above = 0;  // tvd: the student's mass where p_s < p_t (> p_t), + half of p_s = p_t
  double log_norm_s = 0, log_norm_t = 0;  // p = exp((x - shift) / T - log_norm): log zs, log zt
  bool finite = true;  // no NaN or +inf seen
};

// Sweep 1. Returns false if the row has no softmax (NaN, +inf, or only -inf).
template <int64_t DIV, bool HARD, bool TRANSFORM, typename S, typename T>
bool online_softmax(const S* s_row, const T* t_row, Scratch& sc, const LossParams& p, RowStats& st) {
  constexpr bool kKeepLogits = DIV != kForwardKL || HARD;
  const Vec zero(0.f), inv_temp(p.inv_temperature), inv_temp_t(p.inv_temperature_t);
  for (int64_t b = 0, blk = 0; b < p.vocab_padded; b += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, p.vocab - b);
    float* x_s = kKeepLogits ? sc.xs + b : sc.block_s;
    float* x_t = kKeepLogits ? sc.xt + b : sc.block_t;
    const float bm_s = stage_block<TRANSFORM>(s_row + b, n, x_s, p.student_transform, sc.dz ? sc.dz + b : nullptr);
    const float bm_t = stage_block<TRANSFORM>(t_row + b, n, x_t, p.teacher_transform, nullptr);
    if (std::isnan(bm_s) || std::isnan(bm_t) || bm_s == kInf || bm_t == kInf) {
      st.finite = false;
      return false;
    }
    // A larger maximum: move the shifts, rescaling what was summed against the old ones
    // (nothing was, while a side has seen only -inf).
    const bool grow_s = bm_s != -kInf && (!st.seen_s || bm_s > st.shift_s);
    const bool grow_t = bm_t != -kInf && (!st.seen_t || bm_t > st.shift_t);
    if (grow_s || grow_t) {
      const float new_s = grow_s ? bm_s : st.shift_s, new_t = grow_t ? bm_t : st.shift_t;
      const double da_s = (static_cast<double>(new_s) - st.shift_s) * p.inv_temperature;
      const double da_t = (static_cast<double>(new_t) - st.shift_t) * p.inv_temperature_t;
      const double f_s = st.seen_s ? std::exp(-da_s) : 0.0, f_t = st.seen_t ? std::exp(-da_t) : 0.0;
      // A weight that underflowed to 0 adds nothing, even to an infinite w (a side -inf
      // where the other had mass): 0 * inf would make the row NaN.
      if constexpr (DIV == kForwardKL) st.w = f_t > 0 ? f_t * (st.w - st.zt * (da_t - da_s)) : 0.0;
      if constexpr (DIV == kReverseKL) st.w = f_s > 0 ? f_s * (st.w - st.zs * (da_s - da_t)) : 0.0;
      if constexpr (HARD) st.z1 *= st.seen_s ? std::exp(static_cast<double>(st.shift_s) - new_s) : 0.0;
      st.zs *= f_s;
      st.zt *= f_t;
      st.shift_s = new_s;
      st.shift_t = new_t;
      st.seen_s |= grow_s;
      st.seen_t |= grow_t;
    }
    sc.ref_s[blk] = st.seen_s ? st.shift_s : -kInf;
    sc.ref_t[blk] = st.seen_t ? st.shift_t : -kInf;
    const Vec ms(st.shift_s), mt(st.shift_t);
    Vec vzs(0.f), vzt(0.f), vw(0.f), vz1(0.f);
    for (int64_t i = 0; i < kBlock; i += kLanes) {
      const Vec ds = Vec::loadu(x_s + i) - ms, dt = Vec::loadu(x_t + i) - mt;
      const Vec as = ds * inv_temp, at = dt * inv_temp_t;
      const Vec es = as.exp_u20(), et = at.exp_u20();
      es.store(sc.es + b + i);
      et.store(sc.et + b + i);
      vzs += es;
      vzt += et;
      // 0 * log 0 = 0: entries with zero weight contribute nothing, even at -inf.
      if constexpr (DIV == kForwardKL) vw += Vec::blendv(zero, et * (at - as), et > zero);
      if constexpr (DIV == kReverseKL) vw += Vec::blendv(zero, es * (as - at), es > zero);
      if constexpr (HARD) vz1 += ds.exp_u20();
    }
    st.zs += hsum(vzs);
    st.zt += hsum(vzt);
    if constexpr (DIV == kForwardKL || DIV == kReverseKL) st.w += hsum(vw);
    if constexpr (HARD) st.z1 += hsum(vz1);
  }
  if (!st.seen_s || !st.seen_t) return false;
  st.log_norm_s = std::log(st.zs);
  st.log_norm_t = std::log(st.zt);
  st.log_zs = static_cast<float>(st.log_norm_s);
  st.log_zt = static_cast<float>(st.log_norm_t);
  // KL(p_t || p_s) = E_t[a_t - a_s] - log zt + log zs (the shifts cancel), and symmetrically.
  if constexpr (DIV == kForwardKL) st.kd = static_cast<float>(st.w / st.zt - std::log(st.zt) + std::log(st.zs));
  if constexpr (DIV == kReverseKL) st.kd = static_cast<float>(st.w / st.zs - std::log(st.zs) + std::log(st.zt));
  if constexpr (HARD) st.log_z1 = static_cast<float>(std::log(st.z1));
  return true;
}

// Normalised probabilities of block blk: p = e * exp((ref - shift) / T - log_norm).
inline Vec block_scale(const float* ref, int64_t blk, float shift, double log_norm, float inv_temperature) {
  return Vec(static_cast<float>(std::exp((static_cast<double>(ref[blk]) - shift) * inv_temperature - log_norm)));
}

// Below it, expm1 cannot overflow; above it, where w_small < e^-64, w_small * expm1(delta)
// = exp(delta + log w_small) - w_small without cancellation.
constexpr float kJsdExpm1Limit = 64.f;

// (log m - log p_t, log m - log p_s) without the cancellation of log m - log p in fp32.
// With delta = log p_A - log p_B: up to w.split (B dominates m, or delta <= 1),
// log m - log p_B = log1p(w_small expm1(delta)), whose argument is >= -w_small >= -0.5; beyond
// it, log m - log p_A = log(w_small) + log1p(exp(c - delta)), exp of a number < 0. The other
// side's ratio differs by delta. Entries where both sides are -inf give NaN (their weights are 0).
inline std::pair<Vec, Vec> jsd_log_ratios(Vec log_pt, Vec log_ps, const JsdWeights& w) {
  const Vec delta = w.teacher_is_a ? log_pt - log_ps : log_ps - log_pt;
  const Vec w_small(w.w_small), log_w_small(w.log_w_small), near_b = delta <= Vec(w.split);
  const Vec e = Vec::blendv(Vec(w.c) - delta, delta + log_w_small, near_b).exp();
  const Vec shifted = Vec::blendv(w_small * delta.expm1(), e - w_small, delta > Vec(kJsdExpm1Limit));
  const Vec log1p = Vec::blendv(e, shifted, near_b).log1p();
  const Vec ratio_a = Vec::blendv(log1p + log_w_small, log1p - delta, near_b);
  const Vec ratio_b = Vec::blendv(ratio_a + delta, log1p, near_b);
  return w.teacher_is_a ? std::make_pair(ratio_a, ratio_b) : std::make_pair(ratio_b, ratio_a);
}

// Sweep 2 (jsd, tvd), once both normalisers are known: term(i, ps, pt, acc) for every vector of
// entries, which adds to N vector accumulators; returns their sums (in double across blocks).
template <size_t N, typename Term>
std::array<double, N> mixture_sweep(const Scratch& sc, const LossParams& p, const RowStats& st, Term&& term) {
  std::array<double, N> sums{};
  for (int64_t b = 0, blk = 0; b < p.vocab_padded; b += kBlock, ++blk) {
    const Vec scale_s = block_scale(sc.ref_s, blk, st.shift_s, st.log_norm_s, p.inv_temperature);
    const Vec scale_t = block_scale(sc.ref_t, blk, st.shift_t, st.log_norm_t, p.inv_temperature_t);
    std::array<Vec, N> acc;
    acc.fill(Vec(0.f));
    for (int64_t i = b; i < b + kBlock; i += kLanes) {
      term(i, Vec::loadu(sc.es + i) * scale_s, Vec::loadu(sc.et + i) * scale_t, acc);
    }
    for (size_t k = 0; k < N; ++k) sums[k] += hsum(acc[k]);
  }
  return sums;
}

// jsd: the mixture m = beta p_t + (1 - beta) p_s. log m - log p_s is stored over xt, which the jsd
// gradient no longer needs. Returns (KL(p_t || m), KL(p_s || m)).
std::array<double, 2> jsd_terms(Scratch& sc, const LossParams& p, RowStats& st) {
  const Vec zero(0.f), inv_temp(p.inv_temperature), inv_temp_t(p.inv_temperature_t);
  const Vec ms(st.shift_s), mt(st.shift_t), log_zs(st.log_zs), log_zt(st.log_zt);
  // sum p_t (log m - log p_t) = -KL(p_t || m), and the same for p_s
  const auto [minus_kl_t, minus_kl_s] = mixture_sweep<2>(sc, p, st, [&](int64_t i, Vec ps, Vec pt,
                                                                       std::array<Vec, 2>& acc) {
    const Vec lps = (Vec::loadu(sc.xs + i) - ms) * inv_temp - log_zs;
    const Vec lpt = (Vec::loadu(sc.xt + i) - mt) * inv_temp_t - log_zt;
    const auto [teacher_vs_mix, student_vs_mix] = jsd_log_ratios(lpt, lps, p.jsd);
    student_vs_mix.store(sc.xt + i);
    // 0 * log 0 = 0: entries without mass add nothing (both sides -inf gives NaN ratios).
    acc[0] += Vec::blendv(zero, pt * teacher_vs_mix, pt > zero);
    acc[1] += Vec::blendv(zero, ps * student_vs_mix, ps > zero);
  });
  st.kl_student_mix = static_cast<float>(-minus_kl_s);
  st.kd = static_cast<float>(-p.jsd.teacher * minus_kl_t - p.jsd.student * minus_kl_s);
  return {-minus_kl_t, -minus_kl_s};
}

// d(tvd)/d(s_j / T) / p_s,j = g_j - sum_i p_s,i g_i, g = 0.5 sign(p_s - p_t) (sign(0) = 0, autograd's
// subgradient of |x|), from tvd_terms' masses: sums of positive terms, where 0.5 - sum_i p_s,i g_i would
// cancel when the teacher is near one-hot and the student puts little mass on its token.
inline Vec tvd_factor(Vec ps, Vec pt, Vec mass_below, Vec mass_above) {
  const Vec tied = Vec(0.5f) * (mass_below - mass_above);
  return Vec::blendv(Vec::blendv(tied, Vec(0.f) - mass_above, ps < pt), mass_below, ps > pt);
}

// tvd: 0.5 sum |p_t - p_s|, and the student's mass where p_s < p_t and where p_s > p_t (each plus half
// its mass where they are equal) for the gradient. Returns those three.
std::array<double, 3> tvd_terms(const Scratch& sc, const LossParams& p, RowStats& st) {
  const Vec zero(0.f), half(0.5f);
  const auto [total, below, above] = mixture_sweep<3>(sc, p, st, [&](int64_t, Vec ps, Vec pt,
                                                                     std::array<Vec, 3>& acc) {
    const Vec half_tied = Vec::blendv(zero, half * ps, ps == pt);
    acc[0] += (pt - ps).abs();
    acc[1] += Vec::blendv(half_tied, ps, ps < pt);
    acc[2] += Vec::blendv(half_tied, ps, ps > pt);
  });
  st.kd = static_cast<float>(0.5 * total);
  st.mass_below = static_cast<float>(below);
  st.mass_above = static_cast<float>(above);
  return {0.5 * total, below, above};
}

// Final sweep: grad = coef_kd_over_t * d(kd)/d(s / T) + coef_ce * d(ce)/ds, in the student's dtype
// (times dz/dx with logit transforms: s is then z).
template <int64_t DIV, bool HARD, bool TRANSFORM, typename S>
void write_gradient(const Scratch& sc, const LossParams& p, const RowStats& st, int64_t label, S* grad,
                    float coef_kd_over_t, float coef_ce_row) {
  const Vec zero(0.f), inv_temp(p.inv_temperature), inv_temp_t(p.inv_temperature_t), kd(st.kd),
      kl_s(st.kl_student_mix), mass_below(st.mass_below), mass_above(st.mass_above);
  const Vec ms(st.shift_s), mt(st.shift_t), log_zs(st.log_zs), log_zt(st.log_zt), log_z1(st.log_z1);
  const Vec coef_kd(coef_kd_over_t), coef_ce(coef_ce_row), student_weight(static_cast<float>(p.jsd.student));
  // Streaming stores bypass the cache: a win for a cold buffer, a loss over cached logits.
  const bool stream = !p.grad_in_cache && reinterpret_cast<uintptr_t>(grad) % (kLanes * sizeof(S)) == 0;
  for (int64_t b = 0, blk = 0; b < p.vocab; b += kBlock, ++blk) {
    const Vec scale_s = block_scale(sc.ref_s, blk, st.shift_s, st.log_norm_s, p.inv_temperature);
    const Vec scale_t = block_scale(sc.ref_t, blk, st.shift_t, st.log_norm_t, p.inv_temperature_t);
    for (int64_t i = b; i < std::min(b + kBlock, p.vocab); i += kLanes) {
      const Vec ps = Vec::loadu(sc.es + i) * scale_s;
      Vec d;
      if constexpr (DIV == kForwardKL) {
        d = ps - Vec::loadu(sc.et + i) * scale_t;
      } else if constexpr (DIV == kReverseKL) {
        const Vec lps = (Vec::loadu(sc.xs + i) - ms) * inv_temp - log_zs;
        const Vec lpt = (Vec::loadu(sc.xt + i) - mt) * inv_temp_t - log_zt;
        d = Vec::blendv(zero, ps * (lps - lpt - kd), ps > zero);
      } else if constexpr (DIV == kTVD) {
        d = ps * tvd_factor(ps, Vec::loadu(sc.et + i) * scale_t, mass_below, mass_above);
      } else {
        // log p_s - log m = -(log m - log p_s), which jsd_terms stored over xt.
        const Vec student_vs_mix = Vec::loadu(sc.xt + i);
        d = Vec::blendv(zero, student_weight * ps * (zero - student_vs_mix - kl_s), ps > zero);
      }
      Vec g = d * coef_kd;
      if constexpr (HARD) {
        // softmax(s) at T = 1 minus the one-hot label.
        Vec p1 = (Vec::loadu(sc.xs + i) - ms - log_z1).exp_u20();
        if (static_cast<uint64_t>(label - i) < static_cast<uint64_t>(kLanes)) {
          alignas(64) float onehot[kLanes] = {};
          onehot[label - i] = 1.f;
          p1 = p1 - Vec::loadu(onehot);
        }
        g = g + coef_ce * p1;
      }
      if constexpr (TRANSFORM) g = g * Vec::loadu(sc.dz + i);
      if (i + kLanes <= p.vocab) {
        store_grad(grad + i, g, stream);
      } else {  // the last, partial vector
        alignas(64) float tail[kLanes];
        g.store(tail);
        for (int64_t j = i; j < p.vocab; ++j) grad[j] = static_cast<S>(tail[j - i]);
      }
    }
  }
}

template <typename S>
void fill_row(S* grad, int64_t n, float value) {
  std::fill(grad, grad + n, static_cast<S>(value));
}

template <int64_t DIV, bool HARD, bool TRANSFORM, typename S, typename T>
void kd_rows(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels,
             const c10::optional<at::Tensor>& grad, const LossParams& p, float* kd_out, float* ce_out) {
  const Rows<const S> s_rows(student);
  const Rows<const T> t_rows(teacher);
  const int64_t n_rows = student.size(0) * student.size(1);
  std::unique_ptr<Rows<S>> g_rows;
  if (grad) g_rows = std::make_unique<Rows<S>>(*grad);
  const int64_t grain = std::max<int64_t>(1, 65536 / p.vocab_padded);
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    Scratch sc(p.vocab_padded, TRANSFORM && g_rows);
    for (int64_t r = begin; r < end; ++r) {
      S* grad_row = g_rows ? g_rows->row(r) : nullptr;
      const int64_t label = labels ? labels[r] : p.ignore_index;
      if (labels && label == p.ignore_index) {  // ignored rows are not read at all
        kd_out[r] = 0.f;
        ce_out[r] = 0.f;
        if (grad_row) fill_row(grad_row, p.vocab, 0.f);
        continue;
      }
      RowStats st;
      // Labels decide which rows count even without the hard term; one out of range makes
      // its row NaN (the Python layer rejects them on CPU tensors, but a direct call may not).
      const bool label_ok = !labels || (label >= 0 && label < p.vocab);
      if (!online_softmax<DIV, HARD, TRANSFORM>(s_rows.row(r), t_rows.row(r), sc, p, st) || !label_ok) {
        kd_out[r] = kNaN;
        ce_out[r] = HARD ? kNaN : 0.f;
        if (grad_row) fill_row(grad_row, p.vocab, kNaN);
        continue;
      }
      if constexpr (DIV == kJSD) jsd_terms(sc, p, st);
      if constexpr (DIV == kTVD) tvd_terms(sc, p, st);
      kd_out[r] = st.kd;
      ce_out[r] = HARD ? st.shift_s - sc.xs[label] + st.log_z1 : 0.f;
      if (grad_row) {  // d(s / T)/ds = 1 / T
        write_gradient<DIV, HARD, TRANSFORM, S>(sc, p, st, label, grad_row, p.coef_kd * p.inv_temperature, p.coef_ce);
      }
    }
    stream_fence();
  });
}

template <typename Fn>
void dispatch_divergence(int64_t divergence, bool hard, Fn&& fn) {
  auto with_hard = [&](auto div_tag) {
    if (hard) {
      fn(div_tag, std::true_type{});
    } else {
      fn(div_tag, std::false_type{});
    }
  };
  switch (divergence) {
    case kForwardKL: return with_hard(std::integral_constant<int64_t, kForwardKL>{});
    case kReverseKL: return with_hard(std::integral_constant<int64_t, kReverseKL>{});
    case kJSD: return with_hard(std::integral_constant<int64_t, kJSD>{});
    case kTVD: return with_hard(std::integral_constant<int64_t, kTVD>{});
    default: TORCH_CHECK(false, "divergence code must be 0, 1, 2 or 3, got ", divergence);
  }
}

// Prepares a freshly allocated gradient buffer: first-touch page faults on an N x V
// buffer cost more than the loss itself. Transparent huge pages cut their number 512-fold,
// and touching each 2 MiB page up front, from all threads, lets the kernel zero the pages
// before the loss runs instead of in the middle of its stores (measured at N=2048,
// V=32000 fp32: 74 ms -> 64 ms for the whole call).
void prepare_fresh_buffer(const at::Tensor& t) {
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last <= first) return;
#ifdef MADV_HUGEPAGE
  madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only: may be ignored
#endif
  char* page = reinterpret_cast<char*>(first);
  at::parallel_for(0, static_cast<int64_t>((last - first) / kHuge), 1, [&](int64_t begin_page, int64_t end_page) {
    for (int64_t i = begin_page; i < end_page; ++i) page[i * kHuge] = 0;  // the loss overwrites it
  });
}

// The storage of the last gradient buffer handed out. Even pre-faulted, fresh pages must
// be zeroed by the OS, a second full write of the gradient (17 of the 56 ms of the call
// above), and torch's CPU allocator returns large blocks to the OS at once. So, like
// torch's CUDA caching allocator, one buffer is kept: once no tensor refers to it any
// more (the step's backward is done) the next call of the same size reuses it.
// Leaked on purpose: freeing it during static destruction could outlive the allocator.
std::mutex buffer_mutex;
c10::Storage* cached_buffer = new c10::Storage();

at::Tensor gradient_buffer(const at::Tensor& like) {
  const auto nbytes = static_cast<size_t>(like.numel()) * like.element_size();
  std::lock_guard<std::mutex> lock(buffer_mutex);
  c10::Storage& cached = *cached_buffer;
  const bool reusable = cached && cached.use_count() == 1 && cached.nbytes() == nbytes;
  if (!reusable) {
    *cached_buffer = c10::Storage();  // a free buffer of another size goes before the new one comes
    const at::Tensor fresh = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
    prepare_fresh_buffer(fresh);
    *cached_buffer = fresh.storage();
  }
  return at::empty({0}, like.options()).set_(cached, 0, like.sizes());
}

void empty_cache() {
  std::lock_guard<std::mutex> lock(buffer_mutex);
  *cached_buffer = c10::Storage();
}

LossParams loss_params(int64_t vocab, double temperature, double teacher_temperature, double beta) {
  LossParams p{};
  p.temperature = static_cast<float>(temperature);
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  p.inv_temperature_t = static_cast<float>(1.0 / teacher_temperature);
  p.jsd = jsd_weights(beta);
  p.vocab = vocab;
  p.vocab_padded = (vocab + kBlock - 1) / kBlock * kBlock;
  return p;
}

std::tuple<at::Tensor, at::Tensor> kd_forward(const at::Tensor& student, const at::Tensor& teacher,
                                              const c10::optional<at::Tensor>& labels,
                                              const c10::optional<at::Tensor>& grad, const at::Tensor& coefs,
                                              double temperature, double teacher_temperature,
                                              int64_t divergence, double beta,
                                              int64_t ignore_index, bool hard, double student_scale,
                                              double student_cap, double teacher_scale, double teacher_cap) {
  TORCH_CHECK(student.device().is_cpu(), "student must be a CPU tensor");
  const int64_t n_rows = kdfast::check_forward_args(student, teacher, labels, grad, coefs, hard);
  const int64_t vocab = student.size(2);
  const at::Tensor coefs_f = coefs.to(at::kFloat).contiguous();

  LossParams p = loss_params(vocab, temperature, teacher_temperature, beta);
  p.ignore_index = ignore_index;
  p.coef_kd = coefs_f.data_ptr<float>()[0];
  p.coef_ce = coefs_f.data_ptr<float>()[1];
  p.grad_in_cache = grad && grad->is_alias_of(student);
  p.student_transform = LogitTransform(student_scale, student_cap);
  p.teacher_transform = LogitTransform(teacher_scale, teacher_cap);
  const bool transform = p.student_transform.on() || p.teacher_transform.on();

  auto kd_out = at::empty({n_rows}, student.options().dtype(at::kFloat));
  auto ce_out = at::empty({n_rows}, student.options().dtype(at::kFloat));
  const int64_t* label_ptr = labels ? labels->data_ptr<int64_t>() : nullptr;

  dispatch_float(student.scalar_type(), "student_logits", [&](auto s_tag) {
    using S = decltype(s_tag);
    dispatch_float(teacher.scalar_type(), "teacher_logits", [&](auto t_tag) {
      using T = decltype(t_tag);
      dispatch_divergence(divergence, hard, [&](auto div_tag, auto hard_tag) {
        dispatch_bool(transform, [&](auto transform_tag) {
          kd_rows<decltype(div_tag)::value, decltype(hard_tag)::value, decltype(transform_tag)::value, S, T>(
              student, teacher, label_ptr, grad, p, kd_out.data_ptr<float>(), ce_out.data_ptr<float>());
        });
      });
    });
  });
  return {kd_out, ce_out};
}

// --- the vocabulary-parallel loss's per-shard kernels (kdfast.distributed; the contract in kdfast.backends) ---
// Each call stages the rows of its (B, M, W) slice again (sweep 1). The statistics are sweep 1's sums; the
// mixture sums (jsd, tvd) and the gradient are taken against the rows' global normalisers, given per row as a
// shift and an offset: log p = (x - shift) / T - offset.

// The statistics' and the row values' fields (kdfast.backends.SHARD_STATS, SHARD_ROWS), checked when the
// extension loads.
enum ShardStat : int64_t { kMaxS, kMaxT, kSumS, kSumT, kSumS1, kCross, kShardStats };
constexpr const char* kShardStatNames[] = {"max_s", "max_t", "sum_s", "sum_t", "sum_s1", "cross"};
enum ShardRow : int64_t {
  kShiftS, kShiftT, kOffsetS, kOffsetT, kOffsetS1, kRowKd, kKlStudentMix, kMassBelow, kMassAbove, kCoefKd, kCoefCe,
  kIgnored, kShardRows
};
constexpr auto kReadEveryRow = [](int64_t) { return false; };
constexpr const char* kShardRowNames[] = {"shift_s", "shift_t", "offset_s", "offset_t", "offset_s1", "kd",
                                          "kl_student_mix", "mass_below", "mass_above", "coef_kd", "coef_ce",
                                          "ignored"};

template <size_t N>
pybind11::dict field_codes(const char* const (&names)[N]) {
  pybind11::dict codes;
  for (size_t i = 0; i < N; ++i) codes[names[i]] = static_cast<int64_t>(i);
  return codes;
}

// One row's values (a column of the (kShardRows, n_rows) float64 tensor).
struct ShardRowValues {
  const double* base;
  int64_t n_rows, row;
  double operator[](ShardRow field) const { return base[field * n_rows + row]; }
};

// Takes the row's global normalisers in place of sweep 1's own (the slice's).
void adopt_global(RowStats& st, const ShardRowValues& v) {
  st.shift_s = static_cast<float>(v[kShiftS]);
  st.shift_t = static_cast<float>(v[kShiftT]);
  st.log_norm_s = v[kOffsetS];
  st.log_norm_t = v[kOffsetT];
  st.log_zs = static_cast<float>(v[kOffsetS]);
  st.log_zt = static_cast<float>(v[kOffsetT]);
  st.log_z1 = static_cast<float>(v[kOffsetS1]);
}

// Runs fn(row, scratch, stats after sweep 1) over the slice's rows, in parallel, but for the rows where
// skip(row) is true (which it handles itself: they are not read).
template <int64_t DIV, bool HARD, typename S, typename T, typename Skip, typename Fn>
void for_each_slice_row(const at::Tensor& student, const at::Tensor& teacher, const LossParams& p, Skip&& skip,
                        Fn&& fn) {
  const Rows<const S> s_rows(student);
  const Rows<const T> t_rows(teacher);
  const int64_t n_rows = student.size(0) * student.size(1);
  at::parallel_for(0, n_rows, std::max<int64_t>(1, 65536 / p.vocab_padded), [&](int64_t begin, int64_t end) {
    Scratch sc(p.vocab_padded, false);
    for (int64_t r = begin; r < end; ++r) {
      if (skip(r)) continue;
      RowStats st;
      // false for a slice that is all -inf on a side (padding: valid here), or that holds NaN or +inf
      online_softmax<DIV, HARD, false>(s_rows.row(r), t_rows.row(r), sc, p, st);
      fn(r, sc, st);
    }
    stream_fence();
  });
}

// Calls fn(S, T, divergence tag, hard tag) for the slices' dtypes, the divergence and hard.
template <typename Fn>
void dispatch_slice(const at::Tensor& student, const at::Tensor& teacher, int64_t divergence, bool hard, Fn&& fn) {
  dispatch_float(student.scalar_type(), "student_logits", [&](auto s_tag) {
    dispatch_float(teacher.scalar_type(), "teacher_logits", [&](auto t_tag) {
      dispatch_divergence(divergence, hard, [&](auto div_tag, auto hard_tag) { fn(s_tag, t_tag, div_tag, hard_tag); });
    });
  });
}

at::Tensor check_shard_rows(const at::Tensor& rows, int64_t n_rows) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kDouble && rows.dim() == 2 &&
                  rows.size(0) == kShardRows && rows.size(1) == n_rows,
              "rows must be a float64 CPU tensor of shape (", static_cast<int64_t>(kShardRows), ", ", n_rows, ")");
  return rows.contiguous();
}

at::Tensor vocab_shard_stats(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                             double teacher_temperature, int64_t divergence, bool hard) {
  TORCH_CHECK(student.device().is_cpu(), "student must be a CPU tensor");
  kdfast::check_rows(student, "student", student);
  kdfast::check_rows(teacher, "teacher", student);
  const int64_t n_rows = student.size(0) * student.size(1);
  const LossParams p = loss_params(student.size(2), temperature, teacher_temperature, 0.5);
  at::Tensor out = at::empty({kShardStats, n_rows}, student.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  dispatch_slice(student, teacher, divergence, hard, [&](auto s_tag, auto t_tag, auto div_tag, auto hard_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    for_each_slice_row<decltype(div_tag)::value, decltype(hard_tag)::value, S, T>(
        student, teacher, p, kReadEveryRow, [&](int64_t r, const Scratch&, const RowStats& st) {
          const double nan = std::numeric_limits<double>::quiet_NaN();  // a NaN or +inf: the row is undefined
          o[kMaxS * n_rows + r] = !st.finite ? nan : st.seen_s ? st.shift_s : -kInf;
          o[kMaxT * n_rows + r] = !st.finite ? nan : st.seen_t ? st.shift_t : -kInf;
          o[kSumS * n_rows + r] = st.zs;
          o[kSumT * n_rows + r] = st.zt;
          o[kSumS1 * n_rows + r] = st.z1;
          o[kCross * n_rows + r] = st.w;
        });
  });
  return out;
}

at::Tensor vocab_shard_mixture(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& rows,
                               double temperature, double teacher_temperature, int64_t divergence, double beta) {
  TORCH_CHECK(student.device().is_cpu(), "student must be a CPU tensor");
  TORCH_CHECK(divergence == kJSD || divergence == kTVD, "the mixture sums are jsd's and tvd's, got divergence ",
              divergence);
  kdfast::check_rows(student, "student", student);
  kdfast::check_rows(teacher, "teacher", student);
  const int64_t n_rows = student.size(0) * student.size(1);
  const at::Tensor values = check_shard_rows(rows, n_rows);
  const LossParams p = loss_params(student.size(2), temperature, teacher_temperature, beta);
  at::Tensor out = at::zeros({3, n_rows}, student.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  dispatch_slice(student, teacher, divergence, false, [&](auto s_tag, auto t_tag, auto div_tag, auto) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    constexpr int64_t DIV = decltype(div_tag)::value;
    if constexpr (DIV == kJSD || DIV == kTVD) {
      for_each_slice_row<DIV, false, S, T>(student, teacher, p, kReadEveryRow, [&](int64_t r, Scratch& sc,
                                                                                  RowStats& st) {
        if (!st.finite) {
          for (int64_t k = 0; k < 3; ++k) o[k * n_rows + r] = std::numeric_limits<double>::quiet_NaN();
          return;
        }
        adopt_global(st, {values.data_ptr<double>(), n_rows, r});
        if constexpr (DIV == kJSD) {
          const auto kl = jsd_terms(sc, p, st);
          o[r] = kl[0];
          o[n_rows + r] = kl[1];
        } else {
          const auto terms = tvd_terms(sc, p, st);
          for (int64_t k = 0; k < 3; ++k) o[k * n_rows + r] = terms[k];
        }
      });
    }
  });
  return out;
}

void vocab_shard_gradient(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                          const at::Tensor& grad, const at::Tensor& rows, double temperature,
                          double teacher_temperature, int64_t divergence, double beta, bool hard) {
  TORCH_CHECK(student.device().is_cpu(), "student must be a CPU tensor");
  kdfast::check_rows(student, "student", student);
  kdfast::check_rows(teacher, "teacher", student);
  kdfast::check_rows(grad, "grad", student);
  TORCH_CHECK(grad.scalar_type() == student.scalar_type(), "grad must have the student's dtype");
  const int64_t n_rows = student.size(0) * student.size(1);
  TORCH_CHECK(labels.device().is_cpu() && labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.numel() == n_rows,
              "labels must be a contiguous int64 CPU tensor with one column index per row");
  const at::Tensor values = check_shard_rows(rows, n_rows);
  LossParams p = loss_params(student.size(2), temperature, teacher_temperature, beta);
  p.grad_in_cache = grad.is_alias_of(student);
  const int64_t* label = labels.data_ptr<int64_t>();
  dispatch_slice(student, teacher, divergence, hard, [&](auto s_tag, auto t_tag, auto div_tag, auto hard_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    constexpr int64_t DIV = decltype(div_tag)::value;
    constexpr bool HARD = decltype(hard_tag)::value;
    const Rows<S> g_rows(grad);
    const double* base = values.data_ptr<double>();
    auto ignored = [&](int64_t r) {  // not read: a zero gradient row, whatever the row holds
      const bool skip = ShardRowValues{base, n_rows, r}[kIgnored] != 0;
      if (skip) fill_row(g_rows.row(r), p.vocab, 0.f);
      return skip;
    };
    for_each_slice_row<DIV, HARD, S, T>(student, teacher, p, ignored, [&](int64_t r, Scratch& sc, RowStats& st) {
      const ShardRowValues v{base, n_rows, r};
      if (!st.finite) {  // a NaN or +inf in the slice: a NaN row
        fill_row(g_rows.row(r), p.vocab, kNaN);
        return;
      }
      adopt_global(st, v);
      if constexpr (DIV == kJSD) jsd_terms(sc, p, st);  // for log m - log p_s; its sums are the slice's
      st.kd = static_cast<float>(v[kRowKd]);
      st.kl_student_mix = static_cast<float>(v[kKlStudentMix]);
      st.mass_below = static_cast<float>(v[kMassBelow]);
      st.mass_above = static_cast<float>(v[kMassAbove]);
      write_gradient<DIV, HARD, false, S>(sc, p, st, label[r], g_rows.row(r), static_cast<float>(v[kCoefKd]),
                                          static_cast<float>(v[kCoefCe]));
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdfast: fused knowledge-distillation loss, CPU kernel";
  // Checked against kdfast.backends.DIVERGENCE_CODES when the extension loads.
  m.attr("DIVERGENCE_CODES") = divergence_codes();
  m.def("kd_forward", &kd_forward, "Per-row divergence and cross-entropy, and optionally the weighted gradient",
        py::arg("student"), py::arg("teacher"), py::arg("labels"), py::arg("grad"), py::arg("coefs"),
        py::arg("temperature"), py::arg("teacher_temperature"), py::arg("divergence"), py::arg("beta"),
        py::arg("ignore_index"), py::arg("hard"), py::arg("student_scale") = 1.0, py::arg("student_cap") = 0.0,
        py::arg("teacher_scale") = 1.0, py::arg("teacher_cap") = 0.0, py::call_guard<py::gil_scoped_release>());
  m.def("gradient_buffer", &gradient_buffer,
        "A contiguous buffer of like's shape and dtype: the last one handed out if no tensor uses it any more",
        py::arg("like"), py::call_guard<py::gil_scoped_release>());
  m.def("empty_cache", &empty_cache, "Releases the gradient buffer kept for reuse");
  // The vocabulary-parallel loss's per-shard kernels; their fields are checked against kdfast.backends.
  m.attr("SHARD_STATS") = field_codes(kShardStatNames);
  m.attr("SHARD_ROWS") = field_codes(kShardRowNames);
  m.def("vocab_shard_stats", &vocab_shard_stats, "Per-row statistics of a slice of the vocabulary",
        py::arg("student"), py::arg("teacher"), py::arg("temperature"), py::arg("teacher_temperature"),
        py::arg("divergence"), py::arg("hard"), py::call_guard<py::gil_scoped_release>());
  m.def("vocab_shard_mixture", &vocab_shard_mixture, "A slice's jsd or tvd sums against the global normalisers",
        py::arg("student"), py::arg("teacher"), py::arg("rows"), py::arg("temperature"),
        py::arg("teacher_temperature"), py::arg("divergence"), py::arg("beta"),
        py::call_guard<py::gil_scoped_release>());
  m.def("vocab_shard_gradient", &vocab_shard_gradient, "A slice's gradient against the global normalisers",
        py::arg("student"), py::arg("teacher"), py::arg("labels"), py::arg("grad"), py::arg("rows"),
        py::arg("temperature"), py::arg("teacher_temperature"), py::arg("divergence"), py::arg("beta"),
        py::arg("hard"), py::call_guard<py::gil_scoped_release>());
}
