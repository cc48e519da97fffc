"""Losses for the extreme class imbalance of dust (well under 1 % of pixels)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def dust_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
              pos_weight: float = 3.0, dice: float = 1.0) -> torch.Tensor:
    """Weighted BCE plus soft Dice over the labelled pixels.

    target: 1 dust, 0 clean; weight: 0 where a pixel is unlabeled (ignored), else its weight.
    """
    if weight is None:
        weight = torch.ones_like(target)
    pw = torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, pos_weight=pw,
                                             reduction="sum") / weight.sum().clamp_min(1.0)
    if dice <= 0:
        return bce
    p = torch.sigmoid(logits) * (weight > 0)
    t = target * (weight > 0)
    inter = (p * t).sum()
    d = 1 - (2 * inter + 1) / (p.sum() + t.sum() + 1)
    return bce + dice * d
