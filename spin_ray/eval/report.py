"""An `EvalResult` as Markdown tables (one per length), JSON and a plot of accuracy against the
token budget."""

from __future__ import annotations

import json
from pathlib import Path

from spin_ray.eval.config import Setting
from spin_ray.eval.likelihood import SOURCE
from spin_ray.eval.runner import EvalResult, LengthResult


def accuracy(result: LengthResult, label: str, task: str) -> float:
    scores = result.scores[label][task]
    return sum(scores) / len(scores)


def mean_accuracy(result: LengthResult, label: str) -> float | None:
    tasks = result.scores.get(label, {})
    return sum(accuracy(result, label, t) for t in tasks) / len(tasks) if tasks else None


def mean_abs_delta(result: LengthResult, label: str) -> float | None:
    """Mean |log p(sparse) - log p(dense)| per scored token, without the first (predicted by
    the dense prefill in every setting)."""
    if label not in result.logprobs:
        return None
    mine, dense = result.logprobs[label][1:], result.logprobs["dense"][1:]
    return sum(abs(a - b) for a, b in zip(mine, dense, strict=True)) / max(1, len(mine))


def mean_nll(result: LengthResult, label: str) -> float | None:
    """Mean negative log-likelihood per scored token (the first one left out, as above)."""
    if label not in result.logprobs:
        return None
    scored = result.logprobs[label][1:]
    return -sum(scored) / max(1, len(scored))


def budget_tokens(setting: Setting, length: int) -> float:
    """The setting's budget in tokens at this length (a fraction times the length)."""
    budget = setting.token_budget
    return budget * length if isinstance(budget, float) else float(budget)


def markdown(run: EvalResult) -> str:
    config = run.config
    parts = []
    for result in run.lengths:
        head = ["setting", *config.tasks, "mean"]
        if config.scored_tokens:
            head += ["mean abs Δ log p / token", "NLL / token"]
        head.append("hit rate")
        rows = [head, ["---"] * len(head)]
        for setting in config.settings:
            label = setting.label
            row = [label] + [f"{accuracy(result, label, t):.0%}" for t in config.tasks]
            mean = mean_accuracy(result, label)
            row.append("" if mean is None else f"{mean:.0%}")
            if config.scored_tokens:
                row += [f"{mean_abs_delta(result, label):.3f}", f"{mean_nll(result, label):.3f}"]
            hit = result.hit_rates.get(label)
            row.append("" if hit is None else f"{hit:.0%}")
            rows.append(row)
        table = "\n".join("| " + " | ".join(r) + " |" for r in rows)
        cases = f"{config.samples} case(s) per task"
        scored = f", {config.scored_tokens} teacher-forced tokens of {SOURCE}"
        parts.append(f"### {result.length} tokens ({cases}{scored if config.scored_tokens else ''})"
                     f"\n\n{table}\n")  # fmt: skip
    return "\n".join(parts)


def to_json(run: EvalResult) -> dict:
    config = run.config
    return {
        "model": config.model,
        "device": config.device,
        "seconds": run.seconds,
        "samples": config.samples,
        "sink_tokens": config.sparse.sink_tokens,
        "local_tokens": config.sparse.local_tokens,
        "dense_layers": config.sparse.dense_layers,
        "likelihood_text": SOURCE if config.scored_tokens else None,
        "lengths": [
            {
                "length": r.length,
                "settings": [
                    {
                        "label": s.label,
                        "algorithm": s.algorithm,
                        "mode": s.mode,
                        "token_budget": s.token_budget,
                        "scores": r.scores[s.label],
                        "answers": r.answers[s.label],
                        "mean_accuracy": mean_accuracy(r, s.label),
                        "logprobs": r.logprobs.get(s.label),
                        "mean_abs_delta_logprob": mean_abs_delta(r, s.label),
                        "mean_nll": mean_nll(r, s.label),
                        "hit_rate": r.hit_rates.get(s.label),
                    }
                    for s in config.settings
                ],
            }
            for r in run.lengths
        ],
    }


def write_json(run: EvalResult, path: Path) -> None:
    path.write_text(json.dumps(to_json(run), indent=2) + "\n")


def plot(run: EvalResult, path: Path) -> None:
    """Mean task accuracy against the budget (tokens, log scale), a line per algorithm and
    mode, the dense reference dashed; one panel per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = run.config
    lengths = run.lengths
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.4), squeeze=False)
    for ax, result in zip(axes[0], lengths):
        lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for s in config.settings[1:]:
            point = (budget_tokens(s, result.length), mean_accuracy(result, s.label))
            lines.setdefault((s.algorithm, s.mode), []).append(point)
        for (algorithm, mode), points in lines.items():
            xs, ys = zip(*sorted(points))
            label = algorithm if mode == "spin" else f"{algorithm} ({mode})"
            ax.plot(xs, ys, marker="o", label=label)
        ax.axhline(mean_accuracy(result, "dense"), color="black", linestyle="--", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("token budget (tokens per layer and KV head)")
        ax.set_title(f"{config.model}, {result.length} tokens")
    axes[0][0].set_ylabel("mean accuracy over tasks")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
