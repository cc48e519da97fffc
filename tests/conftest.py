"""Shared fixtures: a real daemon process on a free port, and dusty test images."""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from healdust import synth
from healdust.demo import sample_path
from healdust.protocol import keys

# One set of keys for the whole run: every test daemon gets a copy in its HEALDUST_HOME and
# the test process's HEALDUST_HOME points at one too, so Client() finds the token by itself.
_SESSION_HOME: Path | None = None
START_TIMEOUT = 120  # seconds for a test daemon to say it is ready (it loads torch and a model)

# a run killed from outside (CI's time limit) says where every thread was
if hasattr(signal, "SIGTERM"):
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)


def give_keys(home: Path) -> Path:
    """Copy the run's keys into ``home/keys`` (nothing when it has keys already)."""
    home.mkdir(parents=True, exist_ok=True)
    if _SESSION_HOME is not None and not (home / "keys").exists():
        shutil.copytree(_SESSION_HOME / "keys", home / "keys")
    return home


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory):
    global _SESSION_HOME
    h = tmp_path_factory.mktemp("session-home")
    keys.ensure_keys(h)
    _SESSION_HOME = h
    old = os.environ.get("HEALDUST_HOME")
    os.environ["HEALDUST_HOME"] = str(h)
    yield h
    if old is None:
        os.environ.pop("HEALDUST_HOME", None)
    else:
        os.environ["HEALDUST_HOME"] = old


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def said_ready(proc: subprocess.Popen, timeout: float = START_TIMEOUT) -> bool:
    """Whether ``healdust serve`` (text-mode stdout) printed its ready line within ``timeout`` s."""
    done, said = threading.Event(), []

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("healdust ready"):
                said.append(line)
                break
        done.set()  # ready, or stdout closed: the daemon exited

    threading.Thread(target=read, daemon=True).start()
    done.wait(timeout)
    return bool(said)


class DaemonProcess:
    def __init__(self, home: Path, endpoint: str | None = None, extra_env: dict | None = None,
                 preexec_fn=None, args: tuple = ()):
        self.home = give_keys(home)
        self.endpoint = endpoint or f"tcp://127.0.0.1:{free_port()}"
        env = dict(os.environ, HEALDUST_HOME=str(home), PYTHONUNBUFFERED="1")
        env.update(extra_env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "healdust", "serve", "--endpoint", self.endpoint,
                                      "--device", "cpu", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=preexec_fn)
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        # a real deadline: a daemon that neither says ready nor exits fails the test, with
        # where each of its threads was, instead of hanging the run
        if not said_ready(self.proc, START_TIMEOUT):
            why = "exited" if not self.alive() else f"not ready after {START_TIMEOUT} s"
            raise RuntimeError(f"daemon did not start ({why}):\n{self.dump_and_kill()}")

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def dump_and_kill(self) -> str:
        """Ask a live daemon where its threads are (SIGUSR1, see cli.cmd_serve), kill it, and
        return the end of its stderr."""
        if self.alive():
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            self.proc.kill()
        self.proc.wait()
        time.sleep(0.2)  # the stderr reader catches up
        return "".join(self.stderr_lines[-80:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"daemon did not stop within {timeout} s:\n{self.dump_and_kill()}") from None


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("home"))
    yield d
    assert d.stop() == 0, "the daemon must shut down cleanly on SIGTERM"


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = give_keys(tmp_path / "home")
    monkeypatch.setenv("HEALDUST_HOME", str(h))
    return h


def dusty_image(size: int = 256, seed: int = 0, count: int = 12, kind: str = "film"):
    """(clean float RGB, dusty float RGB, true mask) cut from the bundled sample photo."""
    photo = synth.load_photo(sample_path())
    rng = np.random.default_rng(seed)
    y = int(rng.integers(0, photo.shape[0] - size))
    x = int(rng.integers(0, photo.shape[1] - size))
    clean = photo[y:y + size, x:x + size].astype(np.float32) / 255
    if kind == "film":
        dmg = synth.add_film_damage(clean, rng, None, count=count, polarity="dark", grain=0.0)
    else:
        dmg = synth.add_sensor_dust(clean, rng, count=count, f_number=11, grain=0.0)
    return clean, dmg.image, dmg.mask


def markers_for(mask: np.ndarray, count: int = 5, pad: float = 4.0) -> list[dict]:
    n, _, st, cen = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    idx = [i for i in range(1, n) if st[i, cv2.CC_STAT_AREA] >= 4][:count]
    return [{"x": float(cen[i][0]), "y": float(cen[i][1]),
             "r": float(0.5 * np.hypot(st[i, 2], st[i, 3]) + pad)} for i in idx]


def to_u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)


def to_u16(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a * 65535), 0, 65535).astype(np.uint16)
