"""Loops: the same tool call or the same prompt repeated in a run, A-B-A-B cycles, too many LLM calls.

Calls of one tool with different arguments are normal work (a search refined step by step) and
are not loops unless they cycle, or (when `near_repeat_threshold` is set) differ only in the numbers
inside their texts (`q #1`, `q #2`, `q #3`: near repeats). Exact repeats count anywhere in the run,
not only consecutively (CrewAI itself only refuses an immediate repeat, research/peers.md §3).
"""

from __future__ import annotations

from collections import Counter

from crewguard.settings import BudgetSettings
from crewguard.settings import LoopDetector as LoopSettings
from crewguard.supervisor.model import LLM, TOOL, Finding, Observation, Snapshot

#: Cycle periods looked for (A-B, A-B-C); period 1 is an exact repeat.
CYCLE_PERIODS = (2, 3)

Signature = tuple[str, str, str]


class LoopDetector:
    def __init__(self, cfg: LoopSettings, budgets: BudgetSettings) -> None:
        self.repeat_threshold = cfg.repeat_threshold
        self.cycle_min_repeats = cfg.cycle_min_repeats
        self.near_repeat_threshold = cfg.near_repeat_threshold
        self.max_llm_calls = budgets.max_llm_calls

    def detect(self, snapshot: Snapshot) -> list[Finding]:
        findings: list[Finding] = []
        for run_id, obs in snapshot.observations.items():
            run = snapshot.runs.get(run_id)
            if run is None:
                continue
            ids = {"run_id": run_id, "job_id": run.job_id, "email_key": run.email_key}
            tools: list[Signature] = [
                ("tool", o.tool or o.name, o.args_key or "") for o in obs if o.kind == TOOL
            ]
            prompts: list[Signature] = [
                # a failed call (429, 5xx, timeout) retried with the same prompt is a retry, not a loop
                ("prompt", o.model or "", o.prompt_sha)
                for o in obs
                if o.kind == LLM and o.prompt_sha and o.error is None
            ]
            repeat = self._worst_repeat(tools + prompts)
            if repeat is not None:
                (what, name, key), n = repeat
                label = f"tool {name}" if what == "tool" else "prompt"
                findings.append(
                    Finding(
                        kind="loop",
                        dedupe_key=f"loop:{run_id}",
                        summary=f"loop: the same {label} call repeated {n} times in run {run_id}",
                        action="kill",
                        evidence={"pattern": "repeat", "what": what, "name": name, "key": key, "count": n},
                        **ids,
                    )
                )
            elif (near := self._worst_near_repeat(obs)) is not None:
                (name, shape), n = near
                findings.append(
                    Finding(
                        kind="loop",
                        dedupe_key=f"loop:{run_id}",
                        summary=f"loop: tool {name} called with {n} arguments differing only in numbers in run {run_id}",
                        action="kill",
                        evidence={"pattern": "near_repeat", "name": name, "shape": shape, "count": n},
                        **ids,
                    )
                )
            else:
                cycle = find_cycle(tools, self.cycle_min_repeats)
                if cycle is not None:
                    pattern, repeats = cycle
                    names = "-".join(sig[1] for sig in pattern)
                    findings.append(
                        Finding(
                            kind="loop",
                            dedupe_key=f"loop:{run_id}",
                            summary=f"loop: tool cycle {names} repeated {repeats} times in run {run_id}",
                            action="kill",
                            evidence={
                                "pattern": "cycle",
                                "period": len(pattern),
                                "repeats": repeats,
                                "calls": [{"tool": s[1], "key": s[2]} for s in pattern],
                            },
                            **ids,
                        )
                    )
            llm_calls = max(run.llm_calls, sum(1 for o in obs if o.kind == LLM))
            if llm_calls > self.max_llm_calls:
                findings.append(
                    Finding(
                        kind="budget",
                        dedupe_key=f"budget:{run_id}",
                        summary=f"budget: {llm_calls} LLM calls in run {run_id} (max {self.max_llm_calls})",
                        action="kill",
                        evidence={"limit": "max_llm_calls", "value": llm_calls, "max": self.max_llm_calls},
                        **ids,
                    )
                )
        return findings

    def _worst_near_repeat(self, obs: list[Observation]) -> tuple[tuple[str, str], int] | None:
        """The tool whose calls carry the most distinct arguments that are equal once numbers are blanked."""
        if self.near_repeat_threshold <= 0:
            return None
        variants: dict[tuple[str, str], set[str]] = {}
        for o in obs:
            if o.kind == TOOL and o.args_shape and o.args_key:
                variants.setdefault((o.tool or o.name, o.args_shape), set()).add(o.args_key)
        if not variants:
            return None
        sig, keys = max(variants.items(), key=lambda item: len(item[1]))
        return (sig, len(keys)) if len(keys) >= self.near_repeat_threshold else None

    def _worst_repeat(self, signatures: list[Signature]) -> tuple[Signature, int] | None:
        if len(signatures) < self.repeat_threshold:
            return None
        sig, n = Counter(signatures).most_common(1)[0]
        return (sig, n) if n >= self.repeat_threshold else None


def find_cycle(seq: list[Signature], min_repeats: int) -> tuple[list[Signature], int] | None:
    """The longest run of a pattern of period 2..3 (not all one call) repeated >= min_repeats times."""
    best: tuple[list[Signature], int] | None = None
    for period in CYCLE_PERIODS:
        if len(seq) < period * min_repeats:
            continue
        # streak[i]: how many consecutive positions up to i satisfy seq[j] == seq[j - period].
        streak = 0
        for i in range(period, len(seq)):
            streak = streak + 1 if seq[i] == seq[i - period] else 0
            repeats = (streak + period) // period
            if repeats >= min_repeats:
                pattern = seq[i - period + 1 : i + 1]
                if len(set(pattern)) < 2:
                    continue  # A-A-A-A is an exact repeat, not a cycle
                if best is None or repeats > best[1]:
                    best = (pattern, repeats)
    return best
