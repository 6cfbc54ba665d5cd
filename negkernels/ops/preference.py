"""Pairwise preference losses (DPO family, SimPO, ORPO, KTO, NPO): public API and custom op.

Layering: :func:`preference_loss` (validation, :class:`PreferenceLossConfig`, reduction) → the
custom op ``negkernels::preference_loss`` (per-example losses, rewards and the token gradient in one
forward; the backward scales it) → the reference or Triton implementation.
:func:`linear_preference_loss` computes the token log-probs with :func:`linear_token_logprobs`
(the logits never exist in memory) and hands them to :func:`preference_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._backend import register_op, resolve_backend
from .._kernel_op import config_of, kernel_op, no_grads_after
from .._validation import FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_finite_float, check_tensor
from ..reference.preference import (
    LENGTH_NORMALIZED_BY_DEFAULT,
    PREFERENCE_LOSS_TYPES,
    REFERENCE_FREE,
    PreferenceLossType,
    kto_batch_reference_point,
    preference_loss_reference,
)
from .logprobs import _scaled_by_incoming, _single_use, linear_token_logprobs

PREFERENCE_LOSS_BACKENDS = register_op("preference_loss", ("reference", "triton"))
LINEAR_PREFERENCE_LOSS_BACKENDS = register_op("linear_preference_loss", ("reference", "triton"))
REDUCTIONS = ("mean", "sum", "none")


class PreferenceLossOutput(NamedTuple):
    """What :func:`preference_loss` returns; everything but ``loss`` is detached, for logging."""

    loss: Tensor  # 0-d (or per example with reduction="none"), differentiable in the policy log-probs
    chosen_rewards: Tensor  # [B_w] β·(s_w − s_ref,w); β·s_w for simpo / orpo
    rejected_rewards: Tensor  # [B_l]
    reward_accuracy: Tensor  # 0-d: share of pairs with chosen reward > rejected reward (NaN unpaired)
    reward_margin: Tensor  # 0-d: mean of chosen − rejected reward (NaN unpaired)
    chosen_logps: Tensor  # [B_w] the policy's sequence values s_w (sums, or means when normalised)
    rejected_logps: Tensor  # [B_l]


class LinearPreferenceOutput(NamedTuple):
    """What :func:`linear_preference_loss` returns: :class:`PreferenceLossOutput`'s fields and
    ``chosen_nll``, the mean negative log-likelihood over every kept chosen token (differentiable;
    the SFT term users add to DPO, and ORPO's NLL as TRL and Liger average it)."""

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    reward_accuracy: Tensor
    reward_margin: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_nll: Tensor


@dataclass(frozen=True)
class PreferenceLossConfig:
    """Every option of the preference losses, validated once at construction.

    :func:`preference_loss` and :func:`linear_preference_loss` take these fields as keyword
    arguments (or a ready ``config=``); see :func:`preference_loss` for what each one means.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.0
    length_normalize: Optional[bool] = None  # default: True for simpo and orpo, else False
    reduction: str = "mean"
    discopop_tau: float = 0.05
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    npo_token_calibration: bool = False

    def __post_init__(self):
        check_choice("loss_type", self.loss_type, PREFERENCE_LOSS_TYPES)
        check_choice("reduction", self.reduction, REDUCTIONS)
        for name in ("npo_token_calibration",):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {type(getattr(self, name)).__name__}")
        if self.length_normalize is not None and not isinstance(self.length_normalize, bool):
            raise TypeError(f"length_normalize: expected a bool or None, got {type(self.length_normalize).__name__}")
        eps = check_finite_float("label_smoothing", self.label_smoothing, minimum=0.0)
        if eps >= 0.5:
            raise ValueError(f"label_smoothing: must lie in [0, 0.5), got {eps}")
        if self.loss_type == "exo_pair" and eps == 0.0:
            raise ValueError("label_smoothing: must be > 0 for loss_type='exo_pair' (the EXO paper uses 1e-3)")
        if self.npo_token_calibration and self.loss_type != "npo":
            raise ValueError(f"npo_token_calibration: only with loss_type='npo', not {self.loss_type!r}")
        if self.npo_token_calibration and self.length_normalize:
            raise ValueError("length_normalize: npo_token_calibration already normalises by the tokens' confidence")
        normalize = (
            self.loss_type in LENGTH_NORMALIZED_BY_DEFAULT if self.length_normalize is None else self.length_normalize
        )
        checked = dict(
            beta=check_finite_float("beta", self.beta, minimum=0.0, exclusive=True),
            label_smoothing=eps,
            simpo_gamma=check_finite_float("simpo_gamma", self.simpo_gamma),
            length_normalize=normalize,
            discopop_tau=check_finite_float("discopop_tau", self.discopop_tau, minimum=0.0, exclusive=True),
            kto_desirable_weight=check_finite_float("kto_desirable_weight", self.kto_desirable_weight, minimum=0.0),
            kto_undesirable_weight=check_finite_float(
                "kto_undesirable_weight", self.kto_undesirable_weight, minimum=0.0
            ),
        )
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def of(cls, config: Optional["PreferenceLossConfig"], options: dict) -> "PreferenceLossConfig":
        """``config`` or one built from keyword ``options`` (not both); equal options share one
        validated instance."""
        return config_of(cls, config, options, _CONFIGS)

    @property
    def paired(self) -> bool:
        """Each chosen response is compared with the rejected one of the same index."""
        return self.loss_type not in ("kto", "npo")

    @property
    def uses_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_CONFIGS: dict = {}


def _losses_reference(chosen, rejected, ref_chosen, ref_rejected, chosen_mask, rejected_mask, z, cfg):
    """The reference backend: PyTorch with autograd (no custom op, so torch.compile traces it),
    the op's outputs in fp32 (fp64 for fp64 inputs) and the losses differentiable."""
    out_dtype = torch.float64 if rejected.dtype == torch.float64 else torch.float32
    losses, rew_c, rew_r, val_c, val_r = preference_loss_reference(
        chosen if cfg.loss_type != "npo" or chosen.numel() else None,
        rejected,
        ref_chosen,
        ref_rejected,
        chosen_mask,
        rejected_mask,
        loss_type=cfg.loss_type,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        simpo_gamma=cfg.simpo_gamma,
        length_normalize=cfg.length_normalize,
        discopop_tau=cfg.discopop_tau,
        kto_reference_point=z,
        kto_desirable_weight=cfg.kto_desirable_weight,
        kto_undesirable_weight=cfg.kto_undesirable_weight,
        npo_token_calibration=cfg.npo_token_calibration,
    )
    rew_c, rew_r, val_c, val_r = (t.to(out_dtype) for t in (rew_c, rew_r, val_c, val_r))
    if not _paired(cfg.loss_type, rew_c.shape[0], rew_r.shape[0]):
        accuracy = margin = rew_r.new_full((), math.nan)
    elif rew_c.numel() == 0:
        accuracy = margin = rew_r.new_zeros(())
    else:
        accuracy, margin = (rew_c > rew_r).to(out_dtype).mean(), (rew_c - rew_r).mean()
    return losses.to(out_dtype), rew_c, rew_r, val_c, val_r, accuracy, margin


@kernel_op("negkernels::preference_loss", mutates_args=())
def _preference_loss_op(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Optional[Tensor],
    ref_rejected: Optional[Tensor],
    chosen_mask: Optional[Tensor],
    rejected_mask: Optional[Tensor],
    kto_reference_point: Optional[Tensor],
    loss_type: str,
    reduction: str,
    beta: float,
    label_smoothing: float,
    simpo_gamma: float,
    length_normalize: bool,
    discopop_tau: float,
    kto_desirable_weight: float,
    kto_undesirable_weight: float,
    npo_token_calibration: bool,
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, stats, d loss / d chosen tokens, d loss / d rejected tokens): the loss is the
    per-example losses (``reduction="none"``; each depends on one row's tokens, so the backward
    scales those rows by the incoming gradient) or their mean or sum (0-d; the backward scales
    every row by it). ``stats`` packs the rewards, values and pair summaries (:func:`_split_stats`)."""
    if backend != "triton":
        raise ValueError(f"backend: negkernels::preference_loss runs the kernel backends, not {backend!r}")
    from ..triton.preference import preference_loss_fwd

    return preference_loss_fwd(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        chosen_mask,
        rejected_mask,
        kto_reference_point,
        int(PreferenceLossType[loss_type.upper()]),
        reduction,
        length_normalize,
        npo_token_calibration,
        compute_grad,
        beta,
        label_smoothing,
        simpo_gamma,
        discopop_tau,
        kto_desirable_weight,
        kto_undesirable_weight,
    )


def _num_losses(loss_type: str, num_chosen: int, num_rejected: int) -> int:
    if loss_type == "kto":
        return num_chosen + num_rejected
    return num_rejected if loss_type == "npo" else num_chosen


def _paired(loss_type: str, num_chosen: int, num_rejected: int) -> bool:
    return loss_type != "npo" and num_chosen == num_rejected


def _split_stats(stats: Tensor, num_chosen: int, num_rejected: int) -> tuple[Tensor, ...]:
    """(chosen rewards, rejected rewards, chosen values, rejected values, reward accuracy, reward
    margin): views of the kernel's packed stats."""
    *values, summaries = stats.split((num_chosen, num_rejected, num_chosen, num_rejected, 2))
    return (*values, *summaries.unbind())


@_preference_loss_op.register_fake
def _(chosen, rejected, ref_chosen, ref_rejected, chosen_mask, rejected_mask, z, loss_type, reduction, *rest):
    compute_grad = rest[-2]
    dtype = torch.float32
    b_w, b_l = chosen.shape[0], rejected.shape[0]
    new = lambda *shape: rejected.new_empty(shape, dtype=dtype)  # noqa: E731
    grads = (
        (new(*chosen.shape), new(*rejected.shape))
        if compute_grad
        else (new(*(0,) * chosen.dim()), new(*(0,) * rejected.dim()))
    )
    loss = new() if reduction != "none" else new(_num_losses(loss_type, b_w, b_l))
    return (loss, new(2 * (b_w + b_l) + 2), *grads)


def _preference_setup(ctx, inputs, output):
    chosen, rejected, loss_type, reduction = inputs[0], inputs[1], inputs[7], inputs[8]
    ctx.dtypes = (chosen.dtype, rejected.dtype)
    ctx.loss_type = loss_type
    ctx.reduced = reduction != "none"
    ctx.num_chosen = chosen.shape[0]
    ctx.save_for_backward(output[2], output[3])
    ctx.mark_non_differentiable(*output[1:])


def _preference_backward(ctx, grad_losses, *unused):
    if grad_losses is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return no_grads_after(ctx)
    if ctx.reduced:  # the kernel wrote the gradients of the mean or sum: one scale for every row, in place
        token_grad_c, token_grad_r = _single_use(ctx)
        grad_c = _scaled_by_incoming(ctx, token_grad_c, grad_losses) if ctx.needs_input_grad[0] else None
        grad_r = _scaled_by_incoming(ctx, token_grad_r, grad_losses) if ctx.needs_input_grad[1] else None
        return no_grads_after(
            ctx,
            None if grad_c is None else grad_c.to(ctx.dtypes[0]),
            None if grad_r is None else grad_r.to(ctx.dtypes[1]),
        )
    token_grad_c, token_grad_r = ctx.saved_tensors
    b_w = ctx.num_chosen
    if ctx.loss_type == "kto":
        scale_c, scale_r = grad_losses[:b_w], grad_losses[b_w:]
    elif ctx.loss_type == "npo":
        scale_c, scale_r = None, grad_losses  # npo's losses do not depend on the chosen responses
    else:
        scale_c = scale_r = grad_losses

    def rows(scale: Optional[Tensor], token_grad: Tensor, dtype: torch.dtype) -> Tensor:
        if scale is None:
            return token_grad.to(dtype)  # all zeros
        by_row = scale[:, None] if token_grad.dim() == 2 else scale
        return (token_grad * by_row).to(dtype)

    grad_c = rows(scale_c, token_grad_c, ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    grad_r = rows(scale_r, token_grad_r, ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return no_grads_after(ctx, grad_c, grad_r)


_preference_loss_op.register_autograd(_preference_backward, setup_context=_preference_setup, differentiable=2)


def _check_response(name: str, logp: Tensor, mask_name: str, mask: Optional[Tensor], device) -> None:
    check_tensor(name, logp, dtypes=FLOAT_DTYPES, device=device)
    if logp.dim() not in (1, 2):
        raise ValueError(f"{name}: expected [B] sequence log-probs or [B, T] token log-probs, got {tuple(logp.shape)}")
    if mask is not None:
        check_tensor(mask_name, mask, device=device)
        if logp.dim() != 2 or mask.shape != logp.shape:
            raise ValueError(f"{mask_name}: expected the shape of {name} [B, T], got {tuple(mask.shape)}")


def _check_reference(name: str, ref: Optional[Tensor], like: Optional[Tensor], like_name: str, device) -> None:
    if ref is None:
        return
    check_tensor(name, ref, dtypes=FLOAT_DTYPES, device=device)
    if like is None:
        raise ValueError(f"{name}: given without {like_name}")
    if ref.shape != like.shape and tuple(ref.shape) != (like.shape[0],):
        raise ValueError(
            f"{name}: expected shape {tuple(like.shape)} or [{like.shape[0]}] (sequence sums), got {tuple(ref.shape)}"
        )


def _constant(ref: Optional[Tensor]) -> Optional[Tensor]:
    """The reference log-probs as the op takes them: without a gradient."""
    return ref.detach() if ref is not None and ref.requires_grad else ref


def preference_loss(
    chosen_logp: Optional[Tensor],
    rejected_logp: Tensor,
    ref_chosen_logp: Optional[Tensor] = None,
    ref_rejected_logp: Optional[Tensor] = None,
    *,
    chosen_mask: Optional[Tensor] = None,
    rejected_mask: Optional[Tensor] = None,
    kto_reference_point: Optional[float | Tensor] = None,
    config: Optional[PreferenceLossConfig] = None,
    backend: Optional[str] = None,
    **options,
) -> PreferenceLossOutput:
    """Preference losses that learn from rejected responses, differentiable in the policy log-probs.

    Inputs: per-sequence log-prob sums [B], or per-token log-probs [B, T] with optional 0/1 (or
    bool) masks of the same shape (``chosen_mask``, ``rejected_mask``; chosen and rejected may have
    different T). The sequence value s(y) is the masked sum, or the mean over kept tokens with
    ``length_normalize`` (count clamped at 1: a fully masked response has s = 0 and still counts
    as a pair). ``ref_*`` are the reference model's log-probs, constants (no gradient): [B] sums
    (divided by the policy's token count when normalised) or [B, T] reduced with the policy's
    mask. With r = s − s_ref, h = r_w − r_l, u = β·h, ε = ``label_smoothing``, σ the logistic,
    ``loss_type`` is one of:

    - ``"sigmoid"`` DPO −(1−ε)·log σ(u) − ε·log σ(−u) (cDPO with ε > 0);
    - ``"robust"`` (−(1−ε)·log σ(u) + ε·log σ(−u)) / (1 − 2ε), unbiased under flip rate ε;
    - ``"hinge"`` SLiC relu(1 − u); ``"ipo"`` (h − 1/(2β))²;
    - ``"exo_pair"`` q·(log q − log(1−ε)) + (1−q)·(log(1−q) − log ε), q = σ(u), ε > 0;
    - ``"nca_pair"`` −log σ(βr_w) − ½·log σ(−βr_w) − ½·log σ(−βr_l);
    - ``"bco_pair"`` −log σ(βr_w) − log σ(−βr_l) (TRL's, without BCO's running reward shift);
    - ``"sppo_hard"`` (r_w − 1/(2β))² + (r_l + 1/(2β))²;
    - ``"apo_zero"`` 1 − σ(βr_w) + σ(βr_l); ``"apo_down"`` σ(βr_w) + 1 − σ(u);
    - ``"discopop"`` −log σ(u)·(1 − σ(u/τ)) + σ(u/τ)·e^{−u}, τ = ``discopop_tau``;
    - ``"simpo"`` reference-free: v = β(ℓ_w − ℓ_l) − γ, loss −(1−ε)·log σ(v) − ε·log σ(−v), with
      ℓ the mean token log-prob (``length_normalize`` defaults to True) and γ = ``simpo_gamma``;
    - ``"orpo"`` reference-free: −ℓ_w + β·(−log σ(lo_w − lo_l)), lo = ℓ − log(1 − e^ℓ) (by expm1,
      so ℓ → 0 keeps its digits; 1 − e^ℓ clamped at the smallest normal float), β the paper's λ;
      the NLL is the chosen response's mean (the paper's per-sequence average);
    - ``"kto"`` unpaired: desirable λ_D·(1 − σ(β(r_w − z))), undesirable λ_U·(1 − σ(β(z − r_l))),
      with B_w and B_l free (either may be 0) and the loss the mean over all B_w + B_l terms;
      z = ``kto_reference_point`` (a float or 0-d tensor, e.g. TRL's KL estimate from mismatched
      completions), by default the batch estimate max(0, mean of every log-ratio), detached;
      λ = ``kto_desirable_weight`` / ``kto_undesirable_weight``;
    - ``"npo"`` rejected only: (2/β)·softplus(β·r_l); ``chosen_logp`` may be None. With
      ``npo_token_calibration`` ([B, T] rejected and reference log-probs) the sequence log-ratio
      is the confidence-weighted mean r̃_l = Σ_t p_t·(log π_t − log π_ref,t) / Σ_t p_t over the kept
      tokens, p_t = π(y_t) detached (CATNIP's calibration: tokens the model is already unsure of
      weigh little, so unlearning concentrates on the confident ones).

    ``reduction``: ``"mean"`` over the pairs (kto: over all terms; B = 0 gives 0), ``"sum"`` or
    ``"none"`` (per pair; kto: desirable terms then undesirable). ``backend``: ``None``
    (automatic), ``"reference"`` or ``"triton"`` (one launch for the losses, their mean or sum,
    the rewards, the pair summaries and the token gradients; fp64 sums, so h keeps its digits over
    long responses; kto with the batch reference point takes a second launch). Returns
    :class:`PreferenceLossOutput`: fp32 (fp64 for fp64 inputs on the reference backend); gradients
    come back in the inputs' dtypes. A mean or sum on the Triton kernel hands its gradient buffers
    to the caller (scaled in place, not at all for an incoming gradient of 1), so a second backward
    through the same call (``retain_graph=True``) raises; per-example losses allow it.
    """
    cfg = PreferenceLossConfig.of(config, options)
    device = rejected_logp.device if isinstance(rejected_logp, Tensor) else None
    _check_response("rejected_logp", rejected_logp, "rejected_mask", rejected_mask, device)
    if chosen_logp is None:
        if cfg.loss_type != "npo":
            raise ValueError(f"chosen_logp: required for loss_type={cfg.loss_type!r} (only npo goes without)")
        if chosen_mask is not None:
            raise ValueError("chosen_mask: given without chosen_logp")
    else:
        _check_response("chosen_logp", chosen_logp, "chosen_mask", chosen_mask, device)
        if cfg.paired and chosen_logp.shape[0] != rejected_logp.shape[0]:
            raise ValueError(
                f"chosen_logp: {chosen_logp.shape[0]} chosen responses but {rejected_logp.shape[0]} rejected ones "
                f"(loss_type={cfg.loss_type!r} pairs them; kto and npo take unpaired batches)"
            )
    _check_reference("ref_chosen_logp", ref_chosen_logp, chosen_logp, "chosen_logp", device)
    _check_reference("ref_rejected_logp", ref_rejected_logp, rejected_logp, "rejected_logp", device)
    if cfg.uses_reference:
        if ref_rejected_logp is None or (chosen_logp is not None and ref_chosen_logp is None):
            missing = "ref_rejected_logp" if ref_rejected_logp is None else "ref_chosen_logp"
            raise ValueError(f"{missing}: required for loss_type={cfg.loss_type!r} (only simpo and orpo go without)")
    else:
        ref_chosen_logp = ref_rejected_logp = None
    if cfg.npo_token_calibration and (rejected_logp.dim() != 2 or ref_rejected_logp.dim() != 2):  # type: ignore[union-attr]
        raise ValueError("rejected_logp: npo_token_calibration needs [B, T] rejected and reference token log-probs")
    z = None
    if cfg.loss_type == "kto" and kto_reference_point is not None:
        if isinstance(kto_reference_point, Tensor):
            check_tensor("kto_reference_point", kto_reference_point, dtypes=FLOAT_DTYPES, device=device)
            if kto_reference_point.numel() != 1:
                shape = tuple(kto_reference_point.shape)
                raise ValueError(f"kto_reference_point: expected one value, got shape {shape}")
            z = kto_reference_point.detach().reshape(()).float()
        else:
            z = torch.tensor(check_finite_float("kto_reference_point", kto_reference_point), device=device)
    chosen_backend = resolve_backend(backend, device, "preference_loss", PREFERENCE_LOSS_BACKENDS)
    chosen = chosen_logp if chosen_logp is not None else rejected_logp.new_zeros((0,) * rejected_logp.dim())
    compute_grad = torch.is_grad_enabled() and (chosen.requires_grad or rejected_logp.requires_grad)

    def run(reference_point: Optional[Tensor], grad: bool):
        """(loss, as ``reduction`` asks, then the six logging fields)."""
        if chosen_backend == "reference":
            z = reference_point if reference_point is not None else rejected_logp.new_zeros((), dtype=torch.float64)
            losses, *fields = _losses_reference(
                chosen, rejected_logp, ref_chosen_logp, ref_rejected_logp, chosen_mask, rejected_mask, z, cfg
            )
            if cfg.reduction == "mean":
                losses = losses.mean() if losses.shape[0] else losses.sum()
            elif cfg.reduction == "sum":
                losses = losses.sum()
            return (losses, *fields)
        loss, stats, _, _ = _preference_loss_op(
            chosen,
            rejected_logp,
            _constant(ref_chosen_logp),
            _constant(ref_rejected_logp),
            chosen_mask,
            rejected_mask,
            reference_point,
            cfg.loss_type,
            cfg.reduction,
            cfg.beta,
            cfg.label_smoothing,
            cfg.simpo_gamma,
            cfg.length_normalize,
            cfg.discopop_tau,
            cfg.kto_desirable_weight,
            cfg.kto_undesirable_weight,
            cfg.npo_token_calibration,
            grad,
            chosen_backend,
        )
        return (loss, *_split_stats(stats, chosen.shape[0], rejected_logp.shape[0]))

    if cfg.loss_type == "kto" and z is None:
        # The batch reference point needs every log-ratio before any loss: a first pass for the rewards.
        first = run(rejected_logp.new_zeros((), dtype=torch.float32), False)
        z = kto_batch_reference_point(first[1] / cfg.beta, first[2] / cfg.beta)
        z = z.to(torch.float64 if chosen_backend == "reference" else torch.float32)
    loss, chosen_rewards, rejected_rewards, chosen_values, rejected_values, accuracy, margin = run(z, compute_grad)
    return PreferenceLossOutput(
        loss, chosen_rewards, rejected_rewards, accuracy, margin, chosen_values, rejected_values
    )


def linear_preference_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    ref_chosen_logp: Optional[Tensor] = None,
    ref_rejected_logp: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    ref_hidden: Optional[Tensor] = None,
    ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    kto_reference_point: Optional[float | Tensor] = None,
    chunk_size: Optional[int] = None,
    validate: bool = True,
    config: Optional[PreferenceLossConfig] = None,
    backend: Optional[str] = None,
    **options,
) -> LinearPreferenceOutput:
    """:func:`preference_loss` from the last hidden states and the LM head, the logits never in memory.

    Liger's and TRL's batch layout: ``hidden`` [2B, T, H] (fp16/bf16/fp32; fp64 on the reference
    backend) holds the B chosen responses and then the B rejected ones (of the same prompts for
    the paired losses; kto reads the first half as desirable and the second as undesirable), with
    ``targets`` [2B, T] the next-token ids and ``mask`` [2B, T] (bool or 0/1) the tokens that
    count. Targets under a 0 mask are never read (any value, e.g. −100). ``weight`` [V, H] and
    ``bias`` [V] are the LM head. The token log-probs come from
    :func:`negkernels.linear_token_logprobs` (chunks of tokens through cuBLAS into a reused logits
    buffer, the gradient recomputed slice by slice in the backward).

    Reference log-probs: ``ref_chosen_logp`` / ``ref_rejected_logp`` ([B] sums or [B, T]), or
    ``ref_hidden`` [2B, T, H] with ``ref_weight`` (default ``weight``) and ``ref_bias`` to compute
    them in the same call without gradient. Every other option is :func:`preference_loss`'s.
    Returns :class:`LinearPreferenceOutput`, whose ``chosen_nll`` is the mean NLL over all kept
    chosen tokens from the same pass (differentiable; TRL's and Liger's ORPO / CPO NLL term).
    """
    cfg = PreferenceLossConfig.of(config, options)
    check_tensor("hidden", hidden, ndim=3, dtypes=FLOAT_DTYPES)
    device = hidden.device
    if hidden.shape[0] % 2:
        raise ValueError(f"hidden: expected [2B, T, H] (B chosen rows, then B rejected), got {tuple(hidden.shape)}")
    check_tensor("targets", targets, ndim=2, dtypes=INDEX_DTYPES, device=device)
    if tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"targets: expected shape {tuple(hidden.shape[:2])}, got {tuple(targets.shape)}")
    check_tensor("mask", mask, ndim=2, device=device)
    if mask.shape != targets.shape:
        raise ValueError(f"mask: expected shape {tuple(targets.shape)}, got {tuple(mask.shape)}")
    if ref_hidden is not None:
        if ref_chosen_logp is not None or ref_rejected_logp is not None:
            raise ValueError("ref_hidden: give the reference log-probs or ref_hidden, not both")
        check_tensor("ref_hidden", ref_hidden, ndim=3, dtypes=FLOAT_DTYPES, device=device)
        if ref_hidden.shape[:2] != hidden.shape[:2]:
            raise ValueError(
                f"ref_hidden: expected leading dims {tuple(hidden.shape[:2])}, got {tuple(ref_hidden.shape)}"
            )
    elif ref_weight is not None or ref_bias is not None:
        raise ValueError("ref_weight: given without ref_hidden")
    keep = mask != 0
    # Masked positions may hold ignore ids (−100): any in-range id will do, its log-prob is masked out.
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
    logp = linear_token_logprobs(
        hidden, weight, safe_targets, bias=bias, temperature=temperature, chunk_size=chunk_size,
        validate=validate, backend=backend,
    )  # fmt: skip
    if ref_hidden is not None and cfg.uses_reference:
        with torch.no_grad():
            ref_logp = linear_token_logprobs(
                ref_hidden, ref_weight if ref_weight is not None else weight, safe_targets,
                bias=ref_bias if ref_weight is not None or ref_bias is not None else bias,
                temperature=temperature, chunk_size=chunk_size, validate=False, backend=backend,
            )  # fmt: skip
        ref_chosen_logp, ref_rejected_logp = ref_logp.chunk(2)
    chosen_logp, rejected_logp = logp.chunk(2)
    chosen_mask, rejected_mask = keep.chunk(2)
    out = preference_loss(
        chosen_logp,
        rejected_logp,
        ref_chosen_logp,
        ref_rejected_logp,
        chosen_mask=chosen_mask,
        rejected_mask=rejected_mask,
        kto_reference_point=kto_reference_point,
        config=cfg,
        backend=backend,
    )
    kept = chosen_mask.sum()
    chosen_nll = -(chosen_logp * chosen_mask).sum() / kept.clamp_min(1)
    return LinearPreferenceOutput(*out, chosen_nll)
