"""Apply ΔConv blocks to a ComfyUI ModelPatcher through object patches on its self-attention modules."""
import inspect
import logging

import comfy.ldm.modules.attention
import comfy.utils
import torch

from ..deltaconv_core.attention import DeltaConvDiTAttention, DeltaConvSelfAttention, PatchRuntime
from ..deltaconv_core.block import build_block
from ..deltaconv_core.families import find_attention_sites, select_levels
from ..deltaconv_core.weights import DeltaConvWeights, attention_fingerprint, match_sites
from .comfy_ops import COMFY_OPS

log = logging.getLogger("deltaconv")
PREFIX = "diffusion_model."
WRAPPER_KEY = "deltaconv"
DELTA_TYPES = (DeltaConvSelfAttention, DeltaConvDiTAttention)
# ComfyUI before mid-2024 calls attn1 without transformer_options: shapes and sigmas come from an attn1_patch.
LEGACY_ATTN1_CALL = "transformer_options" not in inspect.signature(
    comfy.ldm.modules.attention.CrossAttention.forward).parameters


def current_object(model, path: str):
    """The object at `path` as this patcher would install it (get_model_object, also on older ComfyUI)."""
    if hasattr(model, "get_model_object"):
        return model.get_model_object(path)
    if path in model.object_patches:
        return model.object_patches[path]
    return model.object_patches_backup.get(path) or comfy.utils.get_attr(model.model, path)


def _model_sampling(model):
    return model.get_model_object("model_sampling") if hasattr(model, "get_model_object") else model.model.model_sampling


def _block_dtype(reference: torch.Tensor) -> torch.dtype:
    """Store blocks like the model's own weights; fp8/quantised storage gets fp16 blocks, cast per call anyway."""
    return reference.dtype if reference.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float16


def _conflicts(model, sites) -> list[str]:
    notes = []
    to = model.model_options.get("transformer_options", {})
    replaces = to.get("patches_replace", {}).get("attn1", {})
    if replaces:
        keys = ", ".join(map(str, list(replaces)[:6]))
        notes.append(f"attn1 replace patches at {keys} (SAG/PAG or another pack) take precedence there: those "
                     "blocks run their replacement with the original projections, not ΔConv")
    if to.get("patches", {}).get("attn1_patch"):
        notes.append("attn1_patch present (ToMe, HyperTile, hypernetwork, ...): calls whose tokens it rearranges "
                     "fall back to the original attention")
    paths = tuple(f"{PREFIX}{s.path}." for s in sites)
    lora = [k for k in getattr(model, "patches", {}) if isinstance(k, str) and k.startswith(paths)]
    if lora:
        notes.append(f"{len(lora)} weight patches (LoRA/merges) touch replaced self-attention layers and have no "
                     "effect while ΔConv runs; distill blocks from the LoRA-merged model to keep them")
    return notes


def _sigma_wrapper(runtime: PatchRuntime):
    def capture_sigma(executor, x, t, *args, **kwargs):
        runtime.current_sigmas = t
        return executor(x, t, *args, **kwargs)

    return capture_sigma


def _legacy_stash(runtime: PatchRuntime):
    def stash_options(n, context, value, extra_options):
        runtime.stashed_options = extra_options
        return n, context, value

    return stash_options


def original_attention(model, site):
    """The attention module a ΔConv wrapper for `site` should fall back to (never another ΔConv wrapper)."""
    original = current_object(model, PREFIX + site.path)
    if isinstance(original, DELTA_TYPES):
        return original.original  # re-patching a ΔConv model: replace, do not stack
    if not (hasattr(original, "to_q") or hasattr(original, "qkv")):
        raise ValueError(f"{site.path} was already replaced by another node ({type(original).__name__}, without "
                         "attention projections); put ΔConv Patch before that node in the graph")
    return original


def delta_runtimes(model) -> list[PatchRuntime]:
    """The runtimes of the ΔConv blocks `model` installs, one per ΔConv Patch behind it (empty: not patched)."""
    wrappers = [p for p in model.object_patches.values() if isinstance(p, DELTA_TYPES) and p.delta is not None]
    return list({id(w.runtime): w.runtime for w in wrappers}.values())


def install_wrapper(clone, model_sites, site, original, block, runtime: PatchRuntime):
    """Object-patch `site` of `clone` with a ΔConv wrapper around `original` (block may be None: teacher only)."""
    if model_sites.family == "pixart":
        wrapper = DeltaConvDiTAttention(original, block, runtime, site.name, model_sites.patch_size)
    else:
        wrapper = DeltaConvSelfAttention(original, block, runtime, site.name)
    clone.add_object_patch(PREFIX + site.path, wrapper)


def install_runtime_hooks(clone, model_sites, runtime: PatchRuntime):
    """What the wrappers cannot see for themselves: PixArt's sigma, older ComfyUI's shapes and sigmas."""
    if model_sites.family == "pixart" and not runtime.full_range:
        import comfy.patcher_extension  # PixArt exists only in ComfyUI versions that have model wrappers

        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                   _sigma_wrapper(runtime))
    elif LEGACY_ATTN1_CALL and model_sites.family != "pixart":
        clone.set_model_attn1_patch(_legacy_stash(runtime))


def patch_model(model, weights: DeltaConvWeights, start_percent=0.0, end_percent=1.0, levels="all",
                strict=False, block_dtype=None):
    """A clone of `model` whose selected self-attention sites run ΔConv blocks; returns (clone, report, runtime).

    Blocks are stored like the model's weights unless `block_dtype` says otherwise (fp32 masters for training).
    """
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"need 0 ≤ start_percent ≤ end_percent ≤ 1, got {start_percent} and {end_percent}")
    diffusion_model = model.model.diffusion_model
    model_sites = find_attention_sites(diffusion_model)
    chosen = select_levels(model_sites, levels)
    sites = [s for s in model_sites.sites if s.level in chosen]
    match = match_sites(weights, model_sites, sites)
    if match.missing and strict:
        raise ValueError(f"{len(match.missing)} of {len(sites)} self-attention sites have no ΔConv block in "
                         f"{weights.source}, first {match.missing[0].label}; turn strict off to patch the rest")
    if not match.present:
        raise ValueError(f"{weights.source} has no block for any selected site of this {model_sites.variant}")

    sampling = _model_sampling(model)
    runtime = PatchRuntime(sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent))
    clone = model.clone()
    notes = _conflicts(model, sites)
    first_original = None
    for site, config, state in match.present:
        original = original_attention(model, site)
        reference = original.qkv.weight if model_sites.family == "pixart" else original.to_q.weight
        first_original = first_original if first_original is not None else reference
        block = build_block(config, state, ops=COMFY_OPS, dtype=block_dtype or _block_dtype(reference))
        install_wrapper(clone, model_sites, site, original, block, runtime)
    install_runtime_hooks(clone, model_sites, runtime)

    if weights.base_fingerprint and weights.base_fingerprint != attention_fingerprint(first_original):
        notes.append("these blocks were distilled from a different checkpoint than this model (fingerprint "
                     "mismatch); expect larger deviations, or distill blocks for this model")
    report = _report(model_sites, weights, sites, match, start_percent, end_percent, levels, notes)
    for line in report.splitlines():
        log.info("ΔConv: %s", line.strip())
    return clone, report, runtime


def _report(model_sites, weights, sites, match, start, end, levels, notes) -> str:
    lines = [f"ΔConv patch: {len(match.present)} of {len(model_sites.sites)} self-attention sites replaced "
             f"({model_sites.variant})",
             f"  weights: {weights.summary()}",
             f"  active from {start:.0%} to {end:.0%} of sampling; levels: {levels}"]
    skipped = len(model_sites.sites) - len(sites)
    if skipped:
        lines.append(f"  {skipped} sites left on attention by the level choice")
    if match.missing:
        names = ", ".join(s.name for s in match.missing[:4]) + (" …" if len(match.missing) > 4 else "")
        lines.append(f"  {len(match.missing)} sites have no block in the file and keep attention: {names}")
    if match.unused:
        lines.append(f"  {len(match.unused)} blocks in the file have no site in this model (unused)")
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)
