// Launcher interface of the policy-loss CUDA kernel. Plain C++ types only (the stream is a void*
// holding a cudaStream_t) so the torch-facing binding compiles without any CUDA header.
#pragma once
#include <cstdint>

#include "dtypes.h"

namespace negkernels {

// The option codes of negkernels/reference/logprobs.py (LossType, KlEstimator, Aggregation, IsMode),
// which the Triton kernels use too; tests/test_kernel_codes.py holds the two definitions equal.
enum LossType : int { kPPO = 0, kGSPO = 1, kCISPO = 2, kSAPO = 3, kGPG = 4, kNPO = 5, kGeoMean = 6 };
enum KlEstimator : int { kKlNone = -1, kK1 = 0, kK2 = 1, kK3 = 2, kAbs = 3, kK3Plus = 4 };
enum Aggregation : int { kTokenMean = 0, kTokenSum = 1, kSeqMeanTokenMean = 2, kSeqMeanTokenSum = 3, kSeqMeanTokenSumNorm = 4 };
enum IsMode : int { kIsNone = 0, kTruncate = 1, kMask = 2 };

// Positions in the int[] codes and float[] scalars lists the Python side builds
// (negkernels.ops.logprobs.PolicyKernelCodes / PolicyKernelScalars, same field order).
enum PolicyCodeSlot : int {
  kCodeLoss, kCodeKl, kCodeKlBiasCorrection, kCodeKlTimesIsWeights, kCodeAggregation, kCodeIsMode, kCodeCispoTwoSided, kCodeSequenceRatio, kCodeAdvPerToken,
  kCodeIwPerToken, kCodeOnPolicy, kCodeComputeGrad, kCodeNumSequences, kCodeSeqLen, kCodeMaxLen, kPolicyCodeCount
};
enum PolicyScalarSlot : int {
  kScalarLo, kScalarHi, kScalarDelta, kScalarDualClip, kScalarTauPos, kScalarTauNeg, kScalarNpoBeta, kScalarKlCoef,
  kScalarKlClamp, kScalarIsHi, kScalarIsLo, kScalarNormConstant, kScalarTemperature, kScalarEntropyCoef, kPolicyScalarCount
};
constexpr int kPolicyLossPartials = 8;  // per sequence: loss, count, low, high, dual, approx-kl, ratio, kl

struct PolicyLossArgs {
  // Per-token arrays [n_tokens] in `value_dtype` (all of the same dtype), or per sequence [num_sequences].
  const void* logp = nullptr;
  const void* old_logp = nullptr;
  const void* advantages = nullptr;  // [n_tokens] if adv_per_token else [num_sequences]
  const uint8_t* mask = nullptr;     // [n_tokens] 0/1 or null
  const void* ref_logp = nullptr;    // [n_tokens] or null (no KL term)
  const void* is_weights = nullptr;  // [n_tokens] if iw_per_token else [num_sequences], or null
  const int64_t* cu_seqlens = nullptr;  // [num_sequences + 1] or null: rows of seq_len
  float* partial = nullptr;             // [num_sequences, 8]
  float* grad = nullptr;                // [n_tokens] or null
  int value_dtype = kValueF32;
  int device = 0;  // the tensors' CUDA device, made current for the launch
  int64_t num_sequences = 0, seq_len = 0, n_tokens = 0;
  int loss_type = kPPO, kl_estimator = kKlNone, aggregation = kTokenMean, is_mode = kIsNone;
  bool adv_per_token = false, iw_per_token = false, cispo_two_sided = false;
  bool sequence_ratio = false;  // sapo / cispo on the sequence ratio s instead of each token's ratio
  bool kl_bias_correction = false;  // the KL term times the importance ratio (gspo: the sequence ratio)
  bool kl_times_is_weights = false;  // the KL term times the rollout IS weight (only with is_weights)
  float lo = 0.8f, hi = 1.2f, delta = 0.f, dual_clip = 0.f;  // delta / dual_clip: +inf disables; geo_mean: log-space lo, hi
  float tau_pos = 1.f, tau_neg = 1.05f, npo_beta = 0.1f, kl_coef = 0.f;
  float kl_clamp = 0.f;  // |KL estimate| clamped to it, no gradient outside; +inf disables
  float is_hi = 2.f, is_lo = 0.5f, norm_constant = 1.f;
};

// Returns a cudaError_t as int (0 on success).
int launch_policy_loss(const PolicyLossArgs& args, void* stream);

}  // namespace negkernels
