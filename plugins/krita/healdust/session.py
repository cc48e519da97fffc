"""The connection to the healdust daemon, stepped by a QTimer on the UI thread.

Nothing here blocks: the protocol client is polled (``Client.poll()``, no timeout) every
few tens of milliseconds. When no daemon answers ``hello`` within the probe time, the
configured serve command is started in the background (detached, its output in a log file)
and ``hello`` is repeated until it answers, the command exits, or the start time runs out.
While requests are open, a daemon that goes quiet is asked for its ``status``; no answer to
that means it died, and the session fails with a message instead of waiting forever.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from PyQt5.QtCore import QObject, QTimer

from . import settings as st

POLL_MS = 40
HELLO_EVERY_S = 1.0
QUIET_S = 20.0           # no event for this long while a job runs: ask for status
STATUS_ANSWER_S = 10.0   # status unanswered for this long: the daemon is gone


class DaemonError(Exception):
    """The daemon cannot be reached or started; the message says what to do."""


def log_path() -> str:
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    return os.path.join(tempfile.gettempdir(), f"healdust-daemon-{uid}.log")


def _tail(path: str, start: int, lines: int = 3) -> str:
    """The last lines written to the log after ``start`` (the daemon's own output)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(start, f.tell() - 4000))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def _load_client_class():
    try:
        from .healdust_protocol.client import Client
    except ImportError as e:
        raise DaemonError(
            f"Krita's Python cannot load the healdust protocol ({e}). Reinstall the plugin with "
            "`healdust install-plugin krita`: it puts pyzmq and msgpack where Krita's Python finds them."
        ) from None
    return Client


class Session(QObject):
    """One client connection; ``open()`` then ``request()``; callbacks run on the UI thread."""

    def __init__(self, conn: st.Connection, parent: QObject | None = None):
        super().__init__(parent)
        self.conn = conn
        self.client = None
        self.process: subprocess.Popen | None = None
        self.state = "idle"          # idle, probing, starting, ready, closed
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._tick)
        self._handlers: dict[str, Callable] = {}
        self._hello_ids: set[str] = set()
        self._on_ready: Callable[[dict], None] | None = None
        self._on_error: Callable[[str], None] | None = None
        self._on_status: Callable[[str], None] | None = None
        self._deadline = 0.0
        self._last_hello = 0.0
        self._last_event = 0.0
        self._status_probe: tuple[str, float] | None = None
        self._log_start = 0

    # -- public ---------------------------------------------------------------------
    def open(self, on_ready: Callable[[dict], None], on_error: Callable[[str], None],
             on_status: Callable[[str], None] | None = None) -> None:
        """Find (or start) the daemon; ``on_ready(hello)`` or ``on_error(message)`` follows."""
        self._on_ready, self._on_error, self._on_status = on_ready, on_error, on_status
        client_class = _load_client_class()
        try:
            self.client = client_class(self.conn.endpoint, home=self.conn.home)
        except Exception as e:  # zmq rejects malformed endpoints here
            raise DaemonError(f"The daemon endpoint {self.conn.endpoint!r} is not usable ({e}). Fix it in "
                              "kritarc ([healdust] endpoint) or HEALDUST_ENDPOINT.") from None
        self.state = "probing"
        self._deadline = time.monotonic() + self.conn.probe_timeout
        self._status(f"Connecting to the healdust daemon at {self.conn.endpoint}…")
        self._send_hello()
        self._timer.start()

    def request(self, type_: str, fields: dict | None, buffers: list | None,
                on_event: Callable) -> str:
        rid = self.client.submit(type_, fields, buffers)
        self._handlers[rid] = on_event
        self._last_event = time.monotonic()
        return rid

    def cancel(self, rid: str) -> None:
        if self.client is not None and self.state == "ready":
            self.client.cancel(rid)

    def close(self) -> None:
        self.state = "closed"
        self._timer.stop()
        self._handlers.clear()
        if self.client is not None:
            self.client.close()
            self.client = None

    # -- internals ------------------------------------------------------------------
    def _status(self, text: str) -> None:
        if self._on_status:
            self._on_status(text)

    def _send_hello(self) -> None:
        self._hello_ids.add(self.client.submit("hello", {"client": "healdust-krita"}))
        self._last_hello = time.monotonic()

    def _fail(self, message: str) -> None:
        on_error = self._on_error
        self.close()
        if on_error:
            on_error(message)

    def _tick(self) -> None:
        try:
            self._step()
        except Exception as e:  # a slot must never raise into Qt
            kind = type(e).__name__
            if kind == "DaemonLost":  # the connection dropped with our job open
                self._fail(f"The healdust daemon at {self.conn.endpoint} went away while working (it stopped "
                           f"or restarted). The document was not changed; run the action again. "
                           f"Its log: {log_path()}.")
            elif kind == "RemoteError" and getattr(e, "code", "") == "denied":
                self._fail(f"{e.message}. The plugin reads the token from HEALDUST_HOME "
                           f"({self.conn.home or 'the default folder'}).")
            else:
                self._fail(f"Unexpected error while talking to the healdust daemon: {kind}: {e}")

    def _step(self) -> None:
        if self.client is None:
            return
        now = time.monotonic()
        for ev in self.client.poll():
            self._last_event = now
            rid = ev.get("id")
            if rid in self._hello_ids:
                if self.state in ("probing", "starting") and ev.type == "result":
                    self.state = "ready"
                    self._on_ready(ev.header)
                    if self.client is None:
                        return
                continue
            if self._status_probe and rid == self._status_probe[0]:
                self._status_probe = None
                continue
            handler = self._handlers.get(rid)
            if handler is not None:
                if ev.final:
                    self._handlers.pop(rid, None)
                handler(ev)
                if self.client is None:   # the handler closed the session
                    return
        if self.state == "probing" and now > self._deadline:
            self._start_daemon()
        elif self.state == "starting":
            self._watch_start(now)
        elif self.state == "ready" and self._handlers:
            self._watch_liveness(now)

    def _start_daemon(self) -> None:
        command = self.conn.serve_command
        if not command:
            self._fail(f"No healdust daemon answers at {self.conn.endpoint}, and no command to start one "
                       "is configured. Start it in a terminal with `healdust serve`, or reinstall the plugin "
                       "with `healdust install-plugin krita` (it records how to start the daemon).")
            return
        cmd = st.serve_command_for(command, self.conn.endpoint)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        kwargs = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = 0x00000008 | 0x00000200 | 0x08000000  # detached, own group, no window
        else:
            kwargs["start_new_session"] = True
        try:
            with open(log_path(), "ab") as out:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                out.write(f"\n--- {stamp} Krita starts: {' '.join(cmd)}\n".encode())
                out.flush()
                self._log_start = out.tell()
                self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                                stderr=subprocess.STDOUT, env=env, close_fds=True, **kwargs)
        except OSError as e:
            self._fail(f"No healdust daemon answers at {self.conn.endpoint}, and starting one failed: "
                       f"`{' '.join(cmd)}`: {e.strerror or e}. Install healdust and run "
                       "`healdust install-plugin krita` again, or start `healdust serve` yourself.")
            return
        self.state = "starting"
        self._deadline = time.monotonic() + self.conn.start_timeout
        self._status("Starting the healdust daemon (the first start loads the model)…")

    def _watch_start(self, now: float) -> None:
        code = self.process.poll() if self.process is not None else None
        if code is not None:
            tail = _tail(log_path(), self._log_start)
            command = " ".join(self.process.args)
            self._fail(f"The healdust daemon could not be started: `{command}` exited with status {code}"
                       + (f" ({tail})" if tail else "") + f". See {log_path()}; check that healdust is "
                       "installed (`healdust install-plugin krita` records the command) or start "
                       f"`healdust serve --endpoint {self.conn.endpoint}` yourself.")
            return
        if now > self._deadline:
            self._fail(f"The healdust daemon started but did not answer at {self.conn.endpoint} within "
                       f"{self.conn.start_timeout:.0f} s. See {log_path()}, or start `healdust serve` "
                       "yourself and try again.")
            return
        if now - self._last_hello >= HELLO_EVERY_S:
            self._send_hello()

    def _watch_liveness(self, now: float) -> None:
        if self._status_probe is None:
            if now - self._last_event > QUIET_S:
                self._status_probe = (self.client.submit("status", {}, track=False), now)
        elif now - self._status_probe[1] > STATUS_ANSWER_S:
            self._fail(f"The healdust daemon at {self.conn.endpoint} stopped answering (did it crash or get "
                       f"killed?). Its log: {log_path()}. The document was not changed.")
