"""Quality evaluation: perplexity on plain text and zero-shot task accuracy."""

from quantize.eval.perplexity import load_eval_ids, perplexity
from quantize.eval.zeroshot import TASKS, evaluate_tasks

__all__ = ["TASKS", "evaluate_tasks", "format_table", "load_eval_ids", "perplexity"]


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Render {task: {metric: value}} as an aligned plain-text table, one metric per line."""
    lines = [("task", "metric", "value")]
    for task, metrics in rows.items():
        lines += [(task, metric, f"{value:.4f}") for metric, value in metrics.items()]
    widths = [max(len(line[col]) for line in lines) for col in range(3)]
    return "\n".join(f"{t:<{widths[0]}}  {m:<{widths[1]}}  {v:>{widths[2]}}" for t, m, v in lines)
