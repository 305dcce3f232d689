"""benchmarks/gpu_check.py, the first run on a lent GPU (issue 17), in its CPU smoke mode: every section runs
and reports what a GPU session will read, and bad arguments are refused with one line.

The script runs as a subprocess, as a session would run it, offline and with its SPS profile cache in a
temporary $DSPARK_HOME; one test runs it in-process, to make a section fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from numbers import Real
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
SECTIONS = ["build", "greedy", "host_syncs", "throughput", "profiler", "profile", "compiled", "graphs", "attention"]
SMOKE_CONCURRENCY = {"1", "2"}


def run_check(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DSPARK_HOME=str(tmp_path / "home"))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(report, completed process, folder) of one `--device cpu --smoke` run."""
    folder = tmp_path_factory.mktemp("gpu_check")
    proc = run_check(folder, "--device", "cpu", "--smoke", "--out", "tmp.json")
    assert (folder / "tmp.json").is_file(), proc.stderr[-3000:]
    return json.loads((folder / "tmp.json").read_text()), proc, folder


def test_smoke_run_passes_every_section(smoke):
    report, proc, _ = smoke
    failed = {name: s.get("error") for name, s in report["sections"].items() if s["status"] != "ok"}
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
    assert list(report["sections"]) == SECTIONS
    assert all(is_number(s["seconds"]) and s["seconds"] >= 0 for s in report["sections"].values())
    assert report["device"] == "cpu" and report["smoke"] is True and report["cuda"] is None
    assert isinstance(report["torch_version"], str) and isinstance(report["started"], str)
    assert is_number(report["elapsed_s"]) and report["elapsed_s"] > 0
    for name in SECTIONS:  # the table on stdout names every section with its status
        assert f"| {name} | ok |" in proc.stdout


def test_smoke_headline_fields(smoke):
    report, _, _ = smoke
    assert report["greedy_identical"] is True
    assert is_number(report["host_syncs_per_round"]) and report["host_syncs_per_round"] >= 0
    for key in ("plain_tok_s", "speculative_tok_s", "hf_eager_tok_s", "hf_static_tok_s"):
        table = report[key]
        assert set(table) == SMOKE_CONCURRENCY, (key, table)
        assert all(is_number(v) and v > 0 for v in table.values()), (key, table)
    assert report["load_peak_over_weights"] is None  # measured on a GPU only
    assert set(report["kernels_per_round"]) == {"plain", "dspark", "mixed"}
    assert all(is_number(v) and v > 0 for v in report["kernels_per_round"].values())
    assert report["gpu_busy_fraction"] == {"plain": None, "dspark": None, "mixed": None}
    # The headline numbers are the sections' own.
    assert report["greedy_identical"] == report["sections"]["greedy"]["greedy_identical"]
    assert report["plain_tok_s"] == report["sections"]["throughput"]["plain_tok_s"]


def test_smoke_sections_report_what_they_measured(smoke):
    sections = smoke[0]["sections"]
    build = sections["build"]
    assert len(build["target_shards"]) == 3 and build["target_params"] > 0 and build["drafter_params"] > 0
    assert build["target_bytes_on_disk"] >= build["target_weight_bytes"] > 0
    assert build["drafter_config"]["block_size"] == 7
    greedy = sections["greedy"]
    assert greedy["prompts"] and all(p["identical"] for p in greedy["prompts"])
    assert any(p["distinct_tokens"] > 1 for p in greedy["prompts"])  # not one repeated token: a real check
    for kind in ("plain", "dspark"):
        syncs = sections["host_syncs"][kind]
        assert is_number(syncs["host_syncs_per_round"]) and syncs["host_syncs_per_round"] >= 0
        assert syncs["host_syncs_per_round_whole_step"] >= syncs["host_syncs_per_round"]
        assert is_number(syncs["transfers_per_round"]) and syncs["steps_counted"] > 0
        profiled = sections["profiler"][kind]
        assert profiled["aten_ops_per_round"] > 0 and profiled["round_ms"] > 0
    assert sections["profiler"]["aten_ops_per_round"]["dspark"] > sections["profiler"]["aten_ops_per_round"]["plain"]
    mixed = sections["profiler"]["mixed"]  # decoding rows beside a 40-token prompt: the ragged path's operations too
    assert mixed["prompt_tokens"] == 40 and mixed["round_ms"] > 0
    assert mixed["kernels_per_round"] > sections["profiler"]["plain"]["kernels_per_round"]
    throughput = sections["throughput"]
    assert throughput["roofline_tok_s_1req"] is None and throughput["hbm_gbps"] == 3350
    assert all(tau >= 1 for tau in throughput["speculative_tau"].values())
    assert is_number(throughput["speculative_over_plain_1req"]) and throughput["skipped_points"] == []
    compiled = sections["compiled"]
    assert compiled["compile_s"] > 0 and compiled["plain_tok_s"] > 0 and compiled["speculative_tok_s"] > 0
    assert compiled["plain_greedy_agreement"] == compiled["speculative_greedy_agreement"] == 1.0
    graphs = sections["graphs"]
    assert graphs["captures"] > 0 and graphs["replays"] > graphs["captures"]
    assert graphs["drafter_captures"] > 0 and graphs["drafter_replays"] > graphs["drafter_captures"]
    assert graphs["capture_error"] is None and graphs["drafter_capture_error"] is None
    for label in ("plain", "speculative"):
        assert set(graphs[f"{label}_greedy_agreement"].values()) == {1.0}
        assert all(v > 0 for v in graphs[f"{label}_tok_s"].values())
    assert graphs["speedup_plain_at_1"] > 0
    attention = sections["attention"]  # Inductor's C++ FlexAttention here, in bfloat16
    assert attention["kernel_error"] is None and attention["drafter_kernel_error"] is None
    assert attention["capture_error"] is None and attention["captures"] > 0
    for label in ("plain", "speculative"):
        assert set(attention[f"{label}_tok_s"]) == set(attention[f"{label}_sdpa_tok_s"]) == {"1"}  # smoke: c = 1
        assert all(0 <= v <= 1 for v in attention[f"{label}_greedy_agreement"].values())
    assert attention["speedup_plain_at_1"] > 0 and attention["first_run_s"]["plain"] > 0


def test_smoke_writes_the_sps_table(smoke):
    profile = smoke[0]["sections"]["profile"]
    table_path = Path(profile["sps_table_path"])
    assert table_path.is_file() and Path(profile["profile_path"]).is_file()
    table = json.loads(table_path.read_text())
    tokens, steps = table["sample_batch_tokens"], table["sample_steps_per_sec"]
    assert len(tokens) == len(steps) == profile["sps_table_entries"] > 0
    assert tokens == sorted(set(tokens)) and all(s > 0 for s in steps)
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # a bigger step is never faster
    assert profile["sps_table_samples"][0]["batch_tokens"] == tokens[0]


def test_spent_time_budget_skips_sections_and_still_writes_the_report(tmp_path):
    proc = run_check(tmp_path, "--device", "cpu", "--smoke", "--sections", "greedy,profile", "--time-budget-s", "1e-9",
                     "--out", "skipped.json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads((tmp_path / "skipped.json").read_text())
    assert {name: s["status"] for name, s in report["sections"].items()} == {"greedy": "skipped", "profile": "skipped"}
    assert report["greedy_identical"] is None


@pytest.mark.parametrize("args, culprit", [
    (["--device", "tpu"], "--device"),
    (["--device", "cpu", "--sections", "build,nope"], "--sections"),
    (["--device", "cpu", "--time-budget-s", "0"], "--time-budget-s"),
])
def test_bad_arguments_get_one_line(tmp_path, args, culprit):
    proc = run_check(tmp_path, *args, "--out", "bad.json", timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "bad.json").exists()


def test_a_failing_section_is_recorded_and_the_next_one_still_runs(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up
    monkeypatch.setattr(sys, "path", list(sys.path))  # it adds benchmarks/ to the path
    spec.loader.exec_module(gpu_check)

    def broken(check, out):
        out["filled_before"] = 1
        raise ValueError("boom\nsecond line")

    monkeypatch.setitem(gpu_check.SECTIONS, "greedy", broken)
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    status = gpu_check.main(["--device", "cpu", "--smoke", "--sections", "greedy,profile",
                             "--out", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    greedy = report["sections"]["greedy"]
    assert status == 1 and greedy["status"] == "failed" and greedy["error"] == "ValueError: boom; second line"
    assert greedy["filled_before"] == 1 and "Traceback" in greedy["traceback"]
    assert report["sections"]["profile"]["status"] == "ok" and report["greedy_identical"] is None
