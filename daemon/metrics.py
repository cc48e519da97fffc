"""Detection scores: spot-level and pixel-level precision, recall and F1.

A predicted spot counts as correct only when most of its pixels lie on or near real dust,
so one large blob over the image cannot game the score; a real spot counts as found when
any predicted pixel touches it (within ``tolerance`` px).

With the synthetic truth's ``ignore`` and ``instances`` (``synth.Damage``): a real spot is
one defect, however many pieces its visible pixels fall into, and dust too faint to see is
neither a spot to find nor a false alarm when found (pixels there count for nothing; a
predicted spot lying only on it is not counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class Scores:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, other: Scores) -> Scores:
        return Scores(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


@dataclass
class DetectionScores:
    spots_pred: Scores    # tp/fp over predicted spots
    spots_true: Scores    # tp/fn over true spots
    pixels: Scores

    def add(self, o: DetectionScores) -> DetectionScores:
        return DetectionScores(self.spots_pred.add(o.spots_pred), self.spots_true.add(o.spots_true),
                               self.pixels.add(o.pixels))

    @property
    def spot_precision(self) -> float:
        return self.spots_pred.precision

    @property
    def spot_recall(self) -> float:
        return self.spots_true.recall

    @property
    def spot_f1(self) -> float:
        p, r = self.spot_precision, self.spot_recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict:
        return {"spot_precision": self.spot_precision, "spot_recall": self.spot_recall,
                "spot_f1": self.spot_f1, "pixel_precision": self.pixels.precision,
                "pixel_recall": self.pixels.recall, "pixel_f1": self.pixels.f1}


def empty_scores() -> DetectionScores:
    return DetectionScores(Scores(), Scores(), Scores())


def spot_labels(truth: np.ndarray, instances: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """(count + 1, int32 labels 1..count, 0 elsewhere): the true spots of a bool mask, one
    per defect of ``instances`` that has a truth pixel, or without it one per 8-connected
    piece."""
    truth = truth.astype(bool)
    if instances is None:
        return cv2.connectedComponents(truth.astype(np.uint8), connectivity=8)
    ids = np.where(truth, instances, 0)
    used = np.unique(ids)
    used = used[used > 0]
    lab = (np.searchsorted(used, ids) + 1) * (ids > 0)
    return len(used) + 1, lab.astype(np.int32)


def predicted_spots(pred: np.ndarray, truth: np.ndarray, tolerance: int = 2, min_overlap: float = 0.5,
                    ignore: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each predicted spot (an 8-connected piece of ``pred``) judged as ``score_masks``
    judges it: (stats, centroids) as ``cv2.connectedComponentsWithStats`` gives them, less
    the background row; ``good``: most of its pixels lie on or near seen dust;
    ``counted``: it does not lie only near ignored dust (such a spot counts neither way)."""
    n, lab, stats, cents = cv2.connectedComponentsWithStats(pred.astype(np.uint8), connectivity=8)
    good, counted = judge_labels(lab, n, truth, tolerance, min_overlap, ignore)
    return stats[1:], cents[1:], good, counted


def judge_labels(labels: np.ndarray, n: int, truth: np.ndarray, tolerance: int = 2, min_overlap: float = 0.5,
                 ignore: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(good, counted) of predicted spots 1..n-1 given as ``labels`` (0 = none), judged as
    ``predicted_spots`` says."""
    truth = truth.astype(bool)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    truth_near = cv2.dilate(truth.astype(np.uint8), k).astype(bool)
    lp = labels.ravel()
    total = np.bincount(lp, minlength=n)[1:n].astype(np.float64)
    near = np.bincount(lp, weights=truth_near.ravel(), minlength=n)[1:n]
    counted = total
    if ignore is not None:
        # near ignored dust and not near seen dust: pixels that count for nothing
        neutral = cv2.dilate((ignore.astype(bool) & ~truth).astype(np.uint8), k).astype(bool) & ~truth_near
        counted = counted - np.bincount(lp, weights=neutral.ravel(), minlength=n)[1:n]
    return near >= min_overlap * counted, counted > 0


def score_masks(pred: np.ndarray, truth: np.ndarray, tolerance: int = 2,
                min_overlap: float = 0.5, ignore: np.ndarray | None = None,
                instances: np.ndarray | None = None) -> DetectionScores:
    """Scores of the predicted mask against the truth (bool HxW each). ``ignore``: pixels
    that are neither dust nor clean; ``instances``: the defect of each truth pixel (int,
    0 none), so that one defect is one spot; without it a spot is a connected piece."""
    pred = pred.astype(bool)
    truth = truth.astype(bool)
    ignore = np.zeros_like(truth) if ignore is None else ignore.astype(bool) & ~truth
    _, _, good, counted = predicted_spots(pred, truth, tolerance, min_overlap, ignore)
    sp = Scores(int((good & counted).sum()), int((~good & counted).sum()))
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    pred_near = cv2.dilate(pred.astype(np.uint8), k).astype(bool)

    st = Scores()
    n_true, lab_true = spot_labels(truth, instances)
    if n_true > 1:
        hit = np.bincount(lab_true.ravel(), weights=pred_near.ravel(), minlength=n_true)[1:] > 0
        st.tp, st.fn = int(hit.sum()), int((~hit).sum())

    scored = ~ignore
    px = Scores(int((pred & truth).sum()), int((pred & ~truth & scored).sum()), int((~pred & truth).sum()))
    return DetectionScores(sp, st, px)


def score_damage(pred: np.ndarray, damage, tolerance: int = 2) -> DetectionScores:
    """``score_masks`` against a ``synth.Damage``: the dust that can be seen, one spot per
    defect, faint dust ignored."""
    return score_masks(pred, damage.truth, tolerance, ignore=damage.ignore, instances=damage.instances)
