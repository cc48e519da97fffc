"""Driving real Krita in tests: a daemon, isolated Krita homes, and one-script Krita runs.

See ../shared/EDITORS.md: Krita 5.1.5 from Debian, its GUI under Xvfb, a test-only driver
plugin (``driver/``) that runs a script from ``scripts/`` and exits with its status.
``tests/editors/install_krita.sh`` installs everything on a fresh Debian 12.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from healdust import install_krita

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "driver"
SCRIPTS = HERE / "scripts"


def krita_missing() -> str | None:
    for exe in ("krita", "xvfb-run"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (run tests/editors/install_krita.sh)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    endpoint: str
    home: Path
    process: subprocess.Popen


def start_daemon(home: Path, log: Path, timeout: float = 120.0) -> Daemon:
    """``python -m healdust serve`` on a free loopback port; returns once it prints its ready line."""
    from ..conftest import give_keys

    give_keys(home)  # the test run's token, which the plugin finds through HEALDUST_HOME
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "HEALDUST_HOME": str(home)}
    env.pop("HEALDUST_ENDPOINT", None)
    err = open(log, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "healdust", "serve", "--endpoint", endpoint],
                            stdout=subprocess.PIPE, stderr=err, env=env)
    err.close()
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(b"healdust ready"):
                return Daemon(endpoint, home, proc)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"the daemon did not get ready (last stdout line {line!r}); log: "
                       f"{log.read_text(errors='replace')[-2000:]}")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class KritaHome:
    """An isolated HOME / XDG tree for Krita, with the plugin installed by the real installer."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.config = root / "config"
        self.data = root / "data"
        self.runtime = root / "runtime"
        for d in (self.home, self.config, self.data, self.runtime):
            d.mkdir(parents=True, exist_ok=True)
        self.runtime.chmod(0o700)
        self.pykrita = self.data / "krita" / "pykrita"
        self.kritarc = self.config / "kritarc"

    def install(self, serve_command: list[str], endpoint: str) -> Path:
        package = install_krita.install(pykrita_dir=self.pykrita, kritarc=self.kritarc,
                                        serve_command=serve_command, endpoint=endpoint)
        for item in DRIVER.iterdir():
            dest = self.pykrita / item.name
            if item.is_dir():
                shutil.copytree(item, dest, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copyfile(item, dest)
        install_krita.enable_plugin(self.kritarc, "healdust_test_driver")
        return package

    def run(self, script: str, args: dict, out: Path, timeout: float = 400.0,
            env: dict | None = None) -> dict:
        """Run ``scripts/<script>`` inside Krita's GUI under Xvfb; returns its results.json."""
        out.mkdir(parents=True, exist_ok=True)
        args_file = out / "args.json"
        args_file.write_text(json.dumps({**args, "out": str(out)}), encoding="utf-8")
        run_env = {k: v for k, v in os.environ.items()
                   if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "QT_QPA_PLATFORM", "HEALDUST_ENDPOINT",
                                "DISPLAY", "WAYLAND_DISPLAY")}
        run_env.update(LANG="C.UTF-8", PYTHONIOENCODING="utf-8")
        run_env.update(HOME=str(self.home), XDG_CONFIG_HOME=str(self.config), XDG_DATA_HOME=str(self.data),
                       XDG_RUNTIME_DIR=str(self.runtime), HEALDUST_KRITA_SCRIPT=str(SCRIPTS / script),
                       HEALDUST_KRITA_ARGS=str(args_file), HEALDUST_KRITA_SCRIPT_TIMEOUT=str(timeout - 20))
        run_env.update(env or {})
        cmd = ["timeout", "-k", "10", str(int(timeout)), "xvfb-run", "-a", "-s", "-screen 0 1280x1024x24",
               "krita", "--nosplash"]
        started = time.monotonic()
        with open(out / "krita.log", "wb") as log:
            proc = subprocess.run(cmd, env=run_env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        results_file = out / "results.json"
        log_tail = (out / "krita.log").read_text(errors="replace")[-4000:]
        if proc.returncode != 0 or not results_file.exists():
            raise AssertionError(f"Krita run of {script} failed (rc {proc.returncode}); log tail:\n{log_tail}")
        results = json.loads(results_file.read_text(encoding="utf-8"))
        results["krita_seconds"] = round(time.monotonic() - started, 1)
        results["log_tail"] = log_tail
        return results
