"""Healing: the contract the pipeline relies on, and repairs a retoucher would accept.

Fixtures are generated: a smooth gradient with mid-scale texture and film grain, so a
smooth fill (cv2.inpaint) visibly loses what our repair must keep.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from healdust import heal_flat, synth
from healdust.demo import sample_path
from healdust.heal import heal_image
from healdust.synth import SensorDustField, SensorSpot


def textured(h: int, w: int, seed: int = 0, channels: int = 3, grain: float = 0.02) -> np.ndarray:
    """A photo-like stand-in: gradient, texture at three scales, film grain.

    Float32 HxWxC in about [0.1, 0.9]; the texture is strongest at coarse scales, as in
    natural images.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 0.35 + 0.25 * xx / w + 0.15 * yy / h
    tex = np.zeros((h, w), np.float32)
    for sigma, amp in ((1.0, 0.015), (3.0, 0.025), (9.0, 0.04)):
        n = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigma)
        tex += amp * n / n.std()
    img = np.stack([base * t for t in (1.0, 0.95, 0.85)[:channels]], axis=2) + tex[..., None]
    img += grain * rng.standard_normal((h, w, channels)).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def cv2_inpaint(image: np.ndarray, mask: np.ndarray, method: int) -> np.ndarray:
    """cv2.inpaint on the 8-bit image (float data confuses OpenCV's Telea)."""
    u8 = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    filled = cv2.inpaint(u8, mask.astype(np.uint8), 3, method).reshape(image.shape)
    out = image.copy()
    out[mask] = filled[mask].astype(np.float32) / 255
    return out


def telea(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The floor: cv2.inpaint Telea."""
    return cv2_inpaint(image, mask, cv2.INPAINT_TELEA)


def psnr_in(result: np.ndarray, clean: np.ndarray, mask: np.ndarray) -> float:
    mse = float(((result - clean)[mask] ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def grain_ratio(result: np.ndarray, mask: np.ndarray) -> float:
    """High-pass RMS inside the mask over that in a ring 3–8 px around it."""
    hp = result - cv2.GaussianBlur(result, (0, 0), 1.0).reshape(result.shape)

    def grow(r: int) -> np.ndarray:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        return cv2.dilate(mask.astype(np.uint8), k).astype(bool)

    ring = grow(8) & ~grow(3)
    return float(np.sqrt((hp[mask] ** 2).mean() / (hp[ring] ** 2).mean()))


def hair_mask(h: int, w: int, seed: int = 1, width: int = 2) -> np.ndarray:
    """A long, thin, curved hair (about ``width`` px wide, a few hundred px long)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, 200)
    xs = 20 + t * (w - 40)
    ys = h / 2 + 0.25 * h * np.sin(2.5 * t * math.pi + rng.uniform(0, 1))
    canvas = np.zeros((h, w), np.uint8)
    pts = np.stack([xs, ys], 1).round().astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [pts], False, 255, thickness=width)
    return canvas > 0


def specks_mask(h: int, w: int, seed: int = 2, count: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.zeros((h, w), np.uint8)
    for _ in range(count):
        cv2.circle(m, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(1, 6)), 255, -1)
    return m > 0


def sensor_dust(clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Soft round shadows taking 12–18 % of the light; mask = their cores."""
    field = SensorDustField([SensorSpot(0.3, 0.3, 10.0, 0.18), SensorSpot(0.65, 0.7, 14.0, 0.15),
                             SensorSpot(0.7, 0.25, 7.0, 0.16)])
    dust = field.apply(clean, f_number=8.0)
    return dust.image, dust.mask


# ---------------------------------------------------------------------------- contract

@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_channels_kept(channels: int) -> None:
    img = textured(96, 128, channels=channels)
    mask = specks_mask(96, 128) | hair_mask(96, 128)
    before = img.copy()
    out = heal_image(img, mask)
    assert out.shape == img.shape and out.dtype == np.float32
    assert out is not img and np.array_equal(img, before), "the input must not be modified"
    assert np.isfinite(out).all()


def test_pixels_outside_the_mask_unchanged_bit_for_bit() -> None:
    img = textured(160, 160, seed=3)
    img[::7, ::5] *= 1.08          # float input may exceed [0, 1] ...
    img[3::11, ::13] -= 0.2        # ... or dip below 0
    img[0, 0] = np.nan             # and carry odd values we must not touch
    img[5, 150] = -0.0
    mask = specks_mask(160, 160, count=20) | hair_mask(160, 160)
    mask[0, 0] = mask[5, 150] = False
    img_dust, m_dust = sensor_dust(np.clip(img, 0, 1))
    for image, m in ((img, mask), (img_dust, m_dust)):
        out = heal_image(image, m)
        assert np.array_equal(out[~m].view(np.uint32), image[~m].view(np.uint32))
        assert not np.array_equal(out[m], image[m]), "the mask itself must be repaired"


def test_empty_mask_returns_an_equal_copy() -> None:
    img = textured(64, 64)
    out = heal_image(img, np.zeros((64, 64), bool))
    assert out is not img
    assert np.array_equal(out, img)


def test_spots_touching_the_border_and_large_spots() -> None:
    img = textured(320, 300, seed=4)
    mask = np.zeros((320, 300), bool)
    mask[0:4, 40:60] = True          # on the top edge
    mask[150:160, 296:300] = True    # on the right edge
    mask[200:206, 10:290] = True     # longer than one repair chunk
    out = heal_image(img, mask)
    assert np.isfinite(out).all()
    assert np.array_equal(out[~mask], img[~mask])
    assert psnr_in(out, img, mask) > 22


def test_cancel_propagates() -> None:
    class Cancelled(Exception):
        pass

    calls = []

    def cancel() -> None:
        calls.append(1)
        if len(calls) >= 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        heal_image(textured(128, 128), specks_mask(128, 128, count=20), check_cancel=cancel)



def test_the_same_pixels_on_any_number_of_threads_or_processes() -> None:
    from healdust.heal import heal_into

    img = textured(320, 300, seed=5)
    mask = specks_mask(320, 300, count=30) | hair_mask(320, 300)
    mask[200:206, 10:290] = True     # longer than one repair chunk: several pieces
    dusty, dust = sensor_dust(img)
    mask |= dust
    image16 = np.round(np.clip(dusty, 0, 1) * 65535).astype(np.uint16)
    outs = []
    for workers, processes in ((1, False), (2, False), (3, False), (2, True), (3, True)):
        out = image16.copy()
        heal_into(image16, mask, out, workers=workers, processes=processes)
        outs.append(out)
    assert not np.array_equal(outs[0], image16)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_an_error_in_a_thread_stops_the_heal_and_leaves_no_thread(monkeypatch) -> None:
    import threading

    import healdust.heal as heal

    real = heal._repair
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 4:
            raise MemoryError("no room for this piece")
        return real(*args)

    monkeypatch.setattr(heal, "_repair", failing)
    img = textured(128, 128)
    with pytest.raises(MemoryError, match="no room"):
        heal.heal_into(img, specks_mask(128, 128, count=40), img.copy(), workers=2, processes=False)
    assert not [t for t in threading.enumerate() if t.name.startswith("healdust-heal")]


def test_a_killed_worker_process_loses_no_piece() -> None:
    """A worker killed in the middle of a heal (the OOM killer, a user): its pieces are
    repaired in the calling process, the image comes out the same, and the next heal
    gets new workers."""
    import os
    import signal

    import healdust.heal as heal

    img = textured(320, 300, seed=7)
    mask = specks_mask(320, 300, count=60) | hair_mask(320, 300)
    pool = heal.shared_pool(2)
    victim = pool.pids[0]
    calls = []

    def kill_once() -> None:
        calls.append(1)
        if len(calls) == 10:
            os.kill(victim, signal.SIGKILL)

    out = img.copy()
    heal.heal_into(img, mask, out, workers=2, check_cancel=kill_once)
    ref = img.copy()
    heal.heal_into(img, mask, ref, workers=1)
    assert np.array_equal(out, ref)
    assert pool.broken
    fresh = heal.shared_pool(2)
    assert fresh is not pool and not fresh.broken and victim not in fresh.pids


def test_progress_runs_from_zero_to_one() -> None:
    seen: list[float] = []
    heal_image(textured(128, 128), specks_mask(128, 128, count=20), progress=seen.append)
    assert seen and seen[-1] == 1.0
    assert all(0.0 <= a <= b <= 1.0 for a, b in zip(seen, seen[1:], strict=False))


@pytest.mark.parametrize("image, mask, words", [
    (np.zeros((8, 8, 3), np.float64), np.zeros((8, 8), bool), "float32"),
    (np.zeros((8, 8), np.float32), np.zeros((8, 8), bool), "HxWxC"),
    (np.zeros((8, 8, 4), np.float32), np.zeros((8, 8), bool), "C = 1 or 3"),
    (np.zeros((8, 8, 3), np.float32), np.zeros((8, 9), bool), "does not match"),
    (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.float32), "mask must be bool"),
    (np.zeros((0, 8, 3), np.float32), np.zeros((0, 8), bool), "empty"),
    ([[0.0]], np.zeros((1, 1), bool), "numpy arrays"),
])
def test_bad_input_raises_a_clear_value_error(image, mask, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        heal_image(image, mask)


def test_bad_attenuation_hint_raises() -> None:
    img = textured(16, 16)
    with pytest.raises(ValueError, match="attenuation_hint"):
        heal_image(img, np.zeros((16, 16), bool), attenuation_hint=np.zeros((8, 8), np.float32))


def test_integer_mask_is_accepted() -> None:
    img = textured(64, 64)
    m = specks_mask(64, 64)
    assert np.array_equal(heal_image(img, m.astype(np.uint8)), heal_image(img, m))


# ---------------------------------------------------------------------------- quality

def test_semi_transparent_dust_keeps_the_picture_underneath() -> None:
    gains = []
    for seed in range(6):
        clean = textured(192, 192, seed=seed, grain=0.01)
        dusty, mask = sensor_dust(clean)
        ours = heal_image(dusty, mask)
        p_ours, p_floor = psnr_in(ours, clean, mask), psnr_in(telea(dusty, mask), clean, mask)
        assert p_ours > p_floor, f"seed {seed}: ours {p_ours:.1f} dB vs Telea {p_floor:.1f} dB"
        # the texture seen through the shadow survives: grain as strong as around it
        assert 0.8 <= grain_ratio(ours, mask) <= 1.25
        gains.append(p_ours - p_floor)
    # coarse texture at the spots' own scale can pass for a shadow, so single spots vary;
    # on average the repair is clearly better than a smooth fill
    assert np.mean(gains) >= 3.0, f"mean gain over Telea {np.mean(gains):.1f} dB"


def test_shadow_on_a_smooth_sky_is_divided_out_almost_exactly() -> None:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:160, 0:160].astype(np.float32)
    sky = 0.45 + 0.3 * yy / 160 + 0.05 * np.sin(xx / 40)
    clean = np.stack([0.8 * sky, 0.9 * sky, sky], axis=2)
    clean = (clean + 0.012 * rng.standard_normal(clean.shape)).astype(np.float32)
    dusty, mask = sensor_dust(clean)
    ours = heal_image(dusty, mask)
    p_ours, p_floor = psnr_in(ours, clean, mask), psnr_in(telea(dusty, mask), clean, mask)
    assert p_ours >= 44 and p_ours >= p_floor + 10, f"ours {p_ours:.1f} dB vs Telea {p_floor:.1f} dB"


def test_attenuation_hint_is_divided_out() -> None:
    clean = textured(128, 128, seed=6)
    field = SensorDustField([SensorSpot(0.5, 0.5, 12.0, 0.2)])
    dust = field.apply(clean, f_number=5.6)
    out = heal_image(dust.image, dust.mask, attenuation_hint=dust.attenuation)
    assert psnr_in(out, clean, dust.mask) > 60


def test_opaque_hair_is_filled_with_grain() -> None:
    clean = textured(200, 260, seed=7, grain=0.03)
    mask = hair_mask(200, 260, width=2)
    dusty = clean.copy()
    dusty[mask] = (0.05, 0.04, 0.04)
    ours = heal_image(dusty, mask)
    floor = telea(dusty, mask)
    g_ours, g_floor = grain_ratio(ours, mask), grain_ratio(floor, mask)
    assert 0.6 <= g_ours <= 1.4, f"grain ratio {g_ours:.2f}"
    assert g_floor < 0.55, f"Telea's grain ratio {g_floor:.2f} should be far lower"
    # and the hair is gone: no dark line left, the fill sits at the local brightness
    assert abs(float(ours[mask].mean() - clean[mask].mean())) < 0.02
    assert psnr_in(ours, clean, mask) > 24


def test_opaque_specks_are_not_mistaken_for_shadows() -> None:
    clean = textured(160, 160, seed=8)
    mask = specks_mask(160, 160, seed=9, count=10)
    dusty = clean.copy()
    dusty[mask] = (0.02, 0.02, 0.03)
    ours = heal_image(dusty, mask)
    assert float(ours[mask].mean()) > 0.3, "dark specks must be filled, not divided"
    assert psnr_in(ours, clean, mask) > 25
    assert 0.6 <= grain_ratio(ours, mask) <= 1.4


# ---------------------------------------------------------------------------- film damage on a photo

def photo_crops(count: int, size: int, seed: int) -> list[tuple[np.ndarray, np.random.Generator]]:
    """Crops of the bundled sample photo with film grain, quantised to 8 bit."""
    photo = synth.load_photo(sample_path(), 4096).astype(np.float32) / 255
    out = []
    for i in range(count):
        rng = np.random.default_rng(seed + i)
        y, x = int(rng.integers(0, photo.shape[0] - size)), int(rng.integers(0, photo.shape[1] - size))
        clean = synth.add_grain(np.ascontiguousarray(photo[y:y + size, x:x + size]), rng, 0.01)
        out.append((np.round(clean * 255).astype(np.float32) / 255, rng))
    return out


def ns(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The other floor: cv2.inpaint Navier–Stokes."""
    return cv2_inpaint(image, mask, cv2.INPAINT_NS)


def blob_damage(clean: np.ndarray, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Opaque specks and blobs 1–24 px across, dark or bright, soft-edged (alpha 0.75–1 in
    the core); mask = alpha above the synth's threshold, as in the healing bench."""
    h, w = clean.shape[:2]
    alpha = np.zeros((h, w), np.float32)
    for _ in range(count):
        a = synth._speck(rng)
        s = float(rng.uniform(1.0, 3.0))
        a = cv2.resize(a, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR) * float(rng.uniform(0.75, 1.0))
        synth._paste(alpha, a, int(rng.integers(0, h - a.shape[0])), int(rng.integers(0, w - a.shape[1])))
    dark = rng.random() < 0.5
    tone = (rng.uniform(0.0, 0.12, 3) if dark else rng.uniform(0.88, 1.0, 3)).astype(np.float32)
    out = clean * (1 - alpha[..., None]) + tone * alpha[..., None]
    return np.round(np.clip(out, 0, 1) * 255).astype(np.float32) / 255, alpha > synth.MASK_ALPHA


def pooled_gain(cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """Pooled PSNR in the masks over all cases: (ours − the better of Telea and NS, grain)."""
    sq = {"ours": 0.0, "telea": 0.0, "ns": 0.0}
    n = 0
    hp_in = hp_ring = 0.0
    for clean, image, mask in cases:
        ours = heal_image(image, mask)
        for name, out in (("ours", ours), ("telea", telea(image, mask)), ("ns", ns(image, mask))):
            sq[name] += float(((out - clean)[mask].astype(np.float64) ** 2).sum())
        n += int(mask.sum()) * 3
        g = grain_ratio(ours, mask)
        hp_in += g * g
        hp_ring += 1.0
    psnr = {k: 10 * math.log10(n / v) for k, v in sq.items()}
    return psnr["ours"] - max(psnr["telea"], psnr["ns"]), math.sqrt(hp_in / hp_ring)


def test_opaque_blobs_on_a_photo_beat_the_smooth_fill_by_a_margin() -> None:
    # Pooled over 10 crops (large blobs dominate, as in the healing bench's film rows):
    # +3.0 dB over the better of Telea and NS; the fill before issue 6 (structure from
    # patches blurred at sigma 2, α read against a grainy fill) made +2.1 dB.
    cases = []
    for clean, rng in photo_crops(10, 192, seed=200):
        image, mask = blob_damage(clean, rng, 20)
        cases.append((clean, image, mask))
    gain, grain = pooled_gain(cases)
    assert gain >= 2.6, f"pooled gain over the smooth fill {gain:+.2f} dB"
    assert 0.8 <= grain <= 1.2, f"grain ratio {grain:.2f}"


def test_thin_hairs_on_a_busy_photo_stay_near_the_smooth_fill() -> None:
    # Known weak spot: across a 1–2 px hair on fine texture a smooth fill is hard to beat
    # in PSNR (the fill's grain and texture guesses cost more than they win). Now -0.9 dB
    # against the better of Telea and NS; before issue 6 it was -1.8 dB.
    cases = []
    for clean, rng in photo_crops(10, 256, seed=100):
        dmg = synth.add_film_damage(clean, rng, None, count=30, grain=0.0)
        image = np.round(np.clip(dmg.image, 0, 1) * 255).astype(np.float32) / 255
        cases.append((clean, image, dmg.mask))
    gain, grain = pooled_gain(cases)
    assert gain >= -1.35, f"pooled gain over the smooth fill {gain:+.2f} dB"
    assert 0.65 <= grain <= 1.2, f"grain ratio {grain:.2f}"


def test_early_rejections_agree_with_the_full_fit() -> None:
    # raw_verdict's "tinted" and "too dark" only skip fits that would say no anyway
    checked = 0
    for clean, rng in photo_crops(4, 192, seed=300):
        dmg = synth.add_film_damage(clean, rng, None, count=40, grain=0.0)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(dmg.mask.astype(np.uint8), connectivity=8)
        for i in range(1, n):
            region = labels == i
            geo = heal_flat.spot_geometry(dmg.mask, region)
            if geo is None or stats[i, cv2.CC_STAT_AREA] < 3:
                continue
            reason = heal_flat.raw_verdict(dmg.image, dmg.mask, region, geo)
            if reason not in ("tinted", "too dark"):
                continue
            for diffuse in (False, True):
                fit = heal_flat.fit_radial_shadow(dmg.image, dmg.mask, region, diffuse=diffuse)
                assert heal_flat._judge(dmg.image, region, fit).confidence == 0, (i, reason, diffuse)
            checked += 1
    assert checked >= 5


def test_a_bright_speck_is_never_a_shadow() -> None:
    # a white speck on blue sky with white clouds just beside it: the shadow fit's colour
    # rule could read it as cloud under a shadow; a shadow only ever takes light
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96]
    cloud = np.zeros((96, 96), np.float32)
    for cy, cx, r in ((64, 40, 9), (64, 60, 9)):
        cloud = np.maximum(cloud, np.clip((r - np.hypot(yy - cy, xx - cx)) / 3, 0, 1))
    sky = np.array([0.25, 0.55, 0.9], np.float32)
    clean = sky * (1 - cloud[..., None]) + np.float32(0.96) * cloud[..., None]
    clean = np.clip(clean + 0.01 * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)
    alpha = np.zeros((96, 96), np.float32)
    cv2.ellipse(alpha, (48, 42), (7, 4), 30, 0, 360, 0.92, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), 0.7)
    image = (clean * (1 - alpha[..., None]) + np.float32(0.95) * alpha[..., None]).astype(np.float32)
    mask = alpha > 0.25
    geo = heal_flat.spot_geometry(mask, mask)
    assert heal_flat.raw_verdict(image, mask, mask, geo) == "brighter"
    assert heal_flat.shadow_verdict(image, mask, mask).confidence == 0
    assert psnr_in(heal_image(image, mask), clean, mask) > 32


def busy_crops(count: int, size: int, seed: int) -> list[np.ndarray]:
    """The busiest of a few hundred crops of the sample photo (leaves, branches against
    the sky): where shadow fits fail and a fill would paint over the picture."""
    photo = synth.load_photo(sample_path(), 4096).astype(np.float32) / 255
    rng = np.random.default_rng(seed)
    cands = []
    for _ in range(300):
        y, x = int(rng.integers(0, photo.shape[0] - size)), int(rng.integers(0, photo.shape[1] - size))
        crop = np.ascontiguousarray(photo[y:y + size, x:x + size])
        lum = crop.mean(2)
        band = cv2.GaussianBlur(lum, (0, 0), 1.0) - cv2.GaussianBlur(lum, (0, 0), 2.5)
        cands.append((float(band.std()), y, x))
    cands.sort(reverse=True)
    return [np.ascontiguousarray(photo[y:y + size, x:x + size]) for _, y, x in cands[:count]]


def test_a_faint_shadow_on_a_busy_picture_is_not_painted_over() -> None:
    # Sensor dust taking 3–6 % of the light over leaves and branches: the shadow fits fail
    # on such a picture (they read it as brighter, or measure three times the shadow),
    # but the picture shows through as busy as around it, so no fill may replace it and
    # little light is given back. Before this check the error in the mask was 8 times
    # that of leaving the spots as they were; now 1.4 times.
    sq_ours = sq_left = 0.0
    for i, clean in enumerate(busy_crops(6, 96, seed=11)):
        field = SensorDustField([SensorSpot(0.5, 0.5, 15.0 + i, 0.05 + 0.006 * i)])
        dust = field.apply(clean, f_number=5.6)
        ours = heal_image(dust.image, dust.mask)
        sq_ours += float(((ours - clean)[dust.mask] ** 2).sum())
        sq_left += float(((dust.image - clean)[dust.mask] ** 2).sum())
    assert sq_ours <= 1.8 * sq_left, f"healed error {sq_ours:.3f} vs left as it was {sq_left:.3f}"


def test_opaque_dirt_with_a_texture_of_its_own_is_still_filled() -> None:
    # the other side of the see-through check: dirt stamps whose alpha varies inside, with
    # heavy grain on top, over busy crops, must not pass as pictures seen through a shadow
    stamps = synth.StampSet.load(synth.default_stamps_dir()) if synth.default_stamps_dir() else None
    if stamps is None:
        pytest.skip("the dust stamps are not beside this checkout")
    rng = np.random.default_rng(5)
    judged = 0
    for clean in busy_crops(12, 128, seed=12):
        for _ in range(4):
            kind = ("dirt", "smut", "stain", "spots")[int(rng.integers(4))]
            _, raw = stamps.pick(rng, kind)
            a = synth._transform_stamp(raw, float(rng.uniform(14, 40)), rng, False) * float(rng.uniform(0.75, 1.0))
            alpha = np.zeros(clean.shape[:2], np.float32)
            synth._paste(alpha, a, 64 - a.shape[0] // 2, 64 - a.shape[1] // 2)
            tone = rng.uniform(0.0, 0.12, 3) if rng.random() < 0.5 else rng.uniform(0.88, 1.0, 3)
            image = clean * (1 - alpha[..., None]) + tone.astype(np.float32) * alpha[..., None]
            image = synth.add_grain(image.astype(np.float32), rng, 0.03).astype(np.float32)
            mask = alpha > synth.MASK_ALPHA
            n, labels = cv2.connectedComponents(mask.astype(np.uint8))
            for j in range(1, n):
                region = labels == j
                if region.sum() < 30:
                    continue
                judged += 1
                assert heal_flat.shadow_verdict(image, mask, region).reason != "see-through", (kind, j)
    assert judged >= 30



def test_unmixing_leaves_pixels_the_mixing_model_cannot_explain_to_the_fill() -> None:
    # Numbers from a real failure (a hair running from light grey into a darker band of a
    # held-out photo): the speck's tone, read where it shows most, is about the dark
    # band's own grey, so there α cannot be told; those pixels were unmixed anyway and
    # came out darker than the damaged pixels themselves (0.07 where the truth was 0.34).
    from healdust.heal_fill import unmix_speck

    rng = np.random.default_rng(0)
    n = 40
    fill_a = np.full((n, 3), 0.75, np.float32)
    seen_a = np.tile(np.float32([0.335, 0.314, 0.367]), (n, 1)) + 0.01 * rng.standard_normal((n, 3)).astype(np.float32)
    fill_b = np.tile(np.float32([0.34, 0.35, 0.32]), (n, 1))
    seen_b = np.tile(np.float32([0.166, 0.146, 0.199]), (n, 1)) + 0.01 * rng.standard_normal((n, 3)).astype(np.float32)
    seen = np.concatenate([seen_a, seen_b])
    fill = np.concatenate([fill_a, fill_b])
    grain = 0.005 * rng.standard_normal(fill.shape).astype(np.float32)
    out = unmix_speck(seen, fill, grain)
    # Since the tone is stretched (speck_tone) those pixels fit the model again, at α ≈ 0.8
    # of a darker tone, and are partly unmixed: RMS error 0.017 instead of 0.005, which the
    # +0.2 dB the stretch brings over bench/healing.py's film damage pays for.
    err = np.abs(out[n:] - fill_b)
    assert err.max() < 0.08 and float(np.sqrt(np.mean(err ** 2))) < 0.03, out[n:].mean(0)



def test_speck_tone_is_stretched_away_from_the_picture_but_not_past_the_limits() -> None:
    from healdust.heal_fill import TONE_BRIGHT, TONE_DARK, TONE_STRETCH, speck_tone

    fill = np.full((20, 3), 0.6, np.float32)
    # a core seen at 0.4 over a 0.6 picture: stretched by TONE_STRETCH towards black
    tone = speck_tone(np.full((20, 3), 0.4, np.float32), fill)
    assert np.allclose(tone, 0.6 - TONE_STRETCH * 0.2, atol=1e-5)
    # nearly dark enough already: stops at TONE_DARK
    tone = speck_tone(np.full((20, 3), TONE_DARK + 0.02, np.float32), fill)
    assert abs(float(tone.mean()) - TONE_DARK) < 1e-5
    # darker than TONE_DARK: left as read; the same for bright specks
    assert np.allclose(speck_tone(np.full((20, 3), 0.05, np.float32), fill), 0.05)
    tone = speck_tone(np.full((20, 3), TONE_BRIGHT - 0.02, np.float32), fill)
    assert abs(float(tone.mean()) - TONE_BRIGHT) < 1e-5
    assert np.allclose(speck_tone(np.full((20, 3), 0.97, np.float32), fill), 0.97)


def test_unmixing_a_soft_speck_that_is_not_fully_opaque(monkeypatch) -> None:
    # A black speck at most 80 % opaque with a soft edge over a textured picture: with the
    # tone read from its core as it is (grey, not black), every α comes out too high and
    # less of the picture is recovered than with the stretched tone (about 7 % less error
    # here; 0.2 dB over the whole of bench/healing.py's film damage).
    import healdust.heal_fill as heal_fill

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[-12:13, -12:13]
    alpha = 0.8 * np.clip((7.0 - np.hypot(yy, xx)) / 4.0, 0.0, 1.0)
    sel = alpha > 0.25
    picture = 0.55 + 0.05 * rng.standard_normal(alpha.shape + (3,)).astype(np.float32)
    picture = cv2.GaussianBlur(picture, (0, 0), 1.0)
    seen = picture * (1 - alpha[..., None]) + 0.02 * alpha[..., None]
    fill = np.full_like(picture, 0.55)
    errors = {}
    for stretch in (1.0, heal_fill.TONE_STRETCH):
        monkeypatch.setattr(heal_fill, "TONE_STRETCH", stretch)
        out = heal_fill.unmix_speck(seen[sel].astype(np.float32), fill[sel])
        errors[stretch] = float(np.mean((out - picture[sel]) ** 2))
    assert errors[heal_fill.TONE_STRETCH] < 0.97 * errors[1.0], errors


def test_a_speck_inside_a_generous_mask_is_not_taken_for_see_through() -> None:
    # a hand-painted mask two px wider than the specks: its inside is mostly clean
    # picture, busy and bright enough to look see-through, but the speck shows in the
    # spot's colours and darkest pixels
    from tests.conftest import dusty_image

    for seed in (3, 4, 5):
        clean, dusty, core = dusty_image(128, seed=seed)
        painted = cv2.dilate(core.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        n, labels = cv2.connectedComponents(painted.astype(np.uint8))
        for j in range(1, n):
            region = labels == j
            if (region & core).sum() >= 4:
                assert heal_flat.shadow_verdict(dusty, painted, region).reason != "see-through", (seed, j)
        healed = heal_image(dusty, painted)
        assert np.abs(healed - clean)[core].mean() < 0.6 * np.abs(dusty - clean)[core].mean()
