"""Never slower than attention: the speed policy alone with injected timers, and on the wrappers of a real ComfyUI
ModelPatcher in-process (the CPU stands in for a timed device; the timer decides, not the clock)."""
import inspect
import threading
import time

import pytest
import torch
from comfy.ldm.modules.attention import CrossAttention

from deltaconv_core.speed_policy import SpeedPolicy, device_seconds
from deltaconv_core.weights import DeltaConvWeights

LEGACY = "transformer_options" not in inspect.signature(CrossAttention.forward).parameters
SITES = ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1",
         "diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1")


class FakeTimer:
    """Seconds per candidate ("student", "attention") from a table; records its calls and runs each candidate once,
    as the real timer does."""

    def __init__(self, student: float, attention: float, pause: float = 0.0):
        self.seconds = {"student": student, "attention": attention}
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


# ------------------------------------------------------------------------------ on a patched ComfyUI model
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
