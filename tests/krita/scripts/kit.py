"""Helpers for the scripts the test driver plugin runs inside real Krita (Krita's Python).

Arguments come from the JSON file named by HEALDUST_KRITA_ARGS; results go to
``<out>/results.json`` and raw layer pixels to ``<out>/<name>.bin`` for pytest to check.
"""

import importlib
import json
import os
import time

from krita import Krita, Selection
from PyQt5.QtWidgets import QApplication, QPushButton

ARGS = json.load(open(os.environ["HEALDUST_KRITA_ARGS"], encoding="utf-8"))
OUT = ARGS["out"]
RESULTS: dict = {"steps": {}, "layers": {}}
K = Krita.instance()
K.setBatchmode(True)  # no import/export option dialogs


def log(*parts) -> None:
    print("[krita-script]", *parts, flush=True)


def save_results() -> None:
    with open(os.path.join(OUT, "results.json"), "w", encoding="utf-8") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def plugin_module(name: str):
    """A module of the installed plugin (pykrita imports the plugin as top-level 'healdust')."""
    return importlib.import_module(f"healdust.{name}")


def plugin_job():
    return plugin_module("job")


def pump(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.005)


def open_doc(path: str):
    doc = K.openDocument(path)
    doc.setBatchmode(True)
    K.activeWindow().addView(doc)
    doc.waitForDone()
    pump(0.2)
    return doc


def show(doc) -> None:
    """Make ``doc`` the active document (its view the current one)."""
    window = K.activeWindow()
    for view in window.views():
        if view.document() == doc:
            window.showView(view)
            view.setVisible()
    pump(0.2)
    assert K.activeDocument() == doc, "could not activate the document"


def new_doc(w: int, h: int, model: str, depth: str, resolution: float = 72.0, name: str = "scratch"):
    profile = "" if model == "RGBA" else "Gray-D50-elle-V2-srgbtrc.icc"
    doc = K.createDocument(w, h, name, model, depth, profile, resolution)
    doc.setBatchmode(True)
    K.activeWindow().addView(doc)
    pump(0.2)
    return doc


def layer_names(doc) -> list:
    out = []

    def walk(node, prefix=""):
        for child in node.childNodes():
            out.append(prefix + child.name())
            walk(child, prefix + child.name() + "/")
    walk(doc.rootNode())
    return out


def node_by_id(doc, uid: str):
    def walk(node):
        for child in node.childNodes():
            if child.uniqueId().toString() == uid:
                return child
            found = walk(child)
            if found is not None:
                return found
        return None
    return walk(doc.rootNode())


def dump(doc, node, name: str) -> None:
    """Raw pixels of ``node`` over the whole image into OUT/name.bin, described in RESULTS."""
    data = bytes(node.pixelData(0, 0, doc.width(), doc.height()))
    with open(os.path.join(OUT, name + ".bin"), "wb") as f:
        f.write(data)
    channels = sorted(node.channels(), key=lambda c: c.position())
    RESULTS["layers"][name] = {
        "layer": node.name(), "width": doc.width(), "height": doc.height(), "model": node.colorModel(),
        "depth": node.colorDepth(), "channels": [c.name() for c in channels], "bytes": len(data),
        "parent": node.parentNode().name() if node.parentNode() else None,
    }


def trigger_and_wait(action_id: str, timeout: float = 240.0, on_running=None) -> dict:
    """Trigger a plugin action and pump events until its job ends; returns the job's record.

    on_running(job) is called once, at the first progress event, while the job runs.
    """
    job = plugin_job()
    before = len(job.HISTORY)
    started = time.monotonic()
    action = K.action(action_id)
    assert action is not None, f"Krita has no action {action_id}"
    action.trigger()
    called = False
    while len(job.HISTORY) == before:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{action_id} did not finish within {timeout} s")
        if on_running and not called and job.ACTIVE is not None and job.ACTIVE.record.get("stages"):
            called = True
            on_running(job.ACTIVE)
        QApplication.processEvents()
        time.sleep(0.005)
    record = dict(job.HISTORY[-1])
    record["wall_seconds"] = round(time.monotonic() - started, 3)
    log(action_id, "->", record.get("outcome"), record.get("message", "")[:200])
    return record


def click_cancel(job) -> None:
    """What the user does: press Cancel on the progress dialog."""
    dialog = job.progress.dialog
    buttons = dialog.findChildren(QPushButton)
    assert buttons, "the progress dialog has no Cancel button"
    buttons[0].click()


def select_rects(doc, rects) -> None:
    """Replace the selection by the union of rectangles (x, y, w, h)."""
    sel = None
    for x, y, w, h in rects:
        part = Selection()
        part.select(int(x), int(y), int(w), int(h), 255)
        if sel is None:
            sel = part
        else:
            sel.add(part)
    doc.setSelection(sel)
    pump(0.1)


def deselect(doc) -> None:
    doc.setSelection(Selection())
    pump(0.1)
