"""Installing ΔConv wrappers on a ModelPatcher clone: object patches on its self-attention modules (each running a
student, ΔConv or mediator attention), plus the model hooks that tell the wrappers what they cannot see."""
import functools

from ..deltaconv_core.attention import PatchRuntime, StudentDiTAttention, StudentSelfAttention, StudentWanAttention
from . import compat

PREFIX = "diffusion_model."  # object-patch paths are relative to the BaseModel, site paths to its diffusion model
WRAPPER_KEY = "deltaconv"
WRAPPER_TYPES = (StudentSelfAttention, StudentDiTAttention, StudentWanAttention)
WRAPPERS = {cls.__name__: cls for cls in WRAPPER_TYPES}  # by the name a family adapter gives (its `wrapper`)


def original_attention(model, model_sites, site):
    """The attention module a ΔConv wrapper for `site` should fall back to (never another ΔConv wrapper)."""
    original = compat.get_model_object(model, PREFIX + site.path)
    if isinstance(original, WRAPPER_TYPES):
        return original.original  # re-patching a ΔConv model: replace, do not stack
    if not model_sites.adapter.is_attention(original):
        raise ValueError(f"{site.path} was already replaced by another node ({type(original).__name__}, not "
                         f"{model_sites.adapter.attention}); put ΔConv Patch before that node in the graph")
    return original


def student_wrappers(model) -> list:
    """The wrappers with a student that `model` installs (empty: not patched)."""
    return [p for p in model.object_patches.values() if isinstance(p, WRAPPER_TYPES) and not p.is_teacher_only]


def delta_runtimes(model) -> list[PatchRuntime]:
    """The runtimes of the students `model` installs, one per ΔConv Patch behind it (empty: not patched)."""
    return list({id(w.runtime): w.runtime for w in student_wrappers(model)}.values())


def _wrapper_type(model_sites):
    """The wrapper class the model's family uses, and its token grid on this model."""
    adapter = model_sites.adapter
    return WRAPPERS[adapter.wrapper], {"grid": functools.partial(adapter.token_grid, model_sites)}


def install_wrapper(clone, model_sites, site, original, student, runtime: PatchRuntime, sigma_counts=None):
    """Object-patch `site` of `clone` with a wrapper running `student`, falling back to `original`; a mediator
    student with its schedule on this model's sigmas (`sigma_counts`)."""
    cls, extra = _wrapper_type(model_sites)
    clone.add_object_patch(PREFIX + site.path, cls(original, student, runtime, site.name, sigma_counts, **extra))


def install_teacher_wrapper(clone, model_sites, site, original, runtime: PatchRuntime):
    """Object-patch `site` of `clone` with a teacher-only wrapper: `original` always runs, its input recorded."""
    cls, extra = _wrapper_type(model_sites)
    clone.add_object_patch(PREFIX + site.path, cls.teacher_only(original, runtime, site.name, **extra))


def _model_call(runtime: PatchRuntime):
    def model_call(executor, x, t, *args, **kwargs):
        # once per step, outside a torch.compile'd diffusion model; the speed policy may time this call per plan
        return runtime.run_step(t, x, lambda: executor(x, t, *args, **kwargs))

    return model_call


def _stash_options(runtime: PatchRuntime):
    def stash_options(n, context, value, extra_options):
        runtime.stashed_options = extra_options
        return n, context, value

    return stash_options


def install_runtime_hooks(clone, runtime: PatchRuntime):
    """The step's facts for every site (runtime.step), worked out once per step by a model wrapper: PixArt's
    attention sees no sigma, Wan's no grid (the wrapper sees the latent), and under torch.compile a read of the
    sigma in each site would break the graph. On the March-2024 ComfyUI, which has no model wrappers, an
    attn1_patch hands the sites its options instead."""
    if compat.LEGACY_ATTN1_CALL:  # that ComfyUI has neither model wrappers nor PixArt nor Wan
        clone.set_model_attn1_patch(_stash_options(runtime))
    else:
        compat.add_apply_model_wrapper(clone, WRAPPER_KEY, _model_call(runtime))
