"""The targets over every current side-by-side table at a glance: how many leaves meet each
one, and which fall short by how much. Trains nothing: it reads the JSON the other scripts
wrote (benchmarks/results/), so it is rerun after any of them. Current means run with the
library's defaults (batch norm kept training where the converter folds it exactly); the
folded-first runs stay as data for the batch-norm ablation (bench_batchnorm.py) only.

    python benchmarks/bench_scoreboard.py
"""

from __future__ import annotations

import json

from _common import RESULTS, md_table, write_section

TARGETS = ("accuracy", "zip", "Vela")


def tables() -> list[tuple[str, str, dict]]:
    """(name, what ours ran with, {leaf: {ours, tfmot, targets}}) for every current run."""
    out = []
    for path in sorted(RESULTS.glob("vs_tfmot_*_bn_keep*.json")):
        name = path.stem
        out.append((name, "bias correction" if name.endswith("_bc") else "no bias correction",
                    json.loads(path.read_text())))
    return out


def score(rows: dict, target: str) -> tuple[int, int, int, list[str]]:
    """(met, compared, not comparable, the leaves that miss it with the gap)."""
    met = compared = na = 0
    misses = []
    for leaf, r in rows.items():
        verdicts = r.get("targets") or {}
        if target not in verdicts:
            continue
        if verdicts[target] is None:
            na += 1
            continue
        compared += 1
        if verdicts[target]:
            met += 1
        elif target == "accuracy":
            gap = (r["ours"]["int8_accuracy"] - r["tfmot"]["int8_accuracy"]) * 100
            misses.append(f"{leaf} {gap:+.2f}")
        elif target == "zip":
            misses.append(f"{leaf} {r['ours']['zip_bytes'] / r['tfmot']['zip_bytes']:.3f}x")
        else:
            ratio = r["ours"]["vela_encoded_bytes"] / r["tfmot"]["vela_encoded_bytes"]
            misses.append(f"{leaf} {ratio:.2f}x")
    return met, compared, na, misses


def vela_verdicts(rows: dict) -> dict:
    """The rows with the Vela verdict judged at <= 1.0x tfmot (the benchmark issue's target)."""
    out = {}
    for leaf, r in rows.items():
        targets = dict(r.get("targets") or {})
        if targets.get("Vela") is not None:
            targets["Vela"] = (r["ours"]["vela_encoded_bytes"]
                               <= r["tfmot"]["vela_encoded_bytes"])
        out[leaf] = {**r, "targets": targets}
    return out



def seed_rows() -> list[list[str]]:
    """One row per multi-seed run (bench_seeds.py): met / within noise / missed per target."""
    rows = []
    for path in sorted(RESULTS.glob("seeds_*.json")):
        data = json.loads(path.read_text())
        cells = [path.stem.removeprefix("seeds_"), ", ".join(map(str, data["seeds"]))]
        short = []
        for target in ("accuracy", "zip", "vela"):
            verdicts = {leaf: v[target] for leaf, v in data["verdicts"].items() if target in v}
            counts = [sum(v.startswith(s) for v in verdicts.values())
                      for s in ("met", "within noise", "missed")]
            cells.append(" / ".join(map(str, counts)))
            short += [f"{target}: {leaf} ({v})" for leaf, v in verdicts.items()
                      if v.startswith(("within", "missed"))]
        cells.append(data["best_verdict"])
        rows.append(cells + ["; ".join(short) or "–"])
    return rows


def step_time_rows() -> list[list]:
    path = RESULTS / "step_time.json"
    if not path.exists():
        return []
    rows = []
    for arch, r in json.loads(path.read_text()).items():
        ours, tfmot = r["ours"], r["tfmot"]["median_ms"]
        slower = [v for v in ours if v != "plain"
                  and ours[v] / ours["plain"] > tfmot[v] / tfmot["plain"]]
        rows.append([arch, f"{len(ours) - 1 - len(slower)} / {len(ours) - 1}",
                     ", ".join(slower) or "–"])
    return rows


def main():
    rows = []
    totals = {t: [0, 0] for t in TARGETS}
    all_tables = tables()
    for name, mode, data in all_tables:
        data = vela_verdicts(data)
        cells = [name.removeprefix("vs_tfmot_").removesuffix("_bc").removesuffix("_bn_keep"), mode]
        misses = []
        for target in TARGETS:
            met, compared, na, missed = score(data, target)
            totals[target][0] += met
            totals[target][1] += compared
            cells.append(f"{met} / {compared}" + (f" ({na} n/a)" if na else "")
                         if compared or na else "–")
            misses += [f"{target}: {m}" for m in missed]
        rows.append(cells + ["; ".join(misses) or "–"])
    seeded = seed_rows()
    body = (md_table(["run (workload_sparsity_clusters)", "seeds",
                      "accuracy ≥ tfmot − 0.3: met / within noise / missed",
                      "zip ≤ tfmot", "Vela ≤ tfmot (clustered)",
                      "smallest leaf within 1 point smaller than tfmot's", "not met"], seeded)
            + "\n\nOver seeds, from the stored bases (bench_seeds.py): met when the mean gap "
              "reaches the target, within noise when the shortfall is inside two standard "
              "errors of the difference, missed otherwise.\n\nOne seed per table, bases "
              "trained inline (the older side-by-sides):\n\n") if seeded else ""
    body += md_table(["run", "ours", "accuracy ≥ tfmot − 0.3", "zip ≤ tfmot",
                     "Vela ≤ tfmot (clustered)", "short of a target (Δ pts or ratio)"], rows)
    body += "\n\nTotals over these tables: " + ", ".join(
        f"{t} {m} / {c}" for t, (m, c) in totals.items()) + (
        ". Each row counts the leaves of one table whose tfmot file exists; \"n/a\": tfmot left "
        "the convs of a per-channel leaf unclustered, so its accuracy is not comparable. One "
        "seed per table: the seed-noise tables say which accuracy gaps exceed shuffling luck. "
        "Vela: the earlier 0.75x target is out of reach against tfmot's post-training leaves "
        "(its codebooks survive int8 per-channel quantization as one or two alphabets per "
        "tensor, \"Vela and the int8 alphabets of clustered leaves\"); no larger than "
        "tfmot's is the target.")
    steps = step_time_rows()
    if steps:
        body += "\n\n" + md_table(["model", "wrappers with step-time ratio ≤ tfmot's",
                                   "slower than tfmot (ratio to plain)"], steps)
    write_section("scoreboard", "Scoreboard: the targets over every current side-by-side table",
                  body)


if __name__ == "__main__":
    main()
