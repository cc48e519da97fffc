"""The CLI contract: outputs, bit depth, exit codes, the daemon started on demand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from healdust.imageio import read_image, write_image, write_mask
from healdust.protocol.client import Client, DaemonUnavailable

from .conftest import dusty_image, free_port, markers_for, to_u8, to_u16


def healdust(*args, home, env=None, timeout=300):
    e = dict(os.environ, HEALDUST_HOME=str(home))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "healdust", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=timeout)


@pytest.fixture
def sample(tmp_path):
    clean, dusty, truth = dusty_image(160, seed=11)
    return clean, dusty, truth


def test_heal_local_16bit_rgba_keeps_depth_and_alpha(tmp_path, home, sample):
    _, dusty, _ = sample
    a = np.concatenate([to_u16(dusty), np.full((160, 160, 1), 50000, np.uint16)], axis=2)
    write_image(tmp_path / "in.png", a)
    r = healdust("heal", tmp_path / "in.png", "-o", tmp_path / "out.png", "--mask-out", tmp_path / "m.png",
                 "--local", home=home)
    assert r.returncode == 0, r.stderr
    out = read_image(tmp_path / "out.png")
    assert out.pixels.dtype == np.uint16 and out.order == "RGBA" and out.pixels.shape == a.shape
    assert np.array_equal(out.pixels[:, :, 3], a[:, :, 3])
    m = read_image(tmp_path / "m.png")
    assert m.order == "GRAY" and m.pixels.dtype == np.uint8 and m.pixels.shape[:2] == (160, 160)
    changed = np.any(out.pixels != a, axis=2)
    assert not (changed & (m.pixels[:, :, 0] == 0)).any(), "only masked pixels may change"
    assert "spots healed" in r.stdout


@pytest.mark.parametrize("name, maker", [
    ("gray.png", lambda d: to_u8(d[:, :, :1])),
    ("gray16.tif", lambda d: to_u16(d[:, :, :1])),
    ("float.tif", lambda d: d.astype(np.float32)),
    ("rgb.jpg", lambda d: to_u8(d)),
])
def test_heal_mask_in_heals_exactly_the_mask(tmp_path, home, sample, name, maker):
    clean, dusty, truth = sample
    a = maker(dusty)
    write_image(tmp_path / name, a)
    write_mask(tmp_path / "edited.png", truth)
    out_name = "out" + os.path.splitext(name)[1]
    r = healdust("heal", tmp_path / name, "-o", tmp_path / out_name, "--mask-in", tmp_path / "edited.png",
                 "--local", home=home)
    assert r.returncode == 0, r.stderr
    out = read_image(tmp_path / out_name).pixels
    orig = read_image(tmp_path / name).pixels
    assert out.dtype == orig.dtype and out.shape == orig.shape
    if not name.endswith(".jpg"):  # JPEG re-encodes everything
        assert np.array_equal(out[~truth], orig[~truth])
        assert not np.array_equal(out[truth], orig[truth])


def test_exit_codes_and_one_line_errors(tmp_path, home, sample):
    write_image(tmp_path / "in.png", to_u16(sample[1]))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "m.json").write_text("{not json")
    write_mask(tmp_path / "small.png", np.zeros((5, 5), bool))
    cases = [
        (["heal", tmp_path / "missing.png", "-o", tmp_path / "o.png", "--local"], "no such file"),
        (["heal", tmp_path / "bad.png", "-o", tmp_path / "o.png", "--local"], "cannot read"),
        (["heal", tmp_path / "in.png", "-o", tmp_path / "o.jpg", "--local"], "JPEG"),
        (["heal", tmp_path / "in.png", "-o", tmp_path / "o.png", "--markers-file", tmp_path / "m.json",
          "--local"], "not valid JSON"),
        (["heal", tmp_path / "in.png", "-o", tmp_path / "o.png", "--mask-in", tmp_path / "small.png",
          "--local"], "mask is 5x5"),
        (["heal", tmp_path / "in.png", "-o", tmp_path / "o.png", "--model", "nope", "--local"], "nope"),
        (["heal", tmp_path / "in.png", "-o", tmp_path / "o.png", "--mode", "scratch", "--local"], "marker"),
        (["models", "show", "nope"], "no saved model"),
        # a home without keys: a network endpoint needs CURVE keys made beforehand
        (["serve", "--endpoint", "tcp://0.0.0.0:5999"], "without CURVE keys"),
    ]
    for args, words in cases:
        r = healdust(*args, home=tmp_path / "no-keys" if args[0] == "serve" else home)
        assert r.returncode != 0, args
        lines = [ln for ln in r.stderr.strip().splitlines() if ln]
        assert len(lines) == 1 and lines[0].startswith("healdust: ") and words in lines[0], (args, r.stderr)
    assert not (tmp_path / "o.png").exists()


def test_heal_starts_a_daemon_and_reuses_a_saved_model(tmp_path, home):
    """Through a daemon the CLI starts itself: fine-tune + save; then a second image, no markers."""
    clean, dusty, truth = dusty_image(224, seed=12, count=12, kind="film")
    write_image(tmp_path / "one.png", to_u8(dusty))
    (tmp_path / "markers.json").write_text(json.dumps({"dust": markers_for(truth, 4), "not_dust": []}))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    env = {"HEALDUST_ENDPOINT": endpoint}
    try:
        r = healdust("heal", tmp_path / "one.png", "-o", tmp_path / "one-healed.png", "--markers-file",
                     tmp_path / "markers.json", "--save-model", "shoot-1", "--mask-out", tmp_path / "m1.png",
                     home=home, env=env)
        assert r.returncode == 0, r.stderr
        assert "starting a daemon" in r.stderr and "saved as shoot-1" in r.stdout
        with Client(endpoint) as c:
            assert c.hello()["protocol"] == 1  # still running in the background
        # the next frame of the scan: the same dust on the glass, another picture, no markers
        other = dusty_image(224, seed=13, count=0, kind="sensor")[0]
        write_image(tmp_path / "two.png", to_u8(np.where(truth[..., None], dusty, other)))
        r = healdust("heal", tmp_path / "two.png", "-o", tmp_path / "two-healed.png", "--model", "shoot-1",
                     "--mask-out", tmp_path / "m2.png", home=home, env=env)
        assert r.returncode == 0, r.stderr
        assert "model shoot-1" in r.stdout
        m2 = read_image(tmp_path / "m2.png").pixels[:, :, 0] > 0
        r = healdust("heal", tmp_path / "two.png", "-o", tmp_path / "two-base.png", "--mask-out",
                     tmp_path / "m2-base.png", home=home, env=env)
        assert r.returncode == 0 and "model base" in r.stdout, r.stderr
        m2_base = read_image(tmp_path / "m2-base.png").pixels[:, :, 0] > 0
        from healdust.metrics import score_masks

        # the fine-tuned decoder really is in use, and it still finds the shoot's dust. How
        # well against the base model is the benchmark's to say (bench/encoders.py --reuse,
        # README): on film damage about as well, on one 224² frame a spot either way
        assert not np.array_equal(m2, m2_base)
        assert score_masks(m2, truth).spot_recall >= 0.25
        r = healdust("models", "list", home=home)
        assert "shoot-1" in r.stdout
        r = healdust("models", "export", "shoot-1", tmp_path / "s.safetensors", home=home)
        assert r.returncode == 0, r.stderr
        assert healdust("models", "delete", "shoot-1", home=home).returncode == 0
        assert healdust("models", "import", tmp_path / "s.safetensors", "shoot-1b", home=home).returncode == 0
        assert "shoot-1b" in healdust("models", "list", home=home).stdout
    finally:
        _stop_daemon(endpoint)


def _stop_daemon(endpoint: str) -> None:
    """SIGTERM the background daemon serving ``endpoint`` (found through /proc)."""
    import signal
    from pathlib import Path

    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmd.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and endpoint.encode() in argv:
            os.kill(int(cmd.parent.name), signal.SIGTERM)


def test_batch_skips_a_bad_file_and_goes_on(tmp_path, home):
    files = []
    for i in range(2):
        write_image(tmp_path / f"f{i}.png", to_u8(dusty_image(96, seed=20 + i)[1]))
        files.append(tmp_path / f"f{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    r = healdust("batch", files[0], tmp_path / "broken.png", files[1], "--out-dir", tmp_path / "out", "--masks",
                 "--local", home=home)
    assert r.returncode == 1
    assert "broken.png: skipped" in r.stderr
    for f in files:
        assert (tmp_path / "out" / f.name).exists() and (tmp_path / "out" / f"{f.stem}.mask.png").exists()


def test_cli_and_module_are_the_same_program(home):
    r = healdust("--version", home=home)
    assert r.returncode == 0 and r.stdout.startswith("healdust ")
    exe = os.path.join(os.path.dirname(sys.executable), "healdust")
    r2 = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert r2.stdout == r.stdout


def test_no_daemon_and_nothing_to_start_is_an_error(tmp_path, home):
    with pytest.raises(DaemonUnavailable):
        with Client(f"tcp://127.0.0.1:{free_port()}") as c:
            c.hello(timeout=0.5)


def test_demo_runs_the_whole_job_through_a_daemon(tmp_path, home):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    try:
        r = healdust("demo", "--out-dir", tmp_path / "demo", home=home, env={"HEALDUST_ENDPOINT": endpoint})
        assert r.returncode == 0, r.stderr
        assert "starting a daemon" in r.stderr and f"daemon at {endpoint}" in r.stdout
        for name in ("before.png", "mask.png", "after.png", "true-mask.png", "markers.json"):
            assert (tmp_path / "demo" / name).exists(), name
        assert "precision" in r.stdout and "recall" in r.stdout
        assert "pixels outside the mask untouched: yes" in r.stdout
        before = read_image(tmp_path / "demo" / "before.png").pixels
        after = read_image(tmp_path / "demo" / "after.png").pixels
        assert after.shape == before.shape and not np.array_equal(after, before)
    finally:
        _stop_daemon(endpoint)


def test_heal_resubmits_when_the_daemon_dies_mid_job(tmp_path, home):
    """SIGKILL the daemon while the CLI's job fine-tunes: the CLI starts a new one and sends the job again."""
    import signal
    import time

    from .conftest import DaemonProcess

    clean, dusty, truth = dusty_image(224, seed=12, count=12, kind="film")
    write_image(tmp_path / "in.png", to_u8(dusty))
    (tmp_path / "markers.json").write_text(json.dumps({"dust": markers_for(truth, 4), "not_dust": []}))
    d = DaemonProcess(home)
    env = dict(os.environ, HEALDUST_HOME=str(home), HEALDUST_ENDPOINT=d.endpoint)
    cli = subprocess.Popen([sys.executable, "-m", "healdust", "heal", str(tmp_path / "in.png"), "-o",
                            str(tmp_path / "out.png"), "--markers-file", str(tmp_path / "markers.json"),
                            ], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.monotonic() + 120
        with Client(d.endpoint) as c:  # wait until the CLI's job is running
            while c.call("status").get("running") is None and time.monotonic() < deadline:
                time.sleep(0.05)
        d.stop(signal.SIGKILL)
        out, err = cli.communicate(timeout=400)
        assert cli.returncode == 0, err
        assert "went away during the job; resubmitting" in err and "starting a daemon" in err
        assert "spots healed" in out and (tmp_path / "out.png").exists()
    finally:
        if cli.poll() is None:
            cli.kill()
        _stop_daemon(d.endpoint)
