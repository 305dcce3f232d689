"""Confidence calibration end to end: `dspark eval` reports per-position calibration metrics and writes
replayable traces; `dspark calibrate` fits STS on them and writes a file that inference then applies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dspark.calibration import Rounds, reliability_data
from dspark.calibration.calibration_file import regimes_for
from dspark.cli import main
from dspark.evaluation.traces import drafter_rounds
from dspark.models.drafters import load_drafter
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner
from dspark.scheduling.controller import SpeculationController

from drafters_for_tests import save_dspark_folder
from figures import check_png


def make_dspark_folder(target_dir, out, seed):
    return save_dspark_folder(target_dir, out, seed=seed, block_size=4, target_layer_ids=(0, 2), markov_rank=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    target = build_random_model(root / "target", "tiny-qwen3", seed=3, init_std=0.08)
    drafter = make_dspark_folder(target, root / "drafter", seed=1)
    other = make_dspark_folder(target, root / "other", seed=2)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"item {i}: " + "ab" * (i % 5 + 1)]}) + "\n" for i in range(24)))
    return target, drafter, other, prompts


def check_reliability_figure(figure, before, positions, min_points=10):
    """Raw head only: one panel per position with the diagonal, the raw curve over the bins with ≥ min_points
    rounds, the bin counts as a background histogram, and ECE / n in the text."""
    panels = [ax for ax in figure.axes if ax.get_visible() and ax.get_title().startswith("Position")]
    assert positions and [ax.get_title() for ax in panels] == [f"Position {k}" for k in positions]
    for ax, k in zip(panels, positions):
        data = before[k - 1]
        diagonal, *curves = ax.get_lines()
        assert list(diagonal.get_xdata()) == [0, 1] and list(diagonal.get_ydata()) == [0, 1]
        assert [line.get_label() for line in curves] == ["Before calibration"]
        kept = [i for i, n in enumerate(data["count_per_bin"]) if n >= min_points]
        assert kept  # every panel shown has a curve
        np.testing.assert_allclose(curves[0].get_xdata(), [data["mean_predicted"][i] for i in kept])
        np.testing.assert_allclose(curves[0].get_ydata(), [data["observed"][i] for i in kept])
        (hist,) = [a for a in ax.get_shared_x_axes().get_siblings(ax) if a is not ax]
        assert [p.get_height() for p in hist.patches] == data["count_per_bin"] and sum(data["count_per_bin"]) > 0
        text = ax.texts[0].get_text()
        assert f"ECE: {100 * data['ece']:.1f}%" in text and f"n = {data['count']}" in text


def run_json(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_eval_reports_calibration_and_calibrate_fits_from_its_traces(setup, capsys, tmp_path, saved_figures):
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
    assert 0 < first["ece_floor"] < 1 and calib["mean"]["ece_floor"] == pytest.approx(
        np.mean([p["ece_floor"] for p in calib["positions"]]))
    # The reliability diagram (raw head: --calibration none) shows the traces' rounds, one panel per position.
    png = tmp_path / "eval" / "reliability_drafter.png"
    assert report["reliability_plots"] == {"drafter": str(png)}
    figure = saved_figures[png]
    check_png(png, figure, dpi=110)
    assert figure.get_suptitle() == "drafter: prefix-survival reliability"
    recorded = drafter_rounds(json.loads((tmp_path / "eval" / "traces.json").read_text()), "drafter")
    before = reliability_data(Rounds.from_arrays(recorded.raw_confidences(), recorded.verified, recorded.accepted,
                                                 drop_invalid=True))
    assert [d["count"] for d in before] == [p["count"] for p in calib["positions"]]
    assert [d["ece"] for d in before] == pytest.approx([p["ece"] for p in calib["positions"]])
    check_reliability_figure(figure, before, [d["position"] for d in before if d["count"] > 0])

    out = tmp_path / "calibration.json"
    summary = run_json(capsys, ["calibrate", "--drafter", str(drafter), "--traces", str(tmp_path / "eval" / "traces.json"),
                                "--out", str(out), "--json"])
    temps, biases = summary["temperatures"], summary["biases"]
    assert len(temps) == 4 and all(t > 0 for t in temps) and len(biases) == 4 and summary["method"] == "platt"
    assert len(summary["ece_before"]["per_position"]) == 4 and summary["ece_after"]["mean"] is not None
    assert summary["fitted_on"]["held_out_rounds"] > 0
    after = summary["ece_after"]
    assert len(after["floor_per_position"]) == 4 and after["floor"] == pytest.approx(np.mean(after["floor_per_position"]))

    # Inference applies the file: calibrated c = σ(logit / T + b) of the drafter's raw logits, per position.
    raw = load_drafter(str(drafter))
    controller = SpeculationController(regimes=regimes_for(raw, str(out)))
    hidden = torch.randn(3, 4, raw.model.config.layers.hidden_size, generator=torch.Generator().manual_seed(0))
    anchors = torch.tensor([5, 6, 7])
    from dspark.decoding.sampling import SamplingParams

    _, _, logits = raw.sample_block(hidden, anchors, [SamplingParams()] * 3, None)
    c_cal = controller.calibrate(logits, [SamplingParams()] * 3)
    expected = torch.sigmoid(logits.double() / torch.tensor(temps, dtype=torch.float64)
                             + torch.tensor(biases, dtype=torch.float64))
    assert torch.allclose(c_cal.double(), expected, atol=1e-5)
    assert SpeculationController(regimes=regimes_for(raw, "none")).map_for(SamplingParams()) is None

    # The file is bound to this drafter: another drafter's weights are refused by name.
    code = main(["eval", "--target", str(target), "--drafter", str(other), "--datasets", str(prompts), "--limit", "1",
                 "--calibration", str(out), "--no-progress"])
    assert code == 2 and "calibration" in capsys.readouterr().err.lower()


def test_calibrate_refuses_a_drafter_without_confidence_head(setup, capsys):
    target, _, _, prompts = setup
    code = main(["calibrate", "--target", str(target), "--drafter", "ngram", "--datasets", str(prompts)])
    assert code == 2 and "drafter folder" in capsys.readouterr().err


def test_generation_feeds_the_online_calibrator_raw_confidences_and_applies_its_refits(setup):
    """docs/design.md §4.3 inside the loop: every verification round reaches the calibrator with the *raw* head's
    confidences (the drafter reports raw logits; the controller calibrates them), refits become the
    controller's map, and the output is unchanged (greedy output equals plain decoding)."""
    import numpy as np

    from dspark.calibration.online import OnlineCalibrator
    from dspark.decoding.sampling import SamplingParams
    from dspark.engine.generation import generate

    target, drafter_dir, _, _ = setup
    runner = TargetRunner.from_pretrained(target, dtype="float32")
    drafter = load_drafter(str(drafter_dir))
    start = [2.0, 1.5, 0.7, 3.0]
    calibrator = OnlineCalibrator(block_size=4, refit_every=20, window=400, min_count=5, initial=start)
    controller = SpeculationController(regimes={1.0: start}, online=calibrator)
    prompts = [[5 + i, 9, 11 + i, 30] for i in range(7)]
    # The last request has room for one token after the prefill: in the first round it drafts nothing
    # (ℓ = 0) while the others draft, so the calibrator is handed a row with nothing verified.
    common = dict(sampling=SamplingParams(), max_new_tokens=[40] * 6 + [2], seed=0)
    spec = generate(runner, prompts, drafter=drafter, controller=controller, record_rounds=True, **common)
    plain = generate(runner, prompts, **common)
    assert [s.token_ids for s in spec.sequences] == [s.token_ids for s in plain.sequences]
    # Rounds the drafter ran in (a recorded confidence list, empty when it drafted nothing for the request)
    # reach the calibrator; rounds_seen counts every such row, rounds_kept only those with ℓ > 0.
    fed = [r for s in spec.sequences for r in s.rounds if r.confidences is not None]
    rounds = [r for r in fed if r.verified > 0]
    unverified = [r for r in fed if r.verified == 0]
    assert [(r.drafted, r.verified) for r in spec.sequences[6].rounds] == [(0, 0)] and len(unverified) >= 1
    assert calibrator.rounds_seen == len(fed) != len(rounds)
    assert calibrator.rounds_kept == len(rounds) and calibrator.rows_unverified == len(unverified)
    assert calibrator.rows_dropped == 0 and calibrator.refits >= 1
    applied = controller.map_for(SamplingParams())
    assert np.allclose(applied.temperatures, calibrator.temperatures, rtol=1e-6)
    assert np.allclose(applied.biases, calibrator.biases, atol=1e-6)
    # The first rounds were drafted with the starting temperatures: the calibrator holds their raw values.
    reported = np.array(rounds[0].confidences)  # calibrated with `start` (first round of sequence 0)
    expected = 1 / (1 + np.exp(-np.log(reported / (1 - reported)) * np.array(start)[: len(reported)]))
    assert any(np.allclose(row[: len(reported)], expected, atol=1e-5) for row in calibrator.window_rounds().confidences)


@pytest.mark.parametrize("policy", ["causal-greedy", "async-topk", "threshold-0.6", "fixed-2"])
def test_generate_command_with_a_scheduler_and_online_calibration_is_lossless(setup, capsys, tmp_path, policy):
    target, drafter, _, _ = setup
    profile = tmp_path / "profile.json"  # steep: every verified token costs as much as a decode step
    profile.write_text(json.dumps({"verify_ms": {"1x1": 1.0, "1x2": 2.0, "1x3": 3.0, "1x5": 5.0}, "draft_ms": {"1": 0.1}}))
    base = ["generate", "--model", str(target), "--prompt", "item 3: ababab", "--max-new-tokens", "24", "--json"]
    plain = run_json(capsys, base + ["--drafter", "none"])
    spec = run_json(capsys, base + ["--drafter", str(drafter), "--scheduler", policy, "--profile", str(profile),
                                    "--online-calibration", "3"])
    assert spec["token_ids"] == plain["token_ids"]
    assert spec["scheduler"] and spec["online_calibration"]["rounds_seen"] > 0
    verified = spec["spec_decode"]["verified_tokens"]
    assert verified < spec["spec_decode"]["drafted_tokens"] or policy == "threshold-0.6"


def test_calibrate_fits_one_regime_per_sampling_temperature_and_each_request_uses_its_own(setup, capsys, tmp_path):
    """`--sampling-temperatures 1,0` records raw rounds at both temperatures and writes two regimes; in one
    batch, a greedy request's confidences use the greedy regime and a sampled request's the T = 1 one."""
    import numpy as np

    from dspark.calibration import load_calibration
    from dspark.decoding.sampling import SamplingParams

    target, drafter, _, prompts = setup
    out = tmp_path / "calibration.json"
    summary = run_json(capsys, ["calibrate", "--target", str(target), "--drafter", str(drafter), "--datasets", str(prompts),
                                "--max-new-tokens", "24", "--no-progress", "--out", str(out), "--json",
                                "--sampling-temperatures", "1,0"])
    assert [r["sampling_temperature"] for r in summary["regimes"]] == [0.0, 1.0]
    assert summary["temperatures"] == summary["regimes"][1]["temperatures"]  # top level: the paper's T = 1
    loaded = load_calibration(out, drafter_folder=drafter, block_size=4)
    regimes = loaded.by_sampling_temperature()
    assert not np.allclose(regimes[0.0].temperatures, regimes[1.0].temperatures)  # greedy rounds: another fit

    raw = load_drafter(str(drafter))
    controller = SpeculationController(regimes=regimes_for(raw, str(out)))
    hidden = torch.randn(2, 4, raw.model.config.layers.hidden_size, generator=torch.Generator().manual_seed(1))
    anchors = torch.tensor([5, 6])
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9)]
    _, _, logits = raw.sample_block(hidden, anchors, mixed, torch.Generator().manual_seed(0))
    c_cal = controller.calibrate(logits, mixed)
    temps = torch.tensor(np.stack([regimes[0.0].temperatures, regimes[1.0].temperatures]))
    biases = torch.tensor(np.stack([regimes[0.0].biases, regimes[1.0].biases]))
    assert torch.allclose(c_cal.double(), torch.sigmoid(logits.double() / temps + biases), atol=1e-5)


def test_calibrate_rejects_conflicting_or_bad_sampling_temperatures(setup, capsys, tmp_path):
    target, drafter, _, prompts = setup
    base = ["calibrate", "--target", str(target), "--drafter", str(drafter), "--datasets", str(prompts)]
    for extra, message in ((["--sampling-temperatures", "1,x"], "not a number"),
                           (["--sampling-temperatures", "-1"], "≥ 0"),
                           (["--sampling-temperatures", "1,1"], "repeats"),
                           (["--sampling-temperatures", "1", "--traces", str(tmp_path / "t.json")], "with --traces")):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err


def test_a_calibrator_bound_to_a_sampling_temperature_sees_and_refits_only_that_regime(setup):
    """Greedy and sampled requests in one batch: the calibrator bound to temperature 0 observes only the
    greedy rounds (raw confidences, its regime's temperatures undone) and its refit replaces only the
    greedy regime of the drafter; the output is still lossless."""
    import numpy as np

    from dspark.calibration.online import OnlineCalibrator
    from dspark.decoding.sampling import SamplingParams
    from dspark.engine.generation import generate

    target, drafter_dir, _, _ = setup
    runner = TargetRunner.from_pretrained(target, dtype="float32")
    drafter = load_drafter(str(drafter_dir))
    greedy_start, sampled = [0.8, 0.9, 1.1, 1.2], [2.0, 2.0, 2.0, 2.0]
    calibrator = OnlineCalibrator(block_size=4, refit_every=15, window=400, min_count=5,
                                  initial=greedy_start, sampling_temperature=0.0)
    controller = SpeculationController(regimes={0.0: greedy_start, 1.0: sampled}, online=calibrator)
    prompts = [[5 + i, 9, 11 + i, 30] for i in range(8)]
    samplings = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(8)]
    # Requests 6 (greedy) and 7 (sampled) have room for one token after the prefill: their only round
    # verifies nothing, and only the greedy one's row reaches the calibrator.
    spec = generate(runner, prompts, sampling=samplings, max_new_tokens=[30] * 6 + [2, 2], drafter=drafter,
                    controller=controller, record_rounds=True, seed=0)
    greedy_fed = [r for i, s in enumerate(spec.sequences) if i % 2 == 0 for r in s.rounds if r.confidences is not None]
    greedy_rounds = [r for r in greedy_fed if r.verified > 0]
    sampled_fed = [r for i, s in enumerate(spec.sequences) if i % 2 == 1 for r in s.rounds if r.confidences is not None]
    assert [(r.drafted, r.verified) for i in (6, 7) for r in spec.sequences[i].rounds] == [(0, 0), (0, 0)]
    assert calibrator.rounds_seen == len(greedy_fed) != len(greedy_rounds) and sampled_fed
    assert calibrator.rounds_kept == len(greedy_rounds)
    assert calibrator.rows_unverified == len(greedy_fed) - len(greedy_rounds) >= 1
    assert calibrator.rows_dropped == 0 and calibrator.refits >= 1
    greedy_map, sampled_map = controller.map_for(samplings[0]), controller.map_for(samplings[1])
    assert np.allclose(greedy_map.temperatures, calibrator.temperatures, rtol=1e-6)  # the greedy regime was refitted
    assert np.allclose(greedy_map.biases, calibrator.biases, atol=1e-6)
    assert sampled_map.temperatures.tolist() == sampled and not sampled_map.biases.any()  # the sampled one untouched
    plain = generate(runner, [prompts[0]], sampling=samplings[0], max_new_tokens=30, seed=0)
    assert spec.sequences[0].token_ids == plain.sequences[0].token_ids


def test_each_request_gets_the_regime_nearest_its_sampling_temperature(setup):
    """The controller's batched regime lookup agrees with `nearest_regime` (ties go to the higher temperature)."""
    from dspark.calibration.calibration_file import nearest_regime
    from dspark.decoding.sampling import SamplingParams

    points = [0.0, 0.7, 1.0]
    controller = SpeculationController(regimes={t: [1.0 + t + 0.1 * k for k in range(4)] for t in points})
    wanted = [0.0, 0.2, 0.35, 0.5, 0.85, 0.9, 1.0, 5.0]
    samplings = [SamplingParams(temperature=t) for t in wanted]
    chosen = [round(float(controller.map_for(s).temperatures[0]) - 1.0, 6) for s in samplings]
    # the batched path (calibrate) picks the same regimes: logit 0 → σ(b) = 0.5, logit 1 → σ(1 / T_1)
    calibrated = controller.calibrate(torch.ones(len(wanted), 4), samplings)[:, 0]
    assert torch.allclose(calibrated, torch.sigmoid(1.0 / torch.tensor([1.0 + c for c in chosen])))
    assert chosen == [points[nearest_regime(points, t)] for t in wanted]
    assert chosen[2] == 0.7  # 0.35 is halfway between 0 and 0.7
