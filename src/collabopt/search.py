"""Multi-objective search over one path's settings, per layer included, with Optuna.

The grid (``DeploymentTree(sparsity=[...], clusters=[...])``) tries every combination and
needs nothing more. A search tries what a sampler proposes instead: the sparsity, the cluster
count and, with ``per_layer=True``, which layers each technique leaves alone — a space no grid
covers — and keeps the trials that trade the metric against zipped bytes best (the Pareto
front). Each trial is one path of a ``DeploymentTree`` with the trial's settings, trained,
exported, verified and measured like any leaf. Trials are kept in ``out_dir``
(``search.journal``, Optuna's file journal, and one folder per trial), so an interrupted
search resumes: a trial cut off mid-way finishes from its checkpoints, and only the missing
trials run. Optuna is an optional dependency (``pip install optuna``).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

SAMPLERS = ("nsga2", "tpe", "random")
_SEARCHABLE = ("prune → PTQ", "cluster → PTQ", "PQAT", "prune → cluster → PTQ", "CQAT", "PCQAT",
               "cluster(pc) → PTQ", "CQAT(pc)", "prune → cluster(pc) → PTQ", "PCQAT(pc)")


@dataclass(frozen=True)
class Search:
    """What to search: the leaf (one path of the tree), how many trials, the ranges.

    ``sparsity`` is a (low, high) range searched in steps of 0.05 (0.025 where that ends on
    ``high``); ``clusters`` an integer
    (low, high) range searched on a log scale; ``per_layer`` adds one yes/no choice per layer
    and technique (compress it, or leave it as it is). ``sampler``: "nsga2" (Optuna's
    multi-objective genetic search), "tpe" or "random"; ``seed`` makes its proposals repeat.
    """

    leaf: str = "PCQAT"
    trials: int = 20
    sparsity: tuple[float, float] = (0.3, 0.9)
    clusters: tuple[int, int] = (4, 32)
    per_layer: bool = True
    sampler: str = "nsga2"
    seed: int = 0

    def __post_init__(self):
        for name in ("sparsity", "clusters"):  # a list (TOML, JSON) is a pair too
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.leaf not in _SEARCHABLE:
            raise ValueError(f"leaf must be a path that prunes or clusters, one of "
                             f"{list(_SEARCHABLE)}; got {self.leaf!r} (PTQ and QAT have "
                             "nothing to search)")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"trials must be a positive int, got {self.trials!r}")
        lo, hi = _pair(self.sparsity, "sparsity")
        if not 0 < lo <= hi < 1:
            raise ValueError(f"sparsity must be a range (low, high) with 0 < low <= high < 1, "
                             f"got {self.sparsity!r}")
        lo, hi = _pair(self.clusters, "clusters")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) \
                or not 3 <= lo <= hi:
            raise ValueError(f"clusters must be an int range (low, high) with 3 <= low <= "
                             f"high, got {self.clusters!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not isinstance(self.per_layer, bool):
            raise ValueError(f"per_layer must be True or False, got {self.per_layer!r}")

    @property
    def prunes(self) -> bool:
        return "prune" in self.leaf or self.leaf.startswith(("PQAT", "PCQAT"))

    @property
    def clusters_weights(self) -> bool:
        return "cluster" in self.leaf or self.leaf.startswith(("CQAT", "PCQAT"))


def _pair(value, what: str) -> tuple:
    if not isinstance(value, tuple) or len(value) != 2:
        raise ValueError(f"{what} must be a (low, high) pair, got {value!r}")
    return value


@dataclass
class SearchResult:
    """Every trial (its settings and the leaf's row), the Pareto front among them, and the
    recommended trial: the smallest file that meets every target."""

    out_dir: Path
    trials: list[dict]
    pareto: list[dict]
    recommended: dict | None
    baseline: dict
    metric: str = "accuracy"
    higher_is_better: bool = True
    plot: Path | None = None
    failed: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{'trial':>5}  {'sparsity':>8}  {'clusters':>8}  {'dense layers':<24}"
                 f"  {'int8 ' + self.metric:>14}  {'zip bytes':>10}  front  meets"]
        front = {t["number"] for t in self.pareto}
        for t in self.trials:
            s = t["settings"]
            dense = ", ".join(s["dense_layers"]) or "-"
            lines.append(
                f"{t['number']:>5}  {_pct(s.get('sparsity')):>8}  {s.get('clusters') or '-':>8}"
                f"  {dense[:24]:<24}  {t['int8_metric']:>14.4f}  {t['zip_bytes']:>10,}"
                f"  {'yes' if t['number'] in front else '':>5}"
                f"  {'yes' if t['meets_targets'] else ''}")
        return "\n".join(lines)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _optuna():
    try:
        import optuna
    except ImportError as err:
        raise ImportError(
            "co.Search needs Optuna: pip install optuna (or pip install 'collabopt[search]'). "
            "The grid needs nothing: DeploymentTree(sparsity=[0.5, 0.75], clusters=[8, 16])"
            ".explore(...)") from err
    return optuna


def candidate_layers(tree, technique: str) -> list[str]:
    """The layers a trial may choose to leave alone: those the technique would compress."""
    from collabopt.core import registry
    from collabopt.core.rewrite import iter_layers
    from collabopt.tree import Sparing

    selector = Sparing(tree.prune_layers if technique == "prune" else tree.cluster_layers, ())
    return [layer.name for layer in iter_layers(tree.model)
            if registry.weight_specs(layer) and selector(layer)]


def _step(lo: float, hi: float) -> float | None:
    """Steps of 0.05 (or 0.025) that end on ``hi``; none where neither does."""
    for step in (0.05, 0.025):
        n = (hi - lo) / step
        if abs(n - round(n)) < 1e-6:
            return step
    return None


def _suggest(trial, config: Search, layers: dict[str, list[str]]) -> dict:
    """The trial's settings: sparsity, clusters, the layers each technique leaves dense."""
    settings = {"sparsity": None, "clusters": None, "spared": {}}
    if config.prunes:
        lo, hi = config.sparsity
        settings["sparsity"] = round(trial.suggest_float("sparsity", lo, hi, step=_step(lo, hi))
                                     if lo < hi else lo, 4)
    if config.clusters_weights:
        settings["clusters"] = (trial.suggest_int("clusters", *config.clusters, log=True)
                                if config.clusters[0] < config.clusters[1]
                                else config.clusters[0])
    for technique, names in layers.items():
        settings["spared"][technique] = [
            n for n in names if config.per_layer
            and not trial.suggest_categorical(f"{technique}:{n}", [True, False])]
    return settings


def _trial_tree(tree, settings: dict):
    """A copy of ``tree`` planned for one trial's settings (the copy shares model and data)."""
    from collabopt.tree import Sparing, _plan

    t = copy.copy(tree)
    t.sparsity = settings["sparsity"] or 0.5
    t.clusters = settings["clusters"] or 16
    t.layer_policy, t.spared = "all", {}
    spared = settings["spared"]
    if spared.get("prune"):
        t.prune_layers = Sparing(tree.prune_layers, tuple(spared["prune"]))
    if spared.get("cluster"):
        t.cluster_layers = Sparing(tree.cluster_layers, tuple(spared["cluster"]))
    t.nodes, t.leaves = _plan(tree.per_channel, (t.sparsity,), (t.clusters,))
    return t


def search(tree, out_dir: str | os.PathLike, config: Search | None = None, force: bool = False,
           log: Callable[[str], None] = print) -> SearchResult:
    """Run ``config.trials`` trials of ``config.leaf`` (``DeploymentTree.search``)."""
    config = config or Search()
    if config.leaf.endswith("(pc)") and not tree.per_channel:
        raise ValueError(f"leaf {config.leaf!r} is a per-channel leaf: build the tree with "
                         "per_channel=True")
    optuna = _optuna()
    out = Path(out_dir)
    study = _open_study(optuna, tree, out, config, force)
    layers = {technique: candidate_layers(tree, technique)
              for technique, used in (("prune", config.prunes),
                                      ("cluster", config.clusters_weights)) if used}
    states = optuna.trial.TrialState
    # a trial cut off by an interrupted run finishes first, from its checkpoints
    pending = [optuna.trial.Trial(study, t._trial_id)  # Optuna has no public resume
               for t in study.get_trials(deepcopy=False, states=(states.RUNNING,))]
    done = len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.FAIL)))
    while done < config.trials:
        trial = pending.pop(0) if pending else study.ask()
        settings = _suggest(trial, config, layers)
        trial.set_user_attr("settings", settings)
        log(f"[search] trial {trial.number} ({done + 1}/{config.trials}): "
            f"{_describe(settings)} ...")
        done += 1
        _run_trial(study, trial, tree, out, config, settings, layers, log)
    return _collect(study, tree, out, config)


def _open_study(optuna, tree, out: Path, config: Search, force: bool):
    """The study kept in ``out`` (created, or loaded to continue; refused if it was another
    search, unless ``force``)."""
    from collabopt.tree import ConfigMismatch, _atomic_json

    out.mkdir(parents=True, exist_ok=True)
    # more trials continue a search: the count is not part of what must match
    fingerprint = {"tree": tree.fingerprint(),
                   "search": {k: v for k, v in asdict(config).items() if k != "trials"}}
    fingerprint["tree"].pop("sparsity"), fingerprint["tree"].pop("clusters")
    fingerprint = json.loads(json.dumps(fingerprint, default=str))
    config_file = out / "search.json"
    if config_file.exists() and json.loads(config_file.read_text()) != fingerprint:
        if not force:
            raise ConfigMismatch(f"{out} holds a search with another configuration: use "
                                 "another out_dir, or force=True (--force) to start over")
        import shutil

        shutil.rmtree(out)
        out.mkdir(parents=True)
    _atomic_json(config_file, fingerprint)
    samplers = {"nsga2": optuna.samplers.NSGAIISampler, "tpe": optuna.samplers.TPESampler,
                "random": optuna.samplers.RandomSampler}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "search.journal")))
    return optuna.create_study(
        study_name="collabopt", storage=storage, load_if_exists=True,
        directions=["maximize" if tree.metric.higher_is_better else "minimize", "minimize"],
        sampler=samplers[config.sampler](seed=config.seed))


def _run_trial(study, trial, tree, out: Path, config: Search, settings: dict, layers: dict,
               log) -> None:
    """Train, export and measure one trial's leaf and tell the study (a failure is a FAIL
    state with its reason, so the sampler learns to avoid it)."""
    from optuna.trial import TrialState

    def fail(error: str) -> None:
        trial.set_user_attr("error", error)
        study.tell(trial, state=TrialState.FAIL)
        log(f"[search] trial {trial.number} failed: {error}")

    idle = [t for t, names in layers.items() if set(settings["spared"][t]) >= set(names)]
    if idle:  # nothing to train
        return fail(f"every layer left out of {' and '.join(idle)}, nothing to train")
    start = time.perf_counter()
    result = _trial_tree(tree, settings).explore(out / f"trial_{trial.number:03d}",
                                                 paths=[config.leaf], log=log)
    if "baseline" not in study.user_attrs:
        study.set_user_attr("baseline", _plain(result.baseline))
    if not result.rows:
        return fail((result.failed or [{}])[0].get("error", "no leaf was built"))
    row = result.rows[0]
    trial.set_user_attr("row", _plain(row))
    study.tell(trial, [row["int8_metric"], row["zip_bytes"]])
    log(f"[search] trial {trial.number}: int8 {tree.metric.name} {row['int8_metric']:.4f}, "
        f"{row['zip_bytes']:,} bytes zipped"
        f"{', meets the targets' if row['meets_targets'] else ''} "
        f"({time.perf_counter() - start:.0f}s)")


def _collect(study, tree, out: Path, config: Search) -> SearchResult:
    """Every finished trial of the study (this run's and earlier ones'), its Pareto front,
    the recommendation, the plot and ``trials.json``."""
    from optuna.trial import TrialState

    from collabopt.plots import pareto_front, plot_tradeoff
    from collabopt.tree import _atomic_json, _recommend

    higher = tree.metric.higher_is_better
    trials, failed = [], []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        settings = dict(t.user_attrs.get("settings", {}))
        settings["dense_layers"] = sorted({n for names in settings.get("spared", {}).values()
                                           for n in names})
        if t.state == TrialState.FAIL:
            failed.append({"number": t.number, "settings": settings,
                           "error": t.user_attrs.get("error", "failed")})
        else:
            trials.append({**t.user_attrs["row"], "number": t.number, "path": f"trial {t.number}",
                           "leaf": config.leaf, "settings": settings})
    baseline = study.user_attrs.get("baseline", {})
    pareto = [trials[i] for i in pareto_front([(t["zip_bytes"], t["int8_metric"])
                                               for t in trials], higher)]
    best = _recommend(trials, higher)
    recommended = next((t for t in trials if t["path"] == best), None)
    plot = plot_tradeoff(trials, out / "search.png", y="int8_metric",
                         y_label=f"int8 {tree.metric.name}",
                         higher_is_better=higher) if trials else None
    _atomic_json(out / "trials.json", {
        "leaf": config.leaf, "trials": trials, "failed": failed,
        "pareto": [t["number"] for t in pareto],
        "recommended": recommended and recommended["number"], "baseline": baseline})
    return SearchResult(out, trials, pareto, recommended, baseline, metric=tree.metric.name,
                        higher_is_better=higher, plot=plot, failed=failed)


def _describe(settings: dict) -> str:
    parts = []
    if settings["sparsity"] is not None:
        parts.append(f"sparsity {settings['sparsity']:.0%}")
    if settings["clusters"] is not None:
        parts.append(f"{settings['clusters']} clusters")
    for technique, names in settings["spared"].items():
        if names:
            parts.append(f"no {technique} on {', '.join(names)}")
    return ", ".join(parts)


def _plain(row: dict) -> dict:
    """A row Optuna's journal can hold (JSON: paths as strings, no numpy scalars)."""
    return json.loads(json.dumps(row, default=lambda v: str(v) if isinstance(v, Path)
                                 else float(v)))


__all__ = ["Search", "SearchResult", "search", "candidate_layers"]
