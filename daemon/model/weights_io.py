"""Weights on disk: safetensors (no pickle) with a JSON metadata block, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

FORMAT = "healdust-weights"
FORMAT_VERSION = 1


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write, fsync, rename: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "meta": json.dumps(meta)}
    data = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=header)
    atomic_write_bytes(path, data)


def _open(path: Path, with_tensors: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """One pass over the file: its header metadata and, if asked, its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
    except FileNotFoundError:
        raise WeightsError(f"model file {path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"model file {path} is corrupt or truncated ({e})") from None
    if header.get("format") != FORMAT:
        raise WeightsError(f"model file {path} is not a healdust model")
    try:
        version = int(header.get("format_version", "0"))
    except ValueError:
        version = 0
    if version != FORMAT_VERSION:
        raise WeightsError(
            f"model file {path} has format version {header.get('format_version')!r}; "
            f"this healdust reads version {FORMAT_VERSION} only")
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError:
        raise WeightsError(f"model file {path} has unreadable metadata") from None
    if not isinstance(meta, dict):
        raise WeightsError(f"model file {path} has unreadable metadata")
    return tensors, meta


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    return _open(Path(path), with_tensors=True)


def read_meta(path: str | Path) -> dict:
    """The metadata alone (the header is checked; the tensors are not read)."""
    return _open(Path(path), with_tensors=False)[1]
