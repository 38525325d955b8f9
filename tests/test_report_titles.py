"""Titles name the partitioner the runs used, and ``report`` rebuilds a ``compare`` folder (one pipeline)."""

from __future__ import annotations

import pytest

from flwr_scaling.cli import main
from flwr_scaling.studies.report import partition_text

TINY = ["--backend", "inprocess", "--rounds", "1", "--num-clients", "3", "--warmup-batches", "1"]


@pytest.mark.parametrize(
    "config, text",
    [
        ({"partitioner": "dirichlet", "dirichlet-alpha": 0.1}, "Dirichlet 0.1"),
        ({"dirichlet-alpha": 0.5}, "Dirichlet 0.5"),  # saved before the partitioner option existed
        ({"partitioner": "iid", "dirichlet-alpha": 0.5}, "iid"),
        ({"partitioner": "shard", "shard-classes": 3, "dirichlet-alpha": 0.5}, "shard (3 classes per client)"),
        ({"partitioner": "shard", "shard-classes": 1}, "shard (1 class per client)"),
    ],
)
def test_partition_text_names_the_partitioner(config, text):
    assert partition_text(config) == text


def test_compare_title_names_iid_and_report_rebuilds_the_same_files(tmp_path, capsys):
    out = tmp_path / "cmp"
    main(["compare", *TINY, "--configs", "fedavg,savic-adam-global", "--partitioner", "iid", "--out", str(out)])
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert summary.splitlines()[0] == "# digits, cnn, 3 clients, iid, 1 local epoch(s), seed 0"
    assert "Dirichlet" not in summary
    (out / "summary.md").unlink()
    (out / "accuracy.png").unlink()
    capsys.readouterr()
    main(["report", str(out)])
    assert capsys.readouterr().out == f"tables and plots rebuilt in {out}/\n"
    assert (out / "summary.md").read_text(encoding="utf-8") == summary
    assert (out / "accuracy.png").is_file()


def test_sweep_context_names_the_shard_partitioner(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('backend = "inprocess"\n\n[base]\nrounds = 1\nnum-clients = 5\nwarmup-batches = 1\n'
                    'partitioner = "shard"\nshard-classes = 2\n\n[grid]\nmethod = ["fedavg"]\n', encoding="utf-8")
    main(["sweep", str(path), "--out", str(tmp_path / "out")])
    context = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8").splitlines()[2]
    assert context == "digits, cnn, 5 clients, shard (2 classes per client), 1 local epoch(s), 1 rounds"


def test_report_refuses_an_unfinished_compare_folder(tmp_path, capsys):
    out = tmp_path / "cmp"
    (out / "fedavg").mkdir(parents=True)
    (out / "compare.json").write_text('{"labels": ["fedavg"], "target-accuracy": 0.9}', encoding="utf-8")
    with pytest.raises(SystemExit) as raised:
        main(["report", str(out)])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"flwr-scaling: error: {out / 'fedavg'}: not a finished run (") and error.count("\n") == 1
