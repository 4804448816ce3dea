"""What else on a model touches the self-attention sites ΔConv replaces, as notes for the patch report."""
from ..deltaconv_core.weights import attention_fingerprint
from .wrappers import PREFIX


def conflicts(model, sites) -> list[str]:
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


def base_mismatch(weights, reference) -> list[str]:
    """A note when the blocks were distilled from another checkpoint (`reference`: a q/qkv weight of this model)."""
    if weights.base_fingerprint and weights.base_fingerprint != attention_fingerprint(reference):
        return ["these blocks were distilled from a different checkpoint than this model (fingerprint mismatch); "
                "expect larger deviations, or distill blocks for this model"]
    return []
