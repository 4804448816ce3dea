"""Compact graph → ComfyUI's UI (litegraph) workflow and its API-format twin, laid out in columns by graph depth.

Widget order, sockets and outputs come from real node schemas (/object_info), so the files match what the editor
builds for the same nodes.
"""
import textwrap
import uuid

from .schemas import THIRD_PARTY_PACKS

FRONTEND_VERSION = "1.27.10"  # the frontend that ComfyUI 0.3.64 ships; the format is the same for older ones
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLORS = {"purple": ("#323", "#535"), "green": ("#232", "#353"), "red": ("#322", "#533"), "note": ("#432", "#653")}
# How a workflow opens in frontend 1.27. Below zoom ~0.57 it draws no node text, so the saved zoom is at least
# MIN_ZOOM (a larger graph opens partly off screen instead of unreadable). The canvas begins right of the side bar and
# below the menu bar, and badges such as "[BETA] DeltaConv" are drawn above a node's title bar: the graph's corner,
# title bars included, is placed MARGIN screen pixels inside the canvas. VIEW: the canvas of a 1600×900 page
# (1536×822, measured in headless Chromium) less the margins.
MIN_ZOOM = 0.75
MARGIN = (30, 40)
VIEW = (1480, 760)
TITLE_HEIGHT = 30  # a node's title bar sits above its pos
# A Note's text area: 10 px monospace (the frontend's default textarea font; 6.0 px a character, lines 12 px),
# NOTE_INSET the pixels of the node it leaves free across and down.
NOTE_WIDTH, NOTE_INSET, CHAR_WIDTH, LINE_HEIGHT = 360, (24, 36), 6.1, 13


def schema_inputs(schema):
    """[(name, spec, required)] in the order the frontend builds widgets and sockets."""
    order = schema.get("input_order") or {k: list(v) for k, v in schema["input"].items()}
    return [(name, schema["input"][section][name], section == "required")
            for section in ("required", "optional") for name in order.get(section, [])]


def is_widget(spec):
    opts = spec[1] if len(spec) > 1 else {}
    return (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and not opts.get("forceInput")


def widget_values(name, spec, value):
    opts = spec[1] if len(spec) > 1 else {}
    values = [value]
    if spec[0] == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
        values.append(getattr(value, "control", "randomize"))
    if opts.get("image_upload"):
        values.append("image")
    return values


def default(spec):
    opts = spec[1] if len(spec) > 1 else {}
    if "default" in opts:
        return opts["default"]
    return spec[0][0] if isinstance(spec[0], list) and spec[0] else None


def node_size(schema, sockets, n_widgets, class_type):
    width = 400 if class_type.startswith("CLIPTextEncode") else 315
    height = 30 + 22 * max(len(sockets), len(schema["output"]), 1) + 24 * n_widgets
    height += sum(80 for _, spec, _ in schema_inputs(schema) if spec[0] == "STRING" and is_widget(spec)
                  and (spec[1] if len(spec) > 1 else {}).get("multiline"))
    if class_type in ("LoadImage", "SaveImage", "PreviewImage"):
        height += 240
    return [width, height]


def note_lines(text, width=NOTE_WIDTH):
    """Lines the text takes in a note `width` wide: each paragraph wrapped at words, as the text area does."""
    per_line = int((width - NOTE_INSET[0]) / CHAR_WIDTH)
    return sum(max(1, len(textwrap.wrap(paragraph, per_line))) for paragraph in text.split("\n"))


def note_size(text):
    return [NOTE_WIDTH, NOTE_INSET[1] + LINE_HEIGHT * note_lines(text)]


def view(nodes):
    """The saved zoom and offset: the whole graph when it fits at MIN_ZOOM or more, its corner MARGIN inside."""
    left = min(n["pos"][0] for n in nodes)
    top = min(n["pos"][1] for n in nodes) - TITLE_HEIGHT
    width = max(n["pos"][0] + n["size"][0] for n in nodes) - left
    height = max(n["pos"][1] + n["size"][1] for n in nodes) - top
    scale = round(min(1.0, max(MIN_ZOOM, min(VIEW[0] / width, VIEW[1] / height))), 3)
    return {"scale": scale, "offset": [round(MARGIN[0] / scale - left, 1), round(MARGIN[1] / scale - top, 1)]}


def layout(keys, links):
    """Columns by graph depth (sources as late as their first consumer allows), rows by the barycentre of neighbours."""
    srcs = {k: [s for s, _, t in links if t == k] for k in keys}
    dsts = {k: [t for s, _, t in links if s == k] for k in keys}
    depth = {}

    def d(k):
        if k not in depth:
            depth[k] = 1 + max((d(s) for s in srcs[k]), default=-1)
        return depth[k]

    for k in keys:
        d(k)
    for k in keys:  # loaders and empty latents sit right before their first consumer
        if not srcs[k] and dsts[k]:
            depth[k] = min(depth[t] for t in dsts[k]) - 1
    cols = {}
    for k in keys:
        cols.setdefault(depth[k], []).append(k)
    rank = {k: i for i, k in enumerate(keys)}
    for _ in range(2):
        for c in sorted(cols):
            def bary(k, c=c):
                near = [rank[s] for s in srcs[k] if depth[s] < c] + [rank[t] for t in dsts[k] if depth[t] > c]
                return sum(near) / len(near) if near else rank[k]
            cols[c].sort(key=lambda k: (bary(k), rank[k]))
            for i, k in enumerate(cols[c]):
                rank[k] = i + c * 0.001
    return depth, cols


def to_ui(name, title, graph, note, info, versions):
    """Compact description → (UI workflow, API prompt); `versions`: Comfy Registry id → properties.ver."""
    keys = list(graph)
    ids = {k: i + 2 for i, k in enumerate(keys)}  # id 1 is the note
    api, nodes = {}, {}
    links = [(v[0], v[1], k) for k in keys for v in graph[k]["inputs"].values() if isinstance(v, tuple)]
    depth, cols = layout(keys, links)
    order = {k: i for i, k in enumerate(sorted(keys, key=lambda k: (depth[k], keys.index(k))))}
    ui_links = []
    for k in keys:
        node, schema = graph[k], info[graph[k]["class_type"]]
        unknown = set(node["inputs"]) - {n for n, _, _ in schema_inputs(schema)}
        if unknown:
            raise SystemExit(f"{name}/{k}: {node['class_type']} has no input(s) {sorted(unknown)}")
        undeclared = [n for n, spec, _ in schema_inputs(schema) if isinstance(spec[0], list)
                      and "default" not in (spec[1] if len(spec) > 1 else {})]
        if node["class_type"].startswith("DeltaConv") and undeclared:  # the frontend would show 'undefined'
            raise SystemExit(f"{name}/{k}: {node['class_type']} declares no default for its choice(s) {undeclared}")
        inputs, widgets, api_inputs = [], [], {}
        for iname, spec, required in schema_inputs(schema):
            value = node["inputs"].get(iname)
            if is_widget(spec):
                if isinstance(value, tuple):
                    raise SystemExit(f"{name}/{k}: {iname} is a widget; links into widgets are not supported here")
                value = default(spec) if value is None else value
                widgets += widget_values(iname, spec, value)
                api_inputs[iname] = value
            else:
                if value is None and required:
                    raise SystemExit(f"{name}/{k}: required input {iname} is not connected")
                inputs.append({"name": iname, "type": spec[0], "link": None})
                if value is not None:
                    api_inputs[iname] = [str(ids[value[0]]), value[1]]
                    ui_links.append([len(ui_links) + 1, ids[value[0]], value[1], ids[k], len(inputs) - 1,
                                     spec[0], inputs[-1]])
        category = schema.get("category", "")
        cnr = ("deltaconv" if node["class_type"].startswith("DeltaConv") else
               THIRD_PARTY_PACKS.get(category.split("/")[0], "comfy-core"))
        props = {"Node name for S&R": node["class_type"], "cnr_id": cnr}
        ver = versions.get(cnr)
        if ver:
            props["ver"] = ver
        models = node.get("models") or [m for v in node["inputs"].values() for m in getattr(v, "models", [])]
        if models:
            props["models"] = models
        size = node.get("size") or node_size(schema, inputs, len(widgets), node["class_type"])
        ui = {"id": ids[k], "type": node["class_type"], "pos": [0, 0], "size": size, "flags": {}, "order": order[k] + 1,
              "mode": 0, "inputs": inputs,
              "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                          for i, (t, n) in enumerate(zip(schema["output"], schema["output_name"], strict=False))],
              "properties": props, "widgets_values": widgets}
        if node.get("title"):
            ui["title"] = node["title"]
        if node.get("color"):
            ui["color"], ui["bgcolor"] = COLORS[node["color"]]
        nodes[k] = ui
        api[str(ids[k])] = {"inputs": api_inputs, "class_type": node["class_type"],
                            "_meta": {"title": node.get("title") or schema.get("display_name") or node["class_type"]}}
    by_id = {n["id"]: n for n in nodes.values()}
    for link in ui_links:
        link[6]["link"] = link[0]
        by_id[link[1]]["outputs"][link[2]]["links"].append(link[0])
        del link[6]
    # positions: a note column, then one column per depth
    x = 40
    note_node = {"id": 1, "type": "Note", "pos": [x, 40], "size": note_size(note), "flags": {}, "order": 0,
                 "mode": 0, "inputs": [], "outputs": [], "title": title, "properties": {}, "widgets_values": [note],
                 "color": COLORS["note"][0], "bgcolor": COLORS["note"][1]}
    x += NOTE_WIDTH + 60
    for c in sorted(cols):
        y = 40
        for k in cols[c]:
            nodes[k]["pos"] = [x, y]
            y += nodes[k]["size"][1] + 50
        x += max(nodes[k]["size"][0] for k in cols[c]) + 60
    ui_nodes = [note_node] + [nodes[k] for k in keys]
    wf = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"deltaconv/{name}")), "revision": 0,
          "last_node_id": max(n["id"] for n in ui_nodes), "last_link_id": len(ui_links),
          "nodes": ui_nodes, "links": ui_links, "groups": [], "config": {},
          # every model once more at the top: the frontend lists a node's models only when a widget names the file
          "models": list({m["url"]: m for n in ui_nodes for m in n["properties"].get("models", [])}.values()),
          "extra": {"ds": view(ui_nodes), "frontendVersion": FRONTEND_VERSION}, "version": 0.4}
    return wf, api
