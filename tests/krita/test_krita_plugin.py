"""The Krita plugin inside real Krita 5.1.5 (GUI under Xvfb), against a real daemon.

One Krita run (``scripts/session_main.py``) walks a user's session through the installed
plugin's menu actions and dumps the layers; the tests below check what the user would see.
A second run (``scripts/session_connect.py``) covers a dead daemon and starting one.
Detection quality is not judged here: only the marked specks, the mask's shape and depth,
and that healing happened exactly where the mask says.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from . import scenes
from .harness import KritaHome, free_port, start_daemon, stop_process

pytestmark = [pytest.mark.krita, pytest.mark.slow]

SIZE = 256
MARKED = [0, 1, 2, 3, 4]          # specks given to the plugin as markers
EDITED = [0, 2, 4, 6, 8]          # specks painted into the edited "Dust mask"
RESOLUTION = 300                  # dpi of the 16-bit document (vector markers are in points)
DEPTH_CASES = [("RGBA", "F16"), ("RGBA", "F32"), ("GRAYA", "U16")]
NP_DTYPE = {"U8": np.uint8, "U16": np.uint16, "F16": np.float16, "F32": np.float32}
FULL_SCALE = {"U8": 255.0, "U16": 65535.0, "F16": 1.0, "F32": 1.0}


# --------------------------------------------------------------------------------------
# fixtures: a daemon, the installed plugin, one Krita session
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scene():
    return scenes.make_scene(seed=7, size=SIZE)


@pytest.fixture(scope="module")
def daemon(krita_required, tmp_path_factory):
    root = tmp_path_factory.mktemp("daemon")
    d = start_daemon(root / "home", root / "daemon.log")
    yield d
    stop_process(d.process)


@pytest.fixture(scope="module")
def krita_home(krita_required, tmp_path_factory):
    return KritaHome(tmp_path_factory.mktemp("krita"))


def _depth_source(scene, model: str, depth: str) -> bytes:
    if model == "GRAYA":
        gray = scene.dusty.mean(axis=2)
        scale = FULL_SCALE[depth]
        out = np.empty((SIZE, SIZE, 2), NP_DTYPE[depth])
        out[..., 0] = np.round(gray * scale) if depth in ("U8", "U16") else gray
        out[..., 1] = scale
        return out.tobytes()
    return scenes.to_bgra(scene.dusty, depth.lower()).tobytes()


@pytest.fixture(scope="module")
def session(scene, daemon, krita_home, tmp_path_factory):
    """The main Krita run; returns (results, out folder)."""
    work = tmp_path_factory.mktemp("session")
    scenes.write_png(work / "dusty8.png", scene.dusty, 8)
    scenes.write_png(work / "dusty16.png", scene.dusty, 16)
    edited = np.zeros((SIZE, SIZE), bool)
    for i in EDITED:
        edited |= speck_mask(scene, i)
    edited = cv2.dilate(edited.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    (work / "edited_mask.bin").write_bytes((edited * np.uint8(255)).tobytes())
    depth_cases = []
    for model, depth in DEPTH_CASES:
        path = work / f"depth_{model}_{depth}.src"
        path.write_bytes(_depth_source(scene, model, depth))
        depth_cases.append({"model": model, "depth": depth, "path": str(path)})
    krita_home.install([sys.executable, "-c", "raise SystemExit('not used')"], daemon.endpoint)
    args = {"png8": str(work / "dusty8.png"), "png16": str(work / "dusty16.png"),
            "specks": [[x, y, r] for x, y, r in scene.specks], "marked": MARKED,
            "resolution": RESOLUTION, "edited_mask": str(work / "edited_mask.bin"),
            "depth_cases": depth_cases, "width": SIZE, "height": SIZE}
    out = work / "out"
    results = krita_home.run("session_main.py", args, out, timeout=480)
    results["edited_mask"] = edited
    return results, out


def step(session, name: str) -> dict:
    results, _ = session
    got = results["steps"].get(name)
    assert got is not None, f"step {name} did not run; Krita log:\n{results['log_tail']}"
    assert "error" not in got, f"step {name} failed inside Krita:\n{got['error']}"
    return got


# --------------------------------------------------------------------------------------
# reading what Krita produced
# --------------------------------------------------------------------------------------

def speck_mask(scene, i: int, grow: float = 0.0) -> np.ndarray:
    x, y, r = scene.specks[i]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    near = (xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= (r + 1.0 + grow) ** 2
    return scene.mask & near


def load(session, name: str) -> tuple[np.ndarray, dict]:
    """A dumped layer as (H, W, C) in its own sample type, with its description."""
    results, out = session
    meta = results["layers"][name]
    data = (out / f"{name}.bin").read_bytes()
    arr = np.frombuffer(data, NP_DTYPE[meta["depth"]]).reshape(meta["height"], meta["width"], -1)
    return arr, meta


def as_rgb(arr: np.ndarray, meta: dict) -> np.ndarray:
    """Colour channels as float RGB (or gray, 1 channel) in [0, 1]."""
    f = arr.astype(np.float64) / FULL_SCALE[meta["depth"]]
    names = meta["channels"]
    if names[0] == "Gray":
        return f[..., :1]
    return np.stack([f[..., names.index(c)] for c in ("Red", "Green", "Blue")], axis=-1)


def mask_of(arr: np.ndarray, meta: dict) -> np.ndarray:
    """A "Dust mask" layer (GRAYA) as bool: gray and alpha at least one half."""
    f = arr.astype(np.float64) / FULL_SCALE[meta["depth"]]
    return (f[..., 0] >= 0.5) & (f[..., 1] >= 0.5)


def reference(scene, gray: bool, which: str = "clean") -> np.ndarray:
    img = getattr(scene, which).astype(np.float64)
    return img.mean(axis=2, keepdims=True) if gray else img


def grow(mask: np.ndarray, px: int) -> np.ndarray:
    k = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), k).astype(bool)


def assert_result_layers(session, prefix: str, source: str, depth: str, scene,
                         must_heal: list[int] | None = None) -> np.ndarray:
    """Both layers at the source's depth; healing only inside the mask; specks healed. Returns the mask."""
    healed, hmeta = load(session, f"{prefix}_healed")
    mask_arr, mmeta = load(session, f"{prefix}_mask")
    src, smeta = load(session, source)
    assert (hmeta["width"], hmeta["height"]) == (SIZE, SIZE)
    assert hmeta["depth"] == smeta["depth"] == depth and hmeta["model"] == smeta["model"]
    assert mmeta["model"] == "GRAYA" and mmeta["depth"] == depth
    assert healed.shape == src.shape
    mask = mask_of(mask_arr, mmeta)
    assert mask.any(), "the dust mask is empty"
    # healing happened where the mask says, and nowhere else (not one sample changed)
    changed = (healed != src).any(axis=-1)
    assert not (changed & ~mask).any(), f"{int((changed & ~mask).sum())} pixels outside the mask changed"
    far = ~grow(mask | scene.mask, 6)
    assert np.array_equal(healed[far], src[far])
    # the specks the mask covers are healed: error to the clean image far below before
    gray = hmeta["channels"][0] == "Gray"
    clean = reference(scene, gray)
    src_rgb, healed_rgb = as_rgb(src, smeta), as_rgb(healed, hmeta)
    covered = [i for i in range(len(scene.specks)) if mask[speck_mask(scene, i)].mean() > 0.9]
    for i in must_heal or []:
        assert i in covered, f"marked speck {i} at {scene.specks[i][:2]} is not in the dust mask"
    assert covered, "the mask covers none of the specks"
    for i in covered:
        m = speck_mask(scene, i)
        before = np.abs(src_rgb[m] - clean[m]).mean()
        after = np.abs(healed_rgb[m] - clean[m]).mean()
        assert after < 0.3 * before, f"speck {i}: error {after:.4f} after healing, {before:.4f} before"
    return mask


# --------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------

def test_installer_puts_plugin_where_krita_loads_it(session, krita_home, daemon):
    pk = krita_home.pykrita
    assert (pk / "healdust.desktop").read_text().count("X-KDE-Library=healdust") == 1
    for rel in ("__init__.py", "job.py", "healdust_protocol/client.py", "healdust_protocol/codec.py",
                "settings.json"):
        assert (pk / "healdust" / rel).is_file(), rel
    assert (pk.parent / "actions" / "healdust.action").is_file()
    rc = krita_home.kritarc.read_text()
    assert "enable_healdust=true" in rc
    settings = (pk / "healdust" / "settings.json").read_text()
    assert daemon.endpoint in settings
    # Krita loaded it: the session's actions ran (and Krita kept our kritarc entry)
    step(session, "no_markers")
    assert "enable_healdust=true" in krita_home.kritarc.read_text()


def test_no_markers_and_no_saved_model_says_what_to_do(session):
    got = step(session, "no_markers")
    rec = got["record"]
    assert rec["outcome"] == "message"
    assert "Dust markers" in rec["message"] and "select" in rec["message"]
    assert "Healed" not in got["layers"] and "Dust mask" not in got["layers"]


def test_selection_gives_one_marker_per_selected_area(session, scene):
    rec = step(session, "cancel")["record"]
    assert rec["marker_origin"] == "selection"
    sent = rec["markers_sent"]["dust"]
    assert len(sent) == len(MARKED)
    for i in MARKED:
        x, y, r = scene.specks[i]
        best = min(sent, key=lambda m: math.hypot(m["x"] - x, m["y"] - y))
        assert math.hypot(best["x"] - x, best["y"] - y) < 1.0
        assert best["r"] >= r  # covers the speck


def test_cancel_leaves_the_document_unchanged(session):
    got = step(session, "cancel")
    assert got["record"]["outcome"] == "cancelled"
    assert got["record"]["wall_seconds"] < 30
    assert got["layers_after"] == got["layers_before"]
    assert got["digest_same"]


def test_vector_layer_markers_heal_a_16_bit_image(session, scene):
    got = step(session, "vector")
    rec = got["record"]
    assert rec["outcome"] == "done", rec.get("message")
    assert rec["marker_origin"] == "layer" and rec["source"] != "Dust markers"
    assert (rec["order"], rec["dtype"]) == ("BGRA", "u16")
    assert rec["saved_model"] == "kt"
    # markers from shapes in points at 300 dpi land on the specks, in pixels
    sent = rec["markers_sent"]["dust"]
    assert len(sent) == len(MARKED)
    for i in MARKED:
        x, y, r = scene.specks[i]
        best = min(sent, key=lambda m: math.hypot(m["x"] - x, m["y"] - y))
        assert math.hypot(best["x"] - x, best["y"] - y) < 0.5
        assert abs(best["r"] - (r + 2)) < 0.6
    # both layers, right above the image layer, in this order
    layers = got["layers"]
    i_src = layers.index(rec["source"])
    assert layers[i_src + 1:i_src + 3] == ["Healed", "Dust mask"]
    assert_result_layers(session, "vector", "vector_source", "U16", scene, must_heal=MARKED)
    assert (session[1] / "vector.kra").stat().st_size > 0


def test_undo_removes_what_the_plugin_added(session):
    got = step(session, "undo")
    # Krita 5.1's scripting has no undo macro: one undo step per added layer, the source never changes
    assert got["after_one"] == [n for n in got["before"] if n != "Dust mask"]
    assert got["after_two"] == [n for n in got["before"] if n not in ("Dust mask", "Healed")]
    assert got["source_same"]


def test_saved_model_heals_without_markers_with_the_dialog(session, scene):
    got = step(session, "saved_model")
    rec = got["record"]
    assert rec["outcome"] == "done", rec.get("message")
    assert got["dialog_model"] == "kt"          # remembered between runs, preselected
    assert rec["model_used"] == "kt" and rec["markers"] == 0
    assert (rec["order"], rec["dtype"]) == ("BGRA", "u8")
    assert_result_layers(session, "saved", "saved_source", "U8", scene)


def test_edited_mask_heals_exactly_the_mask(session, scene):
    got = step(session, "edited_mask")
    rec = got["record"]
    assert rec["outcome"] == "done", rec.get("message")
    assert rec["layers"] == ["Healed"]
    assert len(got["layers"]) == len(got["layers_before"]) + 1
    healed, hmeta = load(session, "edited_healed")
    src, smeta = load(session, "saved_source")
    assert hmeta["depth"] == "U8"
    edited = session[0]["edited_mask"]
    changed = (healed != src).any(axis=-1)
    assert not (changed & ~edited).any(), "pixels outside the edited mask changed"
    clean = reference(scene, False)
    src_rgb, healed_rgb = as_rgb(src, smeta), as_rgb(healed, hmeta)
    for i in range(len(scene.specks)):
        m = speck_mask(scene, i)
        before = np.abs(src_rgb[m] - clean[m]).mean()
        after = np.abs(healed_rgb[m] - clean[m]).mean()
        if i in EDITED:
            assert after < 0.3 * before, f"speck {i} in the edited mask was not healed"
        else:
            assert after == before, f"speck {i} outside the edited mask was touched"


@pytest.mark.parametrize("model,depth", DEPTH_CASES)
def test_every_depth_goes_out_and_comes_back(session, scene, model, depth):
    rec = step(session, "depths")[f"depth_{model}_{depth}"]
    assert rec["outcome"] == "done", rec.get("message")
    assert rec["dtype"] == depth.lower()
    assert rec["order"] == ("GRAYA" if model == "GRAYA" else "RGBA")  # float RGB is RGBA in Krita
    assert_result_layers(session, f"depth_{model}_{depth}", f"depth_{model}_{depth}_source", depth, scene)


def test_marker_geometry_with_resolution_and_moved_layers(session):
    got = step(session, "geometry")
    dust = sorted(got["layers"]["dust"], key=lambda m: m["x"])
    # circle (50, 40) r 5, ellipse (120, 60) 16x8 px and a group of two circles r 2 at (140, 20) and
    # (160, 20), all at 144 dpi, on a layer moved by (10, 20)
    assert [(round(m["x"], 2), round(m["y"], 2)) for m in dust] == [(60.0, 60.0), (130.0, 80.0), (150.0, 40.0),
                                                                    (170.0, 40.0)]
    assert [round(m["r"], 1) for m in dust] == [5.0, 8.0, 2.0, 2.0]
    not_dust = sorted(got["layers"]["not_dust"], key=lambda m: m["x"])
    # painted 4x4 and 3x4 blocks at x 30 and 150, y 10, on a paint layer moved by (5, 7)
    assert [(m["x"], m["y"]) for m in not_dust] == [(37.0, 19.0), (156.5, 19.0)]
    assert math.hypot(2, 2) <= not_dust[0]["r"] < 3.0
    sel = sorted(got["selection"]["dust"], key=lambda m: m["x"])
    assert got["selection"]["origin"] == "selection"
    assert [(m["x"], m["y"]) for m in sel] == [(25.0, 32.5), (62.0, 62.0)]


# --------------------------------------------------------------------------------------
# the daemon connection: nobody answers, then the plugin starts one
# --------------------------------------------------------------------------------------

def _kill_daemons_serving(endpoint: str) -> None:
    """Stop any daemon the plugin started for ``endpoint`` (it is detached from Krita)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if endpoint.encode() in cmdline and any(b"healdust" in a for a in cmdline):
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass


def test_dead_daemon_gives_an_error_then_the_plugin_starts_one(session, krita_home, tmp_path):
    step(session, "no_markers")  # run after the main session: it reinstalls into the same home
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    failing = [sys.executable, "-c", "import sys; sys.stderr.write('no model here\\n'); sys.exit(3)"]
    krita_home.install(failing, endpoint)
    good = [sys.executable, "-m", "healdust", "serve"]
    home = tmp_path / "autostart-home"
    vanishing_endpoint = f"ipc://{tmp_path}/vanishing.sock"
    vanishing = subprocess.Popen([sys.executable, str(Path(__file__).parent / "vanishing_daemon.py"),
                                  vanishing_endpoint], stdout=subprocess.PIPE, text=True)
    assert vanishing.stdout.readline().strip() == "ready"
    try:
        results = krita_home.run("session_connect.py", {"good_serve_command": good,
                                                        "vanishing_endpoint": vanishing_endpoint},
                                 tmp_path / "out", timeout=240, env={"HEALDUST_HOME": str(home)})
    finally:
        _kill_daemons_serving(endpoint)
        vanishing.kill()
        vanishing.wait()

    dead = results["steps"]["dead"]
    assert "error" not in dead, dead.get("error")
    rec = dead["record"]
    assert rec["outcome"] == "error"
    assert "could not be started" in rec["message"] and "status 3" in rec["message"]
    assert "healdust serve" in rec["message"]           # says what to do
    assert dead["seconds"] < 15                          # no hang
    assert dead["event_loop_turns"] > 20                 # the UI kept running while waiting
    assert dead["layers"] == dead["layers_before"]

    gone = results["steps"]["vanished"]
    assert "error" not in gone, gone.get("error")
    assert vanishing.returncode == 0, "the stand-in daemon did not get the job"
    rec = gone["record"]
    assert rec["outcome"] == "error" and "went away while working" in rec["message"], rec
    assert "document was not changed" in rec["message"]
    assert gone["seconds"] < 15 and gone["layers"] == gone["layers_before"]

    auto = results["steps"]["autostart"]
    assert "error" not in auto, auto.get("error")
    rec = auto["record"]
    assert rec["outcome"] == "done", rec.get("message")
    assert rec.get("started_daemon_pid")
    assert auto["layers"].count("Healed") == 1
