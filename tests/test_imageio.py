"""Images kept as they came: channels, bit depth, alpha."""

from __future__ import annotations

import numpy as np
import pytest

from healdust.imageio import ImageError, read_image, read_mask, write_image, write_mask

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("ext, dtype, channels", [
    (".png", np.uint8, 1), (".png", np.uint8, 2), (".png", np.uint8, 3), (".png", np.uint8, 4),
    (".png", np.uint16, 1), (".png", np.uint16, 2), (".png", np.uint16, 3), (".png", np.uint16, 4),
    (".tif", np.uint8, 3), (".tif", np.uint16, 3), (".tif", np.uint16, 4), (".tif", np.float32, 3),
    (".tif", np.float32, 1),
])
def test_round_trip_is_exact(tmp_path, ext, dtype, channels):
    if dtype == np.float32:
        a = RNG.random((17, 23, channels), dtype=np.float32)
    else:
        a = RNG.integers(0, np.iinfo(dtype).max, (17, 23, channels), endpoint=True).astype(dtype)
    p = tmp_path / f"x{ext}"
    write_image(p, a)
    img = read_image(p)
    assert img.pixels.dtype == dtype and img.pixels.shape == a.shape
    assert np.array_equal(img.pixels, a)
    assert img.order == {1: "GRAY", 2: "GRAYA", 3: "RGB", 4: "RGBA"}[channels]


def test_rgb_order_is_rgb(tmp_path):
    a = np.zeros((4, 4, 3), np.uint8)
    a[..., 0] = 200  # red
    write_image(tmp_path / "r.png", a)
    import cv2

    assert cv2.imread(str(tmp_path / "r.png"))[0, 0, 2] == 200  # OpenCV reads BGR: red is last
    assert read_image(tmp_path / "r.png").pixels[0, 0, 0] == 200


def test_jpeg(tmp_path):
    a = RNG.integers(0, 255, (16, 16, 3)).astype(np.uint8)
    write_image(tmp_path / "x.jpg", a)
    img = read_image(tmp_path / "x.jpg")
    assert img.pixels.shape == (16, 16, 3) and img.pixels.dtype == np.uint8
    with pytest.raises(ImageError, match="JPEG holds 8-bit"):
        write_image(tmp_path / "y.jpg", a.astype(np.uint16))


def test_masks(tmp_path):
    m = RNG.random((9, 11)) > 0.5
    write_mask(tmp_path / "m.png", m)
    raw = read_image(tmp_path / "m.png")
    assert raw.order == "GRAY" and set(np.unique(raw.pixels)) <= {0, 255}
    assert np.array_equal(read_mask(tmp_path / "m.png", (9, 11)), m)
    with pytest.raises(ImageError, match="mask is 11x9"):
        read_mask(tmp_path / "m.png", (10, 11))


def test_unreadable_files_give_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match="cannot read"):
        read_image(tmp_path / "bad.png")
    (tmp_path / "x.bmp").write_bytes(b"BM")
    with pytest.raises(ImageError, match="unsupported file type"):
        read_image(tmp_path / "x.bmp")
    with pytest.raises(ImageError, match="float"):
        write_image(tmp_path / "f.png", np.zeros((2, 2, 3), np.float32))


def test_exif_camera(tmp_path):
    from PIL import Image

    im = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    exif = Image.Exif()
    exif[0x010F] = "Acme"
    exif[0x0110] = "X1"
    exif.get_ifd(0x8769)[0xA431] = "12345"
    im.save(tmp_path / "c.jpg", exif=exif)
    assert read_image(tmp_path / "c.jpg").camera == {"make": "Acme", "model": "X1", "serial": "12345"}
