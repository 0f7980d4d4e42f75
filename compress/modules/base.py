"""The base of every compressed module, and the registry the checkpoint reads.

A compressed module stands in for one ``nn.Linear``. It describes itself (:meth:`spec`, JSON), is
rebuilt empty from that description (:meth:`from_spec`) before a checkpoint's weights load, and
multiplies itself out (:meth:`dense_weight`) for the dense export. Subclasses register themselves
by class name when they are defined (``class FooLinear(CompressedLinear)``), so the checkpoint,
the report and the passes never keep a list of types by hand.

Helpers shared by several module types (caches of a dequantized weight or of a kernel layout) live
here too, so that module files do not import each other.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

#: compressed module types by class name, as written in the checkpoint manifest
MODULE_TYPES: dict[str, type["CompressedLinear"]] = {}


@dataclass(frozen=True)
class QuantPart:
    """A matrix of a compressed module that a quantization pass may quantize in its place.

    ``matrix(group)`` gives the matrix to quantize for a group size (a part that does not multiply the
    layer's input, such as a dictionary's coefficient values, lays its values out in rows of
    ``group``); ``reads_input``: the part multiplies the layer's input, so the input statistics
    (GPTQ's Gram matrix) apply to it, and it is grouped per output channel along its input."""

    name: str
    matrix: Callable[[int], torch.Tensor]
    reads_input: bool


class CompressedLinear(nn.Module):
    """A module computing y = x·Wᵀ (+ b) from a compressed representation of W."""

    #: the weight is held in buffers (codes, packed values), not parameters: parameter counts add
    #: :meth:`num_weights` for such modules
    weights_in_buffers: ClassVar[bool] = False
    #: the kept values are stored in the packed 2:4 form (a later pass must not densify them)
    is_sparse_24: ClassVar[bool] = False
    #: type name of the module this one becomes once its parts are quantized (None: no quantizable parts)
    quantized_as: ClassVar[str | None] = None
    #: the preference its kernel ops run with (None: ``COMPRESS_KERNELS``; see :func:`use_kernels`)
    kernel_preference: str | None = None
    in_features: int
    out_features: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__name__
        if name in MODULE_TYPES and MODULE_TYPES[name] is not cls:
            raise KeyError(f"compressed module type {name!r} is already registered by {MODULE_TYPES[name].__module__}")
        MODULE_TYPES[name] = cls

    def dense_weight(self) -> torch.Tensor:
        """The (d_out, d_in) weight of the equivalent nn.Linear."""
        raise NotImplementedError

    def kernels(self) -> str:
        """The kernel preference this module's ops run with."""
        from ..kernels.ops import default_preference

        return self.kernel_preference or default_preference()

    def num_weights(self) -> int:
        """Weights the module counts as its parameters (biases excluded): its stored parameters by
        default (a low-rank layer's factors); quantized and packed types count the d_out·d_in weights
        their codes represent."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.endswith("bias"))

    def storage_bits(self) -> int:
        """Bits the weight occupies as stored (bias excluded)."""
        return sum(8 * p.numel() * p.element_size() for n, p in self.named_parameters() if not n.endswith("bias"))

    def spec(self) -> dict[str, Any]:
        """JSON description from which :meth:`from_spec` rebuilds an empty module of the same shapes."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device: torch.device | str = "cpu") -> "CompressedLinear":
        raise NotImplementedError

    def quantizable_parts(self) -> list[QuantPart]:
        """The parts a quantization pass quantizes in place of the whole weight (with ``quantized_as``)."""
        return []

    def with_quantized_parts(self, parts: dict[str, nn.Module]) -> "CompressedLinear":
        """This module with each part replaced by its quantized module (keyed by part name)."""
        raise NotImplementedError(f"{type(self).__name__} has no quantizable parts")


def module_spec(m: nn.Module) -> dict[str, Any]:
    """{"type", "spec"} of a plain or compressed linear (nested specs, e.g. a LoRA branch's factors)."""
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "spec": {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}}
    return {"type": type(m).__name__, "spec": m.spec()}  # type: ignore[operator]


def build_module(entry: dict[str, Any], dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild an empty module from :func:`module_spec`'s description."""
    if entry["type"] == "Linear":
        s = entry["spec"]
        return nn.Linear(s["in_features"], s["out_features"], bias=s["bias"], dtype=dtype, device=device)
    cls = MODULE_TYPES.get(entry["type"])
    if cls is None:
        raise KeyError(entry["type"])
    return cls.from_spec(entry["spec"], dtype=dtype, device=device)


def dense_weight_of(m: nn.Module) -> torch.Tensor:
    """The weight of a plain linear, or a compressed module multiplied out."""
    return m.weight if isinstance(m, nn.Linear) else m.dense_weight()  # type: ignore[operator]


def weight_count(module: nn.Module) -> int:
    """Weights a (compressed) linear represents: parameters, or the codes of a quantized layer (bias excluded)."""
    if isinstance(module, CompressedLinear):
        return int(module.num_weights())
    return sum(p.numel() for n, p in module.named_parameters() if not n.endswith("bias"))


def storage_bits(module: nn.Module) -> int:
    """Bits the weight of a (compressed) linear occupies as stored (bias excluded)."""
    if isinstance(module, CompressedLinear):
        return int(module.storage_bits())
    return sum(8 * p.numel() * p.element_size() for n, p in module.named_parameters() if not n.endswith("bias"))


def is_compressed(module: nn.Module) -> bool:
    return isinstance(module, CompressedLinear)


#: environment variable: "1" keeps the CPU dense-weight cache everywhere, "0" nowhere; unset, it is
#: kept only inside :func:`dense_cache` scopes (compress's own calibration and evaluation loops)
DENSE_CACHE_ENV = "COMPRESS_DENSE_CACHE"
#: attribute (in a module's ``__dict__``) counting the :func:`dense_cache` scopes the module is in
_SCOPE = "_dense_cache_scopes"


def dense_cache_enabled(module: nn.Module) -> bool:
    forced = os.environ.get(DENSE_CACHE_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return module.__dict__.get(_SCOPE, 0) > 0


@contextmanager
def dense_cache(root: nn.Module) -> Iterator[None]:
    """Within this scope the modules under ``root`` on the CPU keep their dequantized weight between
    forwards (a loop that re-runs every layer many times: calibration, perplexity, lm-eval tasks);
    a module put into ``root`` meanwhile through :func:`adopt_scope` joins it. Leaving the outermost
    scope drops every cache under ``root``, so a model handed back to the caller holds only its
    compressed tensors (unless ``COMPRESS_DENSE_CACHE=1``)."""
    for m in root.modules():
        m.__dict__[_SCOPE] = m.__dict__.get(_SCOPE, 0) + 1
    try:
        yield
    finally:
        for m in root.modules():
            left = m.__dict__.pop(_SCOPE, 1) - 1
            if left > 0:
                m.__dict__[_SCOPE] = left
        if root.__dict__.get(_SCOPE, 0) == 0 and os.environ.get(DENSE_CACHE_ENV) != "1":
            drop_caches(root)


def adopt_scope(parent: nn.Module, child: nn.Module) -> None:
    """``child`` is being put into ``parent``: it joins the :func:`dense_cache` scopes ``parent`` is in."""
    scopes = parent.__dict__.get(_SCOPE, 0)
    for m in child.modules():
        if scopes:
            m.__dict__[_SCOPE] = scopes
        else:
            m.__dict__.pop(_SCOPE, None)


def cached_dense_weight(module: nn.Module, buffers: tuple[str, ...]) -> torch.Tensor:
    """The module's dequantized weight. On the CPU, inside a :func:`dense_cache` scope (or with
    ``COMPRESS_DENSE_CACHE=1``), it is kept between calls (built at the layer's first forward, never
    at load) and rebuilt whenever a storage buffer was replaced or modified in place; elsewhere, and
    always on accelerators, it is rebuilt each call, so the packed form stays the only copy."""
    tensors = [getattr(module, b) for b in buffers]
    if tensors[0].device.type != "cpu" or not dense_cache_enabled(module):
        return module.dense_weight()  # type: ignore[operator]
    key = tuple((t.data_ptr(), t._version) for t in tensors)
    cache = module.__dict__.get("_dense_cache")
    if cache is None or cache[0] != key:
        cache = (key, module.dense_weight().detach())  # type: ignore[operator]
        module.__dict__["_dense_cache"] = cache
    return cache[1]


def drop_caches(root: nn.Module) -> None:
    """Forget every module's cached dense weight and kernel layout (a streamed layer that is
    written and dropped must not keep its dense weights alive through them)."""
    for m in root.modules():
        m.__dict__.pop("_dense_cache", None)
        m.__dict__.pop("_kernel_layout", None)


def cached_kernel_layout(module: nn.Module, buffers: tuple[str, ...], build: Callable[[], Any]) -> Any:
    """A kernel's layout of the module's weight, kept between calls and rebuilt whenever a storage
    buffer was replaced, moved or modified in place."""
    tensors = [getattr(module, b) for b in buffers]
    key = tuple((t.data_ptr(), t._version, t.device) for t in tensors)
    cache = module.__dict__.get("_kernel_layout")
    if cache is None or cache[0] != key:
        with torch.no_grad():
            cache = (key, build())
        module.__dict__["_kernel_layout"] = cache
    return cache[1]


def use_kernels(model: nn.Module, preference: str | None) -> None:
    """Set the kernel preference (auto, torch or cuda; None: ``COMPRESS_KERNELS``) of every compressed
    module of ``model``."""
    from ..kernels.ops import check_preference

    if preference is not None:
        check_preference(preference)
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            m.kernel_preference = preference


def linear_at(root: nn.Module, name: str) -> nn.Linear:
    """The plain linear at ``name`` under ``root`` (for code that rewrites dense weights)."""
    m = root.get_submodule(name)
    assert isinstance(m, nn.Linear), f"{name}: expected an nn.Linear, got {type(m).__name__}"
    return m


def weight_of(module: nn.Module) -> torch.Tensor:
    """``module.weight`` (a linear's, an embedding's or a norm's), typed as the tensor it is."""
    w = module.weight
    assert isinstance(w, torch.Tensor), f"{type(module).__name__}.weight is not a tensor"
    return w


def hf_config(model: nn.Module) -> PretrainedConfig:
    """``model.config`` of a transformers model, typed as the config it is."""
    from transformers import PretrainedConfig

    cfg = model.config
    assert isinstance(cfg, PretrainedConfig), f"{type(model).__name__}.config is not a transformers config"
    return cfg


def set_linear_weight(linear: nn.Module, W: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Give a plain linear a new weight (of any shape; its feature counts follow) and, when given, a new bias."""
    assert isinstance(linear, nn.Linear)
    w = linear.weight
    linear.weight = nn.Parameter(W.to(device=w.device, dtype=w.dtype).contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = W.shape
    if bias is not None:
        assert linear.bias is not None
        linear.bias = nn.Parameter(bias.to(device=w.device, dtype=linear.bias.dtype).contiguous(), requires_grad=False)
