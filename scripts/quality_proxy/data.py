"""Real photographs for the quality proxy: the sample images shipped inside scikit-image's wheel.

Only the wheel is downloaded (`pip download --no-deps`), never installed: the PNG/JPEG files are read straight out
of the zip, so scikit-image and its dependencies stay off the environment. Held-out photos are whole images the
teacher never saw, not other crops of the training images.
"""
from __future__ import annotations

import glob
import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

WHEEL = "scikit-image==0.26.0"
CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".cache", "proxy")
TRAIN_PHOTOS = ("astronaut.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg",
                "ihc.png", "color.png")
HELD_OUT_PHOTOS = ("chelsea.png", "coffee.png")


def wheel_path(cache: str = CACHE) -> str:
    """The scikit-image wheel in `cache`, downloaded (no dependencies, nothing installed) when missing."""
    found = glob.glob(os.path.join(cache, "scikit_image-*.whl"))
    if not found:
        os.makedirs(cache, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", WHEEL, "-d", cache]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = glob.glob(os.path.join(cache, "scikit_image-*.whl"))
        if result.returncode or not found:
            raise RuntimeError(f"could not download {WHEEL} for its sample photos ({result.stderr.strip()[-300:]}); "
                               f"put a scikit-image wheel in {cache} by hand")
    return sorted(found)[-1]


def load_photos(names, short_side: int, cache: str = CACHE) -> list[torch.Tensor]:
    """Photos as [3, H, W] in [-1, 1], resized (antialiased) so the shorter side is `short_side`."""
    from PIL import Image

    photos = []
    with zipfile.ZipFile(wheel_path(cache)) as wheel:
        for name in names:
            image = Image.open(io.BytesIO(wheel.read(f"skimage/data/{name}"))).convert("RGB")
            t = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
            scale = short_side / min(t.shape[1:])
            size = (round(t.shape[1] * scale), round(t.shape[2] * scale))
            photos.append(F.interpolate(t[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0])
    return photos


def random_crops(photos: list[torch.Tensor], n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """n random size×size crops (uniform over photos, random position, random horizontal flip): [n, 3, size, size]."""
    out = torch.empty(n, 3, size, size)
    which = torch.randint(len(photos), (n,), generator=generator)
    for i, p in enumerate(which.tolist()):
        photo = photos[p]
        y = int(torch.randint(photo.shape[1] - size + 1, (1,), generator=generator))
        x = int(torch.randint(photo.shape[2] - size + 1, (1,), generator=generator))
        crop = photo[:, y:y + size, x:x + size]
        out[i] = crop.flip(-1) if bool(torch.rand(1, generator=generator) < 0.5) else crop
    return out


if __name__ == "__main__":  # scripts/setup_env.sh fetches the wheel ahead of the tests
    print(wheel_path())
