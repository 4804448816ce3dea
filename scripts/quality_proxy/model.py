"""A small pixel-space diffusion UNet with self-attention, the teacher of the quality proxy.

Its self-attention modules follow ComfyUI's `attn1` interface (to_q/to_k/to_v/to_out, forward(x, context, value,
mask, transformer_options) with `activations_shape` in the options), so the pack's own StudentSelfAttention
wrapper replaces them exactly as it does inside ComfyUI; like ComfyUI, the step's σ reaches them as
`transformer_options["sigmas"]` (the wrappers' σ range and mediator counts read it). EDM preconditioning (Karras
et al. 2022): the network sees c_in·x_t and ln(σ)/4 and predicts x̂_0 = c_skip·x_t + c_out·F, with x_t = x_0 + σ·ε
as the distiller expects.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltaconv_core.analysis import attention_probabilities

SIGMA_DATA = 0.5


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim // heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def _split(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x, context=None, value=None, mask=None, transformer_options=None):
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(x)), self._split(self.to_v(x))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(y.transpose(1, 2).reshape(x.shape))

    def probabilities(self, x, queries: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention of the query tokens `queries` of image 0 over all its tokens: [Q, N]."""
        return attention_probabilities(self.to_q(x[0, queries]), self.to_k(x[0]), self.heads)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + MLP on the pixels of a [B, C, H, W] map, or of a whole [B, C, T, H, W] clip (no
    cross-attention: unconditional)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, sigmas=None):
        """x: [B, C, H, W], or a video [B, C, T, H, W] (tokens in frame, row, column order: one 3-D attention)."""
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn1(self.norm1(t), transformer_options={"activations_shape": list(x.shape), "sigmas": sigmas})
        t = t + self.ff(self.norm2(t))  # norm2's input is the residual stream right after attn1 (stage B's tap)
        return t.transpose(1, 2).reshape(x.shape)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class TinyUNet(nn.Module):
    """32×32 RGB, patchified 2×2 (like a latent space: 16×16×12) → 16×16 → 8×8 → back.

    Self-attention at 16×16 (down and up) and 8×8 (down and up): 4 sites, the finest at 256 tokens."""

    def __init__(self, width: int = 32, heads: int = 2, emb_dim: int = 128):
        super().__init__()
        c0, c1 = width, 2 * width
        self.freqs = nn.Buffer(torch.exp(torch.linspace(0, math.log(1000), emb_dim // 4)), persistent=False)
        self.embed = nn.Sequential(nn.Linear(emb_dim // 2, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(12, c0, 3, padding=1)
        self.down0, self.down0_attn = ResBlock(c0, c0, emb_dim), TransformerBlock(c0, heads)
        self.pool = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.down1, self.down1_attn = ResBlock(c0, c1, emb_dim), TransformerBlock(c1, heads)
        self.mid = ResBlock(c1, c1, emb_dim)
        self.up1, self.up1_attn = ResBlock(2 * c1, c1, emb_dim), TransformerBlock(c1, heads)
        self.up0, self.up0_attn = ResBlock(c1 + c0, c0, emb_dim), TransformerBlock(c0, heads)
        self.norm_out, self.conv_out = nn.GroupNorm(8, c0), nn.Conv2d(c0, 12, 3, padding=1)

    def forward(self, x, c_noise, sigmas=None):
        angles = c_noise[:, None] * self.freqs[None]
        emb = self.embed(torch.cat([angles.sin(), angles.cos()], dim=1))
        h0 = self.down0_attn(self.down0(self.conv_in(F.pixel_unshuffle(x, 2)), emb), sigmas)
        h1 = self.down1_attn(self.down1(self.pool(h0), emb), sigmas)
        h = self.up1_attn(self.up1(torch.cat([self.mid(h1, emb), h1], dim=1), emb), sigmas)
        h = self.up0_attn(self.up0(torch.cat([F.interpolate(h, scale_factor=2.0), h0], dim=1), emb), sigmas)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), 2)


def attention_blocks(unet: TinyUNet) -> dict[str, TransformerBlock]:
    return {"down0_attn": unet.down0_attn, "down1_attn": unet.down1_attn, "up1_attn": unet.up1_attn,
            "up0_attn": unet.up0_attn}


def denoise(unet: TinyUNet, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """EDM-preconditioned x̂_0 for x_t = x_0 + σ·ε (images [B, C, H, W] or videos [B, C, T, H, W])."""
    s = sigma.view(-1, *[1] * (x_t.dim() - 1))
    total = s ** 2 + SIGMA_DATA ** 2
    c_skip, c_out, c_in = SIGMA_DATA ** 2 / total, s * SIGMA_DATA / total.sqrt(), 1 / total.sqrt()
    return c_skip * x_t + c_out * unet(c_in * x_t, sigma.log() / 4, sigma)


def edm_loss(unet: TinyUNet, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """EDM training loss: ln σ ~ N(-1.2, 1.2²), weight (σ² + σ_d²)/(σ·σ_d)²."""
    n = x0.shape[0]
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(n, generator=generator))
    noise = torch.randn(x0.shape, generator=generator)
    weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
    err = (denoise(unet, x0 + sigma.view(-1, *[1] * (x0.dim() - 1)) * noise, sigma) - x0) ** 2
    return (weight * err.mean(dim=tuple(range(1, err.dim())))).mean()


SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def karras_sigmas(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def percent_to_sigma(percent: float) -> float:
    """σ at a fraction of sampling progress on the sampler's Karras ramp (0 → σ_max, 1 → σ_min): this model's
    counterpart of ComfyUI's model_sampling.percent_to_sigma, which mediator schedules are resolved with."""
    return (SIGMA_MAX ** (1 / RHO) + percent * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO


@torch.no_grad()
def sample_euler(denoiser, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Deterministic Euler (probability-flow ODE) sampling from `noise` (unit variance); `denoiser(x, σ) → x̂_0`."""
    sigmas = karras_sigmas(steps)
    x = noise * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = denoiser(x, s.expand(x.shape[0]))
        x = x + (s_next - s) * (x - x0) / s
    return x
