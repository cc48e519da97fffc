"""The wire format: version, round trips, and every kind of malformed message."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from healdust.protocol import PROTOCOL_VERSION, ImageDesc, Limits, ProtocolError, decode, encode
from healdust.protocol.codec import parse_image, parse_markers

SPEC = Path(__file__).resolve().parents[1] / "protocol" / "SPEC.md"


def test_version_constant_matches_spec():
    m = re.search(r"Protocol version: \*\*(\d+)\*\*", SPEC.read_text())
    assert m, "SPEC.md must state its version"
    assert int(m.group(1)) == PROTOCOL_VERSION


def test_spec_names_every_message_type():
    from healdust.protocol import EVENT_TYPES, REQUEST_TYPES

    text = SPEC.read_text()
    for t in (*REQUEST_TYPES, *EVENT_TYPES):
        assert f"`{t}`" in text, t


def test_protocol_package_needs_no_numpy_or_torch():
    src = "".join(p.read_text() for p in SPEC.parent.glob("*.py"))
    assert not re.search(r"^\s*(import|from)\s+(numpy|torch|PyQt5|gi)\b", src, re.M)


def test_round_trip_keeps_header_and_buffers():
    pixels = bytes(range(256)) * 3
    frames = encode("heal", "r1", {"image": ImageDesc.packed(16, 16, "RGB", "u8").to_dict(),
                                   "markers": {"dust": [{"x": 1.5, "y": 2, "r": 3}]}}, [pixels])
    msg = decode(frames)
    assert msg.type == "heal" and msg.id == "r1"
    assert msg.buffers[0] == pixels
    desc = parse_image(msg.header["image"], msg.buffers)
    assert (desc.width, desc.height, desc.channels, desc.dtype) == (16, 16, 3, "u8")
    assert parse_markers(msg.header["markers"])["dust"] == [(1.5, 2.0, 3.0)]


@pytest.mark.parametrize("frames, code", [
    ([], "bad_message"),
    ([b""], "bad_message"),
    ([b"\xc1garbage"], "bad_message"),
    ([msgpack.packb([1, 2, 3])], "bad_message"),
    ([msgpack.packb({"v": 1, "type": "hello"})], "bad_message"),               # no id
    ([msgpack.packb({"v": 1, "id": "x"})], "bad_message"),                     # no type
    ([msgpack.packb({"v": 1, "type": "hello", "id": "\x00bad"})], "bad_message"),
    ([msgpack.packb({"v": 99, "type": "hello", "id": "x"})], "unsupported_version"),
    ([msgpack.packb({"v": 1, "type": "hello", "id": "x"})] + [b""] * 9, "too_large"),
    ([msgpack.packb({"v": 1, "type": "hello", "id": "x", "pad": "a" * 2_000_000})], "too_large"),
    ([msgpack.packb({"v": 1, "type": "hello", "id": "x"})[:-2]], "bad_message"),  # truncated
])
def test_malformed_envelopes(frames, code):
    with pytest.raises(ProtocolError) as e:
        decode(frames)
    assert e.value.code == code


def _img(**kw):
    d = ImageDesc.packed(10, 4, "RGBA", "u16").to_dict()
    d.update(kw)
    return d


@pytest.mark.parametrize("desc, size, code", [
    (_img(), 10 * 4 * 8 - 1, "bad_request"),                  # frame one byte short
    (_img(), 10 * 4 * 8 + 1, "bad_request"),                  # one byte long
    (_img(stride=79), 320, "bad_request"),                    # stride below a row
    (_img(channels=3), 320, "bad_request"),                   # channels disagree with order
    (_img(order="CMYK"), 320, "bad_request"),
    (_img(dtype="f64"), 320, "bad_request"),
    (_img(width=0), 320, "bad_request"),
    (_img(width="10"), 320, "bad_request"),
    (_img(frame=2), 320, "bad_request"),
    (_img(width=70000), 320, "too_large"),
    (_img(width=60000, height=60000), 320, "too_large"),
    ("not a map", 320, "bad_request"),
])
def test_bad_images_rejected_before_allocation(desc, size, code):
    with pytest.raises(ProtocolError) as e:
        parse_image(desc, [b"\0" * size])
    assert e.value.code == code


def test_strided_image_accepted():
    desc = _img(stride=100)
    assert parse_image(desc, [b"\0" * (100 * 3 + 80)]).stride == 100
    assert parse_image(desc, [b"\0" * 400]).stride == 100


@pytest.mark.parametrize("markers", [
    [1, 2], {"dust": "x"}, {"dust": [{"x": 1}]}, {"dust": [{"x": "a", "y": 1}]},
    {"dust": [{"x": 1, "y": 1, "r": -1}]}, {"dust": [{"x": float("nan"), "y": 1}]}, {"dust": [3]},
])
def test_bad_markers(markers):
    with pytest.raises(ProtocolError):
        parse_markers(markers)


def test_too_many_markers():
    with pytest.raises(ProtocolError) as e:
        parse_markers({"dust": [{"x": 1, "y": 1, "r": 1}] * 11}, Limits(max_markers=10))
    assert e.value.code == "too_large"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_fuzz_decode_only_raises_protocol_errors(frames):
    try:
        decode(frames)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["width", "height", "channels", "order", "dtype", "stride",
                                        "frame"]),
                       st.one_of(st.integers(-5, 1 << 40), st.text(max_size=5), st.none(),
                                 st.sampled_from(["RGB", "GRAY", "u8", "f32"]))),
       st.integers(0, 4096))
def test_fuzz_parse_image_only_raises_protocol_errors(desc, size):
    try:
        parse_image(desc, [b"\0" * size])
    except ProtocolError:
        pass
