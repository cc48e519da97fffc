"""The two actions as jobs: gather pixels and markers, talk to the daemon, write layers.

A job lives on the UI thread: ``Session`` polls the daemon from a QTimer, the progress
dialog's Cancel sends ``cancel``, and the document changes only when a ``result`` arrives
for a job that was not cancelled. ``ACTIVE`` is the running job, ``HISTORY`` what each job
ended with (scripts and tests read both).
"""

from __future__ import annotations

import time

from krita import Krita
from PyQt5.QtCore import QObject, QTimer

from . import dialog, exif, ui
from . import document as kd
from . import settings as st
from .session import DaemonError, Session

ACTIVE: Job | None = None
HISTORY: list[dict] = []
CANCEL_GRACE_S = 5.0   # after Cancel, wait this long for the daemon's 'cancelled'

NO_MARKERS = (
    "No dust markers, and no saved model to heal with. Mark 3–5 dust spots first: draw circles on a "
    "vector layer named \"Dust markers\" (or paint dots on a paint layer of that name), or select "
    "them (each separate selected area is one marker). Then run Heal dust (AI) again.")
NO_MARKERS_BASE = (
    "No dust markers, and the base model was chosen. Mark 3–5 dust spots (a \"Dust markers\" layer or "
    "a selection), or choose a saved model in the dialog.")


def _read_setting(group: str, key: str, default: str) -> str:
    return Krita.instance().readSetting(group, key, default)


def _write_setting(group: str, key: str, value: str) -> None:
    Krita.instance().writeSetting(group, key, value)


class Job(QObject):
    action = ""
    progress_kind = "plain"

    def __init__(self):
        super().__init__()
        self.doc = None
        self.session: Session | None = None
        self.progress: ui.Progress | None = None
        self.rid: str | None = None
        self.cancelling_since: float | None = None
        self.started = time.monotonic()
        self.finished = False
        self.record: dict = {"action": self.action}

    # -- life cycle -----------------------------------------------------------------
    def start(self) -> None:
        global ACTIVE
        ACTIVE = self
        try:
            self.doc = Krita.instance().activeDocument()
            if self.doc is None:
                raise kd.UserError("Open an image first.")
            self.prepare()
            self.progress = ui.Progress(self.cancel)
            self.progress.update(ui.STAGE_TEXT["connect"], 0.0)
            self.session = Session(st.connection(_read_setting))
            self.session.open(self._guard(self.connected), self._guard(self.daemon_lost),
                              self._guard(lambda text: self.progress.update(text)))
        except kd.UserError as e:
            self.finish("message", str(e))
        except DaemonError as e:
            self.finish("error", str(e))
        except Exception as e:
            self.finish("error", f"Unexpected error: {type(e).__name__}: {e}")

    def _guard(self, fn):
        """Wrap a callback: errors end the job with a message instead of escaping into Qt."""
        def run(*args):
            if self.finished:
                return
            try:
                fn(*args)
            except kd.UserError as e:
                self.finish("message", str(e))
            except Exception as e:
                self.finish("error", f"Unexpected error: {type(e).__name__}: {e}")
        return run

    def finish(self, outcome: str, text: str = "") -> None:
        """End the job once: close the dialog and the connection, record, tell the user."""
        global ACTIVE
        if self.finished:
            return
        self.finished = True
        if self.progress is not None:
            self.progress.close()
        if self.session is not None:
            self.session.close()
        self.record.update(outcome=outcome, message=text, seconds=round(time.monotonic() - self.started, 3))
        if self.session is not None and self.session.process is not None:
            self.record["started_daemon_pid"] = self.session.process.pid
        HISTORY.append(self.record)
        ACTIVE = None
        if outcome in ("error", "message"):
            ui.report("error" if outcome == "error" else "info", text)

    def daemon_lost(self, message: str) -> None:
        self.finish("error", message)

    def cancel(self) -> None:
        """Cancel pressed: before the request is sent, stop; after, ask the daemon and wait briefly."""
        if self.finished:
            return
        if self.rid is None or self.session is None or self.session.state != "ready":
            self.finish("cancelled")
            return
        if self.cancelling_since is None:
            self.cancelling_since = time.monotonic()
            self.session.cancel(self.rid)
            self.progress.update("Cancelling…")
            self.progress.show()
            QTimer.singleShot(int(CANCEL_GRACE_S * 1000), self._guard(lambda: self.finish("cancelled")))

    # -- the request ----------------------------------------------------------------
    def submit(self, type_: str, fields: dict, buffers: list) -> None:
        self.rid = self.session.request(type_, fields, buffers, self._guard(self.on_event))
        self.record["request_id"] = self.rid

    def on_event(self, ev) -> None:
        if self.cancelling_since is not None:
            if ev.final:  # a result that raced the cancel is dropped: the user asked for nothing
                self.finish("cancelled")
            elif time.monotonic() - self.cancelling_since > CANCEL_GRACE_S:
                self.finish("cancelled")
            return
        if ev.type == "progress":
            stage = str(ev.get("stage", ""))
            text = ui.STAGE_TEXT.get(stage, stage.capitalize() or "Working")
            if stage == "queued" and ev.get("position"):
                text += f" ({ev.get('position')} jobs ahead)"
            if ev.get("loss") is not None:
                text += f", loss {float(ev.get('loss')):.3f}"
            if ev.get("message"):
                text += f"\n{ev.get('message')}"
            self.progress.update(text, ui.stage_fraction(stage, float(ev.get("fraction") or 0.0),
                                                         self.progress_kind))
            self.record.setdefault("stages", []).append(stage)
        elif ev.type == "result":
            self.on_result(ev)
        elif ev.type == "error":
            self.finish("error", f"The healdust daemon reported an error: {ev.get('message', '')} "
                                 f"[{ev.get('code', 'internal')}]. The document was not changed.")
        elif ev.type == "cancelled":
            self.finish("cancelled")

    def check_document(self, node) -> None:
        if not kd.document_is_open(self.doc) or not kd.node_in_document(self.doc, node):
            raise kd.UserError("The image or its layer was closed while healing; nothing was added.")

    # -- for subclasses -------------------------------------------------------------
    def prepare(self) -> None:
        raise NotImplementedError

    def connected(self, hello: dict) -> None:
        raise NotImplementedError

    def on_result(self, ev) -> None:
        raise NotImplementedError


def _image_from(ev, key: str, source: kd.SourceImage) -> bytes:
    """A result image's packed bytes, checked against the source's size, order and depth."""
    desc = ev.get(key)
    if not isinstance(desc, dict):
        raise RuntimeError(f"the daemon's result has no '{key}' image")
    frame = desc.get("frame", 0)
    if not 1 <= frame <= len(ev.buffers):
        raise RuntimeError(f"the daemon's '{key}' image has no pixel frame")
    data = bytes(ev.buffers[frame - 1])
    want_order = "GRAY" if key == "mask" else source.order
    want_dtype = "u8" if key == "mask" else source.dtype
    if (desc.get("width"), desc.get("height"), desc.get("order"), desc.get("dtype")) != (
            source.width, source.height, want_order, want_dtype):
        got = f"{desc.get('width')}x{desc.get('height')} {desc.get('order')} {desc.get('dtype')}"
        raise RuntimeError(f"the daemon's '{key}' image is {got}, expected "
                           f"{source.width}x{source.height} {want_order} {want_dtype}")
    row = source.width if key == "mask" else source.desc()["stride"]
    stride = desc.get("stride", row)
    if stride != row:  # repack a padded result
        data = b"".join(data[y * stride:y * stride + row] for y in range(source.height))
    if len(data) != row * source.height:
        raise RuntimeError(f"the daemon's '{key}' image has {len(data)} bytes, "
                           f"expected {row * source.height}")
    return data


class HealJob(Job):
    """healdust_heal: markers (or a saved model) → "Dust mask" and "Healed" above the source."""
    action = "healdust_heal"

    def prepare(self) -> None:
        node = kd.pick_source(self.doc)
        if node is None:
            raise kd.UserError("There is no paint layer to heal. Select the layer with the scan or photo.")
        self.source_node = node
        self.markers = kd.read_markers(self.doc)
        self.camera = exif.read_camera(self.doc.fileName()) if self.doc.fileName() else None
        self.record.update(source=node.name(), markers=len(self.markers.dust),
                           not_dust=len(self.markers.not_dust), marker_origin=self.markers.origin,
                           markers_sent=self.markers.to_wire() if len(self.markers.dust) <= 100 else None)

    def connected(self, hello: dict) -> None:
        self.progress.update("Asking for saved models…")
        self.session.request("models.list", {}, None, self._guard(self.got_models))

    def got_models(self, ev) -> None:
        if ev.type != "result":
            if ev.final:
                self.finish("error", "The daemon could not list the saved models: "
                                     f"{ev.get('message', ev.type)}")
            return
        models = [m for m in (ev.get("models") or []) if isinstance(m, dict) and m.get("name")]
        if not self.markers and not models:
            self.finish("message", NO_MARKERS)
            return
        # the dialog runs its own event loop: open it outside this timer callback
        QTimer.singleShot(0, self._guard(lambda: self.choose_options(models)))

    def choose_options(self, models: list[dict]) -> None:
        options = st.load_options(_read_setting)
        options.model = st.preselect_model(models, self.camera, options.model)
        if st.interactive():
            self.progress.hide()
            summary = self._marker_summary()
            options = dialog.ask(ui.main_window(), options, models, summary, bool(self.markers), self.camera)
            if options is None:
                self.finish("closed")
                return
            st.save_options(_write_setting, options)
            self.progress.show()
        if not self.markers and not options.model:
            self.finish("message", NO_MARKERS_BASE)
            return
        self.send_heal(options)

    def _marker_summary(self) -> str:
        m = self.markers
        if not m:
            return "No dust markers: a saved model heals without learning."
        where = "the selection" if m.origin == "selection" else "the marker layers"
        text = f"{len(m.dust)} dust marker{'s' * (len(m.dust) != 1)} from {where}"
        if m.not_dust:
            text += f", {len(m.not_dust)} \"not dust\""
        return text + f". Healing the layer \"{self.source_node.name()}\"."

    def send_heal(self, options: st.HealOptions) -> None:
        self.source = kd.read_source(self.doc, self.source_node)
        fields = {"image": self.source.desc(), "mode": options.mode}
        if self.markers:
            fields["markers"] = self.markers.to_wire()
            if options.save_as:
                fields["save_model"] = options.save_as
        if options.model:
            fields["model"] = options.model
        if options.threshold is not None:
            fields["threshold"] = options.threshold
        if self.camera:
            fields["camera"] = self.camera
        self.progress_kind = "learn" if self.markers else "plain"
        self.record.update(model=options.model, mode=options.mode, save_as=options.save_as,
                           order=self.source.order, dtype=self.source.dtype)
        self.submit("heal", fields, [self.source.data])
        self.progress.update("Sending the image…")

    def on_result(self, ev) -> None:
        healed = _image_from(ev, "healed", self.source)
        mask = _image_from(ev, "mask", self.source)
        self.check_document(self.source_node)
        added = kd.add_result_layers(self.doc, self.source, healed, mask)
        self.record.update(layers=[n.name() for n in added], layer_ids=[n.uniqueId().toString() for n in added],
                           spots=ev.get("spots"),
                           threshold=ev.get("threshold"), model_used=ev.get("model"),
                           saved_model=ev.get("saved_model"), daemon_seconds=ev.get("seconds"))
        unsaved = [n for n in ev.get("notes") or [] if isinstance(n, str) and n.startswith("could not save")]
        self.finish("done")
        if unsaved:  # the layers are there; the model is not (a full disk)
            ui.report("info", "The dust was healed, but " + unsaved[0] + ".")


class MaskHealJob(Job):
    """healdust_heal_mask: heal exactly the white pixels of the edited "Dust mask" layer."""
    action = "healdust_heal_mask"
    progress_kind = "mask"

    def prepare(self) -> None:
        mask_node = kd.pick_dust_mask_layer(self.doc)
        if mask_node is None:
            raise kd.UserError(f"There is no \"{kd.DUST_MASK}\" layer. Run Heal dust (AI) first, or add a "
                               f"paint layer named \"{kd.DUST_MASK}\" and paint the dust white on it.")
        node = kd.source_below(mask_node) or kd.pick_source(self.doc)
        if node is None:
            raise kd.UserError(f"There is no paint layer below \"{kd.DUST_MASK}\" to heal.")
        self.mask_node, self.source_node = mask_node, node
        self.mask = kd.read_mask_layer(self.doc, mask_node)
        dust = kd.pixels.count_nonzero(self.mask)
        if dust == 0:
            raise kd.UserError(f"The \"{kd.DUST_MASK}\" layer is empty: paint the dust white on it "
                               "(black or erased pixels are left alone).")
        self.record.update(source=node.name(), mask_pixels=dust)

    def connected(self, hello: dict) -> None:
        self.source = kd.read_source(self.doc, self.source_node)
        mask_desc = {"frame": 2, "width": self.source.width, "height": self.source.height, "channels": 1,
                     "order": "GRAY", "dtype": "u8", "stride": self.source.width}
        self.record.update(order=self.source.order, dtype=self.source.dtype)
        self.submit("heal", {"image": self.source.desc(), "mask": mask_desc}, [self.source.data, self.mask])
        self.progress.update("Sending the image…")

    def on_result(self, ev) -> None:
        healed = _image_from(ev, "healed", self.source)
        self.check_document(self.source_node)
        above = self._below_mask()
        added = kd.add_result_layers(self.doc, self.source, healed, None, above=above)
        self.record.update(layers=[n.name() for n in added], layer_ids=[n.uniqueId().toString() for n in added],
                           daemon_seconds=ev.get("seconds"))
        self.finish("done")

    def _below_mask(self):
        """The new "Healed" goes right under the mask layer when that sits with the source,
        else right above the source."""
        parent = self.mask_node.parentNode()
        if parent is None or not kd.same_node(parent, self.source_node.parentNode()):
            return self.source_node
        siblings = parent.childNodes()
        index = next((i for i, s in enumerate(siblings) if kd.same_node(s, self.mask_node)), None)
        if not index:
            return self.source_node
        return siblings[index - 1]


def run(job_class) -> None:
    """Start a job unless one is running (then bring its progress forward)."""
    if ACTIVE is not None and not ACTIVE.finished:
        if ACTIVE.progress is not None:
            ACTIVE.progress.show()
        ui.report("info", "Heal dust is already running on an image; wait for it or cancel it.")
        return
    job_class().start()
