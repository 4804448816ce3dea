"""Choice inputs take short stable keys; the texts older releases saved still pass the checks and run as their key;
and VALIDATE_INPUTS names exactly the widgets of INPUT_TYPES, so ComfyUI leaves their checks, legacy texts
included, to the node."""
import inspect
import re

import pytest

KEY = re.compile(r"[A-Za-z0-9_]+")  # ASCII, no spaces or colons: stable in saved workflows and API prompts
NOT_OURS = {("DeltaConvLoad", "weights_name"),  # the files in models/deltaconv
            ("DeltaConvCompare", "sampler_name"), ("DeltaConvCompare", "scheduler")}  # ComfyUI's own lists
# What older releases saved → the key it runs as (CHANGELOG.md lists the same).
LEGACY = {
    ("DeltaConvPatch", "levels"): {"finest two": "finest_two"},
    ("DeltaConvDistill", "stage"): {"A: block-local": "A", "B: end-to-end": "B"},
    ("DeltaConvDistill", "student"): {"ΔConv block": "deltaconv", "mediator attention": "mediators"},
    ("DeltaConvDistillSimple", "preset"): {
        "quick: stage A, 2000 steps": "quick",
        "full: stage A 2000 steps, then stage B 10000 steps": "full",
        "fine-tune connected blocks: stage B, 2000 steps at a low learning rate": "fine_tune",
        "check: stage A then B, 2 steps each (runs on the CPU too)": "check"},
}


@pytest.fixture(scope="module")
def validation(pack):
    return pack.nodes.validation


def choices(pack, validation):
    """(node, input, its choices, its default) for every choice input of every node."""
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        for name, (kind, options) in validation.widget_inputs(cls).items():
            if isinstance(kind, (list, tuple)):
                yield key, name, list(kind), options.get("default")


def test_every_choice_is_a_stable_key(pack, validation):
    found = {(node, name): values for node, name, values, _ in choices(pack, validation)}
    assert set(LEGACY) | NOT_OURS <= set(found)
    for (node, name), values in found.items():
        if (node, name) not in NOT_OURS:
            assert values and all(KEY.fullmatch(v) for v in values), f"{node}.{name}: {values}"
    assert found["DeltaConvDistillSimple", "preset"] == ["quick", "full", "fine_tune", "check"]
    assert found["DeltaConvDistill", "stage"] == ["A", "B"]
    assert found["DeltaConvDistill", "student"] == ["deltaconv", "mediators"]
    assert found["DeltaConvPatch", "levels"] == ["all", "finest", "finest_two"]


def test_legacy_choices_are_exactly_these(pack):
    declared = {(key, name): table for key, cls in pack.NODE_CLASS_MAPPINGS.items()
                for name, table in getattr(cls, "LEGACY_CHOICES", {}).items()}
    assert declared == LEGACY


@pytest.mark.parametrize("node,name,old,key", [(n, i, old, key) for (n, i), table in LEGACY.items()
                                               for old, key in table.items()])
def test_old_text_passes_and_runs_as_its_key(pack, validation, node, name, old, key):
    cls = pack.NODE_CLASS_MAPPINGS[node]
    current = validation.widget_inputs(cls)[name][0]
    assert old not in current and key in current
    assert validation.check_widgets(cls, {name: old}) is True
    assert cls.VALIDATE_INPUTS(**{name: old}) is True
    assert validation.require_widgets(cls, {name: old, "unrelated": object()}) == {name: key}
    assert validation.require_widgets(cls, {name: key}) == {name: key}


def test_unknown_choices_are_refused_naming_the_keys(pack, validation):
    distill = pack.NODE_CLASS_MAPPINGS["DeltaConvDistill"]
    assert distill.VALIDATE_INPUTS(stage="C") == "stage = 'C' is not one of the choices: 'A', 'B'"
    with pytest.raises(ValueError, match="student = 'ΔConv' is not one of the choices: 'deltaconv', 'mediators'"):
        validation.require_widgets(distill, {"student": "ΔConv"})


def test_validate_inputs_names_every_widget(pack, validation):
    """What ComfyUI reads (both versions use getfullargspec): the inputs passed to VALIDATE_INPUTS, whose own
    checks ComfyUI then skips. Load has none: ComfyUI checks its file list itself."""
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        if key == "DeltaConvLoad":
            assert not hasattr(cls, "VALIDATE_INPUTS")
            continue
        assert inspect.getfullargspec(cls.VALIDATE_INPUTS).args == ["cls", *validation.widget_inputs(cls)], key
