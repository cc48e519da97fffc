"""``healdust install-plugin gimp``: put the GIMP 3 plug-in where GIMP finds it.

GIMP 3 runs a Python plug-in with its own interpreter (the system ``python3`` on Linux,
a bundled one on Windows and macOS), not this package's. So the plug-in folder is copied
with a copy of the protocol (``healdust_protocol``), and pyzmq and msgpack are made
importable for that interpreter: the system packages when it already has them, else a
``pip install --target`` into ``deps/`` inside the plug-in folder (which the plug-in puts
on ``sys.path``), built for GIMP's Python version. A settings file beside the plug-in
records how to start the daemon and where it listens.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from .plugin_bundle import bundle_protocol, plugin_source
from .protocol.client import default_endpoint
from .protocol.keys import default_home

PLUGIN_NAME = "healdust"
SETTINGS_FILE = "healdust-settings.json"  # read by healdust_gimp/link.py
DEPS_DIR = "deps"
DEPENDENCIES = ("pyzmq", "msgpack")
_IMPORT_CHECK = "import zmq, msgpack, sys; print('%d.%d' % sys.version_info[:2])"


class InstallError(RuntimeError):
    """The plug-in could not be installed; the message says why and what to do."""


def gimp_config_dir() -> Path:
    """GIMP 3's per-user folder: ``$GIMP3_DIRECTORY``, else the platform's default."""
    env = os.environ.get("GIMP3_DIRECTORY")
    if env:
        return Path(env).expanduser()
    home = Path.home()
    system = platform.system()
    if system == "Windows":
        return Path(os.environ.get("APPDATA") or home / "AppData" / "Roaming") / "GIMP" / "3.0"
    if system == "Darwin":
        return home / "Library" / "Application Support" / "GIMP" / "3.0"
    flatpak = home / ".var" / "app" / "org.gimp.GIMP" / "config" / "GIMP" / "3.0"
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "GIMP" / "3.0"
    if flatpak.is_dir() and not xdg.is_dir():
        return flatpak
    return xdg


def default_plugins_dir() -> Path:
    return gimp_config_dir() / "plug-ins"


def default_serve_command() -> list[str]:
    """This installation's daemon, run by this interpreter (the plug-in adds ``--endpoint``)."""
    return [sys.executable, "-m", "healdust", "serve"]


def gimp_python() -> str | None:
    """The interpreter GIMP runs Python plug-ins with, when it can be found."""
    env = os.environ.get("HEALDUST_GIMP_PYTHON")
    if env:
        return env
    system = platform.system()
    if system == "Windows":
        for base in (os.environ.get("ProgramFiles", r"C:\Program Files"), os.environ.get("LOCALAPPDATA", "")):
            for cand in sorted(Path(base).glob("GIMP 3*/bin/python*.exe")) if base else []:
                return str(cand)
        return None
    if system == "Darwin":
        for cand in ("/Applications/GIMP.app/Contents/MacOS/python3",
                     "/Applications/GIMP-3.0.app/Contents/MacOS/python3"):
            if Path(cand).exists():
                return cand
        return None
    # Linux and the BSDs: GIMP's python.interp points at the system python3
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(cand).exists():
            return cand
    return None


def _probe(python: str, extra_path: Path | None = None) -> tuple[str | None, bool]:
    """(Python version "X.Y" of ``python``, whether it imports zmq and msgpack, with
    ``extra_path`` first on its path)."""
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    env["PYTHONPATH"] = str(extra_path) if extra_path else ""
    try:
        r = subprocess.run([python, "-c", _IMPORT_CHECK], capture_output=True, text=True, timeout=60,
                           env=env)
        if r.returncode == 0:
            return r.stdout.strip(), True
        r = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None, False
    return (r.stdout.strip() or None) if r.returncode == 0 else None, False


def _pip_target(python: str | None, version: str | None, target: Path) -> str:
    """pip-install the dependencies into ``target`` for GIMP's Python; returns how."""
    target.mkdir(parents=True, exist_ok=True)
    attempts = []
    if python:
        # GIMP's own interpreter builds exactly for itself, when it has pip
        attempts.append([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                         "--no-warn-script-location", "--upgrade", "--target", str(target), *DEPENDENCIES])
    if version:
        # this interpreter's pip, fetching wheels for GIMP's Python version and this platform
        attempts.append([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                         "--no-warn-script-location", "--upgrade", "--only-binary=:all:",
                         "--python-version", version, "--target", str(target), *DEPENDENCIES])
    errors = []
    for argv in attempts:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{argv[0]}: {e}")
            continue
        if r.returncode == 0:
            return f"pip-installed {', '.join(DEPENDENCIES)} for Python {version} into {target}"
        last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
        errors.append(f"{' '.join(argv[:3])}: {last}")
    shutil.rmtree(target, ignore_errors=True)
    if not version:
        raise InstallError("Could not find the Python that GIMP runs plug-ins with, so pyzmq and msgpack "
                           "cannot be installed for it. Set HEALDUST_GIMP_PYTHON to that interpreter, or "
                           "install python3-zmq and python3-msgpack with the system's package manager, "
                           "then run `healdust install-plugin gimp` again.")
    raise InstallError(f"Could not install pyzmq and msgpack for GIMP's Python {version}: "
                       + "; ".join(errors) + ". Install python3-zmq and python3-msgpack with the "
                       "system's package manager (or give pip network access), then run "
                       "`healdust install-plugin gimp` again.")


def ensure_dependencies(dest: Path, python: str | None = None) -> str:
    """Make pyzmq and msgpack importable by GIMP's Python; returns what was done."""
    python = python or gimp_python()
    version, importable = _probe(python) if python else (None, False)
    deps = dest / DEPS_DIR
    if importable:
        shutil.rmtree(deps, ignore_errors=True)
        return f"GIMP's Python {version} ({python}) already has pyzmq and msgpack"
    if python and deps.is_dir() and _probe(python, deps)[1]:
        return f"pyzmq and msgpack for Python {version} in {deps} (kept from the last install)"
    return _pip_target(python, version, deps)


def install(plugins_dir: Path | None = None, serve_command: list[str] | None = None, *,
            endpoint: str | None = None, python: str | None = None,
            install_dependencies: bool = True, home: str | Path | None = None) -> Path:
    """Install the GIMP 3 plug-in into ``plugins_dir`` (default: the user's GIMP 3
    ``plug-ins`` folder); returns the plug-in's folder.

    ``serve_command``: how the plug-in starts a daemon when none answers (default: this
    installation's ``healdust serve``); ``endpoint``: the daemon address it uses by default;
    ``python``: GIMP's Python interpreter (default: found, see ``gimp_python``).
    """
    plugins_dir = Path(plugins_dir) if plugins_dir else default_plugins_dir()
    src = plugin_source("gimp") / PLUGIN_NAME
    if not (src / f"{PLUGIN_NAME}.py").is_file():
        raise InstallError(f"the GIMP plug-in's sources are missing from this installation ({src})")
    dest = plugins_dir / PLUGIN_NAME
    keep_deps = dest / DEPS_DIR
    staging = plugins_dir / f".{PLUGIN_NAME}.new"
    shutil.rmtree(staging, ignore_errors=True)
    plugins_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, staging, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", DEPS_DIR))
    if keep_deps.is_dir():  # reuse what pip fetched last time; ensure_dependencies rechecks
        shutil.copytree(keep_deps, staging / DEPS_DIR)
    main = staging / f"{PLUGIN_NAME}.py"
    main.chmod(main.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    bundle_protocol(staging)
    settings = {
        "serve_command": list(serve_command) if serve_command else default_serve_command(),
        "endpoint": endpoint or default_endpoint(),
        "home": str(home or default_home()),  # where the daemon keeps this user's access token
    }
    try:
        if install_dependencies:
            settings["dependencies"] = ensure_dependencies(staging, python)
    except InstallError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    return dest


def describe(dest: Path) -> str:
    """A line for the CLI after ``install``."""
    try:
        how = json.loads((dest / SETTINGS_FILE).read_text(encoding="utf-8")).get("dependencies")
    except (OSError, ValueError):
        how = None
    return (f"GIMP plug-in installed in {dest}" + (f" ({how})" if how else "") +
            "; restart GIMP, then Filters ▸ Enhance ▸ Heal dust (AI).")
