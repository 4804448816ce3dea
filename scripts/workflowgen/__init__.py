"""The example workflows in workflows/ and how they are made.

- `definitions`: the workflows, one function each, written with `graph` (compact nodes) and `models` (files);
  `graph.with_displays` adds a Preview Any to every report/PSNR/SSIM output of ΔConv Patch, Compare and Locality;
- `ui_format`: compact graph → ComfyUI's UI workflow (columns by depth) and its API-format twin;
- `thumbnail`: the .jpg schematic the Templates browser shows;
- `schemas`: third-party node schemas (third_party_nodes.json, also read by the tests) and /object_info fetching.

scripts/make_workflows.py is the command line.
"""
import os
import re

from .definitions import WORKFLOWS
from .graph import with_displays
from .schemas import REPO, THIRD_PARTY_NODES, THIRD_PARTY_VERSIONS
from .ui_format import to_ui


def pack_version():
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        return re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M).group(1)


def build_all(object_info, comfyui_version=None):
    """{name: (title, UI workflow, API prompt)} for every workflow, from a ComfyUI /object_info."""
    info = {**THIRD_PARTY_NODES, **object_info}
    versions = {**THIRD_PARTY_VERSIONS, "deltaconv": pack_version(), "comfy-core": comfyui_version}
    out = {}
    for name, fn in WORKFLOWS.items():
        title, graph, note = fn()
        graph = with_displays(graph, info)
        missing = sorted({n["class_type"] for n in graph.values()} - set(info))
        if missing:
            raise SystemExit(f"{name}: this ComfyUI has no {missing}; generate against a newer one (COMFYUI_PATH)")
        wf, api = to_ui(name, title, graph, note, info, versions)
        out[name] = (title, wf, api)
    return out
