"""Stress machinery shared by tests/test_fuzz.py, tests/test_load.py and bench/soak.py.

* ``raw_socket``: a bare DEALER to a daemon, for frames no ``Client`` would send (the one
  place where such sockets are made, so key set-up lives here only);
* ``MessageFuzzer``: a seeded generator of malformed, mutated and hostile messages, and
  ``hostile_model_files``: model files that lie about themselves;
* ``fuzz_daemon``: drives a live daemon with fuzz messages and checks every reply;
* ``run_load``: many clients in threads, mixed small jobs, cancels; every event recorded;
* ``flood``: fills the queue past its limits, checks the ``busy`` replies, drains it;
* ``sigkill_during_saves``: kills a daemon at random moments while it saves a model over
  and over, and checks the file is always one version or the other, whole.

The drivers do not assert: they return a report whose ``problems`` list the tests assert
empty and the soak script prints, so both read the same figures.
"""

from __future__ import annotations

import json
import random
import re
import signal
import struct
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import zmq

from healdust.protocol import PROTOCOL_VERSION, ImageDesc, Limits, ProtocolError, decode, keys
from healdust.protocol.client import Client

ERROR_CODES = ("bad_message", "unsupported_version", "unknown_type", "bad_request", "too_large", "busy",
               "not_found", "no_markers", "bad_model", "out_of_memory", "storage", "internal")
JOB_TYPES = ("heal", "detect", "inpaint")
FINAL = ("result", "error", "cancelled")
SEED_MODEL = "fz-seed"


def raw_socket(endpoint: str, home: str | Path | None = None, context: zmq.Context | None = None) -> zmq.Socket:
    """A connected DEALER socket for hand-made frames, with the token or keys under ``home``.

    ``home``: the HEALDUST_HOME whose keys/ the daemon uses (default: $HEALDUST_HOME), as ``Client`` does.
    """
    sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    keys.apply_client_security(sock, keys.client_security(endpoint, home))
    sock.connect(endpoint)
    return sock


def proc_status_kb(pid: int, key: str = "VmRSS") -> int:
    """A memory figure of a process from /proc/PID/status, in kB (0 where there is none)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def child_pids(pid: int) -> set[int]:
    """The processes ``pid`` started, from /proc/PID/task/*/children."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def alive(pid: int) -> bool:
    """Is ``pid`` running (not gone, not a zombie)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids, timeout: float = 10.0) -> bool:
    """Wait until none of ``pids`` is alive; False if some still are after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class RssSampler:
    """Samples a process's VmRSS in a background thread: ``with RssSampler(pid) as s: ...; s.peak_kb``."""

    def __init__(self, pid: int | None, interval: float = 0.05):
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, proc_status_kb(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        if self.pid:
            self.peak_kb = proc_status_kb(self.pid)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(1)
        if self.pid:
            self.peak_kb = max(self.peak_kb, proc_status_kb(self.pid))


def percentiles(values: list[float], qs=(50, 90, 99)) -> dict[str, float]:
    """p50/p90/p99/max of ``values`` (nearest rank), empty dict for no values."""
    if not values:
        return {}
    v = sorted(values)
    out = {f"p{q}": v[min(len(v) - 1, max(0, int(np.ceil(q / 100 * len(v))) - 1))] for q in qs}
    out["max"] = v[-1]
    return out


# --------------------------------------------------------------------------------------
# model files
# --------------------------------------------------------------------------------------

def make_seed_model(home: str | Path, name: str = SEED_MODEL) -> bytes:
    """Save the base model's decoder as a valid fine-tuned model ``name`` under ``home``; its bytes."""
    from healdust.store import ModelStore, load_base_model

    base, meta = load_base_model()
    store = ModelStore(home)
    store.save(name, base, meta, "transfer", 3, 0.5, {"make": "Fuzz", "model": "F1"})
    return store.path(name).read_bytes()


def split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    """A safetensors file's JSON header and its data section."""
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join_safetensors(header, data: bytes, declared_len: int | None = None) -> bytes:
    """A safetensors file from a header (any JSON value) and data; ``declared_len`` lies about its size."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if declared_len is None else declared_len) + raw + data


_DROP = object()  # with_meta(field=_DROP): leave the field out


def hostile_model_files(seed_blob: bytes) -> list[tuple[str, bytes]]:
    """Model files that declare wrong sizes, wrong types or poisonous metadata, each with a label.

    Every one of them must be refused (``bad_model``/``bad_request``) or, if stored, stay harmless:
    listing, showing and using it must never turn into an ``internal`` error.
    """
    header, data = split_safetensors(seed_blob)
    meta = json.loads(header["__metadata__"]["meta"])
    first = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32" and v["shape"])

    def with_meta(**changes):
        m = dict(meta)
        for k, v in changes.items():
            if v is _DROP:
                m.pop(k, None)
            else:
                m[k] = v
        h = dict(header, __metadata__=dict(header["__metadata__"], meta=json.dumps(m)))
        return join_safetensors(h, data)

    def with_tensor(**changes):
        h = dict(header)
        h[first] = dict(h[first], **changes)
        return join_safetensors(h, data)

    def with_header_meta(**changes):
        return join_safetensors(dict(header, __metadata__=dict(header["__metadata__"], **changes)), data)

    out = [
        ("empty", b""),
        ("eight zero bytes", b"\0" * 8),
        ("header length 2^63", struct.pack("<Q", 1 << 63) + seed_blob[8:]),
        ("header length past the end", join_safetensors(header, data, declared_len=len(seed_blob))),
        ("header not JSON", struct.pack("<Q", 8) + b"{{{{{{{{" + data),
        ("header a JSON list", join_safetensors([1, 2, 3], data)),
        ("truncated in the data", seed_blob[:len(seed_blob) // 2]),
        ("truncated in the header", seed_blob[:64]),
        ("tensor of 2^40 floats", with_tensor(shape=[1 << 40])),
        ("tensor offsets past the end", with_tensor(data_offsets=[0, len(data) + 4096])),
        ("float tensor declared F64", with_tensor(dtype="F64")),
        ("tensor dtype unknown", with_tensor(dtype="Q7")),
        ("tensor shape negative", with_tensor(shape=[-1, 4])),
        ("no healdust format", with_header_meta(format="other")),
        ("format version 2", with_header_meta(format_version="2")),
        ("format version not a number", with_header_meta(format_version="one")),
        ("meta not JSON", with_header_meta(meta="{not json")),
        ("meta a list", with_header_meta(meta="[1, 2]")),
        ("meta kind base", with_meta(kind="base")),
        ("meta kind missing", with_meta(kind=_DROP)),
        ("meta config an int", with_meta(config=5)),
        ("meta config widths a string", with_meta(config={"widths": "wide"})),
        ("meta mode unknown", with_meta(mode="sideways")),
        ("meta base another id", with_meta(base="someone-else")),
        ("meta name a path", with_meta(name="../../evil")),
        ("meta name an int", with_meta(name=5)),
        ("meta camera a string", with_meta(camera="Acme X1")),
        ("meta camera a list", with_meta(camera=["Acme"])),
        ("meta camera nested", with_meta(camera={"make": {"deep": [1, 2]}, "model": 7})),
        ("meta created an int", with_meta(created=5)),
        ("meta threshold a string", with_meta(threshold="high")),
        ("meta threshold 7", with_meta(threshold=7.0)),
        ("meta markers 2^70", with_meta(markers=1 << 70)),
        ("meta markers a string", with_meta(markers="five")),
    ]
    return out


# --------------------------------------------------------------------------------------
# the message fuzzer
# --------------------------------------------------------------------------------------

HOSTILE_NAMES = ["", ".", "..", "../x", "../../etc/passwd", "/etc/passwd", "x/y", "x\\y", "..\\x", ".hidden",
                 "-", "a" * 64, "a" * 65, "a" * 1000, "x\x00y", "näme", "名前", " x", "x ", "con", "NUL",
                 "$(id)", "x;rm -rf ~", "%2e%2e%2fx", "base", "auto", "fz-nothing", SEED_MODEL, "fz-imp-1",
                 "fz-imp-2", "\u202e", "x" * 63 + "\n"]
HOSTILE_IDS = ["", " ", "a b", "x" * 65, "x" * 1000, "\x00", "\x7f", "é", "🦠", "\n"]
HOSTILE_INTS = [0, -1, 1, 2, 3, 7, 8, 9, 255, 65535, 65536, 65537, 1 << 31, (1 << 32) + 1, (1 << 63) - 1,
                -(1 << 63), (1 << 64) - 1]
IMAGE_KEYS = ("frame", "width", "height", "channels", "order", "dtype", "stride")
ORDERS = ("GRAY", "GRAYA", "RGB", "RGBA", "BGR", "BGRA")
DTYPES = ("u8", "u16", "f16", "f32")
SAMPLE = {"u8": 1, "u16": 2, "f16": 2, "f32": 4}
CHANNELS = {"GRAY": 1, "GRAYA": 2, "RGB": 3, "RGBA": 4, "BGR": 3, "BGRA": 4}


def _nested(depth: int, leaf=None, as_map: bool = False):
    x = leaf
    for _ in range(depth):
        x = {"k": x} if as_map else [x]
    return x


@dataclass
class FuzzCase:
    """One fuzz message: the frames to send and the generator that made it."""
    kind: str
    frames: list


class MessageFuzzer:
    """Seeded generator of bad messages: ``MessageFuzzer(seed).case()`` → FuzzCase.

    Valid jobs come out rarely and tiny (at most 24 px a side, no fine-tuning), so a fuzz
    run measures the daemon's validation, not its model.
    """

    # kind → weight; the sum need not be 100
    KINDS = {
        "random_bytes": 8, "truncated": 7, "bitflip": 10, "splice": 5, "field_type": 12, "envelope": 8,
        "image": 12, "frames": 8, "nesting": 5, "raw_containers": 3, "giant": 1.5, "markers": 6,
        "job_fields": 5, "cancel": 4, "models": 6, "model_import": 2, "unknown_type": 3, "valid": 2.5,
        "duplicate_id": 0.5,
    }

    def __init__(self, seed: int, seed_model: bytes | None = None, limits: Limits | None = None):
        self.seed = seed
        self.rng = random.Random(seed)
        self.seed_model = seed_model
        self.limits = limits or Limits()
        self.count = 0
        self._kinds = list(self.KINDS)
        self._weights = [self.KINDS[k] for k in self._kinds]
        self._hostile_models = hostile_model_files(seed_model) if seed_model else []
        self._recent_ids: deque[str] = deque(maxlen=64)

    # -- building blocks ------------------------------------------------------------
    def new_id(self) -> str:
        self.count += 1
        return f"fz{self.seed % 65536:x}-{self.count}"

    def hostile_value(self, depth: int = 0):
        r = self.rng
        pool = [None, True, False, r.choice(HOSTILE_INTS), r.uniform(-1e9, 1e9), float("nan"), float("inf"),
                float("-inf"), 1e308, -0.0, "", r.choice(HOSTILE_NAMES), r.choice(HOSTILE_IDS), "x" * r.randint(0, 300),
                [], {}, msgpack.ExtType(r.randint(0, 127), b"\x01" * r.randint(0, 4)), b"\x00\x01"]
        if depth < 2:
            pool += [[self.hostile_value(depth + 1) for _ in range(r.randint(1, 4))],
                     {r.choice(["x", "y", "frame", "width", "v", "id", ""]): self.hostile_value(depth + 1)},
                     _nested(r.randint(3, 60), None, r.random() < 0.5)]
        return r.choice(pool)

    def image(self, frame: int = 1, side: int = 16) -> tuple[dict, bytes]:
        """A valid tiny image description and its pixels (random bytes: floats may be NaN or inf)."""
        r = self.rng
        w, h = r.randint(1, side), r.randint(1, side)
        order, dtype = r.choice(ORDERS), r.choice(DTYPES)
        row = w * CHANNELS[order] * SAMPLE[dtype]
        stride = row + (r.choice([0, 0, 0, 1, 3, 8, 64]) if r.random() < 0.3 else 0)
        size = stride * (h - 1) + row + (r.randint(0, stride - row) if stride > row else 0)
        if dtype in ("f16", "f32") and r.random() < 0.7:
            arr = np.random.default_rng(r.getrandbits(32)).random(size // SAMPLE[dtype]).astype(
                "<f2" if dtype == "f16" else "<f4")
            pix = arr.tobytes() + b"\0" * (size % SAMPLE[dtype])
        else:
            pix = r.randbytes(size)
        desc = {"frame": frame, "width": w, "height": h, "channels": CHANNELS[order], "order": order,
                "dtype": dtype, "stride": stride}
        return desc, pix

    def valid_message(self) -> tuple[dict, list]:
        """A well-formed request (header fields, buffers); jobs are tiny and never fine-tune."""
        r = self.rng
        t = r.choice(["hello", "status", "cancel", "models.list", "models.show", "models.delete",
                      "models.export", "heal", "detect", "inpaint", "inpaint", "heal"])
        h = {"v": PROTOCOL_VERSION, "type": t, "id": self.new_id()}
        bufs: list = []
        if t == "hello":
            h["client"] = "fuzz"
        elif t == "cancel":
            h["target"] = r.choice(list(self._recent_ids) or ["nothing"]) if r.random() < 0.5 else self.new_id()
        elif t.startswith("models.") and t != "models.list":
            h["name"] = r.choice([SEED_MODEL, "fz-imp-1", "fz-nothing"])
        elif t in JOB_TYPES:
            desc, pix = self.image(1)
            h["image"], bufs = desc, [pix]
            if t == "inpaint" or (t == "heal" and r.random() < 0.3):
                w, hh = desc["width"], desc["height"]
                h["mask"] = ImageDesc.packed(w, hh, "GRAY", "u8", 2).to_dict()
                bufs.append(bytes(r.choice((0, 255)) for _ in range(w * hh)))
            elif r.random() < 0.3:
                h["model"] = r.choice(["auto", "base", "", None, SEED_MODEL, "fz-nothing"])
                h["camera"] = {"make": "Fuzz", "model": "F1"}
        self._recent_ids.append(h["id"])
        return h, bufs

    @staticmethod
    def pack(header) -> bytes:
        return msgpack.packb(header, use_bin_type=True)

    # -- generators -----------------------------------------------------------------
    def case(self) -> FuzzCase:
        for _ in range(20):
            kind = self.rng.choices(self._kinds, self._weights)[0]
            try:
                return FuzzCase(kind, getattr(self, "_gen_" + kind)())
            except OverflowError:  # a hostile int that msgpack cannot carry: draw another message
                continue
        raise RuntimeError("the fuzzer keeps drawing messages msgpack cannot pack")

    def _gen_random_bytes(self):
        r = self.rng
        n = r.choice([0, 1, 2, 5, 16, 64, r.randint(0, 4096)])
        return [r.randbytes(n)] + [r.randbytes(r.randint(0, 64)) for _ in range(r.choice([0, 0, 1, 2]))]

    def _gen_truncated(self):
        h, bufs = self.valid_message()
        raw = self.pack(h)
        return [raw[:self.rng.randint(0, len(raw) - 1)], *bufs]

    def _gen_bitflip(self):
        h, bufs = self.valid_message()
        raw = bytearray(self.pack(h))
        for _ in range(self.rng.choice([1, 1, 2, 3, 8])):
            raw[self.rng.randrange(len(raw))] ^= 1 << self.rng.randrange(8)
        if bufs and self.rng.random() < 0.3:  # and the pixels
            b = bytearray(bufs[0])
            if b:
                b[self.rng.randrange(len(b))] ^= 0xFF
            bufs[0] = bytes(b)
        return [bytes(raw), *bufs]

    def _gen_splice(self):
        r = self.rng
        h, bufs = self.valid_message()
        raw = bytearray(self.pack(h))
        i = r.randrange(len(raw))
        op = r.choice(["insert", "delete", "replace", "repeat"])
        if op == "insert":
            raw[i:i] = r.randbytes(r.randint(1, 16))
        elif op == "delete":
            del raw[i:i + r.randint(1, 8)]
        elif op == "replace":
            raw[i:i + 4] = r.randbytes(4)
        else:
            raw += raw[i:]
        return [bytes(raw), *bufs]

    def _gen_field_type(self):
        r = self.rng
        h, bufs = self.valid_message()
        keys = list(h) + ["image", "mask", "markers", "target", "name", "model", "threshold", "mode"]
        for _ in range(r.choice([1, 1, 2, 3])):
            k = r.choice(keys)
            if r.random() < 0.25:
                h.pop(k, None)
            else:
                h[k] = self.hostile_value()
        self._defuse_markers(h)
        return [self.pack(h), *bufs]

    def _gen_envelope(self):
        r = self.rng
        h, bufs = self.valid_message()
        what = r.choice(["v", "v", "id", "id", "type", "order", "extra"])
        if what == "v":
            h["v"] = r.choice([0, 2, -1, 99, "1", 1.0, 1.5, True, None, [1], (1 << 64) - 1])
        elif what == "id":
            h["id"] = r.choice(HOSTILE_IDS + [5, None, ["x"], {"id": "x"}])
        elif what == "type":
            h["type"] = r.choice(["", "HELLO", "hello ", "models", "models.", "models.frobnicate", "_on_hello",
                                  "__init__", "job", "progress", "result", "error", "cancelled", "x" * 64,
                                  "x" * 65, "x" * 5000, "héllo", 7, None, ["hello"]])
        elif what == "order":  # the same fields in another order, and a duplicate key packed by hand
            items = list(h.items())
            r.shuffle(items)
            raw = bytearray(msgpack.packb(dict(items), use_bin_type=True))
            return [bytes(raw), *bufs]
        else:
            for _ in range(r.randint(1, 20)):
                h[r.choice(["x", "extra", "_", "ß", "__class__", "type2", "idx"]) + str(r.randint(0, 99))] = \
                    self.hostile_value()
        return [self.pack(h), *bufs]

    def _job(self, kind=None) -> tuple[dict, list]:
        r = self.rng
        kind = kind or r.choice(JOB_TYPES)
        desc, pix = self.image(1)
        h = {"v": PROTOCOL_VERSION, "type": kind, "id": self.new_id(), "image": desc}
        bufs = [pix]
        if kind == "inpaint" or r.random() < 0.2:
            h["mask"] = {"frame": 2, "width": desc["width"], "height": desc["height"], "channels": 1,
                         "order": "GRAY", "dtype": "u8", "stride": desc["width"]}
            bufs.append(b"\xff" * (desc["width"] * desc["height"]))
        return h, bufs

    def _gen_image(self):
        r = self.rng
        h, bufs = self._job()
        target = h["mask"] if ("mask" in h and r.random() < 0.3) else h["image"]
        for _ in range(r.choice([1, 1, 2])):
            k = r.choice(IMAGE_KEYS)
            choice = r.random()
            if choice < 0.5:
                target[k] = r.choice(HOSTILE_INTS) if k not in ("order", "dtype") else r.choice(
                    ["rgb", "CMYK", "", "RGBAA", "u32", "f64", "i8", "U8", 3, None])
            elif choice < 0.7:
                target.pop(k, None)
            elif choice < 0.85:
                target[k] = self.hostile_value()
            else:  # huge, and consistent with each other: only the frame can tell
                w = r.choice([65536, 65537, 20000, 1 << 20, 17321])
                ch = target.get("channels")
                target.update(width=w, height=r.choice([1, 65536, 17321, 1 << 20]),
                              stride=w * 4 * (ch if isinstance(ch, int) and 1 <= ch <= 4 else 1))
        if r.random() < 0.1:
            h[r.choice(["image", "mask"])] = self.hostile_value()
        return [self.pack(h), *bufs]

    def _gen_frames(self):
        r = self.rng
        h, bufs = self._job()
        op = r.choice(["none", "short", "long", "too_many", "empty", "swap", "frame_index", "many_empty"])
        if op == "none":
            bufs = []
        elif op == "short" and bufs[0]:
            bufs[0] = bufs[0][:-1]
        elif op == "long":
            bufs[0] = bufs[0] + b"\0" * r.choice([1, 7, 4096])
        elif op == "too_many":
            bufs = bufs + [b"\0" * r.randint(0, 16) for _ in range(r.randint(7, 14))]
        elif op == "empty":
            bufs = [b""] * len(bufs)
        elif op == "swap":
            bufs = bufs[::-1]
        elif op == "frame_index":
            h["image"]["frame"] = r.choice([0, -1, 2, 3, 8, 9, 1 << 40])
        else:
            bufs = [b""] * r.randint(9, 40)
        return [self.pack(h), *bufs]

    def _gen_nesting(self):
        r = self.rng
        h, bufs = self.valid_message()
        depth = r.choice([10, 100, 500, 1000, 1023, 1024, 1025, 2000, 5000])
        key = r.choice(["extra", "markers", "camera", "image", "threshold", "target", "name"])
        inner = b"\xc0"
        opener = r.choice([b"\x91", b"\x81\xa1k", b"\x92\xc0"])
        nested = opener * depth + inner
        if opener == b"\x92\xc0":  # arrays of two whose second element follows the whole nest
            nested = b"\x92" * depth + inner + b"\xc0" * depth
        h.pop(key, None)
        raw = self.pack(h)
        # append one more key to the header map, whose value is the nest
        n = len(h) + 1
        prefix = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
        body = raw[1:] if raw[0] & 0xF0 == 0x80 else raw[3:]
        return [prefix + body + self.pack(key) + nested, *bufs]

    def _gen_raw_containers(self):
        """Containers and strings that declare far more than the header holds."""
        r = self.rng
        choice = r.choice(["str32", "bin32", "array32", "map32", "ext32", "array16_deep", "map16_deep",
                           "array16_short", "int_key", "nil_key", "bin_value", "ext_value", "float_key",
                           "timestamp"])
        env = self.pack({"v": PROTOCOL_VERSION, "type": "hello", "id": self.new_id()})
        if choice == "str32":
            raw = b"\xdb\xff\xff\xff\xff" + b"abc"
        elif choice == "bin32":
            raw = b"\xc6\x7f\xff\xff\xff" + b"abc"
        elif choice == "array32":
            raw = b"\xdd\xff\xff\xff\xff\xc0"
        elif choice == "map32":
            raw = b"\xdf\xff\xff\xff\xff\xa1a\xc0"
        elif choice == "ext32":
            raw = b"\xc9\xff\xff\xff\xff\x05"
        elif choice == "array16_deep":  # each level declares the most a header may hold, none is filled
            raw = b"\xdc\x4e\x60" * r.choice([1, 10, 100, 400, 1100])
        elif choice == "map16_deep":
            raw = b"\xde\x4e\x60\xa1k" * r.choice([1, 10, 100, 400, 1100])
        elif choice == "array16_short":
            raw = bytes([0x84]) + env[1:] + b"\xa5extra\xdc\xff\xff" + b"\xc0" * r.randint(0, 100)
        elif choice == "int_key":
            raw = bytes([0x84]) + env[1:] + b"\x07\xc0"
        elif choice == "nil_key":
            raw = bytes([0x84]) + env[1:] + b"\xc0\xc0"
        elif choice == "float_key":
            raw = bytes([0x84]) + env[1:] + b"\xcb" + struct.pack(">d", 1.5) + b"\xc0"
        elif choice == "bin_value":
            raw = bytes([0x84]) + env[1:] + b"\xa1x\xc4\x03abc"
        elif choice == "ext_value":
            raw = bytes([0x84]) + env[1:] + b"\xa1x\xd4\x05\x01"
        else:  # a msgpack timestamp (ext -1)
            raw = bytes([0x84]) + env[1:] + b"\xa1x\xd6\xff\x00\x00\x00\x01"
        return [raw]

    def _gen_giant(self):
        r = self.rng
        h, bufs = self.valid_message()
        lim = self.limits.max_header_bytes
        what = r.choice(["under", "over", "type", "id", "target", "name", "order"])
        if what == "under":
            h["pad"] = "p" * (lim - 200)
        elif what == "over":
            h["pad"] = "p" * (lim + 1)
        elif what == "type":
            h["type"] = "t" * r.choice([1000, 100_000])
        elif what == "id":
            h["id"] = "i" * r.choice([1000, 100_000])
        elif what == "target":
            h.update(type="cancel", target="t" * 500_000)
        elif what == "name":
            h.update(type=r.choice(["models.show", "models.delete", "models.export"]), name="n" * 500_000)
        else:
            h["image"] = {"order": "o" * 500_000}
            h["type"] = "detect"
        return [self.pack(h), *bufs]

    def _gen_markers(self):
        r = self.rng
        h, bufs = self._job(r.choice(["heal", "detect"]))
        ok = {"x": 1.0, "y": 1.0, "r": 2.0}
        bad = r.choice([
            5, "dust", [ok], {"dust": "x"}, {"dust": {"x": 1}}, {"dust": [1, 2]}, {"dust": [ok, None]},
            {"dust": [{"x": 1}]}, {"dust": [{"x": "a", "y": 1}]}, {"dust": [{"x": float("nan"), "y": 1}]},
            {"dust": [{"x": float("inf"), "y": 1}]}, {"dust": [{"x": 1, "y": 1, "r": 0}]},
            {"dust": [{"x": 1, "y": 1, "r": -3}]}, {"dust": [{"x": 1e300, "y": 1}]},
            {"dust": [{"x": (1 << 64) - 1, "y": 1}]}, {"dust": [{"x": [1], "y": 1}]},
            {"dust": [ok] * (self.limits.max_markers + 1)},
            {"dust": [ok] * (self.limits.max_markers // 2 + 1), "not_dust": [ok] * (self.limits.max_markers // 2 + 1)},
            {"not_dust": [ok] * 3, "dust": [{"y": 2}]}, {"dust": [_nested(200)]},
            {"dust": [{"x": 1, "y": 1, "r": float("nan")}]}, {"dust": [{"x": True, "y": 1, "r": "inf"}]},
        ])
        h["markers"] = bad
        self._defuse_markers(h)
        return [self.pack(h), *bufs]

    @staticmethod
    def _defuse_markers(h: dict) -> None:
        """No fuzz message may start a fine-tune: a valid non-empty dust list gets one bad marker."""
        m = h.get("markers")
        if isinstance(m, dict) and isinstance(m.get("dust"), list) and m["dust"] \
                and len(m["dust"]) <= 10_000:
            try:
                if all(isinstance(x, dict) for x in m["dust"]):
                    m["dust"] = [*m["dust"], {"x": "not a number"}]
            except Exception:
                pass

    def _gen_job_fields(self):
        r = self.rng
        h, bufs = self._job(r.choice(["heal", "detect"]))
        for _ in range(r.randint(1, 3)):
            k = r.choice(["mode", "threshold", "model", "save_model", "camera", "markers"])
            v = r.choice([self.hostile_value(), r.choice(HOSTILE_NAMES), r.choice([-1, 0, 1, 0.5, 2, float("nan")]),
                          {"make": r.choice(HOSTILE_NAMES), "model": self.hostile_value()},
                          {"make": _nested(r.choice([10, 500, 1000]))}, "scratch", "transfer"])
            h[k] = v
        self._defuse_markers(h)
        return [self.pack(h), *bufs]

    def _gen_cancel(self):
        r = self.rng
        target = r.choice([self.new_id(), r.choice(list(self._recent_ids) or ["x"]), "", 5, None, ["x"],
                           "t" * 1000, r.choice(HOSTILE_IDS), {"id": "x"}])
        h = {"v": PROTOCOL_VERSION, "type": "cancel", "id": self.new_id()}
        if r.random() < 0.9:
            h["target"] = target
        return [self.pack(h)]

    def _gen_models(self):
        r = self.rng
        t = r.choice(["models.list", "models.show", "models.delete", "models.export", "models.import"])
        h = {"v": PROTOCOL_VERSION, "type": t, "id": self.new_id()}
        if r.random() < 0.9:
            h["name"] = r.choice(HOSTILE_NAMES + [self.hostile_value()])
        bufs = []
        if t == "models.import":
            bufs = r.choice([[], [b""], [r.randbytes(r.randint(1, 200))], [b"x", b"y"], [b"\0" * 8] * 3])
        return [self.pack(h), *bufs]

    def _gen_model_import(self):
        r = self.rng
        h = {"v": PROTOCOL_VERSION, "type": "models.import", "id": self.new_id()}
        if r.random() < 0.8:
            h["name"] = r.choice(["fz-imp-1", "fz-imp-2", "fz-imp-1", r.choice(HOSTILE_NAMES)])
        if not self.seed_model:
            return [self.pack(h), r.randbytes(64)]
        op = r.random()
        if op < 0.4:
            label, blob = r.choice(self._hostile_models)
        else:
            blob = bytearray(self.seed_model)
            if op < 0.7:  # flips in the header, where the sizes and the metadata are
                n = struct.unpack("<Q", bytes(blob[:8]))[0]
                for _ in range(r.randint(1, 4)):
                    blob[r.randrange(min(len(blob), n + 8))] ^= 1 << r.randrange(8)
            elif op < 0.85:
                blob = blob[:r.randrange(len(blob))]
            else:
                for _ in range(r.randint(1, 16)):
                    blob[r.randrange(len(blob))] ^= 0xFF
            blob = bytes(blob)
        return [self.pack(h), blob]

    def _gen_unknown_type(self):
        r = self.rng
        h = {"v": PROTOCOL_VERSION, "type": r.choice(["frobnicate", "heal2", "models.rename", "shutdown", "exec",
                                                      "status.", "hello.world", "kill", "progress"]),
             "id": self.new_id()}
        for _ in range(r.randint(0, 4)):
            h["f" + str(r.randint(0, 9))] = self.hostile_value()
        return [self.pack(h)] + [r.randbytes(8) for _ in range(r.randint(0, 2))]

    def _gen_valid(self):
        h, bufs = self.valid_message()
        return [self.pack(h), *bufs]

    def _gen_duplicate_id(self):
        """Two jobs with one id (a client bug the daemon must survive)."""
        h, bufs = self._job("inpaint")
        if self._recent_ids:
            h["id"] = self._recent_ids[-1]
        return [self.pack(h), *bufs]


# --------------------------------------------------------------------------------------
# a live daemon under fuzz
# --------------------------------------------------------------------------------------

@dataclass
class FuzzReport:
    seed: int
    sent: int = 0
    answered: int = 0            # messages that got their one final reply
    ignored: int = 0             # messages that got none (allowed: SPEC says answered or ignored)
    jobs_run: int = 0            # fuzz messages that became real jobs (tiny)
    jobs_cancelled: int = 0
    hellos: int = 0              # hello round trips in between batches
    daemon_lost: bool = False    # a hello went unanswered: the daemon is down or wedged
    seconds: float = 0.0
    kinds: Counter = field(default_factory=Counter)
    codes: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def merge(self, other: FuzzReport) -> None:
        for k in ("sent", "answered", "ignored", "jobs_run", "jobs_cancelled", "hellos", "seconds"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.daemon_lost |= other.daemon_lost
        self.kinds.update(other.kinds)
        self.codes.update(other.codes)
        self.problems.extend(other.problems)


def _expectation(frames: list, limits: Limits) -> tuple[str, str | None, bool]:
    """(id the reply must carry, error code it must have or None, whether it may be a queued job)."""
    try:
        msg = decode(frames, limits)
    except ProtocolError as e:
        return e.request_id, e.code, False
    return msg.id, None, msg.type in JOB_TYPES


def _check_event(h) -> str | None:
    """What is wrong with an event's header, or None."""
    if not isinstance(h, dict):
        return f"event header is not a map: {h!r:.100}"
    if h.get("v") != PROTOCOL_VERSION or not isinstance(h.get("id"), str):
        return f"event without v/id: {h!r:.200}"
    t = h.get("type")
    if t not in ("progress", *FINAL):
        return f"unknown event type {t!r}"
    if t == "error":
        if h.get("code") not in ERROR_CODES:
            return f"error code {h.get('code')!r} is not in SPEC §5"
        if not isinstance(h.get("message"), str) or not h["message"].strip():
            return f"error without a message: {h!r:.200}"
    return None


def fuzz_daemon(endpoint: str, count: int, seed: int, *, seed_model: bytes | None = None,
                limits: Limits | None = None, batch: int = 50, job_timeout: float = 30.0,
                hello_timeout: float = 20.0, fuzzer: MessageFuzzer | None = None,
                home: str | Path | None = None) -> FuzzReport:
    """Send ``count`` fuzz messages to the daemon at ``endpoint``, ``batch`` at a time, a hello after each batch.

    Every reply is attributed to the message it answers by the id the protocol's own
    decoder reads from that message (``""`` when it reads none). Problems: more than one
    final reply for a message, a reply for an id never sent, a wrong error code for a
    broken envelope, an event that breaks SPEC §5, any ``internal`` error, a progress
    event for a request that is not a job, or a hello that goes unanswered. Jobs still
    open when the hello comes back are cancelled and their final replies awaited.
    """
    fz = fuzzer or MessageFuzzer(seed, seed_model, limits)
    limits = limits or fz.limits
    rep = FuzzReport(seed)
    t0 = time.monotonic()
    sock = raw_socket(endpoint, home)
    try:
        while rep.sent < count and not rep.daemon_lost:
            _fuzz_batch(sock, fz, min(batch, count - rep.sent), limits, rep, job_timeout, hello_timeout)
        # nothing may come after a batch is done
        while not rep.daemon_lost and sock.poll(300):
            frames = sock.recv_multipart()
            rep.problems.append(f"a reply after its batch was done: {frames[0][:200]!r}")
    finally:
        sock.close(0)
    rep.seconds = time.monotonic() - t0
    return rep


def _fuzz_batch(sock: zmq.Socket, fz: MessageFuzzer, n: int, limits: Limits, rep: FuzzReport,
                job_timeout: float, hello_timeout: float) -> None:
    cases = [fz.case() for _ in range(n)]
    expected: Counter = Counter()                 # id → how many final replies it may get
    expected_code: dict[str, set] = defaultdict(set)
    job_ids: set[str] = set()
    kind_of: dict[str, str] = {}
    for c in cases:
        rid, code, job = _expectation(c.frames, limits)
        expected[rid] += 1
        kind_of.setdefault(rid, c.kind)
        expected_code[rid].add(code)
        if job:
            job_ids.add(rid)
        rep.kinds[c.kind] += 1
        sock.send_multipart(c.frames, copy=False)
    rep.sent += n
    rep.hellos += 1
    sync_id = f"sync-{fz.seed % 65536:x}-{rep.hellos}"
    sock.send_multipart([msgpack.packb({"v": PROTOCOL_VERSION, "type": "hello", "id": sync_id})])
    finals: Counter = Counter()
    last_final: dict[str, str] = {}
    queued: set[str] = set()
    acks: dict[str, int] = {}                     # cancel id → replies so far
    synced: list = []
    where = f"(seed {fz.seed}, batch {rep.hellos}, messages up to #{fz.count})"

    def take(frames) -> None:
        """Check and count one event."""
        try:
            h = msgpack.unpackb(frames[0], raw=False)
        except Exception as e:
            rep.problems.append(f"undecodable reply ({type(e).__name__}) {where}")
            return
        bad = _check_event(h)
        if bad:
            rep.problems.append(f"{bad} {where}")
            return
        rid, t = h["id"], h["type"]
        if rid == sync_id:
            if t != "result" or h.get("protocol") != PROTOCOL_VERSION:
                rep.problems.append(f"hello answered with {h!r:.200} {where}")
            synced.append(t)
            return
        if rid in acks:
            if t in FINAL:
                acks[rid] += 1
                if acks[rid] > 1 or t != "result" or not isinstance(h.get("cancelled"), bool):
                    rep.problems.append(f"cancel {rid!r} answered with {h!r:.200} {where}")
            return
        if rid not in expected:
            rep.problems.append(f"reply for id {rid!r} that no message carries: {h!r:.200} {where}")
            return
        if t == "progress":
            if rid not in job_ids:
                rep.problems.append(f"progress for a request that is not a job ({kind_of[rid]}): {h!r:.200}")
            elif finals[rid] >= expected[rid]:
                rep.problems.append(f"progress after the final reply for {rid!r}: {h!r:.200} {where}")
            queued.add(rid)
            return
        finals[rid] += 1
        last_final[rid] = t
        if finals[rid] > expected[rid]:
            rep.problems.append(f"{finals[rid]} final replies for id {rid!r} ({kind_of[rid]}): {h!r:.200} {where}")
        if t == "error":
            rep.codes[h["code"]] += 1
            codes = expected_code[rid]  # (a bit flip can give two messages of a batch one id)
            if expected[rid] == 1 and None not in codes and h["code"] not in codes:
                rep.problems.append(f"{kind_of[rid]} message {rid!r}: error {h['code']!r} where the codec says "
                                    f"{sorted(codes)}: {h.get('message')!r:.200} {where}")
            if h["code"] == "internal":
                rep.problems.append(f"internal error on a {kind_of[rid]} message {where}: {h.get('message')!r:.300}")
        else:
            rep.codes[t] += 1

    def wait(done, timeout: float, what: str) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                rep.problems.append(f"{what} {where}")
                return False
            take(sock.recv_multipart())
        return True

    # 1) the I/O loop answers everything but jobs at once, so those replies come before the hello's
    if not wait(lambda: bool(synced), hello_timeout, f"no hello reply within {hello_timeout:.0f} s"):
        rep.daemon_lost = True
        return
    # 2) jobs still open: cancel them and wait for their final replies and the cancels' replies
    open_jobs = [rid for rid in job_ids if rid in queued and finals[rid] < expected[rid]]
    for rid in open_jobs:
        cid = f"cx-{rid}"[:64]
        acks[cid] = 0
        sock.send_multipart([msgpack.packb({"v": PROTOCOL_VERSION, "type": "cancel", "id": cid, "target": rid})])
    wait(lambda: all(finals[r] >= expected[r] for r in open_jobs) and all(acks.values()), job_timeout,
         f"jobs or cancels without a final reply {job_timeout:.0f} s after the cancel: "
         f"{[r for r in open_jobs if finals[r] < expected[r]][:5]}")
    rep.jobs_run += len(queued)
    rep.jobs_cancelled += sum(1 for rid in open_jobs if last_final.get(rid) == "cancelled")
    # 3) a message whose id got no final reply was ignored
    for rid, k in expected.items():
        rep.answered += min(k, finals[rid])
        rep.ignored += max(0, k - finals[rid])


# --------------------------------------------------------------------------------------
# load: many clients, mixed jobs, cancels
# --------------------------------------------------------------------------------------

@dataclass
class LoadJob:
    """One planned request of one client and everything that happened to it."""
    client: int
    index: int
    rid: str
    kind: str
    side: int
    cancel: str | None            # None, "queued" (cancel right after submit) or "running" (once it fine-tunes)
    fields: dict
    buffers: list
    submitted: float = 0.0
    final_at: float = 0.0
    started_at: float = 0.0       # first progress event past "queued"
    cancel_sent: float = 0.0
    cancel_ack: dict | None = None
    events: list = field(default_factory=list)  # (t, type, header without buffers)

    @property
    def finals(self) -> list:
        return [e for e in self.events if e[1] in FINAL]

    @property
    def final_type(self) -> str | None:
        f = self.finals
        return f[-1][1] if f else None

    @property
    def ran(self) -> bool:
        """Reached the worker: a result, or a first stage past 'queued'."""
        return self.final_type == "result" or self.started_at > 0


@dataclass
class LoadReport:
    clients: int
    jobs_per_client: int
    jobs: list[LoadJob] = field(default_factory=list)
    strays: list = field(default_factory=list)      # events for ids the client never sent
    blocker: dict = field(default_factory=dict)
    peak_rss_kb: int = 0
    base_rss_kb: int = 0
    seconds: float = 0.0
    max_spread: int = 0           # fairness: most jobs one client was ahead of another while all were busy
    problems: list[str] = field(default_factory=list)

    def count(self, final: str) -> int:
        return sum(1 for j in self.jobs if j.final_type == final)

    def latencies(self) -> list[float]:
        """Seconds from submit to final reply, for the jobs that ended with a result."""
        return [j.final_at - j.submitted for j in self.jobs if j.final_type == "result"]

    def cancel_latencies(self) -> list[float]:
        return [j.final_at - j.cancel_sent for j in self.jobs
                if j.cancel == "running" and j.final_type == "cancelled" and j.cancel_sent]


_IMAGES: dict = {}


def load_image(side: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(RGB u8 pixels, GRAY u8 mask 255 = dust, markers) cut from the bundled sample; cached."""
    key = (side, seed)
    if key not in _IMAGES:
        from .conftest import dusty_image, markers_for, to_u8

        _, dusty, truth = dusty_image(side, seed=seed, count=max(2, side // 24))
        _IMAGES[key] = (to_u8(dusty), truth.astype(np.uint8)[:, :, None] * 255, markers_for(truth, 4))
    return _IMAGES[key]


def plan_load(clients: int, jobs: int, seed: int = 0, sides=(32, 48, 64, 96, 128, 192, 256),
              cancel_queued=(12, 20), cancel_running=(7,)) -> list[list[LoadJob]]:
    """Each client's jobs: a seeded mix of inpaint / detect / heal (base model) of mixed sizes.

    Job ``cancel_running`` of each client is a scratch fine-tune, cancelled at its first
    ``finetune`` progress event; jobs ``cancel_queued`` are cancelled right after they are sent.
    """
    out = []
    for c in range(clients):
        r = random.Random(seed * 7919 + c)
        plan = []
        for j in range(jobs):
            side = r.choice(sides)
            img, mask, markers = load_image(side, r.randrange(4))
            desc = ImageDesc.packed(side, side, "RGB", "u8").to_dict()
            cancel = "running" if j in cancel_running else "queued" if j in cancel_queued else None
            if cancel == "running":  # long enough to be caught running: fine-tuning from scratch
                side = 128
                img, _, markers = load_image(side, 0)
                kind, bufs = "heal", [img]
                fields = {"image": ImageDesc.packed(side, side, "RGB", "u8").to_dict(),
                          "markers": {"dust": markers}, "mode": "scratch"}
            else:
                kind = r.choice(["inpaint", "inpaint", "detect", "heal"])
                if kind == "inpaint":
                    fields = {"image": desc, "mask": ImageDesc.packed(side, side, "GRAY", "u8", 2).to_dict()}
                    bufs = [img, mask]
                else:
                    fields, bufs = {"image": desc}, [img]
            plan.append(LoadJob(c, j, f"c{c}-j{j}", kind, side, cancel, fields, bufs))
        out.append(plan)
    return out


def _client_thread(endpoint: str, home, plan: list[LoadJob], window: int, ready: threading.Event,
                   report: LoadReport, deadline: float) -> None:
    """One client (one socket): keeps ``window`` jobs open, cancels as planned, records every event."""
    by_id = {j.rid: j for j in plan}
    acks = {f"cx-{j.rid}": j for j in plan}
    pending = deque(plan)
    open_: set[str] = set()
    first_window = {j.rid for j in plan[:window]}
    queued_seen: set[str] = set()
    with Client(endpoint, home=home) as c:
        try:
            while pending or open_:
                now = time.monotonic()
                if now > deadline:
                    report.problems.append(f"client {plan[0].client}: {len(open_)} jobs still open and "
                                           f"{len(pending)} unsent at the deadline: {sorted(open_)[:5]}")
                    break
                while pending and len(open_) < window:
                    job = pending.popleft()
                    job.submitted = time.monotonic()
                    c.submit(job.kind, job.fields, job.buffers, id_=job.rid)
                    open_.add(job.rid)
                    if job.cancel == "queued":
                        job.cancel_sent = time.monotonic()
                        c.submit("cancel", {"target": job.rid}, id_=f"cx-{job.rid}")
                for ev in c.poll(0.02):
                    t = time.monotonic()
                    rid = ev.header.get("id")
                    if rid in acks and ev.type in FINAL:
                        job = acks[rid]
                        if job.cancel_ack is not None:
                            report.problems.append(f"two replies to the cancel of {job.rid}")
                        job.cancel_ack = dict(ev.header)
                        continue
                    job = by_id.get(rid)
                    if job is None:
                        report.strays.append(dict(ev.header))
                        continue
                    job.events.append((t, ev.type, {k: v for k, v in ev.header.items() if k not in ("mask", "healed")}))
                    if ev.type == "progress":
                        if ev.get("stage") == "queued":
                            queued_seen.add(rid)
                        else:
                            job.started_at = job.started_at or t
                            if job.cancel == "running" and not job.cancel_sent and ev.get("stage") == "finetune":
                                job.cancel_sent = time.monotonic()  # mid-computation, not between stages
                                c.submit("cancel", {"target": job.rid}, id_=f"cx-{job.rid}")
                    elif ev.type in FINAL:
                        job.final_at = t
                        open_.discard(rid)
                        queued_seen.add(rid)
                if not ready.is_set() and first_window <= queued_seen:
                    ready.set()
            # late duplicates or strays
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                for ev in c.poll(0.1):
                    rid = ev.header.get("id")
                    job = by_id.get(rid)
                    if job is not None:
                        job.events.append((time.monotonic(), ev.type, dict(ev.header)))
                    elif rid in acks:
                        report.problems.append(f"a second reply to the cancel of {acks[rid].rid}")
                    else:
                        report.strays.append(dict(ev.header))
        except Exception as e:  # a broken client thread is a finding, not a hang
            report.problems.append(f"client {plan[0].client} failed: {type(e).__name__}: {e}")
        finally:
            ready.set()


def blocker_job(side: int = 1536, spots: int = 8000) -> tuple[dict, list]:
    """An inpaint of thousands of small spots: tens of seconds of work, little memory, cancellable at once."""
    if ("blocker", side, spots) not in _IMAGES:
        rng = np.random.default_rng(0)
        img = (rng.random((side, side, 3)) * 255).astype(np.uint8)
        mask = np.zeros((side, side, 1), np.uint8)
        for y, x in rng.integers(0, side - 8, (spots, 2)):
            mask[y:y + 5, x:x + 5] = 255
        _IMAGES["blocker", side, spots] = (img, mask)
    img, mask = _IMAGES["blocker", side, spots]
    return ({"image": ImageDesc.packed(side, side, "RGB", "u8").to_dict(),
             "mask": ImageDesc.packed(side, side, "GRAY", "u8", 2).to_dict()}, [img, mask])


def start_blocker(endpoint: str, home=None, timeout: float = 120.0) -> tuple[Client, str]:
    """A long job (``blocker_job``) that keeps the worker busy until cancelled; returns once it runs."""
    c = Client(endpoint, timeout=timeout, home=home)
    fields, bufs = blocker_job()
    rid = c.submit("inpaint", fields, bufs, id_="blocker")
    for ev in c.events(rid):
        if ev.type == "progress" and ev.get("stage") not in (None, "queued"):
            return c, rid
        if ev.final:
            raise RuntimeError(f"the blocker job ended before it ran: {ev.header}")
    raise RuntimeError("the blocker job never started")


def stop_blocker(c: Client, rid: str) -> dict:
    """Cancel the blocker; its final event type and how long the cancel took."""
    t = time.monotonic()
    c.cancel(rid)
    final = [ev for ev in c.events(rid)][-1]
    c.close()
    return {"final": final.type, "cancel_s": time.monotonic() - t}


def run_load(endpoint: str, clients: int = 8, jobs: int = 25, seed: int = 0, window: int = 8,
             pid: int | None = None, timeout: float = 240.0, home=None, **plan_kw) -> LoadReport:
    """``clients`` threads with a Client each send ``jobs`` jobs (``window`` open at a time) to one daemon.

    A long inpaint (the blocker) holds the worker while every client queues its first
    window, so the daemon's queue order decides from the first job on; then the blocker is
    cancelled. ``pid``: the daemon's, to sample its memory.
    """
    plans = plan_load(clients, jobs, seed, **plan_kw)
    rep = LoadReport(clients, jobs)
    rep.jobs = [j for p in plans for j in p]
    rep.base_rss_kb = proc_status_kb(pid) if pid else 0
    t0 = time.monotonic()
    with RssSampler(pid) as rss:
        bc, brid = start_blocker(endpoint, home)
        readies = [threading.Event() for _ in plans]
        deadline = time.monotonic() + timeout
        threads = [threading.Thread(target=_client_thread, args=(endpoint, home, p, window, ev, rep, deadline),
                                    name=f"load-client-{i}", daemon=True)
                   for i, (p, ev) in enumerate(zip(plans, readies, strict=True))]
        for t in threads:
            t.start()
        for ev in readies:
            ev.wait(60)
        rep.blocker = stop_blocker(bc, brid)
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic() + 5))
    rep.peak_rss_kb = rss.peak_kb
    rep.seconds = time.monotonic() - t0
    check_load(rep)
    return rep


def check_load(rep: LoadReport, spread_limit: int | None = None) -> None:
    """Append to ``rep.problems`` whatever breaks SPEC §4/§7; set ``rep.max_spread``."""
    p = rep.problems
    if rep.blocker.get("final") != "cancelled":
        p.append(f"the blocker job ended with {rep.blocker.get('final')!r}, not 'cancelled'")
    for s in rep.strays:
        p.append(f"an event for an id the client never sent: {s!r:.200}")
    for j in rep.jobs:
        types = [e[1] for e in j.events]
        finals = [t for t in types if t in FINAL]
        if len(finals) != 1:
            p.append(f"{j.rid} ({j.kind}, cancel={j.cancel}): {len(finals)} final replies: {types}")
            continue
        if types[-1] not in FINAL:
            p.append(f"{j.rid}: events after its final reply: {types}")
        final = finals[0]
        if final == "error":
            err = j.finals[0][2]
            p.append(f"{j.rid} ({j.kind} {j.side}px): error {err.get('code')}: {err.get('message')}")
        if j.cancel:
            ack = j.cancel_ack
            if ack is None or ack.get("type") != "result" or not isinstance(ack.get("cancelled"), bool):
                p.append(f"{j.rid}: the cancel got {ack!r:.200}, not a result with 'cancelled'")
            elif ack["cancelled"] and final != "cancelled":
                p.append(f"{j.rid}: cancel answered cancelled=true but the job ended with {final!r}")
            elif not ack["cancelled"] and final != "result":
                p.append(f"{j.rid}: cancel answered cancelled=false but the job ended with {final!r}")
            if j.cancel == "running":
                if final != "cancelled":
                    p.append(f"{j.rid}: a running fine-tune cancelled at once ended with {final!r}")
                elif j.final_at - j.cancel_sent > 2.5:
                    p.append(f"{j.rid}: cancel of a running job took {j.final_at - j.cancel_sent:.2f} s (SPEC: ≤ 1 s)")
        elif final != "result":
            p.append(f"{j.rid}: ended with {final!r} though nobody cancelled it")
    # fairness: while every client still has work to run, none runs ahead of another by more than a round
    ran = sorted((j for j in rep.jobs if j.ran), key=lambda j: j.final_at)
    left = Counter(j.client for j in ran)
    done: Counter = Counter({c: 0 for c in left})
    spread = 0
    for j in ran:
        if min(left.values()) == 0:
            break
        done[j.client] += 1
        left[j.client] -= 1
        if min(left.values()) == 0:
            break
        spread = max(spread, max(done.values()) - min(done.values()))
    rep.max_spread = spread
    limit = spread_limit if spread_limit is not None else 4  # 1 by design; the rest is thread wake-up jitter
    if spread > limit:
        p.append(f"unfair: one client got {spread} jobs ahead of another while both had work queued "
                 f"(round-robin keeps it at 1; allowed {limit})")


# --------------------------------------------------------------------------------------
# flood: past the queue limits and back
# --------------------------------------------------------------------------------------

@dataclass
class FloodReport:
    accepted: int = 0
    busy: int = 0
    busy_messages: set = field(default_factory=set)
    drained: int = 0
    queue_when_full: int = -1
    order: list = field(default_factory=list)       # client index of each job as it finished
    base_rss_kb: int = 0
    peak_rss_kb: int = 0
    job_bytes: int = 0
    spread: int = 0
    blocker: dict = field(default_factory=dict)
    drain_seconds: float = 0.0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def flood(endpoint: str, limits: dict, pid: int | None = None, side: int = 512, extra_clients: int = 1,
          rejected_extra: int = 3, timeout: float = 120.0, home=None) -> FloodReport:
    """Fill the queue to its limits while a blocker holds the worker, overflow it, then drain it.

    Client 0 sends one job more than the per-client limit; clients 1.. fill the total; the
    ``extra_clients`` after them send ``rejected_extra`` jobs each into a full queue. Every
    job past a limit must get exactly one ``busy`` error; every accepted job a result.
    """
    rep = FloodReport()
    per, total = int(limits["max_queue_per_client"]), int(limits["max_queue"])
    fill = -(-total // per)
    img = load_image(side, 2)[0]
    mask = np.zeros((side, side, 1), np.uint8)  # one small spot: the pixels are what is queued, not the work
    mask[side // 2:side // 2 + 4, side // 3:side // 3 + 4] = 255
    fields = {"image": ImageDesc.packed(side, side, "RGB", "u8").to_dict(),
              "mask": ImageDesc.packed(side, side, "GRAY", "u8", 2).to_dict()}
    rep.job_bytes = img.nbytes + mask.nbytes
    rep.base_rss_kb = proc_status_kb(pid) if pid else 0
    t0 = time.monotonic()
    clients = [Client(endpoint, timeout=timeout, home=home) for _ in range(fill + extra_clients)]
    sent: dict[str, int] = {}
    expect_busy: set[str] = set()
    try:
        with RssSampler(pid) as rss:
            bc, brid = start_blocker(endpoint, home)
            events: dict[str, list] = defaultdict(list)

            def collect(wait: float) -> None:
                for ci, c in enumerate(clients):
                    for ev in c.poll(wait if ci == 0 else 0):
                        rid = ev.header.get("id")
                        events[rid].append((time.monotonic(), ev.type, {k: v for k, v in ev.header.items()
                                                                          if k != "healed"}))
                        if ev.type == "result" and rid in sent:
                            rep.order.append(sent[rid])

            def answered(rids, wait_s: float = 30.0) -> None:
                end = time.monotonic() + wait_s
                while any(not events.get(r) for r in rids) and time.monotonic() < end:
                    collect(0.01)

            queued = 0
            for ci, c in enumerate(clients):
                n = per + 1 if ci == 0 else rejected_extra if ci >= fill else min(per, total - queued)
                mine = []
                for k in range(n):
                    rid = c.submit("inpaint", fields, [img, mask], id_=f"f{ci}-{k}")
                    sent[rid] = ci
                    mine.append(rid)
                    if k >= per or queued >= total:
                        expect_busy.add(rid)
                    else:
                        queued += 1
                # the daemon reads its connections in turn: let it take in this client's jobs before the next
                answered(mine)
            # every message has been answered at once (busy, or queued) before hello answers
            with Client(endpoint, home=home) as probe:
                rep.queue_when_full = int(probe.hello(timeout=10).get("queue", -1))
            rep.blocker = stop_blocker(bc, brid)
            t_drain = time.monotonic()
            end = t_drain + timeout
            while time.monotonic() < end and sum(1 for r in sent if any(e[1] in FINAL for e in events[r])) < len(sent):
                collect(0.002)
            rep.drain_seconds = time.monotonic() - t_drain
            time.sleep(0.2)
            collect(0.05)
            # the queue has room again
            rid = clients[-1].submit("inpaint", fields, [img, mask], id_="after-drain")
            try:
                ev = [e for e in clients[-1].events(rid, 60)][-1]
                if ev.type != "result":
                    rep.problems.append(f"a job after the drain got {ev.header!r:.200}")
            except Exception as e:
                rep.problems.append(f"a job after the drain got no answer: {e}")
        rep.peak_rss_kb = rss.peak_kb
    finally:
        for c in clients:
            c.close()
    for rid in sent:
        evs = events.get(rid, [])
        finals = [e for e in evs if e[1] in FINAL]
        if len(finals) != 1:
            rep.problems.append(f"{rid}: {len(finals)} final replies: {[e[1] for e in evs]}")
            continue
        t, typ, h = finals[0]
        if rid in expect_busy:
            if typ == "error" and h.get("code") == "busy":
                rep.busy += 1
                rep.busy_messages.add(h.get("message", ""))
                if len(evs) != 1:
                    rep.problems.append(f"{rid}: events besides its busy error: {[e[1] for e in evs]}")
            else:
                rep.problems.append(f"{rid}: past the limit but got {typ} {h.get('code', '')}")
        else:
            rep.accepted += 1
            if typ == "result":
                rep.drained += 1
            else:
                rep.problems.append(f"{rid}: accepted but ended with {typ} {h.get('code', '')}: {h.get('message')}")
    if rep.blocker.get("final") != "cancelled":
        rep.problems.append(f"the blocker ended with {rep.blocker.get('final')!r}")
    if rep.queue_when_full != total:
        rep.problems.append(f"hello said queue={rep.queue_when_full} with the queue full ({total})")
    for m in rep.busy_messages:
        if not m or "busy" not in m.lower():
            rep.problems.append(f"a busy error that does not say so: {m!r}")
    # round-robin: while every filling client has jobs left, none gets more than one ahead
    left = Counter(o for o in rep.order if o < fill)
    done: Counter = Counter({c: 0 for c in left})
    spread = 0
    for o in rep.order:
        if o >= fill or min(left.values()) == 0:
            break
        done[o] += 1
        left[o] -= 1
        if min(left.values()) == 0:
            break
        spread = max(spread, max(done.values()) - min(done.values()))
    rep.spread = spread
    if spread > 3:  # 1 by design; replies are read from one socket after another
        rep.problems.append(f"the full queue drained unfairly: one client {spread} jobs ahead of another "
                            f"(order {rep.order[:24]}...)")
    rep.seconds = time.monotonic() - t0
    return rep


# ------------------------------------------------------------------------------------------
# SIGKILL while saving
# ------------------------------------------------------------------------------------------

def two_models(tmp_path: Path) -> tuple[bytes, bytes]:
    """Two valid fine-tuned model files for the shipped base, told apart by their weights."""
    import torch

    from healdust.store import ModelStore, load_base_model

    base, meta = load_base_model()
    store = ModelStore(tmp_path / "make")
    out = []
    for shift in (0.01, -0.01):
        m = load_base_model()[0]
        with torch.no_grad():
            for p in m.decoder.parameters():
                p.add_(shift)
        store.save("roll", m, meta, "transfer", 5, 0.5)
        out.append(store.path("roll").read_bytes())
    return out[0], out[1]


def which_model(path, a: dict, b: dict) -> str:
    import torch

    from healdust.model.weights_io import load_weights

    tensors, _ = load_weights(path)  # raises on a torn file
    for name, ref in (("a", a), ("b", b)):
        if set(tensors) == set(ref) and all(torch.equal(tensors[k], ref[k]) for k in ref):
            return name
    raise AssertionError(f"{path} holds neither model")


def _import_forever(endpoint: str, home: Path, blobs: list[bytes], stop: threading.Event,
                    counts: list[int]) -> None:
    try:
        with Client(endpoint, timeout=5, home=home) as c:
            i = 0
            while not stop.is_set():
                c.call("models.import", {"name": "roll"}, [blobs[i % 2]])
                counts[0] += 1
                i += 1
    except Exception:  # the daemon was killed under us: expected
        pass


def sigkill_during_saves(tmp_path, kills: int, seed: int = 7) -> dict:
    """Kill a daemon that saves one model over and over, ``kills`` times at random moments.

    After every kill the model file must be one of the two versions, whole, and a restarted
    daemon must serve it. Returns the figures (bench/soak.py prints them).
    """
    from healdust.model.weights_io import load_weights

    from .conftest import DaemonProcess

    a_bytes, b_bytes = two_models(tmp_path)
    a_path, b_path = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a_path.write_bytes(a_bytes)
    b_path.write_bytes(b_bytes)
    a, b = load_weights(a_path)[0], load_weights(b_path)[0]
    home = tmp_path / "home"
    rng = random.Random(seed)
    saves, seen, midway = 0, {"a": 0, "b": 0}, 0
    for _ in range(kills):
        d = DaemonProcess(home)
        stop, counts = threading.Event(), [0]
        t = threading.Thread(target=_import_forever, args=(d.endpoint, home, [a_bytes, b_bytes], stop, counts))
        t.start()
        deadline = time.monotonic() + 30
        while counts[0] < 2 and time.monotonic() < deadline:  # let saves get going, then kill at random
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        d.stop(signal.SIGKILL)
        stop.set()
        t.join(10)
        saves += counts[0]
        assert counts[0] >= 2, "the daemon saved nothing before the kill"
        seen[which_model(home / "models" / "roll.safetensors", a, b)] += 1
        # a temporary file left behind: this kill caught a save (or an import's check) midway
        midway += any(p.name.startswith(".") for p in (home / "models").iterdir())
    d = DaemonProcess(home)  # a restart cleans the interrupted saves' temporary files
    try:
        with Client(d.endpoint, home=home) as c:
            assert c.call("models.show", {"name": "roll"}).get("model")["name"] == "roll"
        leftovers = [p.name for p in (home / "models").iterdir() if p.name != "roll.safetensors"]
        assert leftovers == [], leftovers
    finally:
        d.stop()
    return {"kills": kills, "saves": saves, "ended_as": seen, "midway": midway}
