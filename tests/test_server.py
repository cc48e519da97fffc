"""The server's worker in-process, for what a real daemon cannot be made to do on cue: a
final reply that cannot be sent. (The daemon as a real process: tests/test_daemon.py.)"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from healdust.pipeline import Pipeline
from healdust.protocol import ImageDesc
from healdust.protocol.client import Client, RemoteError
from healdust.server import Server


def test_a_reply_that_cannot_be_sent_becomes_an_error_and_the_worker_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("HEALDUST_HOME", str(tmp_path / "home"))
    server = Server(f"ipc://{tmp_path}/healdust.sock", Pipeline("cpu"))
    real_push, failed = server._push, []

    def push(out, job, type_, fields, buffers=None):
        if type_ == "result" and not failed:  # the first result: no memory left for its frames
            failed.append(job.rid)
            raise MemoryError()
        return real_push(out, job, type_, fields, buffers)

    monkeypatch.setattr(server, "_push", push)
    ready = threading.Event()
    serving = threading.Thread(target=server.serve, daemon=True,
                               kwargs={"ready": lambda ep: ready.set(), "install_signals": False})
    serving.start()
    try:
        assert ready.wait(60)
        img = np.zeros((64, 64, 3), np.uint8)
        desc = ImageDesc.packed(64, 64, "RGB", "u8").to_dict()
        with Client(server.endpoint, timeout=60) as c:
            with pytest.raises(RemoteError) as e:
                c.call("detect", {"image": desc}, [img])
            assert e.value.code == "out_of_memory" and failed
            assert c.call("detect", {"image": desc}, [img]).type == "result"  # the worker is still there
    finally:
        server.stop()
        serving.join(15)
    assert not serving.is_alive()
