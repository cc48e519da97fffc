"""The healdust daemon: a ZeroMQ ROUTER, a fair job queue and one worker that owns the models.

The I/O loop (the thread that calls ``Server.serve``) validates every message, answers
``hello``, ``status``, ``cancel`` and ``models.*`` itself, and queues ``heal``, ``detect``
and ``inpaint`` jobs. The worker thread runs them one at a time on the warm models and
sends its progress events and final replies back to the I/O loop through an inproc socket,
so only the I/O thread ever touches the ROUTER.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import zmq

from . import __version__
from .model.weights_io import WeightsError
from .pipeline import Cancelled, JobError, JobSpec, Pipeline
from .protocol import codec, keys
from .protocol.codec import ImageDesc, Limits, ProtocolError
from .runtime import release_freed_memory
from .store import ModelNotFound

log = logging.getLogger("healdust.daemon")

NP_DTYPES = {"u8": np.dtype("u1"), "u16": np.dtype("<u2"), "f16": np.dtype("<f2"), "f32": np.dtype("<f4")}
PROTO_DTYPES = {np.dtype("u1"): "u8", np.dtype("<u2"): "u16", np.dtype("<f2"): "f16", np.dtype("<f4"): "f32"}
JOB_TYPES = ("heal", "detect", "inpaint")
PROGRESS_INTERVAL = 0.1  # s between progress events of one job (stage changes always go)
ZAP_DOMAIN = "healdust"


def image_from_frame(desc: ImageDesc, buf) -> np.ndarray:
    """An HxWxC array of the frame's pixels: a read-only view when rows are packed."""
    dt = NP_DTYPES[desc.dtype]
    shape = (desc.height, desc.width, desc.channels)
    if desc.stride == desc.row_bytes or desc.height == 1:  # one row: its stride (any size at all) is unused
        return np.frombuffer(buf, dtype=dt, count=desc.width * desc.height * desc.channels).reshape(shape)
    raw = np.frombuffer(buf, dtype=np.uint8, count=desc.min_bytes)
    rows = np.lib.stride_tricks.as_strided(raw, shape=(desc.height, desc.row_bytes),
                                           strides=(desc.stride, 1), writeable=False)
    return np.ascontiguousarray(rows).view(dt).reshape(shape)


def image_reply(arr: np.ndarray, order: str, frame: int) -> tuple[dict, np.ndarray]:
    arr = np.ascontiguousarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    dt = np.dtype(arr.dtype).newbyteorder("<") if arr.dtype.itemsize > 1 else np.dtype("u1")
    arr = arr.astype(dt, copy=False)
    desc = ImageDesc.packed(arr.shape[1], arr.shape[0], order, PROTO_DTYPES[dt], frame)
    return desc.to_dict(), arr


@dataclass
class Job:
    client: bytes
    rid: str
    kind: str
    spec: JobSpec
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        """What the job holds while queued: its pixels and mask."""
        image, mask = getattr(self.spec, "image", None), getattr(self.spec, "mask", None)
        return sum(int(a.nbytes) for a in (image, mask) if a is not None)


class FairQueue:
    """Jobs per client, taken round-robin across clients."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._by_client: OrderedDict[bytes, deque[Job]] = OrderedDict()
        self._cv = threading.Condition()
        self._closed = False
        self._bytes = 0  # pixels (and masks) of the queued jobs

    def __len__(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._by_client.values())

    def put(self, job: Job) -> int:
        """Queue ``job``; returns how many jobs are ahead of it. Raises ProtocolError(busy)."""
        with self._cv:
            total = sum(len(q) for q in self._by_client.values())
            mine = self._by_client.get(job.client)
            if total >= self.limits.max_queue:
                raise ProtocolError("busy", f"the daemon is busy ({total} jobs queued); try again later",
                                    job.rid)
            if mine and len(mine) >= self.limits.max_queue_per_client:
                raise ProtocolError("busy", f"busy: this client already has {len(mine)} jobs queued (the "
                                            f"per-client limit); wait for some to finish", job.rid)
            if self._bytes + job.nbytes > self.limits.max_queue_bytes and total:
                raise ProtocolError("busy", f"the daemon is busy ({self._bytes >> 20} MiB of images queued, "
                                            f"limit {self.limits.max_queue_bytes >> 20} MiB); try again later",
                                    job.rid)
            self._by_client.setdefault(job.client, deque()).append(job)
            self._bytes += job.nbytes
            self._cv.notify()
            return total

    def wait(self, timeout: float = 0.2) -> bool:
        """Whether a job is waiting (after at most ``timeout`` s)."""
        with self._cv:
            if not self._by_client and not self._closed:
                self._cv.wait(timeout)
            return bool(self._by_client)

    def get(self) -> Job | None:
        """The next job round-robin, or None; never waits."""
        with self._cv:
            if not self._by_client:
                return None
            client, q = next(iter(self._by_client.items()))
            job = q.popleft()
            del self._by_client[client]
            if q:  # the client goes to the back of the line
                self._by_client[client] = q
            self._bytes -= job.nbytes
            return job

    def remove(self, client: bytes, rid: str | None = None) -> list[Job]:
        """Take out one client's queued job ``rid`` (or all of them)."""
        with self._cv:
            q = self._by_client.get(client)
            if not q:
                return []
            gone = [j for j in q if rid is None or j.rid == rid]
            for j in gone:
                q.remove(j)
                self._bytes -= j.nbytes
            if not q:
                del self._by_client[client]
            return gone

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class Server:
    def __init__(self, endpoint: str, pipeline: Pipeline, limits: Limits | None = None,
                 server_keys: keys.ServerKeys | None = None, warm_up: Callable[[], None] | None = None):
        """server_keys: required for TCP endpoints (PLAIN token on loopback, CURVE elsewhere).
        warm_up: run on the worker thread before the daemon says it is ready, so that the
        threads a job needs (its OpenMP team: runtime.py) exist before the first job; a job
        short of memory then fails with an error instead of failing to start a thread."""
        self.endpoint = endpoint
        self.kind = keys.endpoint_kind(endpoint)
        if self.kind != "ipc" and server_keys is None:
            raise keys.KeysError(f"listening on {endpoint} needs keys (keys.ensure_keys)")
        self.keys = server_keys
        self.pipeline = pipeline
        self.limits = limits or codec.DEFAULT_LIMITS
        self.queue = FairQueue(self.limits)
        self.ctx = zmq.Context()
        self.running: Job | None = None
        self._stop = threading.Event()
        self._running_lock = threading.Lock()  # 'cancelled: true' and the job's end agree
        self._started = time.monotonic()
        self._out_addr = f"inproc://healdust-out-{id(self)}"
        self._warm_up = warm_up
        self._warmed = threading.Event()
        self._warm_error: BaseException | None = None

    # -- replies --------------------------------------------------------------------
    @staticmethod
    def _frames(rid: str, type_: str, fields: dict | None = None, buffers: list | None = None) -> list:
        return codec.encode(type_, rid, fields, buffers)

    def _send(self, sock: zmq.Socket, client: bytes, frames: list) -> bool:
        try:
            sock.send_multipart([client, *frames], copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:  # the client is gone: its jobs go too
                self._client_gone(client)
            else:
                log.warning("could not send to a client: %s", e)
            return False

    def _client_gone(self, client: bytes) -> None:
        with self._running_lock:
            dropped = self.queue.remove(client)
            running = self.running
            if running is not None and running.client == client:
                running.cancel.set()
        if dropped or (running is not None and running.client == client):
            log.info("a client disconnected; cancelled %d queued job(s)", len(dropped))

    def _error(self, sock, client: bytes, rid: str, code: str, message: str) -> None:
        self._send(sock, client, self._frames(rid, "error", {"code": code, "message": message}))

    # -- the I/O loop ---------------------------------------------------------------
    def serve(self, ready=None, install_signals: bool = True) -> None:
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_pixels * 16 + self.limits.max_header_bytes)
        auth = self._secure(router)
        router.bind(self.endpoint)
        self._router = router
        if self.endpoint.endswith(":0") or self.endpoint.endswith(":*"):
            self.endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        if self.kind == "ipc":
            _private_ipc(self.endpoint)
        inbox = self.ctx.socket(zmq.PULL)
        inbox.bind(self._out_addr)
        worker = threading.Thread(target=self._worker, name="healdust-worker", daemon=True)
        worker.start()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._stop.set())
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(inbox, zmq.POLLIN)
        try:
            self._warmed.wait()
            if self._warm_error is not None:
                raise self._warm_error
            if ready:
                ready(self.endpoint)
            while not self._stop.is_set():
                events = dict(poller.poll(100))
                if inbox in events:
                    while True:
                        try:
                            frames = inbox.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._send(router, frames[0].bytes, frames[1:])
                if router in events:
                    for _ in range(64):
                        try:
                            frames = router.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(router, frames)
        finally:
            log.info("shutting down")
            self.queue.close()
            if self.running is not None:
                self.running.cancel.set()
            worker.join(timeout=5)
            router.close(0)
            inbox.close(0)
            if auth is not None:
                auth.stop()
            self.ctx.term()

    def stop(self) -> None:
        self._stop.set()

    def _secure(self, router: zmq.Socket):
        """Who may connect: a ZAP handler checking the PLAIN token (loopback) or CURVE keys."""
        if self.kind == "ipc":
            return None
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("healdust.auth"))
        auth.start()
        if self.kind == "loopback":
            auth.configure_plain(domain=ZAP_DOMAIN, passwords={keys.PLAIN_USER.decode(): self.keys.token.decode()})
            router.plain_server = True
        else:
            auth.configure_curve(domain=ZAP_DOMAIN, location=str(self.keys.clients))
            router.curve_server = True
            router.curve_publickey = self.keys.public
            router.curve_secretkey = self.keys.secret
        router.zap_domain = ZAP_DOMAIN.encode()
        return auth

    def _handle(self, router: zmq.Socket, frames: list) -> None:
        client = frames[0].bytes
        try:
            msg = codec.decode(frames[1:], self.limits)
        except ProtocolError as e:
            self._error(router, client, e.request_id, e.code, e.message)
            return
        try:
            handler = getattr(self, "_on_" + msg.type.replace(".", "_"), None)
            if msg.type in JOB_TYPES:
                self._on_job(router, client, msg)
            elif handler is not None and msg.type in codec.REQUEST_TYPES:
                fields, buffers = handler(client, msg)
                self._send(router, client, self._frames(msg.id, "result", fields, buffers))
            else:
                self._error(router, client, msg.id, "unknown_type",
                            f"unknown message type {msg.type!r}; known: {', '.join(codec.REQUEST_TYPES)}")
        except ProtocolError as e:
            self._error(router, client, msg.id, e.code, e.message)
        except ModelNotFound as e:
            self._error(router, client, msg.id, "not_found", str(e))
        except WeightsError as e:
            self._error(router, client, msg.id, "bad_model", str(e))
        except OSError as e:  # a full disk, a read-only folder: the old files are untouched
            self._error(router, client, msg.id, "storage", f"could not write to the model store: "
                                                           f"{e.strerror or e}; nothing was changed")
        except ValueError as e:
            self._error(router, client, msg.id, "bad_request", str(e))
        except Exception as e:  # never let one message take the daemon down
            log.error("internal error on %s: %s", msg.type, traceback.format_exc())
            self._error(router, client, msg.id, "internal", f"internal error: {type(e).__name__}: {e}")

    # -- immediate requests ---------------------------------------------------------
    def _on_hello(self, client, msg):
        return {"protocol": codec.PROTOCOL_VERSION, "server": f"healdust {__version__}",
                "device": str(self.pipeline.device), "models_loaded": self.pipeline.models_loaded,
                "queue": len(self.queue), "limits": self.limits.as_dict()}, None

    def _on_status(self, client, msg):
        running = self.running
        return {"device": str(self.pipeline.device), "models_loaded": self.pipeline.models_loaded,
                "queue": len(self.queue), "running": running.rid if running else None,
                "uptime_s": round(time.monotonic() - self._started, 1)}, None

    def _on_cancel(self, client, msg):
        target = msg.header.get("target")
        if not isinstance(target, str):
            raise ProtocolError("bad_request", "cancel needs 'target': the id of the request to stop")
        with self._running_lock:  # a job is either queued or running here, never in between
            gone = self.queue.remove(client, target)
            running = self.running
            if not gone and running is not None and running.client == client and running.rid == target:
                running.cancel.set()
                return {"cancelled": True}, None
        for job in gone:
            self._send_final(job, "cancelled", {})
        return {"cancelled": bool(gone)}, None

    def _send_final(self, job: Job, type_: str, fields: dict) -> None:
        """A final reply for a job that never reached the worker (I/O thread only)."""
        self._send(self._router, job.client, self._frames(job.rid, type_, fields))

    def _on_models_list(self, client, msg):
        return {"models": [_model_summary(m) for m in self.pipeline.store.list()]}, None

    def _on_models_show(self, client, msg):
        name = codec.model_name(msg.header)
        meta = self.pipeline.store.meta(name)
        meta = dict(meta, size_bytes=self.pipeline.store.path(name).stat().st_size,
                    path=str(self.pipeline.store.path(name)))
        return {"model": meta}, None

    def _on_models_delete(self, client, msg):
        name = codec.model_name(msg.header)
        self.pipeline.forget(name)
        return {"deleted": self.pipeline.store.delete(name)}, None

    def _on_models_export(self, client, msg):
        name = codec.model_name(msg.header)
        return {"name": name}, [self.pipeline.store.export_bytes(name)]

    def _on_models_import(self, client, msg):
        name = codec.model_name(msg.header, required=False)
        if len(msg.buffers) != 1:
            raise ProtocolError("bad_request", "models.import needs the model file as one buffer frame")
        data = msg.buffers[0]
        if len(data) > self.limits.max_model_bytes:
            raise ProtocolError("too_large", f"model file over {self.limits.max_model_bytes} bytes")
        data = data.bytes if hasattr(data, "bytes") else bytes(data)
        # The check compares names, shapes and types only (store.py): no tensor work on this
        # thread, which would leave it an OpenMP team beside the worker's (runtime.py).
        try:
            name = self.pipeline.store.import_bytes(data, name, self.pipeline.base, self.pipeline.base_meta)
        finally:  # hand back what the check read
            release_freed_memory()
        self.pipeline.forget(name)
        return {"name": name}, None

    # -- jobs -----------------------------------------------------------------------
    def _parse_job(self, msg: codec.Message) -> tuple[JobSpec, ImageDesc]:
        h = msg.header
        desc = codec.parse_image(h.get("image"), msg.buffers, "image", self.limits)
        image = image_from_frame(desc, msg.buffers[desc.frame - 1])
        mask = None
        if h.get("mask") is not None:
            mdesc = codec.parse_image(h.get("mask"), msg.buffers, "mask", self.limits)
            if (mdesc.width, mdesc.height) != (desc.width, desc.height):
                raise ProtocolError("bad_request", f"mask is {mdesc.width}x{mdesc.height}, "
                                                   f"image is {desc.width}x{desc.height}")
            if mdesc.channels != 1 or mdesc.dtype != "u8":
                raise ProtocolError("bad_request", "mask must be GRAY u8 (255 = dust)")
            mask = image_from_frame(mdesc, msg.buffers[mdesc.frame - 1])[:, :, 0] >= 128
        elif msg.type == "inpaint":
            raise ProtocolError("bad_request", "inpaint needs a 'mask' image")
        markers = codec.parse_markers(h.get("markers"), self.limits)
        mode = h.get("mode") or "transfer"
        if mode not in ("transfer", "scratch"):
            raise ProtocolError("bad_request", "mode must be 'transfer' or 'scratch'")
        threshold = h.get("threshold")
        if threshold is not None:
            if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold < 1:
                raise ProtocolError("bad_request", "threshold must be a number between 0 and 1")
        model = codec.optional_str(h, "model", 64)
        if model not in (None, "auto", "base"):
            model = codec.model_name(h, "model")
        camera = h.get("camera") or {}
        if not isinstance(camera, dict) or not all(isinstance(camera.get(k), (str, int, float, type(None)))
                                                   for k in ("make", "model", "serial")):
            raise ProtocolError("bad_request", "camera must be a map of make, model, serial (strings)")
        camera = {k: str(camera[k])[:128] for k in ("make", "model", "serial") if camera.get(k)}
        spec = JobSpec(kind=msg.type, image=image, order=desc.order, dust=markers["dust"],
                       not_dust=markers["not_dust"], model=model,
                       save_model=codec.model_name(h, "save_model", required=False), mode=mode,
                       threshold=None if threshold is None else float(threshold), camera=camera, mask=mask)
        return spec, desc

    def _on_job(self, router, client: bytes, msg: codec.Message) -> None:
        spec, _ = self._parse_job(msg)
        job = Job(client, msg.id, msg.type, spec)
        ahead = self.queue.put(job)
        ahead += 1 if self.running is not None else 0
        self._send(router, client, self._frames(msg.id, "progress", {"stage": "queued", "fraction": 0.0,
                                                                     "position": ahead}))

    def _worker(self) -> None:
        try:
            if self._warm_up is not None:
                self._warm_up()
                self._start_zero_copy_helper()
                release_freed_memory()
        except BaseException as e:  # raised by serve()
            self._warm_error = e
            return
        finally:
            self._warmed.set()
        out = self.ctx.socket(zmq.PUSH)
        out.connect(self._out_addr)
        try:
            while not self._stop.is_set():
                if not self.queue.wait():
                    continue
                with self._running_lock:  # taken from the queue and marked running at once
                    job = self.queue.get()
                    self.running = job
                if job is None:
                    continue
                try:
                    type_, fields, buffers = self._run(out, job)
                finally:
                    with self._running_lock:
                        self.running = None
                        late = job.cancel.is_set()
                if late and type_ != "cancelled":  # its client was told 'cancelled: true' meanwhile
                    type_, fields, buffers = "cancelled", {}, None
                # sent after 'running' is cleared: a client that saw the reply sees an idle daemon
                self._push_final(out, job, type_, fields, buffers)
                del job, fields, buffers
                if not len(self.queue):  # idle: hand back what the heaps kept for reuse
                    release_freed_memory()
        finally:
            out.close(linger=2000)

    def _start_zero_copy_helper(self) -> None:
        """pyzmq hands zero-copy buffers back through a thread (and a ZMQ context) of its
        own, which the first large zero-copy send starts: start it now, with the warm-up,
        rather than inside the first job that replies with pixels."""
        a, b = self.ctx.socket(zmq.PAIR), self.ctx.socket(zmq.PAIR)
        try:
            addr = f"inproc://healdust-warm-{id(self)}"
            b.bind(addr)
            a.connect(addr)
            a.send(bytearray(1 << 17), copy=False)
            b.recv(copy=False)
        finally:
            a.close(0)
            b.close(0)

    def _push(self, out: zmq.Socket, job: Job, type_: str, fields: dict, buffers: list | None = None) -> None:
        """From the worker to the I/O loop, which forwards it to the job's client."""
        out.send_multipart([job.client, *self._frames(job.rid, type_, fields, buffers)], copy=False)

    def _push_final(self, out: zmq.Socket, job: Job, type_: str, fields: dict, buffers: list | None) -> None:
        """The job's final reply; if it cannot be sent (short of memory for the frames, or a
        thread that zero-copy sending needs), the client gets an error instead, and the
        worker goes on serving whatever happens."""
        try:
            self._push(out, job, type_, fields, buffers)
            return
        except Exception as e:
            log.error("could not send the reply to job %s: %s", job.rid, e)
            if _is_oom(e):
                code, message = "out_of_memory", "out of memory while sending the result; try a smaller image"
            else:
                code, message = "internal", f"internal error sending the result: {type(e).__name__}: {e}"
        try:
            self._push(out, job, "error", {"code": code, "message": message})
        except Exception as e:  # nothing more can be done for this client; keep serving the others
            log.error("could not send an error to job %s either: %s", job.rid, e)

    def _run(self, out: zmq.Socket, job: Job) -> tuple[str, dict, list | None]:
        """Run one job, streaming its progress; returns its final reply."""
        last = {"t": 0.0, "stage": None}

        def check_cancel() -> None:
            if job.cancel.is_set() or self._stop.is_set():
                raise Cancelled()

        def progress(stage: str, fraction: float, **extra) -> None:
            check_cancel()
            now = time.monotonic()
            if stage == last["stage"] and now - last["t"] < PROGRESS_INTERVAL and fraction < 1.0:
                return
            last.update(t=now, stage=stage)
            fields = {"stage": stage, "fraction": round(float(fraction), 4)}
            fields.update({k: float(v) if isinstance(v, (int, float)) else v for k, v in extra.items()})
            self._push(out, job, "progress", fields)

        try:
            check_cancel()
            res = self.pipeline.run(job.spec, progress, check_cancel)
            fields = {"spots": res.spots, "threshold": res.threshold, "model": res.model,
                      "saved_model": res.saved_model, "seconds": res.seconds, "notes": res.notes}
            buffers = []
            if res.mask is not None and job.kind in ("heal", "detect"):
                fields["mask"], buf = image_reply(res.mask, "GRAY", len(buffers) + 1)
                buffers.append(buf)
            if res.healed is not None:
                fields["healed"], buf = image_reply(res.healed, job.spec.order, len(buffers) + 1)
                buffers.append(buf)
            return "result", fields, buffers
        except Cancelled:
            return "cancelled", {}, None
        except JobError as e:
            return "error", {"code": e.code, "message": e.message}, None
        except WeightsError as e:
            return "error", {"code": "bad_model", "message": str(e)}, None
        except Exception as e:
            if _is_oom(e):
                log.error("out of memory: %s", e)
                return "error", {"code": "out_of_memory",
                                 "message": "out of memory on this image; try a smaller tile size "
                                            "(healdust serve --tile 256) or a smaller image"}, None
            log.error("job %s failed: %s", job.rid, traceback.format_exc())
            return "error", {"code": "internal", "message": f"internal error: {type(e).__name__}: {e}"}, None


def _private_ipc(endpoint: str) -> None:
    """Only the owner may connect to an ipc:// socket (connecting needs write permission)."""
    path = endpoint[len("ipc://"):]
    if path and not path.startswith("@") and os.path.exists(path):
        os.chmod(path, 0o600)


def _is_oom(e: BaseException) -> bool:
    """Whether ``e`` means the job ran out of memory. torch reports a failed CPU
    allocation as a RuntimeError, not as MemoryError."""
    if isinstance(e, (MemoryError, _oom_error())):
        return True
    if not isinstance(e, RuntimeError):
        return False
    text = str(e).lower()
    # oneDNN says "could not create a primitive" when its workspace allocation fails
    # and Python's threading "can't start new thread" when a thread's stack cannot be mapped
    return any(w in text for w in ("can't allocate memory", "out of memory", "bad_alloc",
                                   "could not create a primitive", "can't start new thread"))


def _oom_error() -> type[BaseException]:
    import torch

    return getattr(torch, "OutOfMemoryError", MemoryError)


def _model_summary(meta: dict) -> dict:
    keys = ("name", "created", "camera", "base", "markers", "mode", "threshold", "size_bytes", "error")
    return {k: meta[k] for k in keys if k in meta}
