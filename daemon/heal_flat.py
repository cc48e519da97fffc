"""Semi-transparent repair: divide out the shadow, keep the picture underneath.

Sensor dust and faint stains do not hide the picture, they only take a fraction of its
light. Flat-field correction fixes that with a reference frame; here the flat field is
estimated from the photo itself. In log space a shadow is additive:

    log I(x) = log T(x) + log(1 - a(x))

Around a spot, ``log T`` is modelled as a smooth quadratic surface plus a colour rule
learnt on the ring around the spot (a neutral shadow leaves colour alone, and colour often
tells bright from dark parts of the picture), and ``log(1 - a)`` as a radial profile in
the spot's own elliptical metric, zero beyond its reach: first free (piecewise linear,
robust least squares), then as a flat top with a soft edge, which leaves texture far less
room to leak in. Texture and grain are not radial, so they average out of the profile.
Dividing by ``1 - a`` restores the spot with its own texture and grain. Large spots the
quadratic cannot explain get a second fit on a diffusion background (an edge running
under the spot). Each fit is then judged: too dark, brighter, tinted, textureless inside,
sharply outlined or not radial all speak for an opaque speck; the verdict is a confidence
the caller uses to blend this repair with the opaque one.

Only the mask is corrected: the faint tail of a shadow beyond it stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .heal_fill import high_pass, masked_blur, smooth_fill

# Largest fraction of light a semi-transparent spot may take; darker is treated as opaque.
MAX_ATTENUATION = 0.5
# Largest spot (bounding box side, px) considered for the semi-transparent repair.
MAX_SIZE = 160
# Spots flatter than this (short / long axis) are hairs or scratches, never shadows.
MIN_ROUNDNESS = 0.35
# Weight of the profile's smoothness prior, relative to one bin's pixels.
SMOOTHNESS = 1.0
# A spot must lose at least this fraction of light to be treated as a shadow.
MIN_ATTENUATION = 0.02
# Blobs less solid than this (rings, C shapes, ragged stamps) are specks, not shadows.
MIN_SOLIDITY = 0.85
# Degree of the smooth surface modelling the unshadowed brightness around a spot.
POLY_DEGREE = 2
# Model the shadow as a flat top with a soft edge (else a free radial profile).
PLATEAU = True
# Spots at least this large (px) get a second opinion from a diffusion background.
DIFFUSE_MIN_AREA = 40
# Texture ratio (inside the corrected spot / around it) a shadow may leave behind.
TEXTURE_RANGE = (0.5, 1.6)
# Below this high-pass RMS the surroundings are too smooth to judge texture by.
TEXTURE_FLOOR = 0.0015
# Chromaticity (log units) a shadowed pixel may stray beyond the ring's colours...
TINT_MARGIN = 0.05
# ...and the share of the spot allowed to do so.
MAX_TINT = 0.3
# Ridge on the colour-to-brightness rule, per ring pixel (in squared log units).
CHROMA_RIDGE = 0.0001
# Added to the luminance before taking logs: keeps near-black pixels from dominating.
LOG_EPS = 0.02
# A spot whose raw inside is at least this busy relative to a ring busier than
# SEE_THROUGH_BUSY (RMS of the band below) shows the picture through it: never painted
# over, whatever the fits say.
SEE_THROUGH_RATIO = 0.6
SEE_THROUGH_BUSY = 0.01
# ...measured on this band of detail (difference of Gaussian blurs, sigmas in px).
SEE_THROUGH_BAND = (1.0, 2.5)
# ...and only for spots whose median inside, over the median around, lies in this range:
# wide, because a busy picture moves medians a lot (sensor dust measured 0.41–2.3), but
# not below 1 − MAX_ATTENUATION: dark specks inside a generous hand-painted mask
# measured 0.42–0.44. Bright specks are ruled out as brighter before (0 of 212 opaque
# specks with heavy grain on top passed as see-through).
SEE_THROUGH_LEVELS = (0.5, 2.5)
# ...and whose darkest pixels (2nd percentile) keep this share of the ring's darkest,
# brightest (98th) stay below this multiple of the ring's brightest: a speck inside a
# generous hand-painted mask, whose inside is then mostly clean picture, shows there.
# (Insurance, for grey images above all, where colour cannot tell: it costs about
# 1 dB of the healing bench's +10 dB on sensor dust.)
SEE_THROUGH_EXTREMES = (0.4, 1.2)
# ...and whose colours are nearly all found around it (a shadow is neutral; a coloured
# speck in a generous mask, the rest of it clean picture, measured 0.31, sensor dust
# at most 0.22 on busy pictures): the share of foreign colour, as ``MAX_TINT``.
SEE_THROUGH_MAX_TINT = 0.25
# ...and the most light given back to such a spot: on a busy picture the shadow fits
# measured two to three times the true shadow.
SEE_THROUGH_CAP = 0.1
# Raw-data checks before the fit: the bright end (percentile) of the pixels just around a
# spot, which a shadowed spot's median cannot exceed...
NEAR_PERCENTILE = 90
# ...nor fall below this fraction of (far darker than MAX_ATTENUATION allows).
DARK_RATIO = 0.15


@dataclass
class ShadowFit:
    attenuation: np.ndarray   # HxW float32: fraction of light removed (shared by channels)
    mean: float               # mean fitted attenuation over the spot (negative: brighter)
    resid_in: float           # RMS of the fit's residual on the spot (log units)
    resid_out: float          # ...and on the ring around it
    tint: float = 0.0         # share of the spot whose colour is not found in the ring


def elongation(region: np.ndarray) -> float:
    """Ratio of the region's short to long axis (1 round, near 0 for a hair)."""
    ys, xs = np.nonzero(region)
    if len(ys) < 3:
        return 1.0
    cov = np.cov(np.stack([ys, xs]).astype(np.float64)) + np.eye(2) * (1 / 12)
    ev = np.linalg.eigvalsh(cov)
    return float(np.sqrt(ev[0] / ev[1]))


def _spot_radius(region: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Distance of every pixel from the spot's centre in its elliptical metric, and the
    spot's extent in that metric."""
    ys, xs = np.nonzero(region)
    cy, cx = ys.mean(), xs.mean()
    cov = np.cov(np.stack([ys, xs]).astype(np.float64)) + np.eye(2) * (1 / 12)
    ev, vec = np.linalg.eigh(cov)
    g = float(np.sqrt(np.sqrt(ev[0] * ev[1])))
    m = vec @ np.diag(g / np.sqrt(ev)) @ vec.T
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    dy, dx = yy - np.float32(cy), xx - np.float32(cx)
    u = m[0, 0] * dy + m[0, 1] * dx
    v = m[1, 0] * dy + m[1, 1] * dx
    d = np.sqrt(u * u + v * v).astype(np.float32)
    return d, float(np.percentile(d[region], 98)) + 0.5


@dataclass
class SpotGeometry:
    """Where a spot's shadow would reach, shared by the raw-data checks and the fits."""
    d: np.ndarray        # HxW distance from the spot's centre in its elliptical metric
    r0: float            # the spot's extent in that metric
    reach: float         # where a shadow's soft tail ends
    outer: float         # outer edge of the ring of unshadowed pixels used by the fits
    others: np.ndarray   # HxW bool: other spots, dilated by the tail (never context)
    use: np.ndarray      # HxW bool: the pixels the fits see
    tint: float | None = None  # the spot's foreign colour share, once measured


def spot_geometry(all_mask: np.ndarray, region: np.ndarray) -> SpotGeometry | None:
    """The fit's neighbourhood of ``region``; None if there is too little context."""
    H, W = region.shape
    d, r0 = _spot_radius(region, (H, W))
    tail = float(np.clip(0.35 * r0, 2.0, 16.0))
    reach = r0 + tail
    outer = reach + max(6.0, 0.8 * reach)
    t = int(np.ceil(tail))
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * t + 1, 2 * t + 1))
    others = cv2.dilate((all_mask & ~region).astype(np.uint8), k).astype(bool)
    use = (d < outer) & ~others
    n_out = int((use & (d >= reach)).sum())
    if n_out < 24 or int((use & region).sum()) < 3:
        return None
    return SpotGeometry(d, r0, reach, outer, others, use)


def fit_radial_shadow(win: np.ndarray, all_mask: np.ndarray, region: np.ndarray,
                      diffuse: bool = False, geo: SpotGeometry | None = None) -> ShadowFit | None:
    """Fit background × radial shadow around ``region``; None if too little context.

    The background is a quadratic surface plus a colour rule, or with ``diffuse`` the
    picture around the shadow carried across it by diffusion (better where an edge runs
    under the spot) plus a plane. ``geo``: the spot's geometry, if already known.
    """
    H, W = win.shape[:2]
    geo = geo if geo is not None else spot_geometry(all_mask, region)
    if geo is None:
        return None
    d, r0, reach, outer, others, use = geo.d, geo.r0, geo.reach, geo.outer, geo.others, geo.use

    yy, xx = np.nonzero(use)
    dd = d[use].astype(np.float64)
    pix = win[use].astype(np.float64)
    pix = np.maximum(pix, 0.0)  # float images may dip below black
    lum = pix.mean(1)
    obs = np.log(lum + LOG_EPS)
    cy, cx = (H - 1) / 2, (W - 1) / 2
    u, v = (xx - cx) / outer, (yy - cy) / outer
    cols = [u ** i * v ** (k - i) for k in range(POLY_DEGREE + 1) for i in range(k + 1)]
    n_surface = len(cols)
    ridge = [0.0] * len(cols)
    tint = 0.0
    if pix.shape[1] == 3:
        # a neutral shadow leaves chromaticity alone, and colour often tells light from
        # dark (blue sky over grey rock): let the ring's colour predict the brightness
        # under the spot. Learnt on the ring only, so a coloured speck cannot explain
        # away its own darkness; the ridge keeps a colourless ring from inventing a rule.
        chroma = _chroma(pix, lum)
        cols += [chroma[:, 0], chroma[:, 2]]
        ridge += [CHROMA_RIDGE, CHROMA_RIDGE]
        tint = geo.tint if geo.tint is not None else _foreign_colour(chroma, region[use], dd >= reach)
    basis = np.stack(cols, 1)
    # radial profile: tent basis on nodes 0..K-1, node K (at the reach) pinned to 0;
    # each pixel touches two neighbouring nodes (i0, i1) with weights (a0, a1)
    n_nodes = int(np.clip(round(reach), 3, 40))
    h = reach / n_nodes
    pos = dd / h
    kk = np.floor(pos).astype(np.int64)
    frac = pos - kk
    inside = kk < n_nodes
    i0 = np.minimum(kk, n_nodes)
    i1 = np.minimum(kk + 1, n_nodes)
    a0 = np.where(inside, 1.0 - frac, 0.0)
    a1 = np.where(kk + 1 < n_nodes, frac, 0.0)
    base_w = np.clip(lum, 0.03, 1.0)  # log noise grows as the pixel darkens

    # stage 1: the colour-to-brightness rule, from the ring around the shadow's reach
    ring = ~inside
    npoly = n_surface
    if diffuse:
        hidden = (d < reach) | others
        carried = smooth_fill(masked_blur(win, ~hidden, 1.5), hidden)
        colour_part = np.log(np.maximum(carried[use].astype(np.float64), 0.0).mean(1) + LOG_EPS)
        npoly = 3
    elif basis.shape[1] > n_surface:
        coef = _robust_fit(basis[ring], obs[ring], base_w[ring], np.array(ridge) * ring.sum())
        colour_part = basis[:, n_surface:] @ coef[n_surface:]
    else:
        colour_part = np.zeros_like(obs)
    target = obs - colour_part
    # stage 2: smooth background and the shadow's radial profile, fitted together
    poly = basis[:, :npoly]
    lam = SMOOTHNESS * np.sqrt(max(1.0, inside.sum() / n_nodes))
    prior = np.zeros((n_nodes, npoly + n_nodes))
    for j in range(n_nodes):
        for o, c in ((-1, 1.0), (0, -2.0), (1, 1.0)):
            idx = j + o
            if 0 <= idx < n_nodes:
                prior[j, npoly + idx] += lam * c
            elif idx < 0:  # mirror at the centre: the profile is flat there
                prior[j, npoly + 1] += lam * c
    prior_gram = prior.T @ prior
    w = base_w.copy()
    for it in range(4):
        coef = _solve_weighted(poly, i0, i1, a0, a1, n_nodes, w * w, target, prior_gram)
        prof = np.append(coef[npoly:], 0.0)
        resid = target - poly @ coef[:npoly] - a0 * prof[i0] - a1 * prof[i1]
        if it < 3:  # Huber weights, scaled apart in the shadow and around it
            w = base_w.copy()
            for part in (inside, ~inside):
                r = np.abs(resid[part])
                if len(r):
                    s = 1.4826 * float(np.median(r)) + 1e-4
                    w[part] *= np.minimum(1.0, 1.5 * s / np.maximum(r, 1e-12))
    profile = np.concatenate([coef[npoly:], [0.0]])
    nodes = np.arange(n_nodes + 1) * h
    log_t = np.interp(d.ravel(), nodes, profile, right=0.0).reshape(H, W)
    if PLATEAU:
        plateau = _fit_plateau(poly, dd, target, w * w, r0, reach)
        if plateau is not None:
            depth, edge, width, pcoef = plateau
            log_t = (depth * _plateau_shape(d, edge, width)).astype(np.float64)
            resid = target - poly @ pcoef - depth * _plateau_shape(dd, edge, width)
            coef = np.concatenate([pcoef, coef[npoly:]])
    raw = 1.0 - np.exp(log_t)
    # the fit saw log(L + eps): a shadow a dims that by a·L/(L + eps), so scale it back
    lum_bg = np.exp(poly @ coef[:npoly] + colour_part)
    scale = np.ones((H, W))
    scale[use] = lum_bg / np.maximum(lum_bg - LOG_EPS, 0.25 * lum_bg)
    raw = raw * scale
    att = np.clip(raw, 0.0, 0.95).astype(np.float32)

    in_spot = region[use]
    ring = ~in_spot & (dd >= reach)
    return ShadowFit(att, float(raw[region].mean()), float(np.sqrt(np.mean(resid[in_spot] ** 2))),
                     float(np.sqrt(np.mean(resid[ring] ** 2))), tint)


def _chroma(pix: np.ndarray, lum: np.ndarray) -> np.ndarray:
    """Log chromaticity: each channel's log over the luminance's (n×3 from n×3, n)."""
    return np.log(pix + LOG_EPS) - np.log(lum + LOG_EPS)[:, None]


def _foreign_colour(chroma: np.ndarray, spot: np.ndarray, ring: np.ndarray) -> float:
    """Share of spot pixels whose chromaticity lies outside the ring's range.

    A neutral shadow dims a pixel without changing its colour, so a shadowed spot shows
    the colours found around it; a coloured speck shows its own.
    """
    lo = np.percentile(chroma[ring], 2, axis=0) - TINT_MARGIN
    hi = np.percentile(chroma[ring], 98, axis=0) + TINT_MARGIN
    c = chroma[spot]
    return float(((c < lo) | (c > hi)).any(1).mean())


def _plateau_shape(d: np.ndarray, edge: float, width: float) -> np.ndarray:
    """1 inside the plateau, smoothstep down to 0 across ``width`` px around ``edge``."""
    t = np.clip((edge + width / 2 - d) / width, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _fit_plateau(poly: np.ndarray, dd: np.ndarray, target: np.ndarray, q: np.ndarray,
                 r0: float, reach: float) -> tuple[float, float, float, np.ndarray] | None:
    """The best flat-topped shadow with a soft edge: (log depth, edge, width, background).

    Three numbers instead of a free profile: far less room for texture to leak in.
    Edge radius and width are searched on a grid, depth and background solved for each
    (all candidates at once: every shape is zero beyond the reach, so only the pixels
    inside it enter the cross terms, and the fit error follows from the normal
    equations without forming residuals).
    """
    combos = [(e, wd) for e in np.arange(0.4 * r0, reach, 0.5)
              for wd in (0.5, 1.0, 2.0, 0.25 * e, 0.5 * e, e)
              if wd >= 0.3 and e + wd / 2 <= reach + 1.0]
    if not combos:
        return None
    edges = np.array([c[0] for c in combos])
    widths = np.array([c[1] for c in combos])
    inside = dd < reach + 1.0
    d_in = dd[inside]
    t = np.clip((edges[None, :] + widths[None, :] / 2 - d_in[:, None]) / widths[None, :], 0.0, 1.0)
    shapes = t * t * (3 - 2 * t)                                  # n_in × combos
    q_in = q[inside]
    sq = shapes * q_in[:, None]
    pq = poly * q[:, None]
    m = poly.shape[1]
    gram = np.zeros((len(combos), m + 1, m + 1))
    gram[:, :m, :m] = np.einsum("ni,nj->ij", pq, poly)
    cross = np.einsum("nc,ni->ci", sq, poly[inside])
    gram[:, m, :m] = gram[:, :m, m] = cross
    gram[:, m, m] = np.einsum("nc,nc->c", sq, shapes) + 1e-9
    gram += 1e-9 * np.eye(m + 1)
    rhs = np.zeros((len(combos), m + 1))
    rhs[:, :m] = np.einsum("ni,n->i", pq, target)
    rhs[:, m] = np.einsum("nc,n->c", sq, target[inside])
    sol = np.linalg.solve(gram, rhs[..., None])[..., 0]
    explained = np.einsum("ci,ci->c", sol, rhs)  # SSR = tᵀQt − explained
    k = int(np.argmax(explained))
    return float(sol[k, m]), float(edges[k]), float(widths[k]), sol[k, :m]


def _robust_fit(basis: np.ndarray, obs: np.ndarray, base_w: np.ndarray,
                ridge: np.ndarray) -> np.ndarray:
    """Huber-weighted ridge least squares (a handful of unknowns)."""
    w = base_w.copy()
    for it in range(4):
        bq = basis * (w * w)[:, None]
        gram = np.einsum("ni,nj->ij", bq, basis) + np.diag(ridge + 1e-9)
        coef = np.linalg.solve(gram, np.einsum("ni,n->i", bq, obs))
        if it < 3:
            r = np.abs(obs - basis @ coef)
            s = 1.4826 * float(np.median(r)) + 1e-4
            w = base_w * np.minimum(1.0, 1.5 * s / np.maximum(r, 1e-12))
    return coef


def _solve_weighted(poly: np.ndarray, i0: np.ndarray, i1: np.ndarray, a0: np.ndarray,
                    a1: np.ndarray, n_nodes: int, q: np.ndarray, obs: np.ndarray,
                    prior_gram: np.ndarray) -> np.ndarray:
    """Weighted least squares for [polynomial | tent profile] coefficients.

    The normal equations are built with bincount, not a dense design matrix: each
    pixel touches only two profile nodes, and large matrix products would spin up
    BLAS threads that fight the rest of the machine for two cores.
    """
    npoly = poly.shape[1]
    m = n_nodes + 1  # one spare slot for the pinned node, dropped below

    def bins(weights: np.ndarray) -> np.ndarray:
        return (np.bincount(i0, weights * a0, m) + np.bincount(i1, weights * a1, m))[:n_nodes]

    pq = poly * q[:, None]
    gram = np.zeros((npoly + n_nodes, npoly + n_nodes))
    gram[:npoly, :npoly] = np.einsum("ni,nj->ij", pq, poly)
    for j in range(npoly):
        gram[j, npoly:] = gram[npoly:, j] = bins(pq[:, j])
    diag = (np.bincount(i0, q * a0 * a0, m) + np.bincount(i1, q * a1 * a1, m))[:n_nodes]
    off = np.bincount(i0, q * a0 * a1, m)[:n_nodes - 1]
    t = np.arange(n_nodes)
    gram[npoly + t, npoly + t] = diag
    gram[npoly + t[:-1], npoly + t[1:]] = off
    gram[npoly + t[1:], npoly + t[:-1]] = off
    gram += prior_gram + 1e-9 * np.eye(len(gram))
    rhs = np.concatenate([np.einsum("ni,n->i", pq, obs), bins(q * obs)])
    return np.linalg.solve(gram, rhs)


def _ramp(x: float, lo: float, hi: float) -> float:
    """0 at ``lo``, 1 at ``hi`` (either order), linear between."""
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


@dataclass
class ShadowVerdict:
    fixed: np.ndarray | None  # the window with the shadow divided out (None: ruled out)
    confidence: float         # 1: surely a shadow, 0: surely opaque
    reason: str               # the weakest piece of evidence, for logs and tests
    attenuation: np.ndarray | None = None  # the fit's, when there was one


def shadow_repair(win: np.ndarray, all_mask: np.ndarray, region: np.ndarray,
                  hint: np.ndarray | None = None) -> tuple[np.ndarray | None, float]:
    """The shadow-corrected pixels of ``region`` and how sure we are it is a shadow.

    With an attenuation hint the hint is trusted. Otherwise the caller blends this
    repair with the opaque one by the confidence: where the evidence is mixed, half of
    each costs less than the wrong one.
    """
    if hint is not None:
        a = np.clip(hint[region], 0.0, 0.95)[:, None]
        return (win[region] / (1.0 - a)).astype(np.float32), 1.0
    v = shadow_verdict(win, all_mask, region)
    if v.fixed is None or v.confidence <= 0:
        return None, 0.0
    return v.fixed[region].astype(np.float32), v.confidence


def shadow_verdict(win: np.ndarray, all_mask: np.ndarray, region: np.ndarray) -> ShadowVerdict:
    """Is ``region`` a semi-transparent shadow? Corrected window, confidence, reason.

    A spot counts as semi-transparent when it is a compact blob, its darkening is
    modest, neutral in colour and explained by a smooth radial shadow, and the texture
    seen through it, once the shadow is divided out, is about as strong as around it.
    Most opaque specks are ruled out from the raw pixels before any fit (see
    ``raw_verdict``).
    """
    ys, xs = np.nonzero(region)
    if len(ys) < 3 or max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 > MAX_SIZE:
        return ShadowVerdict(None, 0.0, "size")
    if elongation(region) < MIN_ROUNDNESS:
        return ShadowVerdict(None, 0.0, "elongated")
    if solidity(region) < MIN_SOLIDITY:
        return ShadowVerdict(None, 0.0, "not solid")
    geo = spot_geometry(all_mask, region)
    if geo is None:
        return ShadowVerdict(None, 0.0, "no context")
    reason = raw_verdict(win, all_mask, region, geo)
    if reason:
        return ShadowVerdict(None, 0.0, reason)
    verdict = _judge(win, region, fit_radial_shadow(win, all_mask, region, geo=geo))
    if verdict.confidence < 1 and region.sum() >= DIFFUSE_MIN_AREA:
        # an edge under a large spot fools the quadratic background: try diffusion
        second = _judge(win, region, fit_radial_shadow(win, all_mask, region, diffuse=True, geo=geo))
        if second.confidence > verdict.confidence:
            verdict = second
    neutral = geo.tint is None or geo.tint <= SEE_THROUGH_MAX_TINT
    if neutral and see_through(win, all_mask, region):
        # the picture shows through as busy as around it: no opaque speck, whatever the
        # fits say, and painting over it would lose far more than a faint shadow left.
        # The fits cannot be trusted on such a picture either (they measured two to
        # three times the true shadow), so at most SEE_THROUGH_CAP of the light is
        # given back
        att = np.zeros(region.shape, np.float32)
        if verdict.attenuation is not None:
            att = np.clip(verdict.attenuation, 0.0, SEE_THROUGH_CAP)
        return ShadowVerdict(win / (1.0 - att)[..., None], 1.0, "see-through", att)
    return verdict


def raw_verdict(win: np.ndarray, all_mask: np.ndarray, region: np.ndarray,
                geo: SpotGeometry) -> str | None:
    """Why ``region`` cannot be a shadow, judged from its raw pixels; None if it may be.

    Cheap, and run before the fits, which most opaque specks would only fail later:

    * tinted: the share of the spot's colours not found in the ring is the fit's own
      ``tint`` (the same pixels, the same numbers), and beyond ``1.5 × MAX_TINT`` the
      verdict is 0 whatever the fit;
    * brighter: a shadow only takes light, so the spot's median cannot exceed the bright
      end (``NEAR_PERCENTILE``) of the pixels just around it. The fit's colour rule can
      miss this: a white speck on blue sky next to white clouds looks like a cloud;
    * too dark: the spot's median below ``DARK_RATIO`` of the bright end of its
      surroundings is far darker than ``MAX_ATTENUATION`` allows.
    """
    lum = np.maximum(win, 0.0).mean(2)
    near = (geo.d >= geo.r0) & (geo.d < geo.reach + 3) & ~all_mask
    if int(near.sum()) >= 8:
        spot = float(np.median(lum[region]))
        bright = float(np.percentile(lum[near], NEAR_PERCENTILE))
        if spot > bright:
            return "brighter"
        if spot < DARK_RATIO * bright:
            return "too dark"
    if win.shape[2] == 3:
        pix = np.maximum(win[geo.use].astype(np.float64), 0.0)
        chroma = _chroma(pix, pix.mean(1))
        geo.tint = _foreign_colour(chroma, region[geo.use], geo.d[geo.use] >= geo.reach)
        if geo.tint >= 1.5 * MAX_TINT:
            return "tinted"
    return None


def _judge(win: np.ndarray, region: np.ndarray, fit: ShadowFit | None) -> ShadowVerdict:
    """Weigh the evidence that ``fit`` describes a real shadow."""
    if fit is None:
        return ShadowVerdict(None, 0.0, "no context")
    darkest = max(float(np.percentile(fit.attenuation[region], 90)), fit.mean)
    if darkest > MAX_ATTENUATION:
        return ShadowVerdict(None, 0.0, "too dark")
    if fit.mean <= 0:
        return ShadowVerdict(None, 0.0, "brighter")
    evidence = {
        "faint": _ramp(fit.mean, 0.5 * MIN_ATTENUATION, 1.5 * MIN_ATTENUATION),
        "tinted": _ramp(fit.tint, 1.5 * MAX_TINT, 0.5 * MAX_TINT),
        # not a radial shadow: a speck of some other shape
        "unexplained": _ramp(fit.resid_in / (2.0 * fit.resid_out + 0.02), 1.2, 0.8),
    }
    fixed = None
    if min(evidence.values()) > 0:  # else ruled out already: the texture need not be measured
        fixed = win / (1.0 - fit.attenuation)[..., None]
        # once divided out, a shadow leaves the picture as busy as around it; a speck
        # leaves a flat patch (ratio near 0) or its own sharp outline (ratio well above 1)
        texture = texture_ratio(win, fixed, region)
        lo_tex, hi_tex = TEXTURE_RANGE
        evidence["no texture"] = _ramp(texture, 0.85 * lo_tex, 1.3 * lo_tex)
        evidence["outline"] = _ramp(texture, 1.25 * hi_tex, hi_tex)
    reason = min(evidence, key=evidence.get)
    confidence = evidence[reason]
    return ShadowVerdict(fixed if confidence > 0 else None, confidence,
                         "shadow" if confidence >= 1 else reason, fit.attenuation)


def solidity(region: np.ndarray) -> float:
    """Area over convex-hull area (pixel-corrected): 1 for a blob, low for a ring or a C."""
    cnts, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.concatenate(cnts))
    area = cv2.contourArea(hull) + cv2.arcLength(hull, True) / 2 + 1
    return float(region.sum() / area)


def see_through(win: np.ndarray, all_mask: np.ndarray, region: np.ndarray) -> bool:
    """Does the raw picture inside ``region`` carry the texture of the busy ring around it?

    An opaque speck hides what lies under it: inside it only its own flat tone shows. A
    shadow keeps the picture. Judged only where the ring is busy (well above grain), so
    a flat speck with noise on top on a smooth sky never passes, and only for spots that
    keep most of their light and hold no pixel far darker or brighter than around them.
    """
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15))
    ring = cv2.dilate(region.astype(np.uint8), k).astype(bool) & ~all_mask
    k7 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    inner = cv2.erode(region.astype(np.uint8), k7).astype(bool)
    if ring.sum() < 16 or inner.sum() < 16:
        return False
    lum = np.maximum(win, 0.0).mean(2)
    # faint: a speck that hides much of the light is no shadow whatever its texture
    # (a dirt stamp has a texture of its own)
    ratio = float(np.median(lum[inner])) / max(float(np.median(lum[ring])), 1e-6)
    if not SEE_THROUGH_LEVELS[0] <= ratio <= SEE_THROUGH_LEVELS[1]:
        return False
    # and no part of the spot far darker or brighter than anything around
    lo_spot, hi_spot = np.percentile(lum[region], [2, 98])
    lo_ring, hi_ring = np.percentile(lum[ring], [2, 98])
    if lo_spot < SEE_THROUGH_EXTREMES[0] * lo_ring or hi_spot > SEE_THROUGH_EXTREMES[1] * hi_ring:
        return False
    # busy, in a band above the grain: film grain and sensor noise on a speck are finer
    band = (cv2.GaussianBlur(lum, (0, 0), SEE_THROUGH_BAND[0], borderType=cv2.BORDER_REPLICATE)
            - cv2.GaussianBlur(lum, (0, 0), SEE_THROUGH_BAND[1], borderType=cv2.BORDER_REPLICATE))
    ring_std = float(band[ring].std())
    if ring_std < SEE_THROUGH_BUSY:
        return False
    return float(band[inner].std()) >= SEE_THROUGH_RATIO * ring_std


def texture_ratio(win: np.ndarray, fixed: np.ndarray, region: np.ndarray) -> float:
    """High-pass RMS inside the corrected spot over that in a ring around it.

    About 1 when the picture shows through, near 0 for an opaque speck; 1 when the ring
    is too smooth to tell (flat sky, smooth gradient).
    """
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15))
    ring = cv2.dilate(region.astype(np.uint8), k).astype(bool) & ~region
    if ring.sum() < 16:
        return 1.0
    ring_std = float(high_pass(win)[ring].std())
    if ring_std < TEXTURE_FLOOR:
        return 1.0
    inner = cv2.erode(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    if inner.sum() < 4:
        inner = region
    return float(high_pass(fixed)[inner].std()) / ring_std
