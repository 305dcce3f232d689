"""Static threshold sweep (paper Fig. 5) on synthetic traces built here: hand-checked counts,
monotonicity when the confidences are informative, the plot, and the CLI's input errors (exit 2)."""

from __future__ import annotations

import itertools
import json

import matplotlib.image
import numpy as np
import pytest

from dspark.cli import main
from dspark.errors import ConfigError
from dspark.evaluation.traces import drafter_rounds
from dspark.evaluation.sweep import parse_thresholds, plot_sweep, sweep

from figures import check_png

GAMMA = 4


def informative_traces(seed=0, rounds=1500):
    """Calibrated confidences: slot k accepted with probability c_k; chat rounds less confident than math."""
    rng = np.random.default_rng(seed)
    datasets = {}
    for name, domain, mean in (("gsm8k", "math", 0.85), ("mt-bench", "chat", 0.55)):
        c = rng.beta(2 * mean, 2 * (1 - mean), size=(rounds, GAMMA)).clip(0.01, 0.99)
        acc = np.cumprod(rng.random((rounds, GAMMA)) < c, axis=1).sum(1)
        datasets[name] = {"domain": domain, "confidences": c.tolist(), "drafted": [GAMMA] * rounds,
                          "verified": [GAMMA] * rounds, "accepted": acc.tolist(), "emitted": (acc + 1).tolist(),
                          "sample": (np.arange(rounds) // 25).tolist()}
    nulls = {"domain": "math", "confidences": [[None]] * 10, "drafted": [1] * 10, "verified": [1] * 10,
             "accepted": [1] * 10, "emitted": [2] * 10, "sample": list(range(10))}
    return {"dspark": {"drafter": "dspark", "block_size": GAMMA, "has_confidences": True, "datasets": datasets},
            "mtp": {"drafter": "mtp", "block_size": 1, "has_confidences": False, "datasets": {"gsm8k": nulls}}}


def test_hand_checked_counts():
    traces = {"d": {"block_size": 3, "has_confidences": True, "datasets": {"s": {
        "domain": "code", "confidences": [[0.9, 0.6, 0.2], [0.4, 0.9, 0.9]], "drafted": [3, 3], "verified": [3, 3],
        "accepted": [2, 0], "emitted": [3, 1], "sample": [0, 1]}}}}
    result = sweep(drafter_rounds(traces, "d"), [0.0, 0.5, 0.95])
    code = result["domains"]["code"]
    assert result["domains"]["all"] == code and code["rounds"] == 2
    zero, half, high = code["points"]
    assert zero == dict(threshold=0.0, **code["baseline"])
    # t = 0.5: ℓ = (2, 0) → accepted (2, 0), rejected (0, 0)
    assert half["verified_per_step"] == 1.0 and half["accepted_per_step"] == 1.0 and half["rejected_per_step"] == 0
    assert half["acceptance_rate"] == 1.0 and half["tokens_per_step"] == 2.0
    # t = 0: ℓ = (3, 3) → accepted (2, 0), rejected (1, 3)
    assert zero["rejected_per_step"] == 2.0 and zero["acceptance_rate"] == pytest.approx(2 / 6)
    assert high["verified_per_step"] == 0 and high["acceptance_rate"] is None
    survival = sweep(drafter_rounds(traces, "d"), [0.5], kind="survival")["domains"]["code"]["points"][0]
    assert survival["verified_per_step"] == 1.0  # a = (0.9, 0.54, 0.108) and (0.4, …): ℓ = (2, 0)


@pytest.mark.parametrize("kind", ["confidence", "survival"])
def test_higher_threshold_verifies_less_and_accepts_a_larger_share(kind):
    rounds = drafter_rounds(informative_traces(), "dspark")
    thresholds = parse_thresholds("0:0.95:0.05")
    result = sweep(rounds, thresholds, kind)
    assert list(result["domains"]) == ["math", "chat", "all"]
    assert result["domains"]["all"]["rounds"] == len(rounds)
    for data in result["domains"].values():
        verified = [p["verified_per_step"] for p in data["points"]]
        rates = [p["acceptance_rate"] for p in data["points"]]
        assert all(b <= a for a, b in itertools.pairwise(verified))
        assert all(b >= a - 0.01 for a, b in itertools.pairwise(rates))
        assert rates[-1] > rates[0] + 0.2
        for p in data["points"]:
            assert p["accepted_per_step"] + p["rejected_per_step"] == pytest.approx(p["verified_per_step"])
    chat, math = result["domains"]["chat"]["baseline"], result["domains"]["math"]["baseline"]
    assert chat["acceptance_rate"] < math["acceptance_rate"]


def test_survival_threshold_never_verifies_more_than_confidence_threshold():
    rounds = drafter_rounds(informative_traces(), "dspark")
    conf = sweep(rounds, [0.3, 0.6], "confidence")["domains"]["all"]["points"]
    surv = sweep(rounds, [0.3, 0.6], "survival")["domains"]["all"]["points"]
    for c, s in zip(conf, surv):
        assert s["verified_per_step"] <= c["verified_per_step"]


def test_parse_thresholds():
    values = parse_thresholds("0.05:0.95:0.05")
    assert len(values) == 19 and values[0] == 0.05 and values[-1] == 0.95
    assert parse_thresholds("0.7, 0.3,0.3") == [0.3, 0.7]
    for bad in ("a:b:c", "0.5:0.1:0.1", "0:1:0", "0.2,1.5", "", "0:1"):
        with pytest.raises(ConfigError):
            parse_thresholds(bad)


def check_sweep_figure(figure, result):
    """One panel per domain (then "all"): accepted drafts per step as bars at each threshold, rejected ones
    stacked on them, the acceptance rate (%) as a line on the twin axis."""
    thresholds = result["thresholds"]
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [f"{name} ({d['rounds']} rounds)" for name, d in result["domains"].items()]
    for ax, data in zip(panels, result["domains"].values()):
        points = data["points"]
        accepted, rejected = ax.containers
        assert [p.get_x() + p.get_width() / 2 for p in accepted] == pytest.approx(thresholds)
        assert [p.get_height() for p in accepted] == pytest.approx([p["accepted_per_step"] for p in points])
        assert [p.get_y() for p in accepted] == [0] * len(points)
        assert [p.get_y() for p in rejected] == pytest.approx([p["accepted_per_step"] for p in points])
        assert [p.get_height() for p in rejected] == pytest.approx([p["rejected_per_step"] for p in points])
        (twin,) = [a for a in ax.get_shared_x_axes().get_siblings(ax) if a is not ax]
        (rate,) = twin.get_lines()
        assert list(rate.get_xdata()) == pytest.approx(thresholds)
        expected = [np.nan if p["acceptance_rate"] is None else 100 * p["acceptance_rate"] for p in points]
        np.testing.assert_allclose(rate.get_ydata(), expected)
    assert figure.get_suptitle() == f"static threshold sweep, {result['drafter']} (paper Fig. 5)"


def test_plot_is_a_valid_png(tmp_path, saved_figures):
    result = sweep(drafter_rounds(informative_traces(rounds=200), "dspark"), parse_thresholds("0.1:0.9:0.2"))
    path = plot_sweep(result, tmp_path / "sweep.png")
    check_png(path, saved_figures[path])
    assert matplotlib.image.imread(path).shape[1] > 300
    assert list(result["domains"]) == ["math", "chat", "all"]
    accepted = [p["accepted_per_step"] for p in result["domains"]["all"]["points"]]
    assert accepted[0] > accepted[-1] > 0  # distinct, non-zero bars
    check_sweep_figure(saved_figures[path], result)


@pytest.fixture
def traces_file(tmp_path):
    path = tmp_path / "traces.json"
    path.write_text(json.dumps(informative_traces(rounds=300)))
    return path


def test_cli_sweep_writes_json_and_png(traces_file, tmp_path, capsys, saved_figures):
    out = tmp_path / "sweep"
    code = main(["sweep", "--traces", str(traces_file), "--thresholds", "0.2:0.8:0.2", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["drafter"] == "dspark" and report["thresholds"] == [0.2, 0.4, 0.6, 0.8]
    assert json.loads((out / "sweep.json").read_text())["domains"].keys() == report["domains"].keys()
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    check_png(out / "sweep.png", saved_figures[out / "sweep.png"])
    assert report["domains"]["all"]["rounds"] == 600 and report["kind"] == "confidence"
    check_sweep_figure(saved_figures[out / "sweep.png"], report)  # the plot shows the reported points
    code = main(["sweep", "--traces", str(traces_file), "--kind", "survival", "--thresholds", "0.5"])
    captured = capsys.readouterr()
    assert code == 0 and "survival threshold sweep" in captured.out


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("not-json", "not readable JSON"),
    ("not-object", "expected a JSON object"),
    ("label", "no drafter 'eagle'"),
    ("no-confidences", "recorded without confidences"),
    ("thresholds", "--thresholds"),
    ("out-of-range", "must lie in [0, 1]"),
])
def test_cli_sweep_bad_input_exits_2(traces_file, tmp_path, capsys, case, message):
    argv = ["sweep", "--traces", str(traces_file)]
    if case == "missing":
        argv[2] = str(tmp_path / "absent.json")
    elif case == "not-json":
        traces_file.write_text("[1, 2")
    elif case == "not-object":
        traces_file.write_text("[]")
    elif case == "label":
        argv += ["--drafter", "eagle"]
    elif case == "no-confidences":
        argv += ["--drafter", "mtp"]
    elif case == "thresholds":
        argv += ["--thresholds", "0.1:x:0.1"]
    elif case == "out-of-range":
        data = informative_traces(rounds=30)
        data["dspark"]["datasets"]["gsm8k"]["confidences"][3][1] = 1.5
        traces_file.write_text(json.dumps(data))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("dspark sweep: error:") and message in err and len(err.strip().splitlines()) == 1


def test_cli_sweep_without_traces_records_them_first(tmp_path, capsys, monkeypatch):
    """The recording path, with a tiny random target and DSpark drafter standing in for the built-in model."""
    from dspark.models import zoo
    from dspark.models.drafters.dspark import dspark_config_for_target, init_from_target
    from dspark.models.random_init import build_random_model
    from dspark.models.target_runner import TargetRunner

    target = build_random_model(tmp_path / "target", "tiny-qwen3", seed=3, init_std=0.08)
    runner = TargetRunner.from_pretrained(target, dtype="float32")
    config = dspark_config_for_target(runner.hf_config, target_layer_ids=(0, 2), mask_token_id=runner.config.vocab_size - 1,
                                      num_draft_layers=1, block_size=3, markov_rank=8, enable_confidence_head=True)
    drafter = init_from_target(config, runner.model, seed=1, std=0.3).save_pretrained(tmp_path / "dspark")
    monkeypatch.setattr(zoo, "resolve_target", lambda value: str(target))
    monkeypatch.setattr(zoo, "resolve_drafter", lambda value: str(drafter))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"item {i}: " + "ab" * (i + 1)]}) + "\n" for i in range(3)))
    out = tmp_path / "out"
    code = main(["sweep", "--datasets", str(prompts), "--limit", "3", "--max-new-tokens", "10", "--no-progress",
                 "--thresholds", "0.3,0.6", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "recording traces with the built-in target" in captured.err
    report = json.loads(captured.out)
    assert report["traces"].startswith("recorded with") and report["block_size"] == 3
    assert report["domains"]["all"]["rounds"] > 0
    assert json.loads((out / "traces.json").read_text())["dspark"]["temperature"] == 1.0
    code = main(["sweep", "--datasets", str(prompts), "--limit", "2", "--max-new-tokens", "6", "--no-progress",
                 "--temperature", "0", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "temperature 0," in captured.err  # greedy recording
    assert json.loads((out / "traces.json").read_text())["dspark"]["temperature"] == 0.0
