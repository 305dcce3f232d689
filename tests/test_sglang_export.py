"""`dspark export sglang` (dspark/serving/sglang.py): SGLang's SPS table reproduces the profile's step rate where
it is sampled and, read by floor as SGLang reads it, errs between samples on the fast side by at most 10 %; the
STS file carries an STS calibration's temperatures and refuses a Platt fit instead of dropping its biases, and
reads back as an STS regime. The commands that write or read them with real models: tests/test_interop.py."""

from __future__ import annotations

import json

import pytest

from dspark.calibration.calibration_file import CalibrationRegime, load_calibration, save_calibration
from dspark.cli import main
from dspark.errors import ConfigError
from dspark.scheduling.sps import SPSProfile
from dspark.serving.sglang import lookup_steps_per_sec, read_sts_file, sps_table, sts_file, sts_regime

IDENTITY = {"name": "test-drafter", "config_sha256": "0" * 64, "weights_sha256": "1" * 64}
FLAT = {"verify_ms_by_tokens": {"1": 5.0, "16": 6.0, "128": 20.0, "1024": 150.0}}
GRID = {"verify_ms": {"1x1": 5.0, "1x8": 6.5, "8x1": 7.0, "8x8": 18.0}, "draft_ms": {"1": 2.0, "8": 3.5}}


def test_flat_table_matches_the_profile_and_floor_lookup_stays_close():
    profile = SPSProfile.from_dict(FLAT)
    table = sps_table(profile, max_batch_tokens=1024)
    tokens, rates = table["sample_batch_tokens"], table["sample_steps_per_sec"]
    assert tokens[0] == 1 and tokens[-1] == 1024 == table["max_batch_tokens"] and tokens == sorted(set(tokens))
    for b, rate in zip(tokens, rates):
        assert rate == pytest.approx(1000.0 / float(profile.step_ms(b)))
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    for b in range(1, 1025, 7):  # between samples the floor entry is at least as fast as the truth, and close
        assert lookup_steps_per_sec(table, b) >= 1000.0 / float(profile.step_ms(b)) - 1e-9
        assert lookup_steps_per_sec(table, b) <= 1000.0 / float(profile.step_ms(b)) * 1.10
    assert lookup_steps_per_sec(table, 5000) == rates[-1]


def test_grid_table_reads_tokens_as_speculative_requests_with_the_drafter():
    profile = SPSProfile.from_dict(GRID)
    table = sps_table(profile, max_batch_tokens=64, block_size=7)
    at = dict(zip(table["sample_batch_tokens"], table["sample_steps_per_sec"]))
    assert at[8] == pytest.approx(1000.0 / (6.5 + 2.0))  # one request verifying 7 drafts
    assert at[64] == pytest.approx(1000.0 / (18.0 + 3.5))  # eight of them
    with pytest.raises(ConfigError):
        sps_table(profile, max_batch_tokens=0)


def test_an_sglang_table_reads_back_as_a_profile(tmp_path):
    """SGLang's table is accepted wherever a profile is (`SPSProfile.load`): the step time at every sampled B
    is 1000 / its rate; between samples the profile interpolates, within the table's ≤ 3 % spacing of the
    original beyond 256 tokens; nothing is charged for drafting again (the table's steps include it)."""
    original = SPSProfile.from_dict(FLAT)
    table = sps_table(original, max_batch_tokens=1024)
    path = tmp_path / "sps_table.json"
    path.write_text(json.dumps(table))
    loaded = SPSProfile.load(path)
    assert not loaded.has_draft_cost and loaded.metadata["format"] == "sglang-sps"
    for b, rate in zip(table["sample_batch_tokens"], table["sample_steps_per_sec"]):
        assert float(loaded.step_ms(b)) == pytest.approx(1000.0 / rate)
    for b in range(256, 1025, 5):
        assert float(loaded.step_ms(b)) == pytest.approx(float(original.step_ms(b)), rel=0.03)
    with pytest.raises(ConfigError, match="records no 'device'"):
        SPSProfile.load(path, expect={"device": "cpu"})


@pytest.mark.parametrize("change, message", [
    ({"sample_steps_per_sec": [100.0]}, "same length"),
    ({"sample_batch_tokens": [1, 1, 3]}, r"sample_batch_tokens\[1\] = 1"),
    ({"sample_steps_per_sec": [100.0, 0.0, 50.0]}, r"sample_steps_per_sec\[1\]"),
    ({"sample_batch_tokens": [1, 2.5, 3]}, r"sample_batch_tokens\[1\] = 2.5"),
])
def test_a_malformed_sglang_table_is_refused_by_field(change, message):
    table = dict({"sample_batch_tokens": [1, 2, 3], "sample_steps_per_sec": [100.0, 90.0, 80.0],
                  "max_batch_tokens": 3}, **change)
    with pytest.raises(ConfigError, match=message):
        SPSProfile.from_dict(table)


def test_sts_file_from_an_sts_calibration_and_platt_refused(tmp_path):
    metrics = {"positions": [{"position": 1, "ece": 0.05}, {"position": 2, "ece": 0.07}]}
    sts = tmp_path / "sts.json"
    save_calibration(sts, drafter=IDENTITY, regimes=[
        CalibrationRegime(1.0, [1.5, 2.0], {"rounds": 900, "datasets": ["mbpp", "gsm8k"]}, metrics, metrics, None, "sts"),
        CalibrationRegime(0.0, [0.7, 0.9], {"rounds": 800, "datasets": ["mbpp"]}, None, None, None, "sts")])
    out = sts_file(load_calibration(sts), 1.0)
    assert out["temperatures"] == [1.5, 2.0] and out["num_samples"] == 900 and out["dataset"] == "mbpp,gsm8k"
    assert out["ece_before"] == [0.05, 0.07] and out["sampling_temperature"] == 1.0
    assert sts_file(load_calibration(sts), 0.1)["temperatures"] == [0.7, 0.9]  # the nearest regime
    platt = tmp_path / "platt.json"
    save_calibration(platt, drafter=IDENTITY, regimes=[
        CalibrationRegime(1.0, [1.5, 2.0], {}, None, None, [0.3, -0.1], "platt")])
    with pytest.raises(ConfigError, match="method sts"):
        sts_file(load_calibration(platt))


def test_command_writes_both_files_and_refuses_bad_input(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(FLAT))
    calibration = tmp_path / "cal.json"
    save_calibration(calibration, [1.2, 1.4, 1.1], drafter=IDENTITY)
    out = tmp_path / "sglang"
    assert main(["export", "sglang", "--out", str(out), "--profile", str(profile), "--calibration", str(calibration)]) == 0
    table = json.loads((out / "sps_table.json").read_text())
    assert table["max_batch_tokens"] == 2048 and len(table["sample_steps_per_sec"]) == len(table["sample_batch_tokens"])
    assert json.loads((out / "confidence_sts.json").read_text())["temperatures"] == [1.2, 1.4, 1.1]
    capsys.readouterr()
    assert main(["export", "sglang", "--out", str(tmp_path / "x")]) == 2
    assert "--profile, --calibration" in capsys.readouterr().err
    assert main(["export", "sglang", "--out", str(profile), "--profile", str(profile)]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["export", "sglang", "--out", str(tmp_path / "y"), "--profile", str(tmp_path / "missing.json")]) == 2
    assert not (tmp_path / "y").exists()


def test_a_grid_table_defaults_to_the_profiled_drafters_block_size():
    """Without --block-size a grid profile's tokens are read as requests with its own drafter's γ ("gamma", what
    `dspark profile` records), else 7; `dspark profile --sglang-out` and `export sglang` share this default."""
    with_gamma = SPSProfile.from_dict(dict(GRID, gamma=3))
    assert sps_table(with_gamma, max_batch_tokens=64) == sps_table(with_gamma, max_batch_tokens=64, block_size=3)
    assert sps_table(SPSProfile.from_dict(GRID), max_batch_tokens=64) == sps_table(
        SPSProfile.from_dict(GRID), max_batch_tokens=64, block_size=7)
    with pytest.raises(ConfigError, match="--block-size"):
        sps_table(with_gamma, block_size=0)


def test_an_sglang_sts_file_reads_as_a_regime_and_exports_back_unchanged(tmp_path):
    """SGLang's own STS file (no "sampling_temperature") becomes an STS regime at temperature 1 (or the one
    given), its data sets and sample count kept; saved as a calibration and exported, it is the same file."""
    native = {"temperatures": [1.5, 2.0, 0.9], "dataset": "mbpp,gsm8k", "num_samples": 640,
              "ece_before": [0.05, None, 0.07], "ece_after": [0.01, 0.02, 0.03]}
    path = tmp_path / "confidence_sts.json"
    path.write_text(json.dumps(native))
    sts = read_sts_file(path)
    regime = sts_regime(sts, 3, path=path)
    assert (regime.sampling_temperature, regime.method, regime.biases) == (1.0, "sts", None)
    assert regime.fitted_on == {"imported_from": "sglang-sts", "file": str(path), "rounds": 640,
                                "datasets": ["mbpp", "gsm8k"]}
    assert sts_regime(sts, 3, 0.0).sampling_temperature == 0.0
    save_calibration(tmp_path / "cal.json", regimes=[regime], drafter=IDENTITY)
    assert sts_file(load_calibration(tmp_path / "cal.json")) == dict(native, sampling_temperature=1.0)
    with pytest.raises(ConfigError, match="3 temperatures, but the drafter's block size is 4"):
        sts_regime(sts, 4)


def test_export_checks_the_table_options_before_reading_anything(tmp_path, capsys):
    assert main(["export", "sglang", "--out", str(tmp_path / "x"), "--profile", str(tmp_path / "missing.json"),
                 "--max-batch-tokens", "0"]) == 2
    assert "--max-batch-tokens must be an integer ≥ 1" in capsys.readouterr().err and not (tmp_path / "x").exists()
