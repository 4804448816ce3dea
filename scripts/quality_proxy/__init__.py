"""The quality proxy, a research experiment: a small diffusion model trained on real photos (and a video one with 3-D
self-attention, on synthetic moving shapes), distilled into ΔConv and mediator-attention students, to see how close
each gets to its teacher. Run it with scripts/quality_proxy/run.py."""
