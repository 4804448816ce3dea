"""docs/nodes.md agrees with the nodes: every input (name, optional or not, type, default, numeric range) and every
output (name, type) of each ΔConv node, read from its INPUT_TYPES and RETURN_* as ComfyUI reads them."""
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "nodes.md"
SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")


def doc_tables() -> dict:
    """Section title → (input rows, output rows), each row the table's cells."""
    sections, title = {}, None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            sections[title] = ([], [])
            current = None
        elif title and line.startswith("| input |"):
            current = sections[title][0]
        elif title and line.startswith("| output |"):
            current = sections[title][1]
        elif title and line.startswith("| `") and current is not None:
            current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif not line.startswith("|"):
            current = None
    return sections


def number(text: str) -> float:
    """A number as the docs write it: '10 000 000', '1e-7', '2⁶³−1'."""
    text = text.replace(" ", "").replace("\u202f", "").replace("−", "-").strip("`")
    power = re.fullmatch(r"2([⁰¹²³⁴⁵⁶⁷⁸⁹]+)(-1)?", text)
    if power:
        return 2 ** int(power[1].translate(SUPERSCRIPTS)) - (1 if power[2] else 0)
    return float(text)


def check_input(node: str, name: str, spec, cells: list[str]):
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    doc_type, doc_default = cells[1], cells[2].strip("`")
    where = f"{node}.{name}"
    if isinstance(kind, (list, tuple)):
        assert doc_type == "choice", where
        default = options.get("default")
        if doc_default.startswith("first"):  # the list's first entry (a folder's files may be none at all)
            assert default in (None, "", *kind[:1]), f"{where}: docs say the first choice, the node {default!r}"
        else:
            assert doc_default == default, f"{where}: docs say default {doc_default!r}, the node {default!r}"
        return
    assert doc_type == kind, f"{where}: docs say {doc_type}, the node {kind}"
    if kind == "BOOLEAN":
        assert doc_default == str(options.get("default", False)).lower(), where
    elif kind == "STRING":
        assert doc_default == (options.get("default") or "empty"), where
    elif kind in ("INT", "FLOAT"):
        assert number(doc_default) == pytest.approx(options["default"]), where
        if len(cells) == 5 and "–" in cells[3]:  # the allowed range: "min–max[, step s]"
            low, high = cells[3].split(",")[0].split("–")
            assert (number(low), number(high)) == (options["min"], options["max"]), f"{where}: range {cells[3]}"


def test_every_node_input_and_output_is_documented_as_it_is(pack):
    sections = doc_tables()
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        title = pack.NODE_DISPLAY_NAME_MAPPINGS[key]
        assert title in sections, f"docs/nodes.md has no section '## {title}'"
        inputs, outputs = sections[title]
        documented = {re.match(r"`(\w+)`", row[0])[1]: row for row in inputs}
        types = cls.INPUT_TYPES()
        declared = {name: (group, spec) for group in ("required", "optional")
                    for name, spec in types.get(group, {}).items()}
        assert set(documented) == set(declared), f"{title}: docs {sorted(documented)}, node {sorted(declared)}"
        for name, (group, spec) in declared.items():
            assert ("(optional)" in documented[name][0]) == (group == "optional"), f"{title}.{name}"
            check_input(title, name, spec, documented[name])
        names = getattr(cls, "RETURN_NAMES", None) or [t.lower() for t in cls.RETURN_TYPES]
        assert [(re.match(r"`(\w+)`", row[0])[1], row[1]) for row in outputs] == list(zip(names, cls.RETURN_TYPES)), \
            title
