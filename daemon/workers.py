"""A pool of long-lived worker processes that run one function on many small tasks.

Healing a spot is hundreds of small NumPy and OpenCV calls with Python between them, so
threads, which share one interpreter, scale poorly: two threads on two cores measured
1.25–1.3× one. Processes do not share the interpreter.

Why not ``multiprocessing`` or ``concurrent.futures.ProcessPoolExecutor``: their ``spawn``
and ``forkserver`` workers import the parent's main script again (``python bench/x.py``
or the ``healdust`` console script would re-import the CLI, torch and all, in every
worker, or start workers recursively where a script has no ``__main__`` guard), and
``fork`` copies a process full of threads (the daemon's, OpenMP's), which can deadlock.
Here each worker is a fresh ``python`` that imports only the module holding its function
(for healing: NumPy and OpenCV, not torch), started once and reused by every job.

Tasks travel as pickles over the worker's stdin and results come back over its stdout,
each frame an 8-byte length and the bytes (pickle is safe here: both ends are this
package, in processes of the same user, over private pipes). A worker ends when its
stdin closes, so workers end with the process that started them, even a killed one.
A worker that dies mid-task (killed, out of memory) costs nothing but time: its tasks
are run in the calling process instead, and the pool is marked broken so its owner can
start a new one.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

log = logging.getLogger("healdust.workers")

_HEADER = struct.Struct("<Q")
# Frame kinds from a worker: its result, the exception its function raised, or (once,
# after its imports) that it is ready.
_OK, _ERROR, _READY = 0, 1, 2
# Status of a task that a dead worker left: run it in the calling process.
_DEAD = 3


def _resolve(target: str) -> Callable[[Any], Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _read_frame(f: BinaryIO) -> bytes | None:
    """One frame's bytes, or None at the end of the stream (``f`` is buffered: its
    ``read(n)`` returns n bytes unless the stream ends)."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    n = _HEADER.unpack(head)[0]
    body = f.read(n)
    return body if len(body) == n else None


def _write_frame(f: BinaryIO, data: bytes) -> None:
    f.write(_HEADER.pack(len(data)))
    f.write(data)
    f.flush()


class _Worker:
    """One worker process, the tasks it holds, and the thread reading its results."""

    def __init__(self, target: str, init: str, index: int):
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        boot = ("import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
                "from healdust.workers import worker_main; worker_main(sys.argv[2], sys.argv[3])")
        self.proc = subprocess.Popen([sys.executable, "-c", boot, json.dumps(sys.path), target, init],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.index = index
        self.lock = threading.Lock()        # guards tasks and dead
        self.write_lock = threading.Lock()  # one frame at a time into the worker's stdin
        self.tasks: dict[int, tuple[queue.SimpleQueue, Any, Any]] = {}
        self.dead = False
        frame = _read_frame(self.proc.stdout)
        if frame is None or pickle.loads(frame)[0] != _READY:
            self.proc.kill()
            self.proc.wait()
            raise OSError(f"a worker process did not start (exit status {self.proc.returncode})")
        self.reader = threading.Thread(target=self._read, name=f"healdust-workers-{index}", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            frame = _read_frame(self.proc.stdout)
            if frame is None:
                break
            task, kind, value = pickle.loads(frame)
            with self.lock:
                dest, key, arg = self.tasks.pop(task)
            dest.put((key, arg, kind, value))
        with self.lock:
            self.dead = True
            left, self.tasks = self.tasks, {}
        for dest, key, arg in left.values():
            dest.put((key, arg, _DEAD, None))

    def send(self, task: int, key: Any, arg: Any, dest: queue.SimpleQueue) -> bool:
        """Hand the task over; False if this worker is dead (the task was not taken)."""
        data = pickle.dumps((task, arg), protocol=pickle.HIGHEST_PROTOCOL)
        with self.lock:
            if self.dead:
                return False
            self.tasks[task] = (dest, key, arg)
        try:
            with self.write_lock:
                _write_frame(self.proc.stdin, data)
        except OSError:
            pass  # it died: its reader finds the end of its output and hands the task back
        return True

    @property
    def load(self) -> int:
        return len(self.tasks)

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout)


class WorkerPool:
    """``workers`` processes running ``target`` ("module:function", a function of one
    picklable argument whose module imports cheaply), started now; raises OSError if
    they cannot be. ``init`` ("module:function", no arguments), if given, runs once in
    each worker before its first task."""

    def __init__(self, target: str, workers: int, depth: int = 4, init: str = ""):
        self.target = target
        self.depth = max(1, depth)
        self._local = _resolve(target)
        self._ids = itertools.count()
        self._workers: list[_Worker] = []
        try:
            for i in range(max(1, workers)):
                self._workers.append(_Worker(target, init, i))
        except BaseException:
            self.close()
            raise

    @property
    def workers(self) -> int:
        return len(self._workers)

    @property
    def broken(self) -> bool:
        """True once a worker has died (its tasks ran in the caller instead)."""
        return any(w.dead for w in self._workers)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def map_unordered(self, items: Iterable[tuple[Any, Any]],
                      check_cancel: Callable[[], None] | None = None) -> Iterator[tuple[Any, Any]]:
        """``(key, target(arg))`` for every ``(key, arg)``, in the order they finish.

        At most ``depth`` tasks wait per worker, so only a few arguments are held at a
        time however many items there are. ``check_cancel()`` is called before each item
        is handed out (it raises to stop). An exception ``target`` raised in a worker is
        raised here (the tasks still in flight finish and are dropped). Tasks of a worker
        that died are run here, in the calling process.
        """
        dest: queue.SimpleQueue = queue.SimpleQueue()
        in_flight = 0

        def finish(item: tuple) -> tuple[Any, Any]:
            key, arg, kind, value = item
            if kind == _ERROR:
                raise value
            if kind == _DEAD:
                log.warning("a worker process died; running its task in this process")
                return key, self._local(arg)
            return key, value

        for key, arg in items:
            if check_cancel:
                check_cancel()
            while in_flight >= self.depth * len(self._workers):
                in_flight -= 1
                yield finish(dest.get())
            live = [w for w in self._workers if not w.dead]
            if live and min(live, key=lambda w: w.load).send(next(self._ids), key, arg, dest):
                in_flight += 1
            else:
                yield key, self._local(arg)
        while in_flight:
            in_flight -= 1
            yield finish(dest.get())

    def close(self) -> None:
        """End the workers (each finishes its task first)."""
        for w in self._workers:
            w.close()


def worker_main(target: str, init: str = "") -> None:
    """The worker process: read tasks from stdin, write results to stdout, until stdin
    ends. Anything else printed goes to stderr, so it cannot corrupt the results."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = os.fdopen(os.dup(0), "rb")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    fn = _resolve(target)
    if init:
        _resolve(init)()
    _write_frame(out, pickle.dumps((_READY, None, None)))
    while True:
        frame = _read_frame(inp)
        if frame is None:
            return
        task, arg = pickle.loads(frame)
        try:
            reply = (task, _OK, fn(arg))
        except Exception as e:  # handed to the caller, raised there
            reply = (task, _ERROR, e)
        try:
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # an exception that does not pickle
            data = pickle.dumps((task, _ERROR, RuntimeError(f"{type(reply[2]).__name__}: {reply[2]} ({e})")))
        del reply, arg
        _write_frame(out, data)
