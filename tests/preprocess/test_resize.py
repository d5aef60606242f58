from __future__ import annotations

import numpy as np
import pytest

from ichscan.preprocess.resize import resize_slice, resize_slices

rng = np.random.default_rng(0)


@pytest.mark.parametrize(
    ("shape", "dtype", "size", "want"),
    [
        ((2, 64, 64), np.uint8, 32, (2, 32, 32)),
        ((2, 64, 64, 3), np.uint8, 32, (2, 32, 32, 3)),
        ((1, 64, 48, 2), np.float32, (20, 30), (1, 20, 30, 2)),
        ((3, 30, 30, 1), np.uint8, 45, (3, 45, 45, 1)),
        ((1, 50, 70, 4), np.uint8, 37, (1, 37, 37, 4)),
        ((0, 16, 16), np.float32, 8, (0, 8, 8)),
    ],
)
def test_shapes_and_dtypes(shape: tuple, dtype: type, size: object, want: tuple) -> None:
    vol = rng.integers(0, 256, size=shape).astype(dtype)
    out = resize_slices(vol, size)  # type: ignore[arg-type]
    assert out.shape == want and out.dtype == dtype


def test_integer_factor_is_block_mean() -> None:
    vol = rng.random((2, 8, 12), dtype=np.float32)
    out = resize_slices(vol, (4, 4))  # factors 2 x 3
    blocks = vol.reshape(2, 4, 2, 4, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(out, blocks, rtol=1e-5)


@pytest.mark.parametrize("size", [16, 37, 64, 100])
def test_constant_stays_constant(size: int) -> None:
    vol = np.full((1, 64, 64, 3), 77, np.uint8)
    np.testing.assert_array_equal(resize_slices(vol, size), 77)
    f = np.full((1, 64, 64), -3.5, np.float32)
    np.testing.assert_allclose(resize_slices(f, size), -3.5, rtol=1e-6)


@pytest.mark.parametrize("size", [32, 25])
def test_shrinking_is_antialiased(size: int) -> None:
    # A 1-pixel checkerboard aliases to solid black or white under point sampling;
    # an area average gives mid-grey.
    board = ((np.indices((64, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)
    out = resize_slices(board[None], size).astype(int)
    inner = out[0, 1:-1, 1:-1]
    assert np.all(np.abs(inner - 127.5) <= 40), (inner.min(), inner.max())


def test_rgb_path_matches_per_channel() -> None:
    vol = rng.integers(0, 256, size=(2, 60, 50, 3), dtype=np.uint8)
    together = resize_slices(vol, 23)
    for c in range(3):
        np.testing.assert_array_equal(together[..., c], resize_slices(vol[..., c], 23))


def test_fourth_channel_is_not_alpha() -> None:
    vol = np.zeros((1, 40, 40, 4), np.uint8)
    vol[..., 0] = 200  # channel 3 = 0 would erase the others if treated as RGBA alpha
    out = resize_slices(vol, 17)
    np.testing.assert_array_equal(out[..., 0], 200)
    np.testing.assert_array_equal(out[..., 3], 0)


def test_other_dtypes_round_trip() -> None:
    hu = rng.integers(-1024, 3000, size=(2, 40, 40)).astype(np.int16)
    out = resize_slices(hu, 20)
    assert out.dtype == np.int16
    ref = resize_slices(hu.astype(np.float32), 20)
    np.testing.assert_array_equal(out, np.rint(ref).astype(np.int16))
    assert resize_slices(hu.astype(np.float64), 20).dtype == np.float64


def test_same_size_is_a_copy() -> None:
    vol = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    out = resize_slices(vol, 16)
    np.testing.assert_array_equal(out, vol)
    assert not np.shares_memory(out, vol)


def test_non_square_is_squashed_by_default() -> None:
    img = np.zeros((20, 40), np.float32)
    img[:, 20:] = 1.0  # right half
    out = resize_slice(img, 10)
    assert out.shape == (10, 10)
    np.testing.assert_allclose(out[:, :5], 0.0)
    np.testing.assert_allclose(out[:, 5:], 1.0)


def test_keep_aspect_pads_centred_with_minimum() -> None:
    img = np.full((20, 40, 2), 50, np.uint8)
    img[0, 0] = (5, 9)
    # Target == padded size, so the pad geometry is visible without resampling.
    out = resize_slice(img, 40, keep_aspect=True)
    assert out.shape == (40, 40, 2)
    np.testing.assert_array_equal(out[:10], np.broadcast_to([5, 9], (10, 40, 2)))
    np.testing.assert_array_equal(out[30:], np.broadcast_to([5, 9], (10, 40, 2)))
    np.testing.assert_array_equal(out[10:30], img)
    tall = np.ones((30, 10), np.float32)
    padded = resize_slice(tall, 30, keep_aspect=True)
    np.testing.assert_array_equal(padded[:, 10:20], 1.0)
    assert padded.shape == (30, 30) and padded.min() == 1.0  # min of an all-ones slice
    shrunk = resize_slice(img, 20, keep_aspect=True)
    assert shrunk.shape == (20, 20, 2)
    assert shrunk[..., 0].max() <= 50 and shrunk[0, 10, 0] == 5


def test_keep_aspect_volume_uses_one_pad_value() -> None:
    vol = np.full((2, 10, 20), 100, np.uint8)
    vol[1, 0, 0] = 3  # the volume minimum
    out = resize_slices(vol, 20, keep_aspect=True)
    np.testing.assert_array_equal(out[:, :5], 3)


def test_resize_slice_matches_volume() -> None:
    img = rng.integers(0, 256, size=(48, 36, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_slice(img, 30), resize_slices(img[None], 30)[0])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        resize_slices(np.zeros((1, 4, 4), np.uint8), 0)
    with pytest.raises(ValueError, match="S, H, W"):
        resize_slices(np.zeros((4, 4), np.uint8), 2)
    with pytest.raises(ValueError, match="H, W"):
        resize_slice(np.zeros((1, 1, 4, 4), np.uint8), 2)
    with pytest.raises(TypeError):
        resize_slices(np.zeros((1, 4, 4), bool), 2)
