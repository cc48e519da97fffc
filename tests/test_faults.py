"""Faults lose nothing: a daemon SIGKILLed while saving, a full disk, a job out of memory,
a daemon that goes away mid-job. Real daemon processes throughout."""

from __future__ import annotations

import resource
import signal
import time

import numpy as np
import pytest

from healdust.protocol import ImageDesc
from healdust.protocol.client import Client, DaemonLost, RemoteError

from .conftest import DaemonProcess, to_u8
from .stress import sigkill_during_saves, two_models


def test_sigkill_at_random_moments_of_saving_never_tears_a_model(tmp_path):
    figures = sigkill_during_saves(tmp_path, kills=6)
    assert figures["saves"] >= 12


def _no_big_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_full_disk_is_an_error_and_keeps_the_old_model(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write, as a full disk does."""
    a_bytes, b_bytes = two_models(tmp_path)
    assert len(a_bytes) > 64 * 1024
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "roll.safetensors").write_bytes(a_bytes)
    d = DaemonProcess(home, preexec_fn=_no_big_files)
    try:
        with Client(d.endpoint) as c:
            with pytest.raises(RemoteError) as e:
                c.call("models.import", {"name": "roll"}, [b_bytes])
            assert e.value.code == "storage" and "nothing was changed" in e.value.message
            with pytest.raises(RemoteError) as e:
                c.call("models.import", {"name": "fresh"}, [b_bytes])
            assert e.value.code == "storage"
            assert c.hello()["protocol"] == 1  # still serving
        assert (home / "models" / "roll.safetensors").read_bytes() == a_bytes
        assert sorted(p.name for p in (home / "models").iterdir()) == ["roll.safetensors"]
    finally:
        d.stop()


def _vm_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def test_a_job_out_of_memory_fails_alone(tmp_path):
    # 1024² tiles: each activation of a tile is over 100 MB, so the work cannot fit in the
    # room left below (a 512² tile's work did, now and then)
    d = DaemonProcess(tmp_path / "home", args=("--tile", "1024"))
    try:
        pixels = np.zeros((3000, 4000, 3), np.uint8)  # 36 MB in; the work needs several times that
        desc = ImageDesc.packed(4000, 3000, "RGB", "u8").to_dict()
        with Client(d.endpoint, timeout=120) as c:
            c.hello()
            limit = _vm_bytes(d.proc.pid) + 120 * 2**20  # room for the message, not for the work
            resource.prlimit(d.proc.pid, resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
            with pytest.raises(RemoteError) as e:
                c.call("detect", {"image": desc}, [pixels])
            assert e.value.code == "out_of_memory" and "tile" in e.value.message, e.value.message
            resource.prlimit(d.proc.pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            small = to_u8(np.random.default_rng(0).random((64, 64, 3)))
            r = c.call("inpaint", {"image": ImageDesc.packed(64, 64, "RGB", "u8").to_dict(),
                                   "mask": ImageDesc.packed(64, 64, "GRAY", "u8", 2).to_dict()},
                       [small, np.full((64, 64, 1), 255, np.uint8)])
            assert r.type == "result"
    finally:
        d.stop()


def test_a_daemon_that_goes_away_mid_job_is_reported_at_once(tmp_path):
    d = DaemonProcess(tmp_path / "home")
    rng = np.random.default_rng(1)
    img = to_u8(rng.random((256, 256, 3)))
    fields = {"image": ImageDesc.packed(256, 256, "RGB", "u8").to_dict(), "mode": "scratch",
              "markers": {"dust": [{"x": 50.0, "y": 50.0, "r": 6.0}], "not_dust": []}}
    with Client(d.endpoint, timeout=300) as c:
        rid = c.submit("heal", fields, [img])
        for ev in c.events(rid):
            if ev.get("stage") == "finetune":
                break
        t = time.monotonic()
        d.stop(signal.SIGKILL)
        with pytest.raises(DaemonLost, match="went away"):
            for _ in c.events(rid):
                pass
        assert time.monotonic() - t < 5


def test_a_full_disk_while_saving_a_fine_tuned_model_still_returns_the_healed_image(tmp_path):
    home = tmp_path / "home"
    d = DaemonProcess(home, preexec_fn=_no_big_files)
    rng = np.random.default_rng(3)
    img = to_u8(rng.random((96, 96, 3)) * 0.2 + 0.6)
    img[40:44, 40:44] = 10
    fields = {"image": ImageDesc.packed(96, 96, "RGB", "u8").to_dict(), "save_model": "roll",
              "markers": {"dust": [{"x": 41.5, "y": 41.5, "r": 6.0}], "not_dust": []}}
    try:
        with Client(d.endpoint, timeout=300) as c:
            r = c.call("heal", fields, [img])
            assert r.type == "result" and r.get("saved_model") is None and r.get("healed")
            assert any("could not save the model 'roll'" in n for n in r.get("notes"))
            assert c.hello()["protocol"] == 1
        assert not (home / "models").exists() or list((home / "models").iterdir()) == []
    finally:
        d.stop()
