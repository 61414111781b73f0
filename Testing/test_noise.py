"""Noise statistics: blobs inside the organ mask, sign follows direction, size grows with sigma,
fewer blobs with a higher threshold; the ablation noises have unit variance."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from synomaly.method.noise import NOISE_FUNCTIONS, blob_mask, make_noise, synomaly_noise


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_blobs_stay_inside_organ_mask():
    organ = torch.zeros(16, 1, 64, 64, dtype=torch.bool)
    organ[:, :, 16:48, 16:48] = True
    g = _gen()
    noise = synomaly_noise((16, 1, 64, 64), sigma=3, threshold=150, offset=1.0, organ_mask=organ, generator=g)
    g = _gen()
    base = torch.randn((16, 1, 64, 64), generator=g)
    offsets = noise - base
    assert offsets[~organ].abs().max() == 0
    assert (offsets[organ].abs() > 0).any()


@pytest.mark.parametrize("direction,sign", [(1, 1.0), (-1, -1.0)])
def test_offset_sign_follows_direction(direction, sign):
    g = _gen(1)
    noise = synomaly_noise((8, 1, 64, 64), threshold=150, offset=0.5, direction=direction, generator=g)
    base = torch.randn((8, 1, 64, 64), generator=_gen(1))
    offsets = (noise - base)[(noise - base) != 0]
    assert offsets.numel() > 0
    assert torch.all(torch.sign(offsets) == sign)
    assert offsets.abs().min() >= 0.5 - 1e-6 and offsets.abs().max() <= 1.5 + 1e-6


def test_direction_list_gives_both_signs():
    noise = synomaly_noise((64, 1, 32, 32), threshold=140, direction=[1, -1], generator=_gen(2))
    base = torch.randn((64, 1, 32, 32), generator=_gen(2))
    per_image = (noise - base).flatten(1).sum(1)
    assert (per_image > 0).any() and (per_image < 0).any()


def _mean_blob_size(sigma, threshold, n=32):
    g = torch.randn((n, 1, 128, 128), generator=_gen(3))
    mask = blob_mask(g, sigma, threshold)[:, 0].numpy()
    sizes, counts = [], []
    for m in mask:
        labels, k = ndimage.label(m)
        counts.append(k)
        if k:
            sizes.extend(np.bincount(labels.ravel())[1:].tolist())
    return float(np.mean(sizes)), float(np.mean(counts))


def test_blob_size_grows_with_sigma():
    small, _ = _mean_blob_size(2, 170)
    large, _ = _mean_blob_size(6, 170)
    assert large > 2 * small


def test_higher_threshold_gives_fewer_blob_pixels():
    g = torch.randn((16, 1, 128, 128), generator=_gen(4))
    low = blob_mask(g, 3, 150).float().mean()
    high = blob_mask(g, 3, 190).float().mean()
    assert high < low / 2


def test_same_generator_seed_reproduces_noise():
    a = synomaly_noise((2, 1, 32, 32), generator=_gen(7))
    b = synomaly_noise((2, 1, 32, 32), generator=_gen(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", sorted(set(NOISE_FUNCTIONS) - {"synomaly"}))
def test_ablation_noises_unit_variance(kind):
    x = make_noise(kind, (4, 1, 64, 64), generator=_gen(5))
    assert x.shape == (4, 1, 64, 64)
    assert abs(float(x.std()) - 1.0) < 0.15
    assert abs(float(x.mean())) < 0.3


def test_unknown_noise_and_bad_direction_are_rejected():
    with pytest.raises(ValueError, match="unknown noise"):
        make_noise("pink", (1, 1, 8, 8))
    with pytest.raises(ValueError, match="direction"):
        synomaly_noise((1, 1, 8, 8), direction=2)


@pytest.mark.parametrize("shape, sigma", [((4, 1, 64, 64), 3.0), ((2, 2, 48, 80), 7.0), ((2, 1, 5, 40), 1.5)])
def test_blur_by_matrices_equals_the_padded_convolution(shape, sigma):
    """The matrix form (fast on CPUs) sums exactly what the reflect-padded separable convolution sums;
    images smaller than the kernel repeat their edge instead."""
    import torch.nn.functional as F

    from synomaly.method.noise import gaussian_blur2d, gaussian_kernel1d

    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    k = gaussian_kernel1d(sigma)
    r = k.numel() // 2
    mode = "reflect" if min(shape[-2:]) > r else "replicate"
    y = x.reshape(-1, 1, *shape[-2:])
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1)).reshape(shape)
    assert torch.allclose(gaussian_blur2d(x, sigma), y, atol=1e-6)


def test_neighbouring_slices_share_their_blobs_but_not_their_gaussian_noise():
    """2.5D training: the synthetic lesion spans the slice and its neighbours, as a real one does."""
    shape = (6, 3, 48, 48)
    noise = synomaly_noise(shape, threshold=150.0, generator=torch.Generator().manual_seed(3))
    gaussian = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    offsets = noise - gaussian
    assert (offsets.abs() > 0.1).any()
    assert torch.allclose(offsets[:, 0], offsets[:, 1], atol=1e-6)
    assert torch.allclose(offsets[:, 2], offsets[:, 1], atol=1e-6)
    assert not torch.allclose(gaussian[:, 0], gaussian[:, 1])
    one = synomaly_noise((6, 1, 48, 48), threshold=150.0, generator=torch.Generator().manual_seed(3))
    single = torch.randn((6, 1, 48, 48), generator=torch.Generator().manual_seed(3))
    assert (one - single).abs().max() > 0.1  # one channel: blobs from that channel, as before
