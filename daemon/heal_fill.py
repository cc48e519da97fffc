"""Opaque repair: the photo's own texture copied in from nearby, blended in.

The hole is cut into cells (one cell for a small speck, a chain of overlapping cells
along a hair or a scratch). For each cell the nearby patches whose surroundings best
match the hole's surroundings are found (masked SSD through ``cv2.matchTemplate``):

* the hole's structure (detail coarser than ``LP_SIGMA``) is their match-weighted mean
  (a non-local mean over candidates at least ``SPREAD`` px apart: continues texture,
  but averages away a single wrong guess);
* its grain (finer detail) is the best patch's own, so it is not averaged away;
* like a healing brush, the mismatch between the copied structure and the real pixels on
  the hole's rim is spread smoothly (membrane fill) across the hole, so no seam shows.

Cells with no usable patch nearby (the middle of a large painted blob) get a diffusion
fill plus noise matched to the grain around the hole. Pixels that still show a partly
transparent speck's picture through it are unmixed afterwards (``unmix_speck``), against
the structure alone: the copied grain is only a guess, and would blur what shows through.
"""

from __future__ import annotations

import cv2
import numpy as np

# A hole whose bounding box fits in this many pixels is copied as one patch.
SINGLE_PATCH_MAX = 40
# Larger holes (hairs, scratches, blobs) are cut into cells of this size...
CELL = 20
# ...each matched on a template reaching this far around the cell.
CONTEXT = 6
# How far a source patch may lie from its cell (the single-patch case adds the hole's
# size so the source can clear the hole).
SEARCH = 28
# Overlap of neighbouring cells, blended linearly so no seam shows inside a long hole.
FEATHER = 3
# Sigma of the high-pass used to measure and synthesise grain.
GRAIN_SIGMA = 1.0
# Detail finer than this (sigma, px) is grain, taken from the best patch alone; coarser
# detail is averaged over the candidates (a guess averaged over many is a better guess).
LP_SIGMA = 1.0
# Candidate patches averaged for a hole's structure, and how forgiving the average is
# (a candidate whose cost exceeds the best by NLM_H × the best's gets weight 1/e).
CANDIDATES = 16
NLM_H = 4.0
# Candidates lie at least this far (px) apart: neighbours of the best one are nearly the
# same patch shifted, and averaging them averages nothing away.
SPREAD = 3
# Share of the best patch's grain put back: a little under 1, because grain in the wrong
# place costs twice its variance in error; the measured grain ratio stays near the
# clean photo's own.
GRAIN_GAIN = 0.9
# Sigma (px) smoothing the rim mismatch before it is spread across the hole.
RING_SIGMA = 1.5
# Unmixing a partly transparent speck: the picture read through it is trusted by
# (1 − α)² / ((1 − α)² + UNMIX_K), the fill by the rest.
UNMIX_K = 0.1
# A pixel is unmixed only where the mixing model explains it: what is left of its move
# away from the fill, once the move towards the tone is taken out, must stay within
# UNMIX_RESID of the whole move (in squared length) or within UNMIX_NOISE × the grain's
# RMS (at least UNMIX_NOISE_MIN) of it.
UNMIX_RESID = 0.25
UNMIX_NOISE = 3.0
UNMIX_NOISE_MIN = 0.004
# Opaque dust scans near black on a positive and near white on a negative, but a speck's
# core is rarely fully opaque (small specks are all soft edge), so the tone read there
# lies between the picture and the dust's own. It is stretched away from the picture by
# up to TONE_STRETCH, never past TONE_DARK / TONE_BRIGHT (mean of the channels); a
# speck already that dark or bright is left as read. Measured on bench/healing.py's
# film crops: +0.2 dB on both crop sets (a stretch of 2 or no limit did worse).
TONE_STRETCH = 1.5
TONE_DARK = 0.1
TONE_BRIGHT = 0.9


def search_radius(bbox_h: int, bbox_w: int) -> int:
    """How far from a hole of this size a source patch is looked for."""
    if max(bbox_h, bbox_w) <= SINGLE_PATCH_MAX:
        return SEARCH + max(bbox_h, bbox_w)
    return SEARCH + CELL


def smooth_fill(values: np.ndarray, unknown: np.ndarray) -> np.ndarray:
    """``values`` (HxWxC float32) with the ``unknown`` pixels filled smoothly from outside.

    Navier–Stokes, not Telea: OpenCV's Telea on float images extrapolates gradients
    without bound and overshoots far outside the input's range.
    """
    m8 = unknown.astype(np.uint8)
    out = np.empty_like(values)
    for c in range(values.shape[2]):
        out[:, :, c] = cv2.inpaint(np.ascontiguousarray(values[:, :, c]), m8, 3, cv2.INPAINT_NS)
    return out


def masked_blur(values: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``values`` using only pixels where ``weight`` > 0 (normalised)."""
    w = weight.astype(np.float32)
    num = cv2.GaussianBlur(values * w[..., None], (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    den = cv2.GaussianBlur(w, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    return (num.reshape(values.shape) / np.maximum(den, 1e-6)[..., None]).astype(np.float32)


def high_pass(values: np.ndarray) -> np.ndarray:
    blur = cv2.GaussianBlur(values, (0, 0), GRAIN_SIGMA, borderType=cv2.BORDER_REPLICATE)
    return values - blur.reshape(values.shape)


def grain_noise(shape: tuple[int, int, int], ring_hp_std: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """White noise scaled so its high-pass matches ``ring_hp_std`` per channel."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    hp = high_pass(noise)
    k = ring_hp_std / np.maximum(hp.reshape(-1, shape[2]).std(0), 1e-6)
    return noise * k.astype(np.float32)


def _ccorr(image: np.ndarray, templ: np.ndarray) -> np.ndarray:
    return cv2.matchTemplate(image, templ, cv2.TM_CCORR)


def best_offsets(win: np.ndarray, known: np.ndarray, box: tuple[int, int, int, int],
                 fill: np.ndarray, radius: int, count: int) -> list[tuple[int, int, float]]:
    """Offsets (dy, dx, cost) of the nearby patches whose pixels best match ``box``'s.

    ``fill`` (bool, box-sized) marks the pixels that will be copied: a candidate is
    valid only if all of them land on known pixels. The cost is the mean squared
    difference over the pixels known in both the box and the candidate, so a source
    may lie right beside a thin hair. Up to ``count`` candidates, best first, none
    within ``SPREAD`` px of a better one; empty when nothing valid is near enough.
    """
    H, W = known.shape
    y0, y1, x0, x1 = box
    m = known[y0:y1, x0:x1].astype(np.float32)
    n_known = float(m.sum())
    if n_known < 4:
        return []
    sy0, sy1 = max(0, y0 - radius), min(H, y1 + radius)
    sx0, sx1 = max(0, x0 - radius), min(W, x1 + radius)
    th, tw = y1 - y0, x1 - x0
    if sy1 - sy0 < th or sx1 - sx0 < tw:
        return []
    src = win[sy0:sy1, sx0:sx1]
    k = known[sy0:sy1, sx0:sx1].astype(np.float32)
    holes = _ccorr(1.0 - k, fill.astype(np.float32))
    overlap = _ccorr(k, m)
    t = win[y0:y1, x0:x1] * m[..., None]
    cost = (_ccorr(k, (t * t).sum(2)) - 2.0 * _ccorr(src * k[..., None], t)
            + _ccorr((src * src).sum(2) * k, m))
    cost = np.maximum(cost / np.maximum(overlap, 1.0), 0.0)
    bad = (holes > 0.5) | (overlap < 0.5 * n_known)
    # prefer near patches when matches are about equally good: grain and light drift
    ry, rx = np.ogrid[sy0 - y0:sy1 - th + 1 - y0, sx0 - x0:sx1 - tw + 1 - x0]
    r2 = ry * ry + rx * rx
    rank = cost * (1.0 + 0.05 * r2 / float(radius * radius)) + 1e-7 * r2
    rank[bad] = np.inf
    out = []
    for _ in range(count):
        idx = int(np.argmin(rank))
        if not np.isfinite(rank.flat[idx]):
            break
        py, px = divmod(idx, rank.shape[1])
        out.append((sy0 + py - y0, sx0 + px - x0, float(cost[py, px])))
        rank[max(0, py - SPREAD):py + SPREAD + 1, max(0, px - SPREAD):px + SPREAD + 1] = np.inf
    return out


def _cells(y0: int, y1: int, x0: int, x1: int, size: int) -> list[tuple[int, int, int, int]]:
    ny = max(1, -(-(y1 - y0) // size))
    nx = max(1, -(-(x1 - x0) // size))
    ys = np.linspace(y0, y1, ny + 1).round().astype(int)
    xs = np.linspace(x0, x1, nx + 1).round().astype(int)
    return [(int(ys[i]), int(ys[i + 1]), int(xs[j]), int(xs[j + 1]))
            for i in range(ny) for j in range(nx)]


def _tent(n: int, lo_open: bool, hi_open: bool) -> np.ndarray:
    """1-D blend weight: 1 in the core, ramping down over FEATHER px at open ends."""
    w = np.ones(n, np.float32)
    r = np.linspace(1.0 / (FEATHER + 1), 1.0 - 1.0 / (FEATHER + 1), FEATHER * 2, dtype=np.float32)
    k = min(len(r), n)
    if lo_open:
        w[:k] = np.minimum(w[:k], r[:k])
    if hi_open:
        w[n - k:] = np.minimum(w[n - k:], r[::-1][len(r) - k:])
    return w


def texture_fill(win: np.ndarray, unknown: np.ndarray, target: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """Fill the ``target`` pixels of ``win`` (HxWxC float32) with matched texture.

    ``unknown`` marks every pixel that must not be used as context or source (all dust
    in the window, slightly dilated); ``target`` the part of it to fill now. Returns a
    copy of ``win`` whose target pixels are filled; the rest is unchanged.
    """
    structure, grain = texture_layers(win, unknown, target, rng)
    return structure + GRAIN_GAIN * grain


def texture_layers(win: np.ndarray, unknown: np.ndarray, target: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``texture_fill`` in two layers: (structure, grain), both HxWxC float32.

    The structure is a copy of ``win`` whose target pixels hold the filled structure;
    the grain is zero but on the target pixels (add ``GRAIN_GAIN`` of it for the fill).
    """
    H, W, C = win.shape
    target = target & unknown
    ys, xs = np.nonzero(target)
    if len(ys) == 0 or unknown.all():
        return win.copy(), np.zeros_like(win)  # nothing to fill, or nothing to fill it from
    k5 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    near = cv2.dilate(target.astype(np.uint8), k5).astype(bool)
    ring = near & ~unknown
    by0, by1 = max(0, ys.min() - 2), min(H, ys.max() + 3)
    bx0, bx1 = max(0, xs.min() - 2), min(W, xs.max() + 3)
    known = ~unknown

    single = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) <= SINGLE_PATCH_MAX
    cells = [(by0, by1, bx0, bx1)] if single else _cells(by0, by1, bx0, bx1, CELL)
    radius = search_radius(by1 - by0, bx1 - bx0)
    known_lp = masked_blur(win, known, LP_SIGMA)
    hp = win - known_lp
    lp_acc = np.zeros_like(win)
    hp_acc = np.zeros_like(win)
    wsum = np.zeros((H, W), np.float32)
    for cy0, cy1, cx0, cx1 in cells:
        f = 0 if single else FEATHER
        ey0, ey1 = max(by0, cy0 - f), min(by1, cy1 + f)
        ex0, ex1 = max(bx0, cx0 - f), min(bx1, cx1 + f)
        if not near[ey0:ey1, ex0:ex1].any():
            continue
        box = (max(0, ey0 - CONTEXT), min(H, ey1 + CONTEXT), max(0, ex0 - CONTEXT), min(W, ex1 + CONTEXT))
        fill = np.zeros((box[1] - box[0], box[3] - box[2]), bool)
        fill[ey0 - box[0]:ey1 - box[0], ex0 - box[2]:ex1 - box[2]] = near[ey0:ey1, ex0:ex1]
        cands = best_offsets(win, known, box, fill, radius, CANDIDATES)
        if not cands:
            continue
        w = np.outer(_tent(ey1 - ey0, ey0 > by0, ey1 < by1), _tent(ex1 - ex0, ex0 > bx0, ex1 < bx1))
        # structure: the candidates' smooth parts, averaged by how well they match
        # (a non-local mean); grain: the best candidate's own, so it is not averaged away
        c0 = cands[0][2]
        weights = [float(np.exp(-(c - c0) / (NLM_H * c0 + 1e-6))) for _, _, c in cands]
        lp = np.zeros((ey1 - ey0, ex1 - ex0, C), np.float32)
        for (dy, dx, _), cw in zip(cands, weights, strict=True):
            lp += cw * known_lp[ey0 + dy:ey1 + dy, ex0 + dx:ex1 + dx]
        dy, dx, _ = cands[0]
        lp_acc[ey0:ey1, ex0:ex1] += lp * (w / sum(weights))[..., None]
        hp_acc[ey0:ey1, ex0:ex1] += hp[ey0 + dy:ey1 + dy, ex0 + dx:ex1 + dx] * w[..., None]
        wsum[ey0:ey1, ex0:ex1] += w

    have = wsum > 0
    norm = np.maximum(wsum, 1e-6)[..., None]
    structure = np.zeros_like(win)
    if have.any():
        copied = lp_acc / norm
        # healing-brush correction: spread the rim mismatch smoothly across the hole
        diff = np.zeros_like(win)
        diff[ring] = known_lp[ring] - copied[ring]
        structure = copied + harmonic_fill(masked_blur(diff, ring, RING_SIGMA), target)
    detail = hp_acc / norm
    fallback = target & ~have
    if fallback.any():
        structure[fallback] = smooth_fill(known_lp, unknown)[fallback]  # diffusion
        ring_hp = hp[ring]
        std = ring_hp.std(0) if len(ring_hp) > 8 else np.zeros(C, np.float32)
        y0f, x0f = np.nonzero(fallback)
        sub = (slice(y0f.min(), y0f.max() + 1), slice(x0f.min(), x0f.max() + 1))
        noise = grain_noise(detail[sub].shape, std, rng)
        detail[sub] = np.where(fallback[sub][..., None], noise, detail[sub])
    out = win.copy()
    out[target] = structure[target]
    grain = np.zeros_like(win)
    grain[target] = detail[target]
    return out, grain


def speck_tone(seen: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """The dust's own colour (C,), from the ``seen`` and ``fill`` pixels of a speck's core.

    The core's median, stretched away from the picture there (see ``TONE_STRETCH``).
    """
    tone = np.median(seen, axis=0)
    base = np.median(fill, axis=0)
    lum, base_lum = float(tone.mean()), float(base.mean())
    if base_lum > lum > TONE_DARK:
        stretch = min(TONE_STRETCH, (base_lum - TONE_DARK) / (base_lum - lum))
    elif base_lum < lum < TONE_BRIGHT:
        stretch = min(TONE_STRETCH, (TONE_BRIGHT - base_lum) / (lum - base_lum))
    else:
        return tone.astype(np.float32)
    return np.clip(base + stretch * (tone - base), 0.0, 1.0).astype(np.float32)


def unmix_speck(seen: np.ndarray, fill: np.ndarray, grain: np.ndarray | None = None) -> np.ndarray:
    """Recover what shows through a partly transparent speck (n×C pixel lists).

    A speck lies over the picture as ``seen = picture·(1 − α) + tone·α``. The tone is
    read from the speck's core (``speck_tone``), α per pixel from how far each pixel has
    moved from the fill towards the tone; where α is well below 1 the picture is
    unmixed, where it is near 1 the fill is kept, blended by how much unmixing would
    amplify errors.

    ``fill`` is best the structure alone, with the synthetic ``grain`` given apart: α
    is then read against the structure (copied grain is noise to the real picture and
    would only blur α), and the grain goes back where the fill is kept.
    """
    grainy = fill if grain is None else fill + GRAIN_GAIN * grain
    dev = seen - fill
    mag = np.sqrt((dev * dev).sum(1))
    core = mag >= np.percentile(mag, 75)
    tone = speck_tone(seen[core], fill[core])
    d = tone[None, :] - fill
    alpha = np.clip((dev * d).sum(1) / np.maximum((d * d).sum(1), 1e-6), 0.0, 1.0)[:, None]
    picture = (seen - alpha * tone) / np.maximum(1.0 - alpha, 1e-3)
    keep = (1.0 - alpha) ** 2
    w = keep / (keep + UNMIX_K)
    # A pixel the mixing model does not explain (it did not move from the fill towards
    # the tone: a hair crossing darker ground than where its tone was read, a tone too
    # close to the fill to tell α) is not unmixed: the fill is the better guess there.
    resid = dev - alpha * d
    noise = float(np.sqrt(np.mean(grain * grain))) if grain is not None and grain.size else 0.0
    floor = (UNMIX_NOISE * max(noise, UNMIX_NOISE_MIN)) ** 2 * seen.shape[1]
    q = (resid * resid).sum(1) / np.maximum(UNMIX_RESID * (dev * dev).sum(1), floor)
    w = w * np.clip(2.0 - q, 0.0, 1.0)[:, None]
    return (w * picture + (1.0 - w) * grainy).astype(np.float32)


def harmonic_fill(values: np.ndarray, unknown: np.ndarray) -> np.ndarray:
    """``values`` with the ``unknown`` pixels replaced by the membrane (Laplace) fill.

    Smooth and bounded by the known values around the hole (no overshoot).
    """
    ys, xs = np.nonzero(unknown)
    out = values.copy()
    if len(ys) == 0:
        return out
    H, W = unknown.shape
    y0, y1 = max(0, ys.min() - 1), min(H, ys.max() + 2)
    x0, x1 = max(0, xs.min() - 1), min(W, xs.max() + 2)
    sub_u = unknown[y0:y1, x0:x1]
    dist = cv2.distanceTransform(sub_u.astype(np.uint8), cv2.DIST_L2, 3)
    reach = float(dist.max())
    sub = masked_blur(values[y0:y1, x0:x1], ~sub_u, max(1.0, reach))
    sub[~sub_u] = values[y0:y1, x0:x1][~sub_u]
    kernel = np.array([[0, 0.25, 0], [0.25, 0, 0.25], [0, 0.25, 0]], np.float32)
    where = np.broadcast_to(sub_u.reshape(sub_u.shape + (1,) * (sub.ndim - 2)), sub.shape)
    for _ in range(int(np.clip(2 * reach * reach, 8, 300))):
        avg = cv2.filter2D(sub, -1, kernel, borderType=cv2.BORDER_REPLICATE).reshape(sub.shape)
        np.copyto(sub, avg, where=where)
    out[y0:y1, x0:x1] = sub
    return out
