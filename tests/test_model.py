"""The model: shipped weights, freezing, scratch training, few-shot learning, safe saving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from healdust.metrics import empty_scores, score_masks
from healdust.model.arch import build_model
from healdust.model.finetune import FineTuneConfig, dust_inside_marker, fine_tune
from healdust.model.infer import predict_proba
from healdust.model.unet import SEED_WIDTHS, DustUNet, UNetConfig
from healdust.model.weights_io import WeightsError, load_weights
from healdust.store import ModelStore, base_weights_path, load_base_model

from .conftest import dusty_image, markers_for, to_u8


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return load_base_model()


def test_shipped_weights_load_without_pickle_and_are_small(base):
    model, meta = base
    p = base_weights_path()
    assert p.stat().st_size < 25 * 2**20
    assert meta["kind"] == "base" and meta["id"] and meta["heldout"]["metrics"]
    with open(p, "rb") as f:
        assert b"pickle" not in f.read(4096)  # safetensors header, not a pickle


def _score(model, n=6, kind="film", threshold=0.5):
    total = empty_scores()
    for i in range(n):
        _, dusty, truth = dusty_image(192, seed=100 + i, count=10, kind=kind)
        prob = predict_proba(model, to_u8(dusty), "RGB")
        total = total.add(score_masks(prob >= threshold, truth))
    return total


def test_shipped_weights_beat_random_init_by_far(base):
    model, _ = base
    torch.manual_seed(0)
    rand = build_model(model.cfg).eval()
    for kind in ("film", "sensor"):
        trained, random = _score(model, kind=kind), _score(rand, kind=kind)
        assert trained.spot_f1 >= random.spot_f1 + 0.3, (kind, trained.as_dict(), random.as_dict())


def test_seed_architecture_still_builds():
    m = DustUNet(UNetConfig(widths=SEED_WIDTHS))
    assert m.encoder.enc1[0].in_channels == 3 and m.encoder.enc1[0].out_channels == 64
    assert m.decoder.bottleneck[0].out_channels == 512 and m.decoder.out.in_channels == 64
    assert m(torch.rand(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def _one_image_task(seed=30, count=16, kind="film"):
    clean, dusty, truth = dusty_image(256, seed=seed, count=count, kind=kind)
    markers = markers_for(truth, 5)
    return to_u8(dusty), truth, [(m["x"], m["y"], m["r"]) for m in markers]


def test_transfer_freezes_encoder_weights_and_statistics(base):
    model, _ = base
    img, truth, dust = _one_image_task()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    dec_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    res = fine_tune(model, img, "RGB", dust, mode="transfer", cfg=FineTuneConfig(steps_transfer=15, min_steps=15))
    after = res.model.encoder.state_dict()
    for k, v in before.items():  # weights, biases, running_mean, running_var, num_batches_tracked
        assert torch.equal(v, after[k]), k
    assert any(not torch.equal(v, res.model.decoder.state_dict()[k]) for k, v in dec_before.items())
    assert all(not p.requires_grad for p in res.model.encoder.parameters())
    res.model.train()
    assert not res.model.encoder.training, "a frozen encoder stays in eval mode"
    # the base model itself was not touched
    assert all(torch.equal(v, model.decoder.state_dict()[k]) for k, v in dec_before.items())


def test_scratch_trains_every_layer(base):
    model, _ = base
    img, truth, dust = _one_image_task()
    res = fine_tune(model, img, "RGB", dust, mode="scratch", cfg=FineTuneConfig(steps_scratch=6, min_steps=6))
    torch.manual_seed(0)
    fresh = build_model(model.cfg)
    # every layer moved away from its random init, and nothing was copied from the base
    for (name, p), p0 in zip(res.model.named_parameters(), fresh.parameters(), strict=True):
        assert not torch.equal(p.detach(), p0.detach()), name
    first = next(iter(model.encoder.parameters()))
    assert not torch.equal(next(iter(res.model.encoder.parameters())), first)


def test_marker_labels_are_the_defect_not_the_disc():
    _, dusty, truth = dusty_image(128, seed=40, count=6)
    m = markers_for(truth, 1, pad=8)[0]
    lab = dust_inside_marker(dusty, m["y"], m["x"], m["r"])
    yy, xx = np.mgrid[:128, :128]
    disc = (yy - m["y"]) ** 2 + (xx - m["x"]) ** 2 <= m["r"] ** 2
    assert lab.sum() < 0.7 * disc.sum()
    inter = (lab & truth & disc).sum()
    assert inter >= 0.5 * (truth & disc).sum()


def test_marker_around_a_curved_hair_labels_the_hair_not_the_texture_at_its_centre():
    # the hair covers little of the circle's core, which is mostly bright foliage: the
    # polarity read in the core alone took the foliage for the defect (none of the hair)
    _, dusty, truth = dusty_image(224, seed=12, count=12)
    m = markers_for(truth, 4)[1]
    assert m["r"] > 40
    yy, xx = np.mgrid[:224, :224]
    hair = truth & ((yy - m["y"]) ** 2 + (xx - m["x"]) ** 2 <= m["r"] ** 2)
    core = (yy - m["y"]) ** 2 + (xx - m["x"]) ** 2 <= (m["r"] / 2) ** 2
    assert (hair & core).sum() < 0.1 * core.sum()
    lab = dust_inside_marker(dusty, m["y"], m["x"], m["r"])
    assert (lab & hair).sum() >= 0.7 * hair.sum()
    assert lab.sum() <= 1.5 * hair.sum()


def test_fine_tuning_finds_the_unmarked_spots_of_the_same_kind(base):
    model, _ = base
    img, truth, dust = _one_image_task(seed=31, count=20)
    res = fine_tune(model, img, "RGB", dust, mode="transfer")
    prob = predict_proba(res.model, img, "RGB")
    # score only the spots that were not marked
    import cv2

    n, lab = cv2.connectedComponents(truth.astype(np.uint8))
    marked = {lab[int(y), int(x)] for x, y, _ in dust} - {0}
    unmarked = truth & ~np.isin(lab, list(marked))
    s = score_masks(prob >= res.threshold, unmarked)
    assert s.spot_recall >= 0.6, s.as_dict()


def test_save_is_atomic_under_sigkill(tmp_path, base):
    """Kill a process that saves the same model over and over; the file always loads."""
    model, meta = base
    store = ModelStore(tmp_path)
    store.save("m", model, meta, "transfer", 3, 0.5)
    script = (
        "import sys; from healdust.store import ModelStore, load_base_model\n"
        "m, meta = load_base_model(); s = ModelStore(sys.argv[1])\n"
        "print('go', flush=True)\n"
        "while True: s.save('m', m, meta, 'transfer', 3, 0.5)\n"
    )
    rng = np.random.default_rng(0)
    for _ in range(6):
        p = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "go"
        time.sleep(float(rng.uniform(0.01, 0.3)))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        loaded, _ = store.load("m", model, meta)  # whole: the old file or the new one
        assert loaded is not None
    assert [m["name"] for m in store.list()] == ["m"]


def test_corrupt_model_is_named_and_others_survive(tmp_path, base):
    model, meta = base
    store = ModelStore(tmp_path)
    store.save("good", model, meta, "transfer", 3, 0.5)
    store.save("bad", model, meta, "transfer", 3, 0.5)
    p = store.path("bad")
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="bad.safetensors"):
        store.load("bad", model, meta)
    assert store.load("good", model, meta)[0] is not None
    listing = {m["name"]: m for m in store.list()}
    assert "error" in listing["bad"] and "error" not in listing["good"]


def test_newer_format_refused(tmp_path, base):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "n.safetensors"),
              metadata={"format": "healdust-weights", "format_version": "99", "meta": "{}"})
    with pytest.raises(WeightsError, match="format version"):
        load_weights(tmp_path / "n.safetensors")


def test_train_base_is_reproducible_and_resumable(tmp_path, home):
    """An interrupted and resumed pretraining gives exactly the weights of an uninterrupted one."""
    from healdust import synth
    from healdust.demo import sample_path
    from healdust.imageio import write_image

    photo = synth.load_photo(sample_path())
    for i, (y, x) in enumerate([(0, 0), (300, 500)]):
        write_image(tmp_path / "photos" / f"p{i}.png", photo[y:y + 300, x:x + 400])
    write_image(tmp_path / "photos" / "heldout" / "h.png", photo[500:800, 800:1200])
    args = ["--photos", tmp_path / "photos", "--steps", "4", "--batch", "2", "--crop", "64",
            "--eval-crops", "2", "--spot-crops", "3", "--checkpoint-every", "2", "--device", "cpu"]

    def run(out, *extra):
        r = subprocess.run([sys.executable, "-m", "healdust", "train-base", "--out", str(out),
                            *map(str, args), *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r

    run(tmp_path / "a.safetensors")
    r = run(tmp_path / "b.safetensors", "--stop-after", "2")
    assert not (tmp_path / "b.safetensors").exists() and "stopping at step 2" in r.stderr
    r = run(tmp_path / "b.safetensors")
    assert "resuming at step 2" in r.stderr
    a, meta = load_weights(tmp_path / "a.safetensors")
    b, _ = load_weights(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["heldout"]["photos"] == ["h.png"] and "h.png" not in meta["train"]["photos"]
    assert (tmp_path / "a.md").read_text().startswith("# Model card")
    # a second stage starts from the first one's weights and says so in its card
    r = run(tmp_path / "c.safetensors", "--init", tmp_path / "a.safetensors", "--seed", "7", "--lr", "0.0005",
            "--soft", "0.5", "--hard-negatives", "0.01", "--labels", "seen")
    assert "starting from" in r.stderr
    c, meta_c = load_weights(tmp_path / "c.safetensors")
    assert meta_c["train"]["init"] == meta["id"]
    assert [s["seed"] for s in meta_c["train"]["stages"]] == [1234, 7]
    assert any(not torch.equal(a[k], c[k]) for k in a)
    card = (tmp_path / "c.md").read_text()
    assert "--init STAGE1.safetensors" in card and "--seed 7" in card
    assert "--soft 0.5" in card and meta_c["train"]["stages"][1]["soft"] == 0.5
    assert "soft" not in meta_c["train"]["stages"][0]
    assert "--hard-negatives 0.01" in card and "hardest 1.0% of the clean pixels" in card
    assert meta_c["train"]["stages"][1]["hard_negatives"] == 0.01
    assert "--labels seen" in card and meta_c["train"]["stages"][1]["labels"] == "seen"
    assert "labels" not in meta_c["train"]["stages"][0] and "--labels" not in card.split("STAGE1.safetensors")[0]
    assert meta_c["heldout"]["truth"] == "seen" and "dust too faint to see is ignored" in card
    assert "## Spot filter" in card


def test_train_base_steps_0_keeps_the_weights_and_fits_the_spot_filter(tmp_path, home):
    from healdust import synth
    from healdust.demo import sample_path
    from healdust.imageio import write_image
    from healdust.spots import SpotFilter

    photo = synth.load_photo(sample_path())
    write_image(tmp_path / "photos" / "p.png", photo[:400, :600])
    write_image(tmp_path / "photos" / "heldout" / "h.png", photo[400:800, 600:1200])
    out = tmp_path / "refit.safetensors"
    cmd = [sys.executable, "-m", "healdust", "train-base", "--photos", str(tmp_path / "photos"), "--out", str(out),
           "--steps", "0", "--eval-crops", "2", "--spot-crops", "6", "--seed", "5", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "give --init" in r.stderr and not out.exists()
    r = subprocess.run([*cmd, "--init", str(base_weights_path())], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "spot F1" in r.stdout and "with the spot filter" in r.stdout
    shipped, meta_s = load_weights(base_weights_path())
    refit, meta = load_weights(out)
    assert shipped.keys() == refit.keys() and all(torch.equal(shipped[k], refit[k]) for k in shipped)
    assert meta["id"] == meta_s["id"] and meta["train"] == meta_s["train"]
    sf = meta["spot_filter"]
    assert sf["fitted"] == {**sf["fitted"], "crops": 6, "seed": 5, "separately": True}
    SpotFilter.from_dict(sf)
    assert set(sf["heldout"]) == {"without", "with"} and set(sf["heldout"]["with"]) == {"film", "sensor"}
    card = out.with_suffix(".md").read_text()
    stages = len(meta["train"]["stages"])
    assert f"--steps 0 --init STAGE{stages}.safetensors --seed 5 --spot-crops 6" in card
    assert "Spots scored below" in card


def test_seen_labels_leave_faint_dust_out_of_the_loss():
    """--labels seen: the targets are the dust that can be seen, the loss weight is 0 on dust
    too faint to see; the images are those of --labels all, pixel for pixel."""
    from healdust import synth
    from healdust.demo import sample_path
    from healdust.model.losses import dust_loss
    from healdust.model.pretrain import PretrainConfig, _batch

    photos = [synth.load_photo(sample_path())]
    seen_cfg = PretrainConfig(batch=6, crop=64, labels="seen", seed=5)
    x, y, w = _batch(photos, None, seen_cfg, 3)
    x_all, y_all, w_all = _batch(photos, None, PretrainConfig(batch=6, crop=64, seed=5), 3)
    assert torch.equal(x, x_all) and w_all is None
    assert bool((y <= y_all).all())                 # seen dust is dust
    assert bool(((y_all - y) * w == 0).all())       # dust not seen is never called clean
    assert bool((w == 0).any()) and bool(((w == 0) & (y == 1)).sum() == 0)
    # a confident "clean" on an ignored pixel costs nothing
    logits = torch.where(y > 0, 5.0, -5.0)
    flipped = torch.where(w == 0, -logits.abs() - 20, logits)
    assert torch.isclose(dust_loss(logits, y, w), dust_loss(flipped, y, w))


def test_hard_negative_loss_is_the_mean_over_the_surest_false_alarms():
    from torch.nn import functional as F

    from healdust.model.losses import hard_negative_loss

    logits = torch.full((1, 1, 10, 10), -4.0)
    target = torch.zeros_like(logits)
    target[0, 0, 0, :5] = 1.0              # dust: never a negative, however sure
    logits[0, 0, 0, :5] = 9.0
    logits[0, 0, 5, 5] = 3.0               # the one sure false alarm
    logits[0, 0, 6, 6] = 1.0               # the next
    logits[0, 0, 1, 2] = 5.0               # a speck's soft edge, labelled clean: never a hard negative
    one = hard_negative_loss(logits, target, 1 / 88, margin=1)  # 100 - 5 dust - 7 beside it
    assert torch.isclose(one, F.softplus(torch.tensor(3.0)))
    two = hard_negative_loss(logits, target, 2 / 88, margin=1)
    assert torch.isclose(two, (F.softplus(torch.tensor(3.0)) + F.softplus(torch.tensor(1.0))) / 2)
    assert torch.isclose(hard_negative_loss(logits, target, 1 / 95, margin=0), F.softplus(torch.tensor(5.0)))
    assert hard_negative_loss(logits, torch.ones_like(logits), 0.1) == 0
    # it pushes the false alarm down, and only the hard pixels get a gradient
    x = logits.clone().requires_grad_(True)
    hard_negative_loss(x, target, 2 / 88, margin=1).backward()
    assert x.grad[0, 0, 5, 5] > 0 and x.grad[0, 0, 6, 6] > 0
    assert int((x.grad != 0).sum()) == 2


def test_soft_crops_are_opt_in_and_soft():
    """--soft adds upscaled or defocused crops; without it the batches are exactly the old
    ones (the shipped weights' first stage is rebuilt from them)."""
    from healdust import synth
    from healdust.demo import sample_path

    photo = synth.load_photo(sample_path())
    for seed in range(5):
        a = synth.random_crop(photo, 96, np.random.default_rng(seed))
        b = synth.random_crop(photo, 96, np.random.default_rng(seed), soft=0.0)
        assert np.array_equal(a, b)

    def detail(img):  # fine detail: mean absolute Laplacian
        import cv2

        return float(np.abs(cv2.Laplacian(img.mean(axis=2), cv2.CV_32F)).mean())

    sharp = np.mean([detail(synth.random_crop(photo, 96, np.random.default_rng(s))) for s in range(20)])
    soft = np.mean([detail(synth.random_crop(photo, 96, np.random.default_rng(s), soft=1.0)) for s in range(20)])
    assert soft < 0.6 * sharp, (soft, sharp)
