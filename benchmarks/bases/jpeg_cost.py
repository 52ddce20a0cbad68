"""What the JPEG copy of CIFAR-10 costs the ResNet-8 base, measured the only way this
workspace allows (it has no lossless copy): the stored base evaluated on the test set as
shipped, and after one more JPEG generation at the archive's own settings and at others.

    python benchmarks/bases/jpeg_cost.py

The archive's images are quality 75 with 4:2:0 chroma subsampling (its quantization tables
are the standard ones scaled by 0.5). A second generation at the same settings changes the
pixels less than the first did (JPEG is close to idempotent at one quality), so the accuracy
it costs is a lower bound on what the first generation cost; the other qualities show the
slope. Writes bases/jpeg_cost.json.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import keras
import numpy as np
from PIL import Image

import collabopt as co

HERE = Path(__file__).resolve().parent
SETTINGS = [("as shipped (q75, 4:2:0)", None, None), ("+1 generation q75, 4:2:0", 75, 2),
            ("+1 generation q95, 4:4:4", 95, 0), ("+1 generation q50, 4:2:0", 50, 2)]


def reencode(images: np.ndarray, quality: int, subsampling: int) -> np.ndarray:
    out = np.empty_like(images)
    for i, img in enumerate((images * 255).round().astype(np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality, subsampling=subsampling)
        out[i] = np.asarray(Image.open(buf).convert("RGB"), np.float32) / 255
    return out


def main():
    base = keras.models.load_model(HERE / "resnet8_cifar10.keras")
    _, (xt, yt) = co.datasets.cifar10()
    rows = {}
    for label, quality, subsampling in SETTINGS:
        x = xt if quality is None else reencode(xt, quality, subsampling)
        accuracy = float(np.mean(np.argmax(base.predict(x, verbose=0), -1) == yt))
        change = float(np.abs(x - xt).mean() * 255)
        rows[label] = {"accuracy": accuracy, "mean_abs_pixel_change": change}
        print(f"{label}: top-1 {accuracy:.2%}, mean |pixel change| {change:.2f} / 255",
              flush=True)
    (HERE / "jpeg_cost.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
