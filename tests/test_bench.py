"""fused_optim.bench (the step-throughput benchmark): its command line (help,
rejected values), its progress reports, where its commit comes from, and a
tiny real run that writes every output. Timings are not checked (CI machines
are noisy); only that the run is complete."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import fused_optim
from fused_optim.bench import cli, measure, metadata, progress, report
from fused_optim.bench.measure import Result
from fused_optim.bench.specs import IMPLS, OPTIMIZERS, PEERS, PRECISION_SETS, PRECISIONS
from fused_optim.bench.workloads import WORKLOADS, many_small_sizes
from fused_optim.sweep.bench import cli as sweep_cli

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def test_help_lists_every_name_of_the_tables_and_the_run_time():
    # Through `python -m`: the package's __main__ is what scripts/bench.sh runs.
    help_text = subprocess.run(
        [sys.executable, "-m", "fused_optim.bench", "--help"],
        capture_output=True, text=True, check=True, cwd=REPO, timeout=120,
    ).stdout
    names = [*OPTIMIZERS, *WORKLOADS, *PRECISIONS, *PRECISION_SETS, *IMPLS]
    missing = [n for n in names if not re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", help_text)]
    assert missing == []
    assert re.search(r"about [\d to]+ minutes on a\s+2-core CPU", help_text)
    assert "--repeats" in help_text and "--scale" in help_text  # how it scales


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_spec_counts_the_state_tensors_its_optimizer_keeps(name):
    # (the byte budget: each state tensor of a param's size is read and
    # written once per step)
    spec = OPTIMIZERS[name]
    param = torch.nn.Parameter(torch.zeros(8))
    param.grad = torch.ones(8)
    optimizer = getattr(fused_optim, spec.class_name)([param], **spec.kwargs)
    optimizer.step()
    kept = [key for key, value in optimizer.state[param].items()
            if torch.is_tensor(value) and value.shape == param.shape]
    assert spec.state_tensors == len(kept), kept


def test_bench_sh_help_needs_no_set_up(tmp_path):
    # (a missing virtualenv is not made: --help installs nothing)
    venv = tmp_path / "no-venv"
    done = subprocess.run(["bash", str(REPO / "scripts" / "bench.sh"), "--help"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "FUSED_OPTIM_VENV": str(venv)})
    assert done.returncode == 0, done.stderr
    assert "Without arguments: the optimizer-step throughput" in done.stdout
    assert "about 10 minutes" in done.stdout
    assert not venv.exists()


@pytest.mark.parametrize("option, value", [
    ("--repeats", "0"), ("--repeats", "-3"), ("--repeats", "many"), ("--repeats", "2.5"),
    ("--warmup", "-1"), ("--warmup", "x"),
    ("--scale", "0"), ("--scale", "-0.5"), ("--scale", "nan"), ("--scale", "inf"),
    ("--scale", "big"),
    ("--threads", "0"), ("--threads", "-2"),
    ("--sample-ms", "-1"), ("--sample-ms", "nan"), ("--sample-ms", "soon"),
    ("--optimizers", "adamx"), ("--optimizers", ","), ("--optimizers", "adam,nosuchoptimizer"),
    ("--workloads", "huge"),
    ("--precisions", "fp16"), ("--precisions", "mixed,fp8"), ("--dtypes", ""),
    ("--impls", "jax"),
    ("--device", "tpu"), ("--device", "cuda:x"),
    ("--ours", "jax"),
])
def test_invalid_values_are_rejected_naming_the_option(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args([option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(rf"argument [-/\w]*{re.escape(option)}", err), err


@pytest.mark.parametrize("make, argv, expected", [
    (lambda d: d / "folder", lambda d: ["--json", str(d / "folder")], "a folder, not a file"),
    (lambda d: d / "a_file", lambda d: ["--json", str(d / "a_file" / "r.json")], "is a file"),
    (None, lambda d: ["--json", str(d / "r.json"), "--markdown", str(d / "r.json")],
     "name the same file"),
    (lambda d: d / "a_file", lambda d: ["--markdown", str(d / "a_file" / "r.md")], "is a file"),
], ids=["json_is_a_folder", "json_under_a_file", "json_and_markdown_one_file", "markdown_under_a_file"])
@pytest.mark.parametrize("sweep", [False, True], ids=["step", "sweep"])
def test_output_files_are_checked_before_anything_is_timed(tmp_path, capsys, make, argv, expected,
                                                           sweep):
    # (a long run must not be lost at its end for a path)
    if make is not None:
        target = make(tmp_path)
        target.mkdir() if target.name == "folder" else target.write_text("")
    parse = sweep_cli.parse_args if sweep else cli.parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse(argv(tmp_path))
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]


def test_missing_output_folders_are_made_when_the_options_are_read(tmp_path):
    for parse, name in ((cli.parse_args, "step"), (sweep_cli.parse_args, "sweep")):
        deep = tmp_path / name / "a" / "b"
        parse(["--json", str(deep / "r.json")])
        assert deep.is_dir()


def test_one_step_per_sample_when_asked():
    assert cli.parse_args(["--sample-ms", "0"]).sample_ms == 0.0


def test_valid_limits_and_defaults():
    args = cli.parse_args(["--repeats", "1", "--warmup", "0", "--scale", "1e-4",
                           "--optimizers", "adam,adam", "--impls", "torch-fused"])
    assert (args.repeats, args.warmup, args.scale) == (1, 0, 1e-4)
    assert args.optimizers == ["adam"]  # duplicates dropped
    assert args.impls == ["fused_optim", "torch-fused"]  # ours always timed
    assert cli.parse_args([]).repeats == cli.DEFAULT_REPEATS["cpu"]


def test_pairs_ours_cannot_build_are_left_out_before_timing(capsys, monkeypatch):
    # timm's cautious variants run unfused, which takes no precision option.
    args = cli.parse_args(["--optimizers", "clion,lion", "--precisions", "fp32,bf16-sr,bf16-master",
                           "--workloads", "tiny"])
    assert set(args.unbuildable) == {("clion", "bf16-sr"), ("clion", "bf16-master")}
    assert "caution=True runs the plain (unfused)" in args.unbuildable["clion", "bf16-sr"]
    assert sorted(measure.plan(args)) == sorted(
        ("tiny", p, o) for o in ("clion", "lion") for p in ("fp32", "bf16-sr", "bf16-master")
        if o == "lion" or p == "fp32")
    monkeypatch.setattr(cli, "BandwidthProbe", lambda device: None)  # (512 MiB, seconds)
    session, _ = cli.start_session(args)
    assert [n for n in session.notes if "not run" in n] == [
        f"clion {p}: not run, fused_optim cannot be built for it ({args.unbuildable['clion', p]})"
        for p in ("bf16-sr", "bf16-master")]
    # --ours torch-fused (development) has no Lion.
    args = cli.parse_args(["--ours", "torch-fused", "--optimizers", "lion,sgd"])
    assert list(args.unbuildable) == [("lion", "fp32")]
    assert "no attribute 'Lion'" in args.unbuildable["lion", "fp32"]
    # Nothing left: refused as an invalid command line, naming why.
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--optimizers", "clamb", "--precisions", "bf16-sr"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "nothing to time: clamb bf16-sr: ValueError: fused_optim.Lamb: stochastic_rounding" in err
    assert cli.parse_args([]).unbuildable == {}


def test_sweep_hands_over_to_the_sweep_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--sweep", "--help"])
    assert exit_info.value.code == 0
    assert "fused_optim.sweep.bench" in capsys.readouterr().out


# --------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_block(reporter, clock, rounds, seconds_per_round, warmup_s=0.0):
    reporter.start("block 2/3 adam large fp32")
    reporter.phase("warm-up fused_optim (1/2)")
    clock.now += warmup_s
    reporter.begin_rounds(rounds)
    for done in range(1, rounds + 1):
        clock.now += seconds_per_round
        reporter.round_done(done)
    reporter.finish("[2/3] adam large fp32: done")


def test_progress_in_a_log_is_a_line_every_few_seconds_during_a_block():
    clock, stream = FakeClock(), io.StringIO()
    reporter = progress.BlockProgress(stream, clock, every_s=10)
    assert not reporter.live  # (a StringIO is no terminal)
    run_block(reporter, clock, rounds=10, seconds_per_round=4, warmup_s=2)
    assert stream.getvalue().splitlines() == [
        "block 2/3 adam large fp32: round 2/10, 10 s, ~32 s left",
        "block 2/3 adam large fp32: round 5/10, 22 s, ~20 s left",
        "block 2/3 adam large fp32: round 8/10, 34 s, ~8 s left",
        "[2/3] adam large fp32: done",
    ]


def test_progress_in_a_log_adds_nothing_to_a_short_block():
    clock, stream = FakeClock(), io.StringIO()
    run_block(progress.BlockProgress(stream, clock, every_s=10), clock, 5, 0.5)
    assert stream.getvalue() == "[2/3] adam large fp32: done\n"


def test_progress_on_a_terminal_rewrites_one_line_then_clears_it():
    clock, stream = FakeClock(), Terminal()
    reporter = progress.BlockProgress(stream, clock)
    assert reporter.live and reporter.every_s == progress.LIVE_EVERY_S
    run_block(reporter, clock, rounds=3, seconds_per_round=1)
    updates = stream.getvalue().split("\r")
    assert updates[1] == "block 2/3 adam large fp32: warm-up fused_optim (1/2), 0 s"
    assert updates[2].startswith("block 2/3 adam large fp32: round 1/3, 1 s, ~2 s left")
    assert updates[3].startswith("block 2/3 adam large fp32: round 2/3, 2 s, ~1 s left")
    assert updates[4].strip() == ""  # the progress line is blanked out ...
    assert updates[5] == "[2/3] adam large fp32: done\n"  # ... for the result line


# --------------------------------------------------------------------------
# Commit
# --------------------------------------------------------------------------


def write_build_info(directory: Path, text: str) -> None:
    (directory / "_build_info.py").write_text(text)


def test_build_commit_reads_the_build_info_old_or_new(tmp_path, monkeypatch):
    monkeypatch.setattr(metadata, "PACKAGE_DIR", tmp_path)
    assert metadata.build_commit() is None  # never built
    write_build_info(tmp_path, "CUDA_BUILT = False\n")  # built before the commit was recorded
    assert metadata.build_commit() is None
    write_build_info(tmp_path, "CUDA_BUILT = False\nGIT_COMMIT = None\nGIT_DIRTY = None\n")
    assert metadata.build_commit() is None  # built without git
    write_build_info(tmp_path, "CUDA_BUILT = False\nGIT_COMMIT = 'abc1234'\nGIT_DIRTY = True\n")
    assert metadata.build_commit() == "abc1234-dirty"


def test_commit_from_the_checkout_else_the_build_else_unknown(tmp_path, monkeypatch):
    # An installed copy: its directory is in no checkout.
    monkeypatch.setattr(metadata, "PACKAGE_DIR", tmp_path)
    assert metadata.commit_and_source()[0] == "unknown"
    write_build_info(tmp_path, "CUDA_BUILT = False\nGIT_COMMIT = 'abc1234'\nGIT_DIRTY = False\n")
    assert metadata.commit_and_source() == ("abc1234", "recorded at build time")
    monkeypatch.setattr(metadata, "checkout_commit", lambda: "def5678")
    assert metadata.commit_and_source() == ("def5678", "git checkout")


def test_checkout_commit_is_the_head_of_this_checkout():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    assert metadata.checkout_commit() in (head, head + "-dirty")


# --------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------


def fake_results() -> list[Result]:
    results = []
    for impl, step_s in [("fused_optim", 1e-3), ("torch-fused", 2e-3)]:
        result = Result("adam", "large", "fp32", "fp32", "fp32 params, fp32 state", impl,
                        1000, 2, 1, 28e3, [step_s] * 3, 50.0, [50.0] * 3)
        result.summarize(1e-3)
        results.append(result)
    return results


@pytest.mark.parametrize("with_peer", [True, False], ids=["with_a_peer", "ours_alone"])
def test_summary_table_rows_have_the_delimiters_cells(with_peer):
    results = fake_results() if with_peer else fake_results()[:1]
    lines = report.summary_markdown(results)
    cells = [line.count("|") for line in lines]
    assert len(lines) == 3 and cells == [cells[1]] * 3, lines
    assert ("vs torch-fused" in lines[0]) == with_peer
    assert "| 1,000 |" in lines[2]  # (a thousand elements: not "0.0M")


def test_without_matplotlib_the_reports_are_written_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    args = cli.parse_args(["--json", str(tmp_path / "r.json"),
                           "--markdown", str(tmp_path / "r.md")])
    probe = types.SimpleNamespace(description="a fake reference pass")
    meta = metadata.run_metadata([], args, probe, fake_results(), [], 1.0, None,
                                 ("abc1234", "test"))
    written = report.write_outputs(args, meta, fake_results())
    assert written == [tmp_path / "r.json", tmp_path / "r.md"]
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert "![" not in (tmp_path / "r.md").read_text()


def test_tiny_run_writes_json_markdown_and_plot_with_progress(tmp_path, monkeypatch, capsys):
    # Every round reported, so that a 3-round block shows its progress.
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    threads = torch.get_num_threads()
    try:
        cli.main([
            "--scale", "0.001", "--optimizers", "adam", "--workloads", "many-small",
            "--repeats", "3", "--warmup", "1", "--threads", "1",
            "--json", str(tmp_path / "run.json"), "--markdown", str(tmp_path / "run.md"),
        ])
    finally:
        torch.set_num_threads(threads)  # (--threads sets it for the process)
    out, err = capsys.readouterr()
    rounds_line = err.index("block 1/1 adam many-small fp32: round 2/3")
    assert err.index("block 1/1 adam many-small fp32: warm-up fused_optim") < rounds_line
    assert rounds_line < err.index("[1/1] adam many-small fp32")  # during the block
    assert "| adam | many-small | fp32 |" in out and "wrote " in out

    run = json.loads((tmp_path / "run.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{7,}(-dirty)?|unknown", run["commit"])
    assert run["commit_source"]
    assert run["command"].endswith("--markdown " + str(tmp_path / "run.md"))
    assert (run["repeats"], run["warmup"], run["threads"]) == (3, 1, 1)
    by_impl = {r["impl"]: r for r in run["results"]}
    # (deepspeed only where installed; "reference" only for optimizers
    # torch.optim lacks)
    assert {"fused_optim", *PEERS} - {"deepspeed", "reference"} == set(by_impl)
    # A sample is >= 5 ms of back-to-back steps: one step of this tiny
    # workload takes well under that, so each sample is several steps, the
    # same count for every implementation, and the times are per step.
    assert len({r["steps_per_sample"] for r in by_impl.values()}) == 1
    assert by_impl["fused_optim"]["steps_per_sample"] > 1
    ours = by_impl["fused_optim"]
    assert ours["median_s"] * ours["steps_per_sample"] >= 0.5 * 5e-3
    for impl, result in by_impl.items():
        assert len(result["times_s"]) == 3 and result["median_s"] > 0
        assert result["bandwidth_fraction_per_round"] > 0
        assert result["peer_over_ours"] > 0  # (fused_optim's own: 1)

    markdown = (tmp_path / "run.md").read_text()
    assert f"- commit: `{run['commit']}`" in markdown
    assert "![step times and bandwidth fractions](run.png)" in markdown
    assert (tmp_path / "run.png").read_bytes().startswith(b"\x89PNG")
    svg = (tmp_path / "run.svg").read_text()
    assert "<svg" in svg and "median step time (ms)" in svg


def test_a_dotted_report_name_keeps_its_dots_in_the_plot_names(tmp_path):
    # "...-timm-1.0.31-cpu.json": the plot beside it is "...-1.0.31-cpu.png",
    # not "...-1.0.png" (Path.with_suffix would take ".31-cpu" for a suffix).
    pytest.importorskip("matplotlib")
    threads = torch.get_num_threads()
    try:
        cli.main(["--scale", "0.001", "--optimizers", "sgd", "--workloads", "tiny",
                  "--repeats", "1", "--warmup", "0", "--impls", "fused_optim",
                  "--json", str(tmp_path / "vs-1.0.31-cpu.json")])
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "vs-1.0.31-cpu.json", "vs-1.0.31-cpu.png", "vs-1.0.31-cpu.svg"]


def test_every_benchmark_precision_is_in_the_storage_table():
    # One table of legal storage (storage_table.h); the benchmark's named
    # precisions must all be in it.
    from fused_optim._bucket import Precision as Storage
    from fused_optim._precision import STORAGE_TABLE, is_legal_storage
    from fused_optim.bench.specs import PRECISIONS

    assert (torch.float64, torch.bfloat16, False, False) not in STORAGE_TABLE
    assert (torch.float16, torch.float16, False, True) not in STORAGE_TABLE
    assert (torch.bfloat16, torch.float32, True, False) in STORAGE_TABLE
    for name, p in PRECISIONS.items():
        storage = Storage(p.master_weights, p.resolved_state_dtype, p.stochastic_rounding)
        assert is_legal_storage(p.param_dtype, storage), name


def test_an_optimizer_torch_lacks_is_timed_against_its_reference():
    from fused_optim.bench.peers import impls_for
    from fused_optim.bench.specs import IMPLS, OPTIMIZERS, PRECISIONS

    pytest.importorskip("lion_pytorch")
    notes = []
    impls = impls_for(OPTIMIZERS["lion"], "cpu", PRECISIONS["fp32"], list(IMPLS), notes)
    assert impls == ["fused_optim", "reference"]
    assert any("torch.optim has no Lion" in n for n in notes)
    # optimizers torch.optim has keep torch's peers and get no reference
    notes = []
    assert "reference" not in impls_for(OPTIMIZERS["adam"], "cpu", PRECISIONS["fp32"], list(IMPLS), notes)
    assert not any("reference" in n for n in notes)


@pytest.mark.parametrize("name", ["Lars", "Lamb"])
def test_trust_ratio_optimizers_are_timed_against_timms(name):
    # timm's package imports torchvision; bench/peers.import_reference loads
    # timm/optim/lars.py or lamb.py without it (lamb.py also imports timm's
    # optim/_types.py relatively: the stand-in package serves it).
    from fused_optim.bench.peers import import_reference, impls_for
    from fused_optim.bench.specs import IMPLS, OPTIMIZERS, PRECISIONS

    import importlib.util

    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    module = import_reference(f"timm.optim.{name.lower()}")
    assert getattr(module, name).__name__ == name
    notes = []
    impls = impls_for(OPTIMIZERS[name.lower()], "cpu", PRECISIONS["fp32"], list(IMPLS), notes)
    assert impls == ["fused_optim", "reference"]
    assert any(f"torch.optim has no {name}" in n for n in notes)


def test_cautious_variants_run_by_name_against_timms_cautious_classes():
    # clion and clamb (timm's caution=True, unfused in ours) are not in
    # 'all' nor the default run, whose run time and the GPU check's time
    # boxes are the fused steps'; named, they run against timm's own Lion
    # and Lamb built with the same caution=True.
    from fused_optim.bench.peers import impls_for, optimizer_class
    from fused_optim.bench.specs import ALL_OPTIMIZERS, IMPLS, OPTIMIZERS, PRECISIONS

    cautious = [n for n, spec in OPTIMIZERS.items() if spec.kwargs.get("caution")]
    assert cautious == ["clion", "clamb"]
    assert cli.parse_args([]).optimizers == ALL_OPTIMIZERS == cli.parse_args(
        ["--optimizers", "all"]).optimizers
    assert not set(cautious) & set(ALL_OPTIMIZERS)
    assert len(ALL_OPTIMIZERS) == len(OPTIMIZERS) - 2
    assert cli.parse_args(["--optimizers", "clion,clamb"]).optimizers == cautious
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    for name in cautious:
        spec = OPTIMIZERS[name]
        assert impls_for(spec, "cpu", PRECISIONS["fp32"], list(IMPLS), []) == ["fused_optim",
                                                                              "reference"]
        cls, extra = optimizer_class("reference", spec, None)
        assert cls.__module__.endswith(spec.class_name.lower()) and cls.__name__ == spec.class_name
        param = torch.nn.Parameter(torch.zeros(3))
        assert cls([param], **spec.kwargs, **extra).param_groups[0]["caution"] is True


def test_many_small_sizes_are_the_workloads_tensors():
    (group,) = WORKLOADS["many-small"]("cpu", 1.0).groups
    sizes = many_small_sizes()
    assert sizes == [n for (n,) in group.shapes]
    assert len(sizes) == 2000 and min(sizes) >= 256 and max(sizes) <= 4096
