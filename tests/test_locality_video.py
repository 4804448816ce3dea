"""Attention locality of video models, in-process on the tiny Wan model: the maps are those its attention computes
(RoPE included), and on a model whose attention is local by construction the node's statistics are the ones the
construction implies; the suggested [spatial, time] kernels reach fresh 3-D ΔConv blocks."""
import json
import math

import pytest
import torch

from deltaconv_core.analysis import video_locality_stats
from deltaconv_core.families import find_attention_sites
from deltaconv_core.weights import DeltaConvWeights
from devkit.tiny_models import SITE_COUNTS, TINY_MODELS, has_wan

pytestmark = pytest.mark.skipif(not has_wan(), reason="this ComfyUI has no Wan")
FRAMES, LATENT_HW = 7, (16, 24)  # latent frames × h × w: tokens on a 7 × 8 × 12 grid
GRID = (FRAMES, LATENT_HW[0] // 2, LATENT_HW[1] // 2)
HEAD_DIM, THETA = 128, 10000.0  # Wan: 128 channels per head, RoPE base 10000
AXES = (HEAD_DIM - 4 * (HEAD_DIM // 6), 2 * (HEAD_DIM // 6), 2 * (HEAD_DIM // 6))  # RoPE channels on t, h, w


def test_queries_keys_are_what_the_attention_computes():
    """softmax(q·kᵀ/√d)·v from the adapter's q/k, through the model's own v and o, equals the module's output."""
    tiny = TINY_MODELS["tiny_wan"]
    model = tiny.build(0).eval()
    sites = find_attention_sites(model)
    attention = model.get_submodule(sites.sites[0].path)
    seen = []
    hook = attention.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args), with_kwargs=True)
    with torch.no_grad():
        model(**tiny.inputs(LATENT_HW))
        hook.remove()
        x, freqs = seen[0]
        q, k, heads = sites.adapter.queries_keys(attention, x[0], {"freqs": freqs})
        d = q.shape[-1] // heads
        q, k, v = (t.double().view(-1, heads, d).transpose(0, 1) for t in (q, k, attention.v(x[0])))
        mixed = (torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v).transpose(0, 1).reshape(x[0].shape)
        expected = attention(x, freqs)[0].double()
        assert torch.allclose(attention.o(mixed.float()).double(), expected, atol=1e-5)
        unrotated = attention.norm_q(attention.q(x[0]))
        assert not torch.allclose(sites.adapter.queries_keys(attention, x[0], {"freqs": freqs})[0], unrotated)
    with pytest.raises(ValueError, match="freqs"):
        sites.adapter.queries_keys(attention, x[0], {})


def _amplitudes(time: float, space: float) -> torch.Tensor:
    """Per RoPE channel pair of one head: `time` on the frame pairs, `space` on the row and column pairs."""
    return torch.tensor([time] * (AXES[0] // 2) + [space] * ((AXES[1] + AXES[2]) // 2))


def make_local(model, time: float, space: float):
    """Every self-attention's q and k the same constant vector, (1, 0) in each RoPE pair, scaled per axis by the
    norms: the logits depend on positions alone, Σ_pairs 2a²·cos(ω·Δ)/√d (d = 128), local by construction."""
    gain = _amplitudes(time, space).repeat_interleave(2)  # on the pair's first channel (the second reads 0)
    with torch.no_grad():
        for block in model.model.diffusion_model.blocks:
            attn = block.self_attn
            heads = attn.num_heads
            for lin, norm in ((attn.q, attn.norm_q), (attn.k, attn.norm_k)):
                lin.weight.zero_()
                lin.bias.copy_(torch.tensor([1.0, 0.0]).repeat(lin.out_features // 2))
                norm.weight.copy_(gain.repeat(heads))
    return model


def analytic_maps(time: float, space: float) -> torch.Tensor:
    """Attention probabilities of every token over every token that the construction implies, float64, computed
    from Wan's RoPE frequencies (ω_j = θ^(-2j/axis channels)) without the model: [N, N]."""
    amp = _amplitudes(time, space).double()
    omega = torch.cat([THETA ** (-torch.arange(0, n, 2, dtype=torch.float64) / n) for n in AXES])
    axis = torch.tensor([0] * (AXES[0] // 2) + [1] * (AXES[1] // 2) + [2] * (AXES[2] // 2))
    pos = torch.stack([a.flatten() for a in torch.meshgrid(*(torch.arange(n) for n in GRID), indexing="ij")], 1)
    delta = (pos[:, None, :] - pos[None, :, :]).double()[..., axis]  # [N, N, pairs]: Δ on each pair's axis
    # RMSNorm makes the (1, 0) pairs √2 long (half the channels are zero); q·k per pair is then 2a²cos(ωΔ).
    logits = (2 * amp ** 2 * torch.cos(delta * omega)).sum(-1) / math.sqrt(HEAD_DIM)
    return torch.softmax(logits, dim=-1)


def locality(pack, model, max_queries=4096):
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 16, 4096, generator=g), {}]]
    latent = {"samples": torch.zeros(1, 16, FRAMES, *LATENT_HW)}
    node = pack.nodes.locality.DeltaConvAttentionLocality()
    with torch.inference_mode():
        _maps, report, preset = node.analyse(model, positive, 512, 512, 1.0, 0, max_queries, latent=latent)["result"]
    header, *rows = report.splitlines()
    return [dict(zip(header.split(" | "), r.split(" | "))) for r in rows], json.loads(preset)


@pytest.mark.parametrize("time, space", [(12.0, 1.5), (0.0, 1.5), (1.5, 1.5)])
def test_local_by_construction(pack, load_tiny, time, space):
    """Every query measured (max_queries ≥ tokens): the node's figures are those of the analytic maps."""
    rows, preset = locality(pack, make_local(load_tiny("tiny_wan"), time, space))
    n = math.prod(GRID)
    expected = video_locality_stats(analytic_maps(time, space), torch.stack(torch.unravel_index(torch.arange(n),
                                                                                               GRID), 1), GRID)
    assert len(rows) == SITE_COUNTS["tiny_wan"]
    k, kt = expected.spatial.suggested_kernel, expected.suggested_time_kernel
    for row in rows:
        assert row["grid (frames x h x w)"] == "x".join(map(str, GRID))
        assert (int(row["ERF"]), int(row["suggested k"])) == (expected.spatial.erf, k)
        assert (int(row["time ERF (frames)"]), int(row["suggested time k"])) == (expected.time_erf, kt)
        assert float(row["mass in time k"]) == pytest.approx(expected.mass_in_time_kernel(3), abs=2e-3)
        assert float(row["mass in suggested k x k x time k"]) == pytest.approx(expected.mass_in_box(k, kt), abs=2e-3)
        assert float(row["uniform share"]) == pytest.approx(expected.spatial.uniform_fraction, abs=2e-3)
    assert preset == {f"blocks.{i}": [k, kt] for i in range(SITE_COUNTS["tiny_wan"])}
    if time == 0.0:  # no say of time in the logits: attention spreads over every frame
        assert kt >= FRAMES
    if time >= 10.0:  # one frame holds nearly all of it: no taps over time needed
        assert kt == 1


def test_time_matters_only_where_the_construction_puts_it(pack, load_tiny):
    """Sharper in time narrows the suggested time kernel and leaves the spatial one alone (and vice versa)."""
    base = locality(pack, make_local(load_tiny("tiny_wan"), 1.5, 1.5))[1]["blocks.0"]
    sharper_time = locality(pack, make_local(load_tiny("tiny_wan"), 3.0, 1.5))[1]["blocks.0"]
    wider_space = locality(pack, make_local(load_tiny("tiny_wan"), 1.5, 1.0))[1]["blocks.0"]
    assert sharper_time[0] == base[0] and sharper_time[1] < base[1]
    assert wider_space[1] == base[1] and wider_space[0] > base[0]


def test_video_model_without_a_latent_is_refused_naming_the_input(pack, load_tiny):
    node = pack.nodes.locality.DeltaConvAttentionLocality()
    with pytest.raises(ValueError, match="connect its empty video latent"), torch.inference_mode():
        node.analyse(load_tiny("tiny_wan"), [[torch.zeros(1, 16, 4096), {}]], 512, 512, 1.0, 0, 8)


def test_preset_reaches_fresh_video_blocks(pack):
    """The preset's [spatial, time] pairs build blocks with those kernels; a pair on an image model is refused."""
    sites = find_attention_sites(TINY_MODELS["tiny_wan"].build(0))
    kernels = pack.nodes.validation.parse_kernel_preset('{"blocks.0": [5, 1], "blocks.1": 9}', sites.sites)
    weights = DeltaConvWeights.fresh(sites, kernel_sizes=kernels)
    configs = {name: (cfg.kernel_size, cfg.time_kernel) for name, (cfg, _) in weights.students.items()}
    assert configs == {"blocks.0": (5, 1), "blocks.1": (9, 3)}  # a plain number keeps the family's time taps
    image = find_attention_sites(TINY_MODELS["tiny_sd15"].build(0))
    name = image.sites[0].name
    with pytest.raises(ValueError, match=r"kernel over time.*one kernel size per block"):
        DeltaConvWeights.fresh(image, kernel_sizes=pack.nodes.validation.parse_kernel_preset(
            json.dumps({name: [5, 3]}), image.sites))
    for bad in ('{"blocks.0": [5, 2]}', '{"blocks.0": [5]}', '{"blocks.0": [5, 3, 3]}', '{"blocks.0": ["5", 3]}'):
        with pytest.raises(ValueError, match="kernel_preset"):
            pack.nodes.validation.parse_kernel_preset(bad, sites.sites)
