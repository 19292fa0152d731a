"""The demo's results: a markdown table and a learning-curve PNG.

A learning curve is the rolling satisfaction of fresh answers (the last ``WINDOW`` of them) against
interactions, one line per method, with the rollout's promotions (▲) and rollbacks (▼) marked on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

WINDOW = 30
TARGET = 0.8


@dataclass
class Decision:
    interaction: int
    action: str  # promote | rollback | reject | canary | step
    version: int


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
            result.method, f"{group_mean(result.held_out, hard):.2f}", f"{group_mean(result.held_out, easy):.2f}",
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
            axis.plot(xs, ys, label=result.method, color=colour, linewidth=2)
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

