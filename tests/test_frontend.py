"""Opt-in: every example workflow opened in ComfyUI's own web frontend, in headless Chromium (skipped without one).

    COMFYUI_PATH=... .venv/bin/pytest tests/test_frontend.py -q
    DELTACONV_SCREENSHOTS=dir  also keeps one PNG per workflow in dir (else under pytest's tmp dir)
    DELTACONV_README_IMAGES=1  also writes the README picture to docs/images/

Per workflow it checks what a new user would see on opening it: every node type known (the IP-Adapter pack's
nodes are not installed here), no dialog other than the missing-models one, and text drawn at the saved zoom.
"""
import glob
import json
import os
import shutil

import pytest

from devkit.headless_chromium import Chromium, find_chromium

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(REPO, "workflows", "*.json")))
THIRD_PARTY_PREFIXES = ("IPAdapter",)  # cubiq's ComfyUI_IPAdapter_plus: not installed on the test server
ALLOWED_DIALOGS = ("Missing Models",)
README_PICTURE = "deltaconv_sd15_txt2img_compare"
GENERATOR_ZOOM = 0.75  # issue 14 item 7: the workflow generator saves at least this zoom

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no Chromium found (Debian: apt-get install "
                                "chromium chromium-driver); this frontend check is opt-in")

STATE = """JSON.stringify({
  scale: app.canvas.ds.scale,
  lowQuality: app.canvas.low_quality,
  unknown: app.graph.nodes.filter(n => !(n.type in LiteGraph.registered_node_types)).map(n => n.type),
  dialogs: [...document.querySelectorAll('.p-dialog')].map(d => d.innerText.trim().split('\\n')[0]),
})"""
CLOSE_DIALOGS = """(() => { document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close')
  .forEach(b => b.click()); return document.querySelectorAll('.p-dialog').length; })()"""


@pytest.fixture(scope="module")
def frontend(server):
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
def screenshot_dir(tmp_path_factory):
    path = os.environ.get("DELTACONV_SCREENSHOTS") or str(tmp_path_factory.mktemp("frontend_screenshots"))
    os.makedirs(path, exist_ok=True)
    return path


def open_workflow(frontend, workflow: dict) -> dict:
    frontend.wait_for(f"({CLOSE_DIALOGS}) === 0 ? true : null", timeout=10)  # the welcome and earlier dialogs
    frontend.evaluate(f"app.loadGraphData({json.dumps(workflow)}).then(() => true)")
    # Wait for a frame drawn at the loaded zoom (low_quality is set while drawing).
    frontend.evaluate("new Promise(r => { app.canvas.setDirty(true, true); requestAnimationFrame(() => "
                      "requestAnimationFrame(r)); })")
    state = json.loads(frontend.evaluate(STATE))
    frontend.wait_for(f"({CLOSE_DIALOGS}) === 0 ? true : null", timeout=10)
    frontend.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    return state


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: os.path.basename(p)[:-5])
def test_workflow_opens_readable(frontend, screenshot_dir, path):
    name = os.path.basename(path)[:-5]
    with open(path) as f:
        workflow = json.load(f)
    state = open_workflow(frontend, workflow)
    shot = os.path.join(screenshot_dir, f"{name}.png")
    frontend.screenshot(shot)
    if name == README_PICTURE and os.environ.get("DELTACONV_README_IMAGES"):
        os.makedirs(os.path.join(REPO, "docs", "images"), exist_ok=True)
        shutil.copyfile(shot, os.path.join(REPO, "docs", "images", "workflow_sd15_txt2img_compare.png"))

    unknown = [t for t in state["unknown"] if not t.startswith(THIRD_PARTY_PREFIXES)]
    assert not unknown, f"node types the frontend does not know: {unknown}"
    allowed = ALLOWED_DIALOGS + (("Some Nodes Are Missing",) if state["unknown"] else ())  # only third-party ones
    dialogs = [d for d in state["dialogs"] if not d.startswith(allowed)]
    assert not dialogs, f"dialogs on opening: {dialogs}"
    saved = workflow["extra"]["ds"]["scale"]
    if state["lowQuality"] and saved < GENERATOR_ZOOM:
        pytest.xfail(f"issue 14 item 7 (generator fix pending): saved zoom {saved} is below the frontend's "
                     f"text-drawing threshold, nodes open as blank boxes; screenshot {shot}")
    assert not state["lowQuality"], f"no text drawn at zoom {state['scale']} (saved {saved}); screenshot {shot}"
