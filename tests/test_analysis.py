"""Attention-locality statistics on synthetic attention with known answers."""
import math

import pytest
import torch

from deltaconv_core.analysis import attention_probabilities, locality_stats, nearest_odd, video_locality_stats

GRID = (31, 27)


def queries(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(GRID[0], (n,), generator=g), torch.randint(GRID[1], (n,), generator=g)], 1)


def gaussian_maps(q, sigma):
    ys = torch.arange(GRID[0]).repeat_interleave(GRID[1]).double()
    xs = torch.arange(GRID[1]).repeat(GRID[0]).double()
    d2 = (ys[None] - q[:, :1]) ** 2 + (xs[None] - q[:, 1:]) ** 2
    m = torch.exp(-d2 / (2 * sigma ** 2))
    return m / m.sum(1, keepdim=True)


def expected_erf(sigma):
    """Smallest odd k whose window holds 80 % of a separable Gaussian: erf((r+½)/(σ√2))² ≥ 0.8."""
    r = 0
    while math.erf((r + 0.5) / (sigma * math.sqrt(2))) ** 2 < 0.8:
        r += 1
    return 2 * r + 1


@pytest.mark.parametrize("sigma", [0.6, 1.5, 3.0])
def test_gaussian_local_map(sigma):
    q = torch.tensor([[15, 13], [14, 12], [16, 14]])  # central queries: the window is not cut by the border
    stats = locality_stats(gaussian_maps(q, sigma), q, GRID)
    assert stats.erf == expected_erf(sigma)
    assert stats.uniform_fraction < 0.01
    assert stats.suggested_kernel == nearest_odd(0.6 * stats.erf)
    centre = stats.aligned_map[GRID[0] - 1, GRID[1] - 1]
    assert float(centre) == pytest.approx(float(stats.aligned_map.max()))  # re-centred on the query
    assert stats.mass_in_kernel(stats.erf) >= 0.8 > stats.mass_in_kernel(stats.erf - 2)


def test_uniform_map():
    q = queries()
    stats = locality_stats(torch.full((len(q), GRID[0] * GRID[1]), 1.0), q, GRID)
    assert stats.uniform_fraction == pytest.approx(1.0)
    assert stats.erf == 2 * (max(GRID) - 1) + 1  # no local part: the whole image
    assert float(stats.aligned_map.sum()) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_mix_of_local_and_uniform(alpha):
    q = torch.tensor([[15, 13], [14, 12]])
    n = GRID[0] * GRID[1]
    maps = (1 - alpha) * gaussian_maps(q, 1.5) + alpha / n
    stats = locality_stats(maps, q, GRID)
    assert stats.uniform_fraction == pytest.approx(alpha, abs=0.02)
    assert stats.erf == expected_erf(1.5)  # the local part's extent, unaffected by the uniform floor


@pytest.mark.parametrize("x, k", [(0.2, 1), (3.0, 3), (5.4, 5), (6.6, 7), (7.8, 7), (8.2, 9)])
def test_nearest_odd(x, k):
    assert nearest_odd(x) == k


def test_attention_probabilities_match_per_head_softmax():
    g = torch.Generator().manual_seed(3)
    q, k, heads = torch.randn(5, 12, generator=g), torch.randn(9, 12, generator=g), 3
    expected = torch.zeros(5, 9, dtype=torch.float64)
    for h in range(heads):  # plain per-head softmax(q·kᵀ/√d), float64
        qh, kh = q[:, 4 * h:4 * h + 4].double(), k[:, 4 * h:4 * h + 4].double()
        expected += torch.softmax(qh @ kh.T / 2.0, dim=-1) / heads
    got = attention_probabilities(q, k, heads)
    assert got.shape == (5, 9) and torch.allclose(got.double(), expected, atol=1e-6)
    assert torch.allclose(got.sum(dim=1), torch.ones(5))


# ------------------------------------------------------------------------------------------------ video grids
VIDEO = (9, 15, 13)  # frames × h × w


def separable_video_maps(q, sigma_t, sigma_s, uniform=0.0):
    """A Gaussian over frames times a Gaussian over pixels, around each query, plus a uniform share: [Q, T·H·W]."""
    t, y, x = (a.flatten().double() for a in torch.meshgrid(*(torch.arange(n) for n in VIDEO), indexing="ij"))
    d_t2 = (t[None] - q[:, :1]) ** 2
    d_s2 = (y[None] - q[:, 1:2]) ** 2 + (x[None] - q[:, 2:]) ** 2
    in_time = torch.exp(-d_t2 / (2 * sigma_t ** 2)) if sigma_t else (d_t2 == 0).double()
    m = in_time * torch.exp(-d_s2 / (2 * sigma_s ** 2))
    m = m / m.sum(1, keepdim=True)
    return (1 - uniform) * m + uniform / m.shape[1]


def expected_time_erf(sigma_t):
    """Smallest odd window of frames holding 80 % of a discrete Gaussian centred on the middle frame."""
    j = torch.arange(VIDEO[0]).double() - VIDEO[0] // 2
    g = torch.exp(-j ** 2 / (2 * sigma_t ** 2)) if sigma_t else (j == 0).double()
    g = g / g.sum()
    r = 0
    while float(g[j.abs() <= r].sum()) < 0.8 - 1e-9:
        r += 1
    return 2 * r + 1


CENTRAL = torch.tensor([[4, 7, 6], [4, 8, 7], [4, 6, 5]])  # middle frame, away from the borders


@pytest.mark.parametrize("sigma_t", [0, 0.8, 2.0])
@pytest.mark.parametrize("sigma_s", [0.6, 1.5])
def test_video_maps_read_space_and_time_apart(sigma_t, sigma_s):
    stats = video_locality_stats(separable_video_maps(CENTRAL, sigma_t, sigma_s), CENTRAL, VIDEO)
    assert stats.spatial.erf == expected_erf(sigma_s)  # the frames summed: the spatial Gaussian alone
    assert stats.spatial.suggested_kernel == nearest_odd(0.6 * stats.spatial.erf)
    assert stats.time_erf == stats.suggested_time_kernel == expected_time_erf(sigma_t)
    assert stats.mass_in_time_kernel(stats.time_erf) >= 0.8 - 1e-9
    if stats.time_erf > 1:
        assert stats.mass_in_time_kernel(stats.time_erf - 2) < 0.8
    # Separable: the box holds the product of what its two windows hold.
    k, kt = stats.spatial.erf, stats.time_erf
    assert stats.mass_in_box(k, kt) == pytest.approx(stats.spatial.mass_in_kernel(k) * stats.mass_in_time_kernel(kt),
                                                     abs=1e-5)
    aligned = stats.spatial.aligned_map
    assert aligned.shape == (2 * VIDEO[1] - 1, 2 * VIDEO[2] - 1)
    assert float(aligned[VIDEO[1] - 1, VIDEO[2] - 1]) == pytest.approx(float(aligned.max()))


def test_video_attention_spread_over_every_frame():
    """Local in space, uniform over time: the time window is the whole clip, the spatial one unchanged."""
    maps = separable_video_maps(CENTRAL, 1e6, 1.0)
    stats = video_locality_stats(maps, CENTRAL, VIDEO)
    assert stats.time_erf == VIDEO[0]  # central queries: 80 % of 9 equal frames needs all 9 (7 hold 78 %)
    assert stats.spatial.erf == expected_erf(1.0)
    assert stats.mass_in_box(99, 99) == pytest.approx(1.0)


def test_video_uniform_share_does_not_widen_the_windows():
    plain = video_locality_stats(separable_video_maps(CENTRAL, 0.8, 1.5), CENTRAL, VIDEO)
    mixed = video_locality_stats(separable_video_maps(CENTRAL, 0.8, 1.5, uniform=0.4), CENTRAL, VIDEO)
    assert mixed.spatial.uniform_fraction == pytest.approx(0.4, abs=0.02) and plain.spatial.uniform_fraction < 0.01
    assert (mixed.spatial.erf, mixed.time_erf) == (plain.spatial.erf, plain.time_erf)
