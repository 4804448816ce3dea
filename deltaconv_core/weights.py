"""ΔConv weight files: the official ConvFusion releases and our own safetensors format.

Both store block tensors under the official keys `<block name>.conv1.<param>`: the student model's own state-dict
keys in diffusers naming, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.conv1.gates.1.conv_spatial.weight`.
Official files carry no metadata, so each block's configuration is inferred from tensor shapes and the family;
ours add a JSON description in the safetensors metadata. Ours may also hold mediator-attention students, under
`<block name>.mediators.<param>`, their metadata entry saying `"student": "mediators"` with heads and schedule;
entries without a student type are ΔConv blocks. Pickle formats are refused: never unpickle.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .block import BlockConfig
from .families import FAMILIES, ModelSites, family_label, official_family
from .mediator_schedule import MediatorSchedule
from .mediators import DEFAULT_SCHEDULE, MediatorAttention
from .quoting import quoted
from .students import (
    DELTACONV,
    STUDENTS,
    StudentConfig,
    check_grid,
    config_from_dict,
    student_class,
)

FORMAT_VERSION = "1"
TRAIN_PREFIX = "_train."
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # .sft: the short form ComfyUI lists too
# Scales implied by the number of pyramid gates in an official file (3 gates: the released PixArt-1024-laion).
OFFICIAL_SCALES = {1: (1.0,), 2: (1.0, 0.5), 3: (1.0, 0.5, 1 / 3)}
# ΔConv tensors only: resnets in the official SD files also have `*.conv1.weight` keys. Block names are bounded
# word characters and dots, so a name from a hostile file can neither flood nor garble a message; they end in a
# diffusers `transformer_blocks.<i>`, or in `blocks.<i>` (families without a release name their DiT blocks so: Wan).
_NAME = r"(?P<name>(?:[\w.]{1,200}\.)?(?:transformer_)?blocks\.\d{1,4})"
_KEYS = {kind: re.compile(rf"^{_NAME}\.{cls.tensor_group}\.(?P<param>{cls.param_pattern})$")
         for kind, cls in STUDENTS.items()}
# Temp files of an atomic save: `.deltaconv-<pid>-<random>.tmp` in the target folder (older ones lack the pid).
TEMP_PREFIX, TEMP_SUFFIX = ".deltaconv-", ".tmp"
_TEMP_NAME = re.compile(r"^\.deltaconv-(?:(?P<pid>\d+)-)?[^/\\]*\.tmp$")
TEMP_GRACE_SECONDS = 300
TEMP_MAX_AGE_SECONDS = 24 * 3600
BLOCK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class WeightFileError(ValueError):
    pass


@dataclass
class DeltaConvWeights:
    """Students keyed by official block name: what the DELTACONV socket carries. Each entry is (config, state
    dict); the config says the student (`config.student`, see students.py)."""

    family: str
    students: dict[str, tuple[StudentConfig, dict[str, torch.Tensor]]]
    source: str = "memory"
    format: str = "deltaconv"
    ignored_tensors: int = 0
    base_fingerprint: str | None = None  # files from before site_fingerprints: kept, no longer compared
    site_fingerprints: dict[str, str] = field(default_factory=dict)  # site name → fingerprint.site_fingerprint
    training: dict = field(default_factory=dict)

    @classmethod
    def fresh(cls, model_sites: ModelSites, seed: int = 0, kernel_sizes: dict | None = None,
              zero_output: bool = False) -> DeltaConvWeights:
        """Fresh ΔConv blocks for every site (fresh_students; they need no teacher). zero_output zeroes conv_out and
        conv_pool, so each block outputs exactly zero (a neutral start)."""
        weights = cls.fresh_students(DELTACONV, model_sites, None, seed, kernel_sizes)
        if zero_output:
            for _, sd in weights.students.values():
                for key in ("conv_out.weight", "conv_out.bias", "conv_pool.weight", "conv_pool.bias"):
                    sd[key].zero_()
        return weights

    @classmethod
    def fresh_students(cls, kind: str, model_sites: ModelSites, diffusion_model: torch.nn.Module | None,
                       seed: int = 0, kernel_sizes: dict | None = None, schedule: MediatorSchedule | None = None,
                       sites=None) -> DeltaConvWeights:
        """Fresh students of one kind for `sites` (default: all) of a model, to distil (Student.initial): random
        ones from `seed` (a private copy of the CPU generator: torch's global state stays as it was), or from the
        model's own attention (a site already wrapped by a patch works too: the wrapper keeps the projections).
        `diffusion_model` may be None for students that need no teacher (ΔConv)."""
        check_grid(STUDENTS[kind], model_sites)
        students = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for site in model_sites.sites if sites is None else sites:
                teacher = None if diffusion_model is None else diffusion_model.get_submodule(site.path)
                student = STUDENTS[kind].initial(site, teacher, model_sites, (kernel_sizes or {}).get(site.name),
                                                 schedule)
                students[site.name] = (student.config, student.state_dict())
        return cls(model_sites.family, students, source=f"fresh {kind} (seed {seed})", format="fresh")

    @classmethod
    def fresh_mediators(cls, model_sites: ModelSites, diffusion_model: torch.nn.Module,
                        schedule: MediatorSchedule = DEFAULT_SCHEDULE, sites=None) -> DeltaConvWeights:
        """Mediator students initialised from the model's own attention projections (fresh_students)."""
        return cls.fresh_students(MediatorAttention.kind, model_sites, diffusion_model, schedule=schedule,
                                  sites=sites)

    def summary(self) -> str:
        configs = [cfg for cfg, _ in self.students.values()]
        parts = [cls.describe(mine) for kind, cls in STUDENTS.items()
                 if (mine := [cfg for cfg in configs if cfg.student == kind])]
        family = family_label(self.family)
        text = f"{os.path.basename(self.source)}: {family} ({self.format} format): {'; '.join(parts)}"
        if self.ignored_tensors:
            text += f"; ignored {self.ignored_tensors} non-ΔConv tensors in the file"
        return text


def _infer_config(name: str, t: dict[str, torch.Tensor], gate: str) -> BlockConfig:
    """Config of one official block from its tensor shapes; every shape is checked against the others."""

    def need(key):
        if key not in t:
            raise WeightFileError(f"block {name}: missing tensor {name}.conv1.{key}")
        return t[key]

    pool, kernel = need("conv_pool.weight"), need("gates.0.conv_spatial.weight")
    if pool.ndim != 2 or kernel.ndim != 3:
        raise WeightFileError(f"block {name}: conv_pool.weight {list(pool.shape)} / gates.0.conv_spatial.weight "
                              f"{list(kernel.shape)}: expected [C, C] and [k, k, C/2]")
    n = len({k.split(".")[1] for k in t if k.startswith("gates.")})
    if n not in OFFICIAL_SCALES:
        raise WeightFileError(f"block {name}: {n} pyramid gates; official files have 1 to 3")
    try:
        config = BlockConfig(dim=pool.shape[0], kernel_size=kernel.shape[0], scales=OFFICIAL_SCALES[n], gate=gate,
                             dw_bias="gates.0.conv_spatial.bias" in t)
    except ValueError as e:
        raise WeightFileError(f"block {name}: impossible block shape ({e})") from e
    _check_shapes(name, t, config)
    return config


def _check_shapes(name: str, t: dict[str, torch.Tensor], config):
    expected = student_class(config).expected_shapes(config)
    group = student_class(config).tensor_group
    for key, shape in expected.items():
        if key not in t:
            raise WeightFileError(f"block {name}: missing tensor {name}.{group}.{key} (expected shape {list(shape)})")
        if tuple(t[key].shape) != shape:
            raise WeightFileError(f"block {name}: {name}.{group}.{key} has shape {list(t[key].shape)}, "
                                  f"expected {list(shape)} for {config}")
    extra = sorted(set(t) - set(expected))
    if extra:
        raise WeightFileError(f"block {name}: unexpected tensors {extra[:4]} for {config}")


def load_weights(path: str) -> DeltaConvWeights:
    """Read an official ConvFusion release or one of our files. Only `*.conv1.*` (and, in ours,
    `*.mediators.*`) tensors are loaded."""
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise WeightFileError(f"{os.path.basename(path)} is a pickle-based file; ΔConv only reads .safetensors "
                              "because unpickling can run arbitrary code. Convert it to .safetensors first "
                              "(load it in a trusted Python session and save with safetensors.torch.save_file).")
    if not path.lower().endswith(SAFETENSORS_SUFFIXES):
        raise WeightFileError(f"{os.path.basename(path)}: expected a .safetensors (or .sft) file")
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise WeightFileError(f"{os.path.basename(path)} is not a readable safetensors file ({quoted(e)})") from e
    with handle as f:
        meta = f.metadata() or {}
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        kinds: dict[str, str] = {}  # student type per block, from its tensor keys
        ignored = 0
        file_keys = f.keys()  # a safe_open handle: keys() only, no iteration or `in`
        for key in file_keys:
            kind, m = next(((kind, m) for kind, pattern in _KEYS.items() if (m := pattern.match(key))), (None, None))
            if m is None:
                ignored += not key.startswith(TRAIN_PREFIX)
                continue
            if kinds.setdefault(m["name"], kind) != kind:
                both = " and ".join(f"{STUDENTS[k].label} (.{STUDENTS[k].tensor_group}.)"
                                    for k in sorted((kind, kinds[m["name"]])))
                raise WeightFileError(f"{os.path.basename(path)}: block {m['name']} has both {both} tensors; a site "
                                      "has one student")
            grouped.setdefault(m["name"], {})[m["param"]] = _block_tensor(os.path.basename(path), key,
                                                                          f.get_tensor(key))
    if not grouped:
        raise WeightFileError(f"{os.path.basename(path)} holds no ΔConv blocks (no '*.conv1.*' or '*.mediators.*' "
                              f"tensors among its {ignored} tensors); is it a model checkpoint rather than a ΔConv "
                              "weights file?")
    names = list(grouped)
    if meta.get("deltaconv_format"):
        configs, family, training = _read_metadata(os.path.basename(path), meta)
        missing = sorted(set(names) ^ set(configs))
        if missing:
            raise WeightFileError(f"{os.path.basename(path)}: metadata and tensors disagree on blocks "
                                  f"{quoted(missing[:4])}")
        for n in names:
            if configs[n].student != kinds[n]:
                raise WeightFileError(f"{os.path.basename(path)}: block {n} is a {configs[n].student} student "
                                      f"in the metadata, but its tensors are {kinds[n]} tensors "
                                      f"({n}.{STUDENTS[kinds[n]].tensor_group}.*)")
            _check_shapes(n, grouped[n], configs[n])
        fmt, fingerprint = f"deltaconv v{int(meta['deltaconv_format'])}", meta.get("base_fingerprint") or None
        site_fingerprints = _read_site_fingerprints(os.path.basename(path), meta)
    else:
        others = sorted(n for n in names if kinds[n] != DELTACONV)  # official files hold ΔConv blocks only
        if others:
            raise WeightFileError(f"{os.path.basename(path)}: {STUDENTS[kinds[others[0]]].label} tensors "
                                  f"({others[0]}.{STUDENTS[kinds[others[0]]].tensor_group}.*) without this pack's "
                                  "metadata; their settings cannot be read from shapes")
        official = official_family(names)  # the family's adapter, from the block names
        if official is None:
            raise WeightFileError(f"cannot tell which model family the blocks {names[:3]}… belong to")
        family = official.key
        configs = {n: _infer_config(n, grouped[n], official.gate) for n in names}
        fmt, fingerprint, training, site_fingerprints = "official ConvFusion", None, {}, {}
    blocks = {n: (configs[n], grouped[n]) for n in names}
    return DeltaConvWeights(family, blocks, source=path, format=fmt, ignored_tensors=ignored,
                            base_fingerprint=fingerprint, site_fingerprints=site_fingerprints, training=training)


def _block_tensor(filename: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A block tensor as read, refused when it could only give wrong images: not floating point, or not finite."""
    if tensor.dtype not in BLOCK_DTYPES:
        raise WeightFileError(f"{filename}: tensor {key} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                              "block tensors must be float32, float16, bfloat16 or float64. The file is not a ΔConv "
                              "weights file as written by ΔConv Save or Distill: re-download or re-save it")
    if not torch.isfinite(tensor).all():
        raise WeightFileError(f"{filename}: tensor {key} holds NaN or infinite values (the first such tensor in "
                              "the file), which would turn every image into NaN. The file is damaged (e.g. a "
                              "diverged training run): use an earlier checkpoint or re-download it")
    return tensor


def _json(filename: str, meta: dict, key: str, default: str):
    """One JSON value of our metadata; malformed, huge or too deeply nested text is damaged metadata."""
    try:
        return json.loads(meta.get(key) or default)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise WeightFileError(f"{filename}: damaged ΔConv metadata ({key} is not valid JSON: "
                              f"{quoted(e)})") from None


def _read_site_fingerprints(filename: str, meta: dict) -> dict[str, str]:
    """Per-site base-model fingerprints ({} in files written before them)."""
    value = _json(filename, meta, "site_fingerprints", "{}")
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise WeightFileError(f"{filename}: damaged ΔConv metadata (site_fingerprints is not a mapping of block "
                              "names to fingerprints)")
    return value


def _read_metadata(filename: str, meta: dict) -> tuple[dict, str, dict]:
    """(configs by block name, family, training info) from our metadata, each site's entry validated."""
    def damaged(what: str):
        return WeightFileError(f"{filename}: damaged ΔConv metadata ({what})")

    if not meta["deltaconv_format"].isdigit() or len(meta["deltaconv_format"]) > 4:
        raise damaged(f"deltaconv_format = {quoted(meta['deltaconv_format'])} is not a version number")
    family = meta.get("family")
    if family not in FAMILIES:
        raise damaged(f"family = {quoted(family)} is not one of {', '.join(FAMILIES)}")
    if "blocks" not in meta:
        raise damaged("no blocks entry")
    entries, training = _json(filename, meta, "blocks", "{}"), _json(filename, meta, "training", "{}")
    if not isinstance(entries, dict):
        raise damaged(f"blocks is {type(entries).__name__}, not a mapping of block names")
    if not isinstance(training, dict):
        raise damaged(f"training is {type(training).__name__}, not a mapping")
    configs = {}
    for name, entry in entries.items():
        try:
            configs[name] = config_from_dict(entry)
        except (TypeError, ValueError, RecursionError) as e:  # ScheduleError is a ValueError
            raise WeightFileError(f"{filename}: damaged ΔConv metadata for block {quoted(name)}: {e}") from None
    return configs, family, training


def save_weights(weights: DeltaConvWeights, path: str, overwrite: bool = False,
                 training_tensors: dict | None = None) -> str:
    """Write our format atomically (temp file, fsync, rename, fsync of the folder): after a crash or power loss
    `path` is the old file or the new one, never a partial one. Temp files of killed saves are removed by the next
    save into the same folder (remove_stale_temp_files).

    training_tensors (optimiser moments, RNG state) are stored under `_train.*` so a run can resume exactly.
    """
    if not path.lower().endswith(SAFETENSORS_SUFFIXES):
        path += ".safetensors"
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    tensors = {f"{name}.{student_class(cfg).tensor_group}.{k}": v.detach().to("cpu").contiguous()
               for name, (cfg, sd) in weights.students.items() for k, v in sd.items()}
    tensors.update({TRAIN_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in (training_tensors or {}).items()})
    meta = {"deltaconv_format": FORMAT_VERSION, "family": weights.family,
            "blocks": json.dumps({n: cfg.to_dict() for n, (cfg, _) in weights.students.items()}),
            "base_fingerprint": weights.base_fingerprint or "", "training": json.dumps(weights.training),
            "site_fingerprints": json.dumps(weights.site_fingerprints)}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temp_files(directory)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=TEMP_SUFFIX, dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        _fsync(tmp)  # the data is on disk before the rename makes it the file
        os.replace(tmp, path)
        _fsync(directory, directory=True)  # and the rename itself survives a power loss
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY if directory else os.O_RDWR)
    except OSError:
        if directory:  # Windows cannot open a folder (nor needs to sync one for a rename)
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: str, now: float | None = None) -> list[str]:
    """Delete our own temp files left by a save that was killed (`.deltaconv-<pid>-*.tmp`); returns their paths.

    A temp file is stale when its writer is gone and it is older than TEMP_GRACE_SECONDS (so another machine's
    save into a shared folder is left alone), or older than TEMP_MAX_AGE_SECONDS (its pid was reused)."""
    now = time.time() if now is None else now
    removed = []
    for entry in os.scandir(directory):
        m = _TEMP_NAME.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
            pid = int(m["pid"]) if m["pid"] else None
            if age > TEMP_MAX_AGE_SECONDS or (age > TEMP_GRACE_SECONDS and not _process_alive(pid)):
                os.remove(entry.path)
                removed.append(entry.path)
        except OSError:  # removed meanwhile by another save into the same folder
            continue
    return removed


def _process_alive(pid: int | None) -> bool:
    if pid is None:  # temp files from before the pid was part of the name
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists under another user, or cannot be checked here
        return True
    return True


def read_training_state(path: str) -> tuple[dict, dict] | None:
    """(tensors, info) saved by a distillation checkpoint, or None for a file without training state; a damaged
    state is refused here, before a run resumes from it."""
    filename = os.path.basename(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        file_keys = f.keys()  # a safe_open handle: keys() only, no iteration
        keys = [k for k in file_keys if k.startswith(TRAIN_PREFIX)]
        if not keys:
            return None
        tensors = {k[len(TRAIN_PREFIX):]: f.get_tensor(k) for k in keys}
        info = _json(filename, f.metadata() or {}, "training", "{}")
    problem = _training_state_problem(tensors, info)
    if problem:
        raise WeightFileError(f"{filename}: damaged training state, cannot resume from it: {problem}. Connect an "
                              "earlier checkpoint of the run, or save these blocks with ΔConv Save (which keeps no "
                              "training state) to fine-tune them from a fresh optimiser")
    return tensors, info


def _training_state_problem(tensors: dict, info) -> str | None:
    """What a checkpoint's training state lacks (None: complete), as Distiller.load_training_state needs it."""
    if not isinstance(info, dict):
        return f"the training info is {type(info).__name__}, not a mapping"
    step, config, names = info.get("step"), info.get("config"), info.get("block_names")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"the training info has no step count (step = {quoted(step)})"
    if not isinstance(config, dict) or not isinstance(config.get("stage"), str):
        return f"the training info has no configuration with a stage (config = {quoted(config)})"
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return f"the training info has no list of block names (block_names = {quoted(names)})"
    if not isinstance(info.get("losses", []), list) or isinstance(info.get("skipped_steps", 0), bool) or \
            not isinstance(info.get("skipped_steps", 0), int):
        return "the training info's losses or skipped_steps have the wrong type"
    rng = tensors.get("rng")
    if rng is None or rng.dtype != torch.uint8 or rng.ndim != 1:
        return f"the random-number state {TRAIN_PREFIX}rng is missing or not a uint8 vector"
    return None


@dataclass
class Match:
    present: list  # (site, config, state dict) for every selected site the file covers
    missing: list  # selected sites the file has no block for
    unused: list[str]  # file blocks with no site in this model


def match_sites(weights: DeltaConvWeights, model_sites: ModelSites, sites) -> Match:
    """Pair the file's blocks with the model's sites; refuse files made for another family or shape."""
    if weights.family != model_sites.family:
        first = next(iter(weights.students))
        raise WeightFileError(
            f"{os.path.basename(weights.source)} was made for {family_label(weights.family)}, "
            f"but the model is {model_sites.variant}: first block {first} does not belong to this model. "
            "Pick the file for this model family (see weights/README.md) or distill blocks for it.")
    present, missing = [], []
    for site in sites:
        entry = weights.students.get(site.name)
        if entry is None:
            missing.append(site)
            continue
        config, sd = entry
        if config.dim != site.channels:
            raise WeightFileError(f"{os.path.basename(weights.source)} does not fit this model: block {site.name} "
                                  f"expects {site.channels} channels, the file has {config.dim}.")
        present.append((site, config, sd))
    known = {s.name for s in model_sites.sites}
    unused = [n for n in weights.students if n not in known]
    return Match(present, missing, unused)
