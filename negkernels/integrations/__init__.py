"""Adapters that put negkernels under the trainers and libraries people already run.

Each submodule imports its peer package only when it is imported itself: ``import negkernels``
never imports transformers, trl, liger-kernel or verl.

- :mod:`negkernels.integrations.transformers`: next-token log-probs and policy losses of a Hugging
  Face causal LM from its backbone and LM head, without the logits.
- :mod:`negkernels.integrations.trl`: ``NegkernelsGRPOTrainer``, a ``trl.GRPOTrainer`` whose loss
  runs through :func:`negkernels.linear_policy_loss`.
- :mod:`negkernels.integrations.liger`: ``FusedLinearGRPOLoss`` and ``FusedLinearCrossEntropyLoss``
  with the constructors, calls and return conventions of Liger-Kernel's
  ``LigerFusedLinearGRPOLoss`` and ``LigerFusedLinearCrossEntropyLoss``.
- :mod:`negkernels.integrations.verl`: policy losses and advantage estimators registered in verl's
  registries under ``negkernels_*`` names, with verl's signatures and metrics.
"""
