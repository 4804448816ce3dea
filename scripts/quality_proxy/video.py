"""The video quality proxy's data and teacher: synthetic clips of moving shapes, and a small video UNet whose only
path between frames is full 3-D self-attention.

Clips are [B, 3, T, H, W] in [-1, 1], drawn from a generator (the same seed, the same clips): a background of two
coloured sinusoidal gratings panning slowly, and a few striped shapes (squares, triangles, ellipses) that translate
and rotate at their own constant velocities, composited with anti-aliased edges. The stripes make rotation visible
on every shape.

The teacher reuses the image proxy's pieces (model.py): ResBlocks run per frame, so that frames meet only in the
TransformerBlocks' self-attention over all t·h·w tokens of the clip, whose attn1 the pack's wrappers replace. A
learned per-frame embedding added at the input tells every token its frame (positions within a frame come from the
convolutions, as in the image proxy).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltaconv_core.families.base import GRID_UNKNOWN, TOKENS_REARRANGED

from .model import ResBlock, TransformerBlock

SHAPES = ("square", "triangle", "ellipse")


def _uniform(generator, n: int, *shape, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, *shape, generator=generator)


def _shape_distance(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Distance-like field in the shape's own frame (u, v in units of its radius): < 1 inside, growing like the
    distance in radii outside. kind [N] indexes SHAPES; u, v [N, T, H, W]."""
    square = torch.maximum(u.abs(), v.abs()) / 0.8
    # A regular triangle: the largest projection on its three edge normals, over its apothem (half the radius).
    normals = [math.pi / 2 + 2 * math.pi * i / 3 for i in range(3)]
    triangle = torch.stack([u * math.cos(a) + v * math.sin(a) for a in normals]).amax(dim=0) / 0.5
    ellipse = torch.sqrt(u ** 2 + (v / 0.55) ** 2)  # elongated, so its rotation shows in its outline
    k = kind.view(-1, 1, 1, 1)
    return torch.where(k == 0, square, torch.where(k == 1, triangle, ellipse))


def synthetic_clips(n: int, frames: int, size: int, objects: int, generator: torch.Generator) -> torch.Tensor:
    """n clips [n, 3, frames, size, size] in [-1, 1]: panning gratings and `objects` striped shapes moving and
    rotating at constant velocities (pixels and radians per frame). Deterministic given the generator's state."""
    g = generator
    t = torch.arange(frames, dtype=torch.float32).view(1, frames, 1, 1)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    ys, xs = ys[None, None], xs[None, None]  # [1, 1, H, W]

    def col(value):  # a per-clip value [n], broadcast over [n, T, H, W]
        return value.view(n, 1, 1, 1)

    clip = _uniform(g, n, 3, low=-0.5, high=0.5).view(n, 3, 1, 1, 1).expand(n, 3, frames, size, size).clone()
    pan = _uniform(g, n, 2, low=-0.5, high=0.5)  # the background drifts slowly (pixels per frame)
    for _ in range(2):  # two gratings, periods of 4 to 12 pixels
        angle = _uniform(g, n, high=math.pi)
        period = _uniform(g, n, low=4.0, high=12.0)
        phase = _uniform(g, n, high=2 * math.pi)
        colour = _uniform(g, n, 3, low=-0.3, high=0.3).view(n, 3, 1, 1, 1)
        along = ((xs - col(pan[:, 0]) * t) * col(torch.cos(angle)) + (ys - col(pan[:, 1]) * t) * col(torch.sin(angle)))
        clip = clip + colour * torch.sin(2 * math.pi * along / col(period) + col(phase))[:, None]
    for _ in range(objects):
        kind = torch.randint(len(SHAPES), (n,), generator=g)
        radius = _uniform(g, n, low=0.18 * size, high=0.32 * size)
        start = _uniform(g, n, 2, low=0.2 * size, high=0.8 * size)
        velocity = _uniform(g, n, 2, low=-1.0, high=1.0) * (size / 16)
        angle0, spin = _uniform(g, n, high=2 * math.pi), _uniform(g, n, low=-0.4, high=0.4)
        stripes, ground = (_uniform(g, n, 3, low=-1.0, high=1.0).view(n, 3, 1, 1, 1) for _ in range(2))
        dx = xs - (col(start[:, 0]) + col(velocity[:, 0]) * t)
        dy = ys - (col(start[:, 1]) + col(velocity[:, 1]) * t)
        a = col(angle0) + col(spin) * t
        u = (dx * torch.cos(a) + dy * torch.sin(a)) / col(radius)
        v = (-dx * torch.sin(a) + dy * torch.cos(a)) / col(radius)
        # Anti-aliased edge: coverage falls from 1 to 0 over about one pixel across the outline.
        alpha = ((1 - _shape_distance(kind, u, v)) * col(radius) + 0.5).clamp(0, 1)[:, None]
        stripe = (0.5 + 0.5 * (3 * torch.sin(2 * math.pi * u / 1.2)).clamp(-1, 1))[:, None]
        clip = clip * (1 - alpha) + alpha * (stripes * stripe + ground * (1 - stripe))
    return clip.clamp(-1, 1)


def video_grid(x_shape: torch.Size, call: dict) -> tuple[int, int, int] | str:
    """The wrappers' token grid of one attn1 call of the video teacher: (t, h, w) from activations_shape
    [B, C, T, H, W], as the family adapters' token_grid reads an image call's (h, w) from [B, C, H, W]."""
    shape = (call.get("transformer_options") or {}).get("activations_shape")
    if shape is None or len(shape) != 5:
        return GRID_UNKNOWN
    grid = tuple(int(n) for n in shape[2:])
    return grid if shape[0] == x_shape[0] and math.prod(grid) == x_shape[1] else TOKENS_REARRANGED


class TinyVideoUNet(nn.Module):
    """T frames of size×size RGB, each patchified 2×2 (12 channels), then the image proxy's two levels per frame
    (frames of size/2 and size/4) with a 3-D self-attention over the whole clip at each: 4 sites (down and up at
    both levels), the finest on frames·(size/2)² tokens. Same topology and site names as TinyUNet."""

    def __init__(self, width: int = 32, heads: int = 2, emb_dim: int = 128, frames: int = 8):
        super().__init__()
        c0, c1 = width, 2 * width
        self.freqs = nn.Buffer(torch.exp(torch.linspace(0, math.log(1000), emb_dim // 4)), persistent=False)
        self.embed = nn.Sequential(nn.Linear(emb_dim // 2, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(12, c0, 3, padding=1)
        self.frame_embedding = nn.Parameter(0.1 * torch.randn(frames, c0))
        self.down0, self.down0_attn = ResBlock(c0, c0, emb_dim), TransformerBlock(c0, heads)
        self.pool = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.down1, self.down1_attn = ResBlock(c0, c1, emb_dim), TransformerBlock(c1, heads)
        self.mid = ResBlock(c1, c1, emb_dim)
        self.up1, self.up1_attn = ResBlock(2 * c1, c1, emb_dim), TransformerBlock(c1, heads)
        self.up0, self.up0_attn = ResBlock(c1 + c0, c0, emb_dim), TransformerBlock(c0, heads)
        self.norm_out, self.conv_out = nn.GroupNorm(8, c0), nn.Conv2d(c0, 12, 3, padding=1)

    @staticmethod
    def _clip_attention(block: TransformerBlock, h: torch.Tensor, batch: int, sigmas) -> torch.Tensor:
        """A TransformerBlock on the clip: frames [B·T, C, h, w] → [B, C, T, h, w] → back."""
        bt, c, hh, ww = h.shape
        clip = h.view(batch, bt // batch, c, hh, ww).transpose(1, 2)
        return block(clip, sigmas).transpose(1, 2).reshape(bt, c, hh, ww)

    def forward(self, x, c_noise, sigmas=None):
        """x: [B, 3, T, H, W]; c_noise: [B]."""
        b, _, t, hh, ww = x.shape
        angles = c_noise[:, None] * self.freqs[None]
        emb = self.embed(torch.cat([angles.sin(), angles.cos()], dim=1)).repeat_interleave(t, dim=0)
        frames = x.transpose(1, 2).reshape(b * t, 3, hh, ww)
        h = self.conv_in(F.pixel_unshuffle(frames, 2)) + self.frame_embedding[:t].repeat(b, 1)[:, :, None, None]
        h0 = self._clip_attention(self.down0_attn, self.down0(h, emb), b, sigmas)
        h1 = self._clip_attention(self.down1_attn, self.down1(self.pool(h0), emb), b, sigmas)
        h = self._clip_attention(self.up1_attn, self.up1(torch.cat([self.mid(h1, emb), h1], dim=1), emb), b, sigmas)
        h = self.up0(torch.cat([F.interpolate(h, scale_factor=2.0), h0], dim=1), emb)
        h = self._clip_attention(self.up0_attn, h, b, sigmas)
        out = F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), 2)
        return out.view(b, t, 3, hh, ww).transpose(1, 2)


def to_frames(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] → [B, T, H, W, 3] in [0, 1] (every frame in ComfyUI's IMAGE layout)."""
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
