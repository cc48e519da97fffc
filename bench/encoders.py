"""Encoder choice: base models on different encoders, scored on the same held-out crops.

    python bench/encoders.py --base A.safetensors --base B.safetensors [--crops 12] [--photos DIR/heldout]

Each ``--base`` is a file ``healdust train-base`` wrote (``--encoder unet`` or
``--encoder mobilenetv2``; without ``--base``: the shipped model). All are scored on the
same held-out crops with the same markers, as ``bench/detection.py`` scores them: the base
model alone and transfer with 3 and 5 markers (the encoder frozen), then the detection
time per megapixel and the median fine-tune time. ``--ft pos_weight=1,patience=10`` scores
fine-tuning settings other than the defaults (``FineTuneConfig``) too (repeat to compare).

``--reuse N`` measures what a saved model meets next: N more pairs of crops per kind, the
same dust (same seed, so the same defects at the same places) over two different
held-out pictures; fine-tuned on markers in the first, the model is scored on the second
without markers, as ``--model NAME`` / ``auto`` uses it on the next frame of a shoot.

``--soft-image`` scores each base model alone on ``bench/speed.py``'s 6 MP image (the
bundled sample scaled up 2.3×, film dust, no grain): a soft picture, where a model that
takes soft blobs for sensor dust shows it.

``--card SEED`` scores each base model as ``healdust train-base`` scores it for its model
card (96 held-out crops of 256² per kind, threshold 0.5, no markers) with that seed, so
models from different runs meet on the same crops. ``--truth all`` scores against every
dust pixel, one spot per connected piece, as the benches and model cards first did.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from healdust import synth
from healdust.metrics import empty_scores
from healdust.model.arch import describe
from healdust.model.finetune import FineTuneConfig, fine_tune
from healdust.model.infer import predict_proba
from healdust.model.pretrain import evaluate
from healdust.model.unet import parameter_count
from healdust.store import load_base_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detection  # noqa: E402
from detection import add_truth_arg, make_case, parse_ft, pick_markers, score_detection  # noqa: E402


def score(models: dict, variants: dict, photos, stamps, crops: int, size: int, seed: int, precision: str,
          log, counts: tuple[int, ...] = (3, 5)) -> dict:
    out = {}
    for kind in ("film", "sensor"):
        rng = np.random.default_rng([seed, 0 if kind == "film" else 1])
        cases = [make_case(photos[i % len(photos)], kind, rng, size, stamps) for i in range(crops)]
        for img, truth in cases:
            markers = {n: pick_markers(truth, n, rng) for n in counts}
            for name, model in models.items():
                key = (kind, name, 0)
                out[key] = out.get(key, empty_scores()).add(score_detection(model, img, truth, precision=precision))
                for n, dust in markers.items():
                    for vname, cfg in variants.items():
                        res = fine_tune(model, img, "RGB", dust, mode="transfer", cfg=cfg)
                        key = (kind, name + vname, n)
                        out[key] = out.get(key, empty_scores()).add(
                            score_detection(res.model, img, truth, res.threshold, dust, precision=precision))
                        out.setdefault((kind, name + vname, "ft_s"), []).append(res.seconds)
                        out.setdefault((kind, name + vname, "ft_steps"), []).append(res.steps)
        log(f"# {kind} scored")
    return out


def make_reuse_pair(photo_a, photo_b, kind: str, rng: np.random.Generator, size: int, stamps):
    """The same damage (one seed) over a crop of each photo: (image a, its truth, image b,
    its truth): the dust is the same, what can be seen of it depends on the picture."""
    seed = int(rng.integers(2**31))
    (a, truth), (b, truth_b) = (make_case(photo, kind, rng, size, stamps, np.random.default_rng(seed))
                                for photo in (photo_a, photo_b))
    assert np.array_equal(truth.mask, truth_b.mask), "the same seed makes the same dust"
    return a, truth, b, truth_b


def score_reuse(models: dict, variants: dict, photos, stamps, pairs: int, size: int, seed: int,
                precision: str, log) -> dict:
    out = {}
    for kind in ("film", "sensor"):
        rng = np.random.default_rng([seed, 7, 0 if kind == "film" else 1])
        for i in range(pairs):
            a, truth, b, truth_b = make_reuse_pair(photos[i % len(photos)], photos[(i + 1) % len(photos)], kind, rng,
                                          size, stamps)
            markers = {n: pick_markers(truth, n, rng) for n in (3, 5)}
            for name, model in models.items():
                key = (kind, name, 0, "next")
                out[key] = out.get(key, empty_scores()).add(score_detection(model, b, truth_b, precision=precision))
                for n, dust in markers.items():
                    for vname, cfg in variants.items():
                        res = fine_tune(model, a, "RGB", dust, mode="transfer", cfg=cfg)
                        for where, img, t, d in (("same", a, truth, dust), ("next", b, truth_b, None)):
                            key = (kind, name + vname, n, where)
                            out[key] = out.get(key, empty_scores()).add(
                                score_detection(res.model, img, t, res.threshold, d, precision=precision))
        log(f"# {kind}: reuse scored")
    return out


def seconds_per_mp(model, precision: str, size: int = 1024, repeats: int = 2) -> float:
    img = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    predict_proba(model, img[:256, :256], "RGB", precision=precision)
    t = time.perf_counter()
    for _ in range(repeats):
        predict_proba(model, img, "RGB", precision=precision)
    return (time.perf_counter() - t) / repeats / (size * size / 1e6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", action="append", default=None, help="a base model file (repeat to compare)")
    ap.add_argument("--photos", type=Path, default=Path("/work/photoset/heldout"))
    ap.add_argument("--crops", type=int, default=12, help="held-out crops per damage kind")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--seed", type=int, default=2027)
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--reuse", type=int, default=0, metavar="N",
                    help="also score N pairs per kind: fine-tuned on one picture, used on the next")
    ap.add_argument("--skip-main", action="store_true", help="only the --reuse pairs (and --soft-image)")
    ap.add_argument("--soft-image", action="store_true", help="score the base models on a soft, upscaled picture")
    ap.add_argument("--markers", default="3,5", help="marker counts to fine-tune on (comma-separated)")
    ap.add_argument("--ft", action="append", default=None, metavar="KEY=VALUE,...",
                    help="fine-tuning settings to score besides the defaults (repeat to compare)")
    ap.add_argument("--card", type=int, action="append", default=None, metavar="SEED",
                    help="also score the base models as their model cards do (96 held-out crops of 256² per "
                         "kind, threshold 0.5, no markers) with this seed (repeat for more)")
    add_truth_arg(ap)
    args = ap.parse_args(argv)
    detection.TRUTH = args.truth
    variants = {"": FineTuneConfig()}
    variants.update({f" [{t}]": parse_ft(t) for t in args.ft or []})

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    models, metas = {}, {}
    for path in args.base or [None]:
        model, meta = load_base_model(path, torch.device("cpu"))
        name = meta["id"] if meta["id"] not in models else f"{meta['id']} ({Path(path).stem})"
        models[name], metas[name] = model, meta
    stamps = synth.StampSet.load(synth.default_stamps_dir())
    held = [synth.load_photo(p, 1600) for p in synth.list_photos(args.photos)]
    rows = [(name + v) for name in models for v in variants]
    if args.card:
        card_photos = [synth.load_photo(p) for p in synth.list_photos(args.photos)]
        print(f"\nAs the model cards score (96 held-out crops of 256² per kind, threshold 0.5, no markers; "
              f"truth: {detection.TRUTH_NOTE[detection.TRUTH]}): spot P / R / F1, pixel F1\n")
        print("| model | seed | film | sensor |")
        print("|---|---|---|---|")
        for name, model in models.items():
            for seed in args.card:
                m = evaluate(model, card_photos, stamps, 96, seed, torch.device("cpu"), truth=detection.TRUTH)
                print(f"| {name} | {seed} | " + " | ".join(
                    f"{v['spot_precision']:.3f} / {v['spot_recall']:.3f} / {v['spot_f1']:.3f}, {v['pixel_f1']:.3f}"
                    for v in (m["film"], m["sensor"])) + " |")
        sys.stdout.flush()
    if args.soft_image:
        from speed import image_shape, make_image

        truth = np.zeros(image_shape(6), bool)
        img = make_image(6, 8, truth=truth)
        print(f"\nSoft picture: bench/speed.py's {img.shape[1]}x{img.shape[0]} image, "
              f"{100 * truth.mean():.2f} % dust; base models alone, {args.precision}\n")
        print("| model | spot P | spot R | spot F1 | flagged % |")
        print("|---|---|---|---|---|")
        for name, model in models.items():
            s = score_detection(model, img, truth, precision=args.precision)
            flagged = (s.pixels.tp + s.pixels.fp) / truth.size
            print(f"| {name} | {s.spot_precision:.3f} | {s.spot_recall:.3f} | {s.spot_f1:.3f} | {100 * flagged:.2f} |")
        sys.stdout.flush()
    if args.reuse:
        reuse = score_reuse(models, variants, held, stamps, args.reuse, args.size, args.seed, args.precision, log)
        print(f"\nReuse: {args.reuse} pairs of {args.size}x{args.size} crops per kind, the same dust over two "
              f"held-out pictures; markers in the first; spot P / R / F1 on the first (with its markers) "
              f"and on the second (no markers).\n")
        print("| damage | model | markers | first P / R / F1 | next P / R / F1 |")
        print("|---|---|---|---|---|")
        for kind in ("film", "sensor"):
            for name in models:
                s = reuse[(kind, name, 0, "next")]
                print(f"| {kind} | {name} | 0 | | {s.spot_precision:.3f} / {s.spot_recall:.3f} / {s.spot_f1:.3f} |")
            for n in (3, 5):
                for name in rows:
                    cells = [reuse[(kind, name, n, w)] for w in ("same", "next")]
                    print(f"| {kind} | {name} | {n} | " + " | ".join(
                        f"{c.spot_precision:.3f} / {c.spot_recall:.3f} / {c.spot_f1:.3f}" for c in cells) + " |")
        sys.stdout.flush()
    if args.skip_main:
        return 0
    counts = tuple(int(n) for n in args.markers.split(","))
    scores = score(models, variants, held, stamps, args.crops, args.size, args.seed, args.precision, log, counts)
    speed = {name: seconds_per_mp(m, args.precision) for name, m in models.items()}

    print(f"\nEncoders on {args.crops} held-out {args.size}x{args.size} crops per kind; "
          f"{platform.machine()}, {torch.get_num_threads()} threads, {args.precision} detection; "
          f"truth: {detection.TRUTH_NOTE[detection.TRUTH]}.\n")
    for name, meta in metas.items():
        trained = sum(st["steps"] for st in meta["train"].get("stages") or [meta["train"]])
        print(f"- {name}: {describe(meta['config'])}; {parameter_count(models[name]):,} parameters; "
              f"{trained} pretraining steps")
    print("\n| damage | model | markers | spot P | spot R | spot F1 | pixel F1 |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("film", "sensor"):
        for n in (0, *counts):
            for name in (models if n == 0 else rows):
                s = scores[(kind, name, n)]
                print(f"| {kind} | {name} | {n} | {s.spot_precision:.3f} | {s.spot_recall:.3f} | "
                      f"{s.spot_f1:.3f} | {s.pixels.f1:.3f} |")
    print()
    for name in models:
        print(f"{name}: detection {speed[name]:.2f} s/MP ({args.precision}, 1024 px image)")
    for name in rows:
        ft = scores[("film", name, "ft_s")] + scores[("sensor", name, "ft_s")]
        steps = scores[("film", name, "ft_steps")] + scores[("sensor", name, "ft_steps")]
        print(f"{name}: fine-tune median {np.median(ft):.1f} s (max {max(ft):.1f}), "
              f"{np.median(steps):.0f} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
