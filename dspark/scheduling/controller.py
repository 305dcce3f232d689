"""The speculation controller: everything that decides, per step, how much speculation each request gets.

It owns the four parts that used to be wired together separately by the generation loop and the simulator:

* the calibration regimes (paper §3.2.1; `dspark.calibration.calibration_file`): one confidence map per
  sampling temperature it was fitted at; a request's raw confidences c_k = σ(logit_k) become
  c'_k = σ(logit_k / T_k + b_k) under the regime fitted nearest its own sampling temperature;
* the online calibrator (`dspark.calibration.online`, optional): fed the raw head's confidences and the
  verification outcomes of the requests of its regime; each refit replaces that regime's map;
* the draft gate (`dspark.scheduling.gate`, optional): whether the drafter runs at all this step;
* the verification-length policy (`dspark.scheduling.policies`; None = verify every draft): ℓ per request.

Per step the engine asks `should_draft(R)`, then `plan(...)` (calibrated confidences and ℓ), verifies, and
reports the outcome with `observe(...)`. Drafters report raw confidences (as logits); calibration is applied
here only. Everything here runs before the round's tokens are verified and looks only at what the drafter
computed before sampling each slot, so the choices keep decoding lossless (paper §3.2.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from dspark.calibration.calibration_file import check_sampling_temperature
from dspark.calibration.metrics import ConfidenceMap
from dspark.calibration.online import OnlineCalibrator
from dspark.decoding.sampling import SamplingParams
from dspark.errors import RequestError
from dspark.scheduling.gate import DraftGate
from dspark.scheduling.policies import VerificationPolicy


@dataclass
class Plan:
    """One step's decision for R requests: `lengths` [R] long (ℓ, drafts to verify) and the calibrated
    confidences [R, K] float32 the decision was made from (None without a confidence head)."""

    lengths: torch.Tensor
    confidences: torch.Tensor | None
    full: torch.Tensor  # [R] long: min(proposed, limit), the most that could be verified

    @classmethod
    def nothing(cls, requests: int) -> "Plan":
        """A step without drafts (the drafter did not run): ℓ = 0 for every request."""
        zeros = torch.zeros(requests, dtype=torch.long)
        return cls(zeros, None, zeros)


class CalibrationRegimes:
    """Confidence maps by sampling temperature (paper §3.2.1): a request is calibrated under the regime
    fitted nearest its own temperature (ties: the higher one; `calibration_file.nearest_regime`)."""

    def __init__(self, regimes: Mapping | None = None):
        self.points, self.maps = np.empty(0), []
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None  # [G, γ] temperatures, biases
        if not regimes:
            return
        by_point = {float(t): v for t, v in regimes.items()}
        points = sorted(by_point)
        maps = []
        for point in points:
            check_sampling_temperature(point, "calibration regime", RequestError)
            value = by_point[point]
            try:
                maps.append(value if isinstance(value, ConfidenceMap) else ConfidenceMap.of(value))
            except (TypeError, ValueError) as exc:
                raise RequestError(f"bad calibration for sampling temperature {point}: {exc}") from None
        if len({m.block_size for m in maps}) != 1:
            raise RequestError(f"calibration regimes of different block sizes: {[m.block_size for m in maps]}")
        self.points, self.maps = np.array(points), maps
        self._tensors = (torch.tensor(np.stack([m.temperatures for m in maps]), dtype=torch.float32),
                         torch.tensor(np.stack([m.biases for m in maps]), dtype=torch.float32))

    def as_dict(self) -> dict[float, ConfidenceMap]:
        return dict(zip(self.points.tolist(), self.maps))

    def index(self, temperatures: np.ndarray) -> np.ndarray:
        """Index of the regime nearest each temperature (ties: the higher one): the points ascend, so the
        first minimum of the reversed distances."""
        distance = np.abs(temperatures[:, None] - self.points[None, :])
        return self.points.size - 1 - np.argmin(distance[:, ::-1], axis=1)

    def map_for(self, sampling: SamplingParams) -> ConfidenceMap | None:
        if not self.maps:
            return None
        return self.maps[int(self.index(np.array([sampling.temperature]))[0])]

    def calibrate(self, logits: torch.Tensor, samplings: Sequence[SamplingParams]) -> torch.Tensor:
        """Raw confidence logits [R, K] → σ(logit / T + b) [R, K] float32, each row under its request's regime
        (σ(logit) without regimes)."""
        logits = logits.float()
        if self._tensors is None:
            return torch.sigmoid(logits)
        temps, biases = self._tensors
        if temps.device != logits.device:
            temps, biases = temps.to(logits.device), biases.to(logits.device)
            self._tensors = (temps, biases)
        width = logits.shape[1]
        if len(self.maps) == 1:
            return torch.sigmoid(logits / temps[0, :width] + biases[0, :width])
        index = torch.from_numpy(self.index(np.array([s.temperature for s in samplings]))).to(logits.device)
        return torch.sigmoid(logits / temps[index, :width] + biases[index, :width])


class SpeculationController:
    """Calibration regimes, online calibration, draft gate and verification policy for one drafter.

    regimes: {sampling temperature: ConfidenceMap or temperatures [γ]} (None: the raw head); online: an
    `OnlineCalibrator` (bound to one regime by its `sampling_temperature`, or to every request when that is
    None); gate: a `DraftGate`; policy: a `VerificationPolicy` (None: verify every proposed draft).

    Requests planned `alone` (`plan`) are calibrated under the regimes as given (never an online refit) and
    planned by `policy.alone()`, one at a time: what they verify depends on their own confidences only.
    """

    def __init__(self, *, policy: VerificationPolicy | None = None, regimes: Mapping | None = None,
                 online: OnlineCalibrator | None = None, gate: DraftGate | None = None):
        self.policy = policy
        self.online = online
        self.gate = gate
        self.set_regimes(regimes)

    # -- calibration regimes ---------------------------------------------------------------------------
    def set_regimes(self, regimes: Mapping | None) -> None:
        """Replace every regime ({sampling temperature: map}); None = the raw head."""
        self._given = self._live = CalibrationRegimes(regimes)

    def set_regime(self, sampling_temperature: float | None, cmap: ConfidenceMap) -> None:
        """Replace (or add) the live regime of one sampling temperature (an online refit); None: one map for
        every request. Requests planned alone keep the regimes given to `set_regimes`."""
        if sampling_temperature is None:
            self._live = CalibrationRegimes({1.0: cmap})
            return
        regimes = self._live.as_dict()
        regimes[float(sampling_temperature)] = cmap
        self._live = CalibrationRegimes(regimes)

    @property
    def regimes(self) -> dict[float, ConfidenceMap]:
        return self._live.as_dict()

    def map_for(self, sampling: SamplingParams) -> ConfidenceMap | None:
        """The map applied to a request sampled with `sampling` (None: its confidences are the raw head's)."""
        return self._live.map_for(sampling)

    def calibrate(self, logits: torch.Tensor, samplings: Sequence[SamplingParams]) -> torch.Tensor:
        """Raw confidence logits [R, K] → calibrated confidences σ(logit / T + b) [R, K] float32, each row
        under its request's live regime (σ(logit) without regimes)."""
        return self._live.calibrate(logits, samplings)

    # -- the step ------------------------------------------------------------------------------------
    @property
    def needs_confidences(self) -> bool:
        return self.gate is not None or (self.policy is not None and self.policy.needs_confidences) or self.online is not None

    def check_drafter(self, drafter) -> None:
        """RequestError when the policy, the gate or online calibration needs confidences the drafter lacks."""
        if drafter is None or drafter.provides_confidence:
            return
        if self.policy is not None and self.policy.needs_confidences:
            raise RequestError(
                f"policy '{self.policy.name}' chooses verification lengths from confidences, and drafter "
                f"'{drafter.name}' provides none; use a drafter with a confidence head, or no policy"
            )
        if self.gate is not None:
            raise RequestError(f"the draft gate needs confidences, and drafter '{drafter.name}' provides none")
        if self.online is not None:
            raise RequestError(f"online calibration needs confidences, and drafter '{drafter.name}' provides none")

    def should_draft(self, requests: int) -> bool:
        """Whether the drafter runs this step (the gate's decision, from earlier steps only)."""
        return self.gate is None or self.gate.should_draft(requests)

    def record_step(self, seconds: float, model_seconds: float | None = None) -> None:
        """The wall time of the step just finished and its part in the model forwards (for the gate)."""
        if self.gate is not None:
            self.gate.record_step(seconds, model_seconds)

    def plan(self, confidence_logits: torch.Tensor | None, proposed: torch.Tensor, limits: torch.Tensor,
             request_ids: Sequence[int] | None, samplings: Sequence[SamplingParams] | None = None, *,
             calibrated: torch.Tensor | None = None, alone: Sequence[bool] | None = None) -> Plan:
        """ℓ per request: proposed [R] drafts, limits [R] the most each may verify (room left), request ids
        (for policies with per-request state), from the raw head's confidence logits [R, K] calibrated under
        each request's regime (`samplings` picks it; unused with one regime) — or from confidences that are
        already calibrated (`calibrated`: recorded rounds replayed by the simulator). alone [R]: rows planned
        as if alone (class docstring); the policy sees the other rows only."""
        proposed, limits = proposed.cpu(), limits.cpu()
        full = torch.minimum(proposed, limits)
        confidences = calibrated
        if confidences is None and confidence_logits is not None:
            confidences = self.calibrate(confidence_logits, samplings or ())
        solo_rows = [] if alone is None else [i for i, a in enumerate(alone) if a]
        if solo_rows and calibrated is None and confidence_logits is not None and self._given is not self._live:
            index = torch.tensor(solo_rows, device=confidences.device)
            confidences = confidences.clone()
            confidences[index] = self._given.calibrate(confidence_logits[index], [samplings[i] for i in solo_rows])
        if self.policy is None:
            return Plan(full, confidences, full)
        ids = None if request_ids is None else list(request_ids)
        if not solo_rows:
            chosen = self.policy(confidences, proposed, limits, ids)
            return Plan(torch.minimum(chosen.to(torch.long).clamp_min(0), full), confidences, full)
        chosen = full.clone()
        shared = [i for i in range(full.numel()) if i not in set(solo_rows)]
        if shared:
            rows = torch.tensor(shared)
            picked = None if confidences is None else confidences[rows.to(confidences.device)]
            chosen[rows] = self.policy(picked, proposed[rows], limits[rows], None if ids is None else [ids[i] for i in shared])
        solo = self.policy.alone()
        for i in solo_rows:
            picked = None if confidences is None else confidences[i: i + 1]
            chosen[i] = solo(picked, proposed[i: i + 1], limits[i: i + 1], None)[0]
        return Plan(torch.minimum(chosen.to(torch.long).clamp_min(0), full), confidences, full)

    def observe(self, plan: Plan, accepted: torch.Tensor, samplings: Sequence[SamplingParams] | None = None,
                confidence_logits: torch.Tensor | None = None, *, gate: bool = True) -> None:
        """The step's outcome (accepted [R] drafts) → the gate (calibrated confidences; not when `gate` is
        False: a step it closed, drafted only for requests planned alone) and the online calibrator (the raw
        head's `confidence_logits`, rows of its regime only); a refit replaces that regime's live map from the
        next step on."""
        accepted = torch.as_tensor(accepted)
        if gate and self.gate is not None and plan.confidences is not None:
            self.gate.observe(plan.confidences.detach().float().cpu().numpy(), plan.full, plan.lengths, accepted.cpu())
        if self.online is None or confidence_logits is None:
            return
        rows = np.ones(plan.lengths.numel(), dtype=bool)
        if self.online.sampling_temperature is not None:
            rows = np.array([s.temperature == self.online.sampling_temperature for s in samplings])
            if not rows.any():
                return
        raw = torch.sigmoid(confidence_logits.detach().double()).cpu().numpy()[rows, : self.online.block_size]
        refits = self.online.refits
        self.online.observe(raw, plan.lengths.cpu().numpy()[rows], accepted.cpu().numpy()[rows])
        if self.online.refits != refits:
            self.set_regime(self.online.sampling_temperature, self.online.calibration)

    def release(self, request_id: int) -> None:
        """Forget a finished request (policies with per-request state)."""
        if self.policy is not None:
            self.policy.release(request_id)

    def report(self) -> dict:
        return {
            "policy": None if self.policy is None else repr(self.policy),
            "calibration_regimes": {t: {"temperatures": m.temperatures.tolist(), "biases": m.biases.tolist()}
                                    for t, m in self.regimes.items()},
            "online_calibration": None if self.online is None else self.online.drift_report(),
            "draft_gate": None if self.gate is None else self.gate.report(),
        }
