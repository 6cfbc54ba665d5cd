// The policy-loss family on token log-probs: one block per sequence, forward and backward fused.
// Sweep 1 (sequence-level losses and seq-mean-token-mean only) gathers the token count, GSPO's
// summed log-ratio and NPO's log-likelihood gap; sweep 2 computes each token's loss and gradient
// (written at once, so the backward is a scale) and the metric sums. Every block reduction runs
// in a fixed order over a fixed thread layout, so the loss has the same bits run to run.
// The formulas mirror negkernels/triton/logprobs.py; conventions are documented there.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "device_guard.cuh"
#include "load_value.cuh"
#include "logprobs.h"

namespace negkernels {
namespace {

constexpr int kLossThreads = 256;

// Sum over the block in a fixed order (warp shuffles, then warp totals in order); every thread
// gets the result.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kLossThreads / 32; ++w) total += shared[w];
  return total;
}

// min/max that return NaN when either side is NaN (fminf/fmaxf drop a NaN operand): NaN in the
// data must reach the loss.
__device__ __forceinline__ float nan_min(float x, float y) { return (x != x || y != y) ? x + y : fminf(x, y); }
__device__ __forceinline__ float nan_max(float x, float y) { return (x != x || y != y) ? x + y : fmaxf(x, y); }

__device__ __forceinline__ float importance_weight(float w, const PolicyLossArgs& a) {
  if (a.is_mode == kTruncate) return nan_min(w, a.is_hi);
  return (w >= a.is_lo && w <= a.is_hi) ? w : 0.f;
}

__device__ __forceinline__ float softplus(float x) { return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x))); }
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

struct TokenTerms {
  float value = 0.f, d_logp = 0.f, low = 0.f, high = 0.f, dual = 0.f;
};

// −min(min(ρ, δ)·A, clip(ρ, lo, hi)·A), capped at −c·A for A < 0; value and d/dρ. Ties take the
// unclipped branch; the cap applies only when strictly smaller.
__device__ __forceinline__ TokenTerms clipped_surrogate(float ratio, float adv, const PolicyLossArgs& a) {
  TokenTerms t;
  const float surr1 = nan_min(ratio, a.delta) * adv;
  const float surr2 = nan_min(nan_max(ratio, a.lo), a.hi) * adv;
  const bool use_clipped = surr2 < surr1;
  t.value = -(use_clipped ? surr2 : surr1);
  const float d_clipped = (ratio < a.lo || ratio > a.hi) ? 0.f : 1.f;
  const float d_capped = ratio > a.delta ? 0.f : 1.f;
  float d_ratio = -adv * (use_clipped ? d_clipped : d_capped);
  const float cap = -a.dual_clip * adv;
  if (adv < 0.f && cap < t.value) {
    t.value = cap;
    d_ratio = 0.f;
    t.dual = 1.f;
  }
  t.d_logp = d_ratio;  // multiplied by dρ/dlogp by the caller
  t.low = (adv < 0.f && ratio < a.lo) ? 1.f : 0.f;
  t.high = (adv > 0.f && ratio > a.hi) ? 1.f : 0.f;
  return t;
}

__device__ __forceinline__ TokenTerms token_local_terms(float lp, float ratio, float adv, const PolicyLossArgs& a) {
  TokenTerms t;
  switch (a.loss_type) {
    case kPPO:
      t = clipped_surrogate(ratio, adv, a);
      t.d_logp *= ratio;
      break;
    case kCISPO: {
      float w = nan_min(ratio, a.hi);
      if (a.cispo_two_sided) {
        w = nan_max(w, a.lo);
        t.low = ratio < a.lo ? 1.f : 0.f;
      }
      t.value = -w * adv * lp;
      t.d_logp = -w * adv;
      t.high = ratio > a.hi ? 1.f : 0.f;
      break;
    }
    case kSAPO: {
      const float tau = adv > 0.f ? a.tau_pos : a.tau_neg;
      const float x = tau * (ratio - 1.f);
      const float gate = sigmoid(x);
      t.value = -(4.f / tau) * gate * adv;
      t.d_logp = -4.f * gate * sigmoid(-x) * ratio * adv;  // σ' = σ(x)σ(−x): no 1 − σ cancellation
      break;
    }
    default:  // gpg
      t.value = -adv * lp;
      t.d_logp = -adv;
  }
  return t;
}

// e^x − 1 − x without fp32 cancellation: Taylor series through x^7 for |x| < 0.5, else direct.
__device__ __forceinline__ float exp_minus_one_minus(float x) {
  if (fabsf(x) < 0.5f)
    return x * x * (0.5f + x * (1.f / 6.f + x * (1.f / 24.f + x * (1.f / 120.f + x * (1.f / 720.f + x * (1.f / 5040.f))))));
  return expf(x) - 1.f - x;
}

__device__ __forceinline__ void kl_term(float d, int estimator, float clamp, float* value, float* grad) {
  switch (estimator) {
    case kK1: *value = d; *grad = 1.f; break;
    case kK2: *value = 0.5f * d * d; *grad = d; break;
    case kK3: *value = exp_minus_one_minus(-d); *grad = d - *value; break;  // k3: 1 − e^{−d} = d − k3
    case kAbs: *value = fabsf(d); *grad = d > 0.f ? 1.f : (d < 0.f ? -1.f : 0.f); break;
    default: *value = exp_minus_one_minus(-d); *grad = d;  // k3+: k3 value, k2 gradient
  }
  if (fabsf(*value) > clamp) {  // torch.clamp's rule: the band's edges keep their gradient
    *value = copysignf(clamp, *value);
    *grad = 0.f;
  }
}

// GMPO's clipped log-ratio (a.lo = −clip_low, a.hi = clip_high): clipped on the pessimistic side
// only, 0 where the advantage is 0. `keep` is its derivative in log ρ.
struct GeoMeanTerm {
  float c, keep, low, high;
};

__device__ __forceinline__ GeoMeanTerm geo_mean_log_ratio(float log_ratio, float adv, const PolicyLossArgs& a) {
  GeoMeanTerm g;
  const bool high = adv > 0.f && log_ratio > a.hi, low = adv < 0.f && log_ratio < a.lo;
  g.c = adv == 0.f ? 0.f : (high || low ? fminf(fmaxf(log_ratio, a.lo), a.hi) : log_ratio);
  g.keep = (adv != 0.f && !high && !low) ? 1.f : 0.f;
  g.low = low ? 1.f : 0.f;
  g.high = high ? 1.f : 0.f;
  return g;
}

__global__ void __launch_bounds__(kLossThreads) policy_loss_kernel(const PolicyLossArgs a) {
  __shared__ float shared[kLossThreads / 32];
  const int64_t b = blockIdx.x;
  int64_t start, length;
  if (a.cu_seqlens != nullptr) {
    // Clamped into [0, N]: an unvalidated bad layout gives a wrong loss, never a bad access.
    start = min(max(a.cu_seqlens[b], int64_t(0)), a.n_tokens);
    length = min(max(a.cu_seqlens[b + 1], start), a.n_tokens) - start;
  } else {
    start = b * a.seq_len;
    length = a.seq_len;
  }
  const int dt = a.value_dtype;
  const float adv_seq = a.adv_per_token ? 0.f : load_value(a.advantages, dt, b);
  const float iw_seq = (a.is_mode != kIsNone && !a.iw_per_token) ? importance_weight(load_value(a.is_weights, dt, b), a) : 1.f;
  auto unmasked = [&](int64_t i) { return a.mask == nullptr || a.mask[start + i] != 0; };
  auto iw_at = [&](int64_t i) {
    if (a.is_mode == kIsNone) return 1.f;
    return a.iw_per_token ? importance_weight(load_value(a.is_weights, dt, start + i), a) : iw_seq;
  };

  // GSPO with the bias-corrected KL: s·Σ_t k_t couples every token through s, so the sequence's
  // KL sum is needed before the gradient sweep.
  // GSPO and the sequence-level sapo / cispo share s = exp(mean_t log ρ).
  const bool uses_seq_ratio = a.loss_type == kGSPO || a.sequence_ratio;
  const bool kl_times_seq_ratio = a.kl_bias_correction && a.kl_estimator != kKlNone && uses_seq_ratio;
  float count = 0.f, seq_a = 0.f, seq_b = 0.f;
  const bool geo_mean = a.loss_type == kGeoMean;
  if (a.aggregation == kSeqMeanTokenMean || uses_seq_ratio || a.loss_type == kNPO || geo_mean) {
    float c = 0.f, sa = 0.f, sb = 0.f;
    for (int64_t i = threadIdx.x; i < length; i += kLossThreads) {
      if (!unmasked(i)) continue;
      c += 1.f;
      const float lp = load_value(a.logp, dt, start + i);
      if (uses_seq_ratio) sa += lp - load_value(a.old_logp, dt, start + i);
      if (geo_mean) {
        const float adv = a.adv_per_token ? load_value(a.advantages, dt, start + i) : adv_seq;
        sa += geo_mean_log_ratio(lp - load_value(a.old_logp, dt, start + i), adv, a).c;
        if (a.adv_per_token) sb += adv;
      }
      if (kl_times_seq_ratio) {
        float kl, d_kl;
        kl_term(lp - load_value(a.ref_logp, dt, start + i), a.kl_estimator, a.kl_clamp, &kl, &d_kl);
        sb += a.kl_times_is_weights ? kl * iw_at(i) : kl;
      }
      if (a.loss_type == kNPO) {
        sa += lp - load_value(a.ref_logp, dt, start + i);
        sb += iw_at(i);
      }
    }
    count = block_sum(c, shared);
    seq_a = block_sum(sa, shared);
    seq_b = block_sum(sb, shared);
  }
  const float safe_count = fmaxf(count, 1.f);
  float row_weight = 1.f;
  if (a.aggregation == kSeqMeanTokenMean) row_weight = 1.f / safe_count;
  if (a.aggregation == kSeqMeanTokenSumNorm) row_weight = 1.f / a.norm_constant;
  // Unnormalised: the host divides the loss and scales the gradient by the global normaliser.
  const float grad_weight = row_weight;
  const float seq_ratio = expf(seq_a / safe_count);
  const float seq_adv = a.adv_per_token ? seq_b / safe_count : adv_seq;  // geo_mean's Ā
  const float npo_value = (2.f / a.npo_beta) * softplus(a.npo_beta * seq_a) / safe_count;
  const float npo_grad = (seq_b / safe_count) * 2.f * sigmoid(a.npo_beta * seq_a);

  float acc[kPolicyLossPartials] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t i = threadIdx.x; i < length; i += kLossThreads) {
    const int64_t k = start + i;
    const bool m = unmasked(i);
    const float lp = load_value(a.logp, dt, k);
    const float log_ratio = lp - load_value(a.old_logp, dt, k);
    const float ratio = expf(log_ratio);
    const float adv = a.adv_per_token ? load_value(a.advantages, dt, k) : adv_seq;
    const float iw = iw_at(i);
    TokenTerms t;
    if (a.loss_type == kGSPO) {
      t = clipped_surrogate(seq_ratio, adv, a);
      t.d_logp *= iw * seq_ratio;
    } else if (geo_mean) {  // −Ā·s, gradient through each token's own clipped log-ratio
      const GeoMeanTerm g = geo_mean_log_ratio(log_ratio, adv, a);
      t.value = -seq_adv * seq_ratio;
      t.d_logp = iw * t.value * g.keep;
      t.low = g.low;
      t.high = g.high;
      t.dual = 0.f;
    } else if (a.loss_type == kNPO) {
      t.value = npo_value;
      t.d_logp = npo_grad;
    } else {  // sequence level: s in place of ρ, in token form (dρ/dlogp = ρ ↔ s)
      t = token_local_terms(lp, a.sequence_ratio ? seq_ratio : ratio, adv, a);
      t.d_logp *= iw;
    }
    float token_loss = iw * t.value, d_logp = t.d_logp, kl = 0.f;
    if (a.kl_estimator != kKlNone) {
      float d_kl;
      kl_term(lp - load_value(a.ref_logp, dt, k), a.kl_estimator, a.kl_clamp, &kl, &d_kl);
      if (a.kl_times_is_weights) {
        kl *= iw;
        d_kl *= iw;
      }
      if (kl_times_seq_ratio) {  // d(s·Σ k)/d logp_t = s·(k'_t + Σ k / n)
        d_kl = seq_ratio * (d_kl + seq_b / safe_count);
        kl *= seq_ratio;
      } else if (a.kl_bias_correction) {  // d(ρ·k)/d logp = ρ·(k' + k)
        d_kl = ratio * (d_kl + kl);
        kl *= ratio;
      }
      token_loss += a.kl_coef * kl;
      d_logp += a.kl_coef * d_kl;
    }
    if (a.grad != nullptr) a.grad[k] = m ? d_logp * grad_weight : 0.f;
    if (!m) continue;
    acc[0] += token_loss;
    acc[1] += 1.f;
    acc[2] += t.low;
    acc[3] += t.high;
    acc[4] += t.dual;
    acc[5] += exp_minus_one_minus(log_ratio);
    acc[6] += ratio;
    acc[7] += kl;
  }
  float* out = a.partial + b * kPolicyLossPartials;
  for (int j = 0; j < kPolicyLossPartials; ++j) {
    const float total = block_sum(acc[j], shared);
    if (threadIdx.x == 0) out[j] = j == 0 ? total * grad_weight : total;
  }
}

}  // namespace

int launch_policy_loss(const PolicyLossArgs& args, void* stream) {
  if (args.num_sequences == 0) return 0;
  DeviceGuard guard(args.device);
  if (guard.error() != cudaSuccess) return guard.error();
  policy_loss_kernel<<<static_cast<unsigned>(args.num_sequences), kLossThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace negkernels
