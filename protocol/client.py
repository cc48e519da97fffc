"""A protocol client over a ZeroMQ DEALER socket. Standard library + msgpack + pyzmq only.

    with Client(endpoint) as c:
        rid = c.submit("heal", {"image": desc.to_dict(), "markers": markers}, [pixels])
        for ev in c.events(rid):          # progress events, then exactly one final event
            ...
        c.cancel(rid)                     # from a UI callback: the job ends with 'cancelled'

``call()`` does the loop for you and raises RemoteError / JobCancelled. ``poll()`` returns
whatever arrived without blocking, for event loops (Qt timers, GLib idle callbacks).
"""

from __future__ import annotations

import itertools
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgpack
import zmq

from .codec import FINAL_TYPES, encode
from .keys import KeysError, apply_client_security, client_security

DEFAULT_ENDPOINT = "tcp://127.0.0.1:47137"


def default_endpoint() -> str:
    return os.environ.get("HEALDUST_ENDPOINT") or DEFAULT_ENDPOINT


class DaemonUnavailable(ConnectionError):
    """No daemon answered at the endpoint in time."""


class DaemonLost(DaemonUnavailable):
    """The connection dropped while a request was open: the daemon stopped or restarted.

    The request is gone with it; send it again (the daemon keeps nothing across a restart).
    """


class RemoteError(RuntimeError):
    def __init__(self, code: str, message: str):
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message


class JobCancelled(RuntimeError):
    pass


@dataclass
class Event:
    type: str
    header: dict
    buffers: list = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.type in FINAL_TYPES

    def get(self, key, default=None):
        return self.header.get(key, default)


_counter = itertools.count(1)


class Client:
    def __init__(self, endpoint: str | None = None, timeout: float = 30.0,
                 context: zmq.Context | None = None, home: str | None = None, security: dict | str = "auto"):
        """timeout: seconds to wait with no event at all before giving up on the daemon.

        security: "auto" finds this user's token or keys under ``home`` (default: HEALDUST_HOME,
        see keys.py) as the endpoint needs them; a dict from ``keys.client_security``; or None.
        """
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()
        self._hint = ""
        self._home = home
        # keys not there yet (a daemon about to be started creates them): look again later
        self._keys_pending = False
        if security == "auto":
            try:
                security = client_security(self.endpoint, home)
            except KeysError as e:
                security, self._hint, self._keys_pending = None, f" ({e})", True
        self._security = security
        self._monitor = None
        self._open_socket()
        self._pending: dict[str, deque] = defaultdict(deque)
        self._open: set[str] = set()
        self._lost = False
        self._prefix = f"{os.getpid():x}-{id(self) & 0xffff:x}-"

    # -- plumbing -------------------------------------------------------------------
    def _open_socket(self) -> None:
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        apply_client_security(self._sock, self._security)
        # connection events: a drop while a request is open means the daemon went away
        self._shook = False  # a handshake succeeded on the current connection
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        self._sock.connect(self.endpoint)

    def _load_pending_keys(self) -> bool:
        """When the keys were missing at first: if they exist now, reconnect with them."""
        if not self._keys_pending:
            return False
        try:
            security = client_security(self.endpoint, self._home)
        except KeysError:
            return False
        self._security, self._keys_pending, self._hint = security, False, ""
        self.reset()
        return True

    def reset(self) -> None:
        """A fresh connection (after DaemonLost); open requests are forgotten."""
        self.close()
        self._pending.clear()
        self._open.clear()
        self._lost = False
        self._open_socket()

    def close(self) -> None:
        if self._monitor is not None:
            # libzmq's I/O thread blocks, holding the monitor's lock, when the monitor's queue
            # (2000 events) is full, and disable_monitor waits for that lock while holding
            # Python's: the whole process would hang. Empty the queue first (a client refused
            # again and again, unread for minutes, fills it).
            while self._monitor.poll(0):
                self._monitor.recv_multipart()
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._monitor = None
        self._sock.close(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def new_id(self) -> str:
        return f"{self._prefix}{next(_counter)}"

    def submit(self, type_: str, fields: dict | None = None, buffers: list | None = None,
               id_: str | None = None, track: bool = True) -> str:
        """Send a request; returns its id. Buffers are sent without copying.

        track=False: nobody will read the reply (it is dropped when it arrives).
        """
        rid = id_ or self.new_id()
        self._load_pending_keys()
        self._read_monitor()  # a drop before this request is not this request's
        frames = encode(type_, rid, fields, buffers)
        self._sock.send_multipart(frames, copy=False)
        if track:
            self._open.add(rid)
        return rid

    def cancel(self, rid: str) -> None:
        """Ask the daemon to stop request ``rid``; its events end with ``cancelled``."""
        self.submit("cancel", {"target": rid}, track=False)

    def _read_monitor(self) -> None:
        while self._monitor is not None and self._monitor.poll(0):
            frames = self._monitor.recv_multipart()
            event = int.from_bytes(frames[0][:2], "little")
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._shook = True
            elif event == zmq.EVENT_DISCONNECTED and self._shook:
                self._shook = False
                self._lost = self._lost or bool(self._open)
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL) or (
                    event == zmq.EVENT_DISCONNECTED and self._keys_pending):
                # without keys, a drop before any handshake succeeded is the daemon refusing us;
                # libzmq reports the mechanism mismatch on one side or the other, not always ours
                if self._load_pending_keys():
                    return  # reconnected with the keys the new daemon made; callers resend
                raise RemoteError("denied", f"the healdust daemon at {self.endpoint} refused this client"
                                            f"{self._hint or ': wrong access token or key'}; "
                                            f"is HEALDUST_HOME the daemon's?")

    def _watch(self) -> None:
        """Read connection events; raise DaemonLost/RemoteError when an open request cannot finish."""
        self._read_monitor()
        if self._lost:
            self._lost = False
            while self._sock.poll(0, zmq.POLLIN):  # what arrived before the drop still counts
                self._read_one()
            lost = sorted(r for r in self._open if not any(ev.final for ev in self._pending.get(r, ())))
            if lost:
                for rid in lost:
                    self._open.discard(rid)
                    self._pending.pop(rid, None)
                raise DaemonLost(f"the healdust daemon at {self.endpoint} went away (stopped or restarted) "
                                 f"while request(s) {', '.join(lost)} were open; send them again")

    def _receive(self, timeout_ms: int) -> bool:
        self._watch()
        if not self._sock.poll(timeout_ms, zmq.POLLIN):
            self._watch()
            return False
        self._read_one()
        return True

    def _read_one(self) -> None:
        frames = self._sock.recv_multipart(copy=False)
        try:
            header = msgpack.unpackb(frames[0].bytes, raw=False)
        except Exception:
            return  # not ours to understand; ignore
        if not isinstance(header, dict):
            return
        rid = header.get("id")
        if isinstance(rid, str):
            self._pending[rid].append(Event(str(header.get("type")), header,
                                            [f.buffer for f in frames[1:]]))

    def poll(self, timeout: float = 0.0) -> list[Event]:
        """All events that have arrived (waiting at most ``timeout`` s for the first)."""
        got = self._receive(int(timeout * 1000))
        while got:
            got = self._receive(0)
        out = []
        for rid in list(self._pending):
            q = self._pending.pop(rid)
            for ev in q:
                if ev.final:
                    self._open.discard(rid)
                out.append(ev)
        return out

    def events(self, rid: str, timeout: float | None = None) -> Iterator[Event]:
        """Events for one request until (and including) its final reply."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            q = self._pending.get(rid)
            if q:
                ev = q.popleft()
                deadline = time.monotonic() + timeout
                if ev.final:
                    self._open.discard(rid)
                    self._pending.pop(rid, None)
                    yield ev
                    return
                yield ev
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonUnavailable(f"no answer from the healdust daemon at {self.endpoint} "
                                        f"within {timeout:.0f} s{self._hint}")
            self._receive(int(min(left, 0.2) * 1000) + 1)
            # drop replies to requests nobody waits for (e.g. cancel acknowledgements)
            for other in [k for k in self._pending if k not in self._open]:
                self._pending.pop(other, None)

    def call(self, type_: str, fields: dict | None = None, buffers: list | None = None,
             on_progress: Callable[[Event], None] | None = None, timeout: float | None = None) -> Event:
        """Send a request and wait for its final reply. Raises RemoteError or JobCancelled."""
        rid = self.submit(type_, fields, buffers)
        for ev in self.events(rid, timeout):
            if ev.type == "progress":
                if on_progress:
                    on_progress(ev)
            elif ev.type == "result":
                return ev
            elif ev.type == "error":
                raise RemoteError(str(ev.get("code", "internal")), str(ev.get("message", "")))
            elif ev.type == "cancelled":
                raise JobCancelled(f"request {rid} was cancelled")
        raise DaemonUnavailable("the event stream ended without a final reply")

    def hello(self, timeout: float = 2.0) -> dict:
        """The daemon's hello result; raises DaemonUnavailable when none answers in time."""
        return self.call("hello", {"client": "healdust-python"}, timeout=timeout).header
