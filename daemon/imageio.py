"""Reading and writing images as they came: channels, bit depth and alpha kept.

Arrays are HxWxC in RGB(A) or GRAY(A) order, dtype uint8, uint16 or float32.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

ORDER_FOR_CHANNELS = {1: "GRAY", 2: "GRAYA", 3: "RGB", 4: "RGBA"}
READ_EXTS = {".png", ".tif", ".tiff", ".jpg", ".jpeg"}
WRITE_EXTS = {".png", ".tif", ".tiff", ".jpg", ".jpeg"}


class ImageError(ValueError):
    """An image that cannot be read or written; the message says which and why."""


@dataclass
class LoadedImage:
    pixels: np.ndarray           # HxWxC
    order: str                   # GRAY, GRAYA, RGB, RGBA
    camera: dict = field(default_factory=dict)  # make / model / serial from EXIF


def _png_color_type(path: Path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n":
        return head[25]
    return None


def read_camera(path: str | Path) -> dict:
    """EXIF make, model and body serial number, where the file has them."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            exif = im.getexif()
            sub = exif.get_ifd(0x8769) if exif else {}
    except Exception:
        return {}
    out = {}
    for key, tag, src in (("make", 0x010F, exif), ("model", 0x0110, exif), ("serial", 0xA431, sub)):
        v = src.get(tag) if src else None
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        if v:
            out[key] = str(v).strip("\x00 ").strip()
    return {k: v for k, v in out.items() if v}


def read_image(path: str | Path) -> LoadedImage:
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.suffix.lower() not in READ_EXTS:
        raise ImageError(f"{path}: unsupported file type (use PNG, TIFF or JPEG)")
    try:
        im = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        im = None
    if im is None or im.size == 0:
        raise ImageError(f"{path}: cannot read the image (corrupt or not an image)")
    if im.dtype not in (np.uint8, np.uint16, np.float32):
        if im.dtype == np.float64:
            im = im.astype(np.float32)
        else:
            raise ImageError(f"{path}: unsupported sample type {im.dtype}")
    if im.ndim == 2:
        im = im[:, :, None]
    ch = im.shape[2]
    if ch == 3:
        im = im[:, :, ::-1]
    elif ch == 4:
        im = im[:, :, [2, 1, 0, 3]]
        if path.suffix.lower() == ".png" and _png_color_type(path) == 4:  # gray + alpha
            im = im[:, :, [0, 3]]
            ch = 2
    elif ch not in (1, 2):
        raise ImageError(f"{path}: {ch} channels are not supported")
    return LoadedImage(np.ascontiguousarray(im), ORDER_FOR_CHANNELS[im.shape[2]], read_camera(path))


def _write_png_raw(path: Path, a: np.ndarray) -> None:
    """A plain PNG writer for what OpenCV cannot write (gray + alpha, 8 or 16 bit)."""
    h, w, c = a.shape
    depth = 16 if a.dtype == np.uint16 else 8
    color = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    data = a.astype(">u2") if depth == 16 else a
    raw = np.zeros((h, 1 + w * c * (depth // 8)), np.uint8)
    raw[:, 1:] = np.frombuffer(data.tobytes(), np.uint8).reshape(h, -1)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))
    path.write_bytes(png)


def write_image(path: str | Path, pixels: np.ndarray, order: str | None = None, quality: int = 95) -> None:
    """Write HxWxC RGB(A)/GRAY(A) pixels; depth kept where the format allows it."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in WRITE_EXTS:
        raise ImageError(f"{path}: unsupported output type (use .png, .tif or .jpg)")
    a = pixels if pixels.ndim == 3 else pixels[:, :, None]
    c = a.shape[2]
    if ext in (".jpg", ".jpeg"):
        if a.dtype != np.uint8:
            raise ImageError(f"{path}: JPEG holds 8-bit images only; write a PNG or TIFF for {a.dtype}")
        a = a[:, :, :1] if c == 2 else (a[:, :, :3] if c == 4 else a)
        c = a.shape[2]
    if ext == ".png" and a.dtype == np.float32:
        raise ImageError(f"{path}: PNG cannot hold float samples; write a TIFF")
    path.parent.mkdir(parents=True, exist_ok=True)
    if c == 2:
        if ext != ".png":
            a = np.concatenate([a[:, :, :1]] * 3 + [a[:, :, 1:]], axis=2)  # TIFF: RGBA
            c = 4
        else:
            _write_png_raw(path, np.ascontiguousarray(a))
            return
    bgr = a[:, :, ::-1] if c == 3 else (a[:, :, [2, 1, 0, 3]] if c == 4 else a[:, :, 0])
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    try:
        ok = cv2.imwrite(str(path), np.ascontiguousarray(bgr), params)
    except cv2.error as e:
        raise ImageError(f"{path}: cannot write ({e.err})") from None
    if not ok:
        raise ImageError(f"{path}: cannot write the image")


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """A single-channel 8-bit PNG, 255 = dust."""
    write_image(path, (mask.astype(bool) * np.uint8(255))[:, :, None])


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    img = read_image(path)
    if img.pixels.shape[:2] != shape:
        raise ImageError(f"{path}: mask is {img.pixels.shape[1]}x{img.pixels.shape[0]}, "
                         f"the image is {shape[1]}x{shape[0]}")
    p = img.pixels[:, :, 0]
    if p.dtype == np.uint16:
        return p >= 32768
    if p.dtype == np.float32:
        return p >= 0.5
    return p >= 128


def to_float(a: np.ndarray) -> np.ndarray:
    """Samples as float32 with 1.0 = full scale."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) * np.float32(1 / 255)
    if a.dtype == np.uint16:
        return a.astype(np.float32) * np.float32(1 / 65535)
    return a.astype(np.float32, copy=False)


def from_float(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)
    if dtype == np.uint16:
        return np.clip(np.rint(a * 65535), 0, 65535).astype(np.uint16)
    return a.astype(dtype)


def color_rgb(a: np.ndarray, order: str) -> np.ndarray:
    """The colour channels of an image in ``order`` as an RGB view (gray repeated)."""
    if order in ("GRAY", "GRAYA"):
        return np.repeat(a[:, :, :1], 3, axis=2)
    if order in ("BGR", "BGRA"):
        return a[:, :, 2::-1]
    return a[:, :, :3]


def color_channels(order: str) -> list[int]:
    """Indices of the colour (non-alpha) channels."""
    return {"GRAY": [0], "GRAYA": [0], "RGB": [0, 1, 2], "RGBA": [0, 1, 2], "BGR": [0, 1, 2],
            "BGRA": [0, 1, 2]}[order]
