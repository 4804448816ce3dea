"""Installing ΔConv wrappers on a ModelPatcher clone: object patches on its self-attention modules (each running a
student, ΔConv or mediator attention), plus the model hooks that tell the wrappers what they cannot see."""
from ..deltaconv_core.attention import DeltaConvDiTAttention, DeltaConvSelfAttention, PatchRuntime
from . import compat

PREFIX = "diffusion_model."  # object-patch paths are relative to the BaseModel, site paths to its diffusion model
WRAPPER_KEY = "deltaconv"
WRAPPER_TYPES = (DeltaConvSelfAttention, DeltaConvDiTAttention)


def original_attention(model, site):
    """The attention module a ΔConv wrapper for `site` should fall back to (never another ΔConv wrapper)."""
    original = compat.get_model_object(model, PREFIX + site.path)
    if isinstance(original, WRAPPER_TYPES):
        return original.original  # re-patching a ΔConv model: replace, do not stack
    if not (hasattr(original, "to_q") or hasattr(original, "qkv")):
        raise ValueError(f"{site.path} was already replaced by another node ({type(original).__name__}, without "
                         "attention projections); put ΔConv Patch before that node in the graph")
    return original


def student_wrappers(model) -> list:
    """The wrappers with a student that `model` installs (empty: not patched)."""
    return [p for p in model.object_patches.values() if isinstance(p, WRAPPER_TYPES) and not p.is_teacher_only]


def delta_runtimes(model) -> list[PatchRuntime]:
    """The runtimes of the students `model` installs, one per ΔConv Patch behind it (empty: not patched)."""
    return list({id(w.runtime): w.runtime for w in student_wrappers(model)}.values())


def _wrapper_type(model_sites):
    if model_sites.family == "pixart":
        return DeltaConvDiTAttention, {"patch_size": model_sites.patch_size}
    return DeltaConvSelfAttention, {}


def install_wrapper(clone, model_sites, site, original, student, runtime: PatchRuntime, sigma_counts=None):
    """Object-patch `site` of `clone` with a wrapper running `student`, falling back to `original`; a mediator
    student with its schedule on this model's sigmas (`sigma_counts`)."""
    cls, extra = _wrapper_type(model_sites)
    clone.add_object_patch(PREFIX + site.path, cls(original, student, runtime, site.name, sigma_counts, **extra))


def install_teacher_wrapper(clone, model_sites, site, original, runtime: PatchRuntime):
    """Object-patch `site` of `clone` with a teacher-only wrapper: `original` always runs, its input recorded."""
    cls, extra = _wrapper_type(model_sites)
    clone.add_object_patch(PREFIX + site.path, cls.teacher_only(original, runtime, site.name, **extra))


def _capture_sigmas(runtime: PatchRuntime):
    def capture_sigma(executor, x, t, *args, **kwargs):
        runtime.current_sigmas = t
        runtime.step_active = runtime.sigma_active(t)  # once per step, outside a torch.compile'd diffusion model
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            runtime.step_active = None

    return capture_sigma


def _stash_options(runtime: PatchRuntime):
    def stash_options(n, context, value, extra_options):
        runtime.stashed_options = extra_options
        return n, context, value

    return stash_options


def install_runtime_hooks(clone, model_sites, runtime: PatchRuntime, follows_sigma: bool = False):
    """What the wrappers cannot see for themselves: the step's sigma, read once per step (PixArt's attention gets
    none; under torch.compile reading it per call would break the graph), needed for a sigma range or when
    mediator students follow a schedule (`follows_sigma`); older ComfyUI's shapes and sigmas."""
    if compat.LEGACY_ATTN1_CALL:  # that ComfyUI has neither model wrappers nor PixArt
        clone.set_model_attn1_patch(_stash_options(runtime))
    elif follows_sigma or not runtime.full_range:
        compat.add_apply_model_wrapper(clone, WRAPPER_KEY, _capture_sigmas(runtime))
