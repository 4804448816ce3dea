"""PSNR, SSIM and the difference heat map against a plain float64 reference and known answers."""
import math

import numpy as np
import pytest
import torch

from deltaconv_core.metrics import INFERNO, abs_difference, colormap, difference_heatmap, psnr, ssim, ssim_window_size


def reference_ssim(a: np.ndarray, b: np.ndarray, data_range=1.0) -> float:
    """Wang et al. 2004 written out: Gaussian-weighted statistics of every window inside one [H, W, C] image."""
    h, w, c = a.shape
    k = min(11, h, w)
    k -= 1 - k % 2
    x = np.arange(k) - (k - 1) / 2
    g = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for ch in range(c):
        for i in range(h - k + 1):
            for j in range(w - k + 1):
                pa, pb = a[i:i + k, j:j + k, ch], b[i:i + k, j:j + k, ch]
                ma, mb = (g * pa).sum(), (g * pb).sum()
                va, vb = (g * (pa - ma) ** 2).sum(), (g * (pb - mb) ** 2).sum()
                cov = (g * (pa - ma) * (pb - mb)).sum()
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def reference_psnr(a: np.ndarray, b: np.ndarray, data_range=1.0) -> float:
    return 10 * math.log10(data_range ** 2 / float(((a - b) ** 2).mean()))


def images(shape, seed, noise=0.1):
    """A smooth random image and a noisy copy of it, both in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(shape[0], shape[1] // 4 + 1, shape[2] // 4 + 1, shape[3], generator=g)
    base = torch.nn.functional.interpolate(base.permute(0, 3, 1, 2), size=shape[1:3], mode="bilinear")
    a = base.permute(0, 2, 3, 1).contiguous()
    b = (a + noise * torch.randn(shape, generator=g)).clamp(0, 1)
    return a, b


@pytest.mark.parametrize("shape", [(2, 24, 31, 3), (1, 16, 16, 1), (1, 9, 20, 3), (1, 6, 7, 3)])
def test_ssim_and_psnr_match_reference(shape):
    a, b = images(shape, seed=sum(shape))
    got_ssim, got_psnr = ssim(a, b), psnr(a, b)
    assert got_ssim.shape == got_psnr.shape == (shape[0],)
    for i in range(shape[0]):
        ra, rb = a[i].double().numpy(), b[i].double().numpy()
        assert got_ssim[i].item() == pytest.approx(reference_ssim(ra, rb), abs=2e-5)
        assert got_psnr[i].item() == pytest.approx(reference_psnr(ra, rb), abs=1e-4)


def test_float64_inputs_match_reference_closely():
    a, b = images((1, 14, 15, 3), seed=3)
    a, b = a.double(), b.double()
    assert ssim(a, b).dtype == torch.float64
    assert ssim(a, b).item() == pytest.approx(reference_ssim(a[0].numpy(), b[0].numpy()), abs=1e-12)


def test_data_range():
    a, b = images((1, 20, 20, 3), seed=4)
    assert ssim(a * 255, b * 255, data_range=255).item() == pytest.approx(ssim(a, b).item(), abs=1e-5)
    assert psnr(a * 255, b * 255, data_range=255).item() == pytest.approx(psnr(a, b).item(), abs=1e-4)


def test_small_image_window():
    assert ssim_window_size(64, 64) == 11 and ssim_window_size(10, 64) == 9 and ssim_window_size(7, 8) == 7
    assert ssim_window_size(1, 5) == 1
    a, b = images((1, 1, 5, 3), seed=5)
    assert torch.isfinite(ssim(a, b)).all()


def test_identical_images():
    a, _ = images((2, 32, 32, 3), seed=6)
    assert torch.isinf(psnr(a, a.clone())).all() and (psnr(a, a) > 0).all()
    assert torch.equal(ssim(a, a.clone()), torch.ones(2))
    assert torch.equal(difference_heatmap(a, a), colormap(torch.zeros(2, 32, 32)))  # black, no division by 0


@pytest.mark.parametrize("d", [0.5, 0.1, 0.01])
def test_psnr_of_constant_offset(d):
    a = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(7)) * 0.4
    assert psnr(a, a + d).item() == pytest.approx(20 * math.log10(1 / d), abs=1e-3)


def test_ssim_symmetric_and_decreasing_with_noise():
    a, b = images((2, 32, 32, 3), seed=8)
    assert torch.allclose(ssim(a, b), ssim(b, a), atol=1e-6)
    scores = [ssim(*images((2, 32, 32, 3), seed=9, noise=n)) for n in (0.01, 0.05, 0.2, 0.5)]
    assert all((x > y).all() for x, y in zip(scores, scores[1:]))
    assert (scores[0] < 1).all() and (scores[-1] > -1).all()


def test_shape_mismatch_refused():
    with pytest.raises(ValueError, match="one shape"):
        ssim(torch.rand(1, 8, 8, 3), torch.rand(1, 8, 9, 3))


def test_heatmap_scale_and_colours():
    a = torch.zeros(1, 4, 4, 3)
    b = a.clone()
    b[0, 0, 0] = 0.6  # the worst pixel
    b[0, 1, 1] = 0.3  # half as bad
    heat = difference_heatmap(a, b)
    assert heat.shape == (1, 4, 4, 3) and heat.dtype == torch.float32
    top = torch.tensor([int(INFERNO[-1][i:i + 2], 16) / 255 for i in (0, 2, 4)])
    assert torch.allclose(heat[0, 0, 0], top) and torch.allclose(heat[0, 1, 1], colormap(torch.tensor(0.5)))
    assert torch.allclose(heat[0, 2, 2], colormap(torch.tensor(0.0)))
    # a fixed scale: 0.6 on a 1.2 scale is the middle colour; beyond the scale saturates
    assert torch.allclose(difference_heatmap(a, b, scale=1.2)[0, 0, 0], colormap(torch.tensor(0.5)))
    assert torch.allclose(difference_heatmap(a, b, scale=0.3)[0, 0, 0], top)
    assert abs_difference(a, b)[0, 0, 0].item() == pytest.approx(0.6)


def test_colormap_luminance_rises():
    rgb = colormap(torch.linspace(0, 1, 101))
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    luminance = lin @ torch.tensor([0.2126, 0.7152, 0.0722])
    assert (luminance[1:] > luminance[:-1]).all()
