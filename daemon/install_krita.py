"""Install the Krita plugin for this user, or build the zip for Krita's plugin importer.

``install()`` copies ``plugins/krita`` into Krita's ``pykrita`` folder with a copy of the
protocol (``healdust/healdust_protocol``), writes the ``.desktop`` and ``.action`` files,
enables the plugin in ``kritarc``, records how to reach and start the daemon
(``healdust/settings.json``), and makes pyzmq and msgpack importable by *Krita's* Python:
the system packages when Krita embeds the system Python and it has them (Debian, Ubuntu,
Fedora with ``python3-zmq python3-msgpack``), else wheels for Krita's Python version,
pip-installed with ``--target`` into ``healdust/vendor`` (which the plugin puts on sys.path).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from . import __version__ as _version
from .plugin_bundle import bundle_protocol, plugin_source
from .protocol.client import default_endpoint
from .protocol.keys import default_home

PLUGIN = "healdust"
SETTINGS_FILE = "settings.json"
VENDOR_DIR = "vendor"
DEPENDENCIES = ("pyzmq", "msgpack")
# Krita 5.x bundles Python 3.10 in its Windows, macOS and AppImage builds.
BUNDLED_KRITA_PYTHON = "3.10"
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", VENDOR_DIR, SETTINGS_FILE)

Log = Callable[[str], None]


class InstallError(RuntimeError):
    """The plugin could not be installed; the message says why and what to do."""


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------
# where Krita keeps things
# --------------------------------------------------------------------------------------

def krita_resources_dir() -> Path:
    """Krita's per-user resource folder (holds ``pykrita/`` and ``actions/``)."""
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming") / "krita"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "krita"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "krita"


def default_pykrita_dir() -> Path:
    return krita_resources_dir() / "pykrita"


def default_kritarc() -> Path:
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "kritarc"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Preferences" / "kritarc"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kritarc"


def set_ini_value(path: Path, section: str, key: str, value: str) -> None:
    """Set ``key=value`` in ``[section]`` of an INI file, keeping every other line as it is.

    kritarc is written by Qt/KConfig; a configparser round trip would lowercase keys and
    reorder or drop entries, so this edits lines.
    """
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    header = f"[{section}]"
    start = next((i for i, line in enumerate(lines) if line.strip() == header), None)
    if start is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines += [header, f"{key}={value}"]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
        hit = next((i for i in range(start + 1, end)
                    if lines[i].split("=", 1)[0].strip() == key and "=" in lines[i]), None)
        if hit is not None:
            lines[hit] = f"{key}={value}"
        else:
            insert = end
            while insert > start + 1 and not lines[insert - 1].strip():
                insert -= 1
            lines.insert(insert, f"{key}={value}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def enable_plugin(kritarc: Path, name: str = PLUGIN) -> None:
    set_ini_value(kritarc, "python", f"enable_{name}", "true")


# --------------------------------------------------------------------------------------
# Krita's Python and the plugin's dependencies
# --------------------------------------------------------------------------------------

def _krita_pykrita_libraries() -> list[Path]:
    pats = ("/usr/lib/*/kritaplugins/kritapykrita.so", "/usr/lib/kritaplugins/kritapykrita.so",
            "/usr/lib64/kritaplugins/kritapykrita.so", "/usr/local/lib/*/kritaplugins/kritapykrita.so",
            "/usr/local/lib/kritaplugins/kritapykrita.so", "/app/lib/kritaplugins/kritapykrita.so")
    found: list[Path] = []
    for pat in pats:
        found += sorted(Path("/").glob(pat.lstrip("/")))
    return found


def krita_python_version() -> str | None:
    """The Python version Krita embeds ("3.11"), read from the libraries its Python plugin
    loader links; None when no system-installed Krita is found (Windows, macOS, AppImage)."""
    for lib in _krita_pykrita_libraries():
        try:
            out = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        m = re.search(r"libpython(3\.\d+)", out)
        if not m:  # no ldd: the name is in the ELF's dynamic section as plain text
            try:
                m = re.search(rb"libpython(3\.\d+)", lib.read_bytes())
            except OSError:
                m = None
        if m:
            v = m.group(1)
            return v.decode() if isinstance(v, bytes) else v
    return None


def system_python_serves(version: str) -> bool:
    """Whether the system interpreter of that version imports zmq and msgpack (then Krita's
    embedded copy of it does too)."""
    for exe in (f"/usr/bin/python{version}", "/usr/bin/python3"):
        if not Path(exe).exists():
            continue
        probe = "import sys, zmq, msgpack; print('%d.%d' % sys.version_info[:2])"
        try:
            res = subprocess.run([exe, "-c", probe], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        if res.returncode == 0 and res.stdout.strip() == version:
            return True
    return False


def vendor_dependencies(target: Path, python_version: str, log: Log = _quiet) -> None:
    """pip-install pyzmq and msgpack wheels for Krita's Python into ``target``."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-compile",
           "--target", str(target), "--only-binary=:all:", "--python-version", python_version,
           "--implementation", "cp", *DEPENDENCIES]
    log(f"installing {', '.join(DEPENDENCIES)} for Python {python_version} into {target}")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = " | ".join((res.stderr or res.stdout).strip().splitlines()[-3:])
        raise InstallError(f"could not install {', '.join(DEPENDENCIES)} for Krita's Python {python_version} "
                           f"(pip: {tail}). Install them for that Python yourself, e.g. the system packages "
                           "python3-zmq and python3-msgpack.")


def provide_dependencies(plugin_dir: Path, log: Log = _quiet) -> str:
    """Make pyzmq and msgpack importable by Krita's Python; says how."""
    version = krita_python_version()
    if version and system_python_serves(version):
        vendor = plugin_dir / VENDOR_DIR
        if vendor.exists():
            shutil.rmtree(vendor)
        return f"Krita's Python {version} uses the system's pyzmq and msgpack"
    version = version or os.environ.get("HEALDUST_KRITA_PYTHON") or BUNDLED_KRITA_PYTHON
    vendor_dependencies(plugin_dir / VENDOR_DIR, version, log)
    return f"pyzmq and msgpack for Python {version} installed into {plugin_dir / VENDOR_DIR}"


# --------------------------------------------------------------------------------------
# the plugin
# --------------------------------------------------------------------------------------

def _copy_plugin(dest_pykrita: Path) -> Path:
    src = plugin_source("krita")
    dest_pykrita.mkdir(parents=True, exist_ok=True)
    package = dest_pykrita / PLUGIN
    kept_vendor = None
    if (package / VENDOR_DIR).is_dir():  # keep fetched wheels across reinstalls until replaced
        kept_vendor = dest_pykrita / f".{PLUGIN}-vendor-keep"
        if kept_vendor.exists():
            shutil.rmtree(kept_vendor)
        (package / VENDOR_DIR).rename(kept_vendor)
    if package.exists():
        shutil.rmtree(package)
    shutil.copytree(src / PLUGIN, package, ignore=_IGNORE)
    if kept_vendor is not None:
        kept_vendor.rename(package / VENDOR_DIR)
    bundle_protocol(package)
    shutil.copyfile(src / f"{PLUGIN}.desktop", dest_pykrita / f"{PLUGIN}.desktop")
    return package


def install(pykrita_dir: Path | None = None, kritarc: Path | None = None,
            serve_command: list[str] | None = None, endpoint: str | None = None,
            log: Log = _quiet, home: Path | None = None) -> Path:
    """Install the plugin for this user; returns the installed package folder.

    serve_command: how Krita starts the daemon when none answers (default: this Python's
    ``-m healdust serve``). endpoint: where the plugin looks for it (default: the protocol's
    default, or ``HEALDUST_ENDPOINT`` when set now).
    """
    pykrita = Path(pykrita_dir) if pykrita_dir else default_pykrita_dir()
    package = _copy_plugin(pykrita)
    actions = pykrita.parent / "actions"
    actions.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plugin_source("krita") / f"{PLUGIN}.action", actions / f"{PLUGIN}.action")
    settings = {
        "endpoint": endpoint or default_endpoint(),
        "serve_command": list(serve_command) if serve_command else [sys.executable, "-m", "healdust", "serve"],
        "installed_by": f"healdust {_version}",
        "home": str(home or default_home()),  # where the daemon keeps this user's access token
    }
    (package / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    rc = Path(kritarc) if kritarc else default_kritarc()
    enable_plugin(rc)
    log(f"plugin installed in {package}, enabled in {rc}")
    log(provide_dependencies(package, log))
    return package


def make_zip(out: Path) -> Path:
    """The zip for Krita's Tools ▸ Scripts ▸ Import Python Plugin from File.

    At its top level: ``healdust.desktop``, ``healdust.action`` and the ``healdust/`` package
    with the protocol inside it (Krita's importer extracts only those). Without settings, the
    plugin starts ``healdust serve`` from PATH; pyzmq and msgpack must come from Krita's side.
    ``out`` may be a folder (then ``healdust-krita.zip`` inside it).
    """
    out = Path(out)
    if out.is_dir():
        out = out / "healdust-krita.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    src = plugin_source("krita")
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / PLUGIN
        shutil.copytree(src / PLUGIN, package, ignore=_IGNORE)
        bundle_protocol(package)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            z.write(src / f"{PLUGIN}.desktop", f"{PLUGIN}.desktop")
            z.write(src / f"{PLUGIN}.action", f"{PLUGIN}.action")
            # Krita's importer finds the package by its folder entry: write folders explicitly
            z.writestr(f"{PLUGIN}/", b"")
            for path in sorted(package.rglob("*")):
                name = f"{PLUGIN}/{path.relative_to(package).as_posix()}"
                if path.is_dir():
                    z.writestr(name + "/", b"")
                else:
                    z.write(path, name)
    return out
