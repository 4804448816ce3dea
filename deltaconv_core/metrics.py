"""How far apart two renders of one prompt are: PSNR, SSIM (Wang et al. 2004) and a difference heat map.

Images are [B, H, W, C] tensors (ComfyUI's IMAGE layout) with values in [0, data_range]; PSNR and SSIM give one
value per image. Half-precision inputs are computed in float32, float64 stays float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
# matplotlib's "inferno" at 11 evenly spaced points: ordered hues with monotonically rising luminance.
INFERNO = ("000004", "160b39", "420a68", "6a176e", "932667", "bc3754", "dd513a", "f37819", "fca50a", "f6d746",
           "fcffa4")


def _pair(a: torch.Tensor, b: torch.Tensor):
    if a.dim() != 4 or a.shape != b.shape:
        raise ValueError(f"need two [B, H, W, C] images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return a.to(dtype), b.to(dtype)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: 10·log10(range² / MSE); inf for identical images."""
    a, b = _pair(a, b)
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(data_range ** 2 / mse)  # mse = 0 divides to inf, and log10(inf) = inf


def ssim_window_size(height: int, width: int) -> int:
    """11, or for images smaller than that the largest odd size that fits (σ stays 1.5)."""
    size = min(SSIM_WINDOW, height, width)
    return size if size % 2 else size - 1


def _gaussian(size: int, dtype, device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    w = torch.exp(-x ** 2 / (2 * SSIM_SIGMA ** 2))
    return w / w.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean structural similarity per image, as Wang et al. 2004 define it.

    Local statistics under an 11×11 Gaussian window (σ = 1.5, see `ssim_window_size` for small images) at every
    position where the window lies inside the image (no padding, no downsampling); C1 = (0.01·range)²,
    C2 = (0.03·range)²; the SSIM map is computed per channel and averaged over channels and positions.
    """
    a, b = _pair(a, b)
    n, h, w, c = a.shape
    g = _gaussian(ssim_window_size(h, w), a.dtype, a.device)
    planes = torch.stack([a, b, a * a, b * b, a * b]).permute(0, 1, 4, 2, 3).reshape(5 * n * c, 1, h, w)
    local = F.conv2d(F.conv2d(planes, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))  # separable Gaussian, valid
    mu_a, mu_b, aa, bb, ab = local.view(5, n, c, *local.shape[-2:])
    var_a, var_b, cov = aa - mu_a * mu_a, bb - mu_b * mu_b, ab - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
    return index.mean(dim=(1, 2, 3))


def abs_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean absolute difference over the channels: [B, H, W]."""
    a, b = _pair(a, b)
    return (a - b).abs().mean(dim=-1)


def colormap(t: torch.Tensor) -> torch.Tensor:
    """Inferno colours [..., 3] in [0, 1] for values t in [0, 1] (linear between the anchor colours)."""
    anchors = torch.tensor([[int(h[i:i + 2], 16) / 255 for i in (0, 2, 4)] for h in INFERNO], dtype=t.dtype,
                           device=t.device)
    pos = t.clamp(0, 1) * (len(INFERNO) - 1)
    low = pos.floor().long().clamp(max=len(INFERNO) - 2)
    frac = (pos - low).unsqueeze(-1)
    return anchors[low] * (1 - frac) + anchors[low + 1] * frac


def difference_heatmap(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """[B, H, W, 3] image of `abs_difference` coloured from black (0) to pale yellow (`scale` and above).

    `scale` defaults to the largest difference in the batch, so the brightest pixel is the worst one; report it
    next to the image, or pass a fixed value to compare heat maps across runs.
    """
    d = abs_difference(a, b)
    scale = float(d.max()) if scale is None else float(scale)
    t = d / scale if scale > 0 else torch.zeros_like(d)
    return colormap(t).float()
