"""Which architecture a weights file declares: the U-Net or the MobileNetV2 encoder.

A model's ``config`` (in every weights file's metadata) names its encoder; files written
before there was a choice have none and are U-Nets.
"""

from __future__ import annotations

from .mobilenet import DustMobileNet, MobileConfig
from .unet import DustUNet, UNetConfig

ENCODERS = ("unet", "mobilenetv2")
DustModel = DustUNet | DustMobileNet


def encoder_name(config: dict) -> str:
    return str(config.get("encoder", "unet"))


def config_from_dict(config: dict) -> UNetConfig | MobileConfig:
    name = encoder_name(config)
    if name == "unet":
        return UNetConfig.from_dict(config)
    if name == "mobilenetv2":
        return MobileConfig.from_dict(config)
    raise ValueError(f"unknown encoder {name!r} (this healdust knows {', '.join(ENCODERS)})")


def build_model(config: dict | UNetConfig | MobileConfig) -> DustModel:
    """A fresh model (random initialisation) of the declared architecture."""
    cfg = config_from_dict(config) if isinstance(config, dict) else config
    return DustMobileNet(cfg) if isinstance(cfg, MobileConfig) else DustUNet(cfg)


def same_architecture(a: dict, b: dict) -> bool:
    return encoder_name(a) == encoder_name(b) and list(a.get("widths", [])) == list(b.get("widths", []))


def describe(config: dict) -> str:
    if encoder_name(config) == "mobilenetv2":
        return (f"MobileNetV2 encoder (ImageNet blocks 0-13) with a full-resolution stem, "
                f"decoder widths {list(config['widths'])}")
    return f"U-Net, widths {list(config['widths'])}"
