"""Contrastive losses against a memory bank of negatives, in plain PyTorch.

The CPU fallback and the float64 oracle of the Triton kernels. Written straight from the formula:
the [N, 1 + K (+ M)] logits matrix is built, masked and reduced with ``logsumexp``.

Per query i with positive key k⁺_i, bank slots b_j and optional per-query extra negatives e_im:

    l_i = [q_i·k⁺_i, q_i·b_j for usable j, q_i·e_im] / τ
    loss_i = −log( Σ_{p∈P_i} exp(l_p) / Σ_{a∈A_i} exp(l_a) )

A_i holds the positive, every usable slot and the extras. A slot is usable when it is filled
(``valid``) and, with ``false_negatives="exclude"``, its id differs from ``query_ids[i]``.
P_i is {k⁺_i} plus, with ``false_negatives="positive"``, the filled slots whose id equals
``query_ids[i]``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

FALSE_NEGATIVE_MODES = ("exclude", "positive")
REDUCTIONS = ("mean", "sum", "none")
NORMALIZE_EPS = 1e-12  # as torch.nn.functional.normalize


def bank_valid_mask(bank_valid, num_slots: int, device: torch.device) -> Tensor:
    """``bank_valid`` (None, a filled count, or a bool mask [K]) → bool mask [K]."""
    if bank_valid is None:
        return torch.ones(num_slots, dtype=torch.bool, device=device)
    if isinstance(bank_valid, Tensor):
        return bank_valid.to(device=device, dtype=torch.bool)
    return torch.arange(num_slots, device=device) < int(bank_valid)


def _normalize(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1, eps=NORMALIZE_EPS)


def bank_info_nce_reference(
    query: Tensor,
    positive: Tensor,
    bank: Tensor,
    temperature=0.07,
    *,
    normalize: bool = False,
    query_ids: Optional[Tensor] = None,
    bank_ids: Optional[Tensor] = None,
    false_negatives: Optional[str] = "exclude",
    bank_valid=None,
    extra_negatives: Optional[Tensor] = None,
    reduction: str = "mean",
) -> Tensor:
    """InfoNCE against a bank, differentiable in every floating input (and a tensor temperature).

    Computes in the inputs' dtype; run it on float64 inputs for the oracle. Materialises N×K.
    """
    filled = bank_valid_mask(bank_valid, bank.shape[0], query.device)
    # Unfilled slots hold whatever was there (even NaN): they must not reach any value or gradient.
    bank = torch.where(filled.unsqueeze(1), bank, torch.zeros((), dtype=bank.dtype, device=bank.device))
    if normalize:
        query, positive, bank = _normalize(query), _normalize(positive), _normalize(bank)
        if extra_negatives is not None:
            extra_negatives = _normalize(extra_negatives)
    n, k = query.shape[0], bank.shape[0]
    pos_logit = (query * positive).sum(-1, keepdim=True) / temperature  # [N, 1]
    bank_logits = query @ bank.transpose(0, 1) / temperature  # [N, K]
    filled = filled.expand(n, k)
    same_id = torch.zeros(n, k, dtype=torch.bool, device=query.device)
    if false_negatives is not None and query_ids is not None and bank_ids is not None:
        same_id = query_ids.reshape(n, 1) == bank_ids.reshape(1, k)
    usable = filled & ~same_id if false_negatives == "exclude" else filled
    in_positive_set = filled & same_id if false_negatives == "positive" else torch.zeros_like(filled)

    neg_inf = torch.tensor(float("-inf"), dtype=bank_logits.dtype, device=query.device)
    parts_all = [pos_logit, torch.where(usable, bank_logits, neg_inf)]
    if extra_negatives is not None and extra_negatives.shape[1] > 0:
        parts_all.append(torch.einsum("nd,nmd->nm", query, extra_negatives) / temperature)
    log_denominator = torch.logsumexp(torch.cat(parts_all, dim=1), dim=1)
    log_numerator = torch.logsumexp(
        torch.cat([pos_logit, torch.where(in_positive_set, bank_logits, neg_inf)], dim=1), 1
    )
    loss = log_denominator - log_numerator
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / max(n, 1)


def bank_similarities_reference(query: Tensor, bank: Tensor, *, normalize: bool = False, bank_valid=None) -> Tensor:
    """[N, K] similarities q·b (cosine with ``normalize``); unfilled slots are −inf."""
    filled = bank_valid_mask(bank_valid, bank.shape[0], query.device)
    bank = torch.where(filled.unsqueeze(1), bank, torch.zeros((), dtype=bank.dtype, device=bank.device))
    if normalize:
        query, bank = _normalize(query), _normalize(bank)
    sims = query @ bank.transpose(0, 1)
    return sims.masked_fill(~filled.unsqueeze(0), float("-inf"))


def bank_topk_reference(
    query: Tensor, bank: Tensor, k: int, *, normalize: bool = False, bank_valid=None
) -> tuple[Tensor, Tensor]:
    """(similarities [N, k], indices [N, k] int64), largest first, ties by the lower slot; missing
    entries are (−inf, −1)."""
    sims = bank_similarities_reference(query, bank, normalize=normalize, bank_valid=bank_valid)
    take = min(k, bank.shape[0])
    # A stable descending sort keeps equal similarities in slot order (topk's order among ties is unspecified).
    values, indices = torch.sort(sims, dim=1, descending=True, stable=True)
    values, indices = values[:, :take], indices[:, :take]
    indices = torch.where(torch.isneginf(values), torch.full_like(indices, -1), indices)
    if take < k:
        pad = k - take
        values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], 1)
        indices = torch.cat([indices, indices.new_full((indices.shape[0], pad), -1)], 1)
    return values, indices


def bank_supcon_reference(
    query: Tensor,
    bank: Tensor,
    query_labels: Tensor,
    bank_labels: Tensor,
    temperature=0.1,
    *,
    positive: Optional[Tensor] = None,
    normalize: bool = False,
    self_slots: Optional[Tensor] = None,
    bank_valid=None,
    reduction: str = "mean",
) -> Tensor:
    """Supervised contrastive loss (SupCon's L_out) of each query against a bank, in plain PyTorch.

    Per query i, over the denominator set A_i (the filled slots other than ``self_slots[i]``, plus
    the explicit positive k⁺_i when given) and the positive set P_i ⊆ A_i (those of A_i whose label
    is ``query_labels[i]``, plus k⁺_i)::

        loss_i = logsumexp_{a∈A_i} l_a − (1/|P_i|)·Σ_{p∈P_i} l_p,   l = q·k/τ,

    and loss_i = 0 when P_i is empty. ``"mean"`` averages over the queries with |P_i| > 0 (0 when
    there are none), as SupCon and pytorch-metric-learning's ``AvgNonZeroReducer`` do.
    """
    filled = bank_valid_mask(bank_valid, bank.shape[0], query.device)
    bank = torch.where(filled.unsqueeze(1), bank, torch.zeros((), dtype=bank.dtype, device=bank.device))
    if normalize:
        query, bank = _normalize(query), _normalize(bank)
        positive = _normalize(positive) if positive is not None else None
    n, k = query.shape[0], bank.shape[0]
    logits = query @ bank.transpose(0, 1) / temperature
    usable = filled.expand(n, k)
    if self_slots is not None:
        usable = usable & (torch.arange(k, device=query.device).reshape(1, k) != self_slots.reshape(n, 1))
    in_pos = usable & (query_labels.reshape(n, 1) == bank_labels.reshape(1, k))
    if positive is not None:
        pos_logit = (query * positive).sum(-1, keepdim=True) / temperature
        logits = torch.cat([pos_logit, logits], dim=1)
        ones = torch.ones(n, 1, dtype=torch.bool, device=query.device)
        usable, in_pos = torch.cat([ones, usable], 1), torch.cat([ones, in_pos], 1)
    count = in_pos.sum(1)
    has = count > 0
    # Rows without positives take the constant 0: their logits are swapped out before the
    # log-sum-exp, so no −inf (and no NaN gradient) arises from an empty set.
    kept = usable & has.unsqueeze(1)
    safe = torch.where(kept, logits, torch.where(has.unsqueeze(1), float("-inf"), 0.0).to(logits.dtype))
    mean_pos = torch.where(in_pos, logits, torch.zeros((), dtype=logits.dtype, device=logits.device)).sum(
        1
    ) / count.clamp(min=1)
    loss = torch.where(
        has, torch.logsumexp(safe, dim=1) - mean_pos, torch.zeros((), dtype=logits.dtype, device=logits.device)
    )
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / has.sum().clamp(min=1)
