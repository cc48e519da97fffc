"""Learning from a few markers.

A marker is a circle around one defect, larger than the defect. Inside it, the dust is
the one part that differs from the local background (median background, Otsu inside the
circle) with the most contrast near the centre, joined with what the base model already
calls dust there. The rest of
the circle is clean. Outside the circles most pixels are unlabeled — unmarked dust is
everywhere — so they are ignored, except pixels the base model finds clearly clean, which
serve as weak negatives. "Not dust" markers are hard negatives.

transfer: the pretrained encoder is frozen (weights and BatchNorm statistics); its features
for every training crop are computed once, and only bottleneck + decoder + head train.
scratch: a fresh model, every layer trained from random initialisation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from ..imageio import color_rgb, to_float
from .arch import DustModel, build_model
from .losses import dust_loss

Marker = tuple[float, float, float]  # x, y, r in image pixels


class NoMarkers(ValueError):
    pass


@dataclass
class FineTuneConfig:
    crop: int = 64              # the smallest crop; larger markers get larger crops
    max_crop: int = 96
    distill: float = 0.3        # weight of the base model's own prediction outside the markers
    pos_weight: float = 3.0     # 1 measured better on the marked image but halved recall on the next (README)
    dice: float = 1.0
    offsets_per_marker: int = 2
    negative_crops: int = 12
    batch: int = 16
    lr: float = 1e-3
    steps_transfer: int = 80
    steps_scratch: int = 400
    min_steps: int = 30
    patience: int = 20          # stop when the smoothed loss has not improved for this many steps
    seed: int = 0


@dataclass
class FineTuneResult:
    model: DustModel
    threshold: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


def _crop(img: np.ndarray, cy: int, cx: int, size: int) -> tuple[np.ndarray, int, int]:
    """A size×size window around (cy, cx), shifted to stay inside; reflect-padded if small."""
    h, w = img.shape[:2]
    y0 = int(np.clip(cy - size // 2, 0, max(0, h - size)))
    x0 = int(np.clip(cx - size // 2, 0, max(0, w - size)))
    win = img[y0:y0 + size, x0:x0 + size]
    if win.shape[0] < size or win.shape[1] < size:
        pad = ((0, size - win.shape[0]), (0, size - win.shape[1])) + ((0, 0),) * (win.ndim - 2)
        win = np.pad(win, pad, mode="reflect" if min(win.shape[:2]) > 1 else "edge")
    return win, y0, x0


def disc_mask(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# Choosing the defect inside a marker (``dust_inside_marker``): a candidate part's ink
# (summed contrast) is discounted by MARKER_FALLOFF per radius of its distance from the
# circle's centre; the polarity (darker or brighter) of the circle's core counts
# MARKER_CORE_PRIOR times; a part the base model calls dust counts up to
# 1 + MARKER_BASE_BONUS times. Measured by bench/markers.py (mean IoU with the true
# defect, 90 markers per kind on held-out crops) against the centre's polarity alone:
# film 0.487 -> 0.535 with the base model's help, 0.380 -> 0.454 without; sensor dust
# 0.518 -> 0.517 and 0.396 -> 0.394.
MARKER_FALLOFF = 3.0
MARKER_CORE_PRIOR = 4.0
MARKER_BASE_BONUS = 4.0


def dust_inside_marker(rgb: np.ndarray, cy: float, cx: float, r: float,
                       base_prob: np.ndarray | None = None) -> np.ndarray:
    """Which pixels inside the circle are dust (bool, same shape as the crop).

    A defect is what differs from the local median background, darker or brighter. For
    each polarity the difference is thresholded by Otsu inside the circle and cut into
    connected parts; the marker circles one defect, so one part is chosen: the one with
    the most ink (summed difference), discounted by its distance from the centre (a
    marker is drawn around its defect, though a curved hair may miss the very centre),
    favouring the polarity of the circle's core and what the base model already calls
    dust. The chosen part is joined with what the base model calls dust in the circle.
    """
    h, w = rgb.shape[:2]
    disc = disc_mask((h, w), cy, cx, r)
    k = int(min(31, max(5, 2 * round(r) + 1)))
    k += 1 - k % 2
    bg = cv2.medianBlur(np.ascontiguousarray((rgb * 255).clip(0, 255).astype(np.uint8)), k)
    signed = (rgb - bg.astype(np.float32) / 255).mean(axis=2)
    core = disc_mask((h, w), cy, cx, max(1.5, r / 2)) & disc
    core_polarity = 1.0 if core.any() and np.median(signed[core]) > 0 else -1.0
    yy, xx = np.ogrid[:h, :w]
    centre_dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2).ravel()
    seen = None if base_prob is None else disc & (base_prob > 0.5)
    best, best_score = None, 0.0
    for polarity in (1.0, -1.0):
        diff = np.maximum(signed * polarity, 0)
        vals = diff[disc]
        if not vals.size or vals.max() <= 0.015:
            continue
        v8 = np.clip(vals / vals.max() * 255, 0, 255).astype(np.uint8)
        t, _ = cv2.threshold(v8.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        cand = disc & (diff > max(0.015, t / 255 * vals.max()))
        n, lab = cv2.connectedComponents(cand.astype(np.uint8), connectivity=8)
        if n < 2:
            continue
        lab = lab.ravel()
        ink = np.bincount(lab, weights=diff.ravel(), minlength=n)
        nearest = np.full(n, np.inf)
        np.minimum.at(nearest, lab, centre_dist)
        score = ink * np.exp(-MARKER_FALLOFF * nearest / max(r, 1.0))
        if seen is not None and seen.any():
            share = np.bincount(lab, weights=seen.ravel(), minlength=n) / np.maximum(np.bincount(lab, minlength=n), 1)
            score *= 1.0 + MARKER_BASE_BONUS * share
        if polarity == core_polarity:
            score *= MARKER_CORE_PRIOR
        score[0] = 0.0
        j = int(np.argmax(score))
        if score[j] > best_score:
            best, best_score = (lab == j).reshape(h, w), float(score[j])
    dust = np.zeros((h, w), bool) if best is None else best
    if seen is not None:
        dust |= seen
    if not dust.any():  # nothing stands out: trust the user, take the core of the circle
        dust = disc_mask((h, w), cy, cx, max(1.0, r / 3))
    return dust


def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    out = np.rot90(a, k % 4, axes=(0, 1))
    return out[:, ::-1] if k >= 4 else out


def build_training_set(base: DustModel | None, image: np.ndarray, order: str,
                       dust: list[Marker], not_dust: list[Marker], cfg: FineTuneConfig,
                       device: torch.device, check_cancel: Callable[[], None] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crops (N,3,C,C), targets and weights (N,1,C,C), each in the 8 flips/rotations."""
    rng = np.random.default_rng(cfg.seed)
    h, w = image.shape[:2]
    # crops just large enough for the largest marker (cost grows with the square of the size)
    max_r = max([r for _, _, r in dust + not_dust] or [0.0])
    C = int(min(cfg.max_crop, max(cfg.crop, 16 * np.ceil(3 * max_r / 16))))
    centres = []
    for (x, y, _r) in dust:
        for j in range(cfg.offsets_per_marker):
            jit = 0 if j == 0 else C // 4
            centres.append((int(y + rng.integers(-jit, jit + 1)), int(x + rng.integers(-jit, jit + 1))))
    for (x, y, _r) in not_dust:
        centres.append((int(y), int(x)))
    for _ in range(cfg.negative_crops):
        centres.append((int(rng.integers(0, h)), int(rng.integers(0, w))))

    xs, ts, ws = [], [], []
    for cy, cx in centres:
        if check_cancel:
            check_cancel()
        win, y0, x0 = _crop(image, cy, cx, C)
        rgb = to_float(np.ascontiguousarray(color_rgb(win, order)))
        prob = None
        if base is not None:
            with torch.inference_mode():
                t = torch.from_numpy(rgb.transpose(2, 0, 1)[None].copy()).to(device)
                prob = torch.sigmoid(base(t))[0, 0].float().cpu().numpy()
        if prob is not None:
            # transfer: outside the markers, stay with what the base model says (soft targets):
            # unmarked dust stays dust, clean stays clean, and the decoder cannot drift far
            target = prob.astype(np.float32)
            weight = np.full((C, C), cfg.distill, np.float32)
        else:
            # scratch: no base model to lean on; flat pixels are weak negatives
            target = np.zeros((C, C), np.float32)
            weight = np.zeros((C, C), np.float32)
            bg = cv2.medianBlur(np.ascontiguousarray((rgb * 255).astype(np.uint8)), 7)
            weight[np.abs(rgb - bg / 255.0).max(axis=2) < 0.02] = 0.1
        for (x, y, r) in dust:
            lx, ly = x - x0, y - y0
            if -r <= lx < C + r and -r <= ly < C + r:
                disc = disc_mask((C, C), ly, lx, r)
                d = dust_inside_marker(rgb, ly, lx, r, prob)
                weight[disc] = 1.0
                target[disc] = d[disc]
        for (x, y, r) in not_dust:
            lx, ly = x - x0, y - y0
            disc = disc_mask((C, C), ly, lx, r)
            weight[disc] = 2.0
            target[disc] = 0.0
        for k in range(8):
            xs.append(_dihedral(rgb, k).transpose(2, 0, 1))
            ts.append(_dihedral(target, k)[None])
            ws.append(_dihedral(weight, k)[None])
    return (torch.from_numpy(np.ascontiguousarray(np.stack(xs))),
            torch.from_numpy(np.ascontiguousarray(np.stack(ts))),
            torch.from_numpy(np.ascontiguousarray(np.stack(ws))))


def fine_tune(base: DustModel, image: np.ndarray, order: str, dust: list[Marker],
              not_dust: list[Marker] | None = None, mode: str = "transfer",
              device: torch.device | str = "cpu", cfg: FineTuneConfig | None = None,
              progress: Callable[[float, float], None] | None = None,
              check_cancel: Callable[[], None] | None = None) -> FineTuneResult:
    """Fine-tune on the markers; returns a new model (``base`` is left as it was)."""
    if mode not in ("transfer", "scratch"):
        raise ValueError(f"mode must be 'transfer' or 'scratch', not {mode!r}")
    if not dust:
        raise NoMarkers("fine-tuning needs at least one dust marker")
    cfg = cfg or FineTuneConfig()
    not_dust = not_dust or []
    device = torch.device(device)
    t0 = time.monotonic()
    torch.manual_seed(cfg.seed)
    base.eval()
    x, target, weight = build_training_set(base if mode == "transfer" else None, image, order,
                                                  dust, not_dust, cfg, device, check_cancel)
    x, target, weight = x.to(device), target.to(device), weight.to(device)
    n = x.shape[0]

    if mode == "transfer":
        model = copy.deepcopy(base).to(device)
        model.freeze_encoder()
        feats = []  # computed once, reused every step
        with torch.inference_mode():
            for i in range(0, n, 32):
                if check_cancel:
                    check_cancel()
                feats.append([f.clone() for f in model.encode(x[i:i + 32])])
        feats = [torch.cat(parts) for parts in zip(*feats, strict=True)]
        model.decoder.eval()  # keep the pretrained BatchNorm statistics; affine params still learn
        params = list(model.decoder.parameters())
        steps = cfg.steps_transfer
    else:
        model = build_model(base.cfg).to(device)
        model.train()
        params = list(model.parameters())
        steps = cfg.steps_scratch
        feats = None
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    best, since_best, ema = float("inf"), 0, None
    step = 0
    for step in range(1, steps + 1):
        if check_cancel:
            check_cancel()
        idx = torch.randperm(n, generator=gen)[:cfg.batch].to(device)
        if feats is not None:
            logits = model.decoder(*(f[idx] for f in feats))
        else:
            logits = model(x[idx])
        loss = dust_loss(logits, target[idx], weight[idx], pos_weight=cfg.pos_weight, dice=cfg.dice)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = float(loss.detach())
        losses.append(lv)
        ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        if ema < best * 0.99:
            best, since_best = ema, 0
        else:
            since_best += 1
        if progress:
            progress(step / steps, lv)
        if step >= cfg.min_steps and since_best >= cfg.patience:
            break
    model.eval()
    if mode == "transfer":
        model.freeze_encoder()
    # A threshold calibrated on the marked spots was tried and measured worse (it drops to
    # where texture fires); the marked spots themselves always join the mask instead
    # (pipeline.decide_mask), so the model's own 0.5 stays.
    return FineTuneResult(model, 0.5, losses, time.monotonic() - t0, step)
