"""How a GIMP layer's pixels travel to the daemon and back. Standard library only.

The model was trained on ordinary (gamma-encoded) photos, so pixels go out with a
non-linear transfer curve: 8- and 16-bit images with a non-linear or perceptual curve in
their own encoding (exact both ways), everything else (linear integers, 32-bit integers,
half, float, double) as non-linear 32-bit float, which holds all of them without loss
when written back. Babl converts; GIMP stores the result at the image's own precision.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WireFormat:
    encoding: str  # Babl encoding, e.g. "R'G'B'A u16" (the colour space is added in GIMP)
    order: str     # protocol channel order: RGB, RGBA, GRAY, GRAYA
    dtype: str     # protocol sample type: u8, u16, f32
    channels: int
    sample_bytes: int

    @property
    def pixel_bytes(self) -> int:
        return self.channels * self.sample_bytes


def wire_format(precision_nick: str, gray: bool, alpha: bool) -> WireFormat:
    """The format for a layer of an image whose ``Gimp.Precision`` nick is ``precision_nick``
    (e.g. ``"u16-non-linear"``, ``"float-linear"``)."""
    depth, _, curve = precision_nick.partition("-")
    if depth in ("u8", "u16") and curve in ("non-linear", "perceptual"):
        dtype, babl_type, size = depth, depth, (1 if depth == "u8" else 2)
    else:
        dtype, babl_type, size = "f32", "float", 4
    tick = "~" if curve == "perceptual" and dtype != "f32" else "'"
    if gray:
        model, order = f"Y{tick}", "GRAY"
    else:
        model, order = f"R{tick}G{tick}B{tick}", "RGB"
    if alpha:
        model, order = model + "A", order + "A"
    channels = len(order) - 3 if order.startswith("GRAY") else len(order)
    return WireFormat(f"{model} {babl_type}", order, dtype, channels, size)


_DUST = bytes(1 if i >= 128 else 0 for i in range(256))
_TO_MASK = bytes([0, 255]) + bytes(254)


def mask_from_gray_alpha(data: bytes, count: int) -> bytes:
    """A protocol mask (255 = dust) from "Y'A u8" pixels: dust is light (Y ≥ 128) and not
    transparent (A ≥ 128), so painting black or erasing both remove dust."""
    if len(data) < 2 * count:
        raise ValueError(f"expected {2 * count} bytes of Y'A u8, got {len(data)}")
    y = data[0:2 * count:2].translate(_DUST)
    a = data[1:2 * count:2].translate(_DUST)
    both = (int.from_bytes(y, "little") & int.from_bytes(a, "little")).to_bytes(count, "little")
    return both.translate(_TO_MASK)


def mask_from_gray(data: bytes, count: int) -> bytes:
    """A protocol mask from "Y u8" pixels (a channel): ≥ 128 is dust."""
    return data[:count].translate(_DUST).translate(_TO_MASK)


def count_dust(mask: bytes) -> int:
    """Pixels marked as dust in a protocol mask."""
    return len(mask) - mask.count(0)
