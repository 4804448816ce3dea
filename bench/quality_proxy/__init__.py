"""Quality proxy benchmark: a small diffusion model trained on real photos, distilled into ΔConv students."""
