"""The example workflows (workflows/*.json, made by scripts/make_workflows.py): UI format, the real server's node
schemas, end-to-end runs of their API twins on tiny models, and ComfyUI's template route."""
import glob
import json
import os
import re
import textwrap
import urllib.error
import urllib.request

import pytest

from workflowgen.models import USER_FILES
from workflowgen.schemas import THIRD_PARTY_NODES as THIRD_PARTY

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
NAMES = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(WORKFLOWS, "*.json")))
UI_ONLY = {"Note", "MarkdownNote"}  # frontend-only nodes: no schema, not in the API twin
FILE_INPUTS = {"ckpt_name", "unet_name", "clip_name", "vae_name", "lora_name", "control_net_name", "weights_name",
               "image", "folder"}
LOADERS = {"CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "VAELoader", "LoraLoader", "ControlNetLoader",
           "DeltaConvLoad", "IPAdapterUnifiedLoader"}
# Workflows whose API twins run on tiny models, and why the others do not.
NOT_RUN = {"deltaconv_sd15_ipadapter": "ComfyUI_IPAdapter_plus is not installed in the test server"}
# What a user reads after a run: these outputs of these nodes must each feed a core display node (Preview Any, core
# since ComfyUI of May 2025; display-only, so on an older ComfyUI the rest of a workflow is checked without it).
SHOWN = {"DeltaConvPatch": {"report"}, "DeltaConvCompare": {"report", "psnr", "ssim"},
         "DeltaConvAttentionLocality": {"report"}}
DISPLAY = "PreviewAny"
NO_DISPLAY = f"this ComfyUI has no {DISPLAY} (core since May 2025): the tiny runs leave the display nodes out"


def load(name):
    with open(f"{WORKFLOWS}/{name}.json") as f, open(f"{WORKFLOWS}/api/{name}.api.json") as g:
        return json.load(f), json.load(g)


def inputs_of(schema):
    order = schema.get("input_order") or {k: list(v) for k, v in schema["input"].items()}
    return [(n, schema["input"][sec][n], sec == "required") for sec in ("required", "optional")
            for n in order.get(sec, [])]


def n_values(name, spec):
    """widgets_values entries of an input: 0 for a socket; a seed's control_after_generate, an upload button: +1."""
    opts = spec[1] if len(spec) > 1 else {}
    if opts.get("forceInput") or not (isinstance(spec[0], list) or spec[0] in {"INT", "FLOAT", "STRING", "BOOLEAN",
                                                                               "COMBO"}):
        return 0
    seed = spec[0] == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed"))
    return 1 + bool(seed) + bool(opts.get("image_upload"))


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


@pytest.mark.parametrize("name", NAMES)
def test_ui_format_links_and_twin(name):
    ui, api = load(name)
    assert ui["version"] == 0.4 and {"last_node_id", "last_link_id", "groups", "config", "extra"} <= set(ui)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] == max(nodes)
    assert {str(i) for i, n in nodes.items() if n["type"] not in UI_ONLY} == set(api)
    links = {lk[0]: lk for lk in ui["links"]}
    assert len(links) == len(ui["links"]) and ui["last_link_id"] == max(links)
    for lid, origin, o_slot, target, t_slot, kind in ui["links"]:
        out, inp = nodes[origin]["outputs"][o_slot], nodes[target]["inputs"][t_slot]
        # the frontend types a link by its input, and an any-type ("*") input takes every output type
        assert lid in out["links"] and inp["link"] == lid and inp["type"] == kind, (name, lid)
        assert out["type"] == kind or kind == "*", (name, lid)
        assert api[str(target)]["inputs"][inp["name"]] == [str(origin), o_slot]
    for n in ui["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties"} <= set(n)
        assert {i["link"] for i in n["inputs"]} | {x for o in n["outputs"] for x in o["links"]} <= {None, *links}
        if n["type"] in UI_ONLY:
            continue
        linked = {k for k, v in api[str(n["id"])]["inputs"].items() if isinstance(v, list)}
        assert linked == {i["name"] for i in n["inputs"] if i["link"] is not None}
        props = n["properties"]
        assert props["Node name for S&R"] == n["type"] and props["cnr_id"] == (
            "deltaconv" if n["type"].startswith("DeltaConv") else
            "comfyui_ipadapter_plus" if n["type"] in THIRD_PARTY else "comfy-core")
        if n["type"] in LOADERS:  # the missing-model dialog needs a downloadable .safetensors per file widget
            names = {m["name"] for m in props.get("models", [])}  # (none for files the user makes)
            assert {v for v in n["widgets_values"] if str(v).endswith(".safetensors")} <= names | set(
                USER_FILES.values())
            assert all(m["url"].startswith("https://huggingface.co/") and m["name"].endswith(".safetensors")
                       and m["directory"] and m in ui["models"] for m in props.get("models", []))
    from PIL import Image

    with Image.open(os.path.join(WORKFLOWS, f"{name}.jpg")) as im:
        assert im.format == "JPEG" and im.size == (512, 384)


@pytest.mark.parametrize("name", NAMES)
def test_results_are_displayed(name):
    ui, api = load(name)
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {lk[0]: lk for lk in ui["links"]}
    shown = [(n, slot, out) for n in ui["nodes"] for slot, out in enumerate(n["outputs"])
             if out["name"] in SHOWN.get(n["type"], ())]
    assert shown or not any(n["type"] in SHOWN for n in ui["nodes"])
    for node, slot, out in shown:
        where = f"{name}: {node.get('title') or node['type']} (node {node['id']}) output {out['name']}"
        assert out["links"], f"{where} is not connected: nothing shows it after a run"
        for lid in out["links"]:
            target = nodes[links[lid][3]]
            assert target["type"] == DISPLAY, f"{where} feeds {target['type']}, not a {DISPLAY}"
            assert api[str(target["id"])]["inputs"]["source"] == [str(node["id"]), slot], where


def test_shown_outputs_exist(object_info):
    """The names SHOWN lists are real outputs (a renamed output would make test_results_are_displayed vacuous)."""
    for kind, names in SHOWN.items():
        assert names <= set(object_info[kind]["output_name"]), kind


def check_node(node, api_inputs, schema, exact):
    spec = inputs_of(schema)
    sockets = {n: (s[0], req) for n, s, req in spec if not n_values(n, s)}
    widgets = [(n, s) for n, s, _ in spec if n_values(n, s)]
    where = f"{node['type']} (node {node['id']})"
    for i in node["inputs"]:
        if i["name"] in sockets:
            assert i["type"] == sockets[i["name"]][0], f"{where}: input {i['name']} type"
        else:  # a newer optional socket left unconnected is harmless on an older ComfyUI
            assert not exact and i["link"] is None, f"{where}: input {i['name']} is not in this ComfyUI's schema"
    assert all(any(i["name"] == n and i["link"] for i in node["inputs"]) for n, (_, req) in sockets.items() if req)
    if exact:
        assert [i["name"] for i in node["inputs"]] == list(sockets), where
    assert set(api_inputs) <= {n for n, _, _ in spec}, f"{where}: unknown API inputs"
    values = list(node["widgets_values"])
    assert len(values) == sum(n_values(n, s) for n, s in widgets), f"{where}: widget count"
    for n, s in widgets:
        assert values[0] == api_inputs.get(n), f"{where}: widget {n} differs from the API twin"
        if isinstance(s[0], list) and s[0] and n not in FILE_INPUTS:
            assert values[0] in s[0], f"{where}: {n} = {values[0]!r} is not a choice here"
        values = values[n_values(n, s):]
    assert [o["type"] for o in node["outputs"]] == list(schema["output"]), where
    assert [o["name"] for o in node["outputs"]] == list(schema["output_name"]), where


@pytest.mark.parametrize("name", NAMES)
def test_nodes_match_server_schema(name, object_info):
    ui, api = load(name)
    nodes = [n for n in ui["nodes"] if n["type"] not in UI_ONLY]
    for node in nodes:  # ours: always present, always exact; uninstalled third-party nodes: third_party_nodes.json
        kind = node["type"]
        if kind.startswith("DeltaConv") or (kind in THIRD_PARTY and kind not in object_info):
            check_node(node, api[str(node["id"])]["inputs"], object_info.get(kind) or THIRD_PARTY[kind], exact=True)
    core = [n for n in nodes if not n["type"].startswith("DeltaConv") and n["type"] not in THIRD_PARTY
            and (n["type"] != DISPLAY or DISPLAY in object_info)]  # test_display_nodes_show_results says why
    missing = sorted({n["type"] for n in core} - set(object_info))
    if missing:  # made for a newer ComfyUI: its other core nodes may have newer widgets too
        pytest.skip(f"this ComfyUI has no {missing} (ΔConv nodes of {name} matched)")
    for node in core:
        check_node(node, api[str(node["id"])]["inputs"], object_info[node["type"]], exact=False)


# --- how they open in the frontend (1.27): readable zoom, graph clear of the canvas edge, notes showing all text ---

MIN_ZOOM = 0.75  # the frontend draws no node text below zoom ~0.57
BADGE_ROOM = (20, 30)  # screen pixels left of and above the graph: "[BETA] DeltaConv" badges sit above title bars
NOTE_TEXT = (6.0, 12, 24, 26)  # the Note's 10 px monospace: character width, line height; px across, down not text


def note_needs(text, width):
    """Height a Note `width` wide needs to show `text` without scrolling: paragraphs wrapped at words."""
    char, line, across, down = NOTE_TEXT
    per_line = int((width - across) / char)
    return down + line * sum(max(1, len(textwrap.wrap(p, per_line))) for p in text.split("\n"))


@pytest.mark.parametrize("name", NAMES)
def test_opens_readable(name):
    ui, _ = load(name)
    scale, (dx, dy) = ui["extra"]["ds"]["scale"], ui["extra"]["ds"]["offset"]
    assert MIN_ZOOM <= scale <= 1
    left = min(n["pos"][0] for n in ui["nodes"])
    top = min(n["pos"][1] for n in ui["nodes"]) - 30  # title bars
    assert BADGE_ROOM[0] <= (left + dx) * scale <= 100 and BADGE_ROOM[1] <= (top + dy) * scale <= 100
    for note in (n for n in ui["nodes"] if n["type"] in UI_ONLY):
        width, height = note["size"]
        assert height >= note_needs(note["widgets_values"][0], width), f"{name}: the note's text does not fit"


# --- end to end on tiny models --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_inputs(comfy_server):
    """A test image with a transparent square (the mask), an image set folder, and a tiny SD1.5 LoRA file."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    base = comfy_server.base
    os.makedirs(os.path.join(base, "input", "deltaconv_test_set"), exist_ok=True)
    img = Image.new("RGBA", (64, 64), (200, 120, 40, 255))
    img.paste((0, 0, 0, 0), (20, 20, 44, 44))
    img.save(os.path.join(base, "input", "deltaconv_test.png"))
    for i in range(2):  # two sizes: the folder loader resizes to the first
        Image.new("RGB", (64 + 16 * i, 64), (40 * i, 90, 160)).save(f"{base}/input/deltaconv_test_set/{i}.png")
    g, lora = torch.Generator().manual_seed(0), {}
    for key, (out, inp) in {"attn1_to_q": (320, 320), "attn2_to_k": (320, 768)}.items():
        stem = f"lora_unet_input_blocks_1_1_transformer_blocks_0_{key}"
        lora[f"{stem}.lora_up.weight"] = torch.randn(out, 2, generator=g) * 0.1
        lora[f"{stem}.lora_down.weight"] = torch.randn(2, inp, generator=g) * 0.1
    save_file(lora, os.path.join(base, "models", "loras", "tiny_lora_sd15.safetensors"))


SMALL = {"KSampler": {"steps": 2}, "DeltaConvCompare": {"steps": 2}, "LoadImage": {"image": "deltaconv_test.png"},
         "LoadImageSetFromFolderNode": {"folder": "deltaconv_test_set"},
         "DeltaConvDistill": {"steps": 2, "batch_size": 2, "save_every": 0, "warmup_steps": 0,
                              "training_dtype": "fp32", "allow_cpu": True},
         "DeltaConvDistillSimple": {"preset": "check"}}


def family(name):
    return "sdxl" if "sdxl" in name else "pixart" if "pixart" in name else "wan" if "wan" in name else "sd15"


def tiny_graph(name, api, info):
    """The API twin on tiny files: loaders → tiny UNet/TAESD, text encoders → random conditioning, small sizes."""
    fam = family(name)
    dim, pooled = {"sd15": (768, 0), "sdxl": (2048, 1280), "pixart": (4096, 0), "wan": (4096, 0)}[fam]
    unet = "tiny_sd15_inpaint" if "inpaint" in name else f"tiny_{fam}"
    size = 320 if fam == "pixart" else 64
    dtype = {"weight_dtype": "default"} if "weight_dtype" in info["UNETLoader"]["input"]["required"] else {}
    g = {**json.loads(json.dumps(api)), "vae": {"class_type": "VAELoader", "inputs": {
        "vae_name": "taesd" if fam == "sd15" else "taesdxl"}} if fam != "wan" else {  # no TAESD for Wan latents
        "class_type": "DeltaConvTestWanVAE", "inputs": {"seed": 0}}}
    redirect, consumed = {}, {v[0] for n in g.values() for v in n["inputs"].values() if isinstance(v, list)}
    for nid, node in list(g.items()):
        kind, inp = node["class_type"], node["inputs"]
        if kind in ("CheckpointLoaderSimple", "UNETLoader"):
            node.update(class_type="UNETLoader", inputs={"unet_name": f"{unet}.safetensors", **dtype})
            redirect[(nid, 2)] = ["vae", 0]
        elif kind in ("VAELoader", "CLIPLoader") and nid != "vae":
            redirect[(nid, 0)] = ["vae", 0]
            del g[nid]
        elif kind.startswith("CLIPTextEncode"):
            node.update(class_type="DeltaConvTestConditioning", inputs={
                "seed": len(inp["text"]), "tokens": 16, "dim": dim, "pooled_dim": pooled})
        elif kind == "LoraLoader":  # no CLIP here: the model half, with a tiny LoRA file
            node.update(class_type="LoraLoaderModelOnly", inputs={
                "model": inp["model"], "lora_name": "tiny_lora_sd15.safetensors", "strength_model": 1.0})
        elif kind == "ControlNetLoader":
            inp["control_net_name"] = "tiny_sd15_controlnet.safetensors"
        elif kind == "DeltaConvLoad":
            student = "mediators" if "mediators" in inp["weights_name"] else "random"  # a user-made mediator file
            inp["weights_name"] = f"tiny_{fam}_{student}.safetensors"
        elif kind == "EmptyHunyuanLatentVideo":  # 9 frames of 96 × 64: 3 latent frames of 8 × 12
            inp.update(width=96, height=64, length=9, batch_size=min(inp["batch_size"], 2))
        elif kind in ("EmptyLatentImage", "ImageScale"):
            inp.update(width=size, height=size, **({"batch_size": min(inp["batch_size"], 2)} if "batch_size" in inp
                                                   else {}))
        inp.update(SMALL.get(kind, {}))
        if kind not in info and nid in g:
            if nid in consumed:
                pytest.skip(f"this ComfyUI has no {kind}")
            del g[nid]  # an output-only node this ComfyUI lacks (Plot Loss Graph before 2025, Preview Any)
    for inp in (node["inputs"] for node in g.values()):
        inp.update({k: redirect[tuple(v)] for k, v in inp.items() if isinstance(v, list) and tuple(v) in redirect})
    for nid in [n for n, node in g.items() if node["class_type"] == "KSampler"]:
        g[f"digest{nid}"] = {"class_type": "DeltaConvTestDigest", "inputs": {
            "samples": [nid, 0], "model": g[nid]["inputs"]["model"]}}
    return g, unet


def patched(g, ref):
    node = g[ref[0]]
    return node["class_type"] == "DeltaConvPatch" or ("model" in node["inputs"] and patched(g, node["inputs"]["model"]))


@pytest.fixture(scope="module")
def tiny_run(comfy_server, object_info, tiny_inputs, pack):
    """run(name): the workflow's API twin run once on tiny models, for every test that reads it: {graph, unet,
    outputs, written}; `written`: node id → the files a ΔConv Save or Distill node wrote, removed again so the
    shared server's folders stay as other tests expect them."""
    from devkit.tiny_models import has_pixart, has_wan

    runs = {}

    def run(name):
        if name in NOT_RUN or (family(name) == "pixart" and not has_pixart()):
            pytest.skip(NOT_RUN.get(name, "this ComfyUI has no PixArt"))
        if family(name) == "wan" and not has_wan():
            pytest.skip("this ComfyUI has no Wan")
        if name not in runs:
            g, unet = tiny_graph(name, load(name)[1], object_info)
            if (any(n["class_type"] == "DeltaConvDistillSimple" for n in g.values())
                    and pack.nodes.compat.LEGACY_ATTN1_CALL):
                pytest.skip("ΔConv Distill (simple) runs its check preset here, whose stage B needs ComfyUI from "
                            "mid-2024 on")
            outputs = comfy_server.run(g, timeout=300)["outputs"]
            runs[name] = {"graph": g, "unet": unet, "outputs": outputs, "written": written_files(g, outputs,
                                                                                                 comfy_server.base)}
        return runs[name]

    return run


def written_files(g, outputs, base):
    """{node id: files} a ΔConv Save (its path output) or Distill (its run-numbered checkpoints) wrote; removed."""
    written = {}
    for nid, node in g.items():
        if node["class_type"] == "DeltaConvSave":
            written[nid] = [p for p in outputs[nid]["text"][:1] if os.path.isfile(p)]
        if node["class_type"] in ("DeltaConvDistill", "DeltaConvDistillSimple"):
            folder = os.path.join(base, "output", "deltaconv")
            run = re.compile(re.escape(node["inputs"]["filename_prefix"]) + r"(_\d{5})?_[AB]_")
            written[nid] = [os.path.join(folder, f) for f in os.listdir(folder) if run.match(f)]
    for path in (p for files in written.values() for p in files):
        os.remove(path)
    return written


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_on_tiny_models(name, tiny_run):
    from devkit.tiny_models import SITE_COUNTS

    run = tiny_run(name)
    g, unet, outputs = run["graph"], run["unet"], run["outputs"]
    digests = {k[len("digest"):]: outputs[k]["digest"][0] for k in outputs if k.startswith("digest")}
    # ΔConv Compare samples inside the node: its report gives the ΔConv calls, and PSNR when the images differ
    compares = [outputs[nid]["text"][0] for nid, node in g.items() if node["class_type"] == "DeltaConvCompare"]
    assert (digests or compares) and all(d["finite"] for d in digests.values())
    assert all(" dB, SSIM " in report for report in compares), compares
    for nid, d in digests.items():
        if patched(g, g[nid]["inputs"]["model"]):
            assert d["patched_sites"] == SITE_COUNTS[unet] and set(d["counts"]) <= {"deltaconv"}, (nid, d)
        else:
            assert d["patched_sites"] == 0
    delta_calls = sum(d["counts"].get("deltaconv", 0) for d in digests.values())
    delta_calls += sum(int(m[1]) for report in compares if (m := re.search(r"(\d+) ran ΔConv", report)))
    assert delta_calls > 0, "ΔConv never ran"
    if "students" in name:  # and mediator attention, in its own Compare
        assert any(re.search(r"[1-9]\d* ran mediator attention", report) for report in compares), compares
    if name.endswith("_compare"):  # attention and ΔConv from the same seed differ
        assert len({d["sha256"] for d in digests.values()}) == len(digests) == 2
    for nid, node in g.items():
        if node["class_type"] in ("SaveImage", "SaveAnimatedWEBP"):
            assert outputs[nid]["images"], nid
    assert all(run["written"].values()), run["written"]  # each Save wrote its file, each Distill its checkpoints


@pytest.mark.parametrize("name", NAMES)
def test_display_nodes_show_results(name, tiny_run, object_info):
    """After a run, each Preview Any holds what its ΔConv node reported: the report text, or PSNR/SSIM as numbers."""
    from devkit.tiny_models import SITE_COUNTS

    if DISPLAY not in object_info:
        pytest.skip(NO_DISPLAY)
    run = tiny_run(name)
    g, outputs = run["graph"], run["outputs"]
    displays = {nid: node["inputs"]["source"] for nid, node in g.items() if node["class_type"] == DISPLAY}
    assert displays
    for nid, (src, slot) in displays.items():
        shown, output = outputs[nid]["text"][0], object_info[g[src]["class_type"]]["output_name"][slot]
        own = outputs.get(src, {}).get("text", [""])[0]  # output nodes (Compare, Locality) show their report too
        if output == "report" and own:
            assert shown == own, nid
        elif output == "report":  # ΔConv Patch's report: the history has no other copy
            assert shown.startswith(f"ΔConv patch: {SITE_COUNTS[run['unet']]} of "), shown
        else:  # the numbers the Compare report states
            assert f"{output.upper()} {float(shown):{'.2f' if output == 'psnr' else '.4f'}}" in own, (shown, own)


# --- templates --------------------------------------------------------------------------------------------------

def test_template_route_lists_the_workflows(comfy_server):
    try:
        templates = comfy_server.get("/workflow_templates")
    except urllib.error.HTTPError as e:
        pytest.skip(f"this ComfyUI has no /workflow_templates route ({e.code})")
    assert sorted(templates["ComfyUI-DeltaConv"]) == NAMES
    route = f"{comfy_server.url}/api/workflow_templates/ComfyUI-DeltaConv/{NAMES[0]}"
    with urllib.request.urlopen(f"{route}.json") as r:
        assert json.loads(r.read()) == load(NAMES[0])[0]
    with urllib.request.urlopen(f"{route}.jpg") as r:
        assert r.read(3) == b"\xff\xd8\xff"


def test_files_are_what_the_generator_makes(comfy_server, object_info):
    from workflowgen import build_all

    version = comfy_server.get("/system_stats").get("system", {}).get("comfyui_version")
    made_with = {n["properties"].get("ver") for n in load(NAMES[0])[0]["nodes"] if n["type"] == "KSampler"}
    if made_with != {version}:
        pytest.skip(f"workflows were generated against ComfyUI {made_with}, this is {version}")
    built = build_all(object_info, version)
    assert sorted(built) == NAMES
    for name, (_, ui, api) in built.items():
        assert (ui, api) == load(name), f"{name} is stale: run scripts/make_workflows.py"
