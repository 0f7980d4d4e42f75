"""``compress lm-eval``: lm-eval's own command line, with compress checkpoints readable."""

from __future__ import annotations

import typer


def lm_eval_cmd(ctx: typer.Context) -> None:
    """lm-eval's own CLI, arguments passed through unchanged, with compress checkpoints readable by
    --model hf --model_args pretrained=OUT (the local task directory is added as --include_path)."""
    from ..eval.lm_eval_cli import main as lm_eval_main

    lm_eval_main(list(ctx.args))
