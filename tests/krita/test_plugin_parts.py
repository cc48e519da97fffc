"""The Krita plugin's pure parts (markers, pixels, EXIF, settings) and its installer, without Krita.

The plugin's modules run inside Krita's Python; the pure ones use only the standard library,
so they are loaded here from the plugin folder as a package whose ``__init__`` (which needs
Krita) is not run.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.util
import json
import math
import sys
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from healdust import install_krita
from healdust.plugin_bundle import plugin_source

PACKAGE = "healdust_krita_plugin_under_test"
KRITA_IMPORTER = Path("/usr/share/krita/pykrita/plugin_importer/plugin_importer.py")


def plugin_module(name: str):
    if PACKAGE not in sys.modules:
        pkg = types.ModuleType(PACKAGE)
        pkg.__path__ = [str(plugin_source("krita") / "healdust")]
        sys.modules[PACKAGE] = pkg
    return importlib.import_module(f"{PACKAGE}.{name}")


mk = plugin_module("markers")
px = plugin_module("pixels")
exif = plugin_module("exif")
st = plugin_module("settings")


# --------------------------------------------------------------------------------------
# markers
# --------------------------------------------------------------------------------------

def binary(h: int, w: int, points) -> bytes:
    a = bytearray(h * w)
    for x, y in points:
        a[y * w + x] = 1
    return bytes(a)


def test_each_8_connected_area_is_one_marker():
    pts = [(2, 2), (3, 3), (4, 4)]                      # diagonal chain: one area
    pts += [(10, 2), (11, 2), (10, 3), (11, 3)]         # a 2x2 block
    pts += [(2, 8)]                                     # a single pixel
    pts += [(8, 8), (9, 8), (10, 8), (8, 9), (10, 9)]   # a U shape, joined by its top row
    found = mk.markers_from_binary(binary(12, 14, pts), 14, 12)
    assert len(found) == 4
    block = min(found, key=lambda m: math.hypot(m["x"] - 11, m["y"] - 3))
    assert (block["x"], block["y"]) == (11.0, 3.0)
    assert block["r"] == pytest.approx(math.sqrt(2))     # covers the block's corners


def test_u_shapes_and_merges_across_rows_stay_one_area():
    # two arms that only meet at the bottom row: runs merge late
    pts = [(1, y) for y in range(5)] + [(6, y) for y in range(5)] + [(x, 5) for x in range(1, 7)]
    assert len(mk.regions(binary(7, 8, pts), 8, 7)) == 1


def test_marker_covers_its_area_and_honours_the_offset():
    pts = [(x, y) for x in range(5, 9) for y in range(2, 4)]  # 4x2 block
    (m,) = mk.markers_from_binary(binary(6, 12, pts), 12, 6, x_offset=100, y_offset=50)
    assert (m["x"], m["y"]) == (107.0, 53.0)
    for x, y in pts:
        for cx, cy in ((x, y), (x + 1, y), (x, y + 1), (x + 1, y + 1)):  # every pixel corner
            assert math.hypot(cx + 100 - m["x"], cy + 50 - m["y"]) <= m["r"] + 1e-9


def test_boxes_in_points_become_pixels_at_the_document_resolution():
    m = mk.marker_from_box(22.5, 17.5, 5, 5, 300 / 72)
    assert (m["x"], m["y"], m["r"]) == pytest.approx((25 * 300 / 72, 20 * 300 / 72, 2.5 * 300 / 72))
    point = mk.marker_from_box(10, 10, 0, 0, 1.0)
    assert point["r"] == mk.POINT_RADIUS
    assert mk.clip_markers([{"x": -20, "y": 5, "r": 4}, {"x": 1, "y": 1, "r": 4}], 10, 10) == [
        {"x": 1, "y": 1, "r": 4}]


def test_a_large_layer_with_a_few_marks_is_quick():
    w, h = 6000, 4000
    a = bytearray(w * h)
    for cx, cy in ((100, 100), (3000, 2000), (5900, 3900)):
        for y in range(cy - 5, cy + 5):
            a[y * w + cx - 5:y * w + cx + 5] = b"\x01" * 10
    t = time.perf_counter()
    found = mk.markers_from_binary(bytes(a), w, h)
    assert len(found) == 3
    assert time.perf_counter() - t < 5


# --------------------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------------------

def test_channel_order_comes_from_krita_channels():
    assert px.channel_order(["Blue", "Green", "Red", "Alpha"]) == "BGRA"
    assert px.channel_order(["Red", "Green", "Blue", "Alpha"]) == "RGBA"
    assert px.channel_order(["Gray", "Alpha"]) == "GRAYA"
    assert px.channel_order(["Cyan", "Magenta", "Yellow", "Black", "Alpha"]) is None


NP = {"u8": np.uint8, "u16": np.uint16, "f16": np.float16, "f32": np.float32}
FULL = {"u8": 255, "u16": 65535, "f16": 1.0, "f32": 1.0}


@pytest.mark.parametrize("dtype", ["u8", "u16", "f16", "f32"])
def test_mask_layer_round_trip_at_every_depth(dtype):
    rng = np.random.default_rng(1)
    mask = (rng.random(64 * 48) > 0.8).astype(np.uint8) * 255
    graya = np.frombuffer(px.mask_to_graya(mask.tobytes(), dtype), NP[dtype]).reshape(-1, 2)
    assert np.array_equal(graya[:, 0], graya[:, 1])
    assert np.array_equal(graya[:, 0] == FULL[dtype], mask == 255) and (graya[mask == 0] == 0).all()
    back = px.mask_from_layer(graya.tobytes(), "GRAYA", dtype)
    assert back == mask.tobytes()


@pytest.mark.parametrize("dtype", ["u8", "u16", "f16", "f32"])
def test_half_is_the_line_between_dust_and_not(dtype):
    full = FULL[dtype]
    if dtype in ("u8", "u16"):
        just_below, half = (full // 2), (full // 2 + 1)
    else:
        just_below, half = np.nextafter(NP[dtype](0.5), NP[dtype](0)), NP[dtype](0.5)
    gray = np.array([just_below, half, full, half, 0], NP[dtype])
    alpha = np.array([full, full, full, just_below, full], NP[dtype])
    layer = np.stack([gray, alpha], 1)
    assert px.mask_from_layer(layer.tobytes(), "GRAYA", dtype) == bytes([0, 255, 255, 0, 0])
    # RGBA layers (a converted mask): the first colour channel and alpha decide
    rgba = np.stack([gray, gray, gray, alpha], 1)
    assert px.mask_from_layer(rgba.tobytes(), "BGRA", dtype) == bytes([0, 255, 255, 0, 0])


def test_mask_to_graya_keeps_intermediate_values():
    out = np.frombuffer(px.mask_to_graya(bytes([0, 1, 128, 255]), "u16"), np.uint16)
    assert out.tolist() == [0, 0, 257, 257, 128 * 257, 128 * 257, 65535, 65535]
    f = np.frombuffer(px.mask_to_graya(bytes([51]), "f32"), np.float32)
    assert f.tolist() == pytest.approx([0.2, 0.2])


def test_painted_pixels_are_those_with_alpha():
    rgba = np.zeros((4, 4), np.uint16)
    rgba[1, 3] = 65535
    rgba[2, 3] = 10000        # faint: below a quarter
    rgba[3, 3] = 20000
    assert px.painted(rgba.tobytes(), "BGRA", "u16") == bytes([0, 1, 0, 1])


# --------------------------------------------------------------------------------------
# EXIF camera
# --------------------------------------------------------------------------------------

def test_camera_from_jpeg_and_tiff(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (8, 8))
    ex = img.getexif()
    ex[0x010F] = "Canon"
    ex[0x0110] = "EOS R5"
    ex.get_ifd(0x8769)[0xA431] = "0123456"
    img.save(tmp_path / "a.jpg", exif=ex)
    img.save(tmp_path / "a.tif", exif=ex)
    want = {"make": "Canon", "model": "EOS R5", "serial": "0123456"}
    assert exif.read_camera(str(tmp_path / "a.jpg")) == want
    assert exif.read_camera(str(tmp_path / "a.tif"))["model"] == "EOS R5"
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.jpg")
    assert exif.read_camera(str(tmp_path / "plain.jpg")) is None
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe1\x00")
    assert exif.read_camera(str(tmp_path / "junk.jpg")) is None
    assert exif.read_camera(str(tmp_path / "missing.jpg")) is None


def test_same_camera():
    a = {"make": "Canon", "model": "EOS R5", "serial": "1"}
    assert exif.same_camera(a, {"make": "canon", "model": "EOS R5"})
    assert not exif.same_camera(a, {"make": "Canon", "model": "EOS R5", "serial": "2"})
    assert not exif.same_camera(a, {"make": "Nikon", "model": "EOS R5"})
    assert not exif.same_camera(a, None)


# --------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------

def reader(values: dict):
    return lambda group, key, default: values.get((group, key), default)


def test_endpoint_and_serve_command_precedence(tmp_path, monkeypatch):
    (tmp_path / "settings.json").write_text(json.dumps({"endpoint": "tcp://127.0.0.1:1",
                                                        "serve_command": ["/x/python", "-m", "healdust", "serve"]}))
    monkeypatch.setattr(st.shutil, "which", lambda name: None)
    c = st.connection(reader({}), str(tmp_path), environ={})
    assert c.endpoint == "tcp://127.0.0.1:1" and c.serve_command == ["/x/python", "-m", "healdust", "serve"]
    c = st.connection(reader({("healdust", "endpoint"): "tcp://127.0.0.1:2",
                              ("healdust", "serve_command"): '["/y/healdust", "serve"]'}), str(tmp_path), environ={})
    assert c.endpoint == "tcp://127.0.0.1:2" and c.serve_command == ["/y/healdust", "serve"]
    c = st.connection(reader({("healdust", "endpoint"): "tcp://127.0.0.1:2"}), str(tmp_path),
                      environ={"HEALDUST_ENDPOINT": "tcp://127.0.0.1:3"})
    assert c.endpoint == "tcp://127.0.0.1:3"
    # installed from a zip: no settings file, the protocol default and healdust from PATH
    monkeypatch.setattr(st.shutil, "which", lambda name: "/usr/bin/healdust")
    c = st.connection(reader({}), str(tmp_path / "nowhere"), environ={})
    assert c.endpoint == st.DEFAULT_ENDPOINT and c.serve_command == ["/usr/bin/healdust", "serve"]
    assert st.serve_command_for(["healdust", "serve"], "tcp://h:1") == ["healdust", "serve", "--endpoint", "tcp://h:1"]
    assert st.serve_command_for(["healdust", "serve", "--endpoint=x"], "tcp://h:1")[-1] == "--endpoint=x"


def test_default_endpoint_matches_the_protocol():
    from healdust.protocol.client import DEFAULT_ENDPOINT

    assert st.DEFAULT_ENDPOINT == DEFAULT_ENDPOINT


def test_options_are_remembered_and_sensitivity_maps_to_threshold():
    store: dict = {}
    opts = st.HealOptions(model="kt", mode="scratch", auto_threshold=False, sensitivity=80, save_as="roll-7")
    st.save_options(lambda g, k, v: store.__setitem__((g, k), v), opts)
    back = st.load_options(reader(store))
    assert (back.model, back.mode, back.auto_threshold, back.sensitivity, back.save_as) == (
        "kt", "scratch", False, 80, "roll-7")
    assert back.threshold == pytest.approx(0.2)
    assert st.load_options(reader({})).threshold is None      # automatic by default
    assert st.load_options(reader({("healdust", "mode"): "bogus"})).mode == "transfer"


def test_newest_model_of_this_camera_is_preselected():
    models = [{"name": "old", "created": "2024-01-01", "camera": {"make": "Canon", "model": "R5"}},
              {"name": "new", "created": "2025-06-01", "camera": {"make": "Canon", "model": "R5"}},
              {"name": "other", "created": "2026-01-01", "camera": {"make": "Nikon", "model": "Z8"}}]
    assert st.preselect_model(models, {"make": "Canon", "model": "R5"}, "other") == "new"
    assert st.preselect_model(models, None, "other") == "other"
    assert st.preselect_model(models, None, "deleted") == ""


# --------------------------------------------------------------------------------------
# the installer
# --------------------------------------------------------------------------------------

@pytest.fixture
def no_deps(monkeypatch):
    """Installer runs here must not pip-install anything."""
    monkeypatch.setattr(install_krita, "provide_dependencies", lambda plugin_dir, log=None: "skipped in tests")


def test_install_layout_settings_and_kritarc(tmp_path, no_deps):
    rc = tmp_path / "config" / "kritarc"
    rc.parent.mkdir()
    rc.write_text("[General]\nSomeKey[$e]=keep me\n\n[python]\nenable_scripter=true\n\n[theme]\nTheme=Krita dark\n")
    pykrita = tmp_path / "data" / "krita" / "pykrita"
    package = install_krita.install(pykrita, rc, serve_command=["/opt/hd/bin/healdust", "serve"],
                                    endpoint="tcp://127.0.0.1:5555")
    assert package == pykrita / "healdust"
    assert (pykrita / "healdust.desktop").is_file()
    assert (pykrita.parent / "actions" / "healdust.action").is_file()
    assert (package / "healdust_protocol" / "client.py").is_file()
    assert not list(package.rglob("__pycache__"))
    settings = json.loads((package / "settings.json").read_text())
    assert settings["endpoint"] == "tcp://127.0.0.1:5555"
    assert settings["serve_command"] == ["/opt/hd/bin/healdust", "serve"]
    text = rc.read_text()
    assert "SomeKey[$e]=keep me" in text and "Theme=Krita dark" in text
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.optionxform = str
    cp.read_string(text)
    assert cp["python"]["enable_healdust"] == "true" and cp["python"]["enable_scripter"] == "true"
    # again: same result, nothing duplicated; default serve command is this Python's
    install_krita.install(pykrita, rc)
    assert rc.read_text().count("enable_healdust=true") == 1
    assert json.loads((package / "settings.json").read_text())["serve_command"][:2] == [sys.executable, "-m"]


def test_install_keeps_vendored_wheels_until_replaced(tmp_path, no_deps):
    pykrita = tmp_path / "pykrita"
    package = install_krita.install(pykrita, tmp_path / "kritarc")
    (package / "vendor" / "zmq").mkdir(parents=True)
    install_krita.install(pykrita, tmp_path / "kritarc")
    assert (package / "vendor" / "zmq").is_dir()


def test_dependencies_are_fetched_for_kritas_python(tmp_path, monkeypatch):
    calls = []

    class Done:
        returncode, stdout, stderr = 0, "", ""

    monkeypatch.setattr(install_krita, "krita_python_version", lambda: None)
    monkeypatch.setattr(install_krita.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done())
    how = install_krita.provide_dependencies(tmp_path)
    (cmd,) = calls
    assert cmd[:3] == [sys.executable, "-m", "pip"] and "--target" in cmd
    assert cmd[cmd.index("--target") + 1] == str(tmp_path / "vendor")
    assert cmd[cmd.index("--python-version") + 1] == install_krita.BUNDLED_KRITA_PYTHON
    assert "--only-binary=:all:" in cmd and "pyzmq" in cmd and "msgpack" in cmd
    assert "3.10" in how


def test_debian_krita_uses_the_system_packages():
    if not install_krita._krita_pykrita_libraries():
        pytest.skip("no system Krita here")
    version = install_krita.krita_python_version()
    assert version and version.startswith("3.")
    if Path("/usr/lib/python3/dist-packages/zmq").is_dir():
        assert install_krita.system_python_serves(version)


def test_zip_imports_with_kritas_own_importer(tmp_path):
    z = install_krita.make_zip(tmp_path)
    names = zipfile.ZipFile(z).namelist()
    assert {"healdust.desktop", "healdust.action", "healdust/", "healdust/__init__.py",
            "healdust/healdust_protocol/client.py", "healdust/manual.html"} <= set(names)
    assert not [n for n in names if "__pycache__" in n or n.endswith("settings.json") or "/vendor/" in n]
    if not KRITA_IMPORTER.exists():
        pytest.skip("Krita's plugin importer is not installed here")
    spec = importlib.util.spec_from_file_location("krita_plugin_importer", KRITA_IMPORTER)
    importer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(importer)
    resources = tmp_path / "resources"
    resources.mkdir()
    imported = importer.PluginImporter(str(z), str(resources), lambda plugin: True).import_all()
    assert [p["name"] for p in imported] == ["healdust"]
    assert (resources / "pykrita" / "healdust" / "healdust_protocol" / "codec.py").is_file()
    assert (resources / "pykrita" / "healdust.desktop").is_file()
    assert (resources / "actions" / "healdust.action").is_file()


def test_plugin_sources_stay_thin():
    """No numpy, torch or the daemon in the plugin: it runs in Krita's own Python."""
    for path in (plugin_source("krita") / "healdust").glob("*.py"):
        text = path.read_text()
        for banned in ("import numpy", "import torch", "import cv2", "from healdust", "import healdust"):
            assert banned not in text, f"{path.name}: {banned}"
