"""Test-only Krita plugin: run one script inside real Krita, then exit with its status.

Krita has no "run this script" flag. Once the main window exists this plugin executes the
file named by ``HEALDUST_KRITA_SCRIPT`` and ends the process with ``os._exit(rc)`` (no
"save changes?" dialog): rc 0 when the script returns, 1 when it raises, or what it passes
to ``SystemExit``. A watchdog ends a script that runs past ``HEALDUST_KRITA_SCRIPT_TIMEOUT``
seconds with rc 3, so a hung plugin fails the test instead of stalling it.
"""

import os
import sys
import threading
import traceback

from krita import Extension, Krita
from PyQt5.QtCore import QTimer


def _watchdog(seconds: float) -> None:
    # A plain thread: it touches no Qt object, it only ends the process.
    def fire():
        sys.stderr.write(f"healdust_test_driver: script still running after {seconds:.0f} s\n")
        sys.stderr.flush()
        os._exit(3)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()


def _run_script() -> None:
    path = os.environ["HEALDUST_KRITA_SCRIPT"]
    rc = 0
    try:
        code = compile(open(path, encoding="utf-8").read(), path, "exec")
        exec(code, {"__name__": "__healdust_krita_script__", "__file__": path})
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


class TestDriver(Extension):
    def __init__(self, parent):
        super().__init__(parent)
        self._started = False

    def setup(self):
        if not os.environ.get("HEALDUST_KRITA_SCRIPT"):
            return
        _watchdog(float(os.environ.get("HEALDUST_KRITA_SCRIPT_TIMEOUT", "300")))
        Krita.instance().notifier().windowCreated.connect(self._window_created)

    def _window_created(self):
        if not self._started:
            self._started = True
            QTimer.singleShot(500, _run_script)

    def createActions(self, window):
        pass


Krita.instance().addExtension(TestDriver(Krita.instance()))
