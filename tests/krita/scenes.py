"""Synthetic test documents: a smooth textured background with dark dust specks of known shape."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class Scene:
    clean: np.ndarray        # float32 HxWx3 in [0, 1]
    dusty: np.ndarray        # float32 HxWx3 in [0, 1]
    mask: np.ndarray         # bool HxW: pixels the specks touch
    specks: list             # (x, y, r) in pixels, centres at pixel coordinates


def make_scene(seed: int = 7, size: int = 256, count: int = 10) -> Scene:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    clean = np.empty((size, size, 3), np.float32)
    for c, phase in enumerate((0.0, 0.7, 1.9)):
        clean[..., c] = (0.55 + 0.18 * np.sin(2 * math.pi * (1.1 * xx + 0.3 * yy) + phase)
                         + 0.12 * np.cos(2 * math.pi * (0.8 * yy - 0.2 * xx) + phase))
    texture = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 2.0)
    clean = np.clip(clean + 0.06 * texture[..., None], 0.08, 0.95).astype(np.float32)

    alpha = np.zeros((size, size), np.float32)
    specks: list[tuple[float, float, float]] = []
    margin = 16
    while len(specks) < count:
        x, y = rng.uniform(margin, size - margin, 2)
        r = float(rng.uniform(2.0, 4.0))
        if any(math.hypot(x - a, y - b) < 30 for a, b, _ in specks):
            continue
        specks.append((float(x), float(y), r))
        d = np.sqrt((np.arange(size)[None, :] + 0.5 - x) ** 2 + (np.arange(size)[:, None] + 0.5 - y) ** 2)
        alpha = np.maximum(alpha, np.clip(r + 0.5 - d, 0, 1))
    tone = np.float32(0.04)
    dusty = clean * (1 - alpha[..., None]) + tone * alpha[..., None]
    return Scene(clean, dusty.astype(np.float32), alpha > 0.02, specks)


def to_bgra(img: np.ndarray, dtype: str) -> np.ndarray:
    """float RGB [0, 1] → BGRA (integer types, Krita's order for U8/U16) or RGBA (floats)."""
    h, w = img.shape[:2]
    if dtype in ("u8", "u16"):
        scale = 255 if dtype == "u8" else 65535
        out = np.empty((h, w, 4), np.uint8 if dtype == "u8" else np.uint16)
        out[..., :3] = np.round(img[..., ::-1] * scale)
        out[..., 3] = scale
        return out
    out = np.empty((h, w, 4), np.float16 if dtype == "f16" else np.float32)
    out[..., :3] = img
    out[..., 3] = 1.0
    return out


def write_png(path, img: np.ndarray, bits: int) -> None:
    """An RGBA PNG (8 or 16 bit) of a float RGB image."""
    bgra = to_bgra(img, "u8" if bits == 8 else "u16")
    if not cv2.imwrite(str(path), bgra):
        raise OSError(f"could not write {path}")
