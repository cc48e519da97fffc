"""Fuzzing: the codec with hypothesis, a live daemon with 10 000+ malformed messages.

Every message is validated before anything is allocated: the codec answers any frames with
a Message or a ProtocolError and nothing else, and what it accepts never makes the daemon
allocate more than the frames hold. The live run (tests/stress.py) checks that the daemon
answers or ignores each message, answers hello in between, never answers ``internal``, and
keeps its memory flat. Its seed is random unless HEALDUST_FUZZ_SEED is set, and is printed
with any failure.
"""

from __future__ import annotations

import math
import os
import random
import tracemalloc

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from healdust.protocol import DEFAULT_LIMITS, ImageDesc, Limits, ProtocolError, decode, encode
from healdust.protocol.client import Client
from healdust.protocol.codec import _ID_RE, parse_image, parse_markers

from .stress import (
    ERROR_CODES,
    JOB_TYPES,
    MessageFuzzer,
    fuzz_daemon,
    hostile_model_files,
    make_seed_model,
    proc_status_kb,
    raw_socket,
)

FUZZ_MESSAGES = 10_000
WARMUP_MESSAGES = 1_000
RSS_MARGIN_KB = 50 * 1024

# -- strategies --------------------------------------------------------------------------

ints = st.one_of(st.integers(-(1 << 63), (1 << 64) - 1), st.sampled_from([0, 1, -1, 65536, 65537, 300_000_001]))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["RGB", "GRAY", "BGRA", "u8", "u16", "f32", "f16"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                      max_leaves=12)
header_keys = st.one_of(st.sampled_from(["v", "type", "id", "image", "mask", "markers", "target", "name",
                                         "model", "frame", "width"]), st.text(max_size=6))
headers = st.dictionaries(header_keys, values, max_size=8).map(
    lambda d: {**d, **({"v": 1} if "v" not in d else {})})
IMAGE_KEYS = ["frame", "width", "height", "channels", "order", "dtype", "stride"]
image_values = st.one_of(values, st.sampled_from([[], {}, ["RGB"], {"RGB": 3}, b"RGB", 3.0, True]))


@st.composite
def image_maps(draw):
    """A valid small image map with some fields replaced by anything, and some dropped."""
    order = draw(st.sampled_from(["GRAY", "GRAYA", "RGB", "RGBA", "BGR", "BGRA"]))
    dtype = draw(st.sampled_from(["u8", "u16", "f16", "f32"]))
    w, h = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    d = ImageDesc.packed(w, h, order, dtype).to_dict()
    d.update(draw(st.dictionaries(st.sampled_from(IMAGE_KEYS), image_values, max_size=3)))
    for k in draw(st.sets(st.sampled_from(IMAGE_KEYS), max_size=2)):
        d.pop(k, None)
    return d


def _valid_frames(kind: str, w: int, h: int) -> list:
    desc = ImageDesc.packed(w, h, "RGB", "u8")
    if kind == "hello":
        return encode("hello", "h1", {"client": "x"})
    if kind == "cancel":
        return encode("cancel", "c1", {"target": "h1"})
    return encode(kind, "j1", {"image": desc.to_dict(), "markers": {"dust": [{"x": 1, "y": 2, "r": 3}]}},
                  [bytes(desc.min_bytes)])


def _check_outcome(frames: list, limits: Limits = DEFAULT_LIMITS):
    """decode → Message or ProtocolError (and the job fields → descriptions or ProtocolError)."""
    try:
        msg = decode(frames, limits)
    except ProtocolError as e:
        assert e.code in ERROR_CODES
        assert e.request_id == "" or _ID_RE.match(e.request_id)
        assert isinstance(e.message, str) and e.message
        return None
    assert _ID_RE.match(msg.id) and isinstance(msg.type, str) and msg.header["v"] == 1
    if msg.type in JOB_TYPES:
        for key in ("image", "mask"):
            try:
                desc = parse_image(msg.header.get(key), msg.buffers, key, limits)
            except ProtocolError as e:
                assert e.code in ("bad_request", "too_large")
            else:
                _check_desc(desc, msg.buffers, limits)
        try:
            parse_markers(msg.header.get("markers"), limits)
        except ProtocolError as e:
            assert e.code in ("bad_request", "too_large")
    return msg


def _check_desc(desc: ImageDesc, buffers: list, limits: Limits) -> None:
    size = len(buffers[desc.frame - 1])
    assert 1 <= desc.width <= limits.max_side and 1 <= desc.height <= limits.max_side
    assert desc.width * desc.height <= limits.max_pixels
    assert desc.stride >= desc.row_bytes and desc.min_bytes <= size <= desc.stride * desc.height


# -- the codec ---------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=12))
def test_decode_any_frames_gives_a_message_or_a_protocol_error(frames):
    _check_outcome(frames)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers, st.lists(st.binary(max_size=64), max_size=3))
def test_decode_any_header_map(header, buffers):
    _check_outcome([msgpack.packb(header, use_bin_type=True), *buffers])


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["hello", "cancel", "heal", "detect", "inpaint"]), st.integers(1, 9), st.integers(1, 9),
       st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "drop"]), st.integers(0, 1 << 16),
                          st.integers(0, 255)), min_size=1, max_size=6))
def test_decode_mutated_messages(kind, w, h, edits):
    frames = _valid_frames(kind, w, h)
    raw = bytearray(frames[0])
    for op, pos, byte in edits:
        i = pos % (len(raw) + 1)
        if op == "flip" and raw:
            raw[i % len(raw)] ^= 1 << (byte % 8)
        elif op == "cut":
            del raw[i:]
        elif op == "insert":
            raw[i:i] = bytes([byte])
        elif op == "drop":
            frames = frames[:1]
    _check_outcome([bytes(raw), *frames[1:]])


@settings(max_examples=600, deadline=None)
@given(image_maps(), st.lists(st.integers(0, 2048), max_size=3), st.booleans())
def test_parse_image_any_values(desc, sizes, exact):
    buffers = [bytes(n) for n in sizes]
    if exact and isinstance(desc.get("stride"), int) and isinstance(desc.get("height"), int):
        buffers = [bytes(max(0, min(1 << 16, desc["stride"] * desc["height"])))] + buffers
    try:
        d = parse_image(desc, buffers)
    except ProtocolError as e:
        assert e.code in ("bad_request", "too_large")
    else:
        _check_desc(d, buffers, DEFAULT_LIMITS)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 1 << 40), st.integers(1, 1 << 40), st.integers(-(1 << 40), 1 << 50),
       st.sampled_from(["GRAY", "RGB", "RGBA"]), st.sampled_from(["u8", "u16", "f32"]), st.integers(0, 4096))
def test_declared_sizes_never_allocate(width, height, stride, order, dtype, size):
    """Huge declared width, height and stride with a small frame: refused, and nothing sizeable allocated."""
    header = {"v": 1, "type": "heal", "id": "big", "image": {"frame": 1, "width": width, "height": height,
                                                              "channels": len(order) if order != "GRAY" else 1,
                                                              "order": order, "dtype": dtype, "stride": stride}}
    frames = [msgpack.packb(header), bytes(size)]
    tracemalloc.start()
    try:
        msg = decode(frames)
        try:
            parse_image(msg.header["image"], msg.buffers)
        except ProtocolError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"{peak} bytes allocated for a {len(frames[0])}-byte header and a {size}-byte frame"


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 24), st.one_of(st.just(1), st.integers(1, 24)), st.sampled_from(["GRAY", "GRAYA", "RGB", "BGRA"]),
       st.sampled_from(["u8", "u16", "f16", "f32"]),
       st.one_of(st.integers(0, 17), st.integers(0, (1 << 64) - 1 - 24 * 16),
                 st.sampled_from([(1 << 31), (1 << 63) - 1000, 1 << 63, (1 << 64) - 1 - 24 * 16])),
       st.integers(0, 16))
def test_accepted_images_read_no_more_than_their_frame(width, height, order, dtype, pad, extra):
    """What parse_image accepts, image_from_frame reads within the frame and copies at most the frame.

    One row may declare any stride at all (nothing follows it), up to the largest msgpack int.
    """
    from healdust.server import image_from_frame

    packed = ImageDesc.packed(width, height, order, dtype)
    if height > 1:
        pad %= 18
    stride = packed.stride + pad
    size = stride * (height - 1) + packed.row_bytes + min(extra, pad)
    buf = random.Random(size).randbytes(size)
    desc = parse_image(dict(packed.to_dict(), stride=stride), [buf])
    image_from_frame(desc, buf)  # numpy's first-call caches are not this call's allocation
    tracemalloc.start()
    try:
        arr = image_from_frame(desc, buf)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert arr.shape == (height, width, packed.channels)
    assert peak <= size + 4096
    assert arr.tobytes() == b"".join(buf[y * stride:y * stride + packed.row_bytes] for y in range(height))


@settings(max_examples=400, deadline=None)
@given(values)
def test_parse_markers_any_values(markers):
    try:
        out = parse_markers(markers)
    except ProtocolError as e:
        assert e.code in ("bad_request", "too_large")
        return
    assert set(out) == {"dust", "not_dust"}
    for x, y, r in out["dust"] + out["not_dust"]:
        assert math.isfinite(x) and math.isfinite(y) and math.isfinite(r) and r > 0


def test_fuzzer_messages_meet_the_codec():
    """The live fuzzer's own messages, offline: the codec answers each with a Message or a ProtocolError."""
    fz = MessageFuzzer(12345)
    kinds = set()
    for _ in range(3000):
        case = fz.case()
        kinds.add(case.kind)
        _check_outcome(case.frames)
    assert kinds == set(MessageFuzzer.KINDS)


@pytest.mark.parametrize("opener, depth", [(b"\xdc\x4e\x60", 400), (b"\xdc\x4e\x60", 1100), (b"\x91", 5000)])
def test_nested_containers_do_not_amplify_allocation(opener, depth):
    """A few kB of nested array headers, each declaring 20 000 elements, must not allocate tens of MB."""
    raw = opener * depth
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as e:
            decode([raw])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.code in ("bad_message", "too_large")
    assert peak < 2 << 20, f"{peak / 1e6:.1f} MB allocated while decoding a {len(raw)}-byte header"


# -- a live daemon -----------------------------------------------------------------------

def _seed() -> int:
    env = os.environ.get("HEALDUST_FUZZ_SEED")
    return int(env) if env else random.SystemRandom().randrange(1 << 32)


def test_live_daemon_answers_or_ignores_10000_fuzz_messages(daemon):
    seed = _seed()
    repro = f"seed {seed} (HEALDUST_FUZZ_SEED={seed} pytest tests/test_fuzz.py to repeat)"
    seed_blob = make_seed_model(daemon.home)
    outside = daemon.home / "x.safetensors"                 # where "../x" would land
    outside.write_bytes(b"keep me")
    with Client(daemon.endpoint) as c:
        limits = Limits(**c.hello()["limits"])
    fz = MessageFuzzer(seed, seed_blob, limits)
    hwm_start = proc_status_kb(daemon.proc.pid, "VmHWM")
    warm = fuzz_daemon(daemon.endpoint, WARMUP_MESSAGES, seed, fuzzer=fz)  # the same mix, to settle the heap
    rss_warm = proc_status_kb(daemon.proc.pid)
    rep = fuzz_daemon(daemon.endpoint, FUZZ_MESSAGES, seed, fuzzer=fz)
    rss_after = proc_status_kb(daemon.proc.pid)
    hwm_after = proc_status_kb(daemon.proc.pid, "VmHWM")
    rep.problems[:0] = warm.problems
    summary = (f"{repro}: {rep.sent} messages in {rep.seconds:.1f} s, {rep.answered} answered, {rep.ignored} "
               f"ignored, {rep.jobs_run} tiny jobs ({rep.jobs_cancelled} cancelled), replies {dict(rep.codes)}; "
               f"RSS {rss_warm / 1024:.0f} MB after the warm-up, {rss_after / 1024:.0f} MB after; "
               f"peak {hwm_start / 1024:.0f} MB before the fuzz, {hwm_after / 1024:.0f} MB after")
    print(summary)
    assert daemon.alive() and not rep.daemon_lost, summary
    assert not rep.problems, f"{summary}\n{len(rep.problems)} problems, first:\n" + "\n".join(rep.problems[:12])
    assert rep.answered + rep.ignored == rep.sent == FUZZ_MESSAGES
    assert rep.hellos >= FUZZ_MESSAGES // 50
    assert rss_after - rss_warm < RSS_MARGIN_KB, summary
    # and no message made it allocate much even for a moment (tiny jobs included)
    assert hwm_after - max(hwm_start, rss_warm) < RSS_MARGIN_KB, summary
    with Client(daemon.endpoint) as c:
        assert c.hello()["protocol"] == 1
        assert c.call("status").get("queue") == 0
    # nothing written or removed outside the model folder, no temporary files left in it
    assert outside.read_bytes() == b"keep me"
    models = daemon.home / "models"
    assert not [p.name for p in models.iterdir() if p.name.startswith(".")], "temporary files left behind"
    assert {p.suffix for p in models.iterdir()} <= {".safetensors"}


def test_hostile_model_files_are_refused_or_harmless(daemon):
    """Model files that lie about their sizes or carry poisonous metadata: refused, or stored but harmless."""
    for p in (daemon.home / "models").glob("*"):  # what other tests left (the fuzz run imports odd files)
        p.unlink()
    seed_blob = make_seed_model(daemon.home, "hostile-seed")
    failures = []
    with Client(daemon.endpoint, timeout=60) as c:
        for i, (label, blob) in enumerate(hostile_model_files(seed_blob)):
            name = f"hostile-{i}"
            rid = c.submit("models.import", {"name": name}, [blob])
            ev = [e for e in c.events(rid)][-1]
            if ev.type == "error":
                if ev.get("code") not in ("bad_model", "bad_request"):
                    failures.append(f"{label}: import answered {ev.get('code')}: {ev.get('message')}")
                continue
            # stored: listing, showing, exporting and using it must still work or fail cleanly
            img = bytes(32 * 32 * 3)
            desc = ImageDesc.packed(32, 32, "RGB", "u8").to_dict()
            for type_, fields, bufs in [("models.list", {}, []), ("models.show", {"name": name}, []),
                                        ("models.export", {"name": name}, []),
                                        ("detect", {"image": desc, "model": name}, [img]),
                                        ("detect", {"image": desc, "model": "auto",
                                                    "camera": {"make": "Fuzz", "model": "F1"}}, [img])]:
                rid = c.submit(type_, fields, bufs)
                ev = [e for e in c.events(rid)][-1]
                if ev.type == "error" and ev.get("code") == "internal":
                    failures.append(f"{label}: stored, then {type_} {fields.get('model', '')} answered "
                                    f"internal: {ev.get('message')}")
            c.call("models.delete", {"name": name})
    assert not failures, "\n".join(failures)


def test_model_auto_never_picks_a_file_still_being_imported(daemon):
    """An import's temporary file is not a model: jobs choosing ``model: auto`` meanwhile must not see it."""
    import threading

    for p in (daemon.home / "models").glob("*"):
        p.unlink()
    seed_blob = make_seed_model(daemon.home, "auto-seed")
    blob = dict(hostile_model_files(seed_blob))["meta name a path"]  # camera Fuzz F1, name '../../evil'
    stop = threading.Event()
    errors: list[str] = []

    def importer():
        with Client(daemon.endpoint, timeout=60) as c:
            while not stop.is_set():
                rid = c.submit("models.import", {"name": "in-flight"}, [blob])
                [e for e in c.events(rid)]

    t = threading.Thread(target=importer, daemon=True)
    t.start()
    img = bytes(32 * 32 * 3)
    fields = {"image": ImageDesc.packed(32, 32, "RGB", "u8").to_dict(), "model": "auto",
              "camera": {"make": "Fuzz", "model": "F1"}}
    try:
        with Client(daemon.endpoint, timeout=60) as c:
            for _ in range(60):
                ev = [e for e in c.events(c.submit("detect", fields, [img]))][-1]
                if ev.type != "result":
                    errors.append(f"{ev.get('code')}: {ev.get('message')}")
                elif ev.get("model") not in ("auto-seed", "in-flight"):
                    errors.append(f"model auto chose {ev.get('model')!r}")
    finally:
        stop.set()
        t.join(30)
    assert not errors, f"{len(errors)} of 60 jobs failed, first: {errors[:3]}"


def test_daemon_answers_hello_while_fuzzed_from_another_socket(daemon):
    """A second connection keeps getting prompt hello replies while a first one sends garbage."""
    import threading
    import time

    stop = threading.Event()

    def garbage():
        s = raw_socket(daemon.endpoint)
        r = random.Random(7)
        try:
            while not stop.is_set():
                s.send_multipart([r.randbytes(r.randint(0, 300))])
                while s.poll(0):
                    s.recv_multipart()
        finally:
            s.close(0)

    t = threading.Thread(target=garbage, daemon=True)
    t.start()
    try:
        worst = 0.0
        with Client(daemon.endpoint) as c:
            for _ in range(50):
                t0 = time.monotonic()
                assert c.hello(timeout=10)["protocol"] == 1
                worst = max(worst, time.monotonic() - t0)
    finally:
        stop.set()
        t.join(5)
    assert worst < 2.0, f"a hello took {worst:.2f} s under garbage from another client"


def test_seed_model_is_valid(daemon):
    """The fuzzer's seed model is a model the daemon accepts (else the import fuzzing proves little)."""
    blob = make_seed_model(daemon.home, "seed-check")
    with Client(daemon.endpoint) as c:
        assert c.call("models.import", {"name": "seed-check-2"}, [blob]).get("name") == "seed-check-2"
        assert c.call("models.show", {"name": "seed-check-2"}).get("model")["camera"]["make"] == "Fuzz"
        c.call("models.delete", {"name": "seed-check-2"})
        c.call("models.delete", {"name": "seed-check"})
