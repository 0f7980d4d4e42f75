"""What to measure after compression: perplexity datasets and lm-eval tasks, with their settings.

:class:`EvalSpec` is an option set like the pass configs (:mod:`compress.config`): its fields carry
their help, range and flags, the CLI's options are generated from them, and an error names the
option as the user gave it (``--eval-batch-size`` on ``compress run``, ``--batch-size`` on
``compress eval``, ``--eval batch_size=`` in the ``--eval`` text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Options, Where, option
from .errors import CompressError


@dataclass
class EvalSpec(Options):
    """What to measure after compression: perplexity datasets and lm-eval tasks, with their settings."""

    ppl: tuple[str, ...] = option((), "perplexity dataset(s): wikitext2, c4, ptb", flag="--ppl", cli="repeat")
    tasks: tuple[str, ...] = option((), "lm-eval tasks, comma-separated (e.g. arc_easy,piqa)", flag="--tasks")
    ppl_seqlen: int = option(2048, "perplexity window length", min=1, flag="--ppl-seqlen")
    max_windows: int | None = option(None, "evaluate only the first N perplexity windows", min=1, flag="--max-windows")
    limit: float | None = option(None, "lm-eval: at most N examples per task (or a fraction below 1)", min=0.0, min_open=True, flag="--limit")
    num_fewshot: int | None = option(None, "lm-eval: few-shot examples", min=0, flag="--num-fewshot")
    batch_size: int = option(8, "lm-eval batch size", min=1, flag="--batch-size", run_flag="--eval-batch-size")
    tasks_dir: str | None = option(None, "local lm-eval task YAMLs (else $COMPRESS_TASKS_DIR, else <data dir>/lm_eval_tasks)", flag="--tasks-dir")

    def validate(self) -> None:
        super().validate()
        if self.limit is not None and self.limit >= 1 and self.limit == int(self.limit):
            self.limit = int(self.limit)  # a count of examples (lm-eval takes an int), else a fraction

    def __bool__(self) -> bool:
        return bool(self.ppl or self.tasks)

    @classmethod
    def run_where(cls, field: str) -> str:
        """How ``compress run`` names a field: its flag there."""
        md = next(f.metadata for f in cls.fields() if f.name == field)
        return str(md.get("run_flag") or md["flag"])

    def cli_args(self) -> str:
        """The ``compress eval`` options that measure the same thing."""
        parts = [f"--ppl {p}" for p in self.ppl]
        if self.ppl:
            parts.append(f"--ppl-seqlen {self.ppl_seqlen}")
            if self.max_windows is not None:
                parts.append(f"--max-windows {self.max_windows}")
        if self.tasks:
            parts.append(f"--tasks {','.join(self.tasks)}")
            for flag, v in (("--limit", self.limit), ("--num-fewshot", self.num_fewshot), ("--tasks-dir", self.tasks_dir)):
                if v is not None:
                    parts.append(f"{flag} {v}")
            parts.append(f"--batch-size {self.batch_size}")
        return " ".join(parts)

    @classmethod
    def parse(cls, text: str, where: Where | None = None) -> "EvalSpec":
        """``"tasks=arc_easy,piqa;ppl=wikitext2;limit=200"`` → EvalSpec (errors name ``--eval key=``)."""
        return cls.from_dict(cls.parse_items(text), where=where or (lambda f: f"--eval {f}="), what="--eval")

    @classmethod
    def parse_items(cls, text: str) -> dict[str, Any]:
        """The ``key=value`` items of an ``--eval`` text, unconverted."""
        fields: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, eq, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if not eq:
                raise CompressError(f"--eval item '{part}' is not key=value (example: \"tasks=arc_easy,piqa;ppl=wikitext2\")")
            fields[key] = value.strip()
        return fields

    @classmethod
    def unknown_message(cls, unknown: list[str], what: str) -> str:
        keys = ", ".join(f.name for f in cls.fields())
        return f"unknown {what or 'evaluation'} key '{unknown[0]}'; use {keys}"
