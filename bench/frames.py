"""Detection on whole frames with as much dust as a real one carries.

    python bench/frames.py [--photos DIR/heldout] [--markers 3,5] [--film-defects 200] [--sensor-spots 12]

``bench/detection.py`` scores 384² crops that carry far more dust per megapixel than a
real frame: film 25–45 defects per crop (about 230 per MP, as a real scan at 1–1.5 MP),
but sensor dust 12–20 spots per crop, some 100 per MP, where a real sensor puts a
handful to a few dozen on the whole frame. Precision depends on that density: false
alarms come per megapixel of picture, true spots per defect. Here every held-out photo
is used whole, at its own size (4–20 MP; ``--max-side`` scales it down), with
``--film-defects`` film defects (a real scan: 100–300 per frame) or ``--sensor-spots``
sensor spots per frame, and scored as the daemon decides its mask (the same 1 % cap),
for the base model alone and after transfer fine-tuning on 3 and 5 markers. Truth as in
the other benches (``--truth``).

``--not-dust K`` adds what a user does next: after the fine-tune on the most markers,
circle the K largest false alarms of its mask as "not dust" and fine-tune again (from
the base model, with the dust markers and those), as the daemon does with both kinds.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from healdust import synth
from healdust.metrics import empty_scores, predicted_spots
from healdust.model.finetune import fine_tune
from healdust.store import load_base_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detection  # noqa: E402
from detection import (  # noqa: E402
    add_spot_filter_arg,
    add_truth_arg,
    detect_crop,
    filter_variants,
    filtered,
    pick_markers,
    score_mask,
)


def largest_false_alarms(mask: np.ndarray, dmg, k: int) -> list[tuple[float, float, float]]:
    """Circles (x, y, r) around the k largest predicted spots that ``score_masks`` calls
    false alarms: what a user circles as not dust."""
    seen = detection.TRUTH == "seen"
    stats, cents, good, counted = predicted_spots(mask, detection.truth_mask(dmg),
                                                  ignore=dmg.ignore if seen else None)
    false = np.nonzero(counted & ~good)[0]
    false = false[np.argsort(-stats[false, cv2.CC_STAT_AREA], kind="stable")][:k]
    return [(float(cents[i][0]), float(cents[i][1]), float(0.5 * np.hypot(stats[i, 2], stats[i, 3]) + 3))
            for i in false]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=Path, default=Path("/work/photoset/heldout"))
    ap.add_argument("--base", default=None, help="a base model file (default: the shipped one)")
    ap.add_argument("--markers", default="3,5", help="marker counts to fine-tune on (comma-separated)")
    ap.add_argument("--film-defects", type=int, default=200, help="film defects per frame")
    ap.add_argument("--sensor-spots", type=int, default=12, help="sensor dust spots per frame")
    ap.add_argument("--max-side", type=int, default=0, help="scale frames down to this long side (0: as they are)")
    ap.add_argument("--seed", type=int, default=77)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--not-dust", type=int, default=0, metavar="K",
                    help="also fine-tune again with the K largest false alarms circled as not dust")
    add_truth_arg(ap)
    add_spot_filter_arg(ap, both=True)
    args = ap.parse_args(argv)
    detection.TRUTH = args.truth
    counts = tuple(int(n) for n in args.markers.split(",") if n)
    base, meta = load_base_model(args.base, torch.device("cpu"))
    filters = filter_variants(meta, args.spot_filter)
    paths = synth.list_photos(args.photos)
    if not paths:
        raise SystemExit(f"no photos in {args.photos} (make them with bench/photos.py)")
    stamps_dir = synth.default_stamps_dir()
    stamps = synth.StampSet.load(stamps_dir) if stamps_dir else None
    t0 = time.monotonic()
    rows = []
    for kind in ("film", "sensor"):
        scores, megapixels = {}, 0.0
        for i, path in enumerate(paths):
            rng = np.random.default_rng([args.seed, i, 0 if kind == "film" else 1])
            photo = synth.load_photo(path, args.max_side or 1 << 16).astype(np.float32) / 255
            mp = photo.shape[0] * photo.shape[1] / 1e6
            megapixels += mp
            if kind == "film":
                dmg = synth.add_film_damage(photo, rng, stamps, count=args.film_defects)
            else:
                dmg = synth.add_sensor_dust(photo, rng, count=args.sensor_spots)
            img = np.clip(np.rint(dmg.image * 255), 0, 255).astype(np.uint8)

            def add(key, mask, dust=None, scores=scores, img=img, dmg=dmg):
                for name, sf in filters.items():
                    k = f"{key}{name}"
                    scores[k] = scores.get(k, empty_scores()).add(score_mask(filtered(mask, img, sf, dust), dmg))

            add(0, detect_crop(base, img, precision=args.precision))
            for n in counts:
                dust = pick_markers(dmg, n, rng)
                res = fine_tune(base, img, "RGB", dust, mode="transfer")
                mask = detect_crop(res.model, img, res.threshold, dust, precision=args.precision)
                add(n, mask, dust)
            if args.not_dust and counts:
                n = max(counts)
                # what the user sees: the mask after the filter, when there is one
                shown = filtered(mask, img, list(filters.values())[-1], dust)
                not_dust = largest_false_alarms(shown, dmg, args.not_dust)
                res2 = fine_tune(base, img, "RGB", dust, not_dust, mode="transfer")
                add(f"{n} + {len(not_dust)} not dust",
                    detect_crop(res2.model, img, res2.threshold, dust, precision=args.precision), dust)
        rows += [(kind, n, s, megapixels) for n, s in scores.items()]
        print(f"# {kind}: done ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)

    size = f"long side {args.max_side} px" if args.max_side else "as they are"
    print(f"\nWhole frames: {len(paths)} held-out photos ({size}; {megapixels:.0f} MP in all), "
          f"{args.film_defects} film defects or {args.sensor_spots} sensor dust spots per frame; base model "
          f"{meta['id']}; {platform.machine()}, {torch.get_num_threads()} threads; the daemon's mask "
          f"(capped at 1 %); spot filter: {args.spot_filter}; truth: {detection.TRUTH_NOTE[detection.TRUTH]}\n")
    print("| damage | markers | true spots | spot P | spot R | spot F1 | false alarms per MP | pixel F1 |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, n, s, mp in rows:
        true = s.spots_true.tp + s.spots_true.fn
        print(f"| {kind} | {n} | {true} | {s.spot_precision:.3f} | {s.spot_recall:.3f} | {s.spot_f1:.3f} | "
              f"{s.spots_pred.fp / mp:.0f} | {s.pixels.f1:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
