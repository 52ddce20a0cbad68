"""The Optuna search over one path's settings: every trial's settings reach its int8 file
(zeros, shared values, layers left dense), the Pareto front and the recommendation follow
from the measured rows, an interrupted search resumes, and bad requests say what is wrong."""

import json
import sys

import keras
import pytest

import collabopt as co
from collabopt.plots import pareto_front
from collabopt.search import Search, candidate_layers

pytest.importorskip("optuna")


def _tree(trained, digits):
    (x, y), (xt, yt) = digits
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return co.DeploymentTree(
        trained, (x[:600], y[:600]), (xt, yt),
        compile={"optimizer": keras.optimizers.Adam(3e-4), "loss": loss},
        qat_compile={"optimizer": keras.optimizers.Adam(1e-5), "loss": loss},
        fit={"epochs": 1, "batch_size": 64, "verbose": 0}, latency_runs=1,
        vela_accelerator=None, targets=co.Targets(max_metric_drop=0.05))


def test_search_trials_reach_the_file_and_resume(tmp_path, trained, digits):
    import optuna

    tree = _tree(trained, digits)
    config = Search(leaf="PCQAT", trials=2, sparsity=(0.5, 0.8), clusters=(4, 8),
                    sampler="random", seed=2)
    lines: list[str] = []
    first = tree.search(tmp_path / "s", config, log=lines.append)
    assert [t["number"] for t in first.trials] == [0, 1]
    # a run killed mid-trial leaves a RUNNING trial in the journal: the next run finishes it
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "s" / "search.journal")))
    optuna.load_study(study_name="collabopt", storage=storage).ask()
    lines.clear()
    result = tree.search(tmp_path / "s", Search(**{**config.__dict__, "trials": 3}),
                         log=lines.append)
    started = [line for line in lines if line.startswith("[search] trial") and "..." in line]
    assert len(started) == 1 and started[0].startswith("[search] trial 2 ")  # no new number
    assert [t["number"] for t in result.trials] == [0, 1, 2]

    layers = candidate_layers(tree, "prune")
    assert layers == ["conv1", "conv2", "logits"] == candidate_layers(tree, "cluster")
    dense_somewhere = False
    for trial in result.trials:
        s = trial["settings"]
        assert 0.5 <= s["sparsity"] <= 0.8 and 4 <= s["clusters"] <= 8
        by_layer = {t.layer: t for t in co.inspect(trial["file"]).tensors
                    if t.op in ("CONV_2D", "FULLY_CONNECTED")}
        for name in layers:
            tensor = by_layer[name]
            pruned = name not in s["spared"]["prune"]
            clustered = name not in s["spared"]["cluster"]
            dense_somewhere |= not (pruned and clustered)
            if pruned:
                assert tensor.sparsity >= s["sparsity"] - 0.05, (trial["number"], name)
            else:
                assert tensor.sparsity < 0.2, (trial["number"], name)
            if clustered:
                assert tensor.unique <= s["clusters"], (trial["number"], name)
            else:
                assert tensor.unique > s["clusters"] + 1, (trial["number"], name)
        assert trial["verified"] == "yes"
    assert dense_somewhere  # per_layer: this seed leaves some layer out somewhere

    points = [(t["zip_bytes"], t["int8_metric"]) for t in result.trials]
    assert [t["number"] for t in result.pareto] == [
        result.trials[i]["number"] for i in pareto_front(points)]
    meeting = [t for t in result.trials if t["meets_targets"]]
    base = result.baseline["fp32_metric"]
    # accuracies are multiples of 1 / 360: a drop of exactly 18 samples is 0.05 up to
    # rounding, which the targets accept (their tolerance, 1e-12)
    assert all(t["meets_targets"] == (base - t["int8_metric"] <= 0.05 + 1e-12)
               for t in result.trials)
    expected = min(meeting, key=lambda t: t["zip_bytes"])["number"] if meeting else None
    assert (result.recommended and result.recommended["number"]) == expected
    saved = json.loads((tmp_path / "s" / "trials.json").read_text())
    assert saved["pareto"] == [t["number"] for t in result.pareto]
    assert (tmp_path / "s" / "search.png").stat().st_size > 0
    assert "dense layers" in str(result)

    with pytest.raises(co.tree.ConfigMismatch, match="another configuration"):
        tree.search(tmp_path / "s", Search(leaf="PQAT", trials=1))


@pytest.mark.parametrize("kwargs,message", [
    ({"leaf": "PTQ"}, "nothing to search"),
    ({"leaf": "XQAT"}, "leaf must be a path"),
    ({"trials": 0}, "trials must be a positive int"),
    ({"sparsity": (0.9, 0.5)}, "0 < low <= high < 1"),
    ({"sparsity": 0.5}, r"sparsity must be a \(low, high\) pair"),
    ({"clusters": (2, 8)}, "3 <= low <= high"),
    ({"clusters": (4.0, 8)}, "clusters must be an int range"),
    ({"sampler": "grid"}, "sampler must be one of"),
    ({"per_layer": "yes"}, "per_layer must be True or False"),
])
def test_bad_search_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Search(**kwargs)


def test_search_refuses_a_per_channel_leaf_on_a_per_tensor_tree(tmp_path, trained, digits):
    with pytest.raises(ValueError, match="per_channel=True"):
        _tree(trained, digits).search(tmp_path / "s", Search(leaf="PCQAT(pc)"))
    assert not (tmp_path / "s").exists()


def test_a_trial_that_leaves_every_layer_alone_fails_at_once(tmp_path, trained, digits):
    lines: list[str] = []
    result = _tree(trained, digits).search(  # this seed's first draw spares every prune layer
        tmp_path / "s", Search(leaf="PCQAT", trials=1, sparsity=(0.5, 0.8), clusters=(4, 8),
                               sampler="random", seed=3), log=lines.append)
    assert result.trials == [] and result.recommended is None and result.plot is None
    assert result.failed[0]["error"] == "every layer left out of prune, nothing to train"
    assert not any(line.startswith("[tree]") for line in lines)  # nothing trained


def test_search_without_optuna_says_what_to_install(tmp_path, trained, digits, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    tree = _tree(trained, digits)
    with pytest.raises(ImportError, match=r"pip install optuna.*grid needs nothing"):
        tree.search(tmp_path / "s", Search(trials=1))
    result = tree.explore(tmp_path / "grid", paths=["PTQ"])  # the grid needs no Optuna
    assert [r["path"] for r in result.rows] == ["PTQ"] and result.rows[0]["verified"] == "yes"
