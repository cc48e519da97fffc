"""Messages to the user and the progress dialog. UI thread only."""

from __future__ import annotations

import sys
import time

from krita import Krita
from PyQt5.QtCore import Qt
from PyQt5.QtWidgets import QMessageBox, QProgressDialog

from . import settings as st

TITLE = "Heal dust (AI)"
# Every message shown, newest last: scripts and tests read it to see what the user saw.
MESSAGES: list[tuple[str, str]] = []

STAGE_TEXT = {
    "connect": "Connecting to the healdust daemon",
    "queued": "Waiting for the daemon",
    "load": "Loading the model",
    "finetune": "Learning from your markers",
    "detect": "Finding dust",
    "heal": "Healing",
    "save": "Saving the model",
}
# Share of the bar each stage fills, in the daemon's order (a fine-tuned model is saved
# before detection starts).
_STAGES_LEARN = (("load", 0.05), ("finetune", 0.55), ("save", 0.05), ("detect", 0.15), ("heal", 0.20))
_STAGES_PLAIN = (("load", 0.10), ("detect", 0.45), ("heal", 0.45))
_STAGES_MASK = (("load", 0.05), ("heal", 0.95))


def main_window():
    window = Krita.instance().activeWindow()
    return window.qwindow() if window is not None else None


def report(level: str, text: str) -> None:
    """Tell the user: a message box, or (scripted runs) stderr only. Always kept in MESSAGES."""
    MESSAGES.append((level, text))
    sys.stderr.write(f"healdust: {level}: {text}\n")
    if not st.interactive():
        return
    if level == "error":
        QMessageBox.warning(main_window(), TITLE, text)
    else:
        QMessageBox.information(main_window(), TITLE, text)


def stage_fraction(stage: str, fraction: float, kind: str) -> float:
    """Overall 0..1 from a progress event's stage and fraction within it."""
    stages = {"learn": _STAGES_LEARN, "plain": _STAGES_PLAIN, "mask": _STAGES_MASK}[kind]
    done = 0.0
    for name, share in stages:
        if name == stage:
            return min(1.0, done + share * max(0.0, min(1.0, fraction)))
        done += share
    return 0.0


class Progress:
    """A QProgressDialog that reports a cancel once, and never one caused by closing it ourselves."""

    def __init__(self, on_cancel):
        self._on_cancel = on_cancel
        self._closing = False
        self._start = time.monotonic()
        self.dialog = QProgressDialog("Starting…", "Cancel", 0, 1000, main_window())
        self.dialog.setWindowTitle(TITLE)
        self.dialog.setWindowModality(Qt.WindowModal)  # the document must not change under the job
        self.dialog.setMinimumDuration(0)
        self.dialog.setAutoClose(False)
        self.dialog.setAutoReset(False)
        self.dialog.setValue(0)
        self.dialog.canceled.connect(self._canceled)
        self.dialog.show()

    def _canceled(self) -> None:
        if not self._closing:
            self._on_cancel()

    def update(self, text: str, fraction: float | None = None) -> None:
        elapsed = time.monotonic() - self._start
        self.dialog.setLabelText(f"{text}\n{elapsed:.0f} s")
        if fraction is not None:
            self.dialog.setValue(int(fraction * 1000))

    def hide(self) -> None:
        self._closing = True
        self.dialog.hide()
        self._closing = False

    def show(self) -> None:
        self.dialog.show()

    def close(self) -> None:
        self._closing = True
        self.dialog.close()
        self.dialog.deleteLater()
