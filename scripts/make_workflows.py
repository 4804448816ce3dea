"""Builds the example workflows in workflows/ from compact API-format descriptions.

For each workflow it writes `workflows/<name>.json` (ComfyUI's UI/litegraph format: what the editor loads, and what
ComfyUI's Templates browser lists through GET /workflow_templates), `workflows/<name>.jpg` (its thumbnail, a
schematic of the graph) and `workflows/api/<name>.api.json` (the API-format twin that the tests queue). The API twins
live one folder down because /workflow_templates lists every `workflows/*.json`.

Widget order comes from real node schemas: a running ComfyUI's /object_info, read from a file (--object-info) or
fetched from a headless server started on a temporary base directory (COMFYUI_PATH or --comfyui). Third-party nodes
that are not installed (ComfyUI_IPAdapter_plus) come from scripts/workflowgen/third_party_nodes.json. The workflows
themselves and how they are converted live in scripts/workflowgen/.

    COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python scripts/make_workflows.py
"""
import argparse
import json
import os

from workflowgen import build_all
from workflowgen.schemas import REPO, THIRD_PARTY_NODES, fetch_object_info
from workflowgen.thumbnail import thumbnail

OUT = os.path.join(REPO, "workflows")


def dump(obj):
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--object-info", help="a saved /object_info JSON (else a headless ComfyUI is started)")
    p.add_argument("--comfyui-version", help="ComfyUI version for properties.ver with --object-info")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (default $COMFYUI_PATH)")
    p.add_argument("--save-object-info", help="also write the fetched /object_info here")
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    if args.object_info:
        with open(args.object_info) as f:
            info, version = json.load(f), args.comfyui_version
    elif args.comfyui:
        info, version = fetch_object_info(args.comfyui)
        if args.save_object_info:
            with open(args.save_object_info, "w") as f:
                json.dump(info, f)
    else:
        p.error("give --object-info FILE or a ComfyUI checkout (--comfyui / COMFYUI_PATH)")
    built = build_all(info, version)
    os.makedirs(os.path.join(args.out, "api"), exist_ok=True)
    for name, (title, wf, api) in built.items():
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            f.write(dump(wf))
        with open(os.path.join(args.out, "api", f"{name}.api.json"), "w") as f:
            f.write(dump(api))
        thumbnail(wf, title, {**THIRD_PARTY_NODES, **info}, os.path.join(args.out, f"{name}.jpg"))
        print(f"{name}: {len(wf['nodes'])} nodes, {len(wf['links'])} links")


if __name__ == "__main__":
    main()
