"""Krita wrappers: the source layer, its pixels, the markers, the result layers.

Everything here runs on the UI thread and returns plain Python data; nothing talks to the
daemon. Coordinates are image pixels: ``Node.pixelData`` reads in image coordinates (a moved
paint layer's offset is part of its device), and vector shapes report their bounding boxes
in document points including their layer's offset, converted with ``doc.resolution() / 72``.
"""

from __future__ import annotations

from dataclasses import dataclass

from krita import Krita
from PyQt5.QtCore import QByteArray

from . import markers as mk
from . import pixels

DUST_MARKERS = "Dust markers"
NOT_DUST = "Not dust"
DUST_MASK = "Dust mask"
HEALED = "Healed"
SPECIAL_NAMES = {n.casefold() for n in (DUST_MARKERS, NOT_DUST, DUST_MASK, HEALED)}
PIXEL_LAYER_TYPES = ("paintlayer",)
GRAY_PROFILES = ("Gray-D50-elle-V2-srgbtrc.icc", "Gray-D50-elle-V4-srgbtrc.icc", "Gray-D50-elle-V2-g10.icc",
                 "Gray-D50-elle-V4-g10.icc")


class UserError(Exception):
    """Something the user can fix; the message says how."""


@dataclass
class SourceImage:
    node: object       # krita.Node
    width: int
    height: int
    order: str         # BGRA, RGBA or GRAYA
    dtype: str         # u8, u16, f16, f32
    data: bytes

    def desc(self) -> dict:
        channels = len(self.order) if self.order != "GRAYA" else 2
        return {"frame": 1, "width": self.width, "height": self.height, "channels": channels,
                "order": self.order, "dtype": self.dtype,
                "stride": self.width * channels * pixels.SAMPLE_BYTES[self.dtype]}


@dataclass
class Markers:
    dust: list
    not_dust: list
    origin: str        # 'layer', 'selection' or 'none'

    def to_wire(self) -> dict:
        return {"dust": self.dust, "not_dust": self.not_dust}

    def __bool__(self) -> bool:
        return bool(self.dust)


# --------------------------------------------------------------------------------------
# finding layers
# --------------------------------------------------------------------------------------

def walk(node):
    """All nodes below ``node``, top of the stack first."""
    for child in reversed(node.childNodes()):
        yield child
        yield from walk(child)


def find_layers(doc, name: str) -> list:
    key = name.casefold()
    return [n for n in walk(doc.rootNode()) if n.name().strip().casefold() == key]


def is_special(node) -> bool:
    return node.name().strip().casefold() in SPECIAL_NAMES


def node_order(node) -> str | None:
    channels = sorted(node.channels(), key=lambda c: c.position())
    return pixels.channel_order([c.name() for c in channels])


def is_source_candidate(node) -> bool:
    return node is not None and node.type() in PIXEL_LAYER_TYPES and not is_special(node)


def pick_source(doc):
    """The layer to heal: the active layer, or (when that is a marker or result layer, or
    not a paint layer) the top-most paint layer that is not one of ours."""
    active = doc.activeNode()
    if is_source_candidate(active):
        return active
    for node in walk(doc.rootNode()):
        if is_source_candidate(node):
            return node
    return None


def source_below(node):
    """The nearest healable sibling below ``node`` (for the edited-mask action)."""
    parent = node.parentNode()
    siblings = parent.childNodes() if parent is not None else []
    index = next((i for i, s in enumerate(siblings) if same_node(s, node)), None)
    if index is not None:
        for s in reversed(siblings[:index]):
            if is_source_candidate(s):
                return s
    return None


def pick_dust_mask_layer(doc):
    active = doc.activeNode()
    if active is not None and active.name().strip().casefold() == DUST_MASK.casefold():
        return active
    found = find_layers(doc, DUST_MASK)
    return found[0] if found else None


def same_node(a, b) -> bool:
    return a is not None and b is not None and a.uniqueId() == b.uniqueId()


def document_is_open(doc) -> bool:
    return any(d == doc for d in Krita.instance().documents())


def node_in_document(doc, node) -> bool:
    return any(same_node(n, node) for n in walk(doc.rootNode()))


# --------------------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------------------

def read_source(doc, node) -> SourceImage:
    order = node_order(node)
    dtype = pixels.DEPTH_DTYPE.get(node.colorDepth())
    if order is None or dtype is None:
        raise UserError(f"The layer \"{node.name()}\" is {node.colorModel()} {node.colorDepth()}; "
                        "Heal dust works on RGB/Alpha and Gray/Alpha layers at 8 or 16 bit integer or "
                        "16/32 bit float. Convert the layer (Layer ▸ Convert ▸ Convert Layer Color Space) "
                        "and try again.")
    w, h = doc.width(), doc.height()
    data = bytes(node.pixelData(0, 0, w, h))
    return SourceImage(node, w, h, order, dtype, data)


def read_mask_layer(doc, node) -> bytes:
    """The edited "Dust mask" layer as a protocol mask (255 = dust)."""
    order = node_order(node)
    dtype = pixels.DEPTH_DTYPE.get(node.colorDepth())
    if order is None or dtype is None:
        raise UserError(f"The \"{DUST_MASK}\" layer is {node.colorModel()} {node.colorDepth()}; paint it as "
                        "a Gray/Alpha or RGB/Alpha layer (white = dust).")
    data = bytes(node.pixelData(0, 0, doc.width(), doc.height()))
    return pixels.mask_from_layer(data, order, dtype)


# --------------------------------------------------------------------------------------
# markers
# --------------------------------------------------------------------------------------

def _markers_of_layer(doc, node) -> list[dict]:
    if node.type() == "vectorlayer":
        ppp = doc.resolution() / 72.0
        out = []
        for shape in _leaf_shapes(node.shapes()):
            b = shape.boundingBox()
            out.append(mk.marker_from_box(b.x(), b.y(), b.width(), b.height(), ppp))
        return out
    rect = node.bounds()
    if rect.width() <= 0 or rect.height() <= 0:
        return []
    order = node_order(node)
    dtype = pixels.DEPTH_DTYPE.get(node.colorDepth())
    if order is None or dtype is None:
        raise UserError(f"The marker layer \"{node.name()}\" is {node.colorModel()} {node.colorDepth()}; "
                        "use a vector layer or an RGB/Alpha or Gray/Alpha paint layer for markers.")
    data = bytes(node.pixelData(rect.x(), rect.y(), rect.width(), rect.height()))
    binary = pixels.painted(data, order, dtype)
    return mk.markers_from_binary(binary, rect.width(), rect.height(), rect.x(), rect.y())


def _leaf_shapes(shapes):
    for s in shapes:
        children = s.children() if hasattr(s, "children") and s.type() == "groupshape" else None
        if children:
            yield from _leaf_shapes(children)
        else:
            yield s


def _markers_of_selection(doc) -> list[dict]:
    sel = doc.selection()
    if sel is None or sel.width() <= 0 or sel.height() <= 0:
        return []
    x, y, w, h = sel.x(), sel.y(), sel.width(), sel.height()
    data = bytes(sel.pixelData(x, y, w, h))
    binary = data.translate(bytes(1 if v >= 128 else 0 for v in range(256)))
    found = mk.markers_from_binary(binary, w, h, x, y)
    limit = max(doc.width(), doc.height()) / 4.0
    if len(found) == 1 and found[0]["r"] > limit:
        raise UserError("The selection covers a large part of the image, so it cannot be a dust marker. "
                        "Select a few dust spots (each separate area is one marker), or deselect "
                        "(Ctrl+Shift+A) to heal with a saved model.")
    return found


def read_markers(doc) -> Markers:
    """Markers from the "Dust markers" / "Not dust" layers, else from the selection."""
    dust_layers = find_layers(doc, DUST_MARKERS)
    not_layers = find_layers(doc, NOT_DUST)
    w, h = doc.width(), doc.height()
    if dust_layers or not_layers:
        dust = [m for n in dust_layers for m in _markers_of_layer(doc, n)]
        not_dust = [m for n in not_layers for m in _markers_of_layer(doc, n)]
        return Markers(mk.clip_markers(dust, w, h), mk.clip_markers(not_dust, w, h), "layer")
    dust = mk.clip_markers(_markers_of_selection(doc), w, h)
    return Markers(dust, [], "selection" if dust else "none")


# --------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------

def _gray_layer(doc, name: str, depth: str):
    node = doc.createNode(name, "paintlayer")
    for profile in GRAY_PROFILES:
        if node.setColorSpace("GRAYA", depth, profile):
            return node
    raise UserError(f"Krita could not make a Gray/Alpha {depth} layer for the dust mask.")


def _pixel_layer_like(doc, name: str, source):
    node = doc.createNode(name, "paintlayer")
    if (node.colorModel(), node.colorDepth(), node.colorProfile()) != (
            source.colorModel(), source.colorDepth(), source.colorProfile()):
        if not node.setColorSpace(source.colorModel(), source.colorDepth(), source.colorProfile()):
            raise UserError(f"Krita could not make a {source.colorModel()} {source.colorDepth()} layer "
                            "like the source layer.")
    return node


def add_result_layers(doc, source: SourceImage, healed: bytes, mask: bytes | None,
                      above=None) -> list:
    """Add "Healed" (and "Dust mask" when ``mask`` is given) above ``above`` (default: the source).

    Layers are filled before they enter the document, so each one is a single undo step.
    Returns the new nodes.
    """
    w, h = source.width, source.height
    anchor = above if above is not None else source.node
    parent = anchor.parentNode() or doc.rootNode()
    healed_node = _pixel_layer_like(doc, HEALED, source.node)
    healed_node.setPixelData(QByteArray(bytes(healed)), 0, 0, w, h)
    added = [healed_node]
    if mask is not None:
        mask_node = _gray_layer(doc, DUST_MASK, source.node.colorDepth())
        mask_node.setPixelData(QByteArray(pixels.mask_to_graya(bytes(mask), source.dtype)), 0, 0, w, h)
        mask_node.setOpacity(160)  # see the healed image through the marked dust
        added.append(mask_node)
    parent.addChildNode(healed_node, anchor)
    if mask is not None:
        parent.addChildNode(added[1], healed_node)
    doc.refreshProjection()
    return added
