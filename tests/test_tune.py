"""flwr-scaling tune: the best grid point by the tuning score on the validation split, widened on an edge."""

from __future__ import annotations

import io
import math
import statistics
import tomllib
from pathlib import Path

import pytest

from flwr_scaling.run.config import ConfigError
from flwr_scaling.run.recorder import read_metrics
from flwr_scaling.studies.plan import load_sweep
from flwr_scaling.studies.tune import tune
from tests.test_sweep import write_fake_run


def quality(cfg) -> float:
    """Peaks at lr 0.1 (and server-lr 0.01 for fedyogi): 1 − (distance in decades)/10."""
    distance = abs(math.log10(cfg.lr) + 1)
    if cfg.strategy == "fedyogi":
        distance += abs(math.log10(cfg.server_lr) + 2)
    return 1 - distance / 10


class CurveRunner:
    """A fake run: validation accuracy quality * (1 − 0.5**round); records the configurations it ran."""

    def __init__(self):
        self.configs = []

    def __call__(self, cfg, resume=None):
        assert cfg.eval_split == "validation"
        self.configs.append(cfg)
        rows = []
        for r in range(1, cfg.rounds + 1):
            accuracy = quality(cfg) * (1 - 0.5**r)
            rows.append({"round": r, "test_loss": 1 - accuracy, "test_accuracy": accuracy, "train_loss": 1.0,
                         "bytes_down": 1e5, "bytes_up": 1e5, "wall_s": 0.01, "precond_min": 1.0,
                         "precond_max": 1.0, "clients_ok": cfg.num_clients, "clients_failed": 0})
        return write_fake_run(cfg, rows)


FILE = """\
[base]
dataset = "breast_cancer"
model = "logreg"
num-clients = 3
rounds = 2

[grid]
seed = [0, 1]

[tune]
methods = ["fedavg"]
widen = WIDEN
widen-factor = 10
[tune.grids.fedavg]
lr = [0.001, 0.01]
"""


def test_widens_an_edge_until_the_best_is_inside(tmp_path):
    path = tmp_path / "tune.toml"
    path.write_text(FILE.replace("WIDEN", "2"))
    runner, stream = CurveRunner(), io.StringIO()
    written = tune(path, tmp_path / "out", runner=runner, stream=stream)
    # 0.01 is best of (0.001, 0.01) and on the edge -> 0.1 added; 0.1 on the edge -> 1.0 added; 0.1 is inside.
    assert sorted({c.lr for c in runner.configs}) == [0.001, 0.01, 0.1, 1.0]
    assert len(runner.configs) == 4 * 2  # two seeds per value, none run twice
    text = stream.getvalue()
    assert "tune fedavg: best lr 0.01 is on the edge; widening to lr 0.001, 0.01, 0.1" in text
    assert "tune fedavg: best lr 0.1 is on the edge; widening to lr 0.001, 0.01, 0.1, 1" in text
    # score of lr 0.1: quality 1, mean of (1 − 0.5, 1 − 0.25) = 0.625
    assert "tune fedavg: chose lr 0.1 (score 0.6250)" in text
    assert written == tmp_path / "out" / "tuned.toml"
    assert tomllib.loads(written.read_text()) == {"method-options": {"fedavg": {"lr": 0.1}}}
    table = (tmp_path / "out" / "tuning.md").read_text()
    assert "| fedavg | lr 0.1 | 2 | 0.6250 | 0.7500 | yes |" in table
    assert "| fedavg | lr 1 | 2 | 0.5625 | 0.6750 |  |" in table  # quality 0.9
    # the tuning runs can be rerun from the sweep file written for them: all finished, nothing runs
    again = CurveRunner()
    tune(path, tmp_path / "out", runner=again, stream=io.StringIO())
    assert again.configs == []


def test_a_best_value_still_on_the_edge_is_reported(tmp_path):
    path = tmp_path / "tune.toml"
    path.write_text(FILE.replace("WIDEN", "1"))
    runner = CurveRunner()
    written = tune(path, tmp_path / "out", runner=runner, stream=io.StringIO())
    assert sorted({c.lr for c in runner.configs}) == [0.001, 0.01, 0.1]
    assert tomllib.loads(written.read_text())["method-options"]["fedavg"] == {"lr": 0.1}
    assert ("fedavg: lr still on the edge of its values after widening 1 time(s); a wider grid may find better"
            in (tmp_path / "out" / "tuning.md").read_text())


def test_joint_grid_over_client_and_server_step(tmp_path):
    path = tmp_path / "tune.toml"
    path.write_text(FILE.replace("WIDEN", "2").replace('["fedavg"]', '["fedyogi"]').replace(
        "[tune.grids.fedavg]\nlr = [0.001, 0.01]", "[tune.grids.fedyogi]\nlr = [0.01, 0.1, 1.0]\n"
        "server-lr = [0.001, 0.01, 0.1]"))
    runner = CurveRunner()
    written = tune(path, tmp_path / "out", runner=runner, stream=io.StringIO(), write=tmp_path / "chosen.toml")
    assert len(runner.configs) == 9 * 2  # the product, no widening: (0.1, 0.01) is inside both
    assert written == tmp_path / "chosen.toml"
    assert tomllib.loads(written.read_text())["method-options"]["fedyogi"] == {"lr": 0.1, "server-lr": 0.01}


def test_a_sweep_includes_the_chosen_values_and_ignores_other_methods(tmp_path):
    (tmp_path / "tuned.toml").write_text('[method-options.fedavg]\nlr = 0.2\n[method-options."fedyogi"]\n'
                                         'lr = 0.1\nserver-lr = 0.01\n')
    (tmp_path / "s.toml").write_text('include = "tuned.toml"\n[base]\ndataset = "breast_cancer"\nrounds = 2\n'
                                     '[method-options.fedavg]\nbatch-size = 16\n'
                                     '[grid]\nmethod = ["fedavg", "savic-adam-global"]\nseed = [0]\n')
    sweep = load_sweep(tmp_path / "s.toml", tmp_path / "out")
    fedavg = next(run.config for run in sweep.runs if run.values["method"] == "fedavg")
    assert (fedavg.lr, fedavg.batch_size) == (0.2, 16)
    assert sweep.notes == ("[method-options.fedyogi] ignored: fedyogi is not in [grid] method "
                           "(fedavg, savic-adam-global)",)


@pytest.mark.parametrize("table, message", [
    ("[tune]\nmethods = [\"fedavg\"]\nwiden = -1\n", "[tune] widen must be an integer >= 0, got -1"),
    ("[tune]\nmethods = [\"fedavg\"]\nwiden-factor = 1\n", "[tune] widen-factor must be a number > 1, got 1"),
    ("[tune]\nmethods = [\"fedavgg\"]\n", "[tune] unknown configuration 'fedavgg'"),
    ("[tune]\nmethods = [\"fedavg\"]\n[tune.grids.fedavg]\nseed = [1, 2]\n", "[tune.grids.fedavg] cannot tune 'seed'"),
    ("[tune]\nmethods = [\"fedavg\"]\n[tune.grids.fedavg]\nrounds = [1, 2]\n",
     "[tune.grids.fedavg] tunes 'rounds', which is also in [base]"),
    ("", "no [tune] table"),
])
def test_bad_tune_tables_are_one_line_errors_before_any_run(tmp_path, table, message):
    path = tmp_path / "tune.toml"
    path.write_text('[base]\ndataset = "breast_cancer"\nrounds = 2\n[grid]\nseed = [0]\n' + table)
    runner = CurveRunner()
    with pytest.raises(ConfigError) as error:
        tune(path, tmp_path / "out", runner=runner, stream=io.StringIO())
    assert str(error.value).startswith(f"{path}: {message}")
    assert runner.configs == []


def test_real_runs_choose_the_best_mean_validation_accuracy(tmp_path):
    """In-process runs of logistic regression on breast_cancer, 2 rounds: the chosen step size is the one with
    the best mean validation accuracy over rounds, as computed here from the runs' metrics.csv files."""
    path = tmp_path / "tune.toml"
    path.write_text('backend = "inprocess"\n[base]\ndataset = "breast_cancer"\nmodel = "logreg"\nnum-clients = 3\n'
                    'rounds = 2\n[grid]\nseed = [0]\n[tune]\nmethods = ["fedavg"]\nwiden = 1\n'
                    '[tune.grids.fedavg]\nlr = [0.0001, 0.01]\n')
    written = tune(path, tmp_path / "out", stream=io.StringIO())
    runs = sorted((tmp_path / "out" / "fedavg" / "runs").iterdir())
    scores = {}
    for run in runs:
        lr = float(run.name.split("lr=")[1].split(",")[0])
        scores[lr] = statistics.fmean(row["test_accuracy"] for row in read_metrics(run / "metrics.csv"))
        assert '"eval-split": "validation"' in (run / "config.json").read_text()
    best = max(scores, key=lambda lr: (scores[lr], -lr))
    assert tomllib.loads(written.read_text())["method-options"]["fedavg"] == {"lr": best}
    if best == 0.01:  # on the edge: widened once by 3 (0.03 ran)
        assert 0.03 in scores
    assert "val acc" in (tmp_path / "out" / "fedavg" / "summary.md").read_text()
