"""The GIMP 3 plug-in inside real GIMP 3.0 (Debian 13 chroot) against a real daemon.

One gimp-console run (conftest.gimp_run) plays every scenario of gimp_batch.py; each test
here checks one thing a user would notice. The daemon is reached through relay_serve.py,
which the plug-in itself starts as its serve command (no daemon answered at its endpoint)
and which logs what the plug-in sent.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from gimp_harness import OFFSET, SIZE, GimpRun, to_u8, to_u16

pytestmark = [pytest.mark.gimp, pytest.mark.slow]


def succeeded(run: GimpRun, scenario: str) -> dict:
    r = run.result.get(scenario)
    assert r is not None, f"{scenario} did not run; GIMP said:\n{run.gimp_log[-3000:]}"
    assert r["status"] == "success", f"{scenario}: {r['status']}: {r.get('message')}"
    return r


def requests_where(run: GimpRun, dtype: str, with_mask: bool) -> list[dict]:
    return [h for h in run.heal_requests()
            if h["image"]["dtype"] == dtype and ("mask" in h) == with_mask]


def spot_errors(healed: np.ndarray, source: np.ndarray, clean: np.ndarray, mask: np.ndarray):
    """Mean absolute error to the clean image inside ``mask``: before and after healing."""
    before = np.abs(source[mask].astype(np.float64) - clean[mask]).mean()
    after = np.abs(healed[mask].astype(np.float64) - clean[mask]).mean()
    return before, after


def far_from(*masks: np.ndarray, margin: int = 5) -> np.ndarray:
    any_mask = np.zeros((SIZE, SIZE), bool)
    for m in masks:
        any_mask |= m
    k = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    return ~cv2.dilate(any_mask.astype(np.uint8), k).astype(bool)


def layer(r: dict, name: str) -> dict:
    return next(x for x in r["layers"] if x["name"] == name)


def test_procedures_are_registered_with_their_arguments(gimp_run):
    r = succeeded(gimp_run, "registration")
    heal, mask = r["plug-in-healdust"], r["plug-in-healdust-mask"]
    assert heal["label"].startswith("Heal dust (AI)")
    assert mask["label"] == "Heal dust with edited mask"
    for proc in (heal, mask):
        assert proc["menus"] == ["<Image>/Filters/Enhance"]
        assert "RGB*" in proc["types"] and "GRAY*" in proc["types"]
        assert "endpoint" in proc["arguments"]
    for arg in ("model", "save-model", "mode", "threshold"):
        assert arg in heal["arguments"]


# ------------------------------------------------------------------------------------------
# 8-bit RGB, path markers, daemon started by the plug-in
# ------------------------------------------------------------------------------------------

def test_results_are_two_layers_above_the_source_at_8_bit(gimp_run):
    r = succeeded(gimp_run, "rgb8_path")
    names = [x["name"] for x in r["layers"]]
    assert names[:2] == ["Dust mask", "Healed"] and len(names) == 3, names
    assert r["precision"] == "u8-non-linear"
    for x in r["layers"]:
        assert (x["width"], x["height"]) == (SIZE, SIZE)
    assert layer(r, "Healed")["encoding"] == "R'G'B' u8" and layer(r, "Healed")["bpp"] == 3
    assert layer(r, "Dust mask")["encoding"] == "R'G'B' u8"
    assert layer(r, "Healed")["visible"]


def test_plugin_started_the_daemon_with_the_installed_command(gimp_run):
    succeeded(gimp_run, "rgb8_path")
    assert (gimp_run.job / "relay.pid").exists(), "the serve command never ran"
    types = [r["header"]["type"] for r in gimp_run.requests]
    assert types[0] == "hello" and "heal" in types


def test_path_anchors_and_outlines_become_markers(gimp_run):
    succeeded(gimp_run, "rgb8_path")
    (h,) = requests_where(gimp_run, "u8", with_mask=False)
    assert h["image"]["order"] == "RGB" and h["mode"] == "transfer" and "threshold" not in h
    for kind in ("dust", "not_dust"):
        sent = h["markers"][kind]
        want = gimp_run.path_expected[kind]
        assert len(sent) == len(want), (kind, sent)
        for m, (x, y, r) in zip(sent, want, strict=True):
            assert abs(m["x"] - x) < 0.6 and abs(m["y"] - y) < 0.6, (kind, m, (x, y))
            assert abs(m["r"] - r) < 1.0, (kind, m, r)


def test_marked_dust_is_healed_8_bit(gimp_run):
    succeeded(gimp_run, "rgb8_path")
    healed = gimp_run.raw("rgb8_path", "healed", np.uint8, 3)
    source = gimp_run.raw("rgb8_path", "source", np.uint8, 3)
    clean = to_u8(gimp_run.scene8.clean)
    marked = np.zeros((SIZE, SIZE), bool)
    for s in gimp_run.path_spots:
        marked |= s.mask
    before, after = spot_errors(healed, source, clean, marked)
    assert before > 40, before  # the specks are really there
    assert after < 0.3 * before, (before, after)


def test_clean_pixels_are_untouched_8_bit(gimp_run):
    succeeded(gimp_run, "rgb8_path")
    healed = gimp_run.raw("rgb8_path", "healed", np.uint8, 3)
    source = gimp_run.raw("rgb8_path", "source", np.uint8, 3)
    predicted = gimp_run.raw("rgb8_path", "mask", np.uint8, 1)[..., 0] >= 128
    assert np.array_equal(source, to_u8(gimp_run.scene8.damaged))  # GIMP read what we wrote
    far = far_from(gimp_run.scene8.mask, predicted)
    assert far.mean() > 0.5
    assert np.array_equal(healed[far], source[far])


def test_edited_mask_is_healed_exactly(gimp_run):
    r = succeeded(gimp_run, "rgb8_edited_mask")
    assert [x["name"] for x in r["layers"]][:2] == ["Dust mask", "Healed"] and len(r["layers"]) == 3
    healed = gimp_run.raw("rgb8_edited_mask", "healed", np.uint8, 3)
    source = gimp_run.raw("rgb8_path", "source", np.uint8, 3)
    edited = gimp_run.edited_mask
    changed = (healed != source).any(axis=-1)
    assert not (changed & ~edited).any(), "pixels outside the edited mask changed"
    before, after = spot_errors(healed, source, to_u8(gimp_run.scene8.clean), edited)
    assert after < 0.5 * before, (before, after)
    h = requests_where(gimp_run, "u8", with_mask=True)[0]  # the first: this scenario's
    assert h["mask"]["order"] == "GRAY" and h["mask"]["frame"] == 2 and not h.get("markers")


# ------------------------------------------------------------------------------------------
# 16-bit RGBA, selection markers, saved model
# ------------------------------------------------------------------------------------------

def test_results_at_16_bit(gimp_run):
    r = succeeded(gimp_run, "rgba16_selection")
    assert r["precision"] == "u16-non-linear"
    assert [x["name"] for x in r["layers"]][:2] == ["Dust mask", "Healed"]
    assert layer(r, "Healed")["encoding"] == "R'G'B'A u16" and layer(r, "Healed")["bpp"] == 8
    assert layer(r, "Dust mask")["encoding"] == "R'G'B' u16"
    assert layer(r, "Dust mask")["mode"] == "screen"


def test_separate_selected_areas_become_markers(gimp_run):
    succeeded(gimp_run, "rgba16_selection")
    hs = [h for h in requests_where(gimp_run, "u16", with_mask=False) if h.get("save_model")]
    assert len(hs) == 1
    h = hs[0]
    assert h["image"]["order"] == "RGBA" and h["save_model"] == "roll-1"
    sent = sorted(h["markers"]["dust"], key=lambda m: (m["y"], m["x"]))
    want = sorted(zip(gimp_run.selection_spots, gimp_run.selection_radii, strict=True),
                  key=lambda sr: (sr[0].cy, sr[0].cx))
    assert len(sent) == len(want)
    for m, (s, r) in zip(sent, want, strict=True):
        assert abs(m["x"] - s.cx) < 0.75 and abs(m["y"] - s.cy) < 0.75, (m, s)
        assert r - 1.5 < m["r"] < r + 1.5, (m, r)
    assert h["markers"]["not_dust"] == []


def test_marked_dust_is_healed_and_rest_untouched_16_bit(gimp_run):
    succeeded(gimp_run, "rgba16_selection")
    healed = gimp_run.raw("rgba16_selection", "healed", np.uint16, 4)
    source = gimp_run.raw("rgba16_selection", "source", np.uint16, 4)
    assert np.array_equal(source[..., :3], to_u16(gimp_run.scene16.damaged))
    assert np.array_equal(healed[..., 3], gimp_run.alpha16), "alpha changed"
    marked = np.zeros((SIZE, SIZE), bool)
    for s in gimp_run.selection_spots:
        marked |= s.mask
    before, after = spot_errors(healed[..., :3], source[..., :3], to_u16(gimp_run.scene16.clean), marked)
    assert before > 40 * 257, before
    assert after < 0.3 * before, (before, after)
    predicted = gimp_run.raw("rgba16_selection", "mask", np.uint8, 1)[..., 0] >= 128
    far = far_from(gimp_run.scene16.mask, predicted)
    assert np.array_equal(healed[far], source[far])


def test_saved_model_needs_no_markers(gimp_run):
    r = succeeded(gimp_run, "saved_model_no_markers")
    assert [x["name"] for x in r["layers"]][:2] == ["Dust mask", "Healed"]
    hs = [h for h in requests_where(gimp_run, "u16", with_mask=False)
          if h.get("model") == "roll-1" and h["image"]["order"] == "RGBA"]
    assert len(hs) == 1
    assert hs[0]["threshold"] == pytest.approx(0.5) and not hs[0]["markers"]["dust"]


def test_gray_image_gets_gray_result_layers(gimp_run):
    r = succeeded(gimp_run, "gray_saved_model")
    assert r["precision"] == "u16-non-linear"
    assert [x["name"] for x in r["layers"]][:2] == ["Dust mask", "Healed"]
    assert layer(r, "Healed")["encoding"] == "Y'A u16"
    assert layer(r, "Dust mask")["encoding"] == "Y' u16"


# ------------------------------------------------------------------------------------------
# float and gray images, masks the user made
# ------------------------------------------------------------------------------------------

def test_float_image_with_a_painted_mask_layer(gimp_run):
    r = succeeded(gimp_run, "float_user_mask")
    assert r["precision"] == "float-linear"
    assert layer(r, "Healed")["encoding"] == "RGB float" and layer(r, "Healed")["bpp"] == 12
    healed = gimp_run.raw("float_user_mask", "healed", np.float32, 3)
    source = gimp_run.raw("float_user_mask", "source", np.float32, 3)
    dust = gimp_run.float_mask
    assert np.abs(healed[~dust] - source[~dust]).max() < 1e-4, "pixels outside the mask changed"
    assert np.abs(healed[gimp_run.float_decoy] - source[gimp_run.float_decoy]).max() < 1e-4, \
        "a transparent stroke on the mask counted as dust"
    clean = to_u8(gimp_run.scene8.clean).astype(np.float32) / 255
    before, after = spot_errors(healed, source, clean, dust)
    assert after < 0.5 * before, (before, after)
    (h,) = requests_where(gimp_run, "f32", with_mask=True)
    assert h["image"]["order"] == "RGB"


def test_gray_image_with_a_mask_channel(gimp_run):
    r = succeeded(gimp_run, "gray16_channel_mask")
    assert r["precision"] == "u16-non-linear"
    assert layer(r, "Healed")["encoding"] == "Y'A u16" and layer(r, "Healed")["bpp"] == 4
    healed = gimp_run.raw("gray16_channel_mask", "healed", np.uint16, 2)
    source = gimp_run.raw("gray16_channel_mask", "source", np.uint16, 2)
    dust = gimp_run.gray_mask
    assert np.array_equal(healed[~dust], source[~dust])
    assert np.array_equal(healed[..., 1], source[..., 1])
    assert (healed[dust, 0] != source[dust, 0]).mean() > 0.5
    assert (healed[dust, 0].astype(np.int64) - source[dust, 0]).mean() > 20 * 257  # dark specks lightened
    (h,) = requests_where(gimp_run, "u16", with_mask=True)
    assert h["image"]["order"] == "GRAYA" and h["mask"]["frame"] == 2


def test_moved_layer_and_full_canvas_mask_line_up(gimp_run):
    r = succeeded(gimp_run, "offset_layer_mask")
    assert layer(r, "Healed")["offsets"] == list(OFFSET)
    healed = gimp_run.raw("offset_layer_mask", "healed", np.uint8, 3)
    source = gimp_run.raw("offset_layer_mask", "source", np.uint8, 3)
    dust = gimp_run.offset_mask
    assert dust.sum() > 10
    changed = (healed != source).any(axis=-1)
    assert not (changed & ~dust).any()
    assert changed[dust].mean() > 0.3


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------

def test_nothing_to_learn_is_a_calling_error(gimp_run):
    r = gimp_run.result["nothing_to_learn"]
    assert r["status"] == "calling-error", r
    assert "Dust markers" in r["message"] and "saved model" in r["message"]
    assert len(r["layers"]) == 1


@pytest.mark.parametrize("scenario, words", [
    ("no_serve_command", ["No healdust daemon answers", "healdust serve"]),
    ("serve_command_fails", ["exited with status 3", "cannot load model"]),
    ("serve_command_missing", ["/nonexistent/healdust", "install-plugin gimp"]),
])
def test_dead_daemon_is_an_execution_error_with_a_message(gimp_run, scenario, words):
    r = gimp_run.result[scenario]
    assert r["status"] == "execution-error", r
    for w in words:
        assert w in r["message"], (w, r["message"])
    if "layers" in r:
        assert len(r["layers"]) == 1, "a failed run left layers behind"


def test_gimp_run_finished(gimp_run):
    assert gimp_run.result.get("done"), gimp_run.gimp_log[-3000:]
