"""The text ΔConv Patch reports: what was replaced, by which student, with which weights, and what else is going on."""
from collections import Counter

from ..deltaconv_core.students import STUDENTS


def student_line(match) -> str:
    """Which student runs where, by site count (ΔConv block, mediator attention)."""
    per_kind = Counter(config.student for _, config, _ in match.present)
    return "  students: " + ", ".join(f"{cls.label} at {per_kind[kind]} sites" for kind, cls in STUDENTS.items()
                                      if per_kind[kind])


def schedule_lines(schedules, percent_to_sigma, overridden) -> list[str]:
    """Each mediator schedule in use, with the sigma at which each count starts on this model."""
    groups = {}
    for schedule in schedules.values():
        groups.setdefault(schedule.format(), [schedule, 0])[1] += 1
    source = "set in ΔConv Patch" if overridden else "from the weights"
    lines = []
    for text, (schedule, n) in groups.items():
        steps = ", ".join(f"{count} from σ {float(percent_to_sigma(start)):.3g}"
                          for start, _, count in schedule.segments())
        lines.append(f"  mediator schedule ({source}, {n} sites): {text}: {steps}")
    return lines


def patch_report(model_sites, weights, sites, match, start, end, levels, notes, schedules=None,
                 percent_to_sigma=None, overridden=False, speed=None) -> str:
    """`schedules`: mediator site name → the schedule it runs; percent_to_sigma: the model's sampling method;
    `speed`: the SpeedPolicy."""
    schedules = schedules or {}
    lines = [f"ΔConv patch: {len(match.present)} of {len(model_sites.sites)} self-attention sites replaced "
             f"({model_sites.variant})",
             student_line(match),
             f"  weights: {weights.summary()}",
             f"  active from {start:.0%} to {end:.0%} of sampling; levels: {levels}"]
    if speed is not None:
        lines.append(f"  speed policy: {speed.describe()}")
    if schedules:
        lines += schedule_lines(schedules, percent_to_sigma, overridden)
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
