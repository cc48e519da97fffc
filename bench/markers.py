"""Marker labelling: how well the pixels labelled dust inside a marker match its defect.

    python bench/markers.py [--images 18] [--seed 9] [--photos DIR/heldout]

A marker circles one defect (``pick_markers``: a true spot, circled with some slack as a
user would); fine-tuning and the final mask take as dust the pixels
``dust_inside_marker`` picks inside it. For 5 markers on each of ``--images`` held-out
crops of 256² per damage kind this prints the mean IoU of those pixels with the true
defect inside the circle, and the share of markers whose label misses it (IoU < 0.1),
with the base model's help (transfer fine-tuning, the mask) and without (scratch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from healdust import synth
from healdust.imageio import to_float
from healdust.model.finetune import disc_mask, dust_inside_marker
from healdust.model.infer import predict_proba
from healdust.store import load_base_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detection  # noqa: E402
from detection import add_truth_arg, make_case, pick_markers, truth_mask  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", default="/work/photoset/heldout", help="held-out clean photos")
    ap.add_argument("--images", type=int, default=18, help="crops per damage kind")
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--base", default=None, help="base model weights (default: the shipped model)")
    add_truth_arg(ap)
    args = ap.parse_args(argv)
    detection.TRUTH = args.truth
    base, meta = load_base_model(args.base, torch.device("cpu"))
    photos = [synth.load_photo(p) for p in synth.list_photos(args.photos)]
    if not photos:
        raise SystemExit(f"no photos in {args.photos} (make them with bench/photos.py)")
    stamps_dir = synth.default_stamps_dir()
    stamps = synth.StampSet.load(stamps_dir) if stamps_dir else None
    rng = np.random.default_rng(args.seed)
    print(f"marker labels, base model {meta['id']}, {args.images} crops of 256² x 5 markers per kind, "
          f"seed {args.seed}; truth: {detection.TRUTH_NOTE[detection.TRUTH]}\n")
    print("| damage | base model's help | markers | mean IoU | missed (IoU < 0.1) |")
    print("|---|---|---|---|---|")
    for kind in ("film", "sensor"):
        iou = {True: [], False: []}
        for i in range(args.images):
            img, truth = make_case(photos[i % len(photos)], kind, rng, 256, stamps)
            prob = predict_proba(base, img, "RGB", precision="fp32")
            rgb = to_float(img)
            seen = truth_mask(truth)
            for x, y, r in pick_markers(truth, 5, rng):
                disc = disc_mask(seen.shape, y, x, r)
                t = seen & disc
                for helped in (True, False):
                    d = dust_inside_marker(rgb, y, x, r, prob if helped else None) & disc
                    iou[helped].append((d & t).sum() / max(1, (d | t).sum()))
        for helped in (True, False):
            v = np.array(iou[helped])
            print(f"| {kind} | {'yes' if helped else 'no'} | {len(v)} | {v.mean():.3f} | {np.mean(v < 0.1):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
