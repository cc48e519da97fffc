"""bf16 against fp32 detection: the same held-out crops scored both ways.

    python bench/precision.py [--crops 40] [--tuned 10] [--photos DIR/heldout]

Spot and pixel scores of the base model alone on ``--crops`` crops of 384 px per damage
kind, and after transfer fine-tuning on 5 markers on the first ``--tuned`` of them (the
fine-tuning itself is fp32 either way), each detected in fp32 and in bf16; then the
largest probability difference and how many pixels flip at the threshold. bf16 runs on
any CPU; only on one with AMX or AVX-512 BF16 (or on CUDA) is it faster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from healdust import synth
from healdust.metrics import empty_scores
from healdust.model.finetune import fine_tune
from healdust.model.infer import predict_proba
from healdust.pipeline import decide_mask
from healdust.store import load_base_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detection  # noqa: E402
from detection import add_truth_arg, make_case, pick_markers, score_truth  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=Path, default=Path("/work/photoset/heldout"))
    ap.add_argument("--crops", type=int, default=40)
    ap.add_argument("--tuned", type=int, default=10)
    ap.add_argument("--seed", type=int, default=99)
    add_truth_arg(ap)
    args = ap.parse_args(argv)
    detection.TRUTH = args.truth
    base, meta = load_base_model(device=torch.device("cpu"))
    photos = [synth.load_photo(p, 1600) for p in synth.list_photos(args.photos)]
    stamps = synth.StampSet.load(synth.default_stamps_dir())
    print(f"base model {meta['id']}; {torch.get_num_threads()} threads\n")
    for kind in ("film", "sensor"):
        rng = np.random.default_rng([args.seed, 0 if kind == "film" else 1])
        scores, maxdiff, flips, pixels = {}, 0.0, 0, 0
        for i in range(args.crops):
            img, truth = make_case(photos[i % len(photos)], kind, rng, 384, stamps)
            models = [("base", base, 0.5, None)]
            if i < args.tuned:
                dust = pick_markers(truth, 5, rng)
                res = fine_tune(base, img, "RGB", dust, mode="transfer")
                models.append(("5 markers", res.model, res.threshold, dust))
            for name, model, threshold, dust in models:
                probs = {}
                for precision in ("fp32", "bf16"):
                    prob = predict_proba(model, img, "RGB", precision=precision)
                    probs[precision] = prob
                    mask, _ = decide_mask(prob, threshold, img if dust else None, "RGB", dust)
                    key = (name, precision)
                    scores[key] = scores.get(key, empty_scores()).add(score_truth(mask, truth))
                maxdiff = max(maxdiff, float(np.abs(probs["fp32"] - probs["bf16"]).max()))
                flips += int(((probs["fp32"] > threshold) != (probs["bf16"] > threshold)).sum())
                pixels += probs["fp32"].size
        for (name, precision), s in sorted(scores.items()):
            print(f"{kind} | {name} | {precision} | spot P {s.spot_precision:.3f} R {s.spot_recall:.3f} "
                  f"F1 {s.spot_f1:.3f} | pixel F1 {s.pixels.f1:.3f}")
        print(f"{kind}: max |p_fp32 - p_bf16| {maxdiff:.4f}; {flips} of {pixels} pixels flip at the threshold\n",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
