"""Inside real Krita: the main scenario run (see test_krita_plugin.py for what each step proves).

Steps record into results.json and dump layer pixels; a failing step is recorded and the
next one still runs, so one pytest run reports every failure.
"""

import hashlib
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kit  # noqa: E402
from kit import ARGS, RESULTS, K  # noqa: E402
from PyQt5.QtCore import QTimer  # noqa: E402
from PyQt5.QtWidgets import QApplication, QMessageBox  # noqa: E402

NONINTERACTIVE = "HEALDUST_KRITA_NONINTERACTIVE"


def step(name):
    def wrap(fn):
        kit.log("step", name)
        try:
            RESULTS["steps"][name] = fn() or {}
        except Exception:
            RESULTS["steps"][name] = {"error": traceback.format_exc()}
            kit.log("step", name, "FAILED\n" + RESULTS["steps"][name]["error"])
        kit.save_results()
        return fn
    return wrap


def settings(**values):
    for key, value in values.items():
        K.writeSetting("healdust", key, str(value))


def digest(doc, node):
    return hashlib.sha256(bytes(node.pixelData(0, 0, doc.width(), doc.height()))).hexdigest()


def source_layer(doc):
    return [n for n in doc.topLevelNodes() if n.type() == "paintlayer"][0]


def dump_results(doc, record, prefix):
    for uid, name in zip(record.get("layer_ids", []), record.get("layers", []), strict=True):
        node = kit.node_by_id(doc, uid)
        kit.dump(doc, node, f"{prefix}_{'mask' if name == 'Dust mask' else 'healed'}")


os.environ[NONINTERACTIVE] = "1"
settings(model="", mode="transfer", auto_threshold="true", sensitivity=50, save_as="")
specks = ARGS["specks"]
marked = [specks[i] for i in ARGS["marked"]]
doc8 = kit.open_doc(ARGS["png8"])
src8 = source_layer(doc8)
doc8.setActiveNode(src8)


@step("no_markers")
def _():
    return {"record": kit.trigger_and_wait("healdust_heal", 60), "layers": kit.layer_names(doc8)}


@step("cancel")
def _():
    pad = 3
    kit.select_rects(doc8, [(round(x - r - pad), round(y - r - pad), round(2 * (r + pad)), round(2 * (r + pad)))
                            for x, y, r in marked])
    before_layers, before_digest = kit.layer_names(doc8), digest(doc8, src8)
    record = kit.trigger_and_wait("healdust_heal", 120, on_running=kit.click_cancel)
    kit.pump(0.5)  # a late result must not change anything either
    out = {"record": record, "layers_before": before_layers, "layers_after": kit.layer_names(doc8),
           "digest_same": before_digest == digest(doc8, src8)}
    kit.deselect(doc8)
    return out


doc16 = kit.open_doc(ARGS["png16"])
src16 = source_layer(doc16)


@step("vector")
def _():
    res = ARGS["resolution"]
    doc16.setResolution(res)
    ppp = res / 72.0
    vl = doc16.createVectorLayer("Dust markers")
    doc16.rootNode().addChildNode(vl, None)
    circles = "".join(f'<circle cx="{x / ppp:.4f}" cy="{y / ppp:.4f}" r="{(r + 2) / ppp:.4f}" fill="#ff0000"/>'
                      for x, y, r in marked)
    w_pt, h_pt = doc16.width() / ppp, doc16.height() / ppp
    vl.addShapesFromSvg(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w_pt}pt" height="{h_pt}pt" '
                        f'viewBox="0 0 {w_pt} {h_pt}">{circles}</svg>')
    doc16.setActiveNode(vl)  # the user just drew the markers: the plugin must still heal the image layer
    kit.pump(0.2)
    settings(model="", save_as="kt")
    record = kit.trigger_and_wait("healdust_heal", 400)
    kit.dump(doc16, src16, "vector_source")
    dump_results(doc16, record, "vector")
    doc16.saveAs(os.path.join(ARGS["out"], "vector.kra"))
    return {"record": record, "layers": kit.layer_names(doc16), "resolution": doc16.resolution()}


@step("undo")
def _():
    # Krita's scripting has no undo macro: each added layer is one undo step
    kit.show(doc16)
    before = kit.layer_names(doc16)
    undo = K.action("edit_undo")
    undo.trigger()
    doc16.waitForDone()
    after_one = kit.layer_names(doc16)
    undo.trigger()
    doc16.waitForDone()
    kit.pump(0.2)
    return {"before": before, "after_one": after_one, "after_two": kit.layer_names(doc16),
            "source_same": digest(doc16, src16) == hashlib.sha256(
                open(os.path.join(ARGS["out"], "vector_source.bin"), "rb").read()).hexdigest()}


@step("saved_model")
def _():
    kit.show(doc8)
    doc8.setActiveNode(src8)
    settings(model="kt", save_as="")
    seen = {}

    deadline = time.monotonic() + 90

    def accept_dialog():
        # interactive run: the dialog must come up with the remembered model preselected.
        # Other modal widgets (a progress dialog on a loaded machine) are left alone: keep
        # looking until the options dialog or a message box shows up.
        dlg = QApplication.activeModalWidget()
        if dlg is not None and hasattr(dlg, "options"):
            seen["model"] = dlg.options().model
            dlg.accept()
            return
        if isinstance(dlg, QMessageBox):  # a message instead of the dialog: note it, close it
            seen.setdefault("boxes", []).append(dlg.text())
            dlg.reject()
            return
        if time.monotonic() < deadline:
            QTimer.singleShot(100, accept_dialog)

    os.environ[NONINTERACTIVE] = "0"
    QTimer.singleShot(100, accept_dialog)
    try:
        record = kit.trigger_and_wait("healdust_heal", 120)
    finally:
        os.environ[NONINTERACTIVE] = "1"
    kit.dump(doc8, src8, "saved_source")
    dump_results(doc8, record, "saved")
    return {"record": record, "dialog_model": seen.get("model"), "boxes": seen.get("boxes"),
            "layers": kit.layer_names(doc8),
            "remembered_model": K.readSetting("healdust", "model", "?")}


@step("edited_mask")
def _():
    pixels = kit.plugin_module("pixels")
    mask_layer = [n for n in doc8.topLevelNodes() if n.name() == "Dust mask"][-1]
    with open(ARGS["edited_mask"], "rb") as f:
        mask = f.read()
    dtype = {"U8": "u8", "U16": "u16", "F16": "f16", "F32": "f32"}[mask_layer.colorDepth()]
    mask_layer.setPixelData(pixels.mask_to_graya(mask, dtype), 0, 0, doc8.width(), doc8.height())
    doc8.setActiveNode(mask_layer)
    before = kit.layer_names(doc8)
    record = kit.trigger_and_wait("healdust_heal_mask", 120)
    dump_results(doc8, record, "edited")
    return {"record": record, "layers_before": before, "layers": kit.layer_names(doc8)}


@step("depths")
def _():
    out = {}
    settings(model="kt", save_as="")
    for case in ARGS["depth_cases"]:
        model, depth, path = case["model"], case["depth"], case["path"]
        doc = kit.new_doc(ARGS["width"], ARGS["height"], model, depth, name=f"{model}-{depth}")
        node = source_layer(doc)
        with open(path, "rb") as f:
            node.setPixelData(f.read(), 0, 0, doc.width(), doc.height())
        doc.setActiveNode(node)
        record = kit.trigger_and_wait("healdust_heal", 120)
        key = f"depth_{model}_{depth}"
        kit.dump(doc, node, key + "_source")
        dump_results(doc, record, key)
        out[key] = record
    return out


@step("geometry")
def _():
    document = kit.plugin_module("document")
    doc = kit.new_doc(200, 100, "RGBA", "U8", resolution=144.0, name="geometry")
    vl = doc.createVectorLayer("Dust markers")
    doc.rootNode().addChildNode(vl, None)
    # at 144 dpi one point is two pixels: a circle at (50, 40) px with r 5 px, an ellipse 16x8 px at (120, 60),
    # and a group of two circles r 2 px at (140, 20) and (160, 20)
    vl.addShapesFromSvg('<svg xmlns="http://www.w3.org/2000/svg" width="100pt" height="50pt" viewBox="0 0 100 50">'
                        '<circle cx="25" cy="20" r="2.5" fill="red"/>'
                        '<ellipse cx="60" cy="30" rx="4" ry="2" fill="red"/>'
                        '<g><circle cx="70" cy="10" r="1"/><circle cx="80" cy="10" r="1"/></g></svg>')
    vl.move(10, 20)  # a vector layer moved by (10, 20) px: its shapes move with it
    pl = doc.createNode("Not dust", "paintlayer")
    doc.rootNode().addChildNode(pl, None)
    block = bytearray(200 * 100 * 4)
    for y in range(10, 14):
        for x in list(range(30, 34)) + list(range(150, 153)):
            i = (y * 200 + x) * 4
            block[i:i + 4] = b"\x00\x00\xff\xff"
    pl.setPixelData(bytes(block), 0, 0, 200, 100)
    pl.move(5, 7)  # painted areas at (30..34, 10..14) and (150..153, 10..14), moved by (5, 7)
    doc.waitForDone()
    found = document.read_markers(doc)
    kit.select_rects(doc, [(20, 30, 10, 5), (60, 60, 4, 4)])
    vl.remove()
    pl.remove()
    doc.waitForDone()
    from_selection = document.read_markers(doc)
    return {"layers": {"dust": found.dust, "not_dust": found.not_dust, "origin": found.origin},
            "selection": {"dust": from_selection.dust, "origin": from_selection.origin}}


kit.save_results()
