"""The whole job: markers → fine-tune → tiled detection → threshold → mask → heal.

The same pipeline runs inside the daemon's worker and in-process for ``heal --local``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from .heal import heal_image
from .imageio import color_channels, color_rgb, from_float, to_float
from .model.finetune import FineTuneConfig, dust_inside_marker, fine_tune
from .model.infer import predict_proba
from .model.unet import DustUNet
from .model.weights_io import WeightsError
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


def decide_mask(prob: np.ndarray, threshold: float, image: np.ndarray | None = None, order: str = "RGB",
                dust: list | None = None, calibrated: bool = True) -> tuple[np.ndarray, float]:
    """The dust mask from the probability map; returns (mask, threshold used).

    A calibrated threshold is raised until at most MAX_DUST_FRACTION of the image is
    flagged; the defects the user marked are always in the mask (labelled inside each
    circle as in fine-tuning); the mask is grown by one pixel to cover soft edges.
    """
    t = float(threshold)
    if calibrated:
        t = max(t, MIN_THRESHOLD, float(np.quantile(prob, 1 - MAX_DUST_FRACTION)))
    raw = prob >= t
    if dust and image is not None:
        h, w = prob.shape
        for x, y, r in dust:
            pad = int(np.ceil(r)) + 2
            y0, y1 = max(0, int(y) - pad), min(h, int(y) + pad + 1)
            x0, x1 = max(0, int(x) - pad), min(w, int(x) + pad + 1)
            if y1 <= y0 or x1 <= x0:
                continue
            rgb = to_float(np.ascontiguousarray(color_rgb(image[y0:y1, x0:x1], order)))
            raw[y0:y1, x0:x1] |= dust_inside_marker(rgb, y - y0, x - x0, r, prob[y0:y1, x0:x1])
    mask = cv2.dilate(raw.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return mask, t


def count_spots(mask: np.ndarray) -> int:
    return int(cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1)


def heal_pixels(image: np.ndarray, order: str, mask: np.ndarray, progress=None, check_cancel=None) -> np.ndarray:
    """Heal the colour channels under ``mask``; alpha and unmasked pixels stay bit-identical."""
    out = image.copy()
    if not mask.any():
        return out
    chans = color_channels(order)
    # only the bounding box of the mask is converted to float
    ys, xs = np.nonzero(mask)
    pad = 96  # context for the patch search and the shadow fit
    y0, y1 = max(0, ys.min() - pad), min(mask.shape[0], ys.max() + pad + 1)
    x0, x1 = max(0, xs.min() - pad), min(mask.shape[1], xs.max() + pad + 1)
    sub = image[y0:y1, x0:x1][:, :, chans]
    work = to_float(sub.astype(np.float32) if sub.dtype == np.float16 else sub)
    healed = heal_image(np.ascontiguousarray(work), mask[y0:y1, x0:x1], progress=progress,
                        check_cancel=check_cancel)
    back = from_float(healed, np.float32 if image.dtype == np.float16 else image.dtype).astype(image.dtype)
    m = mask[y0:y1, x0:x1]
    region = out[y0:y1, x0:x1]
    for i, c in enumerate(chans):
        region[:, :, c][m] = back[:, :, i][m]
    return out


class Pipeline:
    """Owns the warm models. Not thread-safe: one job at a time (the daemon's worker)."""

    def __init__(self, device: str = "auto", store: ModelStore | None = None, base_path=None,
                 tile: int = 512, finetune: FineTuneConfig | None = None):
        self.device = pick_device(device)
        self.store = store or ModelStore()
        self.base, self.base_meta = load_base_model(base_path, self.device)
        self.tile = tile
        self.finetune_cfg = finetune or FineTuneConfig()
        self._cache: OrderedDict[str, tuple[float, DustUNet, dict]] = OrderedDict()

    @property
    def models_loaded(self) -> list[str]:
        return ["base", *self._cache]

    def _saved(self, name: str) -> tuple[DustUNet, dict]:
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

    def choose_model(self, spec: JobSpec, result: JobResult) -> tuple[DustUNet, dict | None]:
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

        if spec.kind == "inpaint" or spec.mask is not None:
            if spec.mask is None or spec.mask.shape != (h, w):
                raise JobError("bad_request", "the mask must have the image's width and height")
            mask = spec.mask.astype(bool)
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
                    self.store.save(spec.save_model, model, self.base_meta, spec.mode, len(spec.dust),
                                    threshold, spec.camera)
                    self.forget(spec.save_model)
                    result.saved_model = spec.save_model
                    progress("save", 1.0)
            elif spec.mode == "scratch" and meta is None:
                raise JobError("no_markers", "scratch mode needs dust markers to learn from "
                                             "(mark 3-5 dust spots, or use transfer mode)")
            elif spec.save_model:
                raise JobError("bad_request", "nothing to save: --save-model needs dust markers to "
                                              "fine-tune on")
            t1 = time.monotonic()
            prob = predict_proba(model, spec.image, spec.order, self.device, tile=self.tile,
                                 progress=lambda f: progress("detect", f), check_cancel=check_cancel)
            if spec.threshold is not None:
                mask, threshold = decide_mask(prob, spec.threshold, spec.image, spec.order, spec.dust,
                                              calibrated=False)
            else:
                mask, threshold = decide_mask(prob, threshold, spec.image, spec.order, spec.dust)
            del prob
            result.threshold = float(threshold)
            result.seconds["detect"] = round(time.monotonic() - t1, 3)
        result.mask = mask.astype(np.uint8) * np.uint8(255)
        result.spots = count_spots(mask)

        if spec.kind in ("heal", "inpaint"):
            t2 = time.monotonic()
            result.healed = heal_pixels(spec.image, spec.order, mask,
                                        progress=lambda f: progress("heal", f), check_cancel=check_cancel)
            result.seconds["heal"] = round(time.monotonic() - t2, 3)
        result.seconds["total"] = round(time.monotonic() - t, 3)
        return result
