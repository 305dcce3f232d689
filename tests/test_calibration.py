"""Confidence calibration (docs/design.md §4): metrics by hand, STS on a known overconfident head, calibration files,
online refitting under drift, reliability plots."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from dspark.calibration import (
    CalibrationRegime,
    ConfidenceMap,
    OnlineCalibrator,
    Rounds,
    apply_calibration,
    brier_score,
    calibrate,
    ece_noise_floor,
    ece_per_position,
    expected_calibration_error,
    fit_map,
    fit_sts,
    load_calibration,
    position_metrics,
    reliability_data,
    roc_auc,
    save_calibration,
    split_rounds,
)
from dspark.calibration.calibration_file import FORMAT
from dspark.errors import CheckpointError

from figures import check_png

GAMMA = 7
SHARPEN = 2.5  # the head reports σ(2.5·logit p): overconfident, exactly undone by T = 2.5


def _logit(p):
    return np.log(p) - np.log1p(-p)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def synthetic_rounds(rng, n, *, sharpen=SHARPEN, truth=1.0, block_size=GAMMA, partial=0.3, shift=0.0, beta=(5.0, 1.5)):
    """(confidences, verified, accepted) of n rounds: per slot p_k ~ Beta(*beta); the head reports
    c_k = σ(sharpen·logit p_k + shift); slot k is accepted with probability σ(truth·logit p_k) given slots < k
    were (first rejection ends the round). A `partial` fraction verifies a random ℓ < γ, half of those with
    NaN confidences past ℓ (not drafted)."""
    z = _logit(rng.beta(*beta, size=(n, block_size)))
    conf = _sigmoid(sharpen * z + shift)
    survived = np.cumprod(rng.random((n, block_size)) < _sigmoid(truth * z), axis=1).sum(axis=1)
    verified = np.full(n, block_size)
    short = rng.random(n) < partial
    verified[short] = rng.integers(1, block_size + 1, int(short.sum()))
    undrafted = (np.arange(1, block_size + 1)[None, :] > verified[:, None]) & (rng.random((n, 1)) < 0.5)
    conf[undrafted] = np.nan
    return conf, verified, np.minimum(survived, verified)


@pytest.fixture(scope="module")
def overconfident():
    return Rounds.from_arrays(*synthetic_rounds(np.random.default_rng(0), 120_000))


@pytest.fixture(scope="module")
def fitted(overconfident):
    fit, held = split_rounds(overconfident, held_out_fraction=0.5, seed=3)
    return fit, held, fit_sts(fit)


def _drafter_folder(path, seed):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "dspark", "block_size": GAMMA, "seed": seed}))
    (path / "model.safetensors").write_bytes(np.random.default_rng(seed).bytes(4096))
    return path


# --- metrics ----------------------------------------------------------------------------------------


def test_ece_brier_auc_by_hand():
    pred = [0.1, 0.12, 0.5, 0.9, 0.95]
    y = [0, 1, 1, 1, 0]
    # bins of width 0.05: {0.1, 0.12} → |0.11 − 0.5|·2/5; {0.5} → 0.5/5; {0.9} → 0.1/5; {0.95} → 0.95/5
    assert expected_calibration_error(pred, y) == pytest.approx(0.156 + 0.1 + 0.02 + 0.19)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == pytest.approx(0.0)
    assert expected_calibration_error([], []) is None
    assert brier_score([0.2, 0.7], [0, 1]) == pytest.approx((0.04 + 0.09) / 2)
    # positives {0.5, 0.8} vs negatives {0.2, 0.5}: 1 + ½ + 1 + 1 of 4 pairs
    assert roc_auc([0.2, 0.5, 0.5, 0.8], [0, 1, 0, 1]) == pytest.approx(0.875)
    assert roc_auc([0.3, 0.4], [1, 1]) is None and roc_auc([0.3, 0.4], [0, 0]) is None


def test_ece_noise_floor_matches_the_binomial_mean_absolute_error():
    # one bin at p = 0.5: E|mean(p − y)| = E|Binomial(n, ½) − n/2|/n ≈ sqrt(2/π)·sqrt(p(1 − p)/n)
    n = 400
    floor = ece_noise_floor(np.full(n, 0.5), draws=4000)
    assert floor == pytest.approx(np.sqrt(2 / np.pi) * np.sqrt(0.25 / n), rel=0.05)
    # four times the data halves it; certain predictions have no floor; empty input has none
    assert ece_noise_floor(np.full(4 * n, 0.5), draws=4000) == pytest.approx(floor / 2, rel=0.08)
    assert ece_noise_floor([0.0, 1.0, 1.0]) == 0.0 and ece_noise_floor([]) is None
    # predictions spread over 10 bins have a larger floor than the same N in one bin
    assert ece_noise_floor(np.linspace(0.3, 0.7, n), draws=4000) > 1.5 * floor


def test_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(1)
    pred = np.round(rng.random(300), 1)  # many ties
    y = rng.random(300) < pred
    pos, neg = pred[y], pred[~y]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert roc_auc(pred, y) == pytest.approx(pairs / (pos.size * neg.size))
    assert roc_auc(torch.tensor(pred), torch.tensor(y)) == pytest.approx(pairs / (pos.size * neg.size))


def test_position_metrics_use_prefix_products_and_mask_unverified_slots():
    conf = [[0.9, 0.8, 0.5], [0.6, np.nan, np.nan], [0.5, 0.5, 0.5]]
    rounds = Rounds.from_arrays(conf, [3, 1, 2], [2, 1, 0])
    m = position_metrics(rounds)
    json.dumps(m, allow_nan=False)
    p1, p2, p3 = m["positions"]
    # position 1: â = (0.9, 0.6, 0.5), y = (1, 1, 0); position 2 (ℓ ≥ 2): â = (0.72, 0.25), y = (1, 0);
    # position 3 (ℓ ≥ 3): â = 0.36, y = 0
    assert [p1["count"], p2["count"], p3["count"]] == [3, 2, 1]
    assert p1["ece"] == pytest.approx((0.1 + 0.4 + 0.5) / 3)
    assert p2["ece"] == pytest.approx((0.28 + 0.25) / 2)
    assert p3["ece"] == pytest.approx(0.36)
    assert p2["mean_predicted"] == pytest.approx(0.485) and p2["mean_observed"] == pytest.approx(0.5)
    assert p2["brier"] == pytest.approx((0.28**2 + 0.25**2) / 2)
    assert p1["auc"] == pytest.approx(1.0) and p3["auc"] is None
    assert m["mean"]["ece"] == pytest.approx(((0.1 + 0.4 + 0.5) / 3 + 0.265 + 0.36) / 3)
    assert m["mean"]["auc"] == pytest.approx(1.0)
    diagram = reliability_data(rounds)
    assert diagram[0]["count_per_bin"][18] == 1 and diagram[0]["observed"][10] == 0.0
    assert diagram[0]["mean_predicted"][0] is None and sum(diagram[1]["count_per_bin"]) == 2


def test_invalid_rounds_raise_or_are_dropped():
    conf = [[0.9, 0.8], [0.7, np.nan], [0.5, 0.4]]
    with pytest.raises(ValueError, match="invalid"):
        Rounds.from_arrays(conf, [2, 2, 1], [1, 0, 2])  # row 1: NaN on a verified slot; row 2: n > ℓ
    kept = Rounds.from_arrays(conf, [2, 2, 1], [1, 0, 2], drop_invalid=True)
    assert len(kept) == 1 and kept.dropped == 2
    kept = Rounds.from_arrays(conf, [2.0, np.nan, 1.5], [1, 0, 1], drop_invalid=True)  # non-integer counts
    assert len(kept) == 1 and kept.dropped == 2
    with pytest.raises(ValueError, match="shape"):
        Rounds.from_arrays([0.5, 0.5], [1], [1])


# --- Sequential Temperature Scaling ---------------------------------------------------------------------


def test_sts_calibrates_an_overconfident_head_on_held_out_rounds(fitted):
    fit, held, temps = fitted
    before, after = ece_per_position(held), ece_per_position(held, temps)
    print(f"ECE before {np.round(before, 4).tolist()} mean {np.mean(before):.4f}")
    print(f"ECE after  {np.round(after, 4).tolist()} mean {np.mean(after):.4f}; T = {np.round(temps, 3).tolist()}")
    assert min(before) > 0.03
    assert np.mean(after) <= 0.015 and max(after) <= 0.025
    assert np.all(np.abs(np.log(temps / SHARPEN)) < np.log(1.2))
    result = calibrate(Rounds.concat([fit, held]), held_out_fraction=0.5, seed=3, method="sts")
    assert result.fit_rounds + result.held_out_rounds == len(fit) + len(held)
    assert result.before["mean"]["ece"] > 0.03 and result.after["mean"]["ece"] <= 0.015
    assert abs(result.after["mean"]["mean_predicted"] - result.after["mean"]["mean_observed"]) < 0.01


def test_sts_calibrates_a_head_as_overconfident_as_the_papers():
    rounds = Rounds.from_arrays(*synthetic_rounds(np.random.default_rng(9), 60_000, sharpen=1.3))
    result = calibrate(rounds, held_out_fraction=0.5, seed=0, method="sts")
    before, after = result.before["mean"]["ece"], result.after["mean"]["ece"]
    print(f"head σ(1.3·logit p): ECE {before:.4f} → {after:.4f}, T = {np.round(result.temperatures, 3).tolist()}")
    assert 0.03 < before < 0.10 and after <= 0.015  # paper Fig. 6: 3–8 % → about 1 %
    assert result.after["mean"]["auc"] == pytest.approx(result.before["mean"]["auc"], abs=0.01)


def test_platt_corrects_a_shifted_head_that_temperatures_only_flatten():
    """A head that reads σ(logit p + 1.5) where slots survive with probability p ≈ 0.5 (the shipped drafter's
    position 2 at temperature 1: 0.70 reported, 0.53 survived). Negative control: the paper's STS can only
    flatten it towards 0.5 (T at the grid's edge), calibrated on average but with the resolution gone (a
    worse Brier score); Platt scaling moves the mean back (b ≈ −1.5, T ≈ 1) and keeps the resolution."""
    rounds = Rounds.from_arrays(*synthetic_rounds(np.random.default_rng(11), 60_000, sharpen=1.0, shift=1.5,
                                                  beta=(3.0, 3.0)))
    sts = calibrate(rounds, held_out_fraction=0.5, seed=0, method="sts")
    platt = calibrate(rounds, held_out_fraction=0.5, seed=0, method="platt")
    print(f"shifted head: ECE raw {sts.before['mean']['ece']:.4f}, sts {sts.after['mean']['ece']:.4f} "
          f"(T = {np.round(sts.temperatures, 1).tolist()}), platt {platt.after['mean']['ece']:.4f} "
          f"(b = {np.round(platt.calibration.biases, 2).tolist()}); Brier sts {sts.after['mean']['brier']:.4f}, "
          f"platt {platt.after['mean']['brier']:.4f}")
    assert sts.before["mean"]["ece"] > 0.1
    assert np.all(sts.temperatures[:3] > 10) and not sts.calibration.biases.any()  # flattened
    assert sts.after["mean"]["brier"] > platt.after["mean"]["brier"] + 0.005
    assert platt.after["mean"]["ece"] <= 0.01
    assert np.all(np.abs(platt.calibration.biases[:4] + 1.5) < 0.15)
    assert np.all(np.abs(np.log(platt.temperatures[:4])) < 0.1)
    assert platt.after["mean"]["auc"] == pytest.approx(platt.before["mean"]["auc"], abs=0.01)  # ranking kept


def test_platt_leaves_a_calibrated_head_near_the_identity_and_keeps_scarce_positions():
    rounds = Rounds.from_arrays(*synthetic_rounds(np.random.default_rng(4), 60_000, sharpen=1.0))
    cmap = fit_map(rounds, method="platt")
    assert np.all(np.abs(np.log(cmap.temperatures[:4])) < 0.1) and np.all(np.abs(cmap.biases[:4]) < 0.1)
    conf, verified, accepted = synthetic_rounds(np.random.default_rng(5), 3000, partial=0.0)
    verified[:] = 2  # no round verifies slots 3..γ
    initial = ConfidenceMap.of(np.linspace(1.5, 2.1, GAMMA), np.linspace(-0.3, 0.3, GAMMA))
    cmap = fit_map((conf, verified, np.minimum(accepted, verified)), method="platt", initial=initial)
    np.testing.assert_array_equal(cmap.temperatures[2:], initial.temperatures[2:])
    np.testing.assert_array_equal(cmap.biases[2:], initial.biases[2:])
    assert np.all(np.abs(cmap.temperatures[:2] - SHARPEN) < 0.5)
    every_slot_accepted = (np.full((200, 2), 0.7), np.full(200, 2), np.full(200, 2))
    finite = fit_map(every_slot_accepted, method="platt", min_count=10)  # separable: the prior keeps it finite
    assert np.all(np.isfinite(finite.temperatures)) and np.all(np.isfinite(finite.biases))
    assert np.all(finite.biases > 1.0)  # and it predicts survival


def test_confidence_map_inverse_undoes_it_and_as_map_reads_temperatures():
    cmap = ConfidenceMap.of([0.5, 2.0, 1.3], [0.7, -1.2, 0.0])
    raw = np.random.default_rng(3).uniform(0.01, 0.99, (50, 3))
    np.testing.assert_allclose(apply_calibration(apply_calibration(raw, cmap), cmap.inverse()), raw, atol=1e-9)
    as_torch = apply_calibration(torch.tensor(raw), cmap)
    np.testing.assert_allclose(as_torch.numpy(), apply_calibration(raw, cmap), atol=1e-12)
    np.testing.assert_allclose(apply_calibration(raw[:, :2], cmap), apply_calibration(raw, cmap)[:, :2])
    plain = ConfidenceMap.of([2.0, 2.0])
    assert plain.biases.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="biases"):
        ConfidenceMap.of([1.0, 1.0], [0.0, float("inf")])
    with pytest.raises(ValueError, match="finite and > 0"):
        ConfidenceMap.of([1.0, -1.0])


def test_sts_keeps_the_ranking_within_each_position(fitted):
    temps = fitted[2]
    rng = np.random.default_rng(2)
    raw = np.round(rng.random((2000, GAMMA)), 3)  # with ties
    raw[:5] = [0.0, 1.0, 1e-9, 1 - 1e-9, 0.5, 0.5, 0.5]
    cal = apply_calibration(raw, temps)
    assert np.all((cal > 0) & (cal < 1))
    for k in range(GAMMA):
        order = np.argsort(raw[:, k], kind="stable")
        assert np.all(np.diff(cal[order, k]) >= 0)
        distinct = np.diff(raw[order, k]) > 0
        interior = (raw[order, k][1:] < 1 - 1e-6) & (raw[order, k][:-1] > 1e-6)
        assert np.all(np.diff(cal[order, k])[distinct & interior] > 0)
    as_torch = apply_calibration(torch.tensor(raw, dtype=torch.float32), temps)
    assert as_torch.dtype == torch.float32
    np.testing.assert_allclose(as_torch.numpy(), cal, atol=1e-4)  # fp32 clamp near 1
    half = apply_calibration(torch.tensor(raw[:, :3], dtype=torch.bfloat16).reshape(2, 1000, 3), temps)
    assert half.dtype == torch.bfloat16 and half.shape == (2, 1000, 3)  # [..., m ≤ γ]: positions 1..m
    nan = apply_calibration(np.array([[0.5, np.nan]]), temps)
    assert np.isnan(nan[0, 1]) and nan[0, 0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="finite"):
        apply_calibration(raw, [1.0] * (GAMMA - 1) + [float("nan")])


def test_sts_leaves_a_calibrated_head_near_unit_temperatures():
    rounds = Rounds.from_arrays(*synthetic_rounds(np.random.default_rng(4), 60_000, sharpen=1.0))
    temps = fit_sts(rounds)
    print(f"calibrated head: T = {np.round(temps, 3).tolist()}")
    assert np.all(np.abs(np.log(temps)) < np.log(1.25))  # later positions see little data (â_k small)
    assert np.mean(np.abs(np.log(temps))) < 0.06


def test_sts_keeps_initial_temperature_where_data_is_scarce():
    conf, verified, accepted = synthetic_rounds(np.random.default_rng(5), 3000, partial=0.0)
    verified[:] = 2  # no round verifies slots 3..γ
    accepted = np.minimum(accepted, verified)
    initial = np.linspace(1.5, 2.1, GAMMA)
    temps = fit_sts((conf, verified, accepted), initial=initial)
    np.testing.assert_array_equal(temps[2:], initial[2:])
    assert np.all(np.abs(temps[:2] - SHARPEN) < 0.5)


def test_split_is_deterministic_and_keeps_groups_together(overconfident):
    a_fit, a_held = split_rounds(overconfident, 0.25, seed=7)
    b_fit, _ = split_rounds(overconfident, 0.25, seed=7)
    c_fit, _ = split_rounds(overconfident, 0.25, seed=8)
    assert len(a_held) == 30_000 and len(a_fit) == 90_000
    np.testing.assert_array_equal(a_fit.confidences, b_fit.confidences)
    assert not np.array_equal(a_fit.verified, c_fit.verified)
    ids = np.arange(10)
    small = Rounds.from_arrays(np.stack([(ids + 1) / 20, (ids + 1) / 20], axis=1), np.full(10, 2), ids % 3)
    groups = ids // 2  # five pairs
    fit, held = split_rounds(small, 0.4, seed=0, groups=groups)
    assert len(held) == 4 and len(fit) == 6
    held_groups = np.round(held.confidences[:, 0] * 20 - 1).astype(int) // 2
    assert sorted(np.bincount(held_groups, minlength=5).tolist()) == [0, 0, 0, 2, 2]


# --- calibration file ------------------------------------------------------------------------------------


def test_calibration_file_round_trip(tmp_path, fitted):
    fit, held, temps = fitted
    drafter = _drafter_folder(tmp_path / "drafter", seed=0)
    path = tmp_path / "out" / "calibration.json"
    content = save_calibration(
        path, temps, drafter_folder=drafter, fitted_on={"rounds": len(fit), "datasets": ["synthetic"]},
        ece_before=position_metrics(held), ece_after=position_metrics(held, temps),
    )
    assert [p.name for p in path.parent.iterdir()] == ["calibration.json"]  # no temporary file left
    on_disk = json.loads(path.read_text())
    assert on_disk == content and on_disk["format"] == FORMAT and on_disk["block_size"] == GAMMA
    loaded = load_calibration(path, drafter_folder=drafter, block_size=GAMMA)
    (regime,) = loaded.regimes
    assert regime.sampling_temperature == 1.0  # one set of temperatures: the paper's protocol
    np.testing.assert_allclose(regime.temperatures, temps, rtol=0, atol=0)
    assert regime.fitted_on["datasets"] == ["synthetic"] and regime.ece_after["mean"]["ece"] <= 0.015
    assert loaded.drafter["name"] == "drafter" and loaded.created
    assert load_calibration(path).block_size == GAMMA
    renamed = shutil.copytree(drafter, tmp_path / "renamed")  # the name is informative; the hashes decide
    assert load_calibration(path, drafter_folder=renamed).regimes == loaded.regimes


def test_calibration_file_regimes_and_the_nearest_one_per_request(tmp_path):
    """One regime per sampling temperature; a request uses the one fitted nearest to its own temperature."""
    drafter = _drafter_folder(tmp_path / "drafter", seed=0)
    path = tmp_path / "calibration.json"
    greedy, sampled = [0.5] * GAMMA, [3.0] * GAMMA
    save_calibration(path, regimes=[{"sampling_temperature": 1.0, "temperatures": sampled},
                                    CalibrationRegime(0.0, greedy)], drafter_folder=drafter)
    loaded = load_calibration(path, drafter_folder=drafter, block_size=GAMMA)
    assert [r.sampling_temperature for r in loaded.regimes] == [0.0, 1.0]  # stored ascending
    maps = loaded.by_sampling_temperature()
    assert sorted(maps) == [0.0, 1.0] and maps[0.0].temperatures.tolist() == greedy
    assert maps[1.0].temperatures.tolist() == sampled and not maps[1.0].biases.any()
    picks = {t: loaded.regime_for(t).temperatures for t in (0.0, 0.3, 0.5, 0.7, 1.0, 1.5)}
    assert picks == {0.0: greedy, 0.3: greedy, 0.5: sampled, 0.7: sampled, 1.0: sampled, 1.5: sampled}
    with pytest.raises(ValueError, match="distinct"):
        save_calibration(tmp_path / "twice.json", regimes=[CalibrationRegime(1.0, sampled), CalibrationRegime(1.0, greedy)],
                         drafter_folder=drafter)
    with pytest.raises(ValueError, match="sampling_temperature"):
        save_calibration(tmp_path / "neg.json", regimes=[CalibrationRegime(-1.0, sampled)], drafter_folder=drafter)


def test_version_1_calibration_files_still_load_as_the_temperature_1_regime(tmp_path):
    drafter = _drafter_folder(tmp_path / "drafter", seed=0)
    path = tmp_path / "calibration.json"
    save_calibration(path, [2.0] * GAMMA, drafter_folder=drafter)
    content = json.loads(path.read_text())
    (regime,) = content.pop("regimes")
    path.write_text(json.dumps(dict(content, format="dspark-calibration-v1", temperatures=regime["temperatures"],
                                    fitted_on={"rounds": 10}, ece_before=None, ece_after=None)))
    loaded = load_calibration(path, drafter_folder=drafter, block_size=GAMMA)
    (regime,) = loaded.regimes
    assert regime.sampling_temperature == 1.0 and regime.temperatures == [2.0] * GAMMA and regime.method == "sts"
    assert regime.map.biases.tolist() == [0.0] * GAMMA
    assert loaded.regimes[0].fitted_on == {"rounds": 10}


def _rewrite(path, regime=None, **changes):
    content = json.loads(path.read_text())
    content.update(changes)
    if regime:
        content["regimes"][0].update(regime)
    path.write_text(json.dumps(content))  # json writes NaN as the (non-standard) token NaN


@pytest.mark.parametrize("case, pattern", [
    ("other drafter", "fitted for drafter"),
    ("other block size", "block size 7"),
    ("bad version", "not supported"),
    ("not calibration", "not a dspark calibration file"),
    ("nan temperature", "finite and > 0"),
    ("zero temperature", "finite and > 0"),
    ("wrong count", "6 temperatures for block size 7"),
    ("no regimes", "non-empty list"),
    ("bad sampling temperature", "sampling_temperature"),
    ("repeated regime", "distinct"),
    ("bad biases", "biases must be 7 finite numbers"),
    ("bad method", "method must be one of"),
    ("missing", "not found"),
    ("not json", "not a readable JSON"),
])
def test_calibration_file_rejections(tmp_path, case, pattern):
    drafter = _drafter_folder(tmp_path / "drafter", seed=0)
    path = tmp_path / "calibration.json"
    save_calibration(path, [2.0] * GAMMA, drafter_folder=drafter)
    kwargs = {"drafter_folder": drafter, "block_size": GAMMA}
    if case == "other drafter":
        other = shutil.copytree(drafter, tmp_path / "other")
        (other / "model.safetensors").write_bytes(np.random.default_rng(1).bytes(4096))  # same config, new weights
        kwargs["drafter_folder"] = other
    elif case == "other block size":
        kwargs["block_size"] = 5
    elif case == "bad version":
        _rewrite(path, format="dspark-calibration-v3")
    elif case == "not calibration":
        _rewrite(path, format="something-else")
    elif case == "nan temperature":
        _rewrite(path, {"temperatures": [2.0] * (GAMMA - 1) + [float("nan")]})
    elif case == "zero temperature":
        _rewrite(path, {"temperatures": [0.0] + [2.0] * (GAMMA - 1)})
    elif case == "wrong count":
        _rewrite(path, {"temperatures": [2.0] * (GAMMA - 1)})
    elif case == "no regimes":
        _rewrite(path, regimes=[])
    elif case == "bad sampling temperature":
        _rewrite(path, {"sampling_temperature": "hot"})
    elif case == "bad biases":
        _rewrite(path, {"biases": [0.0] * (GAMMA - 1) + [float("nan")]})
    elif case == "bad method":
        _rewrite(path, {"method": "isotonic"})
    elif case == "repeated regime":
        content = json.loads(path.read_text())
        _rewrite(path, regimes=content["regimes"] * 2)
    elif case == "missing":
        path.unlink()
    elif case == "not json":
        path.write_text("{ not json")
    with pytest.raises(CheckpointError, match=pattern) as error:
        load_calibration(path, **kwargs)
    assert str(path) in str(error.value)


def test_save_calibration_refuses_bad_temperatures(tmp_path):
    with pytest.raises(ValueError, match="finite"):
        save_calibration(tmp_path / "c.json", [1.0, float("inf")], drafter={"config_sha256": "a", "weights_sha256": "b"})
    with pytest.raises(ValueError, match="block size 3"):
        save_calibration(tmp_path / "c.json", [1.0, 1.0], block_size=3, drafter={"config_sha256": "a", "weights_sha256": "b"})
    assert not list(tmp_path.iterdir())


# --- online calibration -----------------------------------------------------------------------------------


def _feed(calibrator, rounds, batch=250):
    conf, verified, accepted = rounds
    for start in range(0, len(verified), batch):
        calibrator.observe(conf[start:start + batch], verified[start:start + batch], accepted[start:start + batch])


def test_online_calibrator_follows_a_drift():
    rng = np.random.default_rng(6)
    cal = OnlineCalibrator(GAMMA, refit_every=5000, window=20_000, recent=10_000)
    _feed(cal, synthetic_rounds(rng, 40_000))
    settled = cal.drift_report(recent=20_000)
    assert settled["refits"] == 8 and settled["ece_recent"]["mean"] < 0.015
    assert np.all(np.abs(np.log(cal.temperatures / SHARPEN)) < np.log(1.25))
    # the target's acceptance drops (p' = σ(0.7·logit p)) while the head's scores do not change
    _feed(cal, synthetic_rounds(rng, 4900, truth=0.7))
    shifted = cal.drift_report(recent=4900)
    assert shifted["refits"] == 8
    assert shifted["ece_recent"]["mean"] > 0.04 and shifted["drift"] > 0.03
    _feed(cal, synthetic_rounds(rng, 35_100, truth=0.7))
    recovered = cal.drift_report(recent=20_000)
    print(f"online: settled {settled['ece_recent']['mean']:.4f}, after the shift {shifted['ece_recent']['mean']:.4f}, "
          f"after {recovered['refits'] - 8} refits {recovered['ece_recent']['mean']:.4f}, "
          f"T = {np.round(recovered['temperatures'], 2).tolist()}")
    assert recovered["refits"] == 15 and recovered["ece_recent"]["mean"] < 0.015  # refits at 45 150, ..., 75 150
    fresh = Rounds.from_arrays(*synthetic_rounds(rng, 60_000, truth=0.7))
    assert np.mean(ece_per_position(fresh, cal.temperatures)) < 0.015
    assert np.mean(ece_per_position(fresh, settled["temperatures"])) > 0.04
    json.dumps(recovered, allow_nan=False)
    flat = cal.metrics()
    assert flat["calibration_refits"] == 15 and f"calibration_temperature_{GAMMA}" in flat
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat.values())


def test_online_calibrator_drops_bad_rows_and_counts_them():
    cal = OnlineCalibrator(3, refit_every=10_000, window=8, initial=[2.0, 2.0, 2.0])
    nan = float("nan")
    conf = torch.tensor([
        [0.9, 0.8, 0.7],   # ok
        [0.9, nan, nan],   # ok: NaN only past ℓ = 1
        [0.9, nan, 0.7],   # bad: NaN on a verified slot
        [1.5, 0.8, 0.7],   # bad: outside [0, 1]
        [0.9, 0.8, 0.7],   # bad: accepted > verified
        [0.9, 0.8, 0.7],   # bad: verified > γ
        [0.9, 0.8, 0.7],   # skipped: nothing verified
        [1.0, 0.0, 0.5],   # ok: saturated scores are clamped, not dropped
    ])
    verified = torch.tensor([3, 1, 3, 2, 1, 4, 0, 3])
    accepted = torch.tensor([2, 1, 0, 0, 2, 1, 0, 1])
    assert cal.observe(conf, verified, accepted) == 3
    assert cal.observe(np.array([[0.5, 0.5]]), np.array([2.5]), np.array([1])) == 0  # non-integer ℓ
    assert cal.observe(np.array([[0.5, 0.5]]), np.array([2]), np.array([1])) == 1  # m < γ: padded with NaN
    report = cal.drift_report()
    assert (report["rounds_seen"], report["rows_dropped"], report["rows_unverified"]) == (10, 5, 1)
    assert report["rounds_kept"] == 4 and report["rounds_in_window"] == 4 and report["refits"] == 0
    assert report["temperatures"] == [2.0, 2.0, 2.0] and report["drift"] is None
    np.testing.assert_allclose(cal.apply(np.array([[0.9, 0.9, 0.9]])), apply_calibration([[0.9] * 3], [2.0] * 3))
    _feed(cal, synthetic_rounds(np.random.default_rng(7), 20, block_size=3), batch=7)
    assert cal.drift_report()["rounds_in_window"] == 8  # ring buffer holds the last `window` rounds
    assert len(cal.window_rounds()) == 8 and cal.rounds_kept == 24
    assert cal.observe([], [], []) == 0
    with pytest.raises(ValueError, match="B"):
        cal.observe(np.full((2, 4), 0.5), [1, 1], [0, 0])


def test_online_refit_schedule_and_scarce_positions():
    rng = np.random.default_rng(8)
    conf, verified, accepted = synthetic_rounds(rng, 3000, partial=0.0)
    verified[:] = 1  # only slot 1 is ever verified
    cal = OnlineCalibrator(GAMMA, refit_every=1000, window=2000, initial=[3.0] * GAMMA)
    _feed(cal, (conf, verified, np.minimum(accepted, 1)), batch=100)
    report = cal.drift_report()
    assert report["refits"] == 3 and report["rounds_since_refit"] == 0
    assert abs(report["temperatures"][0] - SHARPEN) < 0.6 and report["temperatures"][1:] == [3.0] * (GAMMA - 1)
    assert report["ece_at_refit"]["per_position"][1:] == [None] * (GAMMA - 1)
    assert report["ece_before_refit"]["rounds"] == 2000


# --- plots ---------------------------------------------------------------------------------------------------


def check_reliability_figure(figure, before, after, positions, min_points=10):
    """One panel per position: the diagonal, the raw head's curve (red) and the calibrated one's (blue) over
    the bins with ≥ min_points rounds, the bin counts as a background histogram, ECE / AUC / n in the text."""
    panels = [ax for ax in figure.axes if ax.get_visible() and ax.get_title().startswith("Position")]
    assert [ax.get_title() for ax in panels] == [f"Position {k}" for k in positions]
    for ax, k in zip(panels, positions):
        raw, cal = before[k - 1], None if after is None else after[k - 1]
        diagonal, *curves = ax.get_lines()
        assert list(diagonal.get_xdata()) == [0, 1] and list(diagonal.get_ydata()) == [0, 1]
        expected = [(raw, "Before calibration")] + ([] if cal is None else [(cal, "After calibration")])
        assert [line.get_label() for line in curves] == [label for _, label in expected]
        for line, (data, _) in zip(curves, expected):
            kept = [i for i, n in enumerate(data["count_per_bin"]) if n >= min_points]
            assert len(kept) >= 2
            np.testing.assert_allclose(line.get_xdata(), [data["mean_predicted"][i] for i in kept])
            np.testing.assert_allclose(line.get_ydata(), [data["observed"][i] for i in kept])
        (hist,) = [a for a in ax.get_shared_x_axes().get_siblings(ax) if a is not ax]
        shown = raw if cal is None else cal
        assert [p.get_height() for p in hist.patches] == shown["count_per_bin"]
        assert [p.get_x() for p in hist.patches] == pytest.approx(shown["lower"])
        text = ax.texts[0].get_text()
        ece = f"{100 * raw['ece']:.1f}%" + ("" if cal is None else f" → {100 * cal['ece']:.1f}%")
        assert f"ECE: {ece}" in text and f"AUC: {raw['auc']:.3f}" in text and f"n = {raw['count']}" in text


def test_reliability_plot_writes_a_png(tmp_path, fitted, saved_figures):
    from matplotlib.image import imread

    from dspark.calibration.plots import plot_reliability

    _, held, temps = fitted
    shown = held.subset(np.arange(5000))
    path = plot_reliability(shown, tmp_path / "plots" / "reliability.png", temps,
                            positions=[1, 3, 5, 7], title="synthetic overconfident head", dpi=60)
    figure = saved_figures[path]
    check_png(path, figure, dpi=60)
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 600
    assert figure.get_suptitle() == "synthetic overconfident head"
    check_reliability_figure(figure, reliability_data(shown), reliability_data(shown, temps), [1, 3, 5, 7])
    raw_only = held.subset(np.arange(2000))
    every = plot_reliability(raw_only, tmp_path / "all.png", dpi=40)  # raw head, 7 panels
    check_png(every, saved_figures[every], dpi=40)
    check_reliability_figure(saved_figures[every], reliability_data(raw_only), None, list(range(1, GAMMA + 1)))
    assert imread(every).shape[0] > imread(path).shape[0]
    with pytest.raises(ValueError, match="positions"):
        plot_reliability(held, tmp_path / "x.png", positions=[8])
