"""The model store: the base model and the per-camera fine-tuned models under HEALDUST_HOME.

A saved model holds only what fine-tuning changed from the base (the decoder for
transfer; everything for scratch) plus metadata: camera (EXIF make/model/serial), base
model id, number of markers, mode, calibrated threshold, date. Files are safetensors (no
pickle) and every write is atomic (write, fsync, rename): a crash mid-save leaves the old
file or the new one, whole.
"""

from __future__ import annotations

import copy
import os
import tempfile
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import torch

from . import __version__
from .model.arch import DustModel, build_model, config_from_dict, encoder_name, same_architecture
from .model.weights_io import WeightsError, atomic_write_bytes, load_weights, read_meta, save_weights
from .protocol.codec import MODEL_NAME_RE

BASE_WEIGHTS = "base.safetensors"


def healdust_home() -> Path:
    env = os.environ.get("HEALDUST_HOME")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("healdust", appauthor=False))


def base_weights_path() -> Path:
    return Path(str(resources.files("healdust.model") / "weights" / BASE_WEIGHTS))


def load_base_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[DustModel, dict]:
    """The pretrained base model shipped in the package (or ``path``), in eval mode."""
    path = Path(path) if path else base_weights_path()
    tensors, meta = load_weights(path)
    if meta.get("kind") != "base":
        raise WeightsError(f"model file {path} is not a base model")
    try:
        model = build_model(config_from_dict(meta.get("config", {})))
    except (ValueError, TypeError) as e:
        raise WeightsError(f"model file {path} declares an unusable architecture ({e})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"model file {path} does not fit its declared architecture ({e})") from None
    return model.to(device).eval(), meta


class ModelNotFound(KeyError):
    def __str__(self) -> str:
        return f"no saved model named {self.args[0]!r}"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise ValueError(f"model name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def check_meta(meta: dict, where) -> dict:
    """A fine-tuned model's metadata, every field the daemon reads of the type it reads; else WeightsError.

    Files come from imports and from disk, so a field of the wrong type must not reach
    ``newest_for_camera``, the threshold or a reply (msgpack cannot pack an int over 2^64).
    """
    def bad(field: str):
        raise WeightsError(f"model file {where} has unusable metadata ({field!r}: {meta.get(field)!r:.60})")

    if meta.get("kind") != "finetuned":
        raise WeightsError(f"model file {where} is not a fine-tuned healdust model")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta["config"].get("widths"), list):
        bad("config")
    if meta.get("mode") not in ("transfer", "scratch"):
        bad("mode")
    cam = meta.get("camera", {})
    if not isinstance(cam, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in cam.items()):
        bad("camera")
    t = meta.get("threshold", 0.5)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        bad("threshold")
    m = meta.get("markers", 0)
    if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < 1 << 31:
        bad("markers")
    for field in ("created", "name", "base", "healdust"):
        if not isinstance(meta.get(field, ""), str):
            bad(field)
    return meta


class ModelStore:
    def __init__(self, home: str | Path | None = None):
        self.home = Path(home) if home else healdust_home()
        self.dir = self.home / "models"

    def path(self, name: str) -> Path:
        return self.dir / f"{check_name(name)}.safetensors"

    def save(self, name: str, model: DustModel, base_meta: dict, mode: str, markers: int,
             threshold: float, camera: dict | None = None) -> dict:
        tensors = model.trainable_state() if mode == "transfer" else model.state_dict()
        meta = {
            "kind": "finetuned", "name": check_name(name),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "camera": {k: str(v) for k, v in (camera or {}).items() if v},
            "base": base_meta.get("id"), "config": model.cfg.to_dict(), "mode": mode,
            "markers": int(markers), "threshold": float(threshold), "healdust": __version__,
        }
        save_weights(self.path(name), tensors, meta)
        return meta

    def meta(self, name: str) -> dict:
        p = self.path(name)
        if not p.exists():
            raise ModelNotFound(name)
        return check_meta(read_meta(p), p)

    def load(self, name: str, base: DustModel, base_meta: dict) -> tuple[DustModel, dict]:
        p = self.path(name)
        if not p.exists():
            raise ModelNotFound(name)
        tensors, meta = load_weights(p)
        return self._build(p, tensors, meta, base, base_meta), meta

    @staticmethod
    def _check(p: Path, tensors: dict, meta: dict, base: DustModel, base_meta: dict) -> None:
        """Whether the file's tensors fit the base model, by names, shapes and types alone.

        Nothing here computes with tensors, so the daemon's I/O thread can check an import
        without starting an OpenMP team of its own (runtime.py: a second team on the same
        cores slows every later job)."""
        check_meta(meta, p)
        if not same_architecture(meta["config"], base.cfg.to_dict()):
            c = meta["config"]
            raise WeightsError(f"model file {p} was made for {encoder_name(c)} widths {c.get('widths')}, "
                               f"the base model is {encoder_name(base.cfg.to_dict())} widths {list(base.cfg.widths)}")
        if meta.get("mode") == "transfer":
            if meta.get("base") != base_meta.get("id"):
                raise WeightsError(f"model file {p} was fine-tuned from base {meta.get('base')!r}, "
                                   f"this healdust ships {base_meta.get('id')!r}; fine-tune it again")
            expected, what = base.trainable_state(), "does not hold a decoder for this architecture"
        else:
            expected, what = base.state_dict(), "does not fit this architecture"
        if set(tensors) != set(expected) or any(
                tensors[k].shape != expected[k].shape or tensors[k].dtype.is_floating_point
                != expected[k].dtype.is_floating_point for k in tensors):
            raise WeightsError(f"model file {p} {what}")

    @classmethod
    def _build(cls, p: Path, tensors: dict, meta: dict, base: DustModel, base_meta: dict) -> DustModel:
        cls._check(p, tensors, meta, base, base_meta)
        model = copy.deepcopy(base).cpu()
        if meta.get("mode") == "transfer":
            model.decoder.load_state_dict({k[len("decoder."):]: v for k, v in tensors.items()})
            model.freeze_encoder()
        else:
            try:
                model.load_state_dict(tensors, strict=True)
            except RuntimeError:
                raise WeightsError(f"model file {p} does not fit this architecture") from None
        return model.to(next(base.parameters()).device).eval()

    def clean_leftovers(self) -> int:
        """Remove the temporary files of saves that were killed midway; returns how many.

        A save writes ``.NAME.*.tmp`` (or ``.import-*``) and renames it over the model, so a
        leftover temporary file is never a model anyone could have used.
        """
        if not self.dir.is_dir():
            return 0
        gone = 0
        for p in [*self.dir.glob(".*.tmp"), *self.dir.glob(".import-*.safetensors")]:
            try:
                p.unlink()
                gone += 1
            except OSError:
                pass
        return gone

    def list(self) -> list[dict]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in sorted(self.dir.glob("*.safetensors")):
            if p.name.startswith("."):  # an import still being checked (pathlib's glob matches dot files)
                continue
            try:
                meta = check_meta(read_meta(p), p)
                meta["name"] = p.stem  # the name it is found by, whatever the file says
                meta["size_bytes"] = p.stat().st_size
            except WeightsError as e:
                meta = {"name": p.stem, "error": str(e)}
            out.append(meta)
        return out

    def delete(self, name: str) -> bool:
        p = self.path(name)
        try:
            p.unlink()
            return True
        except FileNotFoundError:
            return False

    def export_bytes(self, name: str) -> bytes:
        p = self.path(name)
        if not p.exists():
            raise ModelNotFound(name)
        load_weights(p)  # refuse to export a broken file
        return p.read_bytes()

    def import_bytes(self, data: bytes, name: str | None = None, base: DustModel | None = None,
                     base_meta: dict | None = None) -> str:
        """Check a model file and store it (under ``name`` or the name it carries)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".safetensors", dir=self.dir, prefix=".import-")
        try:
            with os.fdopen(fd, "wb") as f:  # a full disk fails here, before the model is touched
                f.write(data)
            try:
                tensors, meta = load_weights(tmp)
            except WeightsError as e:  # name the file as the user knows it, not our temporary copy
                raise WeightsError(str(e).replace(tmp, "the imported model file")) from None
            if base is not None:
                self._check(Path("(imported file)"), tensors, meta, base, base_meta or {})
            elif meta.get("kind") != "finetuned":
                raise WeightsError("the imported file is not a fine-tuned healdust model")
        finally:
            os.unlink(tmp)
        name = check_name(name or str(meta.get("name", "")))
        if name != meta.get("name"):
            meta["name"] = name
            save_weights(self.path(name), tensors, meta)
        else:
            atomic_write_bytes(self.path(name), data)
        return name

    def newest_for_camera(self, camera: dict) -> str | None:
        keys = [k for k in ("make", "model", "serial") if camera.get(k)]
        if not keys:
            return None
        best = None
        for meta in self.list():
            cam = meta.get("camera") or {}
            if "error" in meta or not cam:
                continue
            if all(cam.get(k) == camera.get(k) for k in keys) and all(
                    camera.get(k) == v for k, v in cam.items() if k in ("make", "model", "serial")):
                if best is None or meta.get("created", "") > best.get("created", ""):
                    best = meta
        return best["name"] if best else None
