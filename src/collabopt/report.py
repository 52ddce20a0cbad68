"""The exploration report: the reference guide's table, the density plot of a representative
kernel through the stages, the metric-vs-size Pareto plots, and the recommended leaf.
``report.md`` links its PNGs; ``report.html`` embeds them and stands alone."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

COLUMNS = [
    ("path", "Path", "{}"),
    ("fp32_metric", "FP32 acc.", "{:.2%}"),
    ("int8_metric", "INT8 acc.", "{:.2%}"),
    ("agreement", "Same class as Keras", "{:.2%}"),
    ("size_bytes", "Size (B)", "{:,}"),
    ("zip_bytes", "Zipped (B)", "{:,}"),
    ("zip_reduction", "Zip reduction", "{:.1%}"),
    ("sparsity", "Sparsity", "{:.1%}"),
    ("unique_max", "Unique/tensor", "{}"),
    ("unique_per_channel_max", "Unique/channel", "{}"),
    ("latency_ms", "Latency (ms)", "{:.3f}"),
    ("vela_encoded_bytes", "Vela weights (B)", "{:,}"),
    ("vela_cycles", "Vela cycles", "{:,}"),
    ("vela_sram_bytes", "Vela SRAM (B)", "{:,}"),
    ("tflm", "TFLM", "{}"),
    ("arena_bytes", "Arena (B)", "{:,}"),
    ("flash_bytes", "Flash (B)", "{:,}"),
    ("verified", "Verified", "{}"),
    ("meets_targets", "Meets targets", "{}"),
]


def columns(metric: str = "accuracy") -> list[tuple[str, str, str]]:
    """The table's columns, the metric's two titled by its name."""
    if metric == "accuracy":
        return COLUMNS
    return [(k, t, f) if not k.endswith("_metric") else
            (k, f"{k.split('_')[0].upper()} {metric}", "{:.4g}") for k, t, f in COLUMNS]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(rows: list[dict], baseline: dict | None = None,
                   metric: str = "accuracy") -> str:
    cols = columns(metric)
    head = "| " + " | ".join(title for _, title, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    lines = [head, sep]
    for row in ([baseline] if baseline else []) + rows:
        lines.append("| " + " | ".join(_cell(row, k, f) for k, _, f in cols) + " |")
    return "\n".join(lines)


def format_table(rows: list[dict], baseline: dict | None = None,
                 metric: str = "accuracy") -> str:
    """Plain-text table for terminals."""
    keys = [c for c in columns(metric) if c[0] not in ("verified",)]
    cells = [[title for _, title, _ in keys]]
    for row in ([baseline] if baseline else []) + rows:
        cells.append([_cell(row, k, f) for k, _, f in keys])
    widths = [max(len(r[i]) for r in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     for r in cells)


def _targets_text(targets, metric: str = "accuracy") -> str:
    values = {k.replace("metric", metric): v for k, v in vars(targets).items()
              if v is not None and k != "max_accuracy_drop"}  # an alias of max_metric_drop
    parts = [f"{k.replace('_', ' ')} = {v}" for k, v in values.items()]
    return ", ".join(parts) if parts else "none set"


def write_report(result, density_sources: dict | None = None) -> None:
    from collabopt.plots import plot_tradeoff, plot_tree, plot_weight_density

    out = Path(result.out_dir)
    images: dict[str, Path] = {}
    if density_sources:
        layer = _representative_layer(density_sources)
        if layer:
            try:
                images["Weight density of " + layer] = plot_weight_density(
                    density_sources, layer, out / "density.png")
            except (KeyError, ValueError) as err:
                result.notes.append(f"density plot skipped: {err}")
    metric, higher = result.metric, result.higher_is_better
    if result.plan:
        built = {r["path"]: r for r in result.rows}
        images["The tree explored"] = plot_tree(
            [{**leaf, "row": built.get(leaf["path"])} for leaf in result.plan], result.baseline,
            out / "tree.png", metric, result.recommended)
    if result.rows:
        title = metric[0].upper() + metric[1:]
        images[f"{title} vs zipped size"] = plot_tradeoff(
            result.rows, out / "pareto.png", y="int8_metric", y_label=f"int8 {metric}",
            higher_is_better=higher)
        if any(r.get("vela_cycles") for r in result.rows):
            images[f"{title} vs Ethos-U cycles"] = plot_tradeoff(
                result.rows, out / "pareto_vela.png", x="vela_cycles", y="int8_metric",
                y_label=f"int8 {metric}", higher_is_better=higher)
    if result.recommended:
        rec = f"**Recommended leaf: {result.recommended}** (meets every target, smallest file)."
    else:
        rec = "No leaf meets every target; relax a target or explore with other settings."
    threads = "latency: median of batch-1 runs, LiteRT interpreter, 1 thread, this CPU"
    direction = "higher" if higher else "lower"
    md = ["# collabopt deployment tree report\n",
          f"Metric: {metric} ({direction} is better). "
          f"Targets: {_targets_text(result.targets, metric)}.",
          "", rec, "", markdown_table(result.rows, result.baseline, metric), "", f"({threads}; "
          "zipped = deflate, as the reference reports; Vela: ethos-u55-128)", ""]
    micro = [f"{r['path']}: {r['tflm_line']}" for r in result.rows if r.get("tflm_line")]
    if micro:
        md += ["## On TFLite Micro", "", *[f"- {line}" for line in micro], "",
               "(arena: measured by the TFLM interpreter; flash: the model data)", ""]
    failed = _failed_lines(result)
    if failed:
        md += ["## Failed leaves", "", *[f"- {line}" for line in failed], ""]
    spared_title = 'Layers spared (layer_policy="auto")'
    if result.spared:
        md += [f"## {spared_title}", "", *[f"- {line}" for line in result.spared], ""]
        if (out / "sensitivity.png").exists():
            images["Per-layer sensitivity (each layer alone, no fine-tuning)"] = (
                out / "sensitivity.png")
    for title, path in images.items():
        md += [f"## {title}", "", f"![{title}]({path.name})", ""]
    md += [f"- {n}" for n in result.notes]
    result.report_md = _write(out / "report.md", "\n".join(md))
    body = ["<h1>collabopt deployment tree report</h1>",
            f"<p>Metric: {html.escape(metric)} ({direction} is better). Targets: "
            f"{html.escape(_targets_text(result.targets, metric))}.</p>",
            f"<p>{html.escape(rec).replace('**', '')}</p>", _html_table(result),
            f"<p><small>{html.escape(threads)}</small></p>"]
    if micro:
        body.append("<h2>On TFLite Micro</h2><ul>" + "".join(
            f"<li>{html.escape(line)}</li>" for line in micro) + "</ul>")
    if failed:
        body.append("<h2>Failed leaves</h2><ul>" + "".join(
            f"<li>{html.escape(line)}</li>" for line in failed) + "</ul>")
    if result.spared:
        body.append(f"<h2>{html.escape(spared_title)}</h2><ul>" + "".join(
            f"<li>{html.escape(line)}</li>" for line in result.spared) + "</ul>")
    for title, path in images.items():
        data = base64.b64encode(path.read_bytes()).decode()
        body.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                    f"src='data:image/png;base64,{data}'>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>collabopt report</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "td:first-child{text-align:left}</style></head><body>" + "\n".join(body)
            + "</body></html>")
    result.report_html = _write(out / "report.html", page)


def _failed_lines(result) -> list[str]:
    lines = [f"{f['path']}: {f['error']}" for f in getattr(result, "failed", [])]
    if lines:
        lines.append("Running the same exploration again retries these and nothing else.")
    return lines


def _html_table(result) -> str:
    cols = columns(result.metric)
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t, _ in cols)
    rows = []
    for row in [result.baseline] + result.rows:
        style = " style='background:#e6f4ea'" if row.get("path") == result.recommended else ""
        rows.append(f"<tr{style}>" + "".join(f"<td>{html.escape(_cell(row, k, f))}</td>"
                                             for k, _, f in cols) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _representative_layer(sources: dict) -> str | None:
    """The largest optimizable layer of the baseline model."""
    from collabopt.core import registry
    from collabopt.core.rewrite import iter_layers

    base = next((m for m in sources.values() if not isinstance(m, (str, os.PathLike))), None)
    if base is None:
        return None
    best, size = None, 0
    for layer in iter_layers(base):
        specs = registry.weight_specs(layer)
        if specs:
            n = registry.find_variable(layer, specs[-1].name).numpy().size
            if n > size:
                best, size = layer.name, n
    return best


def _write(path: Path, text: str) -> Path:
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
