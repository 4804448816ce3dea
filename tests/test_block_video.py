"""The video ΔConvBlock (BlockConfig.time_kernel; docs/design.md, "The ΔConv block"): against the independent
float64 reference, what it shares with the image block exactly, its bookkeeping (shapes, MACs, description,
metadata, weight files), and that it never enters the 2-D fused kernels."""
import itertools
import json

import pytest
import torch
from safetensors import safe_open

from deltaconv_core import kernels
from deltaconv_core.block import BlockConfig, DeltaConvBlock
from deltaconv_core.reference import reference_block_forward, reference_video_block_forward
from deltaconv_core.students import build_student, config_from_dict
from deltaconv_core.weights import DeltaConvWeights, load_weights, save_weights

SCALES = {"1": (1.0,), "2": (1.0, 0.5), "3": (1.0, 0.5, 1 / 3)}
GRIDS = [(1, 5, 7), (2, 3, 3), (3, 4, 6), (5, 1, 3), (4, 9, 5)]  # (t, h, w): one frame, odd sizes, t > k_t


def randomized(cfg, seed):
    """A block of `cfg` in float64 with every parameter seeded noise, and its generator."""
    gen = torch.Generator().manual_seed(seed)
    block = build_student(cfg, dtype=torch.float64)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return block, gen


def image_block(video: DeltaConvBlock) -> DeltaConvBlock:
    """The image block with the same weights (no conv_time)."""
    cfg = BlockConfig(**{**video.config.to_dict(), "time_kernel": 0})
    state = {k: v for k, v in video.state_dict().items() if not k.startswith("conv_time.")}
    return build_student(cfg, state, dtype=torch.float64)


PARITY = [pytest.param(g, s, b, grid, kt, 2000 + i, id=f"{g}-{s}sc-{'bias' if b else 'nobias'}-t{grid[0]}x{grid[1]}"
                       f"x{grid[2]}-kt{kt}")
          for i, (g, s, b, grid, kt) in enumerate(itertools.product(("scaled", "sigmoid"), SCALES, (False, True),
                                                                   GRIDS, (1, 3, 5)))]


@pytest.mark.parametrize("gate,n_scales,dw_bias,grid,time_kernel,seed", PARITY)
def test_video_block_matches_float64_reference(gate, n_scales, dw_bias, grid, time_kernel, seed):
    dim, k = (8, 12, 20)[seed % 3], (1, 3, 5)[seed % 3]
    cfg = BlockConfig(dim, k, SCALES[n_scales], gate, dw_bias, time_kernel)
    block, gen = randomized(cfg, seed)
    x = torch.randn(1 + seed % 2, *grid, dim, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
        assert torch.equal(block.run(x.flatten(1, 3), grid).view(x.shape), out)
    ref = reference_video_block_forward(block.state_dict(), cfg, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_reference_sees_time_and_the_clip():
    """The reference is not blind to what video adds: conv_time (its taps' order too) and the clip-wide pool."""
    block, gen = randomized(BlockConfig(8, 3, time_kernel=3), 1)
    x = torch.randn(2, 4, 3, 5, 8, generator=gen, dtype=torch.float64)
    state = block.state_dict()
    ref = reference_video_block_forward(state, block.config, x)
    no_time = {**state, "conv_time.weight": torch.zeros_like(state["conv_time.weight"])}
    flipped = {**state, "conv_time.weight": state["conv_time.weight"].flip(0)}
    per_frame = reference_block_forward(state, block.config, x.flatten(0, 1)).view(x.shape)
    for wrong in (reference_video_block_forward(no_time, block.config, x),
                  reference_video_block_forward(flipped, block.config, x), per_frame):
        assert (wrong - ref).abs().max() > 1e-3


@pytest.mark.parametrize("grid", [(1, 5, 7), (3, 4, 6)])
def test_zero_conv_time_is_the_image_block_per_frame(grid):
    """Zero temporal weights (a fresh block's) leave each frame's u exactly as the image block's; with conv_pool
    zero too, the video block is the image block frame by frame, exactly; with one frame, it is exactly so."""
    t, h, w = grid
    video, gen = randomized(BlockConfig(12, 3, (1.0, 0.5), "sigmoid", time_kernel=3), 7)
    with torch.no_grad():
        video.conv_time.weight.zero_()
    image = image_block(video)
    x = torch.randn(2, t, h, w, 12, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        frames = image(x.flatten(0, 1)).view(x.shape)
        out = video(x)
        if t == 1:
            assert torch.equal(out, frames)
        # The difference is the pooled branch alone: conv_pool on the clip's mean instead of each frame's.
        shift = (x.mean(dim=(1, 2, 3))[:, None] - x.mean(dim=(2, 3))) @ video.conv_pool.weight.t()  # [B, T, C]
        torch.testing.assert_close(out - frames, shift[:, :, None, None].expand_as(out), rtol=1e-12, atol=1e-12)
        for p in (video.conv_pool.weight, video.conv_pool.bias):
            p.zero_()
        assert torch.equal(video(x), image_block(video)(x.flatten(0, 1)).view(x.shape))
        # An image block on a video is a video block without conv_time: nothing mixes over time but the pool.
        assert torch.equal(image_block(video)(x), video(x))


def test_one_frame_with_conv_time_is_conv_up_rescaled():
    """On one frame only conv_time's centre tap sees anything (zero padding in time): u·(1 + w_centre)."""
    video, gen = randomized(BlockConfig(8, 3, time_kernel=5), 3)
    image = image_block(video)
    scale = 1 + video.conv_time.weight[2].detach()
    with torch.no_grad():
        image.conv_up.weight.mul_(scale[:, None])
        image.conv_up.bias.mul_(scale)
    x = torch.randn(2, 1, 6, 5, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(video(x)[:, 0], image(x[:, 0]), rtol=1e-12, atol=1e-12)
        assert torch.equal(video(x[:, 0]), video(x)[:, 0])  # an image is a one-frame video


def test_fresh_video_block_is_the_fresh_image_block_and_learns_time():
    """conv_time starts at zero and draws nothing from the generator: the rest is the image block of the same
    seed. Its gradient is not zero (the residual passes it), so distillation can move it."""
    torch.manual_seed(4)
    video = build_student(BlockConfig(16, 3, time_kernel=3))
    torch.manual_seed(4)
    image = build_student(BlockConfig(16, 3))
    assert torch.equal(video.conv_time.weight, torch.zeros(3, 8))
    assert video.conv_time.bias is None
    state = video.state_dict()
    assert all(torch.equal(state[k], v) for k, v in image.state_dict().items())
    x = torch.randn(1, 4, 5, 5, 16)
    video(x).square().mean().backward()
    assert video.conv_time.weight.grad.abs().min() > 0


def test_gradients_match_the_reference():
    video, gen = randomized(BlockConfig(8, 3, (1.0, 0.5), time_kernel=3), 9)
    x = torch.randn(1, 3, 4, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(video, (x,))
    params = dict(video.named_parameters())
    video(x).sum().backward()
    ref_state = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    reference_video_block_forward(ref_state, video.config, x.detach()).sum().backward()
    for name, p in params.items():
        torch.testing.assert_close(p.grad, ref_state[name].grad, rtol=1e-10, atol=1e-10, msg=name)


def test_never_enters_the_2d_kernels(monkeypatch):
    """Where the fused kernels would run (CUDA), a video takes the torch path: frames as a batch of images."""
    def refuse(*args, **kwargs):
        raise AssertionError("a video block entered the 2-D kernels")

    monkeypatch.setattr(kernels, "use_triton", lambda u: True)
    monkeypatch.setattr(kernels, "delta_conv_or_none", refuse)
    video, gen = randomized(BlockConfig(8, 3, time_kernel=3), 5)
    x = torch.randn(1, 3, 4, 4, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(video(x), reference_video_block_forward(video.state_dict(), video.config, x),
                                   rtol=1e-12, atol=1e-12)
        video(x[:, 0])
        with pytest.raises(AssertionError, match="entered the 2-D kernels"):  # the image path still takes them
            image_block(video)(x[:, 0])


# ------------------------------------------------------------------------------------------- bookkeeping
def test_config_stores_time_kernel_only_when_set():
    image = BlockConfig(320, 7, (1.0, 0.5), "scaled", False)
    assert list(image.to_dict()) == ["dim", "kernel_size", "scales", "gate", "dw_bias"]
    assert json.dumps(image.to_dict()) == ('{"dim": 320, "kernel_size": 7, "scales": [1.0, 0.5], "gate": "scaled", '
                                           '"dw_bias": false}')  # as every earlier version wrote it
    video = BlockConfig(256, 7, gate="sigmoid", time_kernel=3)
    assert video.to_dict()["time_kernel"] == 3 and "student" not in video.to_dict()
    for cfg in (image, video):
        assert BlockConfig.from_dict(cfg.to_dict()) == cfg == config_from_dict(json.loads(json.dumps(cfg.to_dict())))


@pytest.mark.parametrize("time_kernel", [2, -1, 19, True, 3.0, "3", None])
def test_config_rejects_invalid_time_kernel(time_kernel):
    with pytest.raises(ValueError, match="time_kernel"):
        BlockConfig(16, 3, time_kernel=time_kernel)


@pytest.mark.parametrize("c,k,kt,n", [(320, 7, 3, 2), (256, 5, 1, 3), (64, 3, 5, 1)])
def test_shapes_macs_and_parameters(c, k, kt, n):
    scales = SCALES[str(n)]
    video, image = BlockConfig(c, k, scales, time_kernel=kt), BlockConfig(c, k, scales)
    block = build_student(video, device="meta")
    assert {n: tuple(p.shape) for n, p in block.state_dict().items()} == DeltaConvBlock.expected_shapes(video)
    assert DeltaConvBlock.expected_shapes(video) == {**DeltaConvBlock.expected_shapes(image),
                                                     "conv_time.weight": (kt, c // 2)}
    assert sum(p.numel() for p in block.parameters()) == \
        sum(p.numel() for p in build_student(image, device="meta").parameters()) + kt * c // 2
    t, h, w = 5, 12, 20
    per_frame = DeltaConvBlock.macs(image, (h, w)) - c * c  # the pooled branch runs once per clip
    # ⅓ scales make the per-token count fractional: each count is truncated once (the frame's t times)
    assert DeltaConvBlock.macs(video, (t, h, w)) == pytest.approx(t * per_frame + kt * (c // 2) * t * h * w + c * c,
                                                                  abs=t)
    assert DeltaConvBlock.macs(image, (t, h, w)) == pytest.approx(t * per_frame + c * c, abs=t)


def test_describe():
    image, video = BlockConfig(64, 7), BlockConfig(64, 7, time_kernel=3)
    assert DeltaConvBlock.describe([image, image]) == "2 ΔConv blocks, kernels [7], 2 scales"
    assert DeltaConvBlock.describe([video, video]) == "2 ΔConv blocks, kernels [7], 2 scales, 3 taps in time"
    assert "time_kernel=3" in repr(build_student(video, device="meta"))
    assert "time_kernel" not in repr(build_student(image, device="meta"))


def test_weight_file_round_trip(tmp_path):
    video, image = BlockConfig(16, 3, gate="sigmoid", time_kernel=3), BlockConfig(16, 5, gate="sigmoid")
    blocks = {name: (cfg, randomized(cfg, i)[0].float().state_dict())
              for i, (name, cfg) in enumerate((("blocks.0", video), ("blocks.1", image)))}
    path = save_weights(DeltaConvWeights("wan", blocks), str(tmp_path / "video.safetensors"))
    loaded = load_weights(path)
    assert loaded.family == "wan"
    for name, (cfg, state) in blocks.items():
        assert loaded.students[name][0] == cfg
        assert loaded.students[name][1].keys() == state.keys()
        assert all(torch.equal(loaded.students[name][1][k], v) for k, v in state.items())
    with safe_open(path, "pt") as f:
        entries = json.loads(f.metadata()["blocks"])
        assert "blocks.0.conv1.conv_time.weight" in set(f.keys())  # a safe_open handle has keys() only
    assert entries["blocks.0"]["time_kernel"] == 3 and "time_kernel" not in entries["blocks.1"]
    assert "3 taps in time" in loaded.summary()
