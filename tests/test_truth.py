"""The synthetic truth: what can be seen is dust, what cannot is ignored, one defect is one spot."""

from __future__ import annotations

import numpy as np
import pytest

from healdust import synth
from healdust.demo import sample_path
from healdust.metrics import score_damage, score_masks


@pytest.fixture(scope="module")
def photo():
    return synth.load_photo(sample_path()).astype(np.float32) / 255


def _crop(photo, seed, size=160):
    rng = np.random.default_rng(seed)
    y, x = int(rng.integers(0, photo.shape[0] - size)), int(rng.integers(0, photo.shape[1] - size))
    return np.ascontiguousarray(photo[y:y + size, x:x + size])


@pytest.mark.parametrize("polarity", ["dark", "bright"])
def test_film_truth_is_the_dust_that_changes_the_picture(photo, polarity):
    stamps = synth.StampSet.load(synth.default_stamps_dir()) if synth.default_stamps_dir() else None
    seen_any = hidden_any = 0
    for seed in range(6):
        img = _crop(photo, seed)
        img[:, :40] = 0.08 if polarity == "dark" else 0.94  # a band of the dust's own tone
        dmg = synth.add_film_damage(img, np.random.default_rng(seed), stamps, count=30, polarity=polarity,
                                    grain=0.0)
        change = np.abs(dmg.image - img).max(axis=2)
        assert not (dmg.truth & ~dmg.mask).any() and not (dmg.truth & dmg.ignore).any()
        assert (change[dmg.truth] >= synth.VISIBLE_CHANGE - 1e-6).all()
        hidden = dmg.mask & ~dmg.truth
        assert (change[hidden] < synth.VISIBLE_CHANGE).all() and dmg.ignore[hidden].all()
        assert (dmg.instances[dmg.mask] > 0).all() and (dmg.instances[~dmg.mask & ~dmg.ignore] == 0).all()
        seen_any += int(dmg.truth[:, 40:].sum())
        hidden_any += int(hidden[:, :40].sum())
    assert seen_any > 0 and hidden_any > 0  # a dark speck on black, a bright one on white: unseen


def test_sensor_spot_on_black_is_ignored_on_grey_is_dust():
    img = np.full((120, 240, 3), 0.6, np.float32)
    img[:, :120] = 0.0
    field = synth.SensorDustField([synth.SensorSpot(0.5, 0.25, 10.0, 0.15),
                                   synth.SensorSpot(0.5, 0.75, 10.0, 0.15)])
    dmg = field.apply(img, f_number=8.0)
    assert dmg.mask[:, :120].any() and dmg.mask[:, 120:].any()
    assert not dmg.truth[:, :120].any() and dmg.ignore[:, :120].sum() >= dmg.mask[:, :120].sum()
    assert np.array_equal(dmg.truth[:, 120:], dmg.mask[:, 120:])
    assert set(np.unique(dmg.instances[dmg.mask])) == {1, 2}
    # the faintest visible spot: just above the line is dust, just below it is not
    for strength, seen in ((0.025, True), (0.019, False)):  # x 0.6 x 1.175 (the ring)
        d = synth.SensorDustField([synth.SensorSpot(0.5, 0.75, 10.0, strength)]).apply(img, f_number=22.0)
        assert d.truth.any() == seen, strength


def test_a_defect_in_pieces_is_one_spot_and_faint_dust_counts_for_nothing():
    truth = np.zeros((64, 64), bool)
    truth[10:13, 10:13] = truth[10:13, 30:33] = True      # one hair, seen in two places
    truth[50:53, 50:53] = True                             # a second defect
    instances = np.zeros((64, 64), np.int32)
    instances[10:13, 10:33] = 1
    instances[50:53, 50:53] = 2
    ignore = np.zeros_like(truth)
    ignore[10:13, 14:29] = True                            # the hair where it cannot be seen
    ignore[30:36, 2:8] = True                              # a speck on black
    pred = np.zeros_like(truth)
    pred[10:13, 10:13] = True                              # finds the hair once
    pred[31:35, 3:7] = True                                # finds the unseen speck: no false alarm
    pred[40:43, 20:23] = True                              # a real false alarm
    s = score_masks(pred, truth, ignore=ignore, instances=instances)
    assert (s.spots_true.tp, s.spots_true.fn) == (1, 1)
    assert (s.spots_pred.tp, s.spots_pred.fp) == (1, 1)
    assert s.pixels.fp == 9 and s.pixels.tp == 9  # pixels on ignored dust count for nothing
    # without the truth's extras: pieces are spots and the unseen speck is a false alarm
    plain = score_masks(pred, truth)
    assert (plain.spots_true.tp, plain.spots_true.fn) == (1, 2) and plain.spots_pred.fp == 2


def test_score_damage_uses_the_damage_truth(photo):
    img = _crop(photo, 3)
    dmg = synth.add_film_damage(img, np.random.default_rng(3), None, count=20, grain=0.0)
    s = score_damage(dmg.truth, dmg)
    assert s.spot_recall == 1.0 and s.spot_precision == 1.0
    assert s.spots_true.tp == len(np.unique(dmg.instances[dmg.truth]))
