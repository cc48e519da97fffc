"""The daemon as a real process on a real ZeroMQ socket."""

from __future__ import annotations

import os
import signal
import threading
import time

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from healdust.metrics import score_masks
from healdust.protocol import ImageDesc, keys
from healdust.protocol.client import Client, JobCancelled, RemoteError

from .conftest import DaemonProcess, dusty_image, markers_for, to_u8, to_u16
from .stress import child_pids, proc_status_kb, wait_gone


def _img_fields(pixels: np.ndarray, order: str, dtype: str, frame: int = 1) -> dict:
    return ImageDesc.packed(pixels.shape[1], pixels.shape[0], order, dtype, frame).to_dict()


def _result_image(ev, key: str) -> np.ndarray:
    d = ev.get(key)
    dt = {"u8": "u1", "u16": "<u2", "f16": "<f2", "f32": "<f4"}[d["dtype"]]
    buf = ev.buffers[d["frame"] - 1]
    return np.frombuffer(buf, dt).reshape(d["height"], d["width"], d["channels"])


def test_hello_and_status(daemon):
    with Client(daemon.endpoint) as c:
        h = c.hello()
        assert h["protocol"] == 1 and h["device"] == "cpu" and "base" in h["models_loaded"]
        assert h["limits"]["max_pixels"] > 0
        s = c.call("status").header
        assert s["queue"] == 0 and "uptime_s" in s


def test_heal_with_markers_streams_progress_and_heals(daemon):
    clean, dusty, truth = dusty_image(256, seed=1, count=14)
    img = to_u8(dusty)
    markers = {"dust": markers_for(truth, 4)}
    stages, losses = [], []
    with Client(daemon.endpoint, timeout=300) as c:
        ev = c.call("heal", {"image": _img_fields(img, "RGB", "u8"), "markers": markers}, [img],
                    on_progress=lambda e: (stages.append(e.get("stage")),
                                           e.get("loss") is not None and losses.append(e.get("loss"))))
    assert {"queued", "finetune", "detect", "heal"} <= set(stages)
    assert losses and all(np.isfinite(losses))
    mask = _result_image(ev, "mask")[:, :, 0] > 0
    healed = _result_image(ev, "healed")
    assert healed.shape == img.shape and healed.dtype == np.uint8
    # every marked spot is in the mask, and healing brought those pixels closer to the clean image
    yy, xx = np.mgrid[:256, :256]
    for m in markers["dust"]:
        assert mask[(yy - m["y"]) ** 2 + (xx - m["x"]) ** 2 <= m["r"] ** 2].any()
    s = score_masks(mask, truth)
    assert s.spot_recall >= 0.6
    hit = mask & truth
    err_before = np.abs(img[hit].astype(float) - to_u8(clean)[hit]).mean()
    err_after = np.abs(healed[hit].astype(float) - to_u8(clean)[hit]).mean()
    assert err_after < 0.5 * err_before
    # nothing outside the mask changed
    assert np.array_equal(healed[~mask], img[~mask])
    assert ev.get("spots") >= len(markers["dust"]) and ev.get("model") == "base"


def test_detect_returns_mask_only(daemon):
    _, dusty, _ = dusty_image(128, seed=2)
    img = to_u8(dusty)
    with Client(daemon.endpoint, timeout=120) as c:
        ev = c.call("detect", {"image": _img_fields(img, "RGB", "u8")}, [img])
    assert ev.get("healed") is None and len(ev.buffers) == 1
    assert _result_image(ev, "mask").shape == (128, 128, 1)


def test_inpaint_heals_exactly_the_mask_16bit_bgra(daemon):
    clean, dusty, core = dusty_image(128, seed=3)
    truth = cv2.dilate(core.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)  # with its soft edge
    rgba = np.concatenate([to_u16(dusty), np.full((128, 128, 1), 40000, np.uint16)], axis=2)
    rgba[5:20, 5:20, 3] = 123  # alpha must come back untouched
    bgra = np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]])
    mask = truth.astype(np.uint8)[:, :, None] * 255
    with Client(daemon.endpoint, timeout=120) as c:
        ev = c.call("inpaint", {"image": _img_fields(bgra, "BGRA", "u16"),
                                "mask": _img_fields(mask, "GRAY", "u8", 2)}, [bgra, mask])
    healed = _result_image(ev, "healed")
    assert healed.dtype == np.dtype("<u2") and healed.shape == bgra.shape
    assert np.array_equal(healed[~truth], bgra[~truth])
    assert np.array_equal(healed[:, :, 3], bgra[:, :, 3])
    ref = to_u16(clean)[:, :, ::-1]
    before = np.abs(bgra[:, :, :3][core].astype(float) - ref[core]).mean()
    after = np.abs(healed[:, :, :3][core].astype(float) - ref[core]).mean()
    assert after < 0.4 * before


def test_strided_float_image(daemon):
    _, dusty, truth = dusty_image(64, seed=4)
    f = dusty.astype("<f4")
    stride = 64 * 3 * 4 + 40
    buf = np.zeros((64, stride), np.uint8)
    buf[:, :64 * 12] = f.view(np.uint8).reshape(64, -1)
    desc = dict(_img_fields(f, "RGB", "f32"), stride=stride)
    mask = truth.astype(np.uint8)[:, :, None] * 255
    with Client(daemon.endpoint, timeout=120) as c:
        ev = c.call("inpaint", {"image": desc, "mask": _img_fields(mask, "GRAY", "u8", 2)}, [buf, mask])
    healed = _result_image(ev, "healed")
    assert healed.dtype == np.dtype("<f4") and np.array_equal(healed[~truth], f[~truth])


def test_cancel_mid_finetune_within_a_second(daemon):
    _, dusty, truth = dusty_image(256, seed=5)
    img = to_u8(dusty)
    with Client(daemon.endpoint, timeout=300) as c:
        rid = c.submit("heal", {"image": _img_fields(img, "RGB", "u8"),
                                "markers": {"dust": markers_for(truth, 5)}, "mode": "scratch"}, [img])
        t_cancel = None
        final = None
        for ev in c.events(rid):
            if ev.type == "progress" and ev.get("stage") == "finetune" and t_cancel is None:
                t_cancel = time.monotonic()
                c.cancel(rid)
            if ev.final:
                final = ev
        assert final.type == "cancelled"
        assert time.monotonic() - t_cancel < 2.5  # spec: within a second; margin for a loaded machine
        assert c.call("status").get("running") is None


def test_cancel_queued_job_and_unknown_target(daemon):
    _, dusty, truth = dusty_image(256, seed=6)
    img = to_u8(dusty)
    with Client(daemon.endpoint, timeout=300) as c:
        first = c.submit("heal", {"image": _img_fields(img, "RGB", "u8"),
                                  "markers": {"dust": markers_for(truth, 3)}, "mode": "scratch"}, [img])
        second = c.submit("detect", {"image": _img_fields(img, "RGB", "u8")}, [img])
        c.cancel(second)
        assert [e.type for e in c.events(second)][-1] == "cancelled"
        c.cancel(first)
        assert [e.type for e in c.events(first)][-1] == "cancelled"
        assert c.call("cancel", {"target": "nothing-like-this"}).get("cancelled") is False


def test_two_clients_at_once_both_served(daemon):
    _, dusty, _ = dusty_image(192, seed=7)
    img = to_u8(dusty)
    results = {}

    def run(name):
        with Client(daemon.endpoint, timeout=300) as c:
            results[name] = [c.call("detect", {"image": _img_fields(img, "RGB", "u8")}, [img]).get("spots")
                             for _ in range(2)]

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert results["a"] == results["b"] and len(results["a"]) == 2


def test_bad_requests_get_errors_and_daemon_keeps_serving(daemon):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    keys.apply_client_security(s, keys.client_security(daemon.endpoint))
    s.connect(daemon.endpoint)

    def ask(frames):
        s.send_multipart(frames)
        assert s.poll(10000), "the daemon must answer a bad message"
        return msgpack.unpackb(s.recv_multipart()[0])

    assert ask([b"\xc1\xc1 not msgpack"])["code"] == "bad_message"
    assert ask([msgpack.packb({"v": 1, "type": "frobnicate", "id": "u1"})])["code"] == "unknown_type"
    assert ask([msgpack.packb({"v": 7, "type": "hello", "id": "u2"})])["code"] == "unsupported_version"
    desc = ImageDesc.packed(100, 100, "RGB", "u8").to_dict()
    r = ask([msgpack.packb({"v": 1, "type": "heal", "id": "u3", "image": desc}), b"\0" * 10])
    assert r["code"] == "bad_request" and r["id"] == "u3"
    huge = dict(desc, width=60000, height=60000, stride=180000)
    assert ask([msgpack.packb({"v": 1, "type": "heal", "id": "u4", "image": huge}), b"\0"])["code"] == "too_large"
    r = ask([msgpack.packb({"v": 1, "type": "heal", "id": "u5", "image": desc, "markers": {"dust": [1]}}),
             b"\0" * 30000])
    assert r["code"] == "bad_request"
    r = ask([msgpack.packb({"v": 1, "type": "heal", "id": "u6", "image": desc, "model": "no-such"}),
             b"\0" * 30000])
    assert r["type"] == "progress" or r["code"] == "not_found"
    while r["type"] == "progress":
        assert s.poll(30000)
        r = msgpack.unpackb(s.recv_multipart()[0])
    assert r["code"] == "not_found"
    s.close()
    # and a good request afterwards
    with Client(daemon.endpoint) as c:
        assert c.hello()["protocol"] == 1
    assert daemon.alive()


def test_saved_model_reused_without_markers(daemon):
    """Fine-tune on one image, save; a second image with dust at the same places, no markers."""
    clean, dusty, truth = dusty_image(256, seed=8, count=12, kind="film")
    img = to_u8(dusty)
    with Client(daemon.endpoint, timeout=300) as c:
        ev = c.call("heal", {"image": _img_fields(img, "RGB", "u8"), "markers": {"dust": markers_for(truth, 4)},
                             "save_model": "cam-a", "camera": {"make": "Acme", "model": "X1"}}, [img])
        assert ev.get("saved_model") == "cam-a"
        models = c.call("models.list").get("models")
        assert [m["name"] for m in models] == ["cam-a"] and models[0]["camera"]["make"] == "Acme"
        # the same dust (on the scanner glass) over another frame of the film
        from healdust import synth

        other = synth.load_photo(__import__("healdust.demo", fromlist=["x"]).sample_path())[300:556, 600:856]
        other = other.astype(np.float32) / 255
        second = to_u8(np.where(truth[..., None], dusty, other))
        ev2 = c.call("detect", {"image": _img_fields(second, "RGB", "u8"), "model": "auto",
                                "camera": {"make": "Acme", "model": "X1"}}, [second])
        assert ev2.get("model") == "cam-a"
        s = score_masks(_result_image(ev2, "mask")[:, :, 0] > 0, truth)
        assert s.spot_recall >= 0.5, s.as_dict()
        blob = c.call("models.export", {"name": "cam-a"}).buffers[0]
        threads = _threads(daemon.proc.pid)
        assert c.call("models.import", {"name": "cam-b"}, [bytes(blob)]).get("name") == "cam-b"
        # the import's check does no tensor work on the I/O thread, so it starts no second
        # OpenMP team there (runtime.py: that slows every later job)
        assert _threads(daemon.proc.pid) == threads
        assert c.call("models.show", {"name": "cam-b"}).get("model")["base"]
        with pytest.raises(RemoteError) as e:
            c.call("models.import", {"name": "junk"}, [b"not a model at all"])
        assert e.value.code == "bad_model"
        assert c.call("models.delete", {"name": "cam-b"}).get("deleted") is True
        with pytest.raises(RemoteError) as e:
            c.call("models.show", {"name": "cam-b"})
        assert e.value.code == "not_found"


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_scratch_without_markers_is_a_clear_error(daemon):
    img = to_u8(dusty_image(64, seed=9)[1])
    with Client(daemon.endpoint, timeout=60) as c, pytest.raises(RemoteError) as e:
        c.call("heal", {"image": _img_fields(img, "RGB", "u8"), "mode": "scratch"}, [img])
    assert e.value.code == "no_markers" and "marker" in e.value.message


def test_vanished_client_has_its_job_cancelled(daemon):
    _, dusty, truth = dusty_image(256, seed=10)
    img = to_u8(dusty)
    c = Client(daemon.endpoint, timeout=300)
    rid = c.submit("heal", {"image": _img_fields(img, "RGB", "u8"), "markers": {"dust": markers_for(truth, 4)},
                            "mode": "scratch"}, [img])
    for ev in c.events(rid):
        if ev.get("stage") == "finetune":
            break
    c.close()
    with Client(daemon.endpoint) as other:
        deadline = time.monotonic() + 10
        while other.call("status").get("running") is not None:
            assert time.monotonic() < deadline, "the job of a vanished client must be cancelled"
            time.sleep(0.2)


def test_cancelled_job_error_type():
    assert issubclass(JobCancelled, RuntimeError)


def test_queue_is_round_robin_across_clients():
    from healdust.pipeline import JobSpec
    from healdust.protocol import Limits
    from healdust.server import FairQueue, Job

    q = FairQueue(Limits(max_queue=5, max_queue_per_client=3))
    spec = JobSpec("detect", np.zeros((1, 1, 3), np.uint8))
    for client, rid in [(b"A", "a1"), (b"A", "a2"), (b"A", "a3"), (b"B", "b1"), (b"C", "c1")]:
        q.put(Job(client, rid, "detect", spec))
    with pytest.raises(Exception) as e:
        q.put(Job(b"D", "d1", "detect", spec))
    assert getattr(e.value, "code", None) == "busy"
    assert [q.get().rid for _ in range(5)] == ["a1", "b1", "c1", "a2", "a3"]
    assert q.get() is None and not q.wait(0.01)


def test_queue_limits_bytes_and_says_which_limit():
    from healdust.pipeline import JobSpec
    from healdust.protocol import Limits
    from healdust.server import FairQueue, Job

    q = FairQueue(Limits(max_queue=10, max_queue_per_client=2, max_queue_bytes=1000))
    big = JobSpec("detect", np.zeros((20, 20, 3), np.uint8))  # 1200 bytes: alone it is let in
    q.put(Job(b"A", "a1", "detect", big))
    with pytest.raises(Exception, match="MiB of images queued"):
        q.put(Job(b"B", "b1", "detect", JobSpec("detect", np.zeros((1, 1, 3), np.uint8))))
    assert q.get().rid == "a1"
    small = JobSpec("detect", np.zeros((10, 10, 3), np.uint8))
    q.put(Job(b"A", "a2", "detect", small))
    q.put(Job(b"A", "a3", "detect", small))
    with pytest.raises(Exception, match="this client already has 2 jobs"):
        q.put(Job(b"A", "a4", "detect", small))
    assert len(q.remove(b"A")) == 2 and q.get() is None
    q.put(Job(b"B", "b2", "detect", big))  # the removed jobs' bytes were given back


def test_sigint_shuts_down_cleanly(tmp_path):
    from .conftest import DaemonProcess

    d = DaemonProcess(tmp_path)
    with Client(d.endpoint) as c:
        assert c.hello()["protocol"] == 1
    assert d.stop(signal.SIGINT) == 0


def test_memory_a_job_used_is_given_back_once_the_daemon_is_idle(daemon):
    """The daemon keeps freed memory for reuse during a job (runtime.keep_freed_memory)
    and hands it back when its queue is empty, so an idle daemon stays small."""
    img = (np.random.default_rng(0).random((1500, 2000, 3)) * 255).astype(np.uint8)
    pid = daemon.proc.pid
    with Client(daemon.endpoint, timeout=120) as c:
        c.call("detect", {"image": _img_fields(img, "RGB", "u8")}, [img])  # the heap settles
        time.sleep(1.0)
        before = proc_status_kb(pid, "VmRSS") / 1024
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # restart the peak (VmHWM) from now
        c.call("detect", {"image": _img_fields(img, "RGB", "u8")}, [img])
        peak = proc_status_kb(pid, "VmHWM") / 1024
        time.sleep(1.0)
        after = proc_status_kb(pid, "VmRSS") / 1024
    summary = f"RSS {before:.0f} MB before the job, peak {peak:.0f} MB, {after:.0f} MB after"
    assert peak - after > 60, summary  # most of what the job used was handed back
    assert after - before < 30, summary


def test_the_daemon_starts_every_thread_and_process_before_it_says_ready(tmp_path):
    """Threads and healing processes are started with the warm-up (the worker's OpenMP
    team, pyzmq's zero-copy helper, the healing workers), not inside a job, where one that
    cannot start would cost the job; and the healing workers end with a killed daemon."""
    from healdust.heal import default_workers

    d = DaemonProcess(tmp_path / "home")
    try:
        clean, dusty, core = dusty_image(256, seed=4, count=30)
        img = to_u8(dusty)
        mask = cv2.dilate(core.astype(np.uint8), np.ones((5, 5), np.uint8))[:, :, None] * 255
        big = (np.random.default_rng(1).random((800, 1000, 3)) * 255).astype(np.uint8)
        with Client(d.endpoint, timeout=120) as c:
            c.hello()
            threads, workers = _threads(d.proc.pid), child_pids(d.proc.pid)
            assert len(workers) == (default_workers() if default_workers() > 1 else 0)
            ev = c.call("detect", {"image": _img_fields(big, "RGB", "u8")}, [big])
            assert _result_image(ev, "mask").shape[:2] == (800, 1000)  # a reply of 800 kB, zero-copy
            ev = c.call("inpaint", {"image": _img_fields(img, "RGB", "u8"),
                                    "mask": _img_fields(mask, "GRAY", "u8", 2)}, [img, mask])
            assert not np.array_equal(_result_image(ev, "healed"), img)
            assert _threads(d.proc.pid) == threads
            assert child_pids(d.proc.pid) == workers
    finally:
        d.stop(signal.SIGKILL)
    assert wait_gone(workers), "healing workers outlived the killed daemon"
