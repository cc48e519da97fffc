"""Real GIMP 3 for the plug-in tests: the fixture ``gimp_run`` (conftest.py exposes it).

A Debian 13 chroot (tests/editors/build_gimp_chroot.sh), a real daemon on the host, and one
gimp-console run that plays every scenario of gimp_batch.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest

from healdust import synth
from tests.conftest import said_ready

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CHROOT = Path(os.environ.get("HEALDUST_GIMP_CHROOT", "/var/cache/healdust/gimp-chroot"))
BUILD_SCRIPT = REPO / "tests" / "editors" / "build_gimp_chroot.sh"
SIZE = 256
GIMP_TIMEOUT_S = 300
OFFSET = (12, 20)  # where the layer of the offset scenario is moved to


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_chroot() -> Path:
    if os.geteuid() != 0:
        pytest.skip("the GIMP tests run GIMP 3 in a chroot, which needs root")
    if not (CHROOT / ".healdust-complete").exists():
        r = subprocess.run(["sh", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            pytest.fail(f"building the GIMP chroot failed:\n{r.stdout}\n{r.stderr}")
    return CHROOT


# ------------------------------------------------------------------------------------------
# test images: smooth texture + dark film specks with an exact mask
# ------------------------------------------------------------------------------------------

@dataclass
class Spot:
    cx: float  # centre in pixel-index coordinates
    cy: float
    radius: float  # half the larger side of its bounding box
    mask: np.ndarray = field(repr=False)  # bool HxW: this spot's pixels


@dataclass
class Scene:
    clean: np.ndarray    # float32 HxWx3 in [0, 1]
    damaged: np.ndarray  # float32 HxWx3
    mask: np.ndarray     # bool HxW, all dust
    spots: list[Spot]    # compact, isolated specks (the ones tests mark)


def textured(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    low = cv2.resize(rng.random((5, 5, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    waves = 0.06 * np.sin(2 * np.pi * (3 * xx + 2 * yy))[..., None]
    fine = cv2.GaussianBlur(rng.standard_normal((size, size, 1)).astype(np.float32), (0, 0), 0.8)
    img = 0.45 + 0.25 * (low - 0.5) + waves + 0.02 * fine.reshape(size, size, 1)
    return np.clip(img, 0.2, 0.85).astype(np.float32)


def make_scene(seed: int) -> Scene:
    """A textured image with dark specks; at least seven compact, isolated ones."""
    for s in range(seed, seed + 200):
        rng = np.random.default_rng(s)
        clean = textured(rng)
        dmg = synth.add_film_damage(clean, rng, None, count=11, polarity="dark", grain=0.0)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(dmg.mask.astype(np.uint8), connectivity=8)
        spots = []
        for i in range(1, n):
            x, y, w, h, area = stats[i]
            if area < 4 or w > 14 or h > 14 or x < 16 or y < 16 or x + w > SIZE - 16 or y + h > SIZE - 16:
                continue
            own = labels == i
            near = cv2.dilate(own.astype(np.uint8), np.ones((41, 41), np.uint8)).astype(bool)
            if (dmg.mask & near & ~own).any():
                continue  # another defect nearby: keep the marked spots unambiguous
            spots.append(Spot(x + (w - 1) / 2, y + (h - 1) / 2, max(w, h) / 2, own))
        if len(spots) >= 7:
            return Scene(clean, dmg.image, dmg.mask, spots)
    raise RuntimeError("no seed gave enough isolated specks")


def to_u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def to_u16(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 65535 + 0.5).astype(np.uint16)


# ------------------------------------------------------------------------------------------
# the daemon on the host
# ------------------------------------------------------------------------------------------

class Daemon:
    def __init__(self, home: Path):
        self.home = home
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        env = dict(os.environ, HEALDUST_HOME=str(home))
        env.pop("HEALDUST_ENDPOINT", None)
        self.log = home / "serve.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "healdust", "serve", "--endpoint", self.endpoint],
                                     stdout=subprocess.PIPE, stderr=open(self.log, "wb"), text=True, env=env)
        if not said_ready(self.proc, 120):
            self.stop()
            pytest.fail(f"healdust serve did not get ready within 120 s\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------------------------
# one GIMP run with every scenario
# ------------------------------------------------------------------------------------------

@dataclass
class GimpRun:
    job: Path             # the job folder on the host (inside the chroot's /tmp)
    result: dict          # what gimp_batch.py recorded, by scenario
    requests: list[dict]  # headers the plug-in sent, as the relay saw them
    scene8: Scene
    scene16: Scene
    path_spots: list[Spot]
    path_expected: dict   # markers the paths should give, in layer pixel coordinates
    selection_spots: list[Spot]
    selection_radii: list[float]
    edited_mask: np.ndarray
    float_mask: np.ndarray       # bool: white and opaque (dust)
    float_decoy: np.ndarray      # bool: white but transparent (not dust)
    gray_mask: np.ndarray
    offset_mask: np.ndarray      # in the moved layer's coordinates
    alpha16: np.ndarray
    gimp_log: str
    seconds: float

    def raw(self, scenario: str, key: str, dtype, channels: int) -> np.ndarray:
        """A layer dump that gimp_batch.py wrote for ``scenario`` (HxWxchannels)."""
        data = np.fromfile(self.job / "out" / self.result[scenario][key], dtype=dtype)
        return data.reshape(SIZE, SIZE, channels)

    def heal_requests(self) -> list[dict]:
        return [r["header"] for r in self.requests if r.get("header", {}).get("type") == "heal"]


def _write_inputs(job: Path, cjob: str) -> dict:
    scene8, scene16 = make_scene(11), make_scene(500)
    cv2.imwrite(str(job / "rgb8.png"), cv2.cvtColor(to_u8(scene8.damaged), cv2.COLOR_RGB2BGR))
    alpha = np.full((SIZE, SIZE), 65535, np.uint16)
    alpha[:40, :40] = 30000  # alpha must come back untouched
    rgba = np.dstack([to_u16(scene16.damaged), alpha])
    cv2.imwrite(str(job / "rgba16.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))

    # paths on the 8-bit image (GIMP coordinates: pixel i spans [i, i + 1))
    p = scene8.spots
    path_spots = p[:5]
    open_pts = [(s.cx + 0.5, s.cy + 0.5) for s in p[:3]]
    single = [(p[3].cx + 0.5, p[3].cy + 0.5)]
    ring = p[4].radius + 3.0
    ellipse = (p[4].cx + 0.5, p[4].cy + 0.5, ring)
    clean_spot = (40.5, SIZE - 40.5)
    while scene8.mask[int(clean_spot[1]) - 10:int(clean_spot[1]) + 10,
                      int(clean_spot[0]) - 10:int(clean_spot[0]) + 10].any():
        clean_spot = (clean_spot[0] + 20, clean_spot[1])
    path_expected = {
        "dust": [(s.cx, s.cy, 8.0) for s in p[:4]] + [(p[4].cx, p[4].cy, ring)],
        "not_dust": [(clean_spot[0] - 0.5, clean_spot[1] - 0.5, 8.0)],
    }

    # the user's edit: two other specks of the 8-bit image, generously painted
    kernel = np.ones((5, 5), np.uint8)
    edited = np.zeros((SIZE, SIZE), bool)
    for s in p[5:7]:
        edited |= s.mask
    edited = cv2.dilate(edited.astype(np.uint8), kernel).astype(bool)
    (job / "edited_mask.raw").write_bytes(np.where(edited, 255, 0).astype(np.uint8).tobytes())

    # a painted layer on the float image: white+opaque = dust; white+transparent = not dust
    float_mask = cv2.dilate(p[0].mask.astype(np.uint8), kernel).astype(bool)
    decoy = cv2.dilate(p[1].mask.astype(np.uint8), kernel).astype(bool)
    ya = np.zeros((SIZE, SIZE, 2), np.uint8)
    ya[float_mask] = (255, 255)
    ya[decoy] = (255, 0)
    (job / "float_mask.raw").write_bytes(ya.tobytes())

    # selection on the 16-bit image: an ellipse around each of five specks
    sel_spots = scene16.spots[:5]
    radii = [s.radius + 3.0 for s in sel_spots]
    ellipses = [(s.cx + 0.5 - r, s.cy + 0.5 - r, 2 * r, 2 * r) for s, r in zip(sel_spots, radii, strict=True)]
    gray_mask = cv2.dilate(scene16.spots[5].mask.astype(np.uint8), kernel).astype(bool)
    (job / "gray_mask.raw").write_bytes(np.where(gray_mask, 255, 0).astype(np.uint8).tobytes())

    # the 8-bit layer moved by OFFSET, a full-canvas mask layer painted over one speck
    ox, oy = OFFSET
    painted = cv2.dilate(p[2].mask.astype(np.uint8), kernel).astype(bool)  # in layer coordinates
    canvas = np.zeros((SIZE, SIZE), np.uint8)
    canvas[oy:, ox:] = np.where(painted, 255, 0)[:SIZE - oy, :SIZE - ox]
    (job / "offset_mask.raw").write_bytes(canvas.tobytes())
    offset_mask = np.zeros((SIZE, SIZE), bool)  # what the layer sees of it (the canvas crops it)
    offset_mask[:SIZE - oy, :SIZE - ox] = canvas[oy:, ox:] > 0

    return dict(scene8=scene8, scene16=scene16, path_spots=path_spots, path_expected=path_expected,
                selection_spots=sel_spots, selection_radii=radii, edited_mask=edited,
                float_mask=float_mask, float_decoy=decoy, gray_mask=gray_mask, alpha16=alpha,
                offset_mask=offset_mask,
                job_fields={
                    "images": {"rgb8": f"{cjob}/rgb8.png", "rgba16": f"{cjob}/rgba16.png"},
                    "path_markers": {"open": open_pts, "single": single, "ellipse": ellipse,
                                     "not_dust": [clean_spot]},
                    "selection_ellipses": ellipses,
                    "edited_mask": f"{cjob}/edited_mask.raw",
                    "float_mask": f"{cjob}/float_mask.raw",
                    "gray_mask": f"{cjob}/gray_mask.raw",
                    "offset": OFFSET, "offset_mask": f"{cjob}/offset_mask.raw",
                })


@pytest.fixture(scope="module")
def gimp_run(tmp_path_factory) -> GimpRun:
    from healdust.install_gimp import SETTINGS_FILE, install

    root = ensure_chroot()
    job = Path(tempfile.mkdtemp(prefix="healdust-gimp-", dir=root / "tmp"))
    job.chmod(0o755)
    cjob = "/tmp/" + job.name
    daemon = Daemon(tmp_path_factory.mktemp("healdust-home"))
    try:
        (job / "out").mkdir()
        for name in ("gimp_batch.py", "relay_serve.py"):
            shutil.copy(HERE / name, job / name)
        inputs = _write_inputs(job, cjob)
        # GIMP's Python is the chroot's: let the installer probe that one
        chroot_python = job / "chroot-python3"
        chroot_python.write_text(f'#!/bin/sh\nexec chroot "{root}" /usr/bin/python3 "$@"\n')
        chroot_python.chmod(0o755)
        relay_endpoint = f"tcp://127.0.0.1:{free_port()}"
        # the daemon's keys where the chroot sees them: the plug-in finds the token through the
        # installer's record of HEALDUST_HOME, the relay presents it upstream
        shutil.copytree(daemon.home / "keys", job / "home" / "keys")
        serve = ["/usr/bin/python3", f"{cjob}/relay_serve.py", "--upstream", daemon.endpoint,
                 "--token", f"{cjob}/home/keys/local.token",
                 "--log", f"{cjob}/requests.jsonl", "--pidfile", f"{cjob}/relay.pid", "--lifetime", "400"]
        dest = install(job / "plugins", serve, endpoint=relay_endpoint, python=str(chroot_python),
                       home=f"{cjob}/home")
        (job / "gimpcfg").mkdir()
        (job / "gimpcfg" / "gimprc").write_text(
            f'(plug-in-path "${{gimp_dir}}/plug-ins:${{gimp_plug_in_dir}}/plug-ins:{cjob}/plugins")\n')
        job_spec = {"out": f"{cjob}/out", "settings": f"{cjob}/plugins/healdust/{SETTINGS_FILE}",
                    "relay_endpoint": relay_endpoint, "dead_endpoint": f"tcp://127.0.0.1:{free_port()}",
                    **inputs.pop("job_fields")}
        (job / "job.json").write_text(json.dumps(job_spec))
        assert dest == job / "plugins" / "healdust"
        t = time.monotonic()
        cmd = ["chroot", str(root), "/usr/bin/env", "-i", "HOME=/nonexistent",
               f"GIMP3_DIRECTORY={cjob}/gimpcfg", "PATH=/usr/bin:/bin", "LANG=C.UTF-8", f"TMPDIR={cjob}",
               f"HEALDUST_JOB={cjob}/job.json", "timeout", str(GIMP_TIMEOUT_S),
               "gimp-console-3.0", "-i", "-n",
               "--batch-interpreter=python-fu-eval", "-b", f'exec(open("{cjob}/gimp_batch.py").read())',
               "--quit"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=GIMP_TIMEOUT_S + 30)
        seconds = time.monotonic() - t
        log = proc.stdout + proc.stderr
        result_file = job / "out" / "result.json"
        if not result_file.exists():
            pytest.fail(f"GIMP wrote no result (exit {proc.returncode}):\n{log[-4000:]}")
        result = json.loads(result_file.read_text())
        requests_file = job / "requests.jsonl"
        requests = [json.loads(line) for line in requests_file.read_text().splitlines()] \
            if requests_file.exists() else []
        yield GimpRun(job=job, result=result, requests=requests, gimp_log=log, seconds=seconds, **inputs)
    finally:
        pid_file = job / "relay.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        daemon.stop()
        if not os.environ.get("HEALDUST_KEEP_GIMP_JOB"):
            shutil.rmtree(job, ignore_errors=True)
