"""Confidence calibration end to end: `dspark eval` reports per-position calibration metrics and writes
replayable traces; `dspark calibrate` fits STS on them and writes a file that inference then applies."""

from __future__ import annotations

import json

import pytest
import torch

from dspark.cli import main
from dspark.models.drafters import load_drafter
from dspark.models.drafters.dspark import dspark_config_for_target, init_from_target
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner


def make_dspark_folder(target_dir, out, seed):
    runner = TargetRunner.from_pretrained(target_dir, dtype="float32")
    config = dspark_config_for_target(
        runner.hf_config, target_layer_ids=(0, 2), mask_token_id=runner.config.vocab_size - 1, num_draft_layers=1,
        block_size=4, markov_rank=16, enable_confidence_head=True,
    )
    return init_from_target(config, runner.model, seed=seed, std=0.3).save_pretrained(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    target = build_random_model(root / "target", "tiny-qwen3", seed=3, init_std=0.08)
    drafter = make_dspark_folder(target, root / "drafter", seed=1)
    other = make_dspark_folder(target, root / "other", seed=2)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"item {i}: " + "ab" * (i % 5 + 1)]}) + "\n" for i in range(24)))
    return target, drafter, other, prompts


def run_json(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_eval_reports_calibration_and_calibrate_fits_from_its_traces(setup, capsys, tmp_path):
    target, drafter, other, prompts = setup
    report = run_json(capsys, [
        "eval", "--target", str(target), "--drafter", str(drafter), "--datasets", str(prompts), "--max-new-tokens", "24",
        "--no-progress", "--json", "--out", str(tmp_path / "eval"), "--calibration", "none",
    ])
    calib = report["calibration"]["reported"]
    assert calib["block_size"] == 4 and len(calib["positions"]) == 4
    first = calib["positions"][0]
    assert first["count"] == report["datasets"]["prompts"]["verified_per_position"][0]
    assert 0 <= first["ece"] <= 1 and 0 <= first["brier"] <= 1
    assert (tmp_path / "eval" / "reliability_drafter.png").read_bytes()[:4] == b"\x89PNG"

    out = tmp_path / "calibration.json"
    summary = run_json(capsys, ["calibrate", "--drafter", str(drafter), "--traces", str(tmp_path / "eval" / "traces.json"),
                                "--out", str(out), "--json"])
    temps = summary["temperatures"]
    assert len(temps) == 4 and all(t > 0 for t in temps)
    assert len(summary["ece_before"]["per_position"]) == 4 and summary["ece_after"]["mean"] is not None
    assert summary["fitted_on"]["held_out_rounds"] > 0

    # Inference applies the file: calibrated c = σ(logit(raw) / T), per position.
    raw, calibrated = load_drafter(str(drafter), calibration="none"), load_drafter(str(drafter), calibration=str(out))
    hidden = torch.randn(3, 4, raw.model.config.layers.hidden_size, generator=torch.Generator().manual_seed(0))
    anchors = torch.tensor([5, 6, 7])
    from dspark.decoding.sampling import SamplingParams

    _, _, c_raw = raw.sample_block(hidden, anchors, [SamplingParams()] * 3, None)
    _, _, c_cal = calibrated.sample_block(hidden, anchors, [SamplingParams()] * 3, None)
    expected = torch.sigmoid(torch.logit(c_raw.double()) / torch.tensor(temps, dtype=torch.float64))
    assert torch.allclose(c_cal.double(), expected, atol=1e-5)

    # The file is bound to this drafter: another drafter's weights are refused by name.
    code = main(["eval", "--target", str(target), "--drafter", str(other), "--datasets", str(prompts), "--limit", "1",
                 "--calibration", str(out), "--no-progress"])
    assert code == 2 and "calibration" in capsys.readouterr().err.lower()


def test_calibrate_refuses_a_drafter_without_confidence_head(setup, capsys):
    target, _, _, prompts = setup
    code = main(["calibrate", "--target", str(target), "--drafter", "ngram", "--datasets", str(prompts)])
    assert code == 2 and "drafter folder" in capsys.readouterr().err
