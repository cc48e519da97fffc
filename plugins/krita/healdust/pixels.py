"""Pixel bytes as Krita hands them out, without numpy: channel order, depth, masks.

Pure standard library (no Krita, no Qt), so the tests can load it on its own. Everything
works on whole byte strings with slicing, ``bytes.translate`` and big-integer AND, which run
in C: a 24-megapixel mask takes a fraction of a second.
"""

from __future__ import annotations

import struct

# Krita's colorDepth() → protocol sample type.
DEPTH_DTYPE = {"U8": "u8", "U16": "u16", "F16": "f16", "F32": "f32"}
SAMPLE_BYTES = {"u8": 1, "u16": 2, "f16": 2, "f32": 4}
# Krita's channel names → the letters of a protocol channel order.
_CHANNEL_LETTER = {"Red": "R", "Green": "G", "Blue": "B", "Alpha": "A"}
SUPPORTED_ORDERS = ("BGRA", "RGBA", "GRAYA")


def channel_order(names_by_position: list[str]) -> str | None:
    """Protocol order ('BGRA', 'RGBA', 'GRAYA') of Krita channels listed in memory order.

    Krita keeps 8/16-bit integer RGB as BGRA and half/float RGB as RGBA; reading the order
    from the channels themselves covers both. None for anything else (CMYK, Lab, ...).
    """
    if names_by_position == ["Gray", "Alpha"]:
        return "GRAYA"
    order = "".join(_CHANNEL_LETTER.get(n, "?") for n in names_by_position)
    return order if order in ("BGRA", "RGBA") else None


def _value_of_high_byte(dtype: str, hb: int) -> float:
    """The smallest sample value whose most significant byte is ``hb`` (little-endian)."""
    if dtype == "u8":
        return hb / 255.0
    if dtype == "u16":
        return hb * 256 / 65535.0
    if dtype == "f16":
        return struct.unpack("<e", bytes((0, hb)))[0]
    return struct.unpack("<f", bytes((0, 0, 0, hb)))[0]


def _threshold_table(dtype: str, level: float) -> bytes:
    """Translate table: a sample's high byte → 1 when the sample is ≥ ``level``, else 0.

    Exact for level 0.5 in every sample type (0x80, 0x8000, 0x3800, 0x3F000000 are the
    first samples at or above one half); other levels are right to within 1/256 of the range.
    Negative and NaN floats count as 0.
    """
    out = bytearray(256)
    for hb in range(256):
        v = _value_of_high_byte(dtype, hb)
        out[hb] = 1 if v == v and v >= level else 0
    return bytes(out)


def sample_high_bytes(data: bytes, channels: int, dtype: str, channel: int) -> bytes:
    """One byte a pixel: the most significant byte of ``channel`` in interleaved little-endian data."""
    size = SAMPLE_BYTES[dtype]
    return data[channel * size + size - 1::channels * size]


def channel_at_least(data: bytes, channels: int, dtype: str, channel: int, level: float) -> bytes:
    """One byte a pixel, 1 where ``channel`` ≥ ``level`` (0..1 of the nominal range), else 0."""
    return sample_high_bytes(data, channels, dtype, channel).translate(_threshold_table(dtype, level))


def bytes_and(a: bytes, b: bytes) -> bytes:
    """Bytewise AND of two equally long byte strings (in C, through big integers)."""
    if len(a) != len(b):
        raise ValueError("bytes_and needs equally long inputs")
    return (int.from_bytes(a, "little") & int.from_bytes(b, "little")).to_bytes(len(a), "little")


_ONES_TO_255 = bytes(255 if i else 0 for i in range(256))


def binary_to_mask(binary: bytes) -> bytes:
    """0/non-zero bytes → a protocol mask (0 / 255)."""
    return binary.translate(_ONES_TO_255)


def mask_from_layer(data: bytes, order: str, dtype: str) -> bytes:
    """A protocol mask (GRAY u8, 255 = dust) from an edited "Dust mask" layer's pixels.

    A pixel is dust when its first colour channel (gray, or blue/red on an RGB layer) and its
    alpha are both at least one half: painting black or erasing removes dust, white adds it.
    """
    channels = 2 if order == "GRAYA" else 4
    alpha_index = channels - 1
    color = channel_at_least(data, channels, dtype, 0, 0.5)
    alpha = channel_at_least(data, channels, dtype, alpha_index, 0.5)
    return binary_to_mask(bytes_and(color, alpha))


def painted(data: bytes, order: str, dtype: str, level: float = 0.25) -> bytes:
    """One byte a pixel, 1 where a layer is painted (alpha ≥ ``level``): paint-layer markers."""
    channels = 2 if order == "GRAYA" else 4
    return channel_at_least(data, channels, dtype, channels - 1, level)


def _sample_tables(dtype: str) -> list[bytes]:
    """For each byte of a sample: a table from an 8-bit value v to that byte of v/255 in ``dtype``."""
    size = SAMPLE_BYTES[dtype]
    encoded = []
    for v in range(256):
        if dtype == "u8":
            encoded.append(bytes((v,)))
        elif dtype == "u16":
            encoded.append(struct.pack("<H", v * 257))
        elif dtype == "f16":
            encoded.append(struct.pack("<e", v / 255.0))
        else:
            encoded.append(struct.pack("<f", v / 255.0))
    return [bytes(e[i] for e in encoded) for i in range(size)]


def mask_to_graya(mask: bytes, dtype: str) -> bytes:
    """A protocol mask (GRAY u8) → GRAYA pixels at ``dtype``: dust white and opaque, the rest clear.

    Gray and alpha both carry the mask value, so the layer shows the dust over the image and
    ``mask_from_layer`` reads back exactly the same mask.
    """
    size = SAMPLE_BYTES[dtype]
    out = bytearray(len(mask) * 2 * size)
    step = 2 * size
    for i, table in enumerate(_sample_tables(dtype)):
        byte_i = mask.translate(table)
        out[i::step] = byte_i              # gray
        out[size + i::step] = byte_i       # alpha
    return bytes(out)


def count_nonzero(data: bytes) -> int:
    """How many bytes are not zero."""
    return len(data) - data.count(0)
