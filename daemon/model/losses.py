"""Losses for the extreme class imbalance of dust (well under 1 % of pixels)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

# Clean pixels this close to dust (px) are never hard negatives: a speck's soft edge.
HARD_NEGATIVE_MARGIN = 3


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


def hard_negative_loss(logits: torch.Tensor, target: torch.Tensor, fraction: float,
                       margin: int = HARD_NEGATIVE_MARGIN) -> torch.Tensor:
    """Mean BCE over the hardest ``fraction`` of the clean pixels (online hard example
    mining): the few picture details the model is surest are dust, which the mean over
    a million clean pixels barely sees. Pixels within ``margin`` px of dust are left out:
    a speck's soft edge lies there, labelled clean but looking like dust, and punishing
    it teaches the model to miss small specks. 0 when there is no such clean pixel.

    logits, target: N×1×H×W (target 1 on dust).
    """
    near = F.max_pool2d(target, 2 * margin + 1, stride=1, padding=margin) if margin > 0 else target
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")[near < 0.5]
    if neg.numel() == 0 or fraction <= 0:
        return logits.sum() * 0.0
    k = max(1, int(round(fraction * neg.numel())))
    return torch.topk(neg, k, sorted=False).values.mean()
