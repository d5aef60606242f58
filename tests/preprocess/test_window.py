from __future__ import annotations

import tracemalloc

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ichscan.preprocess import window as window_mod
from ichscan.preprocess.window import (
    DEFAULT_WINDOWS,
    WINDOWS,
    Window,
    apply_lut,
    apply_window,
    parse_windows,
    stack_windows,
    window_lut,
)

MODES = ("linear", "sigmoid")
FAST = settings(max_examples=60, deadline=None)

int16_arrays = hnp.arrays(
    np.int16,
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=12),
    elements=st.integers(-32768, 32767),
)
window_sets = st.sampled_from(
    [
        "brain",
        "brain,bone",
        "brain,subdural,bone",
        "brain,subdural,bone,soft",
        "brain,subdural,bone,soft,-20/7",
        "brain,subdural,bone,soft,brain,bone,subdural,50/150,1000/3000",
        "0.5/1",
    ]
)


# --- presets and parsing -------------------------------------------------------------


def test_presets() -> None:
    assert WINDOWS["brain"] == Window("brain", 40, 80)
    assert (WINDOWS["subdural"].center, WINDOWS["subdural"].width) == (80, 200)
    assert (WINDOWS["bone"].center, WINDOWS["bone"].width) == (600, 2800)
    assert WINDOWS["soft"] is WINDOWS["soft_tissue"]
    assert (WINDOWS["soft"].center, WINDOWS["soft"].width) == (40, 380)
    assert (WINDOWS["brain"].low, WINDOWS["brain"].high) == (0, 80)
    assert DEFAULT_WINDOWS == ("brain", "subdural", "bone")


def test_parse_names_and_custom() -> None:
    assert [w.name for w in parse_windows("brain,subdural,bone")] == list(DEFAULT_WINDOWS)
    assert parse_windows(" Brain , SOFT ") == [WINDOWS["brain"], WINDOWS["soft_tissue"]]
    (custom,) = parse_windows("50/150")
    assert (custom.center, custom.width, custom.low, custom.high) == (50, 150, -25, 125)
    (neg,) = parse_windows("-600/1500")
    assert (neg.center, neg.width) == (-600, 1500)
    mine = Window("mine", 1, 2)
    assert parse_windows(["bone", mine, "10/20"])[1] is mine
    assert parse_windows(mine) == [mine]  # a lone Window is not iterated field by field


@pytest.mark.parametrize("bad", ["brian", "brain,lung", "40/", "a/b", "40/80/2"])
def test_parse_unknown_lists_valid_names(bad: str) -> None:
    with pytest.raises(ValueError, match="brain, subdural, bone, soft_tissue, soft"):
        parse_windows(bad)


def test_parse_rejects_zero_width_and_empty() -> None:
    with pytest.raises(ValueError, match="width"):
        parse_windows("40/0")
    with pytest.raises(ValueError, match="no windows"):
        parse_windows(" , ")
    with pytest.raises(ValueError, match="no windows"):
        parse_windows([])


# --- direct windowing ----------------------------------------------------------------


def test_brain_window_endpoints() -> None:
    hu = np.array([-1000, 0, 40, 80, 3000], dtype=np.int16)
    np.testing.assert_array_equal(apply_window(hu, "brain"), [0, 0, 128, 255, 255])
    f = apply_window(hu, WINDOWS["brain"], dtype=np.float32)
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f, [0.0, 0.0, 0.5, 1.0, 1.0])


@pytest.mark.parametrize("name", ["brain", "subdural", "bone", "soft"])
def test_sigmoid_centre_and_edges(name: str) -> None:
    w = WINDOWS[name]
    hu = np.array([w.low, w.center, w.high], dtype=np.float32)
    f = apply_window(hu, w, mode="sigmoid", dtype=np.float32)
    assert f[1] == 0.5
    np.testing.assert_allclose(f[[0, 2]], [1 / 255, 254 / 255], rtol=1e-5)
    np.testing.assert_array_equal(apply_window(hu, w, mode="sigmoid"), [1, 128, 254])


@FAST
@given(hu=int16_arrays, mode=st.sampled_from(MODES))
def test_output_range_and_shape(hu: np.ndarray, mode: str) -> None:
    u8 = apply_window(hu, "subdural", mode=mode)
    assert u8.dtype == np.uint8 and u8.shape == hu.shape
    f = apply_window(hu, "subdural", mode=mode, dtype="float32")
    assert f.dtype == np.float32 and f.shape == hu.shape
    assert np.all((f >= 0) & (f <= 1))
    # uint8 is round(255 * y) of the float output, up to float32 rounding at .5 ties
    assert np.all(np.abs(u8.astype(np.float32) - 255 * f) <= 0.5 + 1e-3)


@FAST
@given(
    hu=hnp.arrays(np.int16, st.integers(1, 200), elements=st.integers(-32768, 32767)),
    mode=st.sampled_from(MODES),
    name=st.sampled_from(sorted(WINDOWS)),
)
def test_monotone_in_hu(hu: np.ndarray, mode: str, name: str) -> None:
    hu = np.sort(hu)
    for dtype in (np.uint8, np.float32):
        out = apply_window(hu, name, mode=mode, dtype=dtype)
        assert np.all(np.diff(out.astype(np.float64)) >= 0)


@FAST
@given(
    hu=hnp.arrays(
        np.float32,
        st.integers(1, 200),
        elements=st.floats(-5000, 5000, width=32, allow_nan=False),
    )
)
def test_float_input_range_and_monotone(hu: np.ndarray) -> None:
    hu = np.sort(hu)
    lin = apply_window(hu, "brain", dtype=np.float32)
    assert np.all(np.diff(lin) >= 0) and np.all((lin >= 0) & (lin <= 1))
    sig = apply_window(hu, "brain", mode="sigmoid", dtype=np.float32)
    assert np.all(np.diff(sig) >= -1e-6) and np.all((sig >= 0) & (sig <= 1))


def test_float64_and_nan_input() -> None:
    hu = np.array([np.nan, -np.inf, 40.0, np.inf], dtype=np.float64)
    for mode in MODES:
        np.testing.assert_array_equal(apply_window(hu, "brain", mode=mode), [0, 0, 128, 255])


def test_no_float64_temporaries() -> None:
    hu = np.zeros((1024, 1024), dtype=np.int16)  # 2 MiB; a float64 copy would be 8 MiB
    apply_window(hu, "brain")  # warm up lazy allocations
    tracemalloc.start()
    try:
        apply_window(hu, "brain", mode="sigmoid")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2**20  # one float32 work buffer (4 MiB) + uint8 output (1 MiB)


def test_bad_mode_dtype_and_multiple_windows() -> None:
    hu = np.zeros(3, np.int16)
    with pytest.raises(ValueError, match="mode"):
        apply_window(hu, "brain", mode="cubic")
    with pytest.raises(ValueError, match="dtype"):
        apply_window(hu, "brain", dtype=np.float64)
    with pytest.raises(ValueError, match="one window"):
        apply_window(hu, "brain,bone")


def test_stack_windows_channels_last() -> None:
    hu = np.arange(-200, 1000, 7, dtype=np.int16).reshape(2, -1)
    out = stack_windows(hu)
    assert out.shape == (*hu.shape, 3) and out.dtype == np.uint8
    for c, name in enumerate(DEFAULT_WINDOWS):
        np.testing.assert_array_equal(out[..., c], apply_window(hu, name))
    f = stack_windows(hu, ["brain", "50/150"], mode="sigmoid", dtype=np.float32)
    np.testing.assert_array_equal(
        f[..., 1], apply_window(hu, "50/150", mode="sigmoid", dtype=np.float32)
    )


# --- lookup tables -------------------------------------------------------------------


def test_lut_layout_and_cache() -> None:
    lut = window_lut("brain,subdural,bone")
    assert lut.shape == (65536, 3) and lut.dtype == np.uint8
    assert not lut.flags.writeable
    assert window_lut(["brain", "subdural", "bone"]) is lut
    assert window_lut(DEFAULT_WINDOWS, mode="sigmoid") is not lut
    for h in (-32768, -1024, -1, 0, 40, 80, 32767):
        row = int(np.int16(h).view(np.uint16))
        np.testing.assert_array_equal(lut[row], stack_windows(np.int16(h)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "spec", ["brain", "brain,bone", "brain,subdural,bone", "brain,subdural,bone,soft"]
)
def test_lut_exhaustive(mode: str, spec: str) -> None:
    every = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    got = apply_lut(every, window_lut(spec, mode=mode))
    np.testing.assert_array_equal(got, stack_windows(every, spec, mode=mode))


@FAST
@given(hu=int16_arrays, spec=window_sets, mode=st.sampled_from(MODES))
def test_lut_equals_direct(hu: np.ndarray, spec: str, mode: str) -> None:
    got = apply_lut(hu, window_lut(spec, mode=mode))
    want = stack_windows(hu, spec, mode=mode, dtype=np.uint8)
    assert got.shape == want.shape and got.dtype == np.uint8
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


def test_lut_on_large_strided_volume() -> None:
    # Spans several gather chunks and starts from a non-contiguous view.
    rng = np.random.default_rng(1)
    vol = rng.integers(-2000, 4000, size=(3, 300, 600), dtype=np.int16)[:, :, ::2]
    np.testing.assert_array_equal(apply_lut(vol, window_lut()), stack_windows(vol))


def test_lut_accepts_foreign_tables() -> None:
    hu = np.arange(-100, 100, dtype=np.int16)
    lut = np.array(window_lut("brain,subdural,bone"))  # a plain writable copy
    np.testing.assert_array_equal(apply_lut(hu, lut), stack_windows(hu))


def test_compaction_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert window_mod._overlapping_store_ok()  # the fast path is the one other tests cover
    monkeypatch.setattr(window_mod, "_overlapping_store_ok", lambda: False)
    hu = np.arange(-2000, 2000, 4, dtype=np.int16).reshape(4, -1)
    np.testing.assert_array_equal(apply_lut(hu, window_lut()), stack_windows(hu))


def test_apply_lut_rejects_non_int16() -> None:
    with pytest.raises(TypeError, match="int16"):
        apply_lut(np.zeros(4, np.int32), window_lut())
    with pytest.raises(ValueError, match="65536"):
        apply_lut(np.zeros(4, np.int16), np.zeros((256, 3), np.uint8))
