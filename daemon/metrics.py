"""Detection scores: spot-level and pixel-level precision, recall and F1.

A predicted spot counts as correct only when most of its pixels lie on or near real dust,
so one large blob over the image cannot game the score; a real spot counts as found when
any predicted pixel touches it (within ``tolerance`` px).
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


def score_masks(pred: np.ndarray, truth: np.ndarray, tolerance: int = 2,
                min_overlap: float = 0.5) -> DetectionScores:
    pred = pred.astype(bool)
    truth = truth.astype(bool)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    truth_near = cv2.dilate(truth.astype(np.uint8), k).astype(bool)
    pred_near = cv2.dilate(pred.astype(np.uint8), k).astype(bool)

    n_pred, lab_pred = cv2.connectedComponents(pred.astype(np.uint8), connectivity=8)
    sp = Scores()
    if n_pred > 1:
        lp = lab_pred.ravel()
        total = np.bincount(lp, minlength=n_pred)[1:]
        near = np.bincount(lp, weights=truth_near.ravel(), minlength=n_pred)[1:]
        good = near >= min_overlap * total
        sp.tp, sp.fp = int(good.sum()), int((~good).sum())

    n_true, lab_true = cv2.connectedComponents(truth.astype(np.uint8), connectivity=8)
    st = Scores()
    if n_true > 1:
        hit = np.bincount(lab_true.ravel(), weights=pred_near.ravel(), minlength=n_true)[1:] > 0
        st.tp, st.fn = int(hit.sum()), int((~hit).sum())

    px = Scores(int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum()))
    return DetectionScores(sp, st, px)
