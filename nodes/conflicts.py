"""What else on a model touches the self-attention sites ΔConv replaces, as notes for the patch report. The notes
hold for both students: ΔConv blocks and mediator attention alike replace the whole site with their own weights."""
from ..deltaconv_core.families import FAMILIES
from ..deltaconv_core.fingerprint import mismatched_sites
from .wrappers import PREFIX


def conflicts(model, sites) -> list[str]:
    notes = []
    to = model.model_options.get("transformer_options", {})
    replaces = to.get("patches_replace", {}).get("attn1", {})
    if replaces:
        keys = ", ".join(map(str, list(replaces)[:6]))
        notes.append(f"attn1 replace patches at {keys} (SAG/PAG or another pack) take precedence there: those "
                     "blocks run their replacement with the original projections, not the ΔConv/mediator student")
    if to.get("patches", {}).get("attn1_patch"):
        notes.append("attn1_patch present (ToMe, HyperTile, hypernetwork, ...): calls whose tokens it rearranges "
                     "fall back to the original attention")
    paths = tuple(f"{PREFIX}{s.path}." for s in sites)
    lora = [k for k in getattr(model, "patches", {}) if isinstance(k, str) and k.startswith(paths)]
    if lora:
        notes.append(f"{len(lora)} weight patches (LoRA/merges) touch replaced self-attention layers and have no "
                     "effect while the student runs (ΔConv blocks and mediator attention use their own weights, "
                     "not the model's projections); distill students from the LoRA-merged model to keep them")
    return notes


def base_mismatch(weights, references) -> list[str]:
    """A note when the blocks were distilled from another checkpoint, judged on the sites that both the file's
    fingerprints and `references` (site name → this model's q/qkv weight) cover, whatever dtype it is loaded in."""
    differ, compared = mismatched_sites(weights.site_fingerprints, references)
    if differ:
        return [f"these blocks were distilled from a different checkpoint than this model ({len(differ)} of "
                f"{compared} sites differ in their attention weights, first {differ[0]}); expect larger deviations, "
                f"or distill blocks for this model{FAMILIES[weights.family].mismatch_hint}"]
    return []
