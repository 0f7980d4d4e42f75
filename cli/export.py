"""``compress export``: write a compressed checkpoint in another format."""

from __future__ import annotations

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
    from ..exports import get_export
    from ..fsutil import atomic_directory, writing
    from ..planning.checks import check_output_dir

    setup_logging(False)
    ex = get_export(format)
    check_output_dir(out, overwrite, keep=(checkpoint,))
    manifest = read_manifest(checkpoint) if (Path(checkpoint) / MANIFEST).is_file() else {}  # save_pretrained writes none
    source = str(manifest.get("source", {}).get("source") or checkpoint)
    m, tok = api.load(checkpoint)
    layers_path = get_adapter(m).layers_path
    ex.check_model(m, layers_path)
    need = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    with writing(out, need, "nothing was written: free space and rerun the same command"), atomic_directory(out, overwrite=overwrite) as tmp:
        ex.write(m, tok, tmp, layers_path, source)
    out_console.print(f"wrote {out}")
