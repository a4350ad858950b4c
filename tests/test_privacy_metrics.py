"""privacy.metrics: each metric's definition, on tiny images."""

from __future__ import annotations

import math

import numpy as np
import pytest
from freshkit import imported_after

from privacy.errors import GuardError
from privacy.metrics import EmbeddingDistance, PixelRMSE, ShiftFlipDistance, check_images


def _smooth(rng: np.random.Generator, size: int = 16) -> np.ndarray:
    img = rng.random((size // 4, size // 4))
    return np.kron(img, np.ones((4, 4))).astype(np.float32)


def _shift_fill(img: np.ndarray, dy: int, dx: int, fill: float) -> np.ndarray:
    out = np.full_like(img, fill)
    h, w = img.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_pixel_rmse_is_root_mean_square_difference() -> None:
    a = np.zeros((8, 8), dtype=np.float32)
    b = np.full((8, 8), 0.5, dtype=np.float32)
    assert PixelRMSE().distance(a, b) == pytest.approx(0.5, abs=1e-12)
    b[0, 0] = 1.0
    expected = math.sqrt((63 * 0.25 + 1.0) / 64)
    assert PixelRMSE().distance(a, b) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("dy,dx", [(1, 0), (0, -3), (4, 4), (-4, 2), (-2, -4)])
@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_shifted_copy_is_at_shift_flip_distance_zero_whatever_the_fill(
    dy: int, dx: int, fill: float
) -> None:
    img = _smooth(np.random.default_rng(1))
    moved = _shift_fill(img, dy, dx, fill)
    assert ShiftFlipDistance(4).distance(moved, img) == 0.0
    assert PixelRMSE().distance(moved, img) > 0.05


def test_mirrored_and_shifted_copy_is_at_shift_flip_distance_zero() -> None:
    img = _smooth(np.random.default_rng(2))
    copy = _shift_fill(img[:, ::-1], 2, -1, 0.0)
    assert ShiftFlipDistance(4).distance(copy, img) == 0.0
    assert ShiftFlipDistance(4, mirror=False).distance(copy, img) > 0.05


def test_rotated_copy_is_nearer_with_rotation_variants() -> None:
    from privacy.metrics import rotate_images

    img = np.kron(np.random.default_rng(4).random((8, 8)), np.ones((4, 4))).astype(np.float32)
    turned = rotate_images(img[None], 4.0)[0]
    plain = ShiftFlipDistance(2).distance(turned, img)
    with_rotations = ShiftFlipDistance(2, rotations_deg=[-4.0, 4.0]).distance(turned, img)
    assert with_rotations < 0.5 * plain


def test_shift_beyond_the_maximum_is_not_forgiven() -> None:
    img = np.random.default_rng(3).random((16, 16)).astype(np.float32)
    moved = _shift_fill(img, 0, 3, 0.0)
    assert ShiftFlipDistance(2).distance(moved, img) > 0.1


def test_shift_flip_variants_start_with_the_identity_and_count_both_mirrors() -> None:
    metric = ShiftFlipDistance(2)
    assert metric.transforms()[0] == (False, 0.0, 0, 0)
    assert metric.n_variants() == 2 * 5 * 5
    assert ShiftFlipDistance(2, rotations_deg=[-3, 3]).n_variants() == 2 * 3 * 5 * 5
    img = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    variants = metric.query_variants(img)
    assert variants.shape == (1, 50, 16)
    np.testing.assert_array_equal(variants[0, 0], metric.reference_features(img)[0])


def test_shift_flip_refuses_images_smaller_than_twice_the_shift() -> None:
    with pytest.raises(GuardError, match="too small"):
        ShiftFlipDistance(4).reference_features(np.zeros((1, 8, 8), dtype=np.float32))


def test_embedding_distance_is_between_renormalised_embeddings() -> None:
    def embed(images: np.ndarray) -> np.ndarray:
        # Unnormalised on purpose: the metric renormalises.
        return np.stack([images.mean(axis=(1, 2)) + 1.0, images[:, 0, 0] * 0 + 1.0], axis=1)

    metric = EmbeddingDistance(embed)
    a = np.zeros((4, 4), dtype=np.float32)
    b = np.ones((4, 4), dtype=np.float32)
    # embeddings (1, 1) and (2, 1) normalised: angle between them.
    u = np.array([1.0, 1.0]) / math.sqrt(2)
    v = np.array([2.0, 1.0]) / math.sqrt(5)
    assert metric.distance(a, b) == pytest.approx(float(np.linalg.norm(u - v)), abs=1e-12)
    assert metric.distance(a, a) == 0.0


def test_images_with_nan_are_refused() -> None:
    bad = np.zeros((1, 4, 4), dtype=np.float32)
    bad[0, 1, 1] = np.nan
    with pytest.raises(GuardError, match="NaN"):
        check_images(bad)
    with pytest.raises(GuardError, match="shape"):
        check_images(np.zeros((2, 2, 2, 2)))


def test_recontrasted_copy_is_at_distance_zero_under_contrast_rmse() -> None:
    from privacy.metrics import ContrastRMSE, PixelRMSE

    rng = np.random.default_rng(3)
    real = rng.uniform(0.0, 1.0, size=(1, 16, 16)).astype(np.float32)
    for factor in (0.9, 0.95, 1.07, 1.1):
        copy = (real * factor).astype(np.float32)
        assert ContrastRMSE().distance(copy, real) < 1e-6
        assert PixelRMSE().distance(copy, real) > 0.01
    other = rng.uniform(0.0, 1.0, size=(1, 16, 16)).astype(np.float32)
    assert ContrastRMSE().distance(other, real) > 0.1


@pytest.mark.parametrize("shape", [(64, 64), (33, 20), (5, 7)])
@pytest.mark.parametrize("degrees", [3.5, -3.5, 10.0, 45.0, 0.0, -90.0, 1.2345])
@pytest.mark.parametrize("keep_table", [True, False])
def test_rotate_images_is_scipys_bilinear_rotation(
    shape: tuple[int, int], degrees: float, keep_table: bool
) -> None:
    from scipy import ndimage

    from privacy.metrics import rotate_images

    x = np.random.default_rng(7).random((3, *shape)).astype(np.float32) * 1000.0
    want = ndimage.rotate(x, degrees, axes=(2, 1), reshape=False, order=1, mode="nearest")
    got = rotate_images(x, degrees, keep_table=keep_table)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1000.0 * 4e-7)


def test_rotation_canary_is_scipys_rotation_of_the_slice() -> None:
    from scipy import ndimage

    from privacy.canaries import _rotate

    image = np.random.default_rng(3).random((40, 40)).astype(np.float32)
    want = ndimage.rotate(image, -4.2, reshape=False, order=1, mode="nearest")
    np.testing.assert_allclose(_rotate(image, -4.2), want, rtol=0, atol=4e-7)


def test_guard_metrics_and_canaries_do_not_import_scipy_ndimage() -> None:
    """scipy.ndimage costs a third of a second to import: a screen run (no generator, no MONAI
    to import it anyway) must not pay it."""
    code = (
        "import numpy as np\n"
        "from privacy.canaries import make_canaries\n"
        "from privacy.metrics import rotate_images\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.random((8, 24, 24)).astype(np.float32)\n"
        "make_canaries(x, 2, rng); rotate_images(x, 3.0)\n"
    )
    assert imported_after(code, ("scipy.ndimage",)) == []


def test_guard_refuses_to_be_built_or_used_without_what_its_promise_needs() -> None:
    from privacy.guard import Guard

    ref = np.random.default_rng(3).random((6, 16, 16)).astype(np.float32)
    pixel, shift = PixelRMSE(), ShiftFlipDistance(2)
    ok = {"pixel_rmse": 0.1, "shift_flip": 0.1}
    cases = [
        (([], ref, ok), "the guard needs at least one metric"),
        (([pixel, PixelRMSE()], ref, ok), "duplicate metrics"),
        (([pixel, shift], ref, {"pixel_rmse": 0.1}), "no threshold for ['shift_flip']"),
        (([pixel], ref, {"pixel_rmse": 0.0}), "threshold of pixel_rmse must be > 0"),
        (([pixel], ref, {"pixel_rmse": float("nan")}), "threshold of pixel_rmse must be > 0"),
        (([pixel], ref[:0], ok), "reference must be [N, H, W], N > 0"),
        (([pixel], ref[0], ok), "reference must be [N, H, W], N > 0"),
    ]
    for args, message in cases:
        with pytest.raises(GuardError) as err:
            Guard(*args)  # type: ignore[arg-type]
        assert err.value.what.startswith(message), (message, err.value.what)
    with pytest.raises(GuardError, match="workers must be >= 1"):
        Guard([pixel], ref, ok, workers=0)
    # The factory supplies the costly features (the embedding's, kept between runs).
    emb = EmbeddingDistance(lambda x: x.reshape(len(x), -1)[:, :8], {"encoder_sha256": "0" * 64})
    with pytest.raises(GuardError, match="features of embedding do not match the reference"):
        Guard([pixel, emb], ref, {**ok, "embedding": 0.1},
              features_factory=lambda m, r: np.zeros((2, 8)))
    guard = Guard([pixel, shift], ref, ok)
    with pytest.raises(GuardError, match=r"candidates are \(8, 8\), the reference is \(16, 16\)"):
        guard.screen(np.zeros((1, 8, 8), np.float32))


def test_an_images_embedding_does_not_depend_on_the_batch_it_is_embedded_in() -> None:
    # The CPU convolutions choose their algorithm by batch shape; the embedder runs every
    # forward pass on EMBED_BATCH images (padded), so an image's embedding is the same alone,
    # among others, at any place in a batch and with any thread count. Before, batches of 3 or
    # 70 gave it differences of up to 9e-8, enough to move a slice across a threshold that
    # its own distance had set.
    import torch

    from privacy.encoder import EMBED_BATCH, EncoderConfig, make_embedder, train_encoder

    rng = np.random.default_rng(0)
    images = rng.random((150, 64, 64), dtype=np.float32)
    config = EncoderConfig(image_size=64, steps=0)
    state, _ = train_encoder(images[:8], config)
    embed = make_embedder(state, config)
    alone = embed(images[:1])[0]
    for batch in (images[:3], images[:70], images[:EMBED_BATCH], images[:150]):
        np.testing.assert_array_equal(embed(batch)[0], alone)
    elsewhere = np.concatenate([images[100:133], images[:1], images[50:60]])
    np.testing.assert_array_equal(embed(elsewhere)[33], alone)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        np.testing.assert_array_equal(embed(images[:3])[0], alone)
    finally:
        torch.set_num_threads(threads)
    # Unit vectors, one per image, whatever the padding.
    out = embed(images[:70])
    assert out.shape == (70, config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
