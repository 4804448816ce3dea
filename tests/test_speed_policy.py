"""Never slower than attention: the speed policy alone with injected timers, and on the wrappers of a real ComfyUI
ModelPatcher in-process (the CPU stands in for a timed device; the timer decides, not the clock)."""
import inspect
import threading
import time

import pytest
import torch
from comfy.ldm.modules.attention import CrossAttention

from deltaconv_core.speed_policy import PLANS, SpeedPolicy, device_seconds
from deltaconv_core.weights import DeltaConvWeights

LEGACY = "transformer_options" not in inspect.signature(CrossAttention.forward).parameters
SITES = ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1",
         "diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1")


class FakeTimer:
    """Seconds per candidate ("student", "attention") from a table; records its calls and runs each candidate once,
    as the real timer does."""

    def __init__(self, student: float, attention: float, pause: float = 0.0, plans: dict | None = None):
        self.seconds = {"student": student, "attention": attention,
                        **{f"call:{plan}": seconds for plan, seconds in (plans or {}).items()}}
        self.pause, self.calls = pause, []

    def __call__(self, label, fn):
        self.calls.append(label)
        time.sleep(self.pause)  # widens the window in which other threads could race
        fn()
        return self.seconds[label]


def cpu_policy(timer, mode="auto"):
    return SpeedPolicy(mode, timer=timer, timed_devices=("cpu",))


def ask(policy, x, site="s", key="deltaconv"):
    with torch.no_grad():
        return policy.student_is_faster(site, key, x, lambda: "student", lambda: "attention")


@pytest.mark.parametrize("student, attention, expected", [(1.0, 2.0, True), (2.0, 1.0, False), (1.0, 1.0, False)])
def test_auto_runs_the_faster_and_keeps_attention_on_a_tie(student, attention, expected):
    timer = FakeTimer(student, attention)
    policy = cpu_policy(timer)
    x = torch.zeros(2, 16, 8)
    assert [ask(policy, x) for _ in range(3)] == [expected] * 3
    assert timer.calls == ["student", "attention"]  # timed once, then cached


def test_each_site_shape_dtype_and_student_key_is_timed_once():
    timer = FakeTimer(1.0, 2.0)
    policy = cpu_policy(timer)
    for x in (torch.zeros(2, 16, 8), torch.zeros(1, 16, 8), torch.zeros(2, 64, 8), torch.zeros(2, 16, 8).double()):
        ask(policy, x)
        ask(policy, x, site="other")
        ask(policy, x, key="mediators:16")
        ask(policy, x)
    assert len(policy.choices) == 12 and len(timer.calls) == 24


def test_what_is_never_timed():
    timer = FakeTimer(2.0, 1.0)
    x = torch.zeros(2, 16, 8)
    assert ask(cpu_policy(timer, mode="always"), x)
    assert ask(SpeedPolicy("auto", timer=timer), x)  # the CPU is not a timed device by default
    with torch.enable_grad():  # training: the student always
        assert cpu_policy(timer).student_is_faster("s", "deltaconv", x, lambda: 0, lambda: 0)
    assert timer.calls == []
    with pytest.raises(ValueError, match="speed policy 'sometimes': choose one of auto, always"):
        SpeedPolicy("sometimes")


def test_threads_racing_on_one_key_time_it_once_and_agree():
    timer = FakeTimer(2.0, 1.0, pause=0.05)
    policy = cpu_policy(timer)
    x = torch.zeros(2, 16, 8)
    answers, start = [], threading.Barrier(8)

    def worker():
        start.wait()
        answers.append(ask(policy, x))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [False] * 8 and timer.calls == ["student", "attention"]


def test_real_timer_measures_the_call():
    assert 0.009 <= device_seconds("x", lambda: time.sleep(0.01), repeats=2) < 1.0


def test_under_torch_compile_a_made_choice_holds_and_nothing_is_timed_while_tracing():
    timer = FakeTimer(2.0, 1.0)
    policy = cpu_policy(timer)

    def step(x):
        return x * 2 if policy.student_is_faster("s", "deltaconv", x, lambda: None, lambda: None) else x * 3

    compiled = torch.compile(step, backend="eager", fullgraph=True)  # fullgraph: a graph break fails the test
    with torch.no_grad():
        assert torch.equal(compiled(torch.ones(4)), torch.full((4,), 2.0))  # no choice yet: the student, untimed
        assert timer.calls == []
        x = torch.ones(3)
        assert torch.equal(step(x), x * 3)  # eager: timed, attention is faster
        torch._dynamo.reset()
        assert torch.equal(compiled(x), x * 3) and timer.calls == ["student", "attention"]


# ------------------------------------------------------------------------------ whole model calls
def plan_of(policy, x, sites=(("s", "deltaconv"),)):
    """The plan of a model call with input x whose sites are `sites`; each timed run asks them, as a real call does."""
    runs = []

    def run(plan):
        runs.append(plan)
        if plan == "chosen":
            for site, key in sites:
                ask(policy, x, site, key)

    with torch.no_grad():
        return policy.call_plan(x, run), runs


@pytest.mark.parametrize("plans, expected", [
    ({"chosen": 1.0, "attention": 2.0}, "chosen"),
    ({"chosen": 2.0, "attention": 1.0}, "attention"),  # the host-bound call: each site alone said student
    ({"chosen": 1.0, "attention": 1.0}, "attention"),  # a tie keeps attention
])
def test_a_model_call_keeps_the_fastest_plan(plans, expected):
    timer = FakeTimer(1.0, 2.0, plans=plans)  # each site alone: the student is faster
    policy = cpu_policy(timer)
    x = torch.zeros(2, 4, 8, 8)
    assert plan_of(policy, x) == (expected, ["chosen", "attention"])
    assert timer.calls == ["call:chosen", "student", "attention", "call:attention"]
    assert plan_of(policy, x) == (expected, [])  # settled: the shape is not timed again
    assert plan_of(policy, torch.zeros(1, 4, 8, 8))[1] == ["chosen", "attention"]  # another shape is


class SiteTimer(FakeTimer):
    """FakeTimer whose per-site answer depends on the site: `slow_sites` have the slower student."""

    def __init__(self, slow_sites, plans):
        super().__init__(1.0, 2.0, plans=plans)
        self.slow_sites, self.site = slow_sites, None

    def __call__(self, label, fn):
        seconds = super().__call__(label, fn)
        if label in ("student", "attention") and self.site in self.slow_sites:
            return 3.0 - seconds  # swapped: attention 1, student 2
        return seconds


def test_every_student_is_timed_when_a_site_chose_attention():
    timer = SiteTimer({"b"}, plans={"chosen": 2.0, "students": 1.5, "attention": 3.0})
    policy = cpu_policy(timer)
    x = torch.zeros(2, 4, 8, 8)

    def run(plan):
        if plan == "chosen":
            for site in ("a", "b"):
                timer.site = site
                ask(policy, x, site)

    with torch.no_grad():
        assert policy.call_plan(x, run) == "students"
    assert [c.student for c in policy.choices.values()] == [True, False]
    assert [label for label in timer.calls if label.startswith("call:")] == [
        "call:chosen", "call:students", "call:attention"]
    assert policy.plans[(tuple(x.shape), x.dtype, "cpu")] == ("students", {"attention": 3.0, "chosen": 2.0,
                                                                           "students": 1.5})


def test_plans_that_cannot_differ_or_win_are_not_timed():
    x = torch.zeros(2, 4, 8, 8)
    # Every site chose attention: "attention" would run what "chosen" ran.
    timer = FakeTimer(2.0, 1.0, plans={"chosen": 1.0, "students": 2.0})
    assert plan_of(cpu_policy(timer), x) == ("chosen", ["chosen", "students"])
    # The chosen call is under half of its sites' attention alone (2 s each): all-attention cannot win.
    timer = FakeTimer(1.0, 2.0, plans={"chosen": 1.9})
    sites = (("a", "deltaconv"), ("b", "deltaconv"))
    assert plan_of(cpu_policy(timer), x, sites) == ("chosen", ["chosen"])
    # No site asked (the call ran no student: every site fell back for its own reason): nothing else to time.
    timer = FakeTimer(1.0, 2.0, plans={"chosen": 1.0})
    assert plan_of(cpu_policy(timer), x, sites=()) == ("chosen", ["chosen"])
    assert set(PLANS) == {"attention", "chosen", "students"}


def test_a_model_call_made_inside_a_timed_one_is_not_timed_again():
    timer = FakeTimer(1.0, 2.0, plans={"chosen": 2.0, "attention": 1.0})
    policy = cpu_policy(timer)
    x, inner = torch.zeros(2, 4, 8, 8), []

    def run(plan):
        inner.append(policy.call_plan(torch.zeros(1, 4, 8, 8), lambda p: pytest.fail("timed inside a timing")))
        if plan == "chosen":
            ask(policy, x)

    with torch.no_grad():
        assert policy.call_plan(x, run) == "attention"
    assert inner == ["chosen", "chosen"] and list(policy.plans) == [(tuple(x.shape), x.dtype, "cpu")]


def test_model_calls_are_not_timed_in_training_always_elsewhere_or_while_compiling():
    timer = FakeTimer(1.0, 2.0, plans={"chosen": 2.0, "attention": 1.0})
    x = torch.zeros(2, 4, 8, 8)
    assert plan_of(cpu_policy(timer, mode="always"), x) == ("chosen", [])
    assert plan_of(SpeedPolicy("auto", timer=timer), x) == ("chosen", [])  # the CPU is not timed by default
    with torch.enable_grad():
        assert cpu_policy(timer).call_plan(x, lambda plan: None) == "chosen"
    policy = cpu_policy(timer)
    compiled = torch.compile(lambda t: t * 2 if policy.call_plan(t, lambda plan: None) == "chosen" else t,
                             backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))
    assert timer.calls == [] and policy.plans == {}



def _call(wrapper, x, grid):
    options = {"activations_shape": [x.shape[0], x.shape[2], *grid]}
    with torch.no_grad():
        if LEGACY:
            wrapper.runtime.stashed_options = options
            return wrapper(x)
        return wrapper(x, transformer_options=options)


@pytest.mark.parametrize("student, attention", [(1.0, 2.0), (2.0, 1.0)])
def test_patched_sites_run_exactly_the_chosen_path(patching, load_tiny, student, attention):
    sd15 = load_tiny("tiny_sd15")
    weights = DeltaConvWeights.fresh(patching.find_attention_sites(sd15.model.diffusion_model), seed=11)
    clone, report, runtime = patching.patch_model(sd15, weights)
    assert "speed policy: auto: on cuda each site times its student" in report
    timer = FakeTimer(student, attention)
    runtime.speed = cpu_policy(timer)
    g = torch.Generator().manual_seed(12)
    for site in SITES:
        wrapper = clone.object_patches[site]
        c = wrapper.to_q.in_features
        x = torch.randn(2, 6 * 5, c, generator=g)
        for _ in range(2):
            out = _call(wrapper, x, (6, 5))
            with torch.no_grad():
                expected = (wrapper.student(x.reshape(2, 6, 5, c)).reshape(2, 30, c) if student < attention
                            else wrapper.original(x))
            assert torch.equal(out, expected), site
    key = "deltaconv" if student < attention else "attention:slower"
    assert runtime.counts == {key: 4} and len(timer.calls) == 4


@pytest.mark.skipif(LEGACY, reason="this ComfyUI has no model wrappers: its sites choose alone")
@pytest.mark.parametrize("plans, expected", [({"chosen": 8.0, "attention": 9.0}, "deltaconv"),  # 7 sites × 2 s:
                                             ({"chosen": 9.0, "attention": 8.0}, "attention:plan")])  # above ½
def test_sampling_runs_the_plan_the_first_call_chose(pack, load_tiny, plans, expected):
    """KSampler's sampling on a patched tiny SD1.5, every site's student faster alone: the first model call is timed
    per plan (the timing runs count nothing), then every call of the run, the first included, runs the plan kept,
    so the image is the one a second run gives; with attention kept, the plain model's image exactly."""
    import nodes

    sd15 = load_tiny("tiny_sd15")
    weights = DeltaConvWeights.fresh(pack.nodes.patching.find_attention_sites(sd15.model.diffusion_model), seed=3)
    clone, _, runtime = pack.nodes.patching.patch_model(sd15, weights)
    timer = FakeTimer(1.0, 2.0, plans=plans)
    runtime.speed = cpu_policy(timer)
    g = torch.Generator().manual_seed(4)
    cond = [[torch.randn(1, 7, 768, generator=g), {}]]
    uncond = [[torch.randn(1, 7, 768, generator=g), {}]]
    latent = torch.randn(1, 4, 8, 8, generator=g)

    def sample(model):
        return nodes.common_ksampler(model, 7, 3, 4.0, "euler", "normal", cond, uncond,
                                     {"samples": latent.clone()})[0]["samples"]

    first = sample(clone)
    sites = pack.nodes.patching.find_attention_sites(sd15.model.diffusion_model).sites
    assert dict(runtime.counts) == {expected: 3 * len(sites)}  # 3 steps, cond and uncond in one call
    assert [c for c in timer.calls if c.startswith("call:")] == ["call:chosen", "call:attention"]
    assert len(runtime.speed.plans) == 1
    assert torch.equal(sample(clone), first)  # settled: the second run is the first
    assert len(timer.calls) == 2 + 2 * len(sites)
    plain = sample(sd15)
    assert torch.equal(first, plain) == (expected == "attention:plan")
