"""Synthetic dust with exact ground truth, for pretraining, tests and benchmarks.

Two families:

* film damage (dust, dirt, specks, lint, hairs, scratches): opaque, sharp, composited from
  the MIT-licensed dust stamps and drawn procedurally; dark on positives/slides, bright on
  negatives scanned as negatives; scaled, rotated, blurred, with grain on top;
* sensor dust: soft, round, semi-transparent shadows that take 5–20 % of the light; sharper
  with a ring edge at small apertures, larger and fainter wide open; the same sensor
  positions across a series (``SensorDustField``).

Images are float32 HxWx3 in [0, 1]. Every function returns the damaged image, a boolean
mask of the dust pixels and, for sensor dust, the attenuation map (fraction of light
removed), all exact by construction. Beside the mask, the truth for learning and scoring:
``truth`` (the dust pixels that can be seen), ``ignore`` (dust too faint to see: neither
dust nor clean) and ``instances`` (which defect each pixel belongs to, so that a stamp
thresholded into ten fragments is still one spot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

STAMP_KINDS = ("dirt", "dots", "hair", "hair-short", "lint", "scratches", "smut", "spots",
               "sprinkles", "stain")
# Long thin kinds are scaled by length, the rest by diameter.
_LONG_KINDS = {"hair", "hair-short", "scratches", "lint"}
# Alpha above this counts as dust in the ground-truth mask.
MASK_ALPHA = 0.25
# Sensor dust: attenuation at or above this fraction of the spot's peak counts as dust.
SENSOR_MASK_FRACTION = 0.3
# Film: a dust pixel that changes the picture by less than this (of the 0-1 range, the
# largest change over the channels; about 8 of 255 levels, the grain added here reaches
# sigma 0.03) cannot be seen: a dark speck on a black shadow, a bright one on snow. It is
# neither dust nor clean in ``Damage.truth`` / ``Damage.ignore``.
VISIBLE_CHANGE = 0.03
# Sensor dust is judged per spot: a smooth shadow whose deepest point darkens the picture
# by less than this (about 4 of 255 levels) cannot be seen; the eye finds smooth, wide
# shadows at a smaller change than one-pixel specks.
SENSOR_VISIBLE_CHANGE = 0.015
# Alpha above this, outside the truth, is the faint rim or body of a film defect: ignored,
# not called clean (for sensor dust: any attenuation the mask would take, 0.01).
FAINT = 0.02
SENSOR_FAINT = 0.01


def default_stamps_dir() -> Path | None:
    """The stamps beside a development checkout (``../shared/data/dust-stamps``), if any."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "shared" / "data" / "dust-stamps"
        if cand.is_dir():
            return cand
    return None


class StampSet:
    """Alpha masks of the dust stamps, cropped to their content, grouped by kind."""

    def __init__(self, stamps: dict[str, list[np.ndarray]]):
        self.stamps = {k: v for k, v in stamps.items() if v}
        if not self.stamps:
            raise ValueError("no dust stamps found")
        self.kinds = sorted(self.stamps)

    @classmethod
    def load(cls, root: str | Path, max_per_kind: int | None = None) -> StampSet:
        root = Path(root)
        stamps: dict[str, list[np.ndarray]] = {}
        for kind in STAMP_KINDS:
            files = sorted((root / kind).glob("*.png"))[:max_per_kind]
            out = []
            for f in files:
                im = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
                if im is None or im.ndim != 3 or im.shape[2] != 4:
                    continue
                a = im[:, :, 3].astype(np.float32) / 255.0
                ys, xs = np.nonzero(a > 0.05)
                if len(ys) == 0:
                    continue
                out.append(np.ascontiguousarray(a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]))
            stamps[kind] = out
        return cls(stamps)

    def pick(self, rng: np.random.Generator, kind: str | None = None) -> tuple[str, np.ndarray]:
        kind = kind or self.kinds[rng.integers(len(self.kinds))]
        lst = self.stamps[kind]
        return kind, lst[rng.integers(len(lst))]


# --------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------

def _sample_size(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Log-uniform: most defects are small, a few are large."""
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _transform_stamp(alpha: np.ndarray, size: float, rng: np.random.Generator,
                     long_kind: bool) -> np.ndarray:
    """Scale the stamp so its longer side is ``size`` px, rotate, blur slightly."""
    h, w = alpha.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    a = cv2.resize(alpha, (nw, nh), interpolation=cv2.INTER_AREA)
    if long_kind and scale < 0.25:
        # thin hairs vanish when shrunk by area: thicken them back to 1–2 px
        a = np.clip(a / max(a.max(), 1e-3), 0, 1)
    pad = int(math.ceil(0.5 * math.hypot(nh, nw))) + 2
    a = cv2.copyMakeBorder(a, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    ch, cw = a.shape
    m = cv2.getRotationMatrix2D((cw / 2, ch / 2), float(rng.uniform(0, 360)), 1.0)
    a = cv2.warpAffine(a, m, (cw, ch), flags=cv2.INTER_LINEAR)
    if rng.random() < 0.3:
        a = cv2.GaussianBlur(a, (0, 0), float(rng.uniform(0.3, 0.8)))
    ys, xs = np.nonzero(a > 0.02)
    if len(ys) == 0:
        return np.zeros((1, 1), np.float32)
    return a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _speck(rng: np.random.Generator) -> np.ndarray:
    """A small irregular blob, 1–8 px across."""
    d = _sample_size(rng, 1.2, 8.0)
    n = int(math.ceil(d)) + 4
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) - (n - 1) / 2
    ang = rng.uniform(0, math.pi)
    ecc = rng.uniform(1.0, 2.0)
    xr = xx * math.cos(ang) + yy * math.sin(ang)
    yr = -xx * math.sin(ang) + yy * math.cos(ang)
    r = np.sqrt((xr * ecc) ** 2 + yr ** 2)
    a = np.clip((d / 2 + 0.5 - r), 0, 1).astype(np.float32)
    return a


def _curve(rng: np.random.Generator, length: float, width: float, curvy: float) -> np.ndarray:
    """A hair or scratch: a random smooth curve of the given length, antialiased."""
    n = max(8, int(length))
    ang0 = rng.uniform(0, 2 * math.pi)
    dang = np.cumsum(rng.normal(0, curvy, n))
    ang = ang0 + dang * (1.0 / max(1, n)) * 10
    step = length / n
    x = np.cumsum(np.cos(ang) * step)
    y = np.cumsum(np.sin(ang) * step)
    pad = int(width) + 3
    x = x - x.min() + pad
    y = y - y.min() + pad
    hh = int(y.max()) + pad + 1
    ww = int(x.max()) + pad + 1
    ss = 4  # supersample for antialiasing
    canvas = np.zeros((hh * ss, ww * ss), np.uint8)
    pts = np.stack([x * ss, y * ss], 1).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [pts], False, 255, thickness=max(1, int(round(width * ss))),
                  lineType=cv2.LINE_AA)
    a = cv2.resize(canvas, (ww, hh), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    return np.clip(a * 1.3, 0, 1)


def film_defect_alpha(rng: np.random.Generator, stamps: StampSet | None) -> np.ndarray:
    """One film defect as an alpha map: mostly small specks, some hairs and scratches."""
    u = rng.random()
    if u < 0.35 or stamps is None and u < 0.6:
        return _speck(rng)
    if stamps is None or u < 0.5:
        if rng.random() < 0.6:  # hair
            return _curve(rng, _sample_size(rng, 12, 120), rng.uniform(0.8, 2.0), 3.0)
        return _curve(rng, _sample_size(rng, 30, 250), rng.uniform(0.7, 1.5), 0.6)  # scratch
    kind, alpha = stamps.pick(rng)
    long_kind = kind in _LONG_KINDS
    size = _sample_size(rng, 10, 100) if long_kind else _sample_size(rng, 3, 40)
    return _transform_stamp(alpha, size, rng, long_kind)


def _paste(canvas: np.ndarray, a: np.ndarray, y: int, x: int, ids: np.ndarray | None = None,
           ident: int = 0) -> None:
    """Max-combine ``a`` into ``canvas`` with its top-left at (y, x), clipped; where ``a``
    wins, ``ids`` takes ``ident`` (each pixel belongs to the defect that covers it most)."""
    h, w = a.shape
    H, W = canvas.shape
    y0, x0 = max(0, y), max(0, x)
    y1, x1 = min(H, y + h), min(W, x + w)
    if y1 <= y0 or x1 <= x0:
        return
    sub = a[y0 - y:y1 - y, x0 - x:x1 - x]
    if ids is not None:
        ids[y0:y1, x0:x1][sub > canvas[y0:y1, x0:x1]] = ident
    np.maximum(canvas[y0:y1, x0:x1], sub, out=canvas[y0:y1, x0:x1])


def add_grain(img: np.ndarray, rng: np.random.Generator, sigma: float | None = None) -> np.ndarray:
    sigma = float(rng.uniform(0.0, 0.03)) if sigma is None else sigma
    if sigma <= 0:
        return img
    h, w = img.shape[:2]
    noise = rng.standard_normal((h, w, 1 if rng.random() < 0.6 else img.shape[2]),
                                dtype=np.float32)
    if rng.random() < 0.5:
        noise = cv2.GaussianBlur(noise, (0, 0), 0.6).reshape(h, w, -1) * 1.6
    return np.clip(img + sigma * noise, 0, 1)


@dataclass
class Damage:
    image: np.ndarray          # float32 HxWx3 in [0, 1]
    mask: np.ndarray           # bool HxW: every dust pixel, seen or not (what healing covers)
    attenuation: np.ndarray | None = None  # float32 HxW, fraction of light removed
    truth: np.ndarray | None = None      # bool HxW: the dust pixels that can be seen
    ignore: np.ndarray | None = None     # bool HxW: dust too faint to see, and faint rims
    instances: np.ndarray | None = None  # int32 HxW: the defect (1, 2, ...) of each dust pixel, 0 clean


def add_film_damage(img: np.ndarray, rng: np.random.Generator, stamps: StampSet | None,
                    count: int | None = None, polarity: str | None = None,
                    grain: float | None = None) -> Damage:
    """Composite opaque film defects. polarity: 'dark' (positive) or 'bright' (negative)."""
    h, w = img.shape[:2]
    if count is None:
        count = int(rng.integers(1, max(2, h * w // 2500)))
    polarity = polarity or ("dark" if rng.random() < 0.5 else "bright")
    alpha = np.zeros((h, w), np.float32)
    ids = np.zeros((h, w), np.int32)
    for k in range(count):
        a = film_defect_alpha(rng, stamps)
        a = a * float(rng.uniform(0.75, 1.0))
        _paste(alpha, a, int(rng.integers(-a.shape[0] // 2, h)), int(rng.integers(-a.shape[1] // 2, w)),
               ids, k + 1)
    if polarity == "dark":
        tone = rng.uniform(0.0, 0.12, 3).astype(np.float32) + np.float32(rng.uniform(0, 0.05))
    else:
        tone = rng.uniform(0.88, 1.0, 3).astype(np.float32)
    out = img * (1 - alpha[..., None]) + tone * alpha[..., None]
    change = np.abs(out - img).max(axis=2)
    mask = alpha > MASK_ALPHA
    truth = mask & (change >= VISIBLE_CHANGE)
    out = add_grain(out.astype(np.float32), rng, grain)
    return Damage(out.astype(np.float32), mask, truth=truth, ignore=(alpha > FAINT) & ~truth,
                  instances=np.where(alpha > FAINT, ids, 0))


@dataclass(frozen=True)
class SensorSpot:
    y: float         # position as a fraction of height
    x: float         # position as a fraction of width
    radius: float    # px at f/8-ish
    strength: float  # peak fraction of light removed (0.05–0.20)


class SensorDustField:
    """Dust on one sensor: the same spots in every frame, shaped by the aperture."""

    def __init__(self, spots: list[SensorSpot]):
        self.spots = spots

    @classmethod
    def random(cls, rng: np.random.Generator, count: int) -> SensorDustField:
        spots = [SensorSpot(float(rng.random()), float(rng.random()),
                            _sample_size(rng, 3.0, 20.0), float(rng.uniform(0.05, 0.20)))
                 for _ in range(count)]
        return cls(spots)

    def attenuation(self, h: int, w: int, f_number: float = 8.0) -> np.ndarray:
        """Fraction of light removed at each pixel for a frame shot at ``f_number``."""
        return self._render(h, w, f_number)[0]

    def _render(self, h: int, w: int, f_number: float) -> tuple[np.ndarray, np.ndarray]:
        """The attenuation and, per pixel, the spot (1, 2, ...) that darkens it most."""
        # wide open (f/2.8): large, faint, soft; stopped down (f/22): small, sharp, ringed
        t = float(np.clip((math.log(f_number) - math.log(2.8)) / (math.log(22) - math.log(2.8)), 0, 1))
        size_k = 1.6 - 0.9 * t
        fade_k = 0.55 + 0.45 * t
        att = np.zeros((h, w), np.float32)
        ids = np.zeros((h, w), np.int32)
        for k, s in enumerate(self.spots):
            r = max(1.5, s.radius * size_k)
            cy, cx = s.y * h, s.x * w
            n = int(math.ceil(r * 1.6)) + 2
            y0, y1 = max(0, int(cy) - n), min(h, int(cy) + n + 1)
            x0, x1 = max(0, int(cx) - n), min(w, int(cx) + n + 1)
            if y1 <= y0 or x1 <= x0:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r
            edge = 0.08 + 0.4 * (1 - t)  # softness of the edge, in radii
            prof = np.clip((1 - d) / edge + 0.5, 0, 1)
            prof = prof * prof * (3 - 2 * prof)  # smoothstep
            if t > 0.5:  # diffraction ring at small apertures
                prof = prof * (1 + 0.35 * (t - 0.5) * np.exp(-((d - 0.85) / 0.1) ** 2))
            a = (s.strength * fade_k * prof).astype(np.float32)
            ids[y0:y1, x0:x1][a > att[y0:y1, x0:x1]] = k + 1
            np.maximum(att[y0:y1, x0:x1], a, out=att[y0:y1, x0:x1])
        return att, ids  # 0 where no spot reaches

    def apply(self, img: np.ndarray, f_number: float = 8.0) -> Damage:
        h, w = img.shape[:2]
        att, ids = self._render(h, w, f_number)
        out = img * (1 - att[..., None])
        peak = _local_peak(att)  # per-spot threshold relative to its own peak
        mask = (att >= SENSOR_MASK_FRACTION * peak) & (att > SENSOR_FAINT)
        # a spot is seen when its deepest point darkens the picture enough
        deepest = np.zeros(len(self.spots) + 1, np.float32)
        on = ids > 0
        np.maximum.at(deepest, ids[on], att[on] * img.max(axis=2)[on])
        seen = deepest >= SENSOR_VISIBLE_CHANGE
        seen[0] = False
        truth = mask & seen[ids]
        return Damage(out.astype(np.float32), mask, att, truth=truth, ignore=(att > SENSOR_FAINT) & ~truth,
                      instances=np.where(att > SENSOR_FAINT, ids, 0))


def _local_peak(att: np.ndarray) -> np.ndarray:
    """The peak attenuation of the spot each pixel belongs to (dilated maximum)."""
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (41, 41))
    return cv2.dilate(att, k)


def add_sensor_dust(img: np.ndarray, rng: np.random.Generator, count: int | None = None,
                    f_number: float | None = None, field: SensorDustField | None = None,
                    grain: float | None = None) -> Damage:
    h, w = img.shape[:2]
    if field is None:
        count = int(rng.integers(1, max(2, h * w // 4000))) if count is None else count
        field = SensorDustField.random(rng, count)
    f_number = f_number if f_number is not None else float(math.exp(rng.uniform(math.log(2.8), math.log(22))))
    dmg = field.apply(img, f_number)
    dmg.image = add_grain(dmg.image, rng, float(rng.uniform(0, 0.01)) if grain is None else grain)
    return dmg


# --------------------------------------------------------------------------------------
# photos
# --------------------------------------------------------------------------------------

PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def list_photos(root: str | Path) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in PHOTO_EXTS and p.is_file())


def load_photo(path: str | Path, max_side: int = 2048) -> np.ndarray:
    """A clean photo as uint8 HxWx3 RGB, downscaled so its longer side ≤ max_side."""
    im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if im is None:
        raise ValueError(f"cannot read photo {path}")
    h, w = im.shape[:2]
    s = max_side / max(h, w)
    if s < 1:
        im = cv2.resize(im, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(im, cv2.COLOR_BGR2RGB)


def random_crop(photo: np.ndarray, size: int, rng: np.random.Generator,
                scale_range: tuple[float, float] = (0.35, 1.0), soft: float = 0.0) -> np.ndarray:
    """A size×size float crop at a random scale, flipped/rotated, exposure jittered.

    ``soft``: the probability of a soft picture instead — a smaller region scaled up 1.5–3×
    (a low-resolution scan, an upscaled photo) or defocused — where the pretrained model
    must learn that soft dark blobs are picture, not sensor dust. With ``soft`` 0 no
    extra random numbers are drawn: crops stay exactly as before it existed.
    """
    if soft > 0 and rng.random() < soft:
        up = float(rng.uniform(1.5, 3.0))
        small = max(8, int(round(size / up)))
        crop = random_crop(photo, small, rng, scale_range)
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_CUBIC)
        if rng.random() < 0.5:
            crop = cv2.GaussianBlur(crop, (0, 0), float(rng.uniform(0.5, 2.0)))
        return np.clip(crop, 0, 1)
    h, w = photo.shape[:2]
    s = float(rng.uniform(*scale_range))
    src = int(min(h, w, max(size, round(size / s))))
    y = int(rng.integers(0, h - src + 1))
    x = int(rng.integers(0, w - src + 1))
    crop = photo[y:y + src, x:x + src]
    if src != size:
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    crop = np.rot90(crop, int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    out = crop.astype(np.float32) / 255.0
    gain = float(np.exp(rng.normal(0, 0.25)))
    gamma = float(np.exp(rng.normal(0, 0.2)))
    return np.clip(out * gain, 0, 1) ** gamma


def make_training_pair(photo: np.ndarray, size: int, rng: np.random.Generator,
                       stamps: StampSet | None, soft: float = 0.0) -> tuple[np.ndarray, Damage]:
    """One (image, damage) pair: a crop with film damage, sensor dust, or nothing added."""
    crop = np.ascontiguousarray(random_crop(photo, size, rng, soft=soft))
    u = rng.random()
    n = size * size
    if u < 0.55:
        dmg = add_film_damage(crop, rng, stamps, count=int(rng.integers(1, max(2, n // 1500))))
    elif u < 0.9:
        dmg = add_sensor_dust(crop, rng, count=int(rng.integers(1, max(2, n // 5000))))
    else:
        none = np.zeros((size, size), bool)
        return add_grain(crop, rng), Damage(crop, none, truth=none, ignore=none,
                                            instances=np.zeros((size, size), np.int32))
    return dmg.image, dmg
