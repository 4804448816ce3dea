"""Load held: well over 100 prompts through one server, alternating unpatched, patched, re-patched with other
weights, and two differently patched clones in one graph. Every result must equal its single-run reference, the
unpatched model must stay bit-identical (no object patch leaks into it), and the server's memory must level off."""
import itertools

from graphs import digest, txt2img

PROMPTS = 120
RSS_GROWTH_LIMIT_MB = 64  # a leaked clone or block per prompt would pass this within a few dozen prompts


def variants(unet_inputs):
    """{name: (graph, digest suffixes)}; each variant's sampler inputs are its own, so none is served from the
    previous prompt's cache."""
    common = {"seed": 41, "steps": 2, "unet_inputs": unet_inputs}
    return {
        "unpatched": (txt2img("sd15", None, **common), [""]),
        "random": (txt2img("sd15", "tiny_sd15_random.safetensors", **common), [""]),
        "zero": (txt2img("sd15", "tiny_sd15_zero.safetensors", **common), [""]),
        "two clones": (txt2img("sd15", "tiny_sd15_random.safetensors", end=0.6, **common,
                               extra_models=(("_b", "tiny_sd15_zero.safetensors"),)), ["", "_b"]),
    }


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def hashes(entry, suffixes):
    return [digest(entry, s)["sha256"] for s in suffixes]


def sampler_ran(entry):
    cached = [m[1].get("nodes", []) for m in entry["status"]["messages"] if m[0] == "execution_cached"]
    return "sampler" not in [n for nodes in cached for n in nodes]


def test_many_prompts_hold(server, unet_inputs):
    graphs = variants(unet_inputs)
    reference = {name: hashes(server.run(g), suffixes) for name, (g, suffixes) in graphs.items()}
    assert len({h for hs in reference.values() for h in hs}) == 5, "every variant must give its own result"

    cycle = itertools.cycle(graphs)
    for i in range(PROMPTS):
        name = next(cycle)
        graph, suffixes = graphs[name]
        entry = server.run(graph)
        assert sampler_ran(entry), f"prompt {i} ({name}) came from the cache"
        assert hashes(entry, suffixes) == reference[name], f"prompt {i} ({name}) differs from its reference"
        if i == 2 * len(graphs) - 1:
            settled = rss_mb(server.proc.pid)  # after two rounds: models loaded, caches and allocator warm
    growth = rss_mb(server.proc.pid) - settled
    print(f"{PROMPTS} prompts; server RSS after warm-up {settled:.0f} MB, growth since {growth:+.1f} MB")
    assert growth < RSS_GROWTH_LIMIT_MB
