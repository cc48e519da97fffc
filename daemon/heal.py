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
the spots are visited in, and spots are repaired several at once: on worker processes
(``healdust.workers``; 1.6-1.75× one process on two cores) or, where those cannot be
started, on threads (1.25-1.3×: repairing a spot is many small NumPy and OpenCV calls
with Python between them, and threads share one interpreter). The same pixels either way.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from .components import MaskComponents, Piece
from .heal_fill import CONTEXT, search_radius, texture_layers, unmix_speck
from .heal_flat import shadow_repair
from .imageio import from_float, to_float
from .workers import WorkerPool

ProgressFn = Callable[[float], None]
log = logging.getLogger("healdust.heal")

# Pixels next to a spot are usually tinted by its soft edge: fill from beyond them.
RIM = 1
# Spots larger than this (bounding box side, px) are repaired in pieces of this size.
CHUNK = 160
# At most this many threads repair spots (one per CPU the process may use, up to this).
MAX_WORKERS = 8
# Pieces queued per thread, so that one slow piece does not leave the others idle. A
# queued piece holds its window in the image's own sample type (a view where it can) and
# its region; its float window exists while it runs.
QUEUED_PER_WORKER = 8
# ...and per worker process. One: a piece queued behind a slow one waits there while the
# other processes may idle (6 MP, 250 pieces, 2 processes: 1.19-1.27 s with one, 1.34-1.43
# with two, 1.42-1.51 with all queued at once).
QUEUED_PER_PROCESS = 1


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
              attenuation_hint: np.ndarray | None = None, workers: int | None = None,
              processes: bool = True) -> None:
    """Heal ``image`` where ``mask`` is set, writing the repaired pixels into ``out``.

    image: HxWxC in any sample type (uint8, uint16, float16, float32); ``channels`` are
    the colour channels to heal (1 or 3 indices; default all), the others (alpha) are
    neither read nor written. mask: HxW, nonzero on dust. out: like ``image`` (usually a
    copy of it); only its masked colour pixels are written, in its own sample type.
    ``components`` are the mask's, when the caller has them already.
    ``workers``: spots repaired at once (default ``default_workers()``; 1 = on this
    thread only); with ``processes`` on the shared pool of worker processes
    (``shared_pool``), else on threads. ``progress`` and ``check_cancel`` are only ever
    called from the calling thread.

    Memory stays bounded at any image size: each spot (or piece of a long hair) is
    converted to float in a padded window around it, only a few pieces are in flight at
    a time, and the mask's components are found tile by tile. The result does not depend
    on the order spots are visited in, nor on the number or kind of workers.
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

    def put(cut: _Cut, values: np.ndarray) -> None:
        _write(out, channels, cut, values)
        count(len(values))

    cuts = (_cut(image, channels, mask, piece, comps.region(piece.label, piece.box), attenuation_hint,
                 out.dtype) for piece in comps.pieces(CHUNK))
    pool = shared_pool(workers) if processes and workers > 1 else None
    if workers == 1:
        for cut in cuts:
            if check_cancel:
                check_cancel()
            if cut is not None:
                put(cut, _repair(cut.job))
    elif pool is not None:
        # pieces of a worker that dies are repaired here; the next job gets new workers
        for cut, values in pool.map_unordered(((c, c.job) for c in cuts if c is not None), check_cancel):
            put(cut, values)
    else:
        _heal_on_threads(workers, cuts, put, check_cancel)
    if progress:
        progress(1.0)


def _heal_on_threads(workers: int, cuts, put, check_cancel) -> None:
    pending: deque[tuple[_Cut, Future[np.ndarray]]] = deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="healdust-heal")
    try:
        # the component labels are looked up here, on one thread (their tile cache is not
        # shared); the workers only read the image
        for cut in cuts:
            if check_cancel:
                check_cancel()
            if cut is None:
                continue
            pending.append((cut, pool.submit(_repair, cut.job)))
            while len(pending) >= QUEUED_PER_WORKER * workers:
                c, f = pending.popleft()
                put(c, f.result())
        while pending:
            c, f = pending.popleft()
            put(c, f.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class _Job:
    """What a worker needs to repair one piece (sent to worker processes as it is)."""
    win: np.ndarray          # the window's colour channels, in the image's sample type
    all_mask: np.ndarray     # bool: every spot in the window
    region: np.ndarray       # bool: the piece's pixels
    whole: bool              # the piece is a whole component
    hint: np.ndarray | None  # the window of the attenuation hint
    box: tuple[int, int, int, int]  # the piece's box in the image: seeds its grain
    dtype: np.dtype          # the output's sample type


@dataclass(frozen=True)
class _Cut:
    window: tuple[int, int, int, int]  # wy0, wy1, wx0, wx1 in the image
    job: _Job


def _cut(image: np.ndarray, channels: list[int] | None, mask: np.ndarray, piece: Piece,
         piece_region: np.ndarray, hint: np.ndarray | None, dtype: np.dtype) -> _Cut | None:
    """The padded window around one piece; None if the piece holds no pixel.

    ``piece_region``: the component's pixels inside ``piece.box`` (bool, box-sized)."""
    H, W = mask.shape
    y0, y1, x0, x1 = piece.box
    pad = search_radius(y1 - y0 + 2 * RIM, x1 - x0 + 2 * RIM) + CONTEXT + RIM + 2
    if piece.whole:  # room for the soft tail of a shadow and a ring of unshadowed pixels
        r = max(y1 - y0, x1 - x0) // 2 + 1
        pad = max(pad, 2 * r + 12)
    wy0, wy1 = max(0, y0 - pad), min(H, y1 + pad)
    wx0, wx1 = max(0, x0 - pad), min(W, x1 + pad)
    if not piece_region.any():
        return None
    # a whole component lies inside its bounding box; a piece is its part inside the box
    region = np.zeros((wy1 - wy0, wx1 - wx0), bool)
    region[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0] = piece_region
    win = image[wy0:wy1, wx0:wx1]
    if channels is not None and len(channels) != win.shape[2]:
        win = win[:, :, channels]
    all_mask = mask[wy0:wy1, wx0:wx1]
    all_mask = all_mask if all_mask.dtype == bool else all_mask != 0
    h = None
    if hint is not None and piece.whole:
        h = hint[wy0:wy1, wx0:wx1]
        if not (h[region] > 0).any():
            h = None
    return _Cut((wy0, wy1, wx0, wx1), _Job(win, all_mask, region, piece.whole, h, piece.box, dtype))


def _repair(job: _Job) -> np.ndarray:
    """The repaired pixels of one piece (n×C, the region's pixels in raster order), in
    the output's sample type."""
    region = job.region
    win = np.ascontiguousarray(to_float(job.win))
    if not np.isfinite(win).all():
        win = np.nan_to_num(win, nan=0.0, posinf=1.0, neginf=0.0)
    shadow, confidence = None, 0.0
    if job.whole:
        shadow, confidence = shadow_repair(win, job.all_mask, region, job.hint)
    if shadow is not None and confidence >= 1.0:
        values = shadow
    else:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * RIM + 1, 2 * RIM + 1))
        unknown = cv2.dilate(job.all_mask.astype(np.uint8), k).astype(bool)
        target = cv2.dilate(region.astype(np.uint8), k).astype(bool)
        # seeded by where the piece is, so the grain does not depend on the visiting order
        rng = np.random.default_rng(job.box)
        structure, grain = texture_layers(win, unknown, target, rng)
        values = unmix_speck(win[region], structure[region], grain[region])
        if shadow is not None:
            values = confidence * shadow + (1.0 - confidence) * values
    dtype = job.dtype
    return from_float(values, np.float32 if dtype == np.float16 else dtype).astype(dtype)


def _write(out: np.ndarray, channels: list[int] | None, cut: _Cut, values: np.ndarray) -> None:
    wy0, wy1, wx0, wx1 = cut.window
    view = out[wy0:wy1, wx0:wx1]
    region = cut.job.region
    if channels is None:
        view[region] = values
    else:
        for i, c in enumerate(channels):
            view[:, :, c][region] = values[:, i]


# -- worker processes ------------------------------------------------------------------

_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def shared_pool(workers: int) -> WorkerPool | None:
    """The pool of ``workers`` healing processes (``healdust.workers``), started on first
    use and shared by every job after; a pool of another size, or one a worker died in,
    is replaced. None where worker processes cannot be started (healing then runs on
    threads)."""
    global _pool
    with _pool_lock:
        if _pool is not None and not _pool.broken and _pool.workers == workers:
            return _pool
        if _pool is not None:
            old, _pool = _pool, None
            old.close()
        try:
            _pool = WorkerPool("healdust.heal:_repair", workers, QUEUED_PER_PROCESS,
                               init="healdust.heal:_worker_init")
        except OSError as e:
            log.warning("cannot start healing worker processes (%s); healing on threads", e)
        return _pool


def _worker_init() -> None:
    """In each healing process: OpenCV on one thread (the processes are the parallelism)."""
    cv2.setNumThreads(1)
