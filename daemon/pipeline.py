"""The whole job: markers → fine-tune → tiled detection → threshold → mask → heal.

The same pipeline runs inside the daemon's worker and in-process for ``heal --local``.
Beyond the image, its healed copy and the uint8 mask, memory does not grow with the
image: detection folds each tile's probabilities straight into the mask
(``MaskBuilder``), the mask's spots are found tile by tile (``components``) and healing
converts only a window around each spot to float (``heal.heal_into``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from .components import MaskComponents
from .heal import heal_into
from .imageio import color_channels, color_rgb, to_float
from .model.arch import DustModel
from .model.finetune import FineTuneConfig, dust_inside_marker, fine_tune
from .model.infer import iter_proba, use_bf16
from .model.weights_io import WeightsError
from .spots import SpotFilter, apply_filter
from .store import ModelStore, load_base_model

ProgressFn = Callable[..., None]  # progress(stage, fraction, **extra)


class Cancelled(Exception):
    """The job was cancelled by its client."""


class JobError(Exception):
    """A job that cannot be done; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise JobError("bad_request", "CUDA was asked for but no CUDA device is available")
    return torch.device(name)


@dataclass
class JobSpec:
    kind: str                      # heal | detect | inpaint
    image: np.ndarray              # HxWxC in ``order``: uint8, uint16, float16 or float32
    order: str = "RGB"
    dust: list = field(default_factory=list)       # (x, y, r)
    not_dust: list = field(default_factory=list)
    model: str | None = None       # saved model name, "auto", or None for the base model
    save_model: str | None = None
    mode: str = "transfer"
    threshold: float | None = None
    camera: dict = field(default_factory=dict)
    mask: np.ndarray | None = None  # bool HxW: heal exactly this


@dataclass
class JobResult:
    mask: np.ndarray | None = None     # uint8 HxW, 255 = dust
    healed: np.ndarray | None = None   # like the input
    spots: int = 0
    threshold: float | None = None
    model: str = "base"
    saved_model: str | None = None
    seconds: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# Dust covers well under 1 % of a real scan; a threshold that flags more is too low.
MAX_DUST_FRACTION = 0.01
MIN_THRESHOLD = 0.2


class MaskBuilder:
    """The dust mask, decided from probability tiles as they stream in.

    The probability map is never held in float: each pixel is kept as an 8-bit code in the
    mask's own uint8 array (0 below the lowest threshold that can be used, 1..255 above it,
    evenly spaced up to 1.0), with a histogram of the codes for the dust fraction cap, and
    float probabilities only in the circles the user marked. ``finish`` then thresholds,
    adds the marked defects and dilates in bands of rows, in place: the result is the
    mask itself (0 / 255).

    The decision is exact for a fixed threshold, and for a calibrated one whenever the cap
    does not bind; where it binds, the threshold is found to within one code step
    (``(1 - threshold) / 254``) instead of ``np.quantile``'s interpolation.
    """

    def __init__(self, shape: tuple[int, int], threshold: float, calibrated: bool = True,
                 dust: list | None = None):
        h, w = shape
        self.shape = (h, w)
        self.threshold = float(threshold)
        self.calibrated = calibrated
        self.t0 = max(self.threshold, MIN_THRESHOLD) if calibrated else self.threshold
        self.scale = 254.0 / (1.0 - self.t0) if self.t0 < 1.0 else 0.0
        self.codes = np.zeros((h, w), np.uint8)
        self.hist = np.zeros(256, np.int64)
        self.markers = []
        for x, y, r in dust or []:
            pad = int(np.ceil(r)) + 2
            y0, y1 = max(0, int(y) - pad), min(h, int(y) + pad + 1)
            x0, x1 = max(0, int(x) - pad), min(w, int(x) + pad + 1)
            if y1 > y0 and x1 > x0:
                self.markers.append(((x, y, r), (y0, y1, x0, x1), np.zeros((y1 - y0, x1 - x0), np.float32)))

    def add(self, y0: int, y1: int, x0: int, x1: int, prob: np.ndarray) -> None:
        """Take the probabilities (float, 0..1) of the window [y0, y1) × [x0, x1)."""
        code = np.floor((prob - np.float32(self.t0)) * np.float32(self.scale))
        np.clip(code, 0, 254, out=code)
        code += 1
        dst = self.codes[y0:y1, x0:x1]
        dst[...] = np.where(prob >= self.t0, code, 0)
        self.hist += np.bincount(dst.ravel(), minlength=256)
        for _, (my0, my1, mx0, mx1), crop in self.markers:
            ya, yb, xa, xb = max(y0, my0), min(y1, my1), max(x0, mx0), min(x1, mx1)
            if ya < yb and xa < xb:
                crop[ya - my0:yb - my0, xa - mx0:xb - mx0] = prob[ya - y0:yb - y0, xa - x0:xb - x0]

    def _cut(self) -> tuple[int, float]:
        """The lowest code that is dust, and the threshold it stands for."""
        if not self.calibrated:
            return 1, self.threshold
        n = int(self.hist.sum())
        k = int(np.floor((n - 1) * (1 - MAX_DUST_FRACTION)))  # rank of np.quantile's lower sample
        cum = np.cumsum(self.hist)
        c = int(np.searchsorted(cum, k, side="right"))  # the code of that sample
        if c == 0:  # the quantile lies below t0 (or only just above, with no pixel between)
            return 1, self.t0
        # the cap binds: of the code holding the quantile, keep it if most of it lies at or
        # above the quantile's sample (rounding to the nearest code edge)
        if c < 255 and cum[c] - k < k - cum[c - 1]:
            c += 1
        return c, self.t0 + (c - 1) / self.scale if self.scale else self.t0

    def finish(self, image: np.ndarray | None = None, order: str = "RGB") -> tuple[np.ndarray, float]:
        """The mask (uint8 HxW, 255 = dust; the codes' array, reused) and the threshold used."""
        cut, t = self._cut()
        h, w = self.shape
        patches = []
        if image is not None:
            for (x, y, r), (y0, y1, x0, x1), crop in self.markers:
                rgb = to_float(np.ascontiguousarray(color_rgb(image[y0:y1, x0:x1], order)))
                patches.append(((y0, y1, x0, x1), dust_inside_marker(rgb, y - y0, x - x0, r, crop)))
        self.markers = []
        kernel = np.ones((3, 3), np.uint8)
        band = max(16, (1 << 20) // max(1, w))
        above = None  # the undilated last row of the previous band
        for a in range(0, h, band):
            b = min(h, a + band)
            hi = min(h, b + 1)  # one row of the next band, still codes
            raw = self.codes[a:hi] >= cut
            for (y0, y1, x0, x1), patch in patches:
                ya, yb = max(a, y0), min(hi, y1)
                if ya < yb:
                    raw[ya - a:yb - a, x0:x1] |= patch[ya - y0:yb - y0]
            rows = raw if above is None else np.concatenate([above[None], raw])
            grown = cv2.dilate(rows.view(np.uint8), kernel)
            above = raw[b - 1 - a].copy()
            top = 0 if a == 0 else 1
            np.multiply(grown[top:top + b - a], 255, out=self.codes[a:b])
        return self.codes, float(t)


def decide_mask(prob: np.ndarray, threshold: float, image: np.ndarray | None = None, order: str = "RGB",
                dust: list | None = None, calibrated: bool = True) -> tuple[np.ndarray, float]:
    """The dust mask (bool) from a whole probability map; returns (mask, threshold used).

    A calibrated threshold is raised until at most MAX_DUST_FRACTION of the image is
    flagged; the defects the user marked are always in the mask (labelled inside each
    circle as in fine-tuning); the mask is grown by one pixel to cover soft edges. The
    pipeline streams the same decision tile by tile (``detect_mask``).
    """
    b = MaskBuilder(prob.shape, threshold, calibrated, dust if image is not None else None)
    b.add(0, prob.shape[0], 0, prob.shape[1], prob)
    mask, t = b.finish(image, order)
    return mask > 0, t


def detect_mask(model: DustModel, image: np.ndarray, order: str, threshold: float, device="cpu",
                calibrated: bool = True, dust: list | None = None, tile: int = 512,
                progress: Callable[[float], None] | None = None,
                check_cancel: Callable[[], None] | None = None, precision: str = "auto") -> tuple[np.ndarray, float]:
    """Tiled detection straight into the mask: (uint8 HxW, 255 = dust; threshold used).

    Besides the mask itself only one tile's probabilities are held at a time.
    """
    b = MaskBuilder(image.shape[:2], threshold, calibrated, dust)
    for y0, y1, x0, x1, prob in iter_proba(model, image, order, device, tile=tile, progress=progress,
                                           check_cancel=check_cancel, precision=precision):
        b.add(y0, y1, x0, x1, prob)
    return b.finish(image, order)


def count_spots(mask: np.ndarray) -> int:
    """Connected (8-neighbour) spots in a mask of any size, found tile by tile."""
    return MaskComponents(mask).count


def heal_pixels(image: np.ndarray, order: str, mask: np.ndarray, progress=None, check_cancel=None,
                components: MaskComponents | None = None, workers: int | None = None,
                processes: bool = True) -> np.ndarray:
    """Heal the colour channels under ``mask``; alpha and unmasked pixels stay bit-identical.

    ``mask`` is HxW, nonzero on dust. Besides the returned copy of the image only windows
    around each spot are held (in float), whatever the image's size or sample type.
    """
    out = image.copy()
    heal_into(image, mask, out, color_channels(order), components, progress=progress,
              check_cancel=check_cancel, workers=workers, processes=processes)
    return out


def load_spot_filter(base_meta: dict) -> tuple[SpotFilter | None, str]:
    """The base model's spot filter (spots.py), or None and why (a note for each job)."""
    d = base_meta.get("spot_filter")
    if not d:
        return None, ""
    try:
        return SpotFilter.from_dict(d), ""
    except (ValueError, KeyError, TypeError) as e:
        return None, f"the base model's spot filter is not used: {e}"


class Pipeline:
    """Owns the warm models. Not thread-safe: one job at a time (the daemon's worker)."""

    def __init__(self, device: str = "auto", store: ModelStore | None = None, base_path=None,
                 tile: int = 512, finetune: FineTuneConfig | None = None, precision: str = "auto"):
        """precision: detection's arithmetic, see model.infer.use_bf16."""
        self.device = pick_device(device)
        use_bf16(self.device, precision)  # refuses a wrong value now, not in a job
        self.precision = precision
        self.store = store or ModelStore()
        self.base, self.base_meta = load_base_model(base_path, self.device)
        self.spot_filter, self.spot_filter_note = load_spot_filter(self.base_meta)
        self.tile = tile
        self.finetune_cfg = finetune or FineTuneConfig()
        self._cache: OrderedDict[str, tuple[float, DustModel, dict]] = OrderedDict()

    @property
    def models_loaded(self) -> list[str]:
        return ["base", *self._cache]

    def _saved(self, name: str) -> tuple[DustModel, dict]:
        path = self.store.path(name)
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            self._cache.pop(name, None)
            raise JobError("not_found", f"no saved model named {name!r}") from None
        hit = self._cache.get(name)
        if hit and hit[0] == mtime:
            self._cache.move_to_end(name)
            return hit[1], hit[2]
        try:
            model, meta = self.store.load(name, self.base, self.base_meta)
        except WeightsError as e:
            raise JobError("bad_model", str(e)) from None
        self._cache[name] = (mtime, model, meta)
        while len(self._cache) > 4:
            self._cache.popitem(last=False)
        return model, meta

    def forget(self, name: str) -> None:
        self._cache.pop(name, None)

    def choose_model(self, spec: JobSpec, result: JobResult) -> tuple[DustModel, dict | None]:
        name = spec.model
        if name == "auto":
            name = self.store.newest_for_camera(spec.camera or {})
            cam = " ".join(str(v) for v in (spec.camera or {}).values()) or "no camera in EXIF"
            result.notes.append(f"model auto: {name or 'base'} ({cam})")
        if not name or name == "base":
            result.model = "base"
            return self.base, None
        model, meta = self._saved(name)
        result.model = name
        return model, meta

    def run(self, spec: JobSpec, progress: ProgressFn | None = None,
            check_cancel: Callable[[], None] | None = None) -> JobResult:
        progress = progress or (lambda *a, **k: None)
        check_cancel = check_cancel or (lambda: None)
        result = JobResult()
        t = time.monotonic()
        h, w = spec.image.shape[:2]
        comps = None  # the mask's components, once known

        if spec.kind == "inpaint" or spec.mask is not None:
            if spec.mask is None or spec.mask.shape != (h, w):
                raise JobError("bad_request", "the mask must have the image's width and height")
            mask = spec.mask != 0  # a new array, reused as the uint8 mask (0 / 255)
            mask = mask.view(np.uint8)
            mask *= np.uint8(255)
            result.model = "none (given mask)"
        else:
            if spec.mode not in ("transfer", "scratch"):
                raise JobError("bad_request", "mode must be 'transfer' or 'scratch'")
            progress("load", 0.0)
            model, meta = self.choose_model(spec, result)
            progress("load", 1.0)
            threshold = (meta or {}).get("threshold", 0.5)
            if spec.dust:
                if spec.mode == "scratch" and meta is not None:
                    result.notes.append("scratch mode ignores the saved model's weights")
                ft = fine_tune(model, spec.image, spec.order, spec.dust, spec.not_dust, spec.mode,
                               self.device, self.finetune_cfg,
                               progress=lambda f, loss: progress("finetune", f, loss=loss),
                               check_cancel=check_cancel)
                model, threshold = ft.model, ft.threshold
                result.seconds["finetune"] = round(time.monotonic() - t, 3)
                result.notes.append(f"fine-tuned ({spec.mode}) on {len(spec.dust)} markers, "
                                    f"{ft.steps} steps, final loss {ft.losses[-1]:.3f}")
                if spec.save_model:
                    progress("save", 0.0)
                    try:
                        self.store.save(spec.save_model, model, self.base_meta, spec.mode, len(spec.dust),
                                        threshold, spec.camera)
                        self.forget(spec.save_model)
                        result.saved_model = spec.save_model
                    except OSError as e:  # a full disk: the image is still healed, the old model kept
                        result.notes.append(f"could not save the model {spec.save_model!r} "
                                            f"({e.strerror or e}); any earlier model of that name is unchanged")
                    progress("save", 1.0)
            elif spec.mode == "scratch" and meta is None:
                raise JobError("no_markers", "scratch mode needs dust markers to learn from "
                                             "(mark 3-5 dust spots, or use transfer mode)")
            elif spec.save_model:
                raise JobError("bad_request", "nothing to save: --save-model needs dust markers to "
                                              "fine-tune on")
            t1 = time.monotonic()
            fixed = spec.threshold is not None
            mask, threshold = detect_mask(model, spec.image, spec.order,
                                          spec.threshold if fixed else threshold, self.device,
                                          calibrated=not fixed, dust=spec.dust, tile=self.tile,
                                          precision=self.precision,
                                          progress=lambda f: progress("detect", f), check_cancel=check_cancel)
            result.threshold = float(threshold)
            if self.spot_filter is not None:
                cleared, comps = apply_filter(spec.image, spec.order, mask, self.spot_filter, spec.dust,
                                              check_cancel=check_cancel)
                result.notes.append(f"spot filter: cleared {cleared} of {comps.count + cleared} detected "
                                    f"spots as unlike dust")
            elif self.spot_filter_note:
                result.notes.append(self.spot_filter_note)
            result.seconds["detect"] = round(time.monotonic() - t1, 3)
        result.mask = mask
        if comps is None:
            comps = MaskComponents(mask)
        result.spots = comps.count

        if spec.kind in ("heal", "inpaint"):
            t2 = time.monotonic()
            result.healed = heal_pixels(spec.image, spec.order, mask, progress=lambda f: progress("heal", f),
                                        check_cancel=check_cancel, components=comps)
            result.seconds["heal"] = round(time.monotonic() - t2, 3)
        result.seconds["total"] = round(time.monotonic() - t, 3)
        return result
