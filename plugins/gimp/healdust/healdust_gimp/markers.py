"""Dust markers from GIMP paths and from the selection. Standard library only.

A marker is ``{"x", "y", "r"}`` in pixel-index coordinates of the source layer (the centre
of pixel (i, j) is (i, j)), ``r`` the radius that covers the spot (SPEC.md §4).
GIMP's own coordinates put pixel i on [i, i + 1), so path points are shifted by half a pixel.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

DUST_PATH = "Dust markers"
NOT_DUST_PATH = "Not dust"
# Radius of a marker made from a single path anchor: covers a typical speck of film dust.
DEFAULT_RADIUS = 8.0

_SELECTED = bytes(1 if i >= 128 else 0 for i in range(256))
_RUN = re.compile(rb"\x01+")


def is_named(name: str, wanted: str) -> bool:
    """``name`` is ``wanted`` up to case and spaces, or GIMP's duplicate form ``wanted #2``."""
    n = " ".join(name.split()).casefold()
    w = wanted.casefold()
    return n == w or re.fullmatch(re.escape(w) + r" #\d+", n) is not None


def _marker(x: float, y: float, r: float) -> dict:
    return {"x": round(float(x), 3), "y": round(float(y), 3), "r": round(max(float(r), 1.0), 3)}


def stroke_markers(anchors: Sequence[tuple[float, float]], closed: bool,
                   outline: Sequence[tuple[float, float]] | None = None,
                   default_radius: float = DEFAULT_RADIUS) -> list[dict]:
    """Markers from one path stroke, in GIMP image coordinates.

    An open stroke: every anchor is a marker with ``default_radius`` (the user clicked on
    each spot). A closed stroke with several anchors drawn around a spot (or made from an
    elliptical selection): one marker at its centre whose radius reaches its farthest point.
    ``outline``: points along the closed curve (more exact than the anchors alone).
    """
    if not anchors:
        return []
    if not closed or len(anchors) < 2:
        return [_marker(x - 0.5, y - 0.5, default_radius) for x, y in anchors]
    pts = list(outline) if outline else list(anchors)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    r = max(math.hypot(x - cx, y - cy) for x, y in pts)
    return [_marker(cx - 0.5, cy - 0.5, r)]


def anchors_of(control_points: Sequence[float]) -> list[tuple[float, float]]:
    """Anchor points of a Bézier stroke: the middle pair of each (in, anchor, out) triple."""
    cps = list(control_points)
    return [(cps[i + 2], cps[i + 3]) for i in range(0, len(cps) - 5, 6)]


def selection_markers(mask: bytes, width: int, height: int, origin: tuple[int, int] = (0, 0),
                      limit: int | None = None) -> list[dict]:
    """One marker per separate (8-connected) selected area of ``mask``.

    ``mask``: one byte a pixel (≥ 128 = selected), ``width`` × ``height``, whose top-left
    pixel is at ``origin`` in the coordinates the markers are wanted in. Works on runs of
    selected pixels per row (found by the regex engine in C), so a large sparse selection
    costs little Python. Raises ``TooManyAreas`` beyond ``limit`` areas.
    """
    if len(mask) < width * height:
        raise ValueError(f"selection mask has {len(mask)} bytes, expected {width * height}")
    binary = mask[:width * height].translate(_SELECTED)
    parent: list[int] = []
    runs: list[tuple[int, int, int]] = []  # (row, first x, last x)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev: list[int] = []  # indices of the previous row's runs, left to right
    for y in range(height):
        cur: list[int] = []
        j = 0
        for m in _RUN.finditer(binary, y * width, (y + 1) * width):
            s, e = m.start() - y * width, m.end() - 1 - y * width
            idx = len(runs)
            runs.append((y, s, e))
            parent.append(idx)
            cur.append(idx)
            # 8-connected: a run above touches when it overlaps [s - 1, e + 1]
            while j < len(prev) and runs[prev[j]][2] < s - 1:
                j += 1
            k = j
            while k < len(prev) and runs[prev[k]][1] <= e + 1:
                a, b = find(prev[k]), find(idx)
                if a != b:
                    parent[b] = a
                k += 1
        prev = cur

    boxes: dict[int, list[int]] = {}
    for i, (y, s, e) in enumerate(runs):
        b = boxes.setdefault(find(i), [s, e, y, y])
        b[0], b[1], b[3] = min(b[0], s), max(b[1], e), y
        if limit is not None and len(boxes) > limit:
            raise TooManyAreas(len(boxes), limit)
    reach: dict[int, float] = {}
    centres = {root: ((b[0] + b[1]) / 2, (b[2] + b[3]) / 2) for root, b in boxes.items()}
    for i, (y, s, e) in enumerate(runs):
        root = find(i)
        cx, cy = centres[root]
        # the farthest pixel of a run from the centre is one of its ends; + half a pixel
        d = max(math.hypot(s - cx, y - cy), math.hypot(e - cx, y - cy)) + 0.5
        reach[root] = max(reach.get(root, 0.0), d)
    ox, oy = origin
    order = sorted(boxes, key=lambda root: (boxes[root][2], boxes[root][0]))
    return [_marker(centres[r][0] + ox, centres[r][1] + oy, reach[r]) for r in order]


class TooManyAreas(ValueError):
    def __init__(self, count: int, limit: int):
        super().__init__(f"the selection has more than {limit} separate areas")
        self.count = count
        self.limit = limit


def inside(markers: Iterable[dict], width: int, height: int, offset: tuple[int, int] = (0, 0)) -> list[dict]:
    """Markers moved into layer coordinates (``offset``: the layer's offsets in the image),
    keeping those whose centre lies on the layer."""
    ox, oy = offset
    out = []
    for m in markers:
        x, y = m["x"] - ox, m["y"] - oy
        if -0.5 <= x < width - 0.5 and -0.5 <= y < height - 0.5:
            out.append({"x": x, "y": y, "r": m["r"]})
    return out
