"""Tiled inference over an image of any size with bounded memory.

Tiles overlap by ``overlap`` px on each side; only each tile's centre is kept, so the seams
never see the network's border effects. Each tile is converted to float RGB on its own:
the whole image is never held in float.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from ..imageio import color_rgb, to_float
from .unet import MULTIPLE, DustUNet


def _tile_starts(n: int, core: int) -> list[int]:
    return list(range(0, max(1, n), core))


@torch.inference_mode()
def predict_proba(model: DustUNet, image: np.ndarray, order: str, device: torch.device | str = "cpu",
                  tile: int = 512, overlap: int = 32,
                  progress: Callable[[float], None] | None = None,
                  check_cancel: Callable[[], None] | None = None) -> np.ndarray:
    """Dust probability (float32 HxW, 0..1) for an HxWxC image in any supported dtype."""
    device = torch.device(device)
    model.eval()
    h, w = image.shape[:2]
    core = tile - 2 * overlap
    out = np.zeros((h, w), np.float32)
    starts = [(y, x) for y in _tile_starts(h, core) for x in _tile_starts(w, core)]
    use_amp = device.type == "cuda"
    for i, (y, x) in enumerate(starts):
        if check_cancel:
            check_cancel()
        y1, x1 = min(h, y + core), min(w, x + core)
        ya, xa = max(0, y - overlap), max(0, x - overlap)
        yb, xb = min(h, y1 + overlap), min(w, x1 + overlap)
        patch = to_float(np.ascontiguousarray(color_rgb(image[ya:yb, xa:xb], order)))
        t = torch.from_numpy(patch.transpose(2, 0, 1)[None].copy())
        # reflect-pad to the overlap on image borders, then up to a multiple of 8
        pt, pl = overlap - (y - ya), overlap - (x - xa)
        pb, pr = overlap - (yb - y1), overlap - (xb - x1)
        th, tw = t.shape[2] + pt + pb, t.shape[3] + pl + pr
        pb += (-th) % MULTIPLE
        pr += (-tw) % MULTIPLE
        mode = "reflect" if min(t.shape[2], t.shape[3]) > max(pt, pl, pb, pr) else "replicate"
        t = F.pad(t, (pl, pr, pt, pb), mode=mode)
        t = t.to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(t)
        prob = torch.sigmoid(logits.float())[0, 0]
        out[y:y1, x:x1] = prob[overlap:overlap + (y1 - y), overlap:overlap + (x1 - x)].cpu().numpy()
        if progress:
            progress((i + 1) / len(starts))
    return out
