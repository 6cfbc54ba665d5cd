// Torch-facing side of the compiled extension: argument checks, output allocation, and
// TORCH_LIBRARY registration of negkernels_cuda::*. Includes no CUDA header (the kernels'
// launchers take raw pointers and a stream handed over from Python), so it builds against a CPU
// build of torch as well, where the checks can be tested without a GPU.
#include <torch/extension.h>

#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "advantages.h"
#include "kv.h"
#include "logprobs.h"

namespace negkernels {
namespace {

// Every output and workspace comes from here. With NEGKERNELS_POISON_OUTPUTS set (the tests set it
// while poisoning torch.empty) it is filled with NaN / a huge negative int before the kernel
// runs, so an element a kernel fails to write shows up.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  const char* poison = std::getenv("NEGKERNELS_POISON_OUTPUTS");
  if (poison != nullptr && poison[0] != '\0' && poison[0] != '0') {
    if (t.is_floating_point())
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    else if (t.scalar_type() != at::kBool && t.scalar_type() != at::kByte)
      t.fill_(-987654321);
  }
  return t;
}

at::Tensor output_for_test(at::IntArrayRef sizes, at::ScalarType dtype) {
  return new_output(sizes, at::TensorOptions().dtype(dtype));
}

void check_launch(int error, const char* what) {
  TORCH_CHECK(error == 0, what, " failed: ", cuda_error_string(error));
}

int value_dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kValueF32;
    case at::kDouble: return kValueF64;
    case at::kHalf: return kValueF16;
    case at::kBFloat16: return kValueBF16;
    default: TORCH_CHECK(false, name, ": expected a float16/bfloat16/float32/float64 tensor, got ", t.scalar_type());
  }
  return 0;
}

const float* optional_sign_scale(const std::optional<at::Tensor>& t, const at::Tensor& rewards, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == rewards.device(), name, ": expected a tensor on ", rewards.device(), ", got ", t->device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == rewards.size(0), name, ": expected shape [", rewards.size(0), "], got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), name, ": expected a contiguous float32 tensor");
  return t->data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_advantages(
    const at::Tensor& rewards, const std::optional<at::Tensor>& group_index, int64_t group_size, int64_t num_groups,
    int64_t estimator, int64_t scale, double eps, double virtual_max_reward, double num_virtual, double positive_scale,
    double negative_scale, const std::optional<at::Tensor>& positive_scale_tensor,
    const std::optional<at::Tensor>& negative_scale_tensor, const std::optional<at::Tensor>& batch_stats,
    int64_t headroom, int64_t vmax_exponent, int64_t stream) {
  TORCH_CHECK(rewards.is_cuda(), "rewards: the CUDA kernel needs a CUDA tensor, got ", rewards.device());
  TORCH_CHECK(rewards.dim() == 1, "rewards: expected a 1-D tensor, got shape ", rewards.sizes());
  TORCH_CHECK(rewards.is_contiguous(), "rewards: expected a contiguous tensor");
  const int dtype = value_dtype_code(rewards, "rewards");
  const int64_t n = rewards.size(0);
  TORCH_CHECK(num_groups >= 0, "num_groups: must be >= 0, got ", num_groups);
  TORCH_CHECK(estimator >= 0 && estimator <= 4, "estimator: unknown code ", estimator);
  TORCH_CHECK(scale >= 0 && scale <= 3, "scale: unknown code ", scale);
  TORCH_CHECK(headroom > 0 && headroom < 40 && (int64_t(1) << (headroom - 1)) > n, "headroom: must exceed log2(n)");
  GroupAdvantagesArgs args;
  if (group_index.has_value()) {
    const at::Tensor& gi = *group_index;
    TORCH_CHECK(gi.device() == rewards.device(), "group_index: expected a tensor on ", rewards.device(), ", got ", gi.device());
    TORCH_CHECK(gi.dim() == 1 && gi.size(0) == n, "group_index: expected shape [", n, "], got ", gi.sizes());
    TORCH_CHECK(gi.scalar_type() == at::kInt || gi.scalar_type() == at::kLong, "group_index: expected int32 or int64, got ", gi.scalar_type());
    TORCH_CHECK(gi.is_contiguous(), "group_index: expected a contiguous tensor");
    args.group_index = gi.data_ptr();
    args.group_index_bits = gi.scalar_type() == at::kInt ? 32 : 64;
  } else {
    TORCH_CHECK(group_size >= 1 && n % group_size == 0, "group_size: must be >= 1 and divide ", n, ", got ", group_size);
    TORCH_CHECK(num_groups == n / group_size, "num_groups: expected ", n / group_size, " for group_size ", group_size);
  }
  if (batch_stats.has_value()) {
    TORCH_CHECK(batch_stats->device() == rewards.device() && batch_stats->scalar_type() == at::kDouble && batch_stats->numel() == 2,
                "batch_stats: expected a float64 tensor of 2 elements on ", rewards.device());
    args.batch_stats = batch_stats->data_ptr<double>();
  }
  args.positive_scale = optional_sign_scale(positive_scale_tensor, rewards, "positive_scale");
  args.negative_scale = optional_sign_scale(negative_scale_tensor, rewards, "negative_scale");

  auto f32 = rewards.options().dtype(at::kFloat);
  at::Tensor out = new_output({n}, f32);
  at::Tensor mean = new_output({num_groups}, f32);
  at::Tensor std = new_output({num_groups}, f32);
  at::Tensor count = new_output({num_groups}, rewards.options().dtype(at::kLong));
  if (n == 0 && num_groups == 0) return {out, mean, std, count};
  at::Tensor work = new_output({4 * (num_groups + 2)}, rewards.options().dtype(at::kLong));
  args.rewards = rewards.data_ptr();
  args.rewards_dtype = dtype;
  args.out = out.data_ptr<float>();
  args.mean = mean.data_ptr<float>();
  args.std = std.data_ptr<float>();
  args.count = count.data_ptr<int64_t>();
  args.work = work.data_ptr<int64_t>();
  args.n = n;
  args.num_groups = num_groups;
  args.group_size = group_size > 0 ? group_size : 1;
  args.estimator = static_cast<int>(estimator);
  args.scale = static_cast<int>(scale);
  args.headroom = static_cast<int>(headroom);
  args.vmax_exponent = static_cast<int>(vmax_exponent);
  args.eps = eps;
  args.virtual_max_reward = virtual_max_reward;
  args.num_virtual = num_virtual;
  args.positive_value = positive_scale;
  args.negative_value = negative_scale;
  args.device = rewards.get_device();
  check_launch(launch_group_advantages(args, reinterpret_cast<void*>(stream)), "group_advantages kernel launch");
  return {out, mean, std, count};
}

const void* values_like(const std::optional<at::Tensor>& t, const at::Tensor& logp, int64_t n, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == logp.device(), name, ": expected a tensor on ", logp.device(), ", got ", t->device());
  TORCH_CHECK(t->scalar_type() == logp.scalar_type(), name, ": expected dtype ", logp.scalar_type(), " like logp, got ",
              t->scalar_type());
  TORCH_CHECK(t->is_contiguous() && t->numel() == n, name, ": expected a contiguous tensor of ", n, " elements, got ",
              t->sizes());
  return t->data_ptr();
}

std::tuple<at::Tensor, at::Tensor> policy_loss(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& ref_logp,
    const std::optional<at::Tensor>& is_weights, const std::optional<at::Tensor>& cu_seqlens,
    at::IntArrayRef codes, at::ArrayRef<double> scalars, int64_t stream) {
  TORCH_CHECK(codes.size() == kPolicyCodeCount, "codes: expected ", int(kPolicyCodeCount), " entries, got ",
              codes.size());
  TORCH_CHECK(scalars.size() == kPolicyScalarCount, "scalars: expected ", int(kPolicyScalarCount), " entries, got ",
              scalars.size());
  const int64_t num_sequences = codes[kCodeNumSequences], seq_len = codes[kCodeSeqLen];
  const int64_t loss_type = codes[kCodeLoss], kl_estimator = codes[kCodeKl], aggregation = codes[kCodeAggregation];
  const int64_t is_mode = codes[kCodeIsMode];
  const bool adv_per_token = codes[kCodeAdvPerToken] != 0, iw_per_token = codes[kCodeIwPerToken] != 0;
  const bool compute_grad = codes[kCodeComputeGrad] != 0;
  TORCH_CHECK(logp.is_cuda(), "logp: the CUDA kernel needs a CUDA tensor, got ", logp.device());
  TORCH_CHECK(logp.dim() == 1 && logp.is_contiguous(), "logp: expected a contiguous 1-D tensor, got shape ", logp.sizes());
  const int64_t n = logp.numel();
  PolicyLossArgs a;
  a.value_dtype = value_dtype_code(logp, "logp");
  TORCH_CHECK(num_sequences >= 0, "num_sequences: must be >= 0, got ", num_sequences);
  TORCH_CHECK(loss_type >= kPPO && loss_type <= kGeoMean, "loss_type: unknown code ", loss_type);
  TORCH_CHECK(kl_estimator >= kKlNone && kl_estimator <= kK3Plus, "kl_estimator: unknown code ", kl_estimator);
  TORCH_CHECK(aggregation >= kTokenMean && aggregation <= kSeqMeanTokenSumNorm, "aggregation: unknown code ",
              aggregation);
  TORCH_CHECK(is_mode >= kIsNone && is_mode <= kMask, "is_mode: unknown code ", is_mode);
  a.logp = logp.data_ptr();
  a.old_logp = values_like(old_logp, logp, n, "old_logp");
  a.advantages = values_like(advantages, logp, adv_per_token ? n : num_sequences, "advantages");
  a.ref_logp = values_like(ref_logp, logp, n, "ref_logp");
  TORCH_CHECK(kl_estimator == kKlNone || a.ref_logp != nullptr, "ref_logp: required with a KL estimator");
  TORCH_CHECK(loss_type != kNPO || a.ref_logp != nullptr, "ref_logp: required for npo");
  if (is_mode != kIsNone) a.is_weights = values_like(is_weights, logp, iw_per_token ? n : num_sequences, "is_weights");
  TORCH_CHECK(is_mode == kIsNone || a.is_weights != nullptr, "is_weights: required with an is_mode");
  if (mask.has_value()) {
    TORCH_CHECK(mask->device() == logp.device() && mask->scalar_type() == at::kByte && mask->is_contiguous() &&
                    mask->numel() == n,
                "mask: expected a contiguous uint8 tensor of ", n, " elements on ", logp.device());
    a.mask = mask->data_ptr<uint8_t>();
  }
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(cu_seqlens->device() == logp.device() && cu_seqlens->scalar_type() == at::kLong &&
                    cu_seqlens->is_contiguous() && cu_seqlens->numel() == num_sequences + 1,
                "cu_seqlens: expected a contiguous int64 tensor of ", num_sequences + 1, " elements on ", logp.device());
    a.cu_seqlens = cu_seqlens->data_ptr<int64_t>();
  } else {
    TORCH_CHECK(seq_len >= 0 && num_sequences * seq_len == n, "seq_len: ", num_sequences, " x ", seq_len,
                " does not cover ", n, " tokens");
  }
  auto f32 = logp.options().dtype(at::kFloat);
  at::Tensor partial = new_output({num_sequences, kPolicyLossPartials}, f32);
  at::Tensor grad = new_output({compute_grad ? n : 0}, f32);
  a.partial = partial.data_ptr<float>();
  a.grad = compute_grad ? grad.data_ptr<float>() : nullptr;
  a.num_sequences = num_sequences;
  a.seq_len = seq_len;
  a.n_tokens = n;
  a.loss_type = static_cast<int>(loss_type);
  a.kl_estimator = static_cast<int>(kl_estimator);
  a.aggregation = static_cast<int>(aggregation);
  a.is_mode = static_cast<int>(is_mode);
  a.adv_per_token = adv_per_token;
  a.iw_per_token = iw_per_token;
  a.cispo_two_sided = codes[kCodeCispoTwoSided] != 0;
  a.sequence_ratio = codes[kCodeSequenceRatio] != 0;
  a.kl_bias_correction = codes[kCodeKlBiasCorrection] != 0;
  a.kl_times_is_weights = codes[kCodeKlTimesIsWeights] != 0 && a.is_mode != kIsNone;
  TORCH_CHECK(codes[kCodeOnPolicy] == 0, "on_policy: the CUDA kernel takes old_logp (logp.detach() when on-policy)");
  a.lo = static_cast<float>(scalars[kScalarLo]);
  a.hi = static_cast<float>(scalars[kScalarHi]);
  a.delta = static_cast<float>(scalars[kScalarDelta]);
  a.dual_clip = static_cast<float>(scalars[kScalarDualClip]);
  a.tau_pos = static_cast<float>(scalars[kScalarTauPos]);
  a.tau_neg = static_cast<float>(scalars[kScalarTauNeg]);
  a.npo_beta = static_cast<float>(scalars[kScalarNpoBeta]);
  a.kl_coef = static_cast<float>(scalars[kScalarKlCoef]);
  a.kl_clamp = static_cast<float>(scalars[kScalarKlClamp]);
  a.is_hi = static_cast<float>(scalars[kScalarIsHi]);
  a.is_lo = static_cast<float>(scalars[kScalarIsLo]);
  a.norm_constant = static_cast<float>(scalars[kScalarNormConstant]);
  a.device = logp.get_device();
  check_launch(launch_policy_loss(a, reinterpret_cast<void*>(stream)), "policy_loss kernel launch");
  return {partial, grad};
}

int index_kind(const at::Tensor& t, const char* name, bool allow_float) {
  switch (t.scalar_type()) {
    case at::kInt: return kIndexI32;
    case at::kLong: return kIndexI64;
    case at::kFloat:
      if (allow_float) return kIndexF32;
      break;
    case at::kDouble:
      if (allow_float) return kIndexF64;
      break;
    default: break;
  }
  TORCH_CHECK(false, name, ": expected ", allow_float ? "an int32/int64/float32/float64" : "an int32/int64", " tensor, got ",
              t.scalar_type());
  return 0;
}

at::Tensor select_retained(const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& log_beta,
                           const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& step,
                           int64_t step_value, int64_t budget, int64_t sink, int64_t window,
                           const std::optional<at::Tensor>& lengths, int64_t stream) {
  TORCH_CHECK(scores.has_value() != log_beta.has_value(), "scores / log_beta: give exactly one of them");
  const at::Tensor& rows = scores.has_value() ? *scores : *log_beta;
  const char* rows_name = scores.has_value() ? "scores" : "log_beta";
  TORCH_CHECK(rows.is_cuda(), rows_name, ": the CUDA kernel needs a CUDA tensor, got ", rows.device());
  TORCH_CHECK(rows.dim() == 3, rows_name, ": expected [B, H, S], got shape ", rows.sizes());
  TORCH_CHECK(budget >= 0, "budget: must be >= 0, got ", budget);
  TORCH_CHECK(sink >= 0 && window >= 0 && sink + window <= budget, "sink + window: ", sink, " + ", window,
              " must be >= 0 and <= budget ", budget);
  const int64_t b = rows.size(0), h = rows.size(1), s = rows.size(2);
  SelectRetainedArgs a;
  if (scores.has_value()) {
    TORCH_CHECK(scores->scalar_type() == at::kFloat && scores->is_contiguous(), "scores: expected a contiguous float32 tensor");
    a.scores = scores->data_ptr<float>();
  } else {
    a.log_beta = log_beta->data_ptr();
    a.log_beta_dtype = value_dtype_code(*log_beta, "log_beta");
    a.lb_stride_b = log_beta->stride(0);
    a.lb_stride_h = log_beta->stride(1);
    a.lb_stride_s = log_beta->stride(2);
    TORCH_CHECK(positions.has_value(), "positions: required with log_beta");
    TORCH_CHECK(positions->device() == rows.device() && positions->dim() == 3 && positions->size(0) == b &&
                    positions->size(1) == h && positions->size(2) == s,
                "positions: expected a [", b, ", ", h, ", ", s, "] tensor (broadcast views allowed) on ", rows.device());
    a.positions = positions->data_ptr();
    a.positions_kind = index_kind(*positions, "positions", true);
    a.pos_stride_b = positions->stride(0);
    a.pos_stride_h = positions->stride(1);
    a.pos_stride_s = positions->stride(2);
    if (step.has_value()) {
      TORCH_CHECK(step->device() == rows.device() && step->dim() == 1 && step->size(0) == b && step->is_contiguous(),
                  "step: expected a contiguous [", b, "] tensor on ", rows.device());
      a.step = step->data_ptr();
      a.step_kind = index_kind(*step, "step", true);
    }
    a.step_value = step_value;
  }
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->device() == rows.device() && lengths->dim() == 1 && lengths->size(0) == b &&
                    lengths->is_contiguous(),
                "lengths: expected a contiguous [", b, "] tensor on ", rows.device());
    a.lengths = lengths->data_ptr();
    a.lengths_kind = index_kind(*lengths, "lengths", false);
  }
  const int64_t kept = budget < s ? budget : s;
  at::Tensor out = new_output({b, h, kept}, rows.options().dtype(at::kLong));
  a.out = out.data_ptr<int64_t>();
  a.rows = b * h;
  a.heads = h > 0 ? h : 1;
  a.seq = s;
  a.kept = kept;
  a.sink = sink;
  a.window = window;
  a.device = rows.get_device();
  check_launch(launch_select_retained(a, reinterpret_cast<void*>(stream)), "select_retained kernel launch");
  return out;
}

std::vector<std::string> implemented_ops() { return {"group_advantages", "policy_loss", "select_retained", "evict"}; }

}  // namespace
}  // namespace negkernels

TORCH_LIBRARY(negkernels_cuda, m) {
  m.def(
      "group_advantages(Tensor rewards, Tensor? group_index, int group_size, int num_groups, int estimator, int scale, "
      "float eps, float virtual_max_reward, float num_virtual, float positive_scale, float negative_scale, "
      "Tensor? positive_scale_tensor, Tensor? negative_scale_tensor, Tensor? batch_stats, int headroom, "
      "int vmax_exponent, int stream) -> (Tensor, Tensor, Tensor, Tensor)",
      &negkernels::group_advantages);
  m.def(
      "policy_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor? mask, Tensor? ref_logp, Tensor? is_weights, "
      "Tensor? cu_seqlens, int[] codes, float[] scalars, int stream) -> (Tensor, Tensor)",
      &negkernels::policy_loss);
}

TORCH_LIBRARY_FRAGMENT(negkernels_cuda, m) {
  m.def("_output_for_test(int[] sizes, ScalarType dtype) -> Tensor", &negkernels::output_for_test);
  m.def(
      "select_retained(Tensor? scores, Tensor? log_beta, Tensor? positions, Tensor? step, int step_value, int budget, "
      "int sink, int window, Tensor? lengths, int stream) -> Tensor",
      &negkernels::select_retained);
}

PYBIND11_MODULE(_negkernels_cuda, m) {
  m.doc() = "negkernels compiled CUDA kernels; the ops are registered as torch.ops.negkernels_cuda.*";
  m.def("implemented_ops", &negkernels::implemented_ops, "Names of the public ops that have a CUDA kernel here.");
}
