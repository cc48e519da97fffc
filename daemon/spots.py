"""The spot filter: a second look at each detected spot, which drops the ones unlike dust.

The network judges pixels; most of its false alarms are whole spots on sharp picture detail
(a catch-light, a twig, a letter), confident at every pixel. Looked at as one object, such a
spot differs from dust in ways a few numbers say: how far it stands out of the texture
around it, how sharp that texture is, its colour against its surroundings, its shape. The
filter measures those numbers (``FEATURES``) for every 8-connected spot of a detected mask
and weighs them with a logistic regression fitted when the base model is trained
(``fit``; ``healdust train-base`` fits it on the model's own detections in synthetic damage
over the training photos, and the base model's metadata carries it). Spots the user marked
as dust are always kept.

Only image pixels and the spot's shape are used, not the network's probabilities, so the
same filter serves the base model and every model fine-tuned from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from .components import MaskComponents
from .imageio import color_rgb, to_float

FEATURES = (
    "log area", "log longest side", "fill of the bounding box", "elongation",
    "luminance step", "absolute luminance step", "darkest step", "brightest step",
    "log texture around", "log step over texture", "log edges around", "log edges inside",
    "colour cast", "log brightness around", "log darkest channel ratio", "perimeter over root area",
)
# px of picture kept around a spot: the spot grown by NEAR, then a ring of RING beyond it
NEAR, RING = 3, 4
PAD = NEAR + RING + 5
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_EPS = 1e-3


def _disk(r: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def spot_feature_row(rgb: np.ndarray, spot: np.ndarray, others: np.ndarray) -> np.ndarray:
    """The FEATURES of one spot: ``rgb`` float HxWx3 (0..1) around it, ``spot`` its pixels
    (bool HxW, not empty), ``others`` the other detected pixels there (left out of the ring)."""
    rgb = np.clip(rgb, 0.0, 1.0)
    lum = rgb @ LUMA
    near = cv2.dilate(spot.view(np.uint8), _disk(NEAR)).astype(bool)
    ring = cv2.dilate(near.view(np.uint8), _disk(RING)).astype(bool) & ~near
    ring &= ~cv2.dilate(others.view(np.uint8), _disk(NEAR)).astype(bool)
    if ring.sum() < 5:  # crowded or at a corner: whatever lies outside the spot's surroundings
        ring = ~near
    if not ring.any():
        ring = ~spot
    if not ring.any():
        ring = spot
    gx = cv2.Sobel(lum, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(lum, cv2.CV_32F, 0, 1, ksize=3)
    grad = np.hypot(gx, gy)
    ys, xs = np.nonzero(spot)
    h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    area = int(spot.sum())
    inside, around = lum[spot], lum[ring]
    base = float(np.median(around))
    texture = float(around.std()) + _EPS
    step = float(inside.mean()) - base
    c_in = rgb[spot].mean(0)
    c_around = np.median(rgb[ring], axis=0)
    ratio = (c_in + _EPS) / (c_around + _EPS)
    edge = cv2.morphologyEx(spot.view(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    return np.array([
        np.log(area), np.log(max(h, w)), area / (h * w), max(h, w) / min(h, w),
        step, abs(step), float(inside.min()) - base, float(inside.max()) - base,
        np.log(texture), np.log(abs(step) / texture + _EPS), np.log(float(grad[ring].mean()) + _EPS),
        np.log(float(grad[spot].mean()) + _EPS),
        float(ratio.max() - ratio.min()), np.log(float(around.mean()) + _EPS), np.log(float(ratio.min())),
        cv2.countNonZero(edge) / np.sqrt(area),
    ], np.float32)


def _window(box, shape) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = shape
    return max(0, y0 - PAD), min(h, y1 + PAD), max(0, x0 - PAD), min(w, x1 + PAD)


def spot_features(image: np.ndarray, order: str, mask: np.ndarray, comps: MaskComponents | None = None,
                  check_cancel: Callable[[], None] | None = None) -> tuple[MaskComponents, np.ndarray]:
    """(the mask's components, FEATURES of each: float32 [count, len(FEATURES)], row k-1 for
    component k). ``image`` in any depth and channel order the pipeline takes."""
    comps = comps if comps is not None else MaskComponents(mask)
    rows = np.zeros((comps.count, len(FEATURES)), np.float32)
    for k in range(1, comps.count + 1):
        if check_cancel is not None and k % 256 == 0:
            check_cancel()
        y0, y1, x0, x1 = _window(comps.boxes[k], comps.shape)
        lab = comps.labels(y0, y1, x0, x1)
        rgb = to_float(np.ascontiguousarray(color_rgb(image[y0:y1, x0:x1], order)))
        rows[k - 1] = spot_feature_row(rgb, lab == k, (lab > 0) & (lab != k))
    return comps, rows


@dataclass
class SpotFilter:
    """Logistic regression over standardised FEATURES; a spot is kept when its probability
    of being dust is at least ``threshold``."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float
    threshold: float

    def probability(self, feats: np.ndarray) -> np.ndarray:
        z = ((feats - self.mean) / self.scale) @ self.weight + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))

    def to_dict(self) -> dict:
        return {"features": list(FEATURES), "mean": [float(v) for v in self.mean],
                "scale": [float(v) for v in self.scale], "weight": [float(v) for v in self.weight],
                "bias": float(self.bias), "threshold": float(self.threshold)}

    @classmethod
    def from_dict(cls, d: dict) -> SpotFilter:
        """From a model's metadata; ValueError when it was made for other features."""
        if list(d.get("features", ())) != list(FEATURES):
            raise ValueError("the spot filter was fitted on other features than this version measures")
        arrays = [np.asarray(d[k], np.float32) for k in ("mean", "scale", "weight")]
        if any(a.shape != (len(FEATURES),) or not np.isfinite(a).all() for a in arrays) or (arrays[1] <= 0).any():
            raise ValueError("the spot filter's numbers are malformed")
        bias, threshold = float(d["bias"]), float(d["threshold"])
        if not (np.isfinite(bias) and 0.0 <= threshold <= 1.0):
            raise ValueError("the spot filter's numbers are malformed")
        return cls(*arrays, bias, threshold)


def fit(feats: np.ndarray, good: np.ndarray, l2: float = 1e-3, steps: int = 500) -> SpotFilter:
    """A filter fitted to spots judged dust (``good`` True) or not; threshold 0.5 until
    the caller picks one. Deterministic: full-batch Newton steps on the L2-penalised loss."""
    x = np.asarray(feats, np.float64)
    y = np.asarray(good, np.float64)
    if len(x) < 2 or y.min() == y.max():
        raise ValueError("fitting a spot filter needs spots of both kinds, dust and not dust")
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    beta = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2 * len(x))
    reg[-1] = 0.0  # the bias is not penalised
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ beta, -40, 40)))
        grad = z.T @ (p - y) + reg * beta
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg + 1e-9)
        delta = np.linalg.solve(hess, grad)
        beta -= delta
        if np.abs(delta).max() < 1e-8:
            break
    return SpotFilter(mean.astype(np.float32), scale.astype(np.float32), beta[:-1].astype(np.float32),
                      float(beta[-1]), 0.5)


def _touches_marker(box, markers) -> bool:
    x0, y0, x1, y1 = (int(v) for v in box)
    for x, y, r in markers:
        # the circle against the box (end exclusive): nearest point of the box to the centre
        nx, ny = min(max(x, x0), x1 - 1), min(max(y, y0), y1 - 1)
        if (nx - x) ** 2 + (ny - y) ** 2 <= (r + 1) ** 2:
            return True
    return False


def apply_filter(image: np.ndarray, order: str, mask: np.ndarray, spot_filter: SpotFilter,
                 dust: list | None = None, comps: MaskComponents | None = None,
                 check_cancel: Callable[[], None] | None = None) -> tuple[int, MaskComponents]:
    """Clear, in place, every spot of ``mask`` (uint8 or bool HxW) the filter finds unlike
    dust, except spots within a marked dust circle ``dust`` [(x, y, r)]; returns (how many
    were cleared, the components of the mask as it is now)."""
    comps, feats = spot_features(image, order, mask, comps, check_cancel)
    if comps.count == 0:
        return 0, comps
    drop = spot_filter.probability(feats) < spot_filter.threshold
    cleared = []
    for k in np.flatnonzero(drop) + 1:
        if dust and _touches_marker(comps.boxes[k], dust):
            continue
        x0, y0, x1, y1 = (int(v) for v in comps.boxes[k])
        cleared.append((y0, y1, x0, x1, comps.labels(y0, y1, x0, x1) == k))
    # cleared only now: the components' labels are rebuilt from the mask as it was
    for y0, y1, x0, x1, region in cleared:
        mask[y0:y1, x0:x1][region] = 0
    return len(cleared), (MaskComponents(mask) if cleared else comps)
