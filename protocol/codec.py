"""Encoding and validation of protocol messages. Standard library + msgpack only.

See SPEC.md beside this file (the authoritative description).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import msgpack

PROTOCOL_VERSION = 1

SAMPLE_BYTES = {"u8": 1, "u16": 2, "f16": 2, "f32": 4}
ORDER_CHANNELS = {"GRAY": 1, "GRAYA": 2, "RGB": 3, "RGBA": 4, "BGR": 3, "BGRA": 4}

REQUEST_TYPES = ("hello", "status", "heal", "detect", "inpaint", "cancel", "models.list",
                 "models.show", "models.delete", "models.export", "models.import")
EVENT_TYPES = ("progress", "result", "error", "cancelled")
FINAL_TYPES = ("result", "error", "cancelled")

_ID_RE = re.compile(r"^[\x21-\x7e]{1,64}$")
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,63}$")


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 1 << 20
    max_frames: int = 8
    max_side: int = 65536
    max_pixels: int = 300_000_000
    max_markers: int = 10_000
    max_model_bytes: int = 64 << 20
    max_queue: int = 64
    max_queue_per_client: int = 16
    max_queue_bytes: int = 4 << 30  # pixels waiting in the queue (a lone job may exceed it)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


DEFAULT_LIMITS = Limits()


class ProtocolError(Exception):
    """A message that breaks the protocol; ``code`` is one of SPEC.md §5's error codes."""

    def __init__(self, code: str, message: str, request_id: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass
class Message:
    header: dict
    buffers: list = field(default_factory=list)

    @property
    def type(self) -> str:
        return self.header["type"]

    @property
    def id(self) -> str:
        return self.header["id"]


def pack_header(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def encode(type_: str, id_: str, fields: dict | None = None, buffers: list | None = None) -> list:
    """A message as a list of frames: header first, then the buffers as they are (no copy)."""
    header = {"v": PROTOCOL_VERSION, "type": type_, "id": id_}
    if fields:
        header.update(fields)
    return [pack_header(header), *(buffers or [])]


def decode(frames: list, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse and check a message's envelope. Raises ProtocolError; never allocates by request."""
    if not frames:
        raise ProtocolError("bad_message", "empty message")
    raw = frames[0]
    raw = raw.bytes if hasattr(raw, "bytes") else raw
    if len(raw) > limits.max_header_bytes:
        raise ProtocolError("too_large", f"header of {len(raw)} bytes is over the limit of "
                                         f"{limits.max_header_bytes}")
    if len(frames) - 1 > limits.max_frames:
        raise ProtocolError("too_large", f"{len(frames) - 1} buffer frames; at most {limits.max_frames}")
    why = check_structure(raw, limits.max_markers * 2 + 64)
    if why:
        raise ProtocolError("bad_message", f"header is not valid msgpack ({why})")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True,
                                 max_array_len=limits.max_markers * 2 + 64,
                                 max_map_len=limits.max_markers * 2 + 64,
                                 max_str_len=limits.max_header_bytes, max_bin_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises several types, all mean the same here
        raise ProtocolError("bad_message", f"header is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_message", "header is not a map")
    rid = header.get("id")
    if not isinstance(rid, str) or not _ID_RE.match(rid):
        raise ProtocolError("bad_message", "header needs an 'id': 1-64 printable ASCII characters")
    mtype = header.get("type")
    if not isinstance(mtype, str) or not mtype or len(mtype) > 64:
        raise ProtocolError("bad_message", "header needs a 'type' string", rid)
    v = header.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:  # True == 1 and 1.0 == 1 in Python
        raise ProtocolError("unsupported_version",
                            f"protocol version {v!r} is not spoken here; this side speaks {PROTOCOL_VERSION}",
                            rid)
    return Message(header, list(frames[1:]))


MAX_DEPTH = 16  # a header needs 4 (header → markers → list → marker)
# bytes after the type byte for fixed-size scalars
_FIXED = {0xc0: 0, 0xc2: 0, 0xc3: 0, 0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8,
          0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8, 0xd4: 2, 0xd5: 3, 0xd6: 5, 0xd7: 9, 0xd8: 17}
_LEN = {0xc4: (1, 0), 0xc5: (2, 0), 0xc6: (4, 0), 0xc7: (1, 1), 0xc8: (2, 1), 0xc9: (4, 1),
        0xd9: (1, 0), 0xda: (2, 0), 0xdb: (4, 0)}   # (length bytes, type byte of ext)
_CONT = {0xdc: (2, 1), 0xdd: (4, 1), 0xde: (2, 2), 0xdf: (4, 2)}  # (count bytes, items per count)


def check_structure(raw: bytes, max_items: int, max_depth: int = MAX_DEPTH) -> str | None:
    """Why ``raw`` must not be unpacked, or None; walks the msgpack encoding without building anything.

    msgpack allocates every array as long as it declares before reading one element, so a
    few kB of nested array headers would cost tens of MB: refuse nesting deeper than
    ``max_depth`` and containers that declare more items than ``max_items`` or than the
    bytes left could hold.
    """
    n = len(raw)
    i = 0
    stack = [1]
    while stack:
        if not stack[-1]:
            stack.pop()
            continue
        stack[-1] -= 1
        if i >= n:
            return "truncated"
        b = raw[i]
        if b <= 0x7f or b >= 0xe0:
            i += 1
            continue
        if 0xa0 <= b <= 0xbf:
            i += 1 + (b & 0x1f)
            continue
        if b <= 0x9f:  # fixmap 0x80-0x8f, fixarray 0x90-0x9f
            count = (b & 0x0f) * (2 if b <= 0x8f else 1)
            i += 1
        elif b in _FIXED:
            i += 1 + _FIXED[b]
            continue
        elif b in _LEN:
            lb, extra = _LEN[b]
            if i + 1 + lb > n:
                return "truncated"
            size = int.from_bytes(raw[i + 1:i + 1 + lb], "big")
            i += 1 + lb + extra + size
            continue
        elif b in _CONT:
            cb, per = _CONT[b]
            if i + 1 + cb > n:
                return "truncated"
            count = int.from_bytes(raw[i + 1:i + 1 + cb], "big") * per
            i += 1 + cb
        else:
            return f"byte 0x{b:02x} is not msgpack"
        if count:
            if count > max_items:
                return f"a container of {count} items"
            if count > n - i:
                return f"a container declares {count} items with {n - i} bytes left"
            if len(stack) > max_depth:
                return f"nested deeper than {max_depth} levels"
            stack.append(count)
    return None


# --------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageDesc:
    width: int
    height: int
    channels: int
    order: str
    dtype: str
    stride: int
    frame: int = 1

    @property
    def sample_bytes(self) -> int:
        return SAMPLE_BYTES[self.dtype]

    @property
    def row_bytes(self) -> int:
        return self.width * self.channels * self.sample_bytes

    @property
    def min_bytes(self) -> int:
        return self.stride * (self.height - 1) + self.row_bytes

    def to_dict(self) -> dict:
        return {"frame": self.frame, "width": self.width, "height": self.height,
                "channels": self.channels, "order": self.order, "dtype": self.dtype,
                "stride": self.stride}

    @classmethod
    def packed(cls, width: int, height: int, order: str, dtype: str, frame: int = 1) -> ImageDesc:
        ch = ORDER_CHANNELS[order]
        return cls(width, height, ch, order, dtype, width * ch * SAMPLE_BYTES[dtype], frame)


def _int(d: dict, key: str, what: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError("bad_request", f"{what}: '{key}' must be an integer")
    return v


def parse_image(d, buffers: list, what: str = "image", limits: Limits = DEFAULT_LIMITS) -> ImageDesc:
    """Check an image map against the limits and its frame; return its description."""
    if not isinstance(d, dict):
        raise ProtocolError("bad_request", f"{what} must be a map")
    width, height = _int(d, "width", what), _int(d, "height", what)
    channels, stride, frame = _int(d, "channels", what), _int(d, "stride", what), _int(d, "frame", what)
    order, dtype = d.get("order"), d.get("dtype")
    if not isinstance(order, str) or order not in ORDER_CHANNELS:
        raise ProtocolError("bad_request", f"{what}: order must be one of {', '.join(ORDER_CHANNELS)}")
    if not isinstance(dtype, str) or dtype not in SAMPLE_BYTES:
        raise ProtocolError("bad_request", f"{what}: dtype must be one of {', '.join(SAMPLE_BYTES)}")
    if ORDER_CHANNELS[order] != channels:
        raise ProtocolError("bad_request", f"{what}: order {order} has {ORDER_CHANNELS[order]} channels, "
                                           f"not {channels}")
    if width < 1 or height < 1:
        raise ProtocolError("bad_request", f"{what}: width and height must be positive")
    if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
        raise ProtocolError("too_large", f"{what} of {width}x{height} is over the limits "
                                         f"({limits.max_side} px a side, {limits.max_pixels} pixels)")
    desc = ImageDesc(width, height, channels, order, dtype, stride, frame)
    if stride < desc.row_bytes:
        raise ProtocolError("bad_request", f"{what}: stride {stride} is less than a row "
                                           f"({desc.row_bytes} bytes)")
    if not 1 <= frame <= len(buffers):
        raise ProtocolError("bad_request", f"{what}: frame {frame} is missing "
                                           f"(the message has {len(buffers)} buffers)")
    size = len(buffers[frame - 1])
    if not desc.min_bytes <= size <= stride * height:
        raise ProtocolError("bad_request", f"{what}: frame {frame} has {size} bytes, expected "
                                           f"{desc.min_bytes}..{stride * height} for {width}x{height} "
                                           f"{order} {dtype} with stride {stride}")
    return desc


def parse_markers(d, limits: Limits = DEFAULT_LIMITS) -> dict[str, list[tuple[float, float, float]]]:
    """``{"dust": [...], "not_dust": [...]}`` → lists of (x, y, r); nil → empty lists."""
    out: dict[str, list[tuple[float, float, float]]] = {"dust": [], "not_dust": []}
    if d is None:
        return out
    if not isinstance(d, dict):
        raise ProtocolError("bad_request", "markers must be a map with 'dust' and 'not_dust' lists")
    count = 0
    for key in out:
        lst = d.get(key) or []
        if not isinstance(lst, list):
            raise ProtocolError("bad_request", f"markers.{key} must be a list")
        count += len(lst)
        if count > limits.max_markers:
            raise ProtocolError("too_large", f"more than {limits.max_markers} markers")
        for m in lst:
            if not isinstance(m, dict):
                raise ProtocolError("bad_request", f"markers.{key}: each marker is a map with x, y, r")
            try:
                x, y, r = (float(m["x"]), float(m["y"]), float(m.get("r", 6.0)))
            except (KeyError, TypeError, ValueError):
                raise ProtocolError("bad_request", f"markers.{key}: each marker needs numbers x, y (and r)") from None
            if not all(v == v and abs(v) < 1e9 for v in (x, y, r)) or r <= 0:
                raise ProtocolError("bad_request", f"markers.{key}: x, y must be finite and r positive")
            out[key].append((x, y, r))
    return out


def optional_str(header: dict, key: str, max_len: int = 256) -> str | None:
    v = header.get(key)
    if v is None or v == "":
        return None
    if not isinstance(v, str) or len(v) > max_len:
        raise ProtocolError("bad_request", f"'{key}' must be a string of at most {max_len} characters")
    return v


def model_name(header: dict, key: str = "name", required: bool = True) -> str | None:
    v = optional_str(header, key, 64)
    if v is None:
        if required:
            raise ProtocolError("bad_request", f"'{key}' (a model name) is required")
        return None
    if not MODEL_NAME_RE.match(v):
        raise ProtocolError("bad_request", f"model name {v!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return v
