"""Why Vela's encoded weights of tfmot's clustered leaves are not 1.33x ours: per channel int8
alphabets, measured in the files a side-by-side run wrote.

The issue's Vela target (clustered leaves <= 0.75x tfmot's) assumed that batch-norm folding
destroys tfmot's per-tensor codebook in the deployed file. In float it does (every output
channel is scaled by its own gamma / sigma); in int8 it mostly does not, because per-channel
quantization divides each channel by its own scale again: channel c holds
round(127 * centroid / max|centroid in c|), the same alphabet in every channel whose largest
centroid is the same. Ethos-U's weight encoder restarts its palette along the stream, so a
handful of distinct alphabets costs almost nothing. This script counts, per clustered weight
tensor (convolutions and dense kernels; depthwise kernels stay unclustered in both systems),
the int8 values per tensor, the distinct channel alphabets, and the bits per weight of Vela's
own encoder (``ethosu.mlw_codec``, one stream per tensor in output-channel order), for both
systems — plus a control: our tensors with each channel's palette replaced by its own random
16 values (the same indices), which is what the target assumed tfmot's files look like.
Trains nothing; run bench_vs_tfmot.py for the named runs first.

    python benchmarks/bench_vela_alphabets.py vs_tfmot_kws_50_16_bn_keep_bc \
        vs_tfmot_mnist_bn_keep_bc
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from _common import RESULTS, md_table, save_json, write_section
from bench_vs_tfmot import _slug

from collabopt.inspection import inspect

CLUSTERED_LEAVES = ["cluster → PTQ", "prune → cluster → PTQ", "CQAT", "PCQAT"]
CLUSTERED_OPS = ("CONV_2D", "FULLY_CONNECTED")


def channel_rows(path) -> list[np.ndarray]:
    """Each clustered weight tensor of the file as (channels, weights per channel) int8."""
    out = []
    for t in inspect(path).tensors:
        if t.op in CLUSTERED_OPS and t.values is not None and t.size >= 256:
            v = t.values.astype(np.int64)
            out.append(np.moveaxis(v, t.channel_axis, 0).reshape(v.shape[t.channel_axis], -1))
    return out


def mlw_bytes(w: np.ndarray) -> int:
    from ethosu import mlw_codec

    return len(mlw_codec.encode(w.reshape(-1).tolist()))


def own_alphabet_per_channel(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same palette indices, but every channel's values drawn afresh from -127..127 (zero
    kept at zero): a codebook that did not survive into int8."""
    out = np.empty_like(w)
    for c, row in enumerate(w):
        values, idx = np.unique(row, return_inverse=True)
        fresh = np.sort(rng.choice(np.setdiff1d(np.arange(-127, 128), [0]), len(values),
                                   replace=False))
        fresh[values == 0] = 0
        out[c] = fresh[idx]
    return out


def summarize(tensors: list[np.ndarray]) -> dict:
    n = sum(w.size for w in tensors)
    return {"weights": n,
            # medians: the first conv, with few weights per channel, holds many alphabets
            # in both systems and would hide the others
            "unique_per_tensor": float(np.median([len(np.unique(w)) for w in tensors])),
            "alphabets_per_tensor": float(np.median([len({tuple(np.unique(r)) for r in w})
                                                     for w in tensors])),
            "mlw_bits_per_weight": 8 * sum(mlw_bytes(w) for w in tensors) / n}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="side-by-side runs under benchmarks/results/runs")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows, data = [], {}
    for run in args.runs:
        work = RESULTS / "runs" / run
        table = RESULTS / f"{run}.json"
        if not work.is_dir() or not table.exists():
            raise SystemExit(f"no side-by-side run {run!r} here ({work}, {table}): run "
                             "bench_vs_tfmot.py for it first")
        leaves = json.loads(table.read_text())
        for leaf in CLUSTERED_LEAVES:
            ours_file = leaves[leaf]["ours"]["file"]
            ours_file = work / "ours" / "leaves" / ours_file.rsplit("/", 1)[-1]
            tfmot_file = work / "tfmot" / f"{_slug(leaf)}.tflite"
            if not (ours_file.exists() and tfmot_file.exists()):
                continue
            ours, tfmot = channel_rows(ours_file), channel_rows(tfmot_file)
            o, t = summarize(ours), summarize(tfmot)
            control = summarize([own_alphabet_per_channel(w, rng) for w in ours])
            vela = (leaves[leaf]["ours"]["vela_encoded_bytes"]
                    / leaves[leaf]["tfmot"]["vela_encoded_bytes"])
            data[f"{run}/{leaf}"] = {"ours": o, "tfmot": t, "control": control,
                                     "vela_ratio_whole_file": vela}
            rows.append([run.removeprefix("vs_tfmot_"), leaf, f"{o['weights']:,}",
                         f"{o['unique_per_tensor']:g} / {t['unique_per_tensor']:g}",
                         f"{o['alphabets_per_tensor']:g} / {t['alphabets_per_tensor']:g}",
                         f"{o['mlw_bits_per_weight']:.2f} / {t['mlw_bits_per_weight']:.2f}",
                         f"{o['mlw_bits_per_weight'] / t['mlw_bits_per_weight']:.2f}",
                         f"{control['mlw_bits_per_weight']:.2f}",
                         f"{o['mlw_bits_per_weight'] / control['mlw_bits_per_weight']:.2f}",
                         f"{vela:.2f}"])
    if not rows:
        raise SystemExit("none of these runs has both systems' clustered leaves")
    save_json("vela_alphabets", data)
    write_section(
        "vela_alphabets",
        "Vela and the int8 alphabets of clustered leaves",
        md_table(["run", "leaf", "clustered weights", "int8 values / tensor ours / tfmot (median)",
                  "channel alphabets / tensor ours / tfmot (median)",
                  "Vela encoder bits / weight ours / tfmot", "ratio",
                  "control: own alphabet per channel", "ours / control",
                  "Vela weights ratio (whole file)"], rows)
        + "\n\nClustered weight tensors only (convolutions and dense kernels; depthwise "
        "kernels stay unclustered in both systems and are left out). Bits per weight: "
        "Vela's own weight encoder (`ethosu.mlw_codec.encode`) on each tensor in "
        "output-channel order — Vela itself orders the stream in OFM-depth bricks, so the last "
        "column, Vela's encoded weights of the whole file from the side-by-side table, is "
        "the figure that counts. Control: our tensors with every channel's palette replaced "
        "by its own random values (zero kept), i.e. a codebook destroyed by per-channel "
        "scaling — the case the 0.75x target assumed for tfmot.")


if __name__ == "__main__":
    main()
