"""Node schemas for the generator: the third-party ones kept in third_party_nodes.json (packs not installed where
the workflows are generated and tested), and a running ComfyUI's /object_info for everything else."""
import json
import os
import shutil
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _packs() -> dict:
    with open(os.path.join(HERE, "third_party_nodes.json"), encoding="utf-8") as f:
        return json.load(f)


PACKS = _packs()  # Comfy Registry id → {about, version, category, nodes}
THIRD_PARTY_NODES = {kind: schema for pack in PACKS.values() for kind, schema in pack["nodes"].items()}
THIRD_PARTY_PACKS = {pack["category"]: cnr for cnr, pack in PACKS.items()}  # node category prefix → registry id
THIRD_PARTY_VERSIONS = {cnr: pack["version"] for cnr, pack in PACKS.items()}


def fetch_object_info(comfy_path):
    """(/object_info, ComfyUI version) of a headless ComfyUI with this pack, started on a temporary base dir."""
    from devkit.comfy_server import ComfyServer

    base = tempfile.mkdtemp(prefix="deltaconv_wf_")
    server = ComfyServer(comfy_path, {"base": base}, pack_dir=REPO)
    try:
        server.start()
        info = server.get("/object_info")
        version = server.get("/system_stats").get("system", {}).get("comfyui_version")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return info, version
