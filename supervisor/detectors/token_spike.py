"""Token spikes and budgets: runs over their token/cost budget (kill), single calls far above a robust
baseline (page; kill when the run is also over budget), and a fleet token rate far above its own.

Baselines use median + MAD, so the spike being measured (or a few earlier ones) cannot drag the
baseline up the way a mean would.
"""

from __future__ import annotations

from crewguard.settings import BudgetSettings, Price
from crewguard.settings import TokenSpikeDetector as SpikeSettings
from crewguard.supervisor.model import LLM, ActiveRun, Finding, Observation, Snapshot, median_mad

#: Scale factor that makes the MAD estimate the standard deviation of normal data.
MAD_TO_SIGMA = 1.4826
#: The spread is at least this fraction of the median (identical calls would otherwise give MAD 0).
MIN_SPREAD_FRACTION = 0.25
#: A run's own earlier calls form its baseline once there are this many.
MIN_RUN_BASELINE_CALLS = 3
#: Otherwise the fleet's recent calls do, once there are this many.
MIN_FLEET_BASELINE_CALLS = 10
#: The fleet rate is compared with its history once this many earlier minutes are known.
MIN_FLEET_HISTORY_MINUTES = 5


def spike_threshold(baseline: list[int], factor: float) -> float:
    med, mad = median_mad(baseline)
    spread = max(MAD_TO_SIGMA * mad, MIN_SPREAD_FRACTION * med, 1.0)
    return med + factor * spread


class TokenSpikeDetector:
    def __init__(self, cfg: SpikeSettings, budgets: BudgetSettings, prices: dict[str, Price]) -> None:
        self.cfg = cfg
        self.budgets = budgets
        self.prices = prices

    def detect(self, snapshot: Snapshot) -> list[Finding]:
        findings: list[Finding] = []
        fleet_baseline = snapshot.fleet.recent_tokens()
        for run_id, run in snapshot.runs.items():
            obs = snapshot.observations.get(run_id, [])
            over = self._over_budget(run, obs)
            ids = {"run_id": run_id, "job_id": run.job_id, "email_key": run.email_key}
            if over is not None:
                findings.append(
                    Finding(kind="budget", dedupe_key=f"budget:{run_id}", action="kill", **over, **ids)
                )
            if obs:
                spike = self._call_spike(obs, fleet_baseline)
                if spike is not None:
                    ob, threshold, source = spike
                    findings.append(
                        Finding(
                            kind="token_spike",
                            dedupe_key=f"token_spike:{run_id}",
                            summary=(
                                f"token spike: one {ob.model or 'LLM'} call used {ob.total_tokens} tokens "
                                f"in run {run_id} (baseline threshold {threshold:.0f}, {source})"
                            ),
                            action="kill" if over is not None else "page",
                            evidence={
                                "span_id": ob.span_id,
                                "tokens": ob.total_tokens,
                                "threshold": round(threshold),
                                "baseline": source,
                            },
                            **ids,
                        )
                    )
        fleet = self._fleet_rate(snapshot)
        if fleet is not None:
            findings.append(fleet)
        return findings

    def _over_budget(self, run: ActiveRun, obs: list[Observation]) -> dict | None:
        llm = [o for o in obs if o.kind == LLM]
        tokens = max(run.prompt_tokens + run.completion_tokens, sum(o.total_tokens for o in llm))
        cost = max(run.cost_usd, sum(self._cost(o) for o in llm))
        if tokens > self.budgets.max_tokens:
            return {
                "summary": f"budget: run {run.run_id} used {tokens} tokens (max {self.budgets.max_tokens})",
                "evidence": {"limit": "max_tokens", "value": tokens, "max": self.budgets.max_tokens},
            }
        if cost > self.budgets.max_cost_usd:
            return {
                "summary": f"budget: run {run.run_id} cost ${cost:.4f} (max ${self.budgets.max_cost_usd:.4f})",
                "evidence": {
                    "limit": "max_cost_usd",
                    "value": round(cost, 6),
                    "max": self.budgets.max_cost_usd,
                },
            }
        return None

    def _cost(self, ob: Observation) -> float:
        price = self.prices.get(ob.model or "")
        if price is None:
            return 0.0
        return (
            ob.prompt_tokens / 1000 * price.prompt_per_1k
            + ob.completion_tokens / 1000 * price.completion_per_1k
        )

    def _call_spike(
        self, obs: list[Observation], fleet_baseline: list[int]
    ) -> tuple[Observation, float, str] | None:
        done = [o for o in obs if o.kind == LLM and o.ended_at is not None]
        worst: tuple[Observation, float, str] | None = None
        for i, ob in enumerate(done):
            if ob.total_tokens < self.cfg.min_call_tokens:
                continue
            earlier = [o.total_tokens for o in done[:i]]
            if len(earlier) >= MIN_RUN_BASELINE_CALLS:
                baseline, source = earlier, "run"
            elif len(fleet_baseline) >= MIN_FLEET_BASELINE_CALLS:
                baseline, source = fleet_baseline, "fleet"
            else:
                continue
            threshold = spike_threshold(baseline, self.cfg.call_factor)
            if ob.total_tokens > threshold and (worst is None or ob.total_tokens > worst[0].total_tokens):
                worst = (ob, threshold, source)
        return worst

    def _fleet_rate(self, snapshot: Snapshot) -> Finding | None:
        current, history = snapshot.fleet.tokens_per_minute(snapshot.now)
        if current < self.cfg.fleet_min_tokens_per_min or len(history) < MIN_FLEET_HISTORY_MINUTES:
            return None
        med, _mad = median_mad(history)
        if current <= self.cfg.fleet_rate_factor * max(med, 1.0):
            return None
        return Finding(
            kind="token_spike",
            dedupe_key="token_spike:fleet",
            summary=f"fleet token rate {current}/min is {current / max(med, 1.0):.1f}x its median of {med:.0f}/min",
            action="page",
            evidence={"tokens_last_minute": current, "median_per_minute": med, "minutes": len(history)},
        )
