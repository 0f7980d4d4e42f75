"""``compress export``: write a compressed checkpoint in another format."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import typer

from ..exports import EXPORTS
from .app import out_console, setup_logging

FORMATS_HELP = "; ".join(f"{name}: {fmt.help}" for name, fmt in EXPORTS.items())

def export(
    checkpoint: Path = typer.Argument(..., help="compressed checkpoint directory"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory of the export"),
    format: str = typer.Option("dense", "--format", help=FORMATS_HELP),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Export a compressed checkpoint to another format."""
    from .. import api
    from ..adapters import get_adapter
    from ..checkpoint import MANIFEST, read_manifest
    from ..errors import CompressError
    from ..exports import get_export
    from ..fsutil import atomic_directory, writing
    from ..planning.checks import check_output_dir, check_writable

    setup_logging(False)
    ex = get_export(format)
    single = format == "gguf" and out.suffix == ".gguf"  # the file itself rather than a folder holding it
    if single and out.is_dir():
        raise CompressError(f"--out '{out}' is a directory; name the .gguf file to write, or a directory without the .gguf suffix")
    if single and out.exists() and not overwrite:
        raise CompressError(f"output file '{out}' exists; choose another --out or pass --overwrite")
    if not single:
        check_output_dir(out, overwrite, keep=(checkpoint,))
    else:
        check_writable(out, "--out")
    manifest = read_manifest(checkpoint) if (Path(checkpoint) / MANIFEST).is_file() else {}  # save_pretrained writes none
    source = str(manifest.get("source", {}).get("source") or checkpoint)
    m, tok = api.load(checkpoint)
    layers_path = get_adapter(m).layers_path
    ex.check_model(m, layers_path)
    need = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    folder = out.with_name(out.name + ".parts") if single else out
    with writing(out, need, "nothing was written: free space and rerun the same command"), atomic_directory(folder, overwrite=True if single else overwrite) as tmp:
        ex.write(m, tok, tmp, layers_path, source)
        if single:
            (written,) = tmp.glob("*.gguf")
            os.replace(written, out)  # the same file system: the file appears complete or not at all
    if single:
        shutil.rmtree(folder, ignore_errors=True)
    out_console.print(f"wrote {out}")
