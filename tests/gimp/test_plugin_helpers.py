"""The GIMP plug-in's GIMP-free parts and its installer, on the host (fast; no GIMP).

The modules are imported from a real installation (``install_gimp.install``), so the
bundled protocol is the one the plug-in uses inside GIMP.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import stat
import sys
import tempfile
import textwrap
import time

import cv2
import numpy as np
import pytest

from healdust.install_gimp import SETTINGS_FILE, InstallError, install


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    dest = install(tmp_path_factory.mktemp("plug-ins"), ["healdust-test-serve"], endpoint="tcp://127.0.0.1:1",
                   install_dependencies=False)
    sys.path.insert(0, str(dest))
    names = ("healdust_gimp.markers", "healdust_gimp.pixels", "healdust_gimp.link")
    try:
        yield dest, {n.rsplit(".", 1)[1]: importlib.import_module(n) for n in names}
    finally:
        sys.path.remove(str(dest))
        for n in list(sys.modules):
            if n.startswith(("healdust_gimp", "healdust_protocol")):
                del sys.modules[n]


@pytest.fixture(scope="module")
def markers(installed):
    return installed[1]["markers"]


@pytest.fixture(scope="module")
def pixels(installed):
    return installed[1]["pixels"]


@pytest.fixture(scope="module")
def link(installed):
    return installed[1]["link"]


# ------------------------------------------------------------------------------------------
# installer
# ------------------------------------------------------------------------------------------

def test_install_puts_an_executable_plugin_with_protocol_and_settings(installed):
    dest, _ = installed
    main = dest / "healdust.py"
    assert dest.name == "healdust" and main.is_file()
    assert main.stat().st_mode & stat.S_IXUSR
    assert main.read_text().startswith("#!/usr/bin/env python3")
    assert (dest / "healdust_protocol" / "client.py").is_file()
    assert (dest / "healdust_gimp" / "markers.py").is_file()
    settings = json.loads((dest / SETTINGS_FILE).read_text())
    assert settings["serve_command"] == ["healdust-test-serve"]
    assert settings["endpoint"] == "tcp://127.0.0.1:1"


def test_install_finds_dependencies_in_gimps_python(tmp_path):
    # this interpreter has pyzmq and msgpack: nothing is pip-installed
    dest = install(tmp_path, python=sys.executable)
    settings = json.loads((dest / SETTINGS_FILE).read_text())
    assert "already has pyzmq and msgpack" in settings["dependencies"]
    assert settings["serve_command"][:3] == [sys.executable, "-m", "healdust"]
    assert not (dest / "deps").exists()
    again = install(tmp_path, python=sys.executable)  # reinstalling replaces cleanly
    assert again == dest and not list(tmp_path.glob(".healdust*"))


def test_install_reports_when_gimps_python_cannot_be_found(tmp_path):
    with pytest.raises(InstallError, match="HEALDUST_GIMP_PYTHON"):
        install(tmp_path, python=str(tmp_path / "no-such-python"))
    assert not (tmp_path / "healdust").exists()


def test_default_folder_follows_gimp3_directory(tmp_path, monkeypatch):
    from healdust.install_gimp import default_plugins_dir

    monkeypatch.setenv("GIMP3_DIRECTORY", str(tmp_path / "cfg"))
    assert default_plugins_dir() == tmp_path / "cfg" / "plug-ins"


# ------------------------------------------------------------------------------------------
# markers
# ------------------------------------------------------------------------------------------

def _disc(mask, cx, cy, r):
    yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    mask[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 255


def test_each_separate_selected_area_is_one_marker(markers):
    m = np.zeros((60, 80), np.uint8)
    _disc(m, 10, 12, 4)
    _disc(m, 50, 40, 6)
    m[30:33, 20] = 255      # a diagonal chain: 8-connected, one area
    m[33, 21] = 255
    m[34, 22] = 255
    m[5, 70:75] = 128       # half-selected counts as selected
    found = markers.selection_markers(m.tobytes(), 80, 60, origin=(100, 200))
    assert len(found) == 4
    by_pos = {(round(f["x"]), round(f["y"])): f["r"] for f in found}
    assert (110, 212) in by_pos and 4 <= by_pos[(110, 212)] <= 5.2
    assert (150, 240) in by_pos and 6 <= by_pos[(150, 240)] <= 7.2
    assert (121, 232) in by_pos
    assert (172, 205) in by_pos


def test_u_shaped_area_merges_into_one_marker(markers):
    m = np.zeros((20, 20), np.uint8)
    m[2:15, 3] = 255
    m[2:15, 12] = 255
    m[14, 3:13] = 255       # the arms meet only at the bottom
    (one,) = markers.selection_markers(m.tobytes(), 20, 20)
    assert one["x"] == pytest.approx(7.5) and one["y"] == pytest.approx(8.0)
    assert one["r"] >= math.hypot(4.5, 6) + 0.5 - 1e-6


def test_a_noisy_selection_is_refused(markers):
    m = np.zeros((40, 40), np.uint8)
    m[::2, ::2] = 255
    with pytest.raises(markers.TooManyAreas):
        markers.selection_markers(m.tobytes(), 40, 40, limit=100)


def test_big_sparse_selection_is_fast(markers):
    m = np.zeros((4000, 6000), np.uint8)
    for i in range(50):
        cv2.circle(m, (100 + i * 110, 200 + (i % 7) * 500), 5, 255, -1)
    t = time.perf_counter()
    found = markers.selection_markers(m.tobytes(), 6000, 4000)
    assert len(found) == 50
    assert time.perf_counter() - t < 5.0


def test_open_stroke_anchors_and_closed_outline(markers):
    open_ = markers.stroke_markers([(10.5, 20.5), (30.5, 40.5)], closed=False)
    assert [(m["x"], m["y"], m["r"]) for m in open_] == [(10, 20, markers.DEFAULT_RADIUS),
                                                         (30, 40, markers.DEFAULT_RADIUS)]
    ring = [(50.5 + 7 * math.cos(a), 60.5 + 7 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 33)]
    (closed,) = markers.stroke_markers(ring[::8], closed=True, outline=ring)
    assert closed["x"] == pytest.approx(50, abs=0.01) and closed["y"] == pytest.approx(60, abs=0.01)
    assert closed["r"] == pytest.approx(7, abs=0.05)


def test_anchors_are_the_middle_of_each_control_point_triple(markers):
    cps = [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert markers.anchors_of(cps) == [(1, 2), (7, 8)]


def test_markers_move_into_layer_coordinates(markers):
    ms = [{"x": 15.0, "y": 25.0, "r": 3.0}, {"x": 2.0, "y": 2.0, "r": 3.0}]
    assert markers.inside(ms, 100, 100, (10, 20)) == [{"x": 5.0, "y": 5.0, "r": 3.0}]


def test_path_names(markers):
    assert markers.is_named("Dust markers", "Dust markers")
    assert markers.is_named("  dust   Markers ", "Dust markers")
    assert markers.is_named("Dust markers #2", "Dust markers")
    assert not markers.is_named("Dust markers old", "Dust markers")


# ------------------------------------------------------------------------------------------
# pixels
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nick, gray, alpha, encoding, order, dtype", [
    ("u8-non-linear", False, False, "R'G'B' u8", "RGB", "u8"),
    ("u8-perceptual", False, True, "R~G~B~A u8", "RGBA", "u8"),
    ("u16-non-linear", False, True, "R'G'B'A u16", "RGBA", "u16"),
    ("u16-linear", True, False, "Y' float", "GRAY", "f32"),
    ("u32-non-linear", True, True, "Y'A float", "GRAYA", "f32"),
    ("half-linear", False, False, "R'G'B' float", "RGB", "f32"),
    ("float-linear", False, True, "R'G'B'A float", "RGBA", "f32"),
    ("double-perceptual", False, False, "R'G'B' float", "RGB", "f32"),
])
def test_wire_format_per_precision(pixels, nick, gray, alpha, encoding, order, dtype):
    wf = pixels.wire_format(nick, gray, alpha)
    assert (wf.encoding, wf.order, wf.dtype) == (encoding, order, dtype)
    assert wf.channels == len(order.replace("GRAY", "Y"))


def test_mask_from_painted_layer(pixels):
    ya = bytes([255, 255, 255, 0, 0, 255, 200, 200, 127, 255, 128, 128])
    assert pixels.mask_from_gray_alpha(ya, 6) == bytes([255, 0, 0, 255, 0, 255])
    assert pixels.mask_from_gray(bytes([0, 127, 128, 255]), 4) == bytes([0, 0, 255, 255])
    assert pixels.count_dust(bytes([0, 255, 255, 0])) == 2


# ------------------------------------------------------------------------------------------
# daemon link
# ------------------------------------------------------------------------------------------

def test_endpoint_precedence(link, monkeypatch):
    monkeypatch.delenv("HEALDUST_ENDPOINT", raising=False)
    assert link.resolve_endpoint("", {}) == "tcp://127.0.0.1:47137"
    assert link.resolve_endpoint("", {"endpoint": "tcp://127.0.0.1:5"}) == "tcp://127.0.0.1:5"
    monkeypatch.setenv("HEALDUST_ENDPOINT", "tcp://127.0.0.1:6")
    assert link.resolve_endpoint(" ", {"endpoint": "tcp://127.0.0.1:5"}) == "tcp://127.0.0.1:6"
    assert link.resolve_endpoint("ipc:///tmp/x", {}) == "ipc:///tmp/x"
    assert link.is_local("tcp://127.0.0.1:5") and link.is_local("ipc:///tmp/x")
    assert not link.is_local("tcp://10.0.0.2:5")


def test_progress_never_exceeds_one_and_follows_stages(link):
    assert link.stage_fraction("load", 0.0) < link.stage_fraction("finetune", 0.5) < \
        link.stage_fraction("heal", 1.0) <= link.stage_fraction("save", 1.0) <= 1.0
    assert link.stage_fraction("unknown-stage", 0.5) == 0.0


FAKE_DAEMON = textwrap.dedent("""
    import os, sys, msgpack, zmq
    ep = sys.argv[sys.argv.index("--endpoint") + 1]
    open(sys.argv[1], "w").write(str(os.getpid()))
    s = zmq.Context().socket(zmq.ROUTER); s.bind(ep)
    while True:
        ident, head, *bufs = s.recv_multipart()
        h = msgpack.unpackb(head)
        out = {"v": 1, "type": "result", "id": h["id"], "protocol": 1, "server": "fake"}
        s.send_multipart([ident, msgpack.packb(out)])
""")


def test_connect_starts_the_serve_command_and_waits_for_hello(link, tmp_path, monkeypatch):

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the serve log goes there
    script, pid_file = tmp_path / "fake_daemon.py", tmp_path / "fake.pid"
    script.write_text(FAKE_DAEMON)
    endpoint = f"ipc://{tmp_path}/fake.sock"  # no token on ipc: the folder's permissions guard it
    try:
        hello = link.connect(endpoint, {"serve_command": [sys.executable, str(script), str(pid_file)]},
                             wait_s=30)
    finally:
        if pid_file.exists():  # it runs in its own session: end it by its id
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
    assert hello["server"] == "fake"


def test_connect_reports_a_serve_command_that_dies(link, tmp_path, monkeypatch):
    from gimp_harness import free_port

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-c", "import sys; print('no weights found', file=sys.stderr); sys.exit(2)"]
    with pytest.raises(link.DaemonError, match="exited with status 2.*no weights found"):
        link.connect(endpoint, {"serve_command": cmd}, wait_s=30)


def test_no_local_start_for_a_remote_endpoint(link):
    with pytest.raises(link.DaemonError, match="on that machine"):
        link.connect("tcp://192.0.2.1:47137", {"serve_command": ["healdust", "serve"]}, wait_s=1)


def test_run_job_reports_a_daemon_that_dies_mid_job_at_once(link, tmp_path):
    """A real daemon, killed while the plug-in's job fine-tunes: a clear message, not a long wait."""
    import threading

    from tests.conftest import DaemonProcess

    d = DaemonProcess(tmp_path / "home")
    rng = np.random.default_rng(1)
    img = (rng.random((256, 256, 3)) * 255).astype(np.uint8)
    fields = {"image": {"frame": 1, "width": 256, "height": 256, "channels": 3, "order": "RGB", "dtype": "u8",
                        "stride": 768}, "mode": "scratch",
              "markers": {"dust": [{"x": 50.0, "y": 50.0, "r": 6.0}], "not_dust": []}}
    killed = []

    def kill_when_fine_tuning(ev):
        if ev.get("stage") == "finetune" and not killed:
            killed.append(time.monotonic())
            threading.Thread(target=d.stop, args=(signal.SIGKILL,)).start()

    try:
        with pytest.raises(link.DaemonError, match="went away") as e:
            link.run_job(d.endpoint, "heal", fields, [img], on_progress=kill_when_fine_tuning,
                         home=str(d.home))
        assert killed and time.monotonic() - killed[0] < 10
        assert "try again" in str(e.value)
    finally:
        d.stop(signal.SIGKILL)
