"""What the engine records about each compressed (or examined) linear, for the manifest, the report
and the terminal summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModuleRecord:
    """One linear as one pass left it."""

    layer: int
    name: str
    pass_name: str
    module_type: str
    shape: tuple[int, int]
    params_before: int
    params_after: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    bits_before: int = 0
    bits_after: int = 0
