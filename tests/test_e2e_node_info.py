"""Every ΔConv node explains itself in the running server's /object_info: a tooltip on every input and output, its
category, a default for every choice, and search aliases."""
import pytest

CATEGORIES = {
    "DeltaConvLoad": "ΔConv", "DeltaConvPatch": "ΔConv",
    "DeltaConvDistill": "ΔConv/training", "DeltaConvSave": "ΔConv/training",
    "DeltaConvAttentionLocality": "ΔConv/analysis", "DeltaConvCompare": "ΔConv/analysis",
}
SHARED_ALIASES = {"convfusion", "linear attention"}  # every node is found by these


@pytest.fixture(scope="module")
def info(server):
    everything = server.get("/object_info")
    found = {name: everything[name] for name in everything if name.startswith("DeltaConv") and
             everything[name]["category"].startswith("ΔConv") and not everything[name]["category"].endswith("tests")}
    assert set(CATEGORIES) <= set(found)
    return found


def inputs(node):
    return {name: spec for group in ("required", "optional") for name, spec in node["input"].get(group, {}).items()}


def test_categories(info):
    assert {name: node["category"] for name, node in info.items() if name in CATEGORIES} == CATEGORIES
    assert all(node["category"] in set(CATEGORIES.values()) for node in info.values())


def test_every_input_has_a_tooltip(info):
    missing = [f"{name}.{key}" for name, node in info.items() for key, spec in inputs(node).items()
               if len(spec) < 2 or not str(spec[1].get("tooltip", "")).strip()]
    assert not missing, f"inputs without a tooltip: {missing}"


def test_every_choice_declares_a_default(info):
    """The frontend's node-search preview shows 'undefined' for a combo without a default."""
    for name, node in info.items():
        for key, spec in inputs(node).items():
            if isinstance(spec[0], list):
                assert "default" in spec[1], f"{name}.{key} declares no default"
                assert not spec[0] or spec[1]["default"] in spec[0], f"{name}.{key}: default not among the choices"


def test_every_output_has_a_tooltip(info, pack):
    for name, node in info.items():
        cls = pack.nodes.NODE_CLASS_MAPPINGS[name]
        tooltips = node.get("output_tooltips", getattr(cls, "OUTPUT_TOOLTIPS", None))
        assert tooltips is not None and len(tooltips) == len(node["output"]), f"{name}: {tooltips}"
        assert all(str(t).strip() for t in tooltips), f"{name}: empty output tooltip"


def test_output_tooltips_reach_the_frontend(info):
    if not any("output_tooltips" in node for node in info.values()):
        pytest.skip("this ComfyUI's /object_info has no output_tooltips (added in mid-2024)")
    assert all("output_tooltips" in node for node in info.values())


def test_search_aliases(info, pack):
    """Newer ComfyUI sends SEARCH_ALIASES to the frontend's node search; older versions ignore the attribute."""
    for name, node in info.items():
        aliases = node.get("search_aliases", getattr(pack.nodes.NODE_CLASS_MAPPINGS[name], "SEARCH_ALIASES", ()))
        assert set(aliases) >= SHARED_ALIASES, f"{name}: {aliases}"
        assert all(isinstance(a, str) and a == a.strip() and a for a in aliases), f"{name}: {aliases}"
    patch_aliases = set(pack.nodes.NODE_CLASS_MAPPINGS["DeltaConvPatch"].SEARCH_ALIASES)
    assert {"attention", "speed", "convfusion", "linear attention"} <= patch_aliases
