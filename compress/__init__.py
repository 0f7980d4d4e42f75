"""compress: post-training compression of Hugging Face causal LMs.

``from compress import compress, load``. Importing the package registers its checkpoint format with
transformers (when transformers is first imported), so ``AutoModelForCausalLM.from_pretrained`` opens
compressed checkpoints. Heavy or optional packages (transformers, lm-eval, CUDA extensions) are
imported only when a function needs them.
"""

from __future__ import annotations

from typing import Any

from .hf_format import install as _install_format
from .version import __version__

_install_format()  # AutoModelForCausalLM.from_pretrained opens compress checkpoints (registered when transformers loads)

__all__ = ["__version__", "plan", "compress", "load", "run", "execute", "evaluate", "sweep", "CalibConfig", "EvalSpec", "RunPlan",
           "CompressError"]


def __getattr__(name: str) -> Any:
    if name in ("plan", "compress", "load", "run", "execute", "evaluate", "EvalSpec", "RunPlan"):
        from . import api

        return getattr(api, name)
    if name == "sweep":
        from .sweeps import sweep

        return sweep
    if name == "CalibConfig":
        from .calib.data import CalibConfig

        return CalibConfig
    if name == "CompressError":
        from .errors import CompressError

        return CompressError
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
