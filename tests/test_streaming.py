"""Full resolution with bounded memory: detection and healing stream tile by tile.

The streaming code must give what the whole-image computation gives (the reference
versions here are the whole-image code it replaced), and its allocations beyond the
unavoidable ones (the healed copy, the mask) must not grow with the image.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from healdust.components import MaskComponents
from healdust.heal import heal_image
from healdust.imageio import color_rgb, from_float, to_float
from healdust.model.finetune import dust_inside_marker
from healdust.model.infer import predict_proba
from healdust.model.unet import DustUNet, UNetConfig
from healdust.pipeline import MAX_DUST_FRACTION, MIN_THRESHOLD, MaskBuilder, count_spots, detect_mask, heal_pixels
from healdust.store import load_base_model

from .conftest import dusty_image, markers_for, to_u8, to_u16
from .test_heal import hair_mask, specks_mask, textured


def whole_map_decision(prob, threshold, image=None, order="RGB", dust=None, calibrated=True):
    """The whole-image decision the streaming one replaced (np.quantile on a float map)."""
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
            rgb = to_float(np.ascontiguousarray(color_rgb(image[y0:y1, x0:x1], order)))
            raw[y0:y1, x0:x1] |= dust_inside_marker(rgb, y - y0, x - x0, r, prob[y0:y1, x0:x1])
    return cv2.dilate(raw.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool), t


def stream(prob, threshold, tile, image=None, dust=None, calibrated=True):
    """MaskBuilder fed tile by tile (in an odd order), as detection feeds it."""
    b = MaskBuilder(prob.shape, threshold, calibrated, dust)
    h, w = prob.shape
    tiles = [(y, x) for y in range(0, h, tile) for x in range(0, w, tile)]
    for y, x in tiles[::-1]:
        b.add(y, min(h, y + tile), x, min(w, x + tile), prob[y:y + tile, x:x + tile])
    mask, t = b.finish(image)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    return mask > 0, t


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return load_base_model()[0]


# ---------------------------------------------------------------------------- components

@pytest.mark.parametrize("seed", range(6))
def test_components_are_opencvs_whatever_the_tiles(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(40, 300, 2))
    mask = rng.random((h, w)) < [0.002, 0.02, 0.1, 0.3, 0.5, 0.02][seed]
    if seed % 2:
        mask = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) * 255  # uint8 0 / 255
    mask[h // 2, :] = True  # one component that crosses every vertical seam
    n, lab, st, _ = cv2.connectedComponentsWithStats((mask != 0).astype(np.uint8), connectivity=8)
    for tile in (8, 21, 64, 512):
        c = MaskComponents(mask, tile)
        assert c.count == n - 1
        ours = c.labels(0, h, 0, w)
        pairs = np.unique(np.stack([lab.ravel(), ours.ravel()], 1), axis=0)
        assert len(pairs) == n, "the same partition into components"
        for a, b in pairs[1:]:
            x0, y0, x1, y1 = c.boxes[b]
            assert [x0, y0, x1 - x0, y1 - y0, c.areas[b]] == st[a].tolist()
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        assert np.array_equal(c.labels(y0, h, x0, w), ours[y0:, x0:])
        covered = sum(int(c.region(p.label, p.box).sum()) for p in c.pieces(16))
        assert covered == int((mask != 0).sum()), "the pieces cover every masked pixel once"
    assert count_spots(mask) == n - 1


# ---------------------------------------------------------------------------- detection

@pytest.mark.parametrize("tile", [37, 128, 1000])
def test_streamed_decision_equals_the_whole_map_one(tile):
    rng = np.random.default_rng(tile)
    h, w = 180, 260
    _, dusty, truth = dusty_image(300, seed=4, count=10)
    image = to_u8(dusty[:h, :w])
    dust = [(m["x"], m["y"], m["r"]) for m in markers_for(truth[:h, :w], 3)]
    prob = (rng.random((h, w)) ** 400).astype(np.float32)
    prob[truth[:h, :w]] = 0.97
    assert (prob >= 0.2).mean() < MAX_DUST_FRACTION, "the cap must not bind here"
    for threshold, calibrated in ((0.5, True), (0.1, True), (0.35, False), (0.0, False), (1.0, False)):
        ref, t_ref = whole_map_decision(prob, threshold, image, "RGB", dust, calibrated)
        ours, t = stream(prob, threshold, tile, image, dust, calibrated)
        assert t == t_ref and np.array_equal(ours, ref), (threshold, calibrated)


@pytest.mark.parametrize("tile", [50, 1000])
def test_dust_fraction_cap_within_one_code_step(tile):
    rng = np.random.default_rng(1)
    prob = rng.random((200, 300)).astype(np.float32) ** 4  # far more than 1 % above 0.5
    ref, t_ref = whole_map_decision(prob, 0.5, calibrated=True)
    ours, t = stream(prob, 0.5, tile)
    step = (1 - 0.5) / 254
    assert abs(t - t_ref) <= step
    grown = np.ones((3, 3), np.uint8)
    lo = cv2.dilate((prob >= t_ref + step).astype(np.uint8), grown).astype(bool)
    hi = cv2.dilate((prob >= t_ref - step).astype(np.uint8), grown).astype(bool)
    assert not (lo & ~ours).any() and not (ours & ~hi).any(), "the decision differs only within rounding"


def test_detect_mask_equals_the_whole_map_pipeline(base):
    _, dusty, truth = dusty_image(256, seed=30, count=16)
    img = to_u16(dusty[:200, :240])
    dust = [(m["x"], m["y"], m["r"]) for m in markers_for(truth[:200, :240], 2)]
    prob = predict_proba(base, img, "RGB", tile=128)
    for threshold, calibrated in ((0.5, True), (0.3, False)):
        ref, t_ref = whole_map_decision(prob, threshold, img, "RGB", dust, calibrated)
        mask, t = detect_mask(base, img, "RGB", threshold, calibrated=calibrated, dust=dust, tile=128)
        assert mask.dtype == np.uint8 and mask.shape == (200, 240)
        assert abs(t - t_ref) < 1e-6 and np.array_equal(mask > 0, ref)
    assert (mask > 0).any()



def test_auto_precision_is_bf16_on_cuda_and_on_bf16_cpus_only(monkeypatch):
    from healdust.model import infer

    for amx in (False, True):
        monkeypatch.setattr(infer, "cpu_has_bf16", lambda amx=amx: amx)
        assert infer.use_bf16(torch.device("cpu"), "auto") is amx
        assert infer.use_bf16(torch.device("cuda"), "auto") is True
        assert infer.use_bf16(torch.device("cpu"), "fp32") is False
        assert infer.use_bf16(torch.device("cuda"), "fp32") is False
        assert infer.use_bf16(torch.device("cpu"), "bf16") is True
    with pytest.raises(ValueError, match="precision must be"):
        infer.use_bf16(torch.device("cpu"), "fp16")


def test_cpu_bf16_flags_are_read_from_the_kernel():
    from healdust.model.infer import cpu_has_bf16

    flags = Path("/proc/cpuinfo").read_text(errors="replace")
    assert cpu_has_bf16() is (" amx_bf16" in flags or " avx512_bf16" in flags)


def test_bf16_detection_finds_the_same_dust_as_fp32(base):
    # bf16 runs on any CPU (emulated where there is no AMX or AVX-512 BF16: slow, same numbers)
    _, dusty, truth = dusty_image(256, seed=31, count=16)
    img = to_u16(dusty)
    p32 = predict_proba(base, img, "RGB", precision="fp32")
    p16 = predict_proba(base, img, "RGB", precision="bf16")
    assert not np.array_equal(p32, p16), "bf16 must really be used"
    assert float(np.abs(p32 - p16).max()) < 0.3
    m32, _ = detect_mask(base, img, "RGB", 0.5, precision="fp32")
    m16, _ = detect_mask(base, img, "RGB", 0.5, precision="bf16")
    assert np.mean(m32 != m16) < 0.001
    assert (m32 > 0).any()

def test_detection_memory_does_not_grow_with_the_image():
    """Beyond the mask itself, detection holds one tile's worth of numpy memory, however
    large the image (a tiny random network stands in for the real one: same code path)."""
    torch.manual_seed(0)
    net = DustUNet(UNetConfig(widths=(2, 2, 2, 2))).eval()

    def extra(side: int) -> int:
        image = np.full((side, side, 3), 30000, np.uint16)
        image[100:110, 100:110] = 5000
        tracemalloc.start()
        mask, _ = detect_mask(net, image, "RGB", 0.5, dust=[(105.0, 105.0, 12.0)])
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert mask[105, 105] == 255
        return peak - mask.nbytes

    small, large = extra(2000), extra(4000)  # 4 MP, 16 MP
    print(f"detection, beyond the mask: 4 MP {small / 1e6:.1f} MB, 16 MP {large / 1e6:.1f} MB")
    assert large < small + 1_000_000, f"4 MP: {small / 1e6:.1f} MB, 16 MP: {large / 1e6:.1f} MB beyond the mask"


# ---------------------------------------------------------------------------- healing

def _dusty_texture(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    img = textured(h, w, seed=seed)
    mask = specks_mask(h, w, seed=seed, count=25) | hair_mask(h, w, seed=seed)
    mask[0:3, 10:30] = True          # on the border
    mask[40:46, 5:w - 5] = True      # longer than one repair chunk, across tiles
    dusty = img.copy()
    dusty[mask] = (0.05, 0.04, 0.04)
    return dusty, mask


@pytest.mark.parametrize("dtype, order", [(np.uint16, "RGBA"), (np.uint8, "RGB"), (np.float16, "RGB"),
                                          (np.float32, "RGBA"), (np.uint16, "GRAYA")])
def test_heal_pixels_equals_the_whole_image_heal(dtype, order):
    dusty, mask = _dusty_texture(240, 330, seed=5)
    if order.startswith("GRAY"):
        dusty = dusty[:, :, :1]
    image = dusty if dtype == np.float32 else from_float(dusty, np.float32 if dtype == np.float16 else dtype)
    image = image.astype(dtype)
    if order.endswith("A"):
        alpha = np.full(image.shape[:2] + (1,), 0.25 if image.dtype.kind == "f" else 77, image.dtype)
        image = np.concatenate([image, alpha], axis=2)
    colour = image[:, :, :3 if order.startswith("RGB") else 1]
    # the whole-image computation: the colour channels in float, healed, converted back
    whole = heal_image(np.ascontiguousarray(to_float(colour)), mask)
    ref = image.copy()
    ref[:, :, :colour.shape[2]][mask] = from_float(whole, np.float32 if dtype == np.float16 else dtype
                                                   ).astype(dtype)[mask]
    mask8 = mask.astype(np.uint8) * np.uint8(255)
    for tile in (64, 512):
        out = heal_pixels(image, order, mask8, components=MaskComponents(mask8, tile))
        assert out.dtype == image.dtype and out.shape == image.shape
        assert np.array_equal(out.view(np.uint8), ref.view(np.uint8)), f"tile {tile}"
    if order.endswith("A"):
        assert np.array_equal(out[:, :, -1], image[:, :, -1])


def test_healing_memory_does_not_grow_with_the_image():
    """The same dust in a 4 MP and a 16 MP image: beyond the healed copy (and the mask the
    caller holds) healing allocates the same, however large the image."""
    spots = np.zeros((400, 400), bool)
    spots |= specks_mask(400, 400, seed=3, count=12)
    spots[200:204, 20:380] = True  # a scratch, healed in pieces
    patch = textured(400, 400, seed=2)

    def extra(side: int) -> tuple[int, np.ndarray]:
        yy, xx = np.mgrid[0:side, 0:side]
        image = ((yy * 7 + xx * 3) % 4096 + 20000).astype(np.uint16)[..., None].repeat(3, axis=2)
        image[:400, :400] = to_u16(patch)
        mask = np.zeros((side, side), np.uint8)
        mask[:400, :400] = spots * np.uint8(255)
        del yy, xx
        tracemalloc.start()
        # one thread: on several, the peak depends on which pieces happen to run at the
        # same time (8.7 or 10.4 MB for the same dust, seen in CI), not on the image size
        out = heal_pixels(image, "RGB", mask, workers=1)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak - out.nbytes, out[:400, :400]

    small, a = extra(2000)
    large, b = extra(4000)
    assert np.array_equal(a, b), "the same dust is healed the same way"
    print(f"healing, beyond the copy: 4 MP {small / 1e6:.1f} MB, 16 MP {large / 1e6:.1f} MB")
    assert large < small + 1_000_000, f"4 MP: {small / 1e6:.1f} MB, 16 MP: {large / 1e6:.1f} MB beyond the copy"


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_healing_in_parallel_holds_at_most_one_piece_per_worker(processes):
    """With several threads, each holds the float window of the one piece it repairs and
    the queue holds only the pieces' mask boxes; with worker processes, this process
    holds only the windows of the pieces in flight: the peak beyond the copy stays within
    one single-thread peak per worker, at 16 MP as at 4 MP, whichever pieces overlap."""
    spots = specks_mask(400, 400, seed=5, count=24)
    spots[100:104, 20:380] = True
    spots[300:304, 20:380] = True  # long scratches: many pieces, several in flight at once
    patch = to_u16(textured(400, 400, seed=4))

    def peak(side: int, workers: int) -> int:
        image = np.full((side, side, 3), 30000, np.uint16)
        image[:400, :400] = patch
        mask = np.zeros((side, side), np.uint8)
        mask[:400, :400] = spots * np.uint8(255)
        tracemalloc.start()
        out = heal_pixels(image, "RGB", mask, workers=workers, processes=processes)
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p - out.nbytes

    single = peak(4000, 1)
    for side in (2000, 4000):
        threaded = peak(side, 4)
        print(f"healing {side}², beyond the copy: 1 thread {single / 1e6:.1f} MB, "
              f"4 {'processes' if processes else 'threads'} {threaded / 1e6:.1f} MB")
        assert threaded <= 4 * single, (side, threaded, single)
