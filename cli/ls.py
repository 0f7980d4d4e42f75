"""``compress ls``: the registered passes with every option, or the architecture adapters."""

from __future__ import annotations

import typer
from rich.markup import escape

from ..errors import CompressError
from .app import out_console


def ls(what: str = typer.Argument("passes", help="passes or adapters")) -> None:
    """List the registered passes (with every option) or the architecture adapters."""
    from ..config import describe_field

    if what == "passes":
        from ..passes.base import lifecycle
        from ..registry import all_passes

        for name, cls in all_passes().items():
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            p = cls(cls.config_cls())
            caps = p.caps
            flags = ["calibration" if caps.requires_calibration else "data-free with its defaults", lifecycle(p)]
            if caps.statistics:
                flags.append("statistics " + "+".join(sorted(caps.statistics)))
            out_console.print(f"[bold]{name}[/bold]  ({', '.join(flags)})  {doc}")
            for f in cls.config_cls.fields():
                out_console.print(f"    {f.name}: {describe_field(f)}", highlight=False)
    elif what == "adapters":
        from ..adapters import ADAPTERS

        for a in ADAPTERS:
            groups = escape(" -> ".join("[" + ", ".join(g) + "]" for g in a.sequential_groups))
            out_console.print(f"[bold]{a.name}[/bold]: model types {', '.join(a.model_types)}; layers {a.layers_path}; groups {groups}")
        out_console.print("[bold]generic[/bold]: any other decoder; every nn.Linear in the decoder layers, one group")
    else:
        raise CompressError(f"unknown listing '{what}'; use 'compress ls passes' or 'compress ls adapters'")
