"""Input generation shared by the tests and ``negkernels check``.

A clipped policy loss is discontinuous in its gradient (and its clip flags) at the clip edges. A
token whose ratio lies within fp32 rounding of an edge may land on either side in an fp32 kernel
and in the float64 oracle, and both answers are right. Parity checks therefore draw ratios away
from the edges, by far more than that rounding.
"""

from __future__ import annotations

import math

import torch

# Every clip edge, δ and dual-clip constant the checks use, as ratios; geo_mean clips log ρ at
# ±clip, so its edges are the exponentials of the same clip values.
GEO_MEAN_EDGES = tuple(math.exp(x) for x in (-0.2, 0.2, 0.28, -0.15, 0.25, -0.05, 0.08))
RATIO_EDGES = (0.8, 0.95, 1.05, 1.08, 1.2, 1.28, 1.5, 2.0, 2.5, 3.0) + GEO_MEAN_EDGES


def old_logp_off_edges(logp: torch.Tensor, old_logp: torch.Tensor, edges=RATIO_EDGES, margin: float = 1e-3):
    """``old_logp`` moved so that no ratio exp(logp − old_logp) lies within ``margin`` (in log
    space) of an edge; tokens already clear of every edge are untouched."""
    log_ratio = logp.double() - old_logp.double()
    shift = torch.zeros_like(log_ratio)
    for edge in edges:
        near = (log_ratio - math.log(edge)).abs() < margin
        shift = torch.where(near, torch.full_like(shift, 2 * margin), shift)
    return (old_logp.double() + shift).to(old_logp.dtype)
