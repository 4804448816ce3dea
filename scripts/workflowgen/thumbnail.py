"""Workflow thumbnails (workflows/<name>.jpg): a schematic of the graph, as ComfyUI's Templates browser shows it."""

LINK_COLORS = {"MODEL": "#b39ddb", "CLIP": "#ffd500", "VAE": "#ff6e6e", "CONDITIONING": "#ffa931",
               "LATENT": "#ff9cf9", "IMAGE": "#64b5f6", "MASK": "#81c784", "DELTACONV": "#c77dff",
               "CONTROL_NET": "#00d6a3", "LOSS_MAP": "#e0e0e0", "IPADAPTER": "#7bd4ff"}


def thumbnail(wf, title, info, path, size=(512, 384), ss=2):
    """A schematic of the graph: the UI's columns and rows as equal boxes, wires coloured by type, ΔConv outlined."""
    from PIL import Image, ImageDraw, ImageFont

    def font(px, bold=False):
        name = f"DejaVuSans{'-Bold' if bold else ''}.ttf"
        for f in (name, f"/usr/share/fonts/truetype/dejavu/{name}"):
            try:
                return ImageFont.truetype(f, px * ss)
            except OSError:
                pass
        return ImageFont.load_default(px * ss)

    W, H = size[0] * ss, size[1] * ss
    img = Image.new("RGB", (W, H), "#1b1b1f")
    draw = ImageDraw.Draw(img)
    draw.text((14 * ss, 10 * ss), title, fill="#f2f2f2", font=font(17, True))
    draw.text((14 * ss, 34 * ss), "ComfyUI-DeltaConv example workflow", fill="#c77dff", font=font(11))
    nodes = [n for n in wf["nodes"] if n["type"] != "Note"]
    xs = sorted({n["pos"][0] for n in nodes})
    cols = [sorted((n for n in nodes if n["pos"][0] == x), key=lambda n: n["pos"][1]) for x in xs]
    top, pad, gap = 62 * ss, 12 * ss, 10 * ss
    rows = max(len(c) for c in cols)
    bw = (W - 2 * pad - gap * (len(cols) - 1)) / len(cols)
    bh = min(44 * ss, (H - top - pad - gap * (rows - 1)) / rows)
    boxes = {}
    for c, col in enumerate(cols):
        y = top + ((H - top - pad) - (len(col) * bh + (len(col) - 1) * gap)) / 2
        for n in col:
            boxes[n["id"]] = (pad + c * (bw + gap), y, pad + c * (bw + gap) + bw, y + bh)
            y += bh + gap
    for _, a, a_slot, b, b_slot, kind in wf["links"]:
        (_, ay, ax, ay1), (bx, by, _, by1) = boxes[a][:4], boxes[b][:4]
        n_out = max(len(next(n for n in nodes if n["id"] == a)["outputs"]), 1)
        n_in = max(len(next(n for n in nodes if n["id"] == b)["inputs"]), 1)
        p0 = (ax, ay + (ay1 - ay) * (a_slot + 1) / (n_out + 1))
        p3 = (bx, by + (by1 - by) * (b_slot + 1) / (n_in + 1))
        dx = max((p3[0] - p0[0]) * 0.5, 12 * ss)
        pts = [tuple((1 - t) ** 3 * p0[j] + 3 * (1 - t) ** 2 * t * (p0[j] + (dx if j == 0 else 0))
                     + 3 * (1 - t) * t ** 2 * (p3[j] - (dx if j == 0 else 0)) + t ** 3 * p3[j] for j in range(2))
               for t in (i / 40 for i in range(41))]
        draw.line(pts, fill=LINK_COLORS.get(kind, "#aaaaaa"), width=int(1.6 * ss), joint="curve")
    label_font = font(8 if bw < 60 * ss else 9)
    for n in nodes:
        x, y, xe, ye = boxes[n["id"]]
        ours = n["properties"].get("cnr_id") == "deltaconv"
        draw.rounded_rectangle((x, y, xe, ye), radius=4 * ss, fill=n.get("bgcolor") or "#3a3a3f",
                               outline="#c77dff" if ours else "#6a6a74", width=(2 if ours else 1) * ss)
        label = n.get("title") or info.get(n["type"], {}).get("display_name") or n["type"]
        words, lines = label.split(), [""]
        for w in words:  # wrap into the box, two lines at most
            trial = f"{lines[-1]} {w}".strip()
            if draw.textlength(trial, font=label_font) <= xe - x - 6 * ss or not lines[-1]:
                lines[-1] = trial
            elif len(lines) < 2:
                lines.append(w)
            else:
                lines[-1] += " …"
                break
        for i, line in enumerate(lines):
            while len(line) > 1 and draw.textlength(line, font=label_font) > xe - x - 6 * ss:
                line = line[:-2] + "…"
            draw.text((x + 3 * ss, y + 3 * ss + i * 11 * ss), line, fill="#ececec", font=label_font)
    img.resize(size, Image.LANCZOS).save(path, "JPEG", quality=90, optimize=True)
