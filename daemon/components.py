"""Connected components of a mask of any size, found tile by tile.

``cv2.connectedComponents`` on a whole 100 MP mask allocates a 400 MB label image. Here
each tile is labelled on its own and the labels that touch across a tile seam are joined
(union-find), keeping per tile only one row and one column of labels, and per component
its bounding box and area. The labels of a window (one spot, one piece of a hair) are
rebuilt on demand from the few tiles it overlaps, so nothing image-sized is allocated.

Connectivity is 8, as everywhere else in healdust: the components, their bounding boxes
and areas are exactly those of ``cv2.connectedComponentsWithStats(mask, connectivity=8)``
(only the numbering differs).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

# Side of the tiles the mask is labelled in (px).
TILE = 512
# Labelled tiles kept for window look-ups (about 1 MB each).
CACHE_TILES = 8


def _as_u8(a: np.ndarray) -> np.ndarray:
    """A mask (bool or integer, nonzero = set) as uint8 for OpenCV, without a copy for
    bool and uint8."""
    if a.dtype == bool:
        return a.view(np.uint8)
    if a.dtype == np.uint8:
        return a
    return (a != 0).view(np.uint8)


def _touching(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Id pairs across a seam: ``a`` and ``b`` are the labels of two neighbouring lines
    of pixels (0 = none); pixel i of one touches pixels i-1, i and i+1 of the other."""
    out = []
    for aa, bb in ((a, b), (a[1:], b[:-1]), (a[:-1], b[1:])):
        ok = (aa > 0) & (bb > 0)
        if ok.any():
            out.append(np.stack([aa[ok], bb[ok]], 1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def _union(n: int, pairs: np.ndarray) -> np.ndarray:
    """Root of every id 0..n-1 after joining the pairs: the smallest id of its set."""
    parent = np.arange(n, dtype=np.int64)
    if len(pairs):
        par = parent.tolist()

        def find(i: int) -> int:
            while par[i] != i:
                par[i] = par[par[i]]
                i = par[i]
            return i

        for a, b in np.unique(pairs, axis=0).tolist():
            ra, rb = find(a), find(b)
            if ra != rb:
                par[max(ra, rb)] = min(ra, rb)
        parent = np.array(par, dtype=np.int64)
        while True:  # full path compression
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    return parent


@dataclass(frozen=True)
class Piece:
    """A part of one component to be repaired on its own: the component's id, the box
    (y0, y1, x0, x1) and whether the box holds the whole component."""
    label: int
    box: tuple[int, int, int, int]
    whole: bool


class MaskComponents:
    """The 8-connected components of ``mask`` (HxW, bool or integer; nonzero = set).

    ``count`` is their number; ``boxes`` (x0, y0, x1, y1, end exclusive) and ``areas``
    describe each, indexed like ``labels`` (component ids run 1..count, in the raster
    order of the first tile each appears in). The mask is read, never copied.
    """

    def __init__(self, mask: np.ndarray, tile: int = TILE):
        if mask.ndim != 2:
            raise ValueError(f"a mask must be HxW, got shape {mask.shape}")
        self.mask = mask
        self.tile = tile = max(8, int(tile))
        h, w = mask.shape
        self.shape = (h, w)
        nty, ntx = -(-h // tile), -(-w // tile)
        self._offsets = np.zeros((nty, ntx), np.int64)
        self._cache: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        stats = [np.zeros((1, 5), np.int64)]  # per tile label: x0, y0, x1, y1, area; id 0 unused
        pairs = []
        n_ids = 1
        prev_bottom = None
        for ty in range(nty):
            y0 = ty * tile
            top = np.zeros(w, np.int64)
            bottom = np.zeros(w, np.int64)
            prev_right = None
            for tx in range(ntx):
                x0, x1 = tx * tile, min(w, tx * tile + tile)
                self._offsets[ty, tx] = n_ids - 1
                lab, st = self._label(ty, tx)
                if lab is None:
                    prev_right = None
                    continue
                off = n_ids - 1
                n_ids += len(st)

                def ids(line: np.ndarray, off: int = off) -> np.ndarray:
                    return np.where(line > 0, line.astype(np.int64) + off, 0)

                top[x0:x1], bottom[x0:x1] = ids(lab[0]), ids(lab[-1])
                if prev_right is not None:
                    pairs.append(_touching(prev_right, ids(lab[:, 0])))
                prev_right = ids(lab[:, -1])
                g = np.empty((len(st), 5), np.int64)
                g[:, 0] = st[:, cv2.CC_STAT_LEFT] + x0
                g[:, 1] = st[:, cv2.CC_STAT_TOP] + y0
                g[:, 2] = g[:, 0] + st[:, cv2.CC_STAT_WIDTH]
                g[:, 3] = g[:, 1] + st[:, cv2.CC_STAT_HEIGHT]
                g[:, 4] = st[:, cv2.CC_STAT_AREA]
                stats.append(g)
                self._remember((ty, tx), lab)
            if prev_bottom is not None:
                pairs.append(_touching(prev_bottom, top))
            prev_bottom = bottom
        root = _union(n_ids, np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64))
        part = np.concatenate(stats)
        roots = np.flatnonzero(root[1:] == np.arange(1, n_ids)) + 1
        self.count = len(roots)
        # renumber the components 1..count; parts map to their component's number
        number = np.zeros(n_ids, np.int64)
        number[roots] = np.arange(1, self.count + 1)
        self._number = number[root]
        comp = self._number[1:]
        boxes = np.zeros((self.count + 1, 4), np.int64)
        boxes[:, :2] = np.iinfo(np.int64).max
        np.minimum.at(boxes[:, 0], comp, part[1:, 0])
        np.minimum.at(boxes[:, 1], comp, part[1:, 1])
        np.maximum.at(boxes[:, 2], comp, part[1:, 2])
        np.maximum.at(boxes[:, 3], comp, part[1:, 3])
        boxes[0] = 0
        self.boxes = boxes
        self.areas = np.bincount(comp, part[1:, 4], minlength=self.count + 1).astype(np.int64)

    @property
    def total_area(self) -> int:
        return int(self.areas.sum())

    def _label(self, ty: int, tx: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Tile labels (int32, 0 = background) and stats of labels 1..; (None, None) for
        an empty tile. Always the same call, so a rebuilt tile is numbered as before."""
        t = self.tile
        sub = _as_u8(self.mask[ty * t:ty * t + t, tx * t:tx * t + t])
        if not sub.any():
            return None, None
        _, lab, st, _ = cv2.connectedComponentsWithStats(sub, connectivity=8, ltype=cv2.CV_32S)
        return lab, st[1:]

    def _remember(self, key: tuple[int, int], lab: np.ndarray | None) -> None:
        self._cache[key] = lab
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_TILES:
            self._cache.popitem(last=False)

    def _tile_labels(self, ty: int, tx: int) -> np.ndarray | None:
        key = (ty, tx)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        lab, _ = self._label(ty, tx)
        self._remember(key, lab)
        return lab

    def labels(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Component ids (int64, 0 = background) of the window [y0, y1) × [x0, x1)."""
        t = self.tile
        out = np.zeros((y1 - y0, x1 - x0), np.int64)
        for ty in range(y0 // t, (y1 - 1) // t + 1):
            for tx in range(x0 // t, (x1 - 1) // t + 1):
                lab = self._tile_labels(ty, tx)
                if lab is None:
                    continue
                ty0, tx0 = ty * t, tx * t
                ya, yb = max(y0, ty0), min(y1, ty0 + lab.shape[0])
                xa, xb = max(x0, tx0), min(x1, tx0 + lab.shape[1])
                sub = lab[ya - ty0:yb - ty0, xa - tx0:xb - tx0]
                m = sub > 0
                dst = out[ya - y0:yb - y0, xa - x0:xb - x0]
                dst[m] = self._number[sub[m] + self._offsets[ty, tx]]
        return out

    def region(self, label: int, box: tuple[int, int, int, int]) -> np.ndarray:
        """The pixels of component ``label`` inside ``box`` (y0, y1, x0, x1), as bool."""
        y0, y1, x0, x1 = box
        return self.labels(y0, y1, x0, x1) == label

    def pieces(self, chunk: int) -> Iterator[Piece]:
        """Every component cut into boxes of at most ``chunk`` px a side (one box, the
        bounding box, for a component that fits), in an order that keeps the tiles they
        overlap together (few tiles are labelled again)."""
        rows = []
        for k in range(1, self.count + 1):
            x0, y0, x1, y1 = (int(v) for v in self.boxes[k])
            whole = y1 - y0 <= chunk and x1 - x0 <= chunk
            for cy in range(y0, y1, chunk):
                for cx in range(x0, x1, chunk):
                    rows.append((cy // self.tile, cx // self.tile, cy, cx, k,
                                 (cy, min(y1, cy + chunk), cx, min(x1, cx + chunk)), whole))
        rows.sort(key=lambda r: r[:5])
        for *_, k, box, whole in rows:
            yield Piece(k, box, whole)
