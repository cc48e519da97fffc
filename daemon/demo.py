"""``healdust demo``: the whole job on the bundled sample photo, with known synthetic dust."""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from . import synth
from .imageio import LoadedImage, write_image, write_mask
from .metrics import score_masks

DEMO_SEED = 7
DEMO_MARKERS = 5


def sample_path() -> Path:
    return Path(str(resources.files("healdust") / "data" / "sample.jpg"))


def make_demo_image(seed: int = DEMO_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean, dusty, true mask): the sample with film dust of known ground truth."""
    clean = synth.load_photo(sample_path()).astype(np.float32) / 255
    rng = np.random.default_rng(seed)
    dmg = synth.add_film_damage(clean, rng, stamps=None, count=70, polarity="dark", grain=0.0)
    return clean, dmg.image, dmg.mask


def pick_markers(mask: np.ndarray, count: int = DEMO_MARKERS) -> list[dict]:
    """Circles around ``count`` of the true spots, as a user would mark them."""
    n, _, stats, cents = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    cands = [i for i in range(1, n) if 6 <= stats[i, cv2.CC_STAT_AREA] <= 400]
    cands.sort(key=lambda i: (cents[i][1], cents[i][0]))
    step = max(1, len(cands) // count)
    out = []
    for i in cands[::step][:count]:
        w, h = stats[i, cv2.CC_STAT_WIDTH], stats[i, cv2.CC_STAT_HEIGHT]
        out.append({"x": round(float(cents[i][0]), 1), "y": round(float(cents[i][1]), 1),
                    "r": round(float(0.5 * np.hypot(w, h) + 4), 1)})
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(1.0 / mse)


def run_demo(out_dir: Path, endpoint: str | None = None, local: bool = False) -> int:
    from .cli import StageProgress, connect, heal_locally, heal_via_daemon

    out_dir.mkdir(parents=True, exist_ok=True)
    clean, dusty, truth = make_demo_image()
    dusty8 = np.clip(np.rint(dusty * 255), 0, 255).astype(np.uint8)
    markers = {"dust": pick_markers(truth), "not_dust": []}
    write_image(out_dir / "before.png", dusty8, "RGB")
    write_mask(out_dir / "true-mask.png", truth)
    (out_dir / "markers.json").write_text(json.dumps(markers, indent=1))
    n_true = int(cv2.connectedComponents(truth.astype(np.uint8))[0] - 1)
    print(f"sample {dusty8.shape[1]}x{dusty8.shape[0]} with {n_true} synthetic dust spots; "
          f"{len(markers['dust'])} of them marked")

    img = LoadedImage(dusty8, "RGB")
    fields = {"markers": markers, "mode": "transfer"}
    progress = StageProgress()
    try:
        if local:
            res = heal_locally(img, fields, None, progress)
        else:
            client = connect(endpoint)
            try:
                print(f"daemon at {client.endpoint}")
                res = heal_via_daemon(client, img, fields, None, progress)
            finally:
                client.close()
    finally:
        progress.close()
    mask = res["mask_pixels"] > 0
    healed = res["healed_pixels"]
    write_mask(out_dir / "mask.png", mask)
    write_image(out_dir / "after.png", healed, "RGB")

    s = score_masks(mask, truth)
    clean8 = np.clip(np.rint(clean * 255), 0, 255).astype(np.uint8)
    inside = truth
    before_psnr = psnr(dusty8[inside] / 255.0, clean8[inside] / 255.0)
    after_psnr = psnr(healed[inside] / 255.0, clean8[inside] / 255.0)
    outside = ~cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    untouched = bool(np.array_equal(healed[outside], dusty8[outside]))
    secs = res.get("seconds") or {}
    for note in res.get("notes") or []:
        print(note)
    print(f"model {res['model']}, threshold {res['threshold']:.2f}; "
          + ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()))
    print(f"spots: found {res['spots']}; precision {s.spot_precision:.3f}, recall {s.spot_recall:.3f}, "
          f"F1 {s.spot_f1:.3f}")
    print(f"pixels: precision {s.pixels.precision:.3f}, recall {s.pixels.recall:.3f}, F1 {s.pixels.f1:.3f}")
    print(f"inside the true dust: PSNR {before_psnr:.1f} dB before, {after_psnr:.1f} dB after; "
          f"pixels outside the mask untouched: {'yes' if untouched else 'NO'}")
    print(f"wrote {out_dir}/before.png, mask.png, after.png, true-mask.png, markers.json")
    sys.stdout.flush()
    return 0
