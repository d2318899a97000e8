"""fused_optim.sweep.bench (the lockstep benchmark): its configurations, and
a tiny end-to-end run (K = 2) through the entry point of ``python -m
fused_optim.bench --sweep``, with the memory probes (one process each) and
both reports. Timings are not checked (CI machines are noisy); only that
the run is complete."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest
import torch

from fused_optim import bench
from fused_optim.bench import metadata as bench_metadata
from fused_optim.bench import progress
from fused_optim.sweep import bench as sweep_bench
from fused_optim.sweep.bench import report as sweep_report
from fused_optim.sweep.space import make_configs


def test_configurations_cycle_through_the_families_middle_lr_first():
    adamw = {"optimizer": "AdamW", "weight_decay": 0.01, "lr": 1e-3}
    assert sweep_bench.sweep_configs(1) == [adamw]
    configs = make_configs(sweep_bench.sweep_configs(16))
    families = [sweep_bench.family_of(c) for c in configs]
    names = [name for name, _, _ in sweep_bench.FAMILIES]
    assert families == [names[i % 7] for i in range(16)]
    assert len(names) == 7 and len(set(names)) == 7
    _, _, sgd_lrs = sweep_bench.FAMILIES[0]
    assert [c.kwargs["lr"] for c in configs[0::7]] == [sgd_lrs[2], sgd_lrs[1], sgd_lrs[3]]
    assert sweep_bench.mix(configs) == "SGD x8, Adagrad x2, RMSprop x2, Adam x2, AdamW x2"


def test_every_family_has_a_torch_implementation_to_calibrate():
    for _, base, lrs in sweep_bench.FAMILIES:
        (config,) = make_configs([{**base, "lr": lrs[0]}])
        impls = sweep_bench.torch_impls(config)
        assert "torch-foreach" in impls and "torch-forloop" in impls
        assert ("torch-fused" in impls) == (config.optimizer != "RMSprop")


def test_tiny_run_end_to_end_through_the_main_benchmark(tmp_path, monkeypatch, capfd):
    json_path, md_path = tmp_path / "sweep.json", tmp_path / "sweep.md"
    # Every progress update as a line of its own (stderr is not a terminal here).
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    threads = torch.get_num_threads()
    try:
        bench.main([
            "--sweep", "--models", "mlp", "--ks", "2", "--rounds", "2", "--steps", "1",
            "--calibration-steps", "1", "--rss-steps", "2", "--threads", "1",
            "--json", str(json_path), "--markdown", str(md_path),
        ])
    finally:
        torch.set_num_threads(threads)  # (--threads sets it for the process)
    report = json.loads(json_path.read_text())
    assert [(r["model"], r["k"]) for r in report["results"]] == [("mlp", 2)]
    for row in report["results"]:
        assert row["sequential_ms"] > 0 and row["lockstep_ms"] > 0
        assert len(row["sequential_block_s"]) == len(row["lockstep_block_s"]) == 2
        assert set(row["rss_mib"]) == {"lockstep", "sequential"}
        assert all(r["peak"] >= r["baseline"] > 0 for r in row["rss_mib"].values())
        assert row["non_finite"] == {"lockstep": 0, "sequential": 0}
    assert report["results"][0]["target"] is None  # (targets: K = 1, 16, 64)
    assert {c["family"] for c in report["calibration"]} == {n for n, _, _ in sweep_bench.FAMILIES}
    assert report["threads"] == 1
    assert (report["commit"], report["commit_source"]) == bench_metadata.commit_and_source()
    markdown = md_path.read_text()
    assert "| mlp | 2 |" in markdown and "chosen" in markdown
    assert f"- commit: `{report['commit']}` ({report['commit_source']})" in markdown
    # Progress while each stage runs, not only its result line after it.
    stderr = capfd.readouterr().err.splitlines()
    for family, _, _ in sweep_bench.FAMILIES:
        assert any(line.startswith(f"calibration mlp {family}: warm-up torch-")
                   for line in stderr), family
    for stage in ("building both sides", "warm-up lockstep", "warm-up sequential",
                  "round 1/2"):
        assert any(line.startswith(f"mlp K=2: {stage}") for line in stderr), stage
    for side in ("lockstep", "sequential"):
        assert any(line.startswith(f"rss mlp K=2: {side} probe") for line in stderr), side


@pytest.mark.parametrize("main_module, expected", [
    ("fused_optim.sweep.bench.__main__", "python -m fused_optim.sweep.bench --ks 1"),
    ("fused_optim.bench.__main__", "python -m fused_optim.bench --ks 1"),
])
def test_the_recorded_command_names_the_package_run(monkeypatch, main_module, expected):
    # `python -m PACKAGE` runs PACKAGE.__main__: the report names PACKAGE.
    main = types.ModuleType("__main__")
    main.__spec__ = importlib.machinery.ModuleSpec(main_module, None)
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["ignored", "--ks", "1"])
    assert sweep_report.command_line() == expected
