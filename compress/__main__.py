"""``python -m compress ...`` (and ``torchrun --nproc-per-node N -m compress run ...``): the CLI."""

from .cli.main import main

main()
