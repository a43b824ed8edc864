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
    if (std::isnan(bm_s) || std::isnan(bm_t) || bm_s == kInf || bm_t == kInf) return false;
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
  st.log_zs = static_cast<float>(std::log(st.zs));
  st.log_zt = static_cast<float>(std::log(st.zt));
  // KL(p_t || p_s) = E_t[a_t - a_s] - log zt + log zs (the shifts cancel), and symmetrically.
  if constexpr (DIV == kForwardKL) st.kd = static_cast<float>(st.w / st.zt - std::log(st.zt) + std::log(st.zs));
  if constexpr (DIV == kReverseKL) st.kd = static_cast<float>(st.w / st.zs - std::log(st.zs) + std::log(st.zt));
  if constexpr (HARD) st.log_z1 = static_cast<float>(std::log(st.z1));
  return true;
}

// Normalised probabilities of block blk: p = e * exp((ref - shift) / T) / z.
inline Vec block_scale(const float* ref, int64_t blk, float shift, double z, float inv_temperature) {
  return Vec(static_cast<float>(std::exp((static_cast<double>(ref[blk]) - shift) * inv_temperature) / z));
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
    const Vec scale_s = block_scale(sc.ref_s, blk, st.shift_s, st.zs, p.inv_temperature);
    const Vec scale_t = block_scale(sc.ref_t, blk, st.shift_t, st.zt, p.inv_temperature_t);
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
// gradient no longer needs.
void jsd_terms(Scratch& sc, const LossParams& p, RowStats& st) {
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
}

// d(tvd)/d(s_j / T) / p_s,j = g_j - sum_i p_s,i g_i, g = 0.5 sign(p_s - p_t) (sign(0) = 0, autograd's
// subgradient of |x|), from tvd_terms' masses: sums of positive terms, where 0.5 - sum_i p_s,i g_i would
// cancel when the teacher is near one-hot and the student puts little mass on its token.
inline Vec tvd_factor(Vec ps, Vec pt, Vec mass_below, Vec mass_above) {
  const Vec tied = Vec(0.5f) * (mass_below - mass_above);
  return Vec::blendv(Vec::blendv(tied, Vec(0.f) - mass_above, ps < pt), mass_below, ps > pt);
}

// tvd: 0.5 sum |p_t - p_s|, and the student's mass where p_s < p_t and where p_s > p_t (each plus half
// its mass where they are equal) for the gradient.
void tvd_terms(const Scratch& sc, const LossParams& p, RowStats& st) {
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
}

// Final sweep: grad = coef_kd * d(kd)/ds + coef_ce * d(ce)/ds, in the student's dtype
// (times dz/dx with logit transforms: s is then z).
template <int64_t DIV, bool HARD, bool TRANSFORM, typename S>
void write_gradient(const Scratch& sc, const LossParams& p, const RowStats& st, int64_t label, S* grad) {
  const Vec zero(0.f), inv_temp(p.inv_temperature), inv_temp_t(p.inv_temperature_t), kd(st.kd),
      kl_s(st.kl_student_mix), mass_below(st.mass_below), mass_above(st.mass_above);
  const Vec ms(st.shift_s), mt(st.shift_t), log_zs(st.log_zs), log_zt(st.log_zt), log_z1(st.log_z1);
  const Vec coef_kd(p.coef_kd * p.inv_temperature);  // d(s/T)/ds = 1/T
  const Vec coef_ce(p.coef_ce), student_weight(static_cast<float>(p.jsd.student));
  // Streaming stores bypass the cache: a win for a cold buffer, a loss over cached logits.
  const bool stream = !p.grad_in_cache && reinterpret_cast<uintptr_t>(grad) % (kLanes * sizeof(S)) == 0;
  for (int64_t b = 0, blk = 0; b < p.vocab; b += kBlock, ++blk) {
    const Vec scale_s = block_scale(sc.ref_s, blk, st.shift_s, st.zs, p.inv_temperature);
    const Vec scale_t = block_scale(sc.ref_t, blk, st.shift_t, st.zt, p.inv_temperature_t);
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
      if (grad_row) write_gradient<DIV, HARD, TRANSFORM, S>(sc, p, st, label, grad_row);
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

  LossParams p{};
  p.temperature = static_cast<float>(temperature);
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  p.inv_temperature_t = static_cast<float>(1.0 / teacher_temperature);
  p.jsd = jsd_weights(beta);
  p.ignore_index = ignore_index;
  p.vocab = vocab;
  p.vocab_padded = (vocab + kBlock - 1) / kBlock * kBlock;
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
}
