"""Runs inside real GIMP 3 (gimp-console-3.0 --batch-interpreter=python-fu-eval).

Driven by ``job.json`` (its path in the environment variable HEALDUST_JOB): loads the test
images, makes markers (paths, selection), edits masks, calls the healdust procedures
non-interactively and writes what happened to ``result.json`` (status, message, layers)
and the layers' pixels to raw files, for test_gimp_plugin.py to check on the host.
Each scenario is independent: one that fails is recorded and the others still run.
"""

import json
import os
import time
import traceback

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
gi.require_version("Babl", "0.1")
from gi.repository import Babl, Gegl, Gimp, Gio  # noqa: E402

JOB = json.load(open(os.environ["HEALDUST_JOB"]))
OUT = JOB["out"]
RESULT: dict = {}


def load(path):
    img = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path(path))
    return img, img.get_layers()[0]


def rect(w, h):
    return Gegl.Rectangle.new(0, 0, w, h)


def dump(drawable, encoding, name):
    """Pixels of ``drawable`` in ``encoding`` to OUT/name.raw."""
    w, h = drawable.get_width(), drawable.get_height()
    data = drawable.get_buffer().get(rect(w, h), 1.0, encoding, Gegl.AbyssPolicy.CLAMP)
    with open(os.path.join(OUT, name + ".raw"), "wb") as f:
        f.write(bytes(data))
    return name + ".raw"


def fill(drawable, encoding, path):
    w, h = drawable.get_width(), drawable.get_height()
    with open(path, "rb") as f:
        data = f.read()
    buf = drawable.get_buffer()
    buf.set(rect(w, h), encoding, data)
    buf.flush()
    drawable.update(0, 0, w, h)


def layers(img):
    return [{"name": la.get_name(), "width": la.get_width(), "height": la.get_height(),
             "bpp": la.get_bpp(), "visible": la.get_visible(),
             "encoding": Babl.format_get_encoding(la.get_format()),
             "mode": la.get_mode().value_nick, "offsets": list(la.get_offsets()[1:])}
            for la in img.get_layers()]


def by_name(img, name):
    return next(la for la in img.get_layers() if la.get_name() == name)


def call(proc_name, img, drawable, **args):
    proc = Gimp.get_pdb().lookup_procedure(proc_name)
    cfg = proc.create_config()
    cfg.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
    cfg.set_property("image", img)
    cfg.set_core_object_array("drawables", [drawable])
    for key, value in args.items():
        cfg.set_property(key.replace("_", "-"), value)
    t = time.monotonic()
    res = proc.run(cfg)
    status = res.index(0)
    message = ""
    if res.length() > 1:
        try:
            message = str(res.index(1) or "")
        except Exception:
            message = ""
    return {"status": status.value_nick, "message": message, "seconds": round(time.monotonic() - t, 2)}


def set_settings(**changes):
    path = JOB["settings"]
    with open(path) as f:
        settings = json.load(f)
    old = dict(settings)
    settings.update(changes)
    for k, v in changes.items():
        if v is None:
            settings.pop(k, None)
    with open(path, "w") as f:
        json.dump(settings, f)
    return old


def restore_settings(old):
    with open(JOB["settings"], "w") as f:
        json.dump(old, f)


def scenario(fn):
    name = fn.__name__
    try:
        RESULT[name] = fn()
    except Exception:
        RESULT[name] = {"status": "script-error", "message": traceback.format_exc()}
    with open(os.path.join(OUT, "result.json"), "w") as f:
        json.dump(RESULT, f, indent=1)
    return fn


# -- scenarios, in this order ------------------------------------------------------------

@scenario
def registration():
    """What GIMP's menus and the PDB know about the two procedures."""
    out = {"status": "success"}
    for name in ("plug-in-healdust", "plug-in-healdust-mask"):
        proc = Gimp.get_pdb().lookup_procedure(name)
        if proc is None:
            return {"status": "missing", "message": name}
        out[name] = {"label": proc.get_menu_label(), "menus": list(proc.get_menu_paths()),
                     "types": proc.get_image_types(),
                     "arguments": [a.name for a in proc.get_arguments()]}
    return out


@scenario
def nothing_to_learn():
    img, layer = load(JOB["images"]["rgb8"])
    r = call("plug-in-healdust", img, layer, endpoint=JOB["dead_endpoint"])
    r["layers"] = layers(img)
    return r


@scenario
def no_serve_command():
    img, layer = load(JOB["images"]["rgb8"])
    img.select_ellipse(Gimp.ChannelOps.REPLACE, 10, 10, 8, 8)
    old = set_settings(serve_command=None)
    try:
        r = call("plug-in-healdust", img, layer, endpoint=JOB["dead_endpoint"])
    finally:
        restore_settings(old)
    r["layers"] = layers(img)
    return r


@scenario
def serve_command_fails():
    img, layer = load(JOB["images"]["rgb8"])
    img.select_ellipse(Gimp.ChannelOps.REPLACE, 10, 10, 8, 8)
    old = set_settings(serve_command=["/bin/sh", "-c", "echo 'cannot load model' >&2; exit 3", "serve"])
    try:
        r = call("plug-in-healdust", img, layer, endpoint=JOB["dead_endpoint"])
    finally:
        restore_settings(old)
    r["layers"] = layers(img)
    return r


@scenario
def serve_command_missing():
    img, layer = load(JOB["images"]["rgb8"])
    img.select_ellipse(Gimp.ChannelOps.REPLACE, 10, 10, 8, 8)
    old = set_settings(serve_command=["/nonexistent/healdust", "serve"])
    try:
        r = call("plug-in-healdust", img, layer, endpoint=JOB["dead_endpoint"])
    finally:
        restore_settings(old)
    return r


STATE = {}


@scenario
def rgb8_path():
    """8-bit RGB, markers from paths; the daemon is started through the serve command."""
    img, layer = load(JOB["images"]["rgb8"])
    STATE["rgb8"] = (img, layer)
    pm = JOB["path_markers"]
    dust = Gimp.Path.new(img, "Dust markers")
    img.insert_path(dust, None, 0)
    # one open stroke through several spots (the user clicks on each), one single anchor
    dust.stroke_new_from_points(Gimp.PathStrokeType.BEZIER,
                                [c for x, y in pm["open"] for c in (x, y, x, y, x, y)], False)
    for x, y in pm["single"]:
        dust.stroke_new_from_points(Gimp.PathStrokeType.BEZIER, [x, y] * 3, False)
    cx, cy, rad = pm["ellipse"]
    dust.bezier_stroke_new_ellipse(cx, cy, rad, rad, 0.0)
    not_dust = Gimp.Path.new(img, "Not dust")
    img.insert_path(not_dust, None, 0)
    for x, y in pm["not_dust"]:
        not_dust.stroke_new_from_points(Gimp.PathStrokeType.BEZIER, [x, y] * 3, False)
    r = call("plug-in-healdust", img, layer, endpoint=JOB["relay_endpoint"])
    r["layers"] = layers(img)
    r["precision"] = img.get_precision().value_nick
    if r["status"] == "success":
        r["healed"] = dump(by_name(img, "Healed"), "R'G'B' u8", "rgb8_healed")
        r["mask"] = dump(by_name(img, "Dust mask"), "Y' u8", "rgb8_mask")
        r["source"] = dump(layer, "R'G'B' u8", "rgb8_source")
    return r


@scenario
def rgb8_edited_mask():
    """The user edits "Dust mask" and heals exactly that; "Healed" is updated in place."""
    img, layer = STATE["rgb8"]
    fill(by_name(img, "Dust mask"), "Y' u8", JOB["edited_mask"])
    r = call("plug-in-healdust-mask", img, layer, endpoint=JOB["relay_endpoint"])
    r["layers"] = layers(img)
    if r["status"] == "success":
        r["healed"] = dump(by_name(img, "Healed"), "R'G'B' u8", "rgb8_healed_edited")
    return r


@scenario
def rgba16_selection():
    """16-bit RGBA, markers from the selection's separate areas; the model is saved."""
    img, layer = load(JOB["images"]["rgba16"])
    first = True
    for x, y, w, h in JOB["selection_ellipses"]:
        img.select_ellipse(Gimp.ChannelOps.REPLACE if first else Gimp.ChannelOps.ADD, x, y, w, h)
        first = False
    r = call("plug-in-healdust", img, layer, endpoint=JOB["relay_endpoint"], save_model="roll-1",
             mode="transfer")
    r["layers"] = layers(img)
    r["precision"] = img.get_precision().value_nick
    if r["status"] == "success":
        r["healed"] = dump(by_name(img, "Healed"), "R'G'B'A u16", "rgba16_healed")
        r["mask"] = dump(by_name(img, "Dust mask"), "Y' u8", "rgba16_mask")
        r["source"] = dump(layer, "R'G'B'A u16", "rgba16_source")
    return r


@scenario
def saved_model_no_markers():
    """A saved model needs no markers."""
    img, layer = load(JOB["images"]["rgba16"])
    r = call("plug-in-healdust", img, layer, endpoint=JOB["relay_endpoint"], model="roll-1", threshold=0.5)
    r["layers"] = layers(img)
    return r


@scenario
def gray_saved_model():
    """A gray image healed by the saved model alone: a gray "Dust mask" at 16 bits."""
    img, layer = load(JOB["images"]["rgba16"])
    img.convert_grayscale()
    r = call("plug-in-healdust", img, layer, endpoint=JOB["relay_endpoint"], model="roll-1")
    r["layers"] = layers(img)
    r["precision"] = img.get_precision().value_nick
    return r


@scenario
def float_user_mask():
    """32-bit float linear image, a "Dust mask" layer the user painted (white on transparent)."""
    img, layer = load(JOB["images"]["rgb8"])
    img.convert_precision(Gimp.Precision.FLOAT_LINEAR)
    w, h = layer.get_width(), layer.get_height()
    mask = Gimp.Layer.new(img, "Dust mask", w, h, Gimp.ImageType.RGBA_IMAGE, 100.0, Gimp.LayerMode.NORMAL)
    img.insert_layer(mask, None, 0)
    fill(mask, "Y'A u8", JOB["float_mask"])
    r = call("plug-in-healdust-mask", img, mask, endpoint=JOB["relay_endpoint"])
    r["layers"] = layers(img)
    r["precision"] = img.get_precision().value_nick
    if r["status"] == "success":
        r["healed"] = dump(by_name(img, "Healed"), "R'G'B' float", "float_healed")
        r["source"] = dump(layer, "R'G'B' float", "float_source")
    return r


@scenario
def gray16_channel_mask():
    """16-bit gray with alpha, the mask as a channel named "Dust mask"."""
    img, layer = load(JOB["images"]["rgba16"])
    img.convert_grayscale()
    w, h = layer.get_width(), layer.get_height()
    color = Gegl.Color.new("black")
    ch = Gimp.Channel.new(img, "Dust mask", w, h, 50.0, color)
    img.insert_channel(ch, None, 0)
    fill(ch, "Y u8", JOB["gray_mask"])
    r = call("plug-in-healdust-mask", img, layer, endpoint=JOB["relay_endpoint"])
    r["layers"] = layers(img)
    r["precision"] = img.get_precision().value_nick
    if r["status"] == "success":
        r["healed"] = dump(by_name(img, "Healed"), "Y'A u16", "gray16_healed")
        r["source"] = dump(layer, "Y'A u16", "gray16_source")
    return r


@scenario
def offset_layer_mask():
    """A layer moved on the canvas and a mask layer that is not: coordinates line up."""
    img, layer = load(JOB["images"]["rgb8"])
    layer.set_offsets(*JOB["offset"])
    w, h = img.get_width(), img.get_height()
    mask = Gimp.Layer.new(img, "Dust mask", w, h, Gimp.ImageType.RGB_IMAGE, 100.0, Gimp.LayerMode.NORMAL)
    img.insert_layer(mask, None, 0)
    fill(mask, "Y' u8", JOB["offset_mask"])
    r = call("plug-in-healdust-mask", img, layer, endpoint=JOB["relay_endpoint"])
    r["layers"] = layers(img)
    if r["status"] == "success":
        r["healed"] = dump(by_name(img, "Healed"), "R'G'B' u8", "offset_healed")
        r["source"] = dump(layer, "R'G'B' u8", "offset_source")
    return r


RESULT["done"] = True
with open(os.path.join(OUT, "result.json"), "w") as f:
    json.dump(RESULT, f, indent=1)
