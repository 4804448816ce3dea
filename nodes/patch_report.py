"""The text ΔConv Patch reports: what was replaced, with which weights, and what else is going on."""


def patch_report(model_sites, weights, sites, match, start, end, levels, notes) -> str:
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
