"""Errors name the flags of the command that was run.

The library spells an option in its messages as ``compress run`` does (``--ppl-seqlen 512``,
``--calib-samples``, ``--export``). Each other command declares here how it spells the options it
takes differently (the sweep takes the evaluation settings inside ``--eval``; ``compress export``
names its format ``--format``); :func:`respell` rewrites a message for the command that was run.
``tests/test_bad_inputs.py`` walks the refusals of every command and looks each flag a message
names up in that command's own parser.
"""

from __future__ import annotations

import re

from compress.evalspec import EvalSpec


def _in_eval(field: str) -> str:
    return f"--eval {field}="


#: command → {flag as compress run spells it: how this command spells it (a trailing "=" takes the value)}
_EVAL_FIELDS = {EvalSpec.run_where(f.name): f.name for f in EvalSpec.fields()}
SPELLING: dict[str, dict[str, str]] = {
    "sweep": {flag: _in_eval(field) for flag, field in _EVAL_FIELDS.items()},
    "eval": {EvalSpec.run_where("batch_size"): "--batch-size"},
    "export": {"--export": "--format"},
}


#: what may follow a flag as its value in a message: a number, a dataset or a task name
_VALUE = r"\d[\d.]*|wikitext2|c4|ptb|[a-z0-9]+_[a-z0-9_]+"


def respell(command: str | None, message: str) -> str:
    """``message`` with each flag spelled as ``command`` takes it."""
    table = SPELLING.get(command or "", {})
    if not table:
        return message
    pattern = re.compile(r"(?<![\w-])(" + "|".join(re.escape(f) for f in sorted(table, key=len, reverse=True)) + r")(?![\w-])(?: (" + _VALUE + r"))?(?![\w.])")

    def sub(m: re.Match[str]) -> str:
        spelled = table[m.group(1)]
        value = m.group(2)
        if spelled.endswith("="):
            return f"{spelled}{value}" if value is not None else spelled
        return spelled if value is None else f"{spelled} {value}"

    return pattern.sub(sub, message)


def command_of(argv: list[str], commands: set[str]) -> str | None:
    """The command a ``compress`` command line runs (its first word that names one)."""
    return next((a for a in argv if a in commands), None)
