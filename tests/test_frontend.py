"""Opt-in: every example workflow opened in ComfyUI's own web frontend, in headless Chromium (skipped without one).

    COMFYUI_PATH=... .venv/bin/pytest tests/test_frontend.py -q
    DELTACONV_SCREENSHOTS=dir  also keeps one PNG per workflow in dir (else under pytest's tmp dir)
    DELTACONV_README_IMAGES=1  also writes the README picture to docs/images/

Per workflow it checks what a new user would see on opening it, as from the Templates browser, with the models it
names downloaded (empty placeholder files under those names): one workflow tab, named after the workflow; every node
type known (the IP-Adapter pack's nodes are not installed here) and built (a node the frontend fails to build is drawn
outlined in red); no dialog (the missing-models one only for files in folders this server lacks); text drawn at the
saved zoom; each Preview Any connected as in the file. The README picture's workflow, on a 1920×1080 screen, fits
whole; the picture is written only when every check passed.
"""
import glob
import json
import os
import shutil

import pytest

from devkit.comfy_server import MODEL_FOLDERS
from devkit.headless_chromium import Chromium, find_chromium
from workflowgen.models import USER_FILES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(REPO, "workflows", "*.json")))
THIRD_PARTY_PREFIXES = ("IPAdapter",)  # cubiq's ComfyUI_IPAdapter_plus: not installed on the test server
README_PICTURE = "deltaconv_sd15_txt2img_compare"
README_SCREEN = (1920, 1080)  # a common screen: the README picture shows the whole graph at the saved zoom
# Frontend 1.27 maps model folders to these loaders; when one is not on the server (UpscaleModelLoader: its
# comfy_extras module needs spandrel) it fails to build every node with an ASSET_INPUTS widget (isAssetBrowserEligible)
# and draws it outlined in red. A user's ComfyUI has them all; a test server without spandrel does not.
MODEL_NODE_PROVIDERS = ("CheckpointLoaderSimple", "ImageOnlyCheckpointLoader", "LoraLoader", "LoraLoaderModelOnly",
                        "VAELoader", "ControlNetLoader", "UNETLoader", "UpscaleModelLoader", "StyleModelLoader",
                        "GLIGENLoader")
ASSET_INPUTS = {"ckpt_name", "lora_name", "vae_name"}

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no Chromium found (Debian: apt-get install "
                                "chromium chromium-driver); this frontend check is opt-in")

# The workflow opened as the Templates browser opens one (a tab named after it), then the tabs open before closed.
OPEN = """(async () => {
  const store = app.extensionManager.workflow;
  await app.loadGraphData(%s, true, true, %s);
  for (const w of store.openWorkflows.filter(w => w !== store.activeWorkflow)) await store.closeWorkflow(w);
  return true;
})()"""
STATE = """(() => {
  const ds = app.canvas.ds, canvas = app.canvas.canvas.getBoundingClientRect();
  const rects = app.graph.nodes.map(n => n.boundingRect);  // title bars included
  const screen = (x, y) => [(x + ds.offset[0]) * ds.scale + canvas.left, (y + ds.offset[1]) * ds.scale + canvas.top];
  return JSON.stringify({
    scale: ds.scale,
    lowQuality: app.canvas.low_quality,
    unknown: app.graph.nodes.filter(n => !(n.type in LiteGraph.registered_node_types)).map(n => n.type),
    broken: app.graph.nodes.filter(n => n.has_errors).map(n => n.type),
    tabs: [...document.querySelectorAll('.workflow-tabs .p-togglebutton')].map(t => t.innerText.split('\\n')[0].trim()),
    dialogs: [...document.querySelectorAll('.p-dialog')].map(d => d.innerText.trim().split('\\n')[0]),
    displays: Object.fromEntries(app.graph.nodes.filter(n => n.type === 'PreviewAny').map(n => {
      const link = n.getInputLink(0);
      return [n.id, link && [link.origin_id, link.origin_slot]];
    })),
    graph: [...screen(Math.min(...rects.map(r => r[0])), Math.min(...rects.map(r => r[1]))),
            ...screen(Math.max(...rects.map(r => r[0] + r[2])), Math.max(...rects.map(r => r[1] + r[3])))],
    canvas: [canvas.left, canvas.top, canvas.right, canvas.bottom],
  });
})()"""
CLOSE_DIALOGS = """(() => { document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close')
  .forEach(b => b.click()); return document.querySelectorAll('.p-dialog').length; })()"""
NEXT_FRAME = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def absent_models(workflow: dict) -> list[str]:
    """Model files of the workflow in folders this test server does not have (IP-Adapter's), so no placeholder."""
    return [m["name"] for m in workflow["models"] if m["directory"] not in MODEL_FOLDERS]


@pytest.fixture(scope="module")
def placeholders(server):
    """Empty files under every model name the workflows use (and the user's own mediator file), where the server
    looks for them: the loaders then list those names, as for a user who downloaded the models. Removed afterwards."""
    wanted = {os.path.join(MODEL_FOLDERS["deltaconv"], name) for name in USER_FILES.values()}
    wanted |= {os.path.join(MODEL_FOLDERS[m["directory"]], m["name"])
               for path in WORKFLOWS for m in load(path)["models"] if m["directory"] in MODEL_FOLDERS}
    made = [p for p in (os.path.join(server.base, w) for w in sorted(wanted)) if not os.path.exists(p)]
    for path in made:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()
    yield
    for path in made:
        os.remove(path)


@pytest.fixture(scope="module")
def frontend(server, placeholders):
    if not server.get("/system_stats").get("system", {}).get("comfyui_version"):
        pytest.skip("this ComfyUI predates the separately packaged frontend (1.x) whose format the workflows use")
    browser = Chromium(find_chromium())
    try:
        browser.navigate(server.url)
        browser.wait_for("window.app && app.graph && app.canvas ? true : null", timeout=120)
        yield browser
    finally:
        browser.close()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def asset_loader_bug(broken: list[str], object_info: dict) -> str | None:
    """Why the frontend could not build `broken`, when the server's missing model loaders explain all of it."""
    lacking = [t for t in MODEL_NODE_PROVIDERS if t not in object_info]
    if lacking and all(ASSET_INPUTS & set(object_info.get(t, {}).get("input", {}).get("required", {}))
                       for t in broken):
        return (f"this server lacks {lacking} (UpscaleModelLoader needs spandrel: pip install --no-deps spandrel), "
                f"so frontend 1.27 cannot build {sorted(set(broken))}; a user's ComfyUI has them")
    return None


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory):
    path = os.environ.get("DELTACONV_SCREENSHOTS") or str(tmp_path_factory.mktemp("frontend_screenshots"))
    os.makedirs(path, exist_ok=True)
    return path


def open_workflow(frontend, name: str, workflow: dict) -> dict:
    frontend.wait_for(f"({CLOSE_DIALOGS}) === 0 ? true : null", timeout=10)  # the welcome and earlier dialogs
    frontend.evaluate(OPEN % (json.dumps(workflow), json.dumps(name)))
    # Wait for a frame drawn at the loaded zoom (low_quality is set while drawing).
    frontend.evaluate(f"(app.canvas.setDirty(true, true), {NEXT_FRAME})")
    state = json.loads(frontend.evaluate(STATE))
    frontend.wait_for(f"({CLOSE_DIALOGS}) === 0 ? true : null", timeout=10)
    frontend.evaluate(NEXT_FRAME)
    return state


def file_displays(workflow: dict) -> dict:
    """{Preview Any id: [origin id, origin slot]} as the workflow file connects them."""
    links = {lk[0]: lk for lk in workflow["links"]}
    return {str(n["id"]): links[n["inputs"][0]["link"]][1:3] for n in workflow["nodes"] if n["type"] == "PreviewAny"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: os.path.basename(p)[:-5])
def test_workflow_opens_readable(frontend, object_info, screenshot_dir, path):
    name = os.path.basename(path)[:-5]
    workflow = load(path)
    shot = os.path.join(screenshot_dir, f"{name}.png")
    frontend.set_viewport(README_SCREEN if name == README_PICTURE else None)
    frontend.evaluate(NEXT_FRAME)  # the canvas follows the new size
    try:
        state = open_workflow(frontend, name, workflow)
        frontend.screenshot(shot)
    finally:
        frontend.set_viewport(None)

    assert state["tabs"] == [name], f"workflow tabs: {state['tabs']}; screenshot {shot}"
    unknown = [t for t in state["unknown"] if not t.startswith(THIRD_PARTY_PREFIXES)]
    assert not unknown, f"node types the frontend does not know: {unknown}"
    allowed = (("Missing Models",) if absent_models(workflow) else ()) + (
        ("Some Nodes Are Missing",) if state["unknown"] else ())  # only third-party ones
    dialogs = [d for d in state["dialogs"] if not d.startswith(allowed)]
    assert not dialogs, f"dialogs on opening: {dialogs}"
    assert state["displays"] == file_displays(workflow), "Preview Any nodes missing or connected otherwise"
    if name == README_PICTURE:
        (left, top, right, bottom), (c_left, c_top, c_right, c_bottom) = state["graph"], state["canvas"]
        assert c_left <= left and c_top <= top and right <= c_right and bottom <= c_bottom, (
            f"graph {state['graph']} not inside the canvas {state['canvas']}; screenshot {shot}")
    saved = workflow["extra"]["ds"]["scale"]  # the generator saves ≥ 0.75 (test_workflows checks it)
    assert not state["lowQuality"], f"no text drawn at zoom {state['scale']} (saved {saved}); screenshot {shot}"
    broken = [t for t in state["broken"] if not t.startswith(THIRD_PARTY_PREFIXES)]
    if broken and (why := asset_loader_bug(broken, object_info)):
        pytest.xfail(f"{why}; screenshot {shot}")
    assert not broken, f"nodes the frontend could not build (outlined in red): {broken}; screenshot {shot}"
    if name == README_PICTURE and os.environ.get("DELTACONV_README_IMAGES"):  # only a picture that passed
        os.makedirs(os.path.join(REPO, "docs", "images"), exist_ok=True)
        shutil.copyfile(shot, os.path.join(REPO, "docs", "images", "workflow_sd15_txt2img_compare.png"))


# Each choice with a text older releases saved set to that text, the graph saved and opened again, then queued.
AS_SAVED_BEFORE = """(async () => {
  const legacy = %s;  // node type → input → {old text: key}
  const old = (n, w) => Object.keys(legacy[n.type]?.[w.name] || {}).find(t => legacy[n.type][w.name][t] === w.value);
  for (const n of app.graph.nodes) for (const w of n.widgets || []) if (old(n, w)) w.value = old(n, w);
  await app.loadGraphData(app.graph.serialize(), true, true, 'saved_before');
  const sent = (await app.graphToPrompt()).output;
  const olds = (n) => n.widgets.filter(w => legacy[n.type][w.name]?.[w.value]);
  return JSON.stringify(Object.fromEntries(app.graph.nodes.filter(n => legacy[n.type]).map(n => [n.id, {
    broken: !!n.has_errors, shown: Object.fromEntries(olds(n).map(w => [w.name, w.value])),
    sent: Object.fromEntries(olds(n).map(w => [w.name, sent[n.id].inputs[w.name]]))}])));
})()"""


@pytest.mark.parametrize("name", ["deltaconv_distill_simple", "deltaconv_distill_data_free"])
def test_workflow_saved_with_old_choice_texts_opens_and_queues_them(frontend, pack, name):
    """The frontend shows an old text as it is (not a choice of the list, but not an error either) and queues it;
    the server accepts it and runs the key (test_e2e_legacy_choices.py)."""
    legacy = {key: cls.LEGACY_CHOICES for key, cls in pack.NODE_CLASS_MAPPINGS.items()
              if hasattr(cls, "LEGACY_CHOICES")}
    with open(os.path.join(REPO, "workflows", "api", f"{name}.api.json")) as f:
        api = json.load(f)
    expected = {}  # node id → {input: the key it holds, where an old text maps to it}
    for node_id, node in api.items():
        if node["class_type"] in legacy:
            tables = legacy[node["class_type"]]
            expected[node_id] = {i: v for i, v in node["inputs"].items() if v in tables.get(i, {}).values()}
    open_workflow(frontend, name, load(os.path.join(REPO, "workflows", f"{name}.json")))
    nodes = json.loads(frontend.evaluate(AS_SAVED_BEFORE % json.dumps(legacy)))
    frontend.wait_for(f"({CLOSE_DIALOGS}) === 0 ? true : null", timeout=10)
    assert any(expected.values()) and nodes.keys() == expected.keys()
    for node_id, node in nodes.items():
        table = legacy[api[node_id]["class_type"]]
        assert not node["broken"] and node["sent"] == node["shown"], node
        assert {i: table[i][text] for i, text in node["shown"].items()} == expected[node_id], node
