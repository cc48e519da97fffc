"""Detection quality: the seed's transfer-vs-scratch table, measured.

    python bench/detection.py [--photos DIR/heldout] [--images N] [--plot bench/out/loss_curves.png]

On held-out photos (never trained on; make them with ``python bench/photos.py DIR``) with
synthetic film damage and sensor dust of exact ground truth, prints spot-level and
pixel-level precision / recall / F1 for the base model alone (0 markers) and after
fine-tuning on 3, 5 and 10 markers, transfer vs scratch; the fine-tune time for 5 markers;
and plots the fine-tuning loss per epoch (one epoch = one pass over the marker crops).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from healdust import pipeline, synth
from healdust.metrics import empty_scores, score_damage, score_masks, spot_labels
from healdust.model.finetune import FineTuneConfig, fine_tune
from healdust.model.infer import predict_proba, use_bf16
from healdust.pipeline import decide_mask, load_spot_filter
from healdust.spots import apply_filter
from healdust.store import load_base_model

MARKER_COUNTS = (3, 5, 10)
# What the benches score against: "seen" (the dust that can be seen, one spot per defect,
# dust too faint to see ignored) or "all" (every dust pixel, one spot per connected piece:
# the benches' first truth). ``--truth`` sets it.
TRUTH = "seen"
TRUTH_NOTE = {"seen": "the dust that can be seen, one spot per defect, dust too faint to see ignored",
              "all": "every dust pixel, one spot per connected piece"}


def make_case(photo: np.ndarray, kind: str, rng: np.random.Generator, size: int, stamps,
              damage_rng: np.random.Generator | None = None):
    """A held-out crop with synthetic damage: (uint8 image, ``synth.Damage`` for its truth).
    ``damage_rng`` (default ``rng``) draws the damage alone: the same seed there puts the
    same dust over any picture."""
    crop = np.ascontiguousarray(synth.random_crop(photo, size, rng, scale_range=(0.5, 1.0)))
    drng = rng if damage_rng is None else damage_rng
    if kind == "film":
        dmg = synth.add_film_damage(crop, drng, stamps, count=int(drng.integers(25, 45)))
    else:
        dmg = synth.add_sensor_dust(crop, drng, count=int(drng.integers(12, 20)))
    return np.clip(np.rint(dmg.image * 255), 0, 255).astype(np.uint8), dmg


def truth_mask(truth) -> np.ndarray:
    """The true dust pixels of a ``synth.Damage`` as ``TRUTH`` says, or a bool mask as it is."""
    if isinstance(truth, np.ndarray):
        return truth
    return truth.mask if TRUTH == "all" else truth.truth


def true_spots(truth) -> tuple[int, np.ndarray]:
    """(count + 1, labels): the true spots, one label each (0 elsewhere): the defects that
    can be seen, or for ``TRUTH`` "all" and plain masks the connected pieces."""
    if isinstance(truth, np.ndarray) or TRUTH == "all":
        return spot_labels(truth_mask(truth))
    return spot_labels(truth.truth, truth.instances)


def score_truth(mask: np.ndarray, truth):
    """``score_masks`` against a bool mask, or against a ``synth.Damage`` as ``TRUTH`` says."""
    if isinstance(truth, np.ndarray) or TRUTH == "all":
        return score_masks(mask, truth_mask(truth))
    return score_damage(mask, truth)


def pick_markers(truth, n: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """n true spots of 3 px or more, chosen at random, circled with some slack as a user
    would: (x, y, radius) around each one's pixels."""
    k, lab = true_spots(truth)
    area = np.bincount(lab.ravel(), minlength=k)
    cands = [i for i in range(1, k) if area[i] >= 3]
    chosen = rng.choice(cands, size=min(n, len(cands)), replace=False)
    out = []
    for i in chosen:
        ys, xs = np.nonzero(lab == i)
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        out.append((float(xs.mean()), float(ys.mean()), float(0.5 * np.hypot(w, h) + rng.uniform(3, 8))))
    return out


def parse_ft(text: str) -> FineTuneConfig:
    """``key=value,...`` over the default FineTuneConfig."""
    fields = {f.name: f.type for f in dataclasses.fields(FineTuneConfig)}
    changes = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        if k not in fields:
            raise SystemExit(f"--ft: unknown setting {k!r} (one of {', '.join(fields)})")
        changes[k] = float(v) if fields[k] in (float, "float") else int(v)
    return dataclasses.replace(FineTuneConfig(), **changes)


# true spots below this many pixels count as small in the recall-by-size table
SMALL_SPOT = 6


def recall_by_size(mask: np.ndarray, truth, tolerance: int = 2) -> np.ndarray:
    """[small found, small, larger found, larger]: true spots (``true_spots``) under / from
    ``SMALL_SPOT`` px, found as ``score_masks`` finds them (a detected pixel within
    ``tolerance`` px)."""
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    near = cv2.dilate(mask.astype(np.uint8), k).ravel()
    n, lab = true_spots(truth)
    if n < 2:
        return np.zeros(4, np.int64)
    hit = np.bincount(lab.ravel(), weights=near, minlength=n)[1:] > 0
    small = np.bincount(lab.ravel(), minlength=n)[1:] < SMALL_SPOT
    return np.array([(hit & small).sum(), small.sum(), (hit & ~small).sum(), (~small).sum()], np.int64)


def detect_crop(model, img: np.ndarray, threshold: float = 0.5, dust: list | None = None, device="cpu",
                precision: str = "auto") -> np.ndarray:
    """The mask as the daemon decides it before its spot filter (the marked spots join it
    when there are markers)."""
    prob = predict_proba(model, img, "RGB", device, precision=precision)
    return decide_mask(prob, threshold, img if dust else None, "RGB", dust)[0]


def filtered(mask: np.ndarray, img: np.ndarray, spot_filter, dust: list | None = None) -> np.ndarray:
    """``mask`` after the spot filter (a copy), as the daemon clears spots; unchanged without one."""
    if spot_filter is None:
        return mask
    mask = mask.copy()
    apply_filter(img, "RGB", mask, spot_filter, dust)
    return mask


def score_mask(mask: np.ndarray, truth, sizes: np.ndarray | None = None):
    """Scores of one decided mask; ``sizes``, if given, accumulates ``recall_by_size``."""
    if sizes is not None:
        sizes += recall_by_size(mask, truth)
    return score_truth(mask, truth)


def score_detection(model, img: np.ndarray, truth, threshold: float = 0.5,
                    dust: list | None = None, device="cpu", precision: str = "auto",
                    sizes: np.ndarray | None = None, spot_filter=None):
    """Detect on one crop and score the mask as the daemon would decide it (the marked
    spots join the mask when there are markers; ``spot_filter`` clears spots as the
    daemon's does). The one place the benches score a crop. ``truth``: a bool mask or a
    ``synth.Damage`` (``score_truth``); ``sizes``, if given, accumulates ``recall_by_size``."""
    mask = filtered(detect_crop(model, img, threshold, dust, device, precision), img, spot_filter, dust)
    return score_mask(mask, truth, sizes)


def filter_variants(meta: dict, choice: str) -> dict:
    """{label suffix: spot filter or None} to score each mask with, for ``--spot-filter``
    ``choice``: the base model's filter as the daemon loads it (on), none (off), or both
    ("" without, " + filter" with)."""
    sf = load_spot_filter(meta)[0]
    if choice != "off" and sf is None:
        raise SystemExit("the base model has no spot filter: --spot-filter off")
    return {"": None} if choice == "off" else {"": sf} if choice == "on" else {"": None, " + filter": sf}


def add_spot_filter_arg(ap: argparse.ArgumentParser, both: bool = False) -> None:
    ap.add_argument("--spot-filter", default="both" if both else "on",
                    choices=["on", "off", "both"] if both else ["on", "off"],
                    help="clear detected spots the base model's spot filter finds unlike dust, as the daemon "
                         "does (on), or not (off)" + ("; both: score each mask both ways" if both else ""))


def add_truth_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--truth", default=TRUTH, choices=["seen", "all"],
                    help="score against the dust that can be seen, one spot per defect (seen), or every "
                         "dust pixel, one spot per connected piece (all: the benches' first truth)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", default="/work/photoset/heldout", help="held-out clean photos")
    ap.add_argument("--stamps", default=None, help="dust stamps (default: ../shared/data/dust-stamps)")
    ap.add_argument("--images", type=int, default=4, help="test images per damage kind")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--plot", default="bench/out/loss_curves.png")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="detection arithmetic (healdust serve --precision); fine-tuning is fp32")
    ap.add_argument("--scratch-steps", type=int, default=FineTuneConfig.steps_scratch)
    ap.add_argument("--base", default=None, help="a base model file (default: the shipped one)")
    ap.add_argument("--ft", default="", metavar="KEY=VALUE,...",
                    help="fine-tune settings over the defaults, e.g. distill=1.0,negative_crops=32")
    ap.add_argument("--modes", default="transfer,scratch", help="fine-tune modes to run (comma-separated)")
    ap.add_argument("--max-dust-fraction", type=float, default=None, metavar="F",
                    help=f"the mask's cap as the daemon's (default {pipeline.MAX_DUST_FRACTION}; 1 = none)")
    add_truth_arg(ap)
    add_spot_filter_arg(ap, both=True)
    args = ap.parse_args(argv)
    global TRUTH
    TRUTH = args.truth

    device = torch.device(args.device)
    if args.max_dust_fraction is not None:
        pipeline.MAX_DUST_FRACTION = args.max_dust_fraction
    base, meta = load_base_model(args.base, device=device)
    photos = [synth.load_photo(p, 1600) for p in synth.list_photos(args.photos)]
    if not photos:
        print(f"no photos in {args.photos}; run: python bench/photos.py DIR", file=sys.stderr)
        return 1
    stamps_dir = args.stamps or synth.default_stamps_dir()
    stamps = synth.StampSet.load(stamps_dir) if stamps_dir else None
    cfg = dataclasses.replace(parse_ft(args.ft), steps_scratch=args.scratch_steps)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"transfer", "scratch"}:
        raise SystemExit("--modes: transfer and/or scratch")
    filters = filter_variants(meta, args.spot_filter)  # model labels: "base", "base + filter", ...
    rows, curves, ft_times, sizes = [], {}, {m: [] for m in modes}, {}
    t_all = time.monotonic()
    for kind in ("film", "sensor"):
        rng = np.random.default_rng([args.seed, 0 if kind == "film" else 1])
        cases = [make_case(photos[i % len(photos)], kind, rng, args.size, stamps) for i in range(args.images)]
        scores = {}

        def add(mode: str, n: int, mask: np.ndarray, img: np.ndarray, truth, dust, scores=scores,
                kind=kind) -> None:
            for name, sf in filters.items():
                key = (f"{mode}{name}", n)
                scores[key] = scores.get(key, empty_scores()).add(
                    score_mask(filtered(mask, img, sf, dust), truth,
                               sizes.setdefault((kind, *key), np.zeros(4, np.int64))))

        for img, truth in cases:
            add("base", 0, detect_crop(base, img, device=device, precision=args.precision), img, truth, None)
            for n in MARKER_COUNTS:
                dust = pick_markers(truth, n, rng)
                for mode in modes:
                    res = fine_tune(base, img, "RGB", dust, mode=mode, device=device, cfg=cfg)
                    add(mode, n, detect_crop(res.model, img, res.threshold, dust, device, args.precision),
                        img, truth, dust)
                    if n == 5:
                        ft_times[mode].append(res.seconds)
                        curves.setdefault((kind, mode), []).append(res.losses)
        for (mode, n), s in scores.items():
            rows.append((kind, mode, n, s))
        print(f"# {kind}: done ({time.monotonic() - t_all:.0f} s)", file=sys.stderr)

    print(f"\nDetection on {args.images} held-out {args.size}x{args.size} crops per kind "
          f"({', '.join(p.name for p in synth.list_photos(args.photos))}); base model {meta['id']}; "
          f"{platform.machine()}, {torch.get_num_threads()} threads, {device}, "
          f"{'bf16' if use_bf16(device, args.precision) else 'fp32'} detection; "
          f"fine-tune at most {cfg.steps_transfer} steps (transfer) / {cfg.steps_scratch} (scratch)"
          f"{'; settings ' + args.ft if args.ft else ''}; mask capped at "
          f"{pipeline.MAX_DUST_FRACTION:.0%} of a crop; spot filter: {args.spot_filter}; "
          f"truth: {TRUTH_NOTE[TRUTH]}\n")
    print("| damage | model | markers | spot P | spot R | spot F1 | pixel P | pixel R | pixel F1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    order = {f"{m}{f}": 2 * i + j for i, m in enumerate(("base", "transfer", "scratch")) for j, f in enumerate(filters)}
    for kind, mode, n, s in sorted(rows, key=lambda r: (r[0], r[2], order[r[1]])):
        print(f"| {kind} | {mode} | {n} | {s.spot_precision:.3f} | {s.spot_recall:.3f} | {s.spot_f1:.3f} | "
              f"{s.pixels.precision:.3f} | {s.pixels.recall:.3f} | {s.pixels.f1:.3f} |")
    print(f"\nSpot recall by size (true spots under {SMALL_SPOT} px against the rest)\n")
    lo, hi = f"< {SMALL_SPOT} px", f"≥ {SMALL_SPOT} px"
    print(f"| damage | model | markers | share of spots {lo} | recall {lo} | recall {hi} |")
    print("|---|---|---|---|---|---|")
    for kind, mode, n, _ in sorted(rows, key=lambda r: (r[0], r[2], order[r[1]])):
        hs, ns, hb, nb = sizes[(kind, mode, n)]
        print(f"| {kind} | {mode} | {n} | {ns / max(1, ns + nb):.2f} | "
              f"{hs / ns if ns else float('nan'):.3f} | {hb / nb if nb else float('nan'):.3f} |")
    for mode, ts in ft_times.items():
        print(f"\nfine-tune, 5 markers, {mode}: median {np.median(ts):.1f} s (min {min(ts):.1f}, max {max(ts):.1f})")
    steps_per_epoch = max(1, (5 * cfg.offsets_per_marker + cfg.negative_crops) * 8 // cfg.batch)
    if args.plot:
        # the raw curves first: a missing matplotlib must not lose a long run's curves
        raw = Path(args.plot).with_suffix(".json")
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps({f"{k}/{m}": v for (k, m), v in curves.items()}))
        print(f"\nloss curves (raw): {raw}")
        plot_curves(curves, steps_per_epoch, Path(args.plot))
        print(f"loss curves: {args.plot}")
    return 0


def plot_curves(curves: dict, steps_per_epoch: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, kind in zip(axes, ("film", "sensor"), strict=True):
        for mode, colour in (("transfer", "tab:blue"), ("scratch", "tab:orange")):
            for i, losses in enumerate(curves.get((kind, mode), [])):
                ep = [np.mean(losses[j:j + steps_per_epoch]) for j in range(0, len(losses), steps_per_epoch)]
                ax.plot(range(1, len(ep) + 1), ep, color=colour, alpha=0.8, label=mode if i == 0 else None)
        ax.set_title(f"{kind}: fine-tuning on 5 markers")
        ax.set_xlabel(f"epoch ({steps_per_epoch} steps)")
        ax.set_xticks([1, 10, 20, 30, 40, 50])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (weighted BCE + Dice)")
    axes[0].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    sys.exit(main())
