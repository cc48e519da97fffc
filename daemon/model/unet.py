"""The dust U-Net: encoder, bottleneck, decoder, head.

The layout is the seed's reference (enc1 3→64, enc2 64→128, enc3 128→256, bottleneck
256→512, dec3 512→256, dec2 256→128, dec1 128→64, out 64→1) with the widths scaled by a
config.  "Transfer" freezes the encoder (its weights *and* its BatchNorm statistics) and
trains bottleneck + decoder + head; "scratch" trains everything from random init.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

SEED_WIDTHS = (64, 128, 256, 512)
DEFAULT_WIDTHS = (16, 32, 64, 128)


@dataclass(frozen=True)
class UNetConfig:
    widths: tuple[int, int, int, int] = DEFAULT_WIDTHS
    in_channels: int = 3

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return {"encoder": "unet", **d}

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        widths = tuple(int(w) for w in d.get("widths", DEFAULT_WIDTHS))
        if len(widths) != 4 or any(w <= 0 or w > 1024 for w in widths):
            raise ValueError(f"bad U-Net widths {widths!r}")
        return cls(widths=widths, in_channels=int(d.get("in_channels", 3)))


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Encoder(nn.Module):
    """Three stages at full, 1/2 and 1/4 resolution; returns the skip features."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        w1, w2, w3, _ = cfg.widths
        self.enc1 = conv_block(cfg.in_channels, w1)
        self.enc2 = conv_block(w1, w2)
        self.enc3 = conv_block(w2, w3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s1 = self.enc1(x)
        s2 = self.enc2(F.max_pool2d(s1, 2))
        s3 = self.enc3(F.max_pool2d(s2, 2))
        return s1, s2, s3


class Decoder(nn.Module):
    """Bottleneck at 1/8 resolution, then three up-stages with skips, then the logit head."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        w1, w2, w3, w4 = cfg.widths
        self.bottleneck = conv_block(w3, w4)
        self.up3 = nn.ConvTranspose2d(w4, w3, 2, stride=2)
        self.dec3 = conv_block(2 * w3, w3)
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)
        self.dec2 = conv_block(2 * w2, w2)
        self.up1 = nn.ConvTranspose2d(w2, w1, 2, stride=2)
        self.dec1 = conv_block(2 * w1, w1)
        self.out = nn.Conv2d(w1, 1, 1)

    def forward(self, s1: torch.Tensor, s2: torch.Tensor, s3: torch.Tensor) -> torch.Tensor:
        b = self.bottleneck(F.max_pool2d(s3, 2))
        d3 = self.dec3(torch.cat([self.up3(b), s3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), s2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), s1], 1))
        return self.out(d1)


# Input normalisation: images arrive as float RGB in [0, 1].
_MEAN = 0.5
_STD = 0.25
# The network pools three times: inputs must be a multiple of this.
MULTIPLE = 8


class DustUNet(nn.Module):
    multiple = MULTIPLE  # inputs must be a multiple of this (tiled inference pads to it)

    def __init__(self, cfg: UNetConfig | None = None):
        super().__init__()
        self.cfg = cfg or UNetConfig()
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)
        self._encoder_frozen = False

    # -- freezing -------------------------------------------------------------------
    def freeze_encoder(self) -> None:
        """Freeze encoder weights and BatchNorm running statistics (kept in eval mode)."""
        self._encoder_frozen = True
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> DustUNet:
        super().train(mode)
        if self._encoder_frozen:
            self.encoder.eval()  # normalisation statistics must not move
        return self

    # -- forward --------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encoder((x - _MEAN) / _STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float in [0, 1], H and W multiples of 8 → (N, 1, H, W) logits."""
        return self.decoder(*self.encode(x))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors fine-tuning may change (decoder incl. its BatchNorm buffers)."""
        return {f"decoder.{k}": v for k, v in self.decoder.state_dict().items()}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
