"""Why per-tensor codebooks lose at 4 clusters, and what would keep both their promise and
the accuracy: codebook granularities on the ResNet-8 base, before any fine-tuning.

    python benchmarks/bench_codebooks.py [--clusters 4 8 16]

Every conv kernel of the batch-norm-folded base (84.78 %) is replaced by its clustered
values, the model is scored on the whole CIFAR-10 test set, and each kernel's int8 values
are counted after the per-channel symmetric quantization the converter applies
(scale = max |w| / 127 per output channel); the Dense head stays as it is. Rows:

- **per tensor** — ``co.cluster(folded, k)``, the library's per-tensor codebook (what the
  seeded 75 % / 4 table measures): k values per tensor, but the converter must then quantize
  every weight per tensor (its switch is global) to keep them;
- **per channel** — ``co.cluster(folded, k, per_channel=True)``: k values per channel, up to
  k x channels per tensor;
- **shared, scaled** (prototype) — one codebook per tensor over the channels divided by
  their largest |w| (a Lloyd weighted by each channel's scale squared, so that the error is
  the unscaled kernel's), scaled back: k values per channel, and the same k *integers* in
  every channel whose extreme falls on the same end of the codebook (so up to about 2k per
  tensor);
- **shared, scaled, symmetric ends** (prototype) — the same with the two extreme centroids
  held at -m and +m: every channel's largest |w| then lands on m times its scale, so
  per-channel int8 scales give every channel the same k integers — k per tensor in the file —
  and a batch norm folded later only rescales a channel, which leaves its integers alone.
"""

from __future__ import annotations

import argparse

import keras
import numpy as np
from _common import ROOT, md_table, save_json, write_section

import collabopt as co

BASE = ROOT / "benchmarks" / "bases" / "resnet8_cifar10.keras"


def shared_scaled(values: np.ndarray, weight: np.ndarray, k: int, symmetric: bool,
                  iterations: int = 40):
    """1-D weighted Lloyd on values in [-1, 1] (``weight``: each value's channel scale
    squared, so that the error minimised is the one in the unscaled kernel); with
    ``symmetric`` the two extreme centroids are kept at -m and +m (m fitted to both ends)."""
    c = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, values)
        sums = np.bincount(idx, weights=values * weight, minlength=k)
        mass = np.bincount(idx, weights=weight, minlength=k)
        new = np.where(mass > 0, sums / np.where(mass > 0, mass, 1), c)
        if symmetric:  # m: the weighted mean |value| of both extreme clusters
            m = (sums[-1] - sums[0]) / max(mass[-1] + mass[0], 1e-30)
            new[0], new[-1] = -m, m
        c = np.sort(new)
    return c[np.searchsorted((c[1:] + c[:-1]) / 2, values)]


def scaled_copy(model, k: int, symmetric: bool):
    out = keras.models.clone_model(model)
    out.set_weights(model.get_weights())
    for layer in out.layers:
        if isinstance(layer, keras.layers.Conv2D):
            w, b = layer.get_weights()
            scale = np.abs(w).max(axis=(0, 1, 2))
            u = (w / scale).ravel()
            weight = np.broadcast_to(scale ** 2, w.shape).ravel()
            layer.set_weights([shared_scaled(u, weight, k, symmetric).reshape(w.shape) * scale,
                               b])
    return out


def int8_values(model, per_tensor: bool) -> list[int]:
    """Distinct int8 values per conv kernel after symmetric quantization with one scale per
    output channel (the converter's default) or per tensor (its switch for codebooks)."""
    counts = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            w = layer.get_weights()[0]
            top = np.abs(w).max() if per_tensor else np.abs(w).max(axis=(0, 1, 2))
            counts.append(int(np.unique(np.round(w / (top / 127))).size))
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", type=int, nargs="+", default=[4, 8, 16])
    args = ap.parse_args()
    if not BASE.exists():
        raise SystemExit(f"{BASE} is missing: train it (benchmarks/bases/README.md)")
    base = keras.models.load_model(BASE)
    _, (xt, yt) = co.datasets.cifar10()
    folded = co.fold_batchnorm(base)

    def accuracy(m) -> float:
        return float(np.mean(np.argmax(m.predict(xt, batch_size=500, verbose=0), -1) == yt))

    rows, data = [], []
    for k in args.clusters:
        variants = {
            "per tensor (library)": co.strip(co.cluster(folded, k, verbose=False)),
            "per channel (library)": co.strip(co.cluster(folded, k, per_channel=True,
                                                         verbose=False)),
            "shared, scaled (prototype)": scaled_copy(folded, k, symmetric=False),
            "shared, scaled, symmetric ends (prototype)": scaled_copy(folded, k,
                                                                      symmetric=True)}
        for name, model in variants.items():
            acc, ints = accuracy(model), int8_values(model, per_tensor=name.startswith("per t"))
            data.append({"clusters": k, "codebook": name, "accuracy": acc, "int8_values": ints})
            rows.append([k, name, f"{acc:.2%}", f"{min(ints)}-{max(ints)}"])
            print(rows[-1], flush=True)
    save_json("codebooks", data)
    write_section(
        "codebooks", "Codebook granularity before fine-tuning (ResNet-8 / CIFAR-10)",
        f"Base `benchmarks/bases/resnet8_cifar10.keras`, batch norm folded: "
        f"{accuracy(folded):.2%} on the 10,000 test images. Every conv kernel clustered, no "
        "fine-tuning; int8 values per conv kernel after symmetric quantization, one scale per "
        "output channel (one per tensor for the library's per-tensor rows, as it exports "
        "them: the only way their k survive).\n\n"
        + md_table(["clusters", "codebook", "test top-1", "int8 values per kernel"], rows)
        + "\n\nA codebook shared by the channels *after* dividing each by its largest |w| "
        "keeps what a per-tensor codebook promises — k int8 values per tensor in the file, "
        "exactly k with symmetric ends — while every channel keeps its own scale, so "
        "unclustered layers keep per-channel int8 and batch norm may keep training. It is "
        "the candidate design for the per-tensor leaves that the seeded 75 % / 4 table finds "
        "far behind tfmot (whose files hold 6-16 values per tensor, as the free scaled row "
        "does); not in the library yet.")


if __name__ == "__main__":
    main()
