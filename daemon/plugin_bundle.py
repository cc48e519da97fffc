"""What the editor plugins carry with them: their sources and a copy of the protocol package.

The plugins run inside the editors' own Python (not this one), so they cannot import
``healdust``; the installers copy ``healdust.protocol`` next to them as ``healdust_protocol``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PROTOCOL_FILES = ("__init__.py", "codec.py", "client.py", "keys.py", "SPEC.md")
BUNDLED_PROTOCOL = "healdust_protocol"


def plugin_source(editor: str) -> Path:
    """The folder holding the plugin's sources (``plugins/<editor>`` in the repository)."""
    from . import editor_plugins

    src = Path(editor_plugins.__file__).resolve().parent / editor
    if not src.is_dir():
        raise FileNotFoundError(f"plugin sources for {editor} are missing from this installation ({src})")
    return src


def bundle_protocol(dest_dir: str | Path) -> Path:
    """Copy the protocol package into ``dest_dir/healdust_protocol``; returns that folder."""
    from . import protocol

    src = Path(protocol.__file__).resolve().parent
    out = Path(dest_dir) / BUNDLED_PROTOCOL
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in PROTOCOL_FILES:
        shutil.copyfile(src / name, out / name)
    return out
