"""Dust markers from painted areas, selections and vector shapes. Pure standard library.

A marker is ``{"x", "y", "r"}`` in image pixels (SPEC.md §4): the centre of a spot and a
radius that covers it. Painted areas and selections are split into 8-connected regions with
runs found by ``re`` (in C) and a union-find over the runs, so large layers stay quick.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

# A marker drawn as a point (a zero-size shape) covers this many pixels around it.
POINT_RADIUS = 4.0
MIN_RADIUS = 1.0
_RUN = re.compile(rb"[^\x00]+")


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def regions(binary: bytes, width: int, height: int) -> list[list[tuple[int, int, int]]]:
    """8-connected regions of the non-zero bytes of a width×height image, as runs (y, x0, x1).

    ``x1`` is exclusive. Regions come in the order of their first run (top to bottom).
    """
    runs: list[tuple[int, int, int]] = []
    parent: list[int] = []
    prev: list[int] = []  # indices of the runs on the row above
    for y in range(height):
        row = binary[y * width:(y + 1) * width]
        cur = []
        j = 0
        for m in _RUN.finditer(row):
            x0, x1 = m.span()
            idx = len(runs)
            runs.append((y, x0, x1))
            parent.append(idx)
            cur.append(idx)
            # runs above that touch [x0 - 1, x1] (8-connectivity); both rows are sorted by x
            while j < len(prev) and runs[prev[j]][2] < x0:
                j += 1
            k = j
            while k < len(prev) and runs[prev[k]][1] <= x1:
                a, b = _find(parent, idx), _find(parent, prev[k])
                if a != b:
                    parent[max(a, b)] = min(a, b)
                k += 1
        prev = cur
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(_find(parent, i), []).append(run)
    return [groups[k] for k in sorted(groups)]


def covering_circle(runs: Iterable[tuple[int, int, int]], x_offset: float = 0.0,
                    y_offset: float = 0.0) -> dict:
    """Centroid of a region's pixels and the radius that covers all of them (pixel edges included)."""
    runs = list(runs)
    n = sx = sy = 0.0
    for y, x0, x1 in runs:
        length = x1 - x0
        n += length
        sx += (x0 + x1) / 2.0 * length      # pixel centres are at x + 0.5
        sy += (y + 0.5) * length
    cx, cy = sx / n, sy / n
    r2 = 0.0
    for y, x0, x1 in runs:
        dy = abs(y + 0.5 - cy) + 0.5
        dx = max(abs(x0 - cx), abs(x1 - cx))
        r2 = max(r2, dx * dx + dy * dy)
    return {"x": cx + x_offset, "y": cy + y_offset, "r": max(MIN_RADIUS, math.sqrt(r2))}


def markers_from_binary(binary: bytes, width: int, height: int, x_offset: float = 0.0,
                        y_offset: float = 0.0) -> list[dict]:
    """One marker per 8-connected non-zero region of a width×height area at (x_offset, y_offset)."""
    return [covering_circle(reg, x_offset, y_offset) for reg in regions(binary, width, height)]


def marker_from_box(left: float, top: float, width: float, height: float,
                    pixels_per_point: float) -> dict:
    """A marker from a shape's bounding box in points (1/72 inch), as Krita's vector shapes give it."""
    cx = (left + width / 2.0) * pixels_per_point
    cy = (top + height / 2.0) * pixels_per_point
    r = max(width, height) / 2.0 * pixels_per_point
    return {"x": cx, "y": cy, "r": POINT_RADIUS if r < 0.5 else max(MIN_RADIUS, r)}


def clip_markers(markers: list[dict], width: int, height: int) -> list[dict]:
    """Drop markers whose circle lies wholly outside the image."""
    return [m for m in markers
            if -m["r"] < m["x"] < width + m["r"] and -m["r"] < m["y"] < height + m["r"]]
