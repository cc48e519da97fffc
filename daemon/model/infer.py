"""Tiled inference over an image of any size with bounded memory.

Tiles overlap by ``overlap`` px on each side; only each tile's centre is kept, so the seams
never see the network's border effects. Each tile is converted to float RGB on its own:
the whole image is never held in float. ``iter_proba`` hands the tiles' probabilities
out one by one (the pipeline folds them straight into the mask); ``predict_proba``
gathers them into a whole float map, for small images, tests and benchmarks.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..imageio import color_rgb, to_float
from .arch import DustModel


def _tile_starts(n: int, core: int) -> list[int]:
    return list(range(0, max(1, n), core))


def inference_copy(model: DustModel, device: torch.device) -> nn.Module:
    """A copy of ``model`` made for fast inference: each BatchNorm folded into the
    convolution before it, weights in channels-last order (about a quarter faster on the
    CPU; probabilities move by about 1e-7). The model itself is only put in eval mode."""
    model.eval()
    net = copy.deepcopy(model)
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return net.to(device=device, memory_format=torch.channels_last)


# CPU flags (/proc/cpuinfo) of hardware bf16 arithmetic, which oneDNN's convolutions use
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (Intel AMX, or the
    AVX-512 BF16 instructions of AMD Zen 4 and later Intel chips), from the kernel's CPU
    flags; False where they cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return not BF16_FLAGS.isdisjoint(line.split())
    except OSError:
        pass
    return False


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """bf16 autocast: "auto" takes it on CUDA and on a CPU with bf16 arithmetic, else fp32.

    Measured on a 2-core Intel VM with AMX: detection 0.18 s/MP in bf16 against 0.50 in
    fp32 (the U-Net); on a 2-core AMD EPYC VM with AVX-512 BF16 (Zen 4), the MobileNetV2
    base model, 0.23-0.29 against 0.46 (bench/speed.py). Single probabilities can move a lot
    where the logit is steep (a dust edge) and 0.03-0.15 % of pixels flip at the
    threshold; spot F1 (bench/precision.py, README) stayed within 0.004 of fp32 with the
    base model alone and within 0.001-0.02 after fine-tuning on 5 markers. Without such
    hardware bf16 is emulated and slower, so such a CPU stays in fp32; "fp32" asks for it
    everywhere (bit-for-bit repeatable figures).
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())


def iter_proba(model: DustModel, image: np.ndarray, order: str, device: torch.device | str = "cpu",
               tile: int = 512, overlap: int = 32,
               progress: Callable[[float], None] | None = None,
               check_cancel: Callable[[], None] | None = None, precision: str = "auto"
               ) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
    """Dust probability tile by tile: yields (y0, y1, x0, x1, float32 probabilities).

    The tiles' cores cover the image once, in raster order; nothing image-sized is
    allocated, so a caller that keeps only what it needs of each tile streams.
    """
    device = torch.device(device)
    net = inference_copy(model, device)
    h, w = image.shape[:2]
    core = tile - 2 * overlap
    starts = [(y, x) for y in _tile_starts(h, core) for x in _tile_starts(w, core)]
    use_amp = use_bf16(device, precision)
    multiple = model.multiple
    for i, (y, x) in enumerate(starts):
        if check_cancel:
            check_cancel()
        y1, x1 = min(h, y + core), min(w, x + core)
        ya, xa = max(0, y - overlap), max(0, x - overlap)
        yb, xb = min(h, y1 + overlap), min(w, x1 + overlap)
        with torch.inference_mode():
            patch = to_float(np.ascontiguousarray(color_rgb(image[ya:yb, xa:xb], order)))
            t = torch.from_numpy(patch.transpose(2, 0, 1)[None].copy())
            # reflect-pad to the overlap on image borders, then up to the model's multiple (8 or 16)
            pt, pl = overlap - (y - ya), overlap - (x - xa)
            pb, pr = overlap - (yb - y1), overlap - (xb - x1)
            th, tw = t.shape[2] + pt + pb, t.shape[3] + pl + pr
            pb += (-th) % multiple
            pr += (-tw) % multiple
            mode = "reflect" if min(t.shape[2], t.shape[3]) > max(pt, pl, pb, pr) else "replicate"
            t = F.pad(t, (pl, pr, pt, pb), mode=mode)
            t = t.to(device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = net(t)
            prob = torch.sigmoid(logits.float())[0, 0]
            core_prob = prob[overlap:overlap + (y1 - y), overlap:overlap + (x1 - x)].cpu().numpy()
        del patch, t, logits, prob
        yield y, y1, x, x1, core_prob
        if progress:
            progress((i + 1) / len(starts))


def predict_proba(model: DustModel, image: np.ndarray, order: str, device: torch.device | str = "cpu",
                  tile: int = 512, overlap: int = 32,
                  progress: Callable[[float], None] | None = None,
                  check_cancel: Callable[[], None] | None = None, precision: str = "auto") -> np.ndarray:
    """Dust probability (float32 HxW, 0..1) for an HxWxC image in any supported dtype.

    Holds the whole map: for small images, tests and benchmarks. The pipeline streams
    the tiles of ``iter_proba`` instead (``pipeline.detect_mask``).
    """
    h, w = image.shape[:2]
    out = np.zeros((h, w), np.float32)
    for y0, y1, x0, x1, prob in iter_proba(model, image, order, device, tile, overlap, progress, check_cancel,
                                           precision):
        out[y0:y1, x0:x1] = prob
    return out
