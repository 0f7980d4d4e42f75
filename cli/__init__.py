"""The ``compress`` command line (installed as ``compress.cli``): thin typer commands, one library call each."""
