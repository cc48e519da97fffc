"""The plug-in's side of the daemon: settings, finding or starting the daemon, a job.

Needs the bundled protocol (``healdust_protocol``), hence msgpack and pyzmq; no GIMP.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from healdust_protocol.client import (
    DEFAULT_ENDPOINT,
    Client,
    DaemonUnavailable,
    Event,
    JobCancelled,
    RemoteError,
)
from healdust_protocol.keys import endpoint_kind

SETTINGS_FILE = "healdust-settings.json"
# How long to wait for a daemon the plug-in started (importing torch alone takes a while).
START_WAIT_S = 90.0
# A job may be quiet this long between events (fine-tuning on a slow CPU) before giving up.
JOB_SILENCE_S = 600.0

__all__ = ["DaemonError", "JobCancelled", "RemoteError", "connect", "load_settings",
           "resolve_endpoint", "resolve_home", "run_job", "stage_fraction"]


class DaemonError(RuntimeError):
    """The daemon cannot be reached or started; the message says what to do."""


def load_settings(folder: str | Path) -> dict:
    """The installer's settings beside the plug-in (``{}`` when there are none)."""
    path = Path(folder) / SETTINGS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise DaemonError(f"The plug-in's settings file {path} cannot be read ({e}); "
                          f"reinstall it with `healdust install-plugin gimp`.") from None
    return data if isinstance(data, dict) else {}


def resolve_endpoint(argument: str | None, settings: dict) -> str:
    """The procedure's argument, else HEALDUST_ENDPOINT, else the installed default."""
    for candidate in (argument, os.environ.get("HEALDUST_ENDPOINT"), settings.get("endpoint")):
        if isinstance(candidate, str) and candidate.strip():
            return candidate.strip()
    return DEFAULT_ENDPOINT


def resolve_home(settings: dict) -> str | None:
    """Where this user's access token lives: HEALDUST_HOME, else the installer's record
    (None: the protocol's platform default)."""
    for candidate in (os.environ.get("HEALDUST_HOME"), settings.get("home")):
        if isinstance(candidate, str) and candidate.strip():
            return candidate.strip()
    return None


def is_local(endpoint: str) -> bool:
    """Whether a daemon for ``endpoint`` can be started on this machine."""
    return endpoint_kind(endpoint) != "network"


def _hello(endpoint: str, timeout: float, home: str | None) -> dict | None:
    try:
        with Client(endpoint, timeout=timeout, home=home) as c:
            return c.hello(timeout=timeout)
    except DaemonUnavailable:
        return None
    except RemoteError as e:  # the daemon refused this user's token
        raise DaemonError(f"{e.message}. The plug-in looks for the token in HEALDUST_HOME "
                          f"({home or 'the default folder'}).") from None


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())


def connect(endpoint: str, settings: dict, wait_s: float = START_WAIT_S,
            on_wait: Callable[[float], None] | None = None) -> dict:
    """Make sure a daemon answers at ``endpoint``; start the installed serve command when
    none does. Returns the daemon's hello; raises DaemonError with an actionable message."""
    home = resolve_home(settings)
    hello = _hello(endpoint, 1.5, home)
    if hello is not None:
        return hello
    command = settings.get("serve_command")
    if not is_local(endpoint):
        raise DaemonError(f"No healdust daemon answers at {endpoint}. Start `healdust serve` on that "
                          f"machine, or leave the endpoint empty to use a daemon on this one.")
    if not command or not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        raise DaemonError(f"No healdust daemon answers at {endpoint}, and no command to start one is "
                          f"recorded. Start it with `healdust serve --endpoint {endpoint}`, or reinstall "
                          f"the plug-in with `healdust install-plugin gimp`.")
    argv = [*command, "--endpoint", endpoint]
    log = Path(tempfile.gettempdir()) / "healdust-serve-gimp.log"
    try:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    close_fds=True, start_new_session=True)  # outlives the plug-in
    except OSError as e:
        raise DaemonError(f"No healdust daemon answers at {endpoint}, and starting one with "
                          f"`{' '.join(argv)}` failed: {e.strerror or e}. Reinstall the plug-in with "
                          f"`healdust install-plugin gimp`, or start `healdust serve` yourself.") from None
    deadline = time.monotonic() + wait_s
    start = time.monotonic()
    while time.monotonic() < deadline:
        hello = _hello(endpoint, 1.0, home)
        if hello is not None:
            return hello
        code = proc.poll()
        if code is not None:
            tail = _log_tail(log)
            raise DaemonError(f"The healdust daemon started with `{' '.join(argv)}` exited with status "
                              f"{code} before answering" + (f": {tail}" if tail else "") +
                              f". See {log}; start `healdust serve` yourself to see why.")
        if on_wait:
            on_wait(min(1.0, (time.monotonic() - start) / wait_s))
    raise DaemonError(f"The healdust daemon started with `{' '.join(argv)}` did not answer at {endpoint} "
                      f"within {wait_s:.0f} s (see {log}). Try again when it is up, or start "
                      f"`healdust serve` yourself.")


# Share of the whole job each stage takes (roughly: fine-tuning dominates on a CPU).
_STAGES = (("queued", 0.0), ("load", 0.05), ("finetune", 0.55), ("detect", 0.2), ("heal", 0.15),
           ("save", 0.05))


def stage_fraction(stage: str, fraction: float) -> float:
    """Progress of the whole job from a progress event's stage and fraction within it."""
    done = 0.0
    for name, share in _STAGES:
        if name == stage:
            return min(1.0, done + share * max(0.0, min(1.0, fraction)))
        done += share
    return 0.0


def run_job(endpoint: str, type_: str, fields: dict, buffers: list,
            on_progress: Callable[[Event], None] | None = None,
            silence_s: float = JOB_SILENCE_S, home: str | None = None) -> Event:
    """Send one request and wait for its result. Raises RemoteError, JobCancelled or
    DaemonError (the daemon went quiet or away)."""
    with Client(endpoint, timeout=silence_s, home=home) as c:
        try:
            return c.call(type_, fields, buffers, on_progress=on_progress)
        except DaemonUnavailable as e:
            raise DaemonError(f"The healdust daemon at {endpoint} stopped answering ({e}). "
                              f"Check that it still runs and try again.") from None
