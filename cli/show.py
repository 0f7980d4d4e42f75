"""What the commands print: the per-layer table, the compression summary, each metric with its protocol."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .app import console


def print_layers(report: Any) -> None:
    """One row per decoder layer (the full per-module table is in report.md)."""
    t = Table(title="per-layer summary (per-module table in report.md)", show_lines=False)
    for col in ("layer", "modules", "passes", "params before", "params after", "bits/weight", "mean error", "s"):
        t.add_column(col, justify="left" if col in ("passes",) else "right")
    for row in report.layer_rows():
        err = row["mean_error"]
        t.add_row(
            str(row["layer"]), str(row["modules"]), ",".join(row["passes"]), f"{row['params_before']:,}", f"{row['params_after']:,}",
            f"{row['bits_per_weight']:.3f}", "" if err is None else f"{err:.4g}", f"{row['seconds']:.1f}",
        )
    console.print(t)


def _protocol(p: dict[str, Any]) -> str:
    if p.get("metric") == "perplexity":
        return (
            f"{p['level']}-level, {p['dataset']} {p['split']}, seqlen {p['seqlen']}, {p['windows']}/{p['windows_available']} "
            f"windows, {p['predicted_tokens']} tokens, {p['dtype']}, {p.get('device', '')}"
        )
    return (
        f"lm-eval {p.get('lm_eval_version')}, task {p.get('task')} v{p.get('task_version')}, {p.get('n_shot')}-shot, "
        f"limit {p.get('limit')}, {p.get('samples')} samples, batch {p.get('batch_size')}, {p.get('dtype')}"
    )


def metric_line(m: dict[str, Any]) -> str:
    """One metric with its protocol (and the baseline change when measured)."""
    p = m["protocol"]
    if m.get("unit") == "tokens/s":
        vs = f"  (dense {m['baseline']:.1f}, {m['ratio']:.3f}x)" if m.get("baseline") is not None else ""
        return (f"{m['name']}: {m['value']:.1f} tokens/s{vs}  [batch {p['batch']}, prompt {p['prompt_len']}, {p['new_tokens']} decode "
                f"steps ({p['decode']}), median of {p['repeats']}, {p['threads']} threads, {p.get('device', '')}]")
    base = ""
    if m.get("baseline") is not None:
        base = f"  (dense {m['baseline']:.4f}, change {m['change']:+.2%})" if m.get("change") is not None else ""
    err = f" ± {m['stderr']:.4f}" if m.get("stderr") else ""
    return f"{m['name']} = {m['value']:.4f}{err}{base}  [{_protocol(p)}]"


def print_summary(report: Any) -> None:
    from ..report import summary_lines

    for line in summary_lines(report.summary()):
        console.print(line, markup=False, highlight=False)
    for note in report.notes:
        console.print(note, markup=False, highlight=False)
    for m in report.metrics:
        console.print(metric_line(m), markup=False, highlight=False)
    console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.timings.items()))
