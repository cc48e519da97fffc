"""The camera (EXIF make, model, serial) of a JPEG or TIFF file. Pure standard library.

Krita's Python API does not expose EXIF, so the plugin reads the document's file itself.
Anything unreadable gives None: the camera only helps to preselect a saved model.
"""

from __future__ import annotations

import struct

_MAKE, _MODEL, _EXIF_IFD, _BODY_SERIAL = 0x010F, 0x0110, 0x8769, 0xA431
_MAX_READ = 1 << 20


def _ifd(buf: bytes, offset: int, endian: str) -> dict[int, tuple[int, int, int, int]]:
    """Entries of the IFD at ``offset`` in a TIFF block: tag → (type, count, value/offset, entry pos)."""
    (n,) = struct.unpack_from(endian + "H", buf, offset)
    out = {}
    for i in range(min(n, 512)):
        pos = offset + 2 + 12 * i
        tag, typ, count = struct.unpack_from(endian + "HHI", buf, pos)
        (value,) = struct.unpack_from(endian + "I", buf, pos + 8)
        out[tag] = (typ, count, value, pos + 8)
    return out


def _ascii(buf: bytes, entry: tuple[int, int, int, int] | None) -> str | None:
    if entry is None or entry[0] != 2:
        return None
    _, count, value, pos = entry
    start = pos if count <= 4 else value
    text = buf[start:start + count].split(b"\0", 1)[0].decode("latin-1").strip()
    return text or None


def _from_tiff_block(buf: bytes) -> dict | None:
    endian = {b"II": "<", b"MM": ">"}.get(buf[:2])
    if endian is None:
        return None
    (ifd0,) = struct.unpack_from(endian + "I", buf, 4)
    tags = _ifd(buf, ifd0, endian)
    camera = {"make": _ascii(buf, tags.get(_MAKE)), "model": _ascii(buf, tags.get(_MODEL)), "serial": None}
    if _EXIF_IFD in tags:
        exif = _ifd(buf, tags[_EXIF_IFD][2], endian)
        camera["serial"] = _ascii(buf, exif.get(_BODY_SERIAL))
    if not camera["make"] and not camera["model"]:
        return None
    return {k: v for k, v in camera.items() if v}


def _jpeg_exif_block(data: bytes) -> bytes | None:
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\0\0":
            return data[pos + 10:pos + 2 + length]
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more metadata
            return None
        pos += 2 + length
    return None


def read_camera(path: str) -> dict | None:
    """``{"make", "model", "serial"}`` (those present) from a JPEG or TIFF file, else None."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_READ)
        if data[:2] == b"\xff\xd8":
            block = _jpeg_exif_block(data)
            return _from_tiff_block(block) if block else None
        if data[:4] in (b"II*\0", b"MM\0*"):
            return _from_tiff_block(data)
    except (OSError, struct.error, IndexError, ValueError):
        return None
    return None


def same_camera(a: dict | None, b: dict | None) -> bool:
    """Same make and model, and the same serial when both name one."""
    if not a or not b:
        return False
    if (a.get("make") or "").lower() != (b.get("make") or "").lower():
        return False
    if (a.get("model") or "").lower() != (b.get("model") or "").lower():
        return False
    sa, sb = a.get("serial"), b.get("serial")
    return not (sa and sb and sa != sb)
