"""ΔConv Patch: MODEL + DELTACONV → MODEL whose self-attention runs ΔConv blocks or mediator attention."""
from typing import ClassVar

from ..deltaconv_core.families import LEVEL_CHOICES
from ..deltaconv_core.mediator_schedule import EXAMPLE
from ..deltaconv_core.speed_policy import MODES as SPEED_MODES
from .patching import patch_model
from .validation import check_widgets, parse_mediator_schedule, require_widgets, validates_widgets

SCHEDULE_TOOLTIP = (f"Mediator attention only: how many mediators run when, overriding the schedule stored with "
                    f"the weights. start:count pairs where start is a timestep percent as in start_percent (0 = most "
                    f"noise, 1 = none; the steps each count gets depend on the scheduler), e.g. '{EXAMPLE}', or one "
                    f"count such as '16'. Empty: the weights' schedule. ΔConv blocks ignore it.")


SPEED_TOOLTIP = ("Never slower than attention. auto: on a GPU, each site times its student against the model's "
                 "own attention on its first call at each image size, then the whole model call is timed with "
                 "those choices, with every student and with every attention, and the fastest runs (attention is "
                 "the teacher, so falling back never costs fidelity; the log shows the timings); on the CPU the "
                 "student. always: the student at every call.")


@validates_widgets
class DeltaConvPatch:
    DESCRIPTION = ("Replaces the model's self-attention layers with the students in the weights: ΔConv blocks or "
                   "mediator attention, per site (a clone; the input model is untouched). Mediator attention runs "
                   "the number of mediators its schedule gives for each step. Calls that other patches rearrange, "
                   "and steps outside the chosen range, use the original attention.")
    CATEGORY = "ΔConv"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("A patched clone of the model: connect it to KSampler (the input model is unchanged).",
                       "Which sites run ΔConv, which stay on attention and why, and notes on conflicts.")
    SEARCH_ALIASES = ("attention", "speed", "faster", "convfusion", "linear attention", "self-attention",
                      "patch attention", "deltaconv")
    FUNCTION = "patch"
    # A choice as older releases saved it: still accepted, and run as its key (CHANGELOG.md).
    LEGACY_CHOICES: ClassVar = {"levels": {"finest two": "finest_two"}}

    @classmethod
    def VALIDATE_INPUTS(cls, **widgets):
        checked = check_widgets(cls, widgets)
        start, end = widgets.get("start_percent"), widgets.get("end_percent")
        if checked is True and None not in (start, end) and start > end:
            return f"start_percent = {start} is after end_percent = {end}: allowed is start_percent ≤ end_percent"
        return checked

    @classmethod
    def INPUT_TYPES(cls):
        pct = {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to speed up (SD1.x/2.x, SDXL, PixArt)."}),
            "deltaconv": ("DELTACONV", {"tooltip": "Blocks from ΔConv Load (or ΔConv Distill) made for this "
                                                   "model family."}),
            "start_percent": ("FLOAT", {**pct, "tooltip": "ΔConv runs from this timestep percent on (0 = most "
                                                          "noise, the first step)."}),
            "end_percent": ("FLOAT", {**pct, "default": 1.0, "tooltip": "…until this timestep percent (1 = no "
                                                                        "noise, past the last step)."}),
            "levels": (list(LEVEL_CHOICES), {"default": LEVEL_CHOICES[0],
                                             "tooltip": "all: replace every resolution level. finest: only the "
                                                        "finest (highest-resolution) level with self-attention, "
                                                        "where attention costs most. finest_two: the finest two."}),
            "strict": ("BOOLEAN", {"default": False, "tooltip": "Refuse when the file lacks blocks for some "
                                                                "selected sites instead of leaving them on "
                                                                "attention."}),
        }, "optional": {
            "mediator_schedule": ("STRING", {"default": "", "tooltip": SCHEDULE_TOOLTIP}),
            "speed_policy": (list(SPEED_MODES), {"default": SPEED_MODES[0], "tooltip": SPEED_TOOLTIP}),
        }}

    def patch(self, model, deltaconv, start_percent, end_percent, levels, strict, mediator_schedule="",
              speed_policy=SPEED_MODES[0]):
        levels = require_widgets(type(self), locals())["levels"]  # a choice saved by an older release: its key
        schedule = parse_mediator_schedule(mediator_schedule)
        patched, report, _ = patch_model(model, deltaconv, start_percent, end_percent, levels, strict,
                                         mediator_schedule=schedule, speed_policy=speed_policy)
        return (patched, report)
