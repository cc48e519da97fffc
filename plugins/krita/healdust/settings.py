"""Where the daemon is and how to start it; what the dialog remembers. Pure standard library.

Precedence for the endpoint: ``HEALDUST_ENDPOINT`` (tests, power users) > Krita setting
``[healdust] endpoint`` > ``settings.json`` written by ``healdust install-plugin krita`` >
the protocol's default. The serve command: Krita setting ``serve_command`` (a JSON list) >
``settings.json`` > ``healdust serve`` when a ``healdust`` program is on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from .exif import same_camera

GROUP = "healdust"
SETTINGS_FILE = "settings.json"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:47137"  # SPEC.md §1 (the bundled protocol has the same)
# Seconds: how long a hello may take before we start a daemon, and how long a started
# daemon may take to answer (it imports torch and loads the model first).
PROBE_TIMEOUT = 1.5
START_TIMEOUT = 90.0
# Tests (and scripted use) run without the dialog and without modal message boxes.
NONINTERACTIVE_ENV = "HEALDUST_KRITA_NONINTERACTIVE"

ReadSetting = Callable[[str, str, str], str]


@dataclass
class Connection:
    endpoint: str
    serve_command: list[str] | None
    home: str | None = None  # where this user's access token lives (None: the platform default)
    probe_timeout: float = PROBE_TIMEOUT
    start_timeout: float = START_TIMEOUT


@dataclass
class HealOptions:
    """What the dialog asks; remembered in Krita's settings between runs."""
    model: str = ""            # "" = base model, else a saved model's name
    mode: str = "transfer"     # or "scratch"
    auto_threshold: bool = True
    sensitivity: int = 50      # 0..100, used when auto_threshold is off
    save_as: str = ""          # "" = do not save the fine-tuned model
    extra: dict = field(default_factory=dict)

    @property
    def threshold(self) -> float | None:
        """Sensitivity → detection threshold (more sensitive = lower threshold); None = calibrated."""
        if self.auto_threshold:
            return None
        return round(min(0.98, max(0.02, 1.0 - self.sensitivity / 100.0)), 3)


def plugin_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def installed_settings(folder: str | None = None) -> dict:
    """The settings the installer wrote beside the plugin ({} when installed from a zip)."""
    path = os.path.join(folder or plugin_dir(), SETTINGS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _command(value) -> list[str] | None:
    if isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    return None


def _float(text: str, default: float) -> float:
    try:
        v = float(text)
        return v if v > 0 else default
    except (TypeError, ValueError):
        return default


def connection(read_setting: ReadSetting, folder: str | None = None,
               environ: dict | None = None) -> Connection:
    env = os.environ if environ is None else environ
    installed = installed_settings(folder)
    endpoint = (env.get("HEALDUST_ENDPOINT") or read_setting(GROUP, "endpoint", "")
                or installed.get("endpoint") or DEFAULT_ENDPOINT)
    command = _command(read_setting(GROUP, "serve_command", "")) or _command(installed.get("serve_command"))
    if command is None:
        exe = shutil.which("healdust")
        command = [exe, "serve"] if exe else None
    home = env.get("HEALDUST_HOME") or installed.get("home")
    return Connection(endpoint=str(endpoint), serve_command=command,
                      home=home if isinstance(home, str) and home else None,
                      probe_timeout=_float(read_setting(GROUP, "probe_timeout", ""), PROBE_TIMEOUT),
                      start_timeout=_float(read_setting(GROUP, "start_timeout", ""), START_TIMEOUT))


def serve_command_for(command: list[str], endpoint: str) -> list[str]:
    """The serve command, told to listen where the plugin will look."""
    if any(a == "--endpoint" or a.startswith("--endpoint=") for a in command):
        return list(command)
    return [*command, "--endpoint", endpoint]


def load_options(read_setting: ReadSetting) -> HealOptions:
    def get(key: str, default: str) -> str:
        return read_setting(GROUP, key, default) or default

    try:
        sensitivity = max(0, min(100, int(get("sensitivity", "50"))))
    except ValueError:
        sensitivity = 50
    mode = get("mode", "transfer")
    return HealOptions(model=read_setting(GROUP, "model", "") or "",
                       mode=mode if mode in ("transfer", "scratch") else "transfer",
                       auto_threshold=get("auto_threshold", "true").lower() != "false",
                       sensitivity=sensitivity,
                       save_as=read_setting(GROUP, "save_as", "") or "")


def save_options(write_setting: Callable[[str, str, str], None], options: HealOptions) -> None:
    write_setting(GROUP, "model", options.model)
    write_setting(GROUP, "mode", options.mode)
    write_setting(GROUP, "auto_threshold", "true" if options.auto_threshold else "false")
    write_setting(GROUP, "sensitivity", str(options.sensitivity))
    write_setting(GROUP, "save_as", options.save_as)


def preselect_model(models: list[dict], camera: dict | None, remembered: str) -> str:
    """Newest saved model of this camera, else the remembered one if it still exists, else base ("")."""
    names = {m.get("name") for m in models}
    if camera:
        mine = [m for m in models if same_camera(m.get("camera"), camera)]
        if mine:
            return str(max(mine, key=lambda m: str(m.get("created") or "")).get("name"))
    return remembered if remembered in names else ""


def interactive(environ: dict | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(NONINTERACTIVE_ENV, "") in ("", "0")
