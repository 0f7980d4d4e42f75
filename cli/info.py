"""Introspection commands: ``compress ls``, ``compress env``, ``compress validate``."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import CompressError
from .app import app, out_console


@app.command("ls")
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
            groups = " -> ".join("[" + ", ".join(g) + "]" for g in a.sequential_groups)
            out_console.print(f"[bold]{a.name}[/bold]: model types {', '.join(a.model_types)}; layers {a.layers_path}; groups {groups}")
        out_console.print("[bold]generic[/bold]: any other decoder; every nn.Linear in the decoder layers, one group")
    else:
        raise CompressError(f"unknown listing '{what}'; use 'compress ls passes' or 'compress ls adapters'")


@app.command()
def env(build: bool = typer.Option(False, "--build", help="compile the CUDA kernels now (needs CUDA and nvcc)")) -> None:
    """Report torch, CUDA and which compiled kernels are available (and why not)."""
    import platform

    import torch

    from ..kernels import build as kb
    from ..kernels.ops import default_preference

    rows = [
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device (CPU only)"),
        ("nvcc", kb.find_nvcc() or "not found"),
        ("kernel preference", f"{default_preference()} (COMPRESS_KERNELS=auto|torch|cuda)"),
        ("kernel sources", str(kb.csrc_dir())),
        ("kernel cache", str(kb.cache_dir())),
    ]
    if build:
        kb.load(verbose=True)
    st = kb.status()
    state = "available" if st.available else "unavailable"
    for op in ("bcq_linear (LUT-GEMM)", "sparse24_linear (2:4)"):
        rows.append((op, f"CUDA kernel {state}: {st.reason}; PyTorch implementation always available"))
    if st.log is not None:
        rows.append(("build log", str(st.log)))
    for k, v in rows:
        out_console.print(f"[bold]{k:>22}[/bold]  {v}", highlight=False, soft_wrap=True)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="recipe YAML")) -> None:
    """Check a recipe file without running it: its passes, their options and their order."""
    from ..calib.data import CalibConfig
    from ..planning.order import check_order
    from ..recipe import load_recipe

    rec = load_recipe(recipe)
    check_order([spec.build() for spec in rec.passes])
    CalibConfig.from_dict(rec.calibration, where=lambda f: f"calibration: {f} of the recipe", what="recipe calibration")
    out_console.print(rec.to_yaml(), highlight=False)
    out_console.print("recipe is valid")


@app.command("lm-eval", add_help_option=False, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lm_eval_cmd(ctx: typer.Context) -> None:
    """lm-eval's own CLI, arguments passed through unchanged, with compress checkpoints readable by
    --model hf --model_args pretrained=OUT (the local task directory is added as --include_path)."""
    from ..eval.lm_eval_cli import main as lm_eval_main

    lm_eval_main(list(ctx.args))
