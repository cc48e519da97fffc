"""The healdust wire protocol (SPEC.md beside this file is the authoritative description).

This package needs only the standard library, msgpack and (for the client) pyzmq, so the
Krita and GIMP plugins can bundle a copy of it.
"""

from .codec import (
    DEFAULT_LIMITS,
    EVENT_TYPES,
    FINAL_TYPES,
    MODEL_NAME_RE,
    ORDER_CHANNELS,
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    SAMPLE_BYTES,
    ImageDesc,
    Limits,
    Message,
    ProtocolError,
    decode,
    encode,
    parse_image,
    parse_markers,
)

__all__ = [
    "DEFAULT_LIMITS", "EVENT_TYPES", "FINAL_TYPES", "MODEL_NAME_RE", "ORDER_CHANNELS",
    "PROTOCOL_VERSION", "REQUEST_TYPES", "SAMPLE_BYTES", "ImageDesc", "Limits", "Message",
    "ProtocolError", "decode", "encode", "parse_image", "parse_markers",
]
