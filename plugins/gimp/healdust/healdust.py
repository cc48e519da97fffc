#!/usr/bin/env python3
"""Heal dust (AI) for GIMP 3: Filters ▸ Enhance ▸ Heal dust (AI) / Heal dust with edited mask.

A thin client of the healdust daemon: it reads the current layer's pixels and the user's
markers (a path named "Dust markers" and one named "Not dust", or else the selection's
separate areas), sends them over the healdust protocol, shows the daemon's progress and
puts the answer back as two layers above the source, "Dust mask" and "Healed", at the
image's precision, in one undo step. "Heal dust with edited mask" heals exactly what the
(edited) "Dust mask" layer marks, with no detection.

Only the standard library, PyGObject, msgpack and pyzmq: everything that thinks lives in
the daemon. ``healdust install-plugin gimp`` puts this folder in place with a copy of the
protocol (``healdust_protocol``) and a settings file naming the daemon's serve command.
"""

import os
import sys

HERE = os.path.dirname(os.path.realpath(__file__))
# the bundled protocol and GIMP-free helpers first; pyzmq/msgpack that the installer
# pip-installed last, so GIMP's own packages win when it has them
sys.path.insert(0, HERE)
if os.path.isdir(os.path.join(HERE, "deps")):
    sys.path.append(os.path.join(HERE, "deps"))

import gi  # noqa: E402

gi.require_version("Gimp", "3.0")
gi.require_version("GimpUi", "3.0")
gi.require_version("Gegl", "0.4")
gi.require_version("Babl", "0.1")
from gi.repository import Babl, Gegl, Gimp, GimpUi, GLib, GObject  # noqa: E402
from healdust_gimp import markers as markers_mod  # noqa: E402
from healdust_gimp import pixels  # noqa: E402

PROC_HEAL = "plug-in-healdust"
PROC_HEAL_MASK = "plug-in-healdust-mask"
MASK_LAYER = "Dust mask"
HEALED_LAYER = "Healed"
MENU = "<Image>/Filters/Enhance"
MAX_MARKERS = 10_000


class PluginError(Exception):
    """Ends a run with ``status`` and a message for the user."""

    def __init__(self, message: str, status=Gimp.PDBStatusType.EXECUTION_ERROR):
        super().__init__(message)
        self.status = status


def calling_error(message: str) -> PluginError:
    return PluginError(message, Gimp.PDBStatusType.CALLING_ERROR)


def _link():
    """The daemon link, imported late so a missing pyzmq/msgpack is a message, not a
    plug-in that silently fails to register."""
    try:
        from healdust_gimp import link
    except ImportError as e:
        raise PluginError(f"healdust needs pyzmq and msgpack in GIMP's Python ({sys.executable}, "
                          f"Python {sys.version_info[0]}.{sys.version_info[1]}) and cannot import them "
                          f"({e}). Run `healdust install-plugin gimp` again.") from None
    return link


# ------------------------------------------------------------------------------------------
# pixels and layers
# ------------------------------------------------------------------------------------------

def _rect(x: int, y: int, w: int, h: int) -> Gegl.Rectangle:
    return Gegl.Rectangle.new(x, y, w, h)


def _format_name(encoding: str, drawable) -> str:
    """A Babl format in the drawable's colour space (plain names mean sRGB)."""
    return Babl.get_name(Babl.format_with_space(encoding, drawable.get_format()))


def _wire_format(image, drawable) -> pixels.WireFormat:
    return pixels.wire_format(image.get_precision().value_nick, drawable.is_gray(), drawable.has_alpha())


def read_pixels(image, drawable) -> tuple[dict, bytes]:
    """The drawable's pixels as a protocol image (frame 1) and its bytes."""
    wf = _wire_format(image, drawable)
    w, h = drawable.get_width(), drawable.get_height()
    data = drawable.get_buffer().get(_rect(0, 0, w, h), 1.0, _format_name(wf.encoding, drawable),
                                     Gegl.AbyssPolicy.CLAMP)
    desc = {"frame": 1, "width": w, "height": h, "channels": wf.channels, "order": wf.order,
            "dtype": wf.dtype, "stride": w * wf.pixel_bytes}
    return desc, bytes(data)


def _write(layer, encoding: str, data: bytes, new: bool) -> None:
    """Fill ``layer``; an existing layer goes through the shadow buffer so it is undoable."""
    w, h = layer.get_width(), layer.get_height()
    buf = layer.get_buffer() if new else layer.get_shadow_buffer()
    buf.set(_rect(0, 0, w, h), _format_name(encoding, layer), data)
    buf.flush()
    if not new:
        layer.merge_shadow(True)
    layer.update(0, 0, w, h)


def _results_above(image, source) -> dict:
    """The "Dust mask" / "Healed" layers stacked directly above ``source`` by an earlier run."""
    parent = source.get_parent()
    siblings = parent.get_children() if parent else image.get_layers()
    found = {}
    pos = image.get_item_position(source)
    for layer in reversed(siblings[:pos]):
        name = layer.get_name()
        if name in (MASK_LAYER, HEALED_LAYER) and name not in found and not layer.is_group():
            found[name] = layer
        else:
            break
    return found


def _put_layer(image, source, above, existing: dict, name: str, layer_type, encoding: str, data: bytes,
               mode=Gimp.LayerMode.NORMAL, visible: bool = True):
    """Write ``data`` into the result layer ``name`` over ``source``'s area: the one an earlier
    run left there when its size fits, else a new one stacked directly above ``above``."""
    w, h = source.get_width(), source.get_height()
    _, ox, oy = source.get_offsets()
    layer = existing.get(name)
    if layer is not None and layer.get_width() == w and layer.get_height() == h and \
            layer.type() == layer_type:
        layer.set_offsets(ox, oy)
        _write(layer, encoding, data, new=False)
        return layer
    layer = Gimp.Layer.new(image, name, w, h, layer_type, 100.0, mode)
    image.insert_layer(layer, above.get_parent(), image.get_item_position(above))
    layer.set_offsets(ox, oy)
    layer.set_visible(visible)
    _write(layer, encoding, data, new=True)
    return layer


def _write_undoable(image, source, healed: bytes, mask: bytes | None) -> None:
    """Both procedures' last step: the result layers in one undo group, closed on every path."""
    wf = _wire_format(image, source)
    image.undo_group_start()
    try:
        write_results(image, source, wf, healed, mask)
    finally:
        image.undo_group_end()
    Gimp.progress_update(1.0)


def write_results(image, source, wf: pixels.WireFormat, healed: bytes, mask: bytes | None) -> None:
    """"Healed" directly above the source, "Dust mask" above it (hidden, in Screen mode so
    that showing it lights up the dust over the picture; white = dust, black = clean)."""
    existing = _results_above(image, source)
    healed_layer = _put_layer(image, source, source, existing, HEALED_LAYER, source.type(), wf.encoding,
                              healed)
    if mask is not None:
        gray = image.get_base_type() == Gimp.ImageBaseType.GRAY
        layer_type = Gimp.ImageType.GRAY_IMAGE if gray else Gimp.ImageType.RGB_IMAGE
        _put_layer(image, source, healed_layer, existing, MASK_LAYER, layer_type, "Y' u8", mask,
                   mode=Gimp.LayerMode.SCREEN, visible=False)


def _check_result(ev, key: str, w: int, h: int, order: str, dtype: str) -> bytes:
    d = ev.get(key)
    if not isinstance(d, dict) or d.get("width") != w or d.get("height") != h or \
            d.get("order") != order or d.get("dtype") != dtype:
        raise PluginError(f"The healdust daemon sent back no usable '{key}' image "
                          f"(expected {w}x{h} {order} {dtype}); is it a different version?")
    frame = d.get("frame")
    if not isinstance(frame, int) or not 1 <= frame <= len(ev.buffers):
        raise PluginError(f"The healdust daemon's '{key}' image has no pixel frame.")
    row = w * len(order.replace("GRAY", "Y")) * {"u8": 1, "u16": 2, "f16": 2, "f32": 4}[dtype]
    data = bytes(ev.buffers[frame - 1])
    stride = d.get("stride", row)
    if stride != row:  # the spec promises packed results; repack anything else
        data = b"".join(data[y * stride:y * stride + row] for y in range(h))
    if len(data) != row * h:
        raise PluginError(f"The healdust daemon's '{key}' image has {len(data)} bytes, expected {row * h}.")
    return data


# ------------------------------------------------------------------------------------------
# markers
# ------------------------------------------------------------------------------------------

def _path_markers(path) -> list[dict]:
    out = []
    for sid in path.get_strokes():
        _kind, cps, closed = path.stroke_get_points(sid)
        anchors = markers_mod.anchors_of(cps)
        outline = None
        if closed and len(anchors) >= 2:
            try:
                outline_cps, _closed = path.stroke_interpolate(sid, 0.5)
                outline = list(zip(outline_cps[0::2], outline_cps[1::2], strict=False))
            except Exception:  # older API shapes: the anchors are good enough
                outline = None
        out += markers_mod.stroke_markers(anchors, closed, outline)
    return out


def _selection_markers(image) -> list[dict]:
    if Gimp.Selection.is_empty(image):
        return []
    _, _nonempty, x1, y1, x2, y2 = Gimp.Selection.bounds(image)
    w, h = x2 - x1, y2 - y1
    if w <= 0 or h <= 0:
        return []
    data = image.get_selection().get_buffer().get(_rect(x1, y1, w, h), 1.0, "Y u8", Gegl.AbyssPolicy.NONE)
    try:
        return markers_mod.selection_markers(bytes(data), w, h, (x1, y1), limit=MAX_MARKERS)
    except markers_mod.TooManyAreas as e:
        raise calling_error(f"The selection has more than {e.limit} separate areas; select only the "
                            f"dust spots to learn from (3 to 5 are enough).") from None


def collect_markers(image, source) -> tuple[dict, str]:
    """Markers in the source layer's coordinates, and where the dust markers came from."""
    paths = image.get_paths()
    dust_paths = [p for p in paths if markers_mod.is_named(p.get_name(), markers_mod.DUST_PATH)]
    not_paths = [p for p in paths if markers_mod.is_named(p.get_name(), markers_mod.NOT_DUST_PATH)]
    if dust_paths:
        dust = [m for p in dust_paths for m in _path_markers(p)]
        origin = f"path “{markers_mod.DUST_PATH}”"
    else:
        dust = _selection_markers(image)
        origin = "selection"
    not_dust = [m for p in not_paths for m in _path_markers(p)]
    _, ox, oy = source.get_offsets()
    w, h = source.get_width(), source.get_height()
    found = {"dust": markers_mod.inside(dust, w, h, (ox, oy)),
             "not_dust": markers_mod.inside(not_dust, w, h, (ox, oy))}
    if len(found["dust"]) + len(found["not_dust"]) > MAX_MARKERS:
        raise calling_error(f"More than {MAX_MARKERS} markers; 3 to 5 dust spots are enough.")
    return found, origin


# ------------------------------------------------------------------------------------------
# running a job
# ------------------------------------------------------------------------------------------

STAGE_TEXT = {"queued": "Waiting for the healdust daemon", "load": "Loading the model",
              "finetune": "Learning from your markers", "detect": "Finding dust", "heal": "Healing",
              "save": "Saving the model"}


class Progress:
    """GIMP's progress bar driven by the daemon's progress events (never goes backwards)."""

    def __init__(self, title: str):
        self.done = 0.0
        self.stage = ""
        Gimp.progress_init(title)

    def __call__(self, ev) -> None:
        link = _link()
        stage = str(ev.get("stage", ""))
        if stage != self.stage:
            self.stage = stage
            text = ev.get("message") or STAGE_TEXT.get(stage, stage)
            Gimp.progress_set_text(f"{text}…")
        self.done = max(self.done, link.stage_fraction(stage, float(ev.get("fraction", 0.0) or 0.0)))
        Gimp.progress_update(self.done)

    def pulse(self, _fraction: float) -> None:
        Gimp.progress_pulse()


def _connect(endpoint_arg: str) -> str:
    link = _link()
    try:
        settings = link.load_settings(HERE)
        endpoint = link.resolve_endpoint(endpoint_arg, settings)
        Gimp.progress_set_text(f"Connecting to the healdust daemon at {endpoint}…")
        link.connect(endpoint, settings, on_wait=lambda f: Gimp.progress_pulse())
    except link.DaemonError as e:
        raise PluginError(str(e)) from None
    return endpoint


def _call(endpoint: str, fields: dict, buffers: list, progress: Progress):
    link = _link()
    try:
        home = link.resolve_home(link.load_settings(HERE))
        return link.run_job(endpoint, "heal", fields, buffers, on_progress=progress, home=home)
    except link.RemoteError as e:
        user_fault = e.code in ("no_markers", "not_found", "bad_request", "too_large")
        raise PluginError(f"healdust: {e.message}",
                          Gimp.PDBStatusType.CALLING_ERROR if user_fault else
                          Gimp.PDBStatusType.EXECUTION_ERROR) from None
    except link.JobCancelled:
        raise PluginError("healdust: the job was cancelled.") from None
    except link.DaemonError as e:
        raise PluginError(str(e)) from None


def _source_layer(drawables):
    if len(drawables) != 1:
        raise calling_error("Select exactly one layer to heal.")
    d = drawables[0]
    if not d.is_layer() or d.is_group():
        raise calling_error("Heal dust works on a layer (not a group, channel or layer mask).")
    return d


def heal(image, drawables, config) -> None:
    source = _source_layer(drawables)
    model = (config.get_property("model") or "").strip()
    save_model = (config.get_property("save-model") or "").strip()
    mode = config.get_property("mode") or "transfer"
    threshold = float(config.get_property("threshold"))
    found, origin = collect_markers(image, source)
    if not found["dust"] and not found["not_dust"] and not model:
        raise calling_error(f"Nothing to learn from: mark 3 to 5 dust spots with a path named "
                            f"“{markers_mod.DUST_PATH}” (one anchor on each spot) or by selecting "
                            f"them, or give the name of a saved model.")
    if model and save_model == model and not found["dust"] and not found["not_dust"]:
        save_model = ""  # nothing new learned: do not rewrite the same model
    progress = Progress("Healing dust (AI)")
    endpoint = _connect(config.get_property("endpoint") or "")
    desc, data = read_pixels(image, source)
    fields = {"image": desc, "markers": found, "mode": mode}
    if model:
        fields["model"] = model
    if save_model:
        fields["save_model"] = save_model
    if threshold >= 0:  # the protocol wants 0 < threshold < 1
        fields["threshold"] = min(max(threshold, 0.001), 0.999)
    ev = _call(endpoint, fields, [data], progress)
    w, h = desc["width"], desc["height"]
    healed = _check_result(ev, "healed", w, h, desc["order"], desc["dtype"])
    mask = _check_result(ev, "mask", w, h, "GRAY", "u8")
    _write_undoable(image, source, healed, mask)
    spots = ev.get("spots")
    Gimp.progress_set_text(f"healdust: {spots} spots healed (markers from the {origin})"
                           if spots is not None else "healdust: done")
    for note in ev.get("notes") or []:
        if isinstance(note, str) and note.startswith("could not save"):  # healed, but a full disk
            Gimp.message(f"healdust: the dust was healed, but {note}.")


def _find_mask(image, source):
    """The user's "Dust mask": the layer above the source, else any layer or channel of
    that name."""
    layer = _results_above(image, source).get(MASK_LAYER)
    if layer is not None:
        return layer
    for item in list(image.get_layers()) + list(image.get_channels()):
        if markers_mod.is_named(item.get_name(), MASK_LAYER) and not item.is_group():
            return item
    return None


def read_mask(image, source, mask_item) -> bytes:
    """The edited mask over the source layer's area as a protocol mask (255 = dust)."""
    w, h = source.get_width(), source.get_height()
    _, sx, sy = source.get_offsets()
    if mask_item.is_layer():
        _, mx, my = mask_item.get_offsets()
        data = mask_item.get_buffer().get(_rect(sx - mx, sy - my, w, h), 1.0,
                                          _format_name("Y'A u8", mask_item), Gegl.AbyssPolicy.NONE)
        return pixels.mask_from_gray_alpha(bytes(data), w * h)
    data = mask_item.get_buffer().get(_rect(sx, sy, w, h), 1.0, "Y u8", Gegl.AbyssPolicy.NONE)
    return pixels.mask_from_gray(bytes(data), w * h)


def heal_mask(image, drawables, config) -> None:
    source = _source_layer(drawables)
    if source.get_name() in (MASK_LAYER, HEALED_LAYER):
        # run from a result layer: heal the layer the results were made from
        parent = source.get_parent()
        siblings = parent.get_children() if parent else image.get_layers()
        below = [x for x in siblings[image.get_item_position(source) + 1:]
                 if x.get_name() not in (MASK_LAYER, HEALED_LAYER)]
        if not below:
            raise calling_error("Select the layer to heal (the one under “Dust mask” and “Healed”).")
        source = below[0]
    mask_item = _find_mask(image, source)
    if mask_item is None:
        raise calling_error(f"There is no “{MASK_LAYER}” layer: run Heal dust (AI) first, or add a layer "
                            f"of that name and paint the dust white on black.")
    mask = read_mask(image, source, mask_item)
    if pixels.count_dust(mask) == 0:
        raise calling_error(f"The “{MASK_LAYER}” layer marks no dust over this layer (paint dust white).")
    progress = Progress("Healing dust with the edited mask")
    endpoint = _connect(config.get_property("endpoint") or "")
    desc, data = read_pixels(image, source)
    w, h = desc["width"], desc["height"]
    mask_desc = {"frame": 2, "width": w, "height": h, "channels": 1, "order": "GRAY", "dtype": "u8",
                 "stride": w}
    ev = _call(endpoint, {"image": desc, "mask": mask_desc}, [data, mask], progress)
    healed = _check_result(ev, "healed", w, h, desc["order"], desc["dtype"])
    _write_undoable(image, source, healed, None)


# ------------------------------------------------------------------------------------------
# GIMP wiring
# ------------------------------------------------------------------------------------------

def _run(procedure, run_mode, image, drawables, config, work, title: str, dialog: bool):
    if run_mode == Gimp.RunMode.INTERACTIVE and dialog:
        GimpUi.init("healdust")
        dlg = GimpUi.ProcedureDialog.new(procedure, config, title)
        dlg.fill(None)
        ok = dlg.run()
        dlg.destroy()
        if not ok:
            return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
    try:
        work(image, drawables, config)
    except PluginError as e:
        return procedure.new_return_values(e.status, GLib.Error(str(e)))
    except Exception as e:  # a bug or an unexpected answer: say so, never report success
        return procedure.new_return_values(Gimp.PDBStatusType.EXECUTION_ERROR,
                                           GLib.Error(f"healdust failed: {type(e).__name__}: {e}"))
    finally:
        Gimp.progress_end()
    Gimp.displays_flush()
    return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())


def run_heal(procedure, run_mode, image, drawables, config, _data):
    return _run(procedure, run_mode, image, drawables, config, heal, "Heal dust (AI)", dialog=True)


def run_heal_mask(procedure, run_mode, image, drawables, config, _data):
    return _run(procedure, run_mode, image, drawables, config, heal_mask, "Heal dust with edited mask",
                dialog=False)


class HealDust(Gimp.PlugIn):
    def do_set_i18n(self, _name):
        return False

    def do_query_procedures(self):
        return [PROC_HEAL, PROC_HEAL_MASK]

    def do_create_procedure(self, name):
        rw = GObject.ParamFlags.READWRITE
        if name == PROC_HEAL:
            proc = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, run_heal, None)
            proc.set_menu_label("Heal dust (AI)…")
            proc.set_documentation(
                "Find and heal dust, hairs and scratches like the marked ones",
                "Learns from dust spots marked with a path named “Dust markers” (one anchor on each "
                "spot; “Not dust” for counter-examples) or from the selection's separate areas, finds "
                "every other spot of the same kind and heals it. Adds the layers “Dust mask” and "
                "“Healed” above the layer. Needs the healdust daemon (started when not running).",
                name)
            proc.add_string_argument("model", "_Model", "Saved model to use (empty: the base model)", "", rw)
            proc.add_string_argument("save-model", "_Save model as",
                                     "Save the fine-tuned model under this name (empty: do not save)", "", rw)
            choice = Gimp.Choice.new()
            choice.add("transfer", 0, "Transfer (fine-tune the decoder)", "")
            choice.add("scratch", 1, "From scratch (train every layer)", "")
            proc.add_choice_argument("mode", "Mo_de", "How to learn from the markers", choice, "transfer", rw)
            proc.add_double_argument("threshold", "_Threshold",
                                     "Dust threshold 0–1 (negative: the model's calibrated one)",
                                     -1.0, 1.0, -1.0, rw)
        else:
            proc = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, run_heal_mask, None)
            proc.set_menu_label("Heal dust with edited mask")
            proc.set_documentation(
                "Heal exactly what the “Dust mask” layer marks",
                "Heals the pixels that are white in the (edited) “Dust mask” layer, with no detection, "
                "and updates the “Healed” layer.",
                name)
        proc.add_string_argument("endpoint", "_Endpoint",
                                 "healdust daemon address (empty: the installed default)", "", rw)
        proc.set_image_types("RGB*, GRAY*")
        proc.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
        proc.set_attribution("healdust", "MIT", "2025")
        proc.add_menu_path(MENU)
        return proc


if __name__ == "__main__":
    Gimp.main(HealDust.__gtype__, sys.argv)
