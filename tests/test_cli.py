import json

import numpy as np
import pytest

import collabopt as co
from collabopt.cli import ConfigError, load_config, main


@pytest.fixture()
def project(tmp_path, trained, digits):
    (x, y), (xt, yt) = digits
    trained.save(tmp_path / "model.keras")
    np.savez(tmp_path / "data.npz", x_train=x[:300], y_train=y[:300], x_val=xt, y_val=yt)
    return tmp_path


def _write(path, text):
    path.write_text(text)
    return path


def test_run_config(project, capsys):
    cfg = _write(project / "c.toml", """
[model]
path = "model.keras"
[data]
npz = "data.npz"
[train]
learning_rate = 0.0003
qat_learning_rate = 0.00001
from_logits = true
epochs = 1
[tree]
out_dir = "out"
paths = ["PTQ", "prune → PTQ"]
clusters = 8
[targets]
max_accuracy_drop = 0.1
""")
    assert main(["run", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "prune → PTQ" in out and "recommended leaf" in out
    assert (project / "out" / "report.html").exists()
    # the same command again resumes (the fingerprint holds no object addresses)
    assert main(["run", str(cfg)]) == 0
    assert "prune → PTQ: done earlier" in capsys.readouterr().out


@pytest.mark.parametrize("body,message", [
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[tree]\npaths = ["XQAT"]\n',
     r"\[tree\].paths"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[tree]\nlevels = 2\n',
     r"\[tree\].levels is not a known key"),
    ('[model]\npath = "model.keras"\n', r"missing section \[data\]"),
    ('[model]\npath = "data.npz"\n[data]\nnpz = "data.npz"\n', r"\[model\].path.*not a .keras"),
    ('[model]\npath = "nope.keras"\n[data]\nnpz = "data.npz"\n', r"\[model\].path.*not exist"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "a.npz"\nloader = "m:f"\n', "exactly one"),
    ("this is = = not toml", "not valid TOML"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[tree]\nworkers = 0\n',
     r"\[tree\].workers must be a positive integer"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[tree]\n'
     'dask_scheduler = "10.0.0.5"\n', r"\[tree\].dask_scheduler must be a scheduler address"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[tree]\nworkers = 2\n'
     'dask_scheduler = "tcp://10.0.0.5:8786"\n', "choose one"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[targets]\n'
     'max_arena_bytes = "64k"\n', r"\[targets\].max_arena_bytes must be a non-negative number"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[tree]\nsparsity = [0.5, 1.5]\n',
     r"\[tree\]: sparsity must be in \(0, 1\), got 1.5"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[tree]\nclusters = [8, 8]\n',
     r"\[tree\]: clusters must be one value or a list of distinct values"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[tree]\nmetric = "nope"\n',
     r"\[tree\].metric: unknown metric 'nope'"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[tree]\nhigher_is_better = 1\n',
     r"\[tree\].higher_is_better must be true or false"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[targets]\n'
     'max_metric_drop = 0.1\nmax_accuracy_drop = 0.1\n', "the same limit"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[tree]\nsparsity = [0.5, 0.75]\n'
     'paths = ["prune → PTQ"]\n', r"\[tree\].paths"),  # with two settings, leaves name theirs
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[tree]\nlayer_policy = "auto"\n',
     r"layer_policy = \"auto\" needs a threshold"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[tree]\nlayer_policy = "most"\n',
     r"\[tree\].layer_policy must be"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[tree]\n'
     'sensitivity_threshold = -1\n', r"\[tree\].sensitivity_threshold must be a non-negative"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[tree]\ndistill = "on"\n',
     r"\[tree\].distill must be true or false"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[tree]\ndistill = true\n'
     'distill_weight = 2\n', r"\[tree\].distill_\*: weight must be in"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[search]\nleaf = "QAT"\n',
     r"\[search\]: leaf must be a path that prunes or clusters"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[search]\nsparsity = 0.5\n',
     r"\[search\]: sparsity must be a \(low, high\) pair"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[search]\ntrails = 5\n',
     r"\[search\].trails is not a known key"),
    ('[model]\npath = "model.keras"\n[data]\nnpz = "data.npz"\n[search]\nleaf = "PCQAT(pc)"\n',
     r"per-channel leaf but \[tree\].per_channel is not true"),
])
def test_bad_configs(project, body, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(project / "bad.toml", body))


@pytest.mark.slow
def test_run_with_workers_and_an_unreachable_dask_scheduler(project, capsys):
    body = """
[model]
path = "model.keras"
[data]
npz = "data.npz"
[train]
from_logits = true
[tree]
out_dir = "out"
paths = ["PTQ", "prune → PTQ", "cluster → PTQ"]
clusters = 8
"""
    cfg = _write(project / "c.toml", body)
    assert main(["run", str(cfg), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 local worker processes" in out
    assert "prune: prune of base, fine-tuning on a worker" in out
    assert "cluster: trained in" in out and "recommended leaf" in out
    with pytest.raises(SystemExit):
        main(["run", str(cfg), "--workers", "0"])
    pytest.importorskip("distributed")
    cfg = _write(project / "d.toml", body + 'dask_scheduler = "tcp://127.0.0.1:9"\n')
    assert main(["run", str(cfg)]) == 2
    assert "no Dask scheduler answers at tcp://127.0.0.1:9" in capsys.readouterr().err


def test_skip_lists_reach_the_tree_and_typos_are_refused(project, capsys):
    body = """
[model]
path = "model.keras"
[data]
npz = "data.npz"
[train]
from_logits = true
epochs = 1
[tree]
out_dir = "out"
paths = ["cluster → PTQ"]
clusters = 8
cluster_skip = ["conv1"]
"""
    assert main(["run", str(_write(project / "c.toml", body))]) == 0
    counts = {t.layer: t.unique for t in co.inspect(project / "out" / "leaves" /
                                                   "cluster-ptq.tflite").tensors}
    assert counts["conv1"] > 8 and counts["conv2"] <= 8, counts
    config = json.loads((project / "out" / "config.json").read_text())
    assert "conv1" in config["cluster_layers"] and config["prune_layers"] == "all"
    typo = body.replace('cluster_skip = ["conv1"]', 'prune_skip = ["DepthwiseConv"]')
    assert main(["run", str(_write(project / "d.toml", typo))]) == 2
    err = capsys.readouterr().err
    assert "[tree].prune_skip: ['DepthwiseConv'] match no layer" in err and "conv1" in err
    with pytest.raises(ConfigError, match=r"\[tree\].cluster_skip must be a list"):
        load_config(_write(project / "e.toml", body.replace('["conv1"]', '"conv1"')))
    keep = load_config(_write(project / "f.toml", body + 'batchnorm = "keep"\n'))
    assert keep["tree"]["batchnorm"] == "keep"
    with pytest.raises(ConfigError, match=r"\[tree\].batchnorm must be one of"):
        load_config(_write(project / "g.toml", body + 'batchnorm = "train"\n'))
    assert load_config(_write(project / "h.toml", body + "seed = 7\n"))["tree"]["seed"] == 7
    with pytest.raises(ConfigError, match=r"\[tree\].seed must be a non-negative integer"):
        load_config(_write(project / "i.toml", body + "seed = -3\n"))
    assert load_config(_write(project / "j.toml", body + "bias_correction = false\n"))[
        "tree"]["bias_correction"] is False
    with pytest.raises(ConfigError, match=r"\[tree\].bias_correction must be true or false"):
        load_config(_write(project / "k.toml", body + 'bias_correction = "yes"\n'))


def test_missing_data_key_and_bad_model(project, capsys):
    (project / "model.txt.keras").write_text("not a model")
    np.savez(project / "partial.npz", x_train=np.zeros((2, 8, 8, 1)))
    cfg = _write(project / "c.toml", '[model]\npath = "model.keras"\n[data]\nnpz = "partial.npz"\n')
    assert main(["run", str(cfg)]) == 2
    assert "lacks key(s) ['y_train', 'x_val', 'y_val']" in capsys.readouterr().err
    cfg = _write(project / "d.toml",
                 '[model]\npath = "model.txt.keras"\n[data]\nnpz = "data.npz"\n')
    assert main(["run", str(cfg)]) == 2
    assert "not a loadable Keras model" in capsys.readouterr().err


def test_inspect_command(tmp_path, trained, digits, capsys):
    (x, _), _ = digits
    path = co.export_tflite(trained, tmp_path / "m.tflite", representative_data=x[:50])
    assert main(["inspect", str(path)]) == 0
    assert "conv2" in capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fully_integer"] is True
    from collabopt import vela

    if vela.available():
        assert main(["inspect", str(path), "--vela"]) == 0
        assert "cycles" in capsys.readouterr().out
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"garbage!")
    assert main(["inspect", str(bad)]) == 2
    assert "not a TFLite model" in capsys.readouterr().err


def test_settings_lists_and_metric_from_the_config(project, capsys):
    cfg = _write(project / "c.toml", """
[model]
path = "model.keras"
[data]
npz = "data.npz"
[train]
from_logits = true
epochs = 1
[tree]
out_dir = "out"
paths = ["prune → PTQ 50%", "prune → PTQ 75%"]
sparsity = [0.5, 0.75]
metric = "accuracy"
stop_when_met = true
layer_policy = "auto"
distill = true
distill_temperature = 2.0
[targets]
max_metric_drop = 0.5
""")
    assert main(["run", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "prune → PTQ 50%" in out and "level 1 meets the targets" in out
    assert "PTQ 75%" not in out  # the milder setting met the targets: never built
    config = json.loads((project / "out" / "config.json").read_text())
    assert config["sparsity"] == [0.5, 0.75] and config["layer_policy"] == "auto"
    assert config["distill"].startswith("Distill(temperature=2.0, weight=0.5")
    assert "[tree] prune 50%:" in out  # what the sensitivity pass spared, or that it spared none


def test_search_from_the_config(project, capsys):
    pytest.importorskip("optuna")
    cfg = _write(project / "s.toml", """
[model]
path = "model.keras"
[data]
npz = "data.npz"
[train]
from_logits = true
epochs = 1
[tree]
out_dir = "out"
[search]
leaf = "prune → PTQ"
trials = 1
sparsity = [0.5, 0.7]
per_layer = false
sampler = "random"
[targets]
max_metric_drop = 0.5
""")
    assert main(["run", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "[search] trial 0 (1/1): sparsity" in out and "recommended trial: 0" in out
    saved = json.loads((project / "out" / "trials.json").read_text())
    sparsity = saved["trials"][0]["settings"]["sparsity"]
    assert 0.5 <= sparsity <= 0.7
    file = saved["trials"][0]["file"]
    assert co.inspect(file).sparsity == pytest.approx(sparsity, abs=0.06)
