"""The demo's results: a markdown table and a learning-curve PNG.

A learning curve is the rolling satisfaction of fresh answers (the last ``WINDOW`` of them) against
interactions, one line per method, with the rollout's promotions (▲) and rollbacks (▼) marked on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WINDOW = 30
TARGET = 0.8
POLICY_NAMES = {"tenant": "per person", "deployment": "shared"}


@dataclass
class Decision:
    interaction: int
    action: str  # promote | rollback | reject | canary | step
    version: int
    scope: str = ""


@dataclass
class MethodResult:
    method: str
    interactions: int
    curve: list[tuple[int, bool, bool]]  # (interaction, satisfied, hard) of each fresh answer, in order
    decisions: list[Decision]
    held_out: dict[str, float]  # person -> held-out satisfaction of the final stable version
    diversity: float
    stable: str
    seconds: float
    stages: dict[str, int] = field(default_factory=dict)
    # The newest version the rollout did not reject or roll back, and its held-out satisfaction: what the
    # trainer had learnt by the end, whether or not the canary had caught up with it.
    newest: str = ""
    newest_held_out: dict[str, float] = field(default_factory=dict)
    stopped_early: list[str] = field(default_factory=list)  # people whose client failed, and why
    policy: str = ""  # the scope policy, where runs compare them: "tenant" (a scope per person) or "deployment"
    per_scope: dict[str, dict[str, int]] = field(default_factory=dict)  # scope -> its stages (versions, decisions)
    serving: dict[str, str] = field(default_factory=dict)  # person -> the version serving them at the end

    @property
    def label(self) -> str:
        return f"{self.method}, {POLICY_NAMES.get(self.policy, self.policy)}" if self.policy else self.method

    def rolling(self, *, hard: bool | None = None) -> list[tuple[int, float]]:
        """(interaction, mean satisfaction of the last WINDOW fresh answers) after each fresh answer."""
        points: list[tuple[int, float]] = []
        window: list[float] = []
        for interaction, satisfied, is_hard in self.curve:
            if hard is not None and is_hard != hard:
                continue
            window = [*window[-(WINDOW - 1):], satisfied]
            if len(window) >= min(WINDOW, 10):
                points.append((interaction, sum(window) / len(window)))
        return points

    def reached(self, level: float = TARGET) -> int | None:
        """The first interaction at which rolling satisfaction (every person) reached ``level``."""
        return next((interaction for interaction, value in self.rolling() if value >= level), None)


def group_mean(scores: dict[str, float], names: Sequence[str]) -> float:
    chosen = [scores[name] for name in names if name in scores]
    return sum(chosen) / len(chosen) if chosen else float("nan")


def table(results: Sequence[MethodResult], base: MethodResult, hard: Sequence[str], easy: Sequence[str]) -> str:
    """The results as markdown: held-out satisfaction (hard, easy, each person) of the version serving at
    the end, the same (hard, easy) of the newest version, interactions to reach TARGET, diversity against
    the base model, versions, and time."""
    people = list(base.held_out)
    head = ["method", "hard (held-out)", "easy (held-out)", *people, "newest version: hard / easy",
            f"interactions to {TARGET:g}", "diversity vs base", "published / promoted / rolled back", "minutes"]
    rows = [head, ["---"] * len(head)]
    for result in [base, *results]:
        reached = result.reached()
        stages = result.stages
        rows.append([
            result.label, f"{group_mean(result.held_out, hard):.2f}", f"{group_mean(result.held_out, easy):.2f}",
            *(f"{result.held_out[name]:.2f}" for name in people),
            f"{result.newest}: {group_mean(result.newest_held_out, hard):.2f} / "
            f"{group_mean(result.newest_held_out, easy):.2f}" if result.newest else "—",
            "—" if result is base else (str(reached) if reached is not None else f"not in {result.interactions}"),
            f"{result.diversity / base.diversity:.2f}" if base.diversity else "n/a",
            "—" if result is base else f"{stages.get('published', 0)} / {stages.get('promoted', 0)} / "
                                       f"{stages.get('rolled_back', 0)}",
            "—" if result is base else f"{result.seconds / 60:.1f}",
        ])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def scope_table(results: Sequence[MethodResult]) -> str:
    """Versions published / promoted / rolled back / rejected in each scope, for each run."""
    rows = [["run", "scope", "published / promoted / rolled back / rejected", "serves at the end"],
            ["---"] * 4]
    for result in results:
        for scope, stages in result.per_scope.items():
            people = [person for person, version in result.serving.items() if scope.endswith(f".{person}")
                      or scope == "default"]
            serves = ", ".join(sorted({result.serving[person] for person in people})) or "—"
            rows.append([result.label, scope, f"{stages.get('published', 0)} / {stages.get('promoted', 0)} / "
                         f"{stages.get('rolled_back', 0)} / {stages.get('rejected', 0)}", serves])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def plot(results: Sequence[MethodResult], base: MethodResult, hard: Sequence[str], path: Path) -> Path:
    """Two panels (every preference; the hard ones), one line per method, decisions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colours = {"none": "#888888", "rl": "#1f77b4", "opd": "#ff7f0e", "combined": "#2ca02c"}
    for axis, (title, only_hard) in zip(axes, (("every preference", None), ("hard preferences", True)), strict=True):
        for result in results:
            points = result.rolling(hard=only_hard)
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            colour = colours.get(result.method, None)
            axis.plot(xs, ys, label=result.label, color=colour, linewidth=2,
                      linestyle="--" if result.policy == "deployment" else "-")
            for decision in result.decisions:
                if decision.action not in ("promote", "rollback"):
                    continue
                y = next((value for x, value in points if x >= decision.interaction), ys[-1])
                axis.plot([decision.interaction], [y], marker="^" if decision.action == "promote" else "v",
                          color=colour, markersize=8, linestyle="none")
        level = group_mean(base.held_out, list(base.held_out) if only_hard is None else hard)
        axis.axhline(level, color="#888888", linestyle=":", label="base model (held-out)")
        axis.set_title(f"{title}: rolling satisfaction of fresh answers (last {WINDOW})")
        axis.set_xlabel("interactions (model answers)")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("satisfaction")
    axes[0].legend(loc="lower right")
    figure.text(0.5, 0.005, "▲ promoted   ▼ rolled back", ha="center", fontsize=9)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path



def summary(runs: Sequence[dict[str, Any]], hard: Sequence[str], easy: Sequence[str]) -> str:
    """Mean (min–max) over runs of each method's held-out satisfaction, hard and easy, of the version serving
    at the end and of the newest sound one, and of its diversity against the base model."""
    def spread(values: list[float]) -> str:
        return f"{sum(values) / len(values):.2f} ({min(values):.2f}–{max(values):.2f})"

    labels = list(runs[0]["methods"])
    rows = [["method", "hard", "easy", "newest: hard", "newest: easy", "diversity vs base", *hard, *easy],
            ["---"] * (6 + len(hard) + len(easy))]
    for label, scores in [("base model", [run["base"] for run in runs]),
                          *((label, [run["methods"][label] for run in runs]) for label in labels)]:
        newest = [score.get("newest_held_out") or score["held_out"] for score in scores]
        diversity = [score["diversity"] / run["base"]["diversity"] for score, run in zip(scores, runs, strict=True)]
        rows.append([label, spread([group_mean(s["held_out"], hard) for s in scores]),
                     spread([group_mean(s["held_out"], easy) for s in scores]),
                     spread([group_mean(n, hard) for n in newest]), spread([group_mean(n, easy) for n in newest]),
                     spread(diversity), *(spread([s["held_out"][name] for s in scores]) for name in [*hard, *easy])])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"
