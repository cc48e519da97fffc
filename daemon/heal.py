"""Healing: repair the dust mask so the spot vanishes into the photo's own texture.

Each connected spot of the mask is repaired on its own, in a padded window around it
(only that window is converted to float, and the spots are found tile by tile, so memory
stays bounded at any image size), with one of two repairs:

* semi-transparent spots (sensor dust, faint stains) keep the picture underneath; their
  shadow is estimated from the surroundings and divided out (``heal_flat``);
* opaque specks, hairs and scratches are filled with texture from the best matching
  nearby patches, grain included, blended into the rim like a healing brush; what still
  shows through a partly transparent speck is unmixed (``heal_fill``).

The shadow fit returns a confidence; where the evidence is mixed both repairs are made and
blended by it, which costs far less than committing to the wrong one. Spots that touch
the mask's dilated rim are filled from beyond it (a speck's soft edge tints its rim).

Pixels outside the mask are never written. Context is always read from the input image
with every masked pixel treated as unknown, so the result does not depend on the order
the spots are visited in, and spots are repaired on several threads at once (OpenCV and
NumPy release the GIL for most of the work: 1.3–1.6× on two cores, the same pixels).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import cv2
import numpy as np

from .components import MaskComponents, Piece
from .heal_fill import CONTEXT, search_radius, texture_layers, unmix_speck
from .heal_flat import shadow_repair
from .imageio import from_float, to_float

ProgressFn = Callable[[float], None]

# Pixels next to a spot are usually tinted by its soft edge: fill from beyond them.
RIM = 1
# Spots larger than this (bounding box side, px) are repaired in pieces of this size.
CHUNK = 160
# At most this many threads repair spots (one per CPU the process may use, up to this).
MAX_WORKERS = 8
# Pieces queued per thread, so that one slow piece does not leave the others idle. A
# queued piece holds only its box of the mask; its float window exists while it runs.
QUEUED_PER_WORKER = 8


def default_workers() -> int:
    """Threads for healing: the CPUs this process may run on, at most ``MAX_WORKERS``."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, n))


def _validate(image: np.ndarray, mask: np.ndarray, hint: np.ndarray | None) -> np.ndarray:
    if not isinstance(image, np.ndarray) or not isinstance(mask, np.ndarray):
        raise ValueError("heal_image wants numpy arrays for image and mask")
    if image.dtype != np.float32:
        raise ValueError(f"heal_image wants a float32 image, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"heal_image wants an HxWxC image with C = 1 or 3, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"heal_image got an empty image of shape {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(f"mask must be bool (or 0/1 integers), got {mask.dtype}")
        mask = mask != 0
    if hint is not None and (not isinstance(hint, np.ndarray) or hint.shape != image.shape[:2]
                             or not np.issubdtype(hint.dtype, np.floating)):
        raise ValueError("attenuation_hint must be a float HxW array matching the image")
    return mask


def heal_image(image: np.ndarray, mask: np.ndarray, progress: ProgressFn | None = None,
               check_cancel: Callable[[], None] | None = None,
               attenuation_hint: np.ndarray | None = None) -> np.ndarray:
    """Heal ``image`` where ``mask`` is set.

    image: float32 HxWxC (C = 1 or 3 colour channels, no alpha), values about [0, 1].
    mask: bool HxW, True on dust. Returns a new float32 array of the same shape; pixels
    outside the mask are returned unchanged, bit for bit. ``progress(fraction)`` is
    called now and then; ``check_cancel()`` before every spot (it raises to cancel).
    ``attenuation_hint``, if given, is an HxW map of the fraction of light each pixel
    lost (e.g. from a flat-field frame); spots it covers are divided out with it.
    """
    mask = _validate(image, mask, attenuation_hint)
    out = image.copy()
    heal_into(image, mask, out, progress=progress, check_cancel=check_cancel,
              attenuation_hint=attenuation_hint)
    return out


def heal_into(image: np.ndarray, mask: np.ndarray, out: np.ndarray, channels: list[int] | None = None,
              components: MaskComponents | None = None, progress: ProgressFn | None = None,
              check_cancel: Callable[[], None] | None = None,
              attenuation_hint: np.ndarray | None = None, workers: int | None = None) -> None:
    """Heal ``image`` where ``mask`` is set, writing the repaired pixels into ``out``.

    image: HxWxC in any sample type (uint8, uint16, float16, float32); ``channels`` are
    the colour channels to heal (1 or 3 indices; default all), the others (alpha) are
    neither read nor written. mask: HxW, nonzero on dust. out: like ``image`` (usually a
    copy of it); only its masked colour pixels are written, in its own sample type.
    ``components`` are the mask's, when the caller has them already.
    ``workers``: threads repairing spots (default ``default_workers()``; 1 = this thread
    only). ``progress`` and ``check_cancel`` are only ever called from the calling thread.

    Memory stays bounded at any image size: each spot (or piece of a long hair) is
    converted to float in a padded window around it, only a few pieces are in flight at
    a time, and the mask's components are found tile by tile. The result does not depend
    on the order spots are visited in, nor on the number of workers.
    """
    comps = components if components is not None else MaskComponents(mask)
    workers = default_workers() if workers is None else max(1, int(workers))
    total = max(1, comps.total_area)
    done = 0
    last_report = 0.0

    def count(n: int) -> None:
        nonlocal done, last_report
        done += n
        if progress and done / total - last_report >= 0.02:
            last_report = done / total
            progress(min(1.0, last_report))

    pieces = ((piece, comps.region(piece.label, piece.box)) for piece in comps.pieces(CHUNK))
    if workers == 1:
        for piece, sub in pieces:
            if check_cancel:
                check_cancel()
            count(_heal_piece(image, out, channels, mask, piece, sub, attenuation_hint))
    else:
        pending: deque[Future[int]] = deque()
        pool = ThreadPoolExecutor(workers, thread_name_prefix="healdust-heal")
        try:
            # the component labels are looked up here, on one thread (their tile cache is
            # not shared); the workers only read the image and write their own pixels
            for piece, sub in pieces:
                if check_cancel:
                    check_cancel()
                pending.append(pool.submit(_heal_piece, image, out, channels, mask, piece, sub,
                                           attenuation_hint))
                while len(pending) >= QUEUED_PER_WORKER * workers:
                    count(pending.popleft().result())
            while pending:
                count(pending.popleft().result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    if progress:
        progress(1.0)


def _window(image: np.ndarray, channels: list[int] | None, wy0: int, wy1: int, wx0: int,
            wx1: int) -> np.ndarray:
    """The colour channels of a window of ``image`` as contiguous float32, 1.0 = full scale."""
    sub = image[wy0:wy1, wx0:wx1]
    if channels is not None and len(channels) != sub.shape[2]:
        sub = sub[:, :, channels]
    return np.ascontiguousarray(to_float(sub))


def _heal_piece(image: np.ndarray, out: np.ndarray, channels: list[int] | None, mask: np.ndarray,
                piece: Piece, piece_region: np.ndarray, hint: np.ndarray | None) -> int:
    """Repair the pixels of one piece of a component; returns how many were repaired.

    ``piece_region``: the component's pixels inside ``piece.box`` (bool, box-sized)."""
    H, W = mask.shape
    y0, y1, x0, x1 = piece.box
    whole = piece.whole
    pad = search_radius(y1 - y0 + 2 * RIM, x1 - x0 + 2 * RIM) + CONTEXT + RIM + 2
    if whole:  # room for the soft tail of a shadow and a ring of unshadowed pixels
        r = max(y1 - y0, x1 - x0) // 2 + 1
        pad = max(pad, 2 * r + 12)
    wy0, wy1 = max(0, y0 - pad), min(H, y1 + pad)
    wx0, wx1 = max(0, x0 - pad), min(W, x1 + pad)
    # a whole component lies inside its bounding box; a piece is its part inside the box
    region = np.zeros((wy1 - wy0, wx1 - wx0), bool)
    region[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0] = piece_region
    if not region.any():
        return 0
    win = _window(image, channels, wy0, wy1, wx0, wx1)
    if not np.isfinite(win).all():
        win = np.nan_to_num(win, nan=0.0, posinf=1.0, neginf=0.0)
    all_mask = mask[wy0:wy1, wx0:wx1]
    all_mask = all_mask if all_mask.dtype == bool else all_mask != 0
    shadow, confidence = None, 0.0
    if whole:
        h = None if hint is None else hint[wy0:wy1, wx0:wx1]
        if h is not None and not (h[region] > 0).any():
            h = None
        shadow, confidence = shadow_repair(win, all_mask, region, h)
    if shadow is not None and confidence >= 1.0:
        values = shadow
    else:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * RIM + 1, 2 * RIM + 1))
        unknown = cv2.dilate(all_mask.astype(np.uint8), k).astype(bool)
        target = cv2.dilate(region.astype(np.uint8), k).astype(bool)
        # seeded by where the piece is, so the grain does not depend on the visiting order
        rng = np.random.default_rng((y0, y1, x0, x1))
        structure, grain = texture_layers(win, unknown, target, rng)
        values = unmix_speck(win[region], structure[region], grain[region])
        if shadow is not None:
            values = confidence * shadow + (1.0 - confidence) * values
    view = out[wy0:wy1, wx0:wx1]
    back = from_float(values, np.float32 if out.dtype == np.float16 else out.dtype).astype(out.dtype)
    if channels is None:
        view[region] = back
    else:
        for i, c in enumerate(channels):
            view[:, :, c][region] = back[:, i]
    return int(np.count_nonzero(region))
