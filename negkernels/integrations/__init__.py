"""Adapters that put negkernels under the trainers and libraries people already run.

Each submodule imports its peer package only when it is imported itself: ``import negkernels``
never imports transformers, trl, liger-kernel, verl, lightly, pytorch-metric-learning or kvpress.

- :mod:`negkernels.integrations.transformers`: next-token log-probs and policy losses of a Hugging
  Face causal LM from its backbone and LM head, without the logits.
- :mod:`negkernels.integrations.trl`: ``NegkernelsGRPOTrainer``, a ``trl.GRPOTrainer`` whose loss
  runs through :func:`negkernels.linear_policy_loss`.
- :mod:`negkernels.integrations.liger`: ``FusedLinearGRPOLoss`` and ``FusedLinearCrossEntropyLoss``
  with the constructors, calls and return conventions of Liger-Kernel's
  ``LigerFusedLinearGRPOLoss`` and ``LigerFusedLinearCrossEntropyLoss``.
- :mod:`negkernels.integrations.verl`: policy losses and advantage estimators registered in verl's
  registries under ``negkernels_*`` names, with verl's signatures and metrics.
- :mod:`negkernels.integrations.lightly`: ``NTXentLoss`` (lightly's, SimCLR or with a memory bank)
  and ``MoCoLoss`` over :func:`negkernels.bank_info_nce`.
- :mod:`negkernels.integrations.pml`: pytorch-metric-learning's ``CrossBatchMemory`` for
  ``NTXentLoss`` and ``SupConLoss`` (the latter fused as :func:`negkernels.bank_supcon`).
- :mod:`negkernels.integrations.kvpress`: kvpress ``ScorerPress`` presses (key-norm, KeyDiff,
  SnapKV, TOVA, observed attention, TRIM-KV) scored and selected on negkernels.
"""
