"""Stream a GGUF checkpoint as Hugging Face state-dict tensors, one tensor at a time.

:class:`GGUFSource` keeps ``gguf.GGUFReader``'s memory map open and dequantizes a tensor only when
it is asked for, so a model can be read layer by layer without ever holding it whole. Names and
values follow transformers' GGUF loader (``modeling_gguf_pytorch_utils.load_gguf_checkpoint``, what
``from_pretrained(gguf_file=...)`` runs for these architectures): its GGUF -> HF name map, its
per-architecture ``TENSOR_PROCESSORS`` (e.g. the Llama q/k reverse permutation) and ``gguf.dequantize``,
so ``get(name)`` is bit-identical to the float32 model's tensor. Architectures whose loading merges
or splits tensors (MoE experts) or goes through transformers' packed-GGUF path are refused.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.errors import CompressError


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


class GGUFSource:
    """The HF state-dict tensors of one ``.gguf`` file, each dequantized to float32 on demand."""

    def __init__(self, path: Path, config: Any) -> None:
        try:
            import gguf
            from transformers import AutoModelForCausalLM
            from transformers import modeling_gguf_pytorch_utils as hf_gguf
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
            from transformers.integrations.gguf import is_gguf_arch_supported
        except ImportError as e:
            raise CompressError(f"reading a GGUF file needs the gguf package ({e}): pip install 'compress[gguf]'") from None

        self.path = Path(path)
        self.files: list[Path] = [self.path]
        self._dequantize = gguf.dequantize
        self._reader: gguf.GGUFReader | None = gguf.GGUFReader(self.path)
        arch = hf_gguf.read_field(self._reader, "general.architecture")[0]
        if is_gguf_arch_supported(arch):
            raise CompressError(
                f"GGUF architecture '{arch}' is loaded by transformers' packed-GGUF path, which GGUFSource does not "
                f"stream; load '{self.path.name}' whole with from_pretrained(gguf_file=...)"
            )
        if arch not in hf_gguf.GGUF_SUPPORTED_ARCHITECTURES and arch not in hf_gguf.TENSOR_PROCESSORS:
            raise CompressError(f"GGUF architecture '{arch}' of '{self.path.name}' is not supported by transformers")
        processor_class = hf_gguf.TENSOR_PROCESSORS.get(arch, hf_gguf.TensorProcessor)
        if hasattr(processor_class, "GGUF_MOE_WEIGHTS_PATTERN") or (
            processor_class.perform_fallback_tensor_mapping is not hf_gguf.TensorProcessor.perform_fallback_tensor_mapping
        ):
            raise CompressError(
                f"GGUF architecture '{arch}': transformers merges or splits its expert tensors while loading, which "
                f"GGUFSource does not stream; load '{self.path.name}' whole with from_pretrained(gguf_file=...)"
            )
        # load_gguf_checkpoint hands the processor the config it parsed from this file's metadata; `config`
        # was parsed from the same metadata (re-parsing would walk the whole vocabulary again). They differ
        # only where the file omits a value the config class defaults: a Llama file without head_count_kv,
        # whose q/k transformers leaves unpermuted and this source un-permutes as llama.cpp reads them
        self._processor = processor_class(config=config.to_dict())

        try:
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config)
            # get_gguf_hf_weights_map rebuilds gguf's name table for every submodule (seconds for a
            # 30-layer model); the table depends only on (arch, layers), so build it once
            build_name_map = gguf.get_tensor_name_map
            gguf.get_tensor_name_map = functools.cache(build_name_map)
            try:
                self._gguf_to_hf: dict[str, str] = hf_gguf.get_gguf_hf_weights_map(skeleton, self._processor)
            finally:
                gguf.get_tensor_name_map = build_name_map
        except (ValueError, NotImplementedError, KeyError) as e:
            raise CompressError(f"GGUF architecture '{arch}' is not supported: {_one_line(e)}") from None

        by_hf: dict[str, Any] = {}
        for tensor in self._reader.tensors:
            hf_name = self._gguf_to_hf.get(tensor.name)
            if hf_name is None:  # not a model weight (e.g. rope_freqs): transformers drops it too
                continue
            if hf_name in by_hf:
                raise CompressError(
                    f"GGUF architecture '{arch}': tensors '{by_hf[hf_name].name}' and '{tensor.name}' both map to "
                    f"'{hf_name}', a merge GGUFSource does not stream"
                )
            by_hf[hf_name] = tensor

        # from_pretrained then applies the model's own checkpoint conversions; refuse rather than diverge
        transforms = copy.deepcopy(get_model_conversion_mapping(skeleton))
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        converted = [n for n in by_hf if rename_source_key(n, renamings, converters) != (n, None)]
        if converted:
            raise CompressError(
                f"GGUF architecture '{arch}': transformers converts '{converted[0]}' after reading the GGUF, "
                f"which GGUFSource does not replicate; load '{self.path.name}' whole with from_pretrained(gguf_file=...)"
            )

        # in the model's state-dict order, so a reader can go layer by layer
        self._shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if k in by_hf}
        self._tensors = {k: by_hf[k] for k in self._shapes}

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            raise KeyError(name)
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        if name not in self._shapes:
            raise KeyError(name)
        return torch.float32

    def get(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise KeyError(name)
        if self._reader is None:
            raise ValueError(f"GGUFSource for '{self.path}' is closed")
        tensor = self._tensors[name]
        weights = self._dequantize(tensor.data, tensor.tensor_type)
        side: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}
        result = self._processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=self._gguf_to_hf, parsed_parameters=side
        )
        if result.name is None:  # stored aside by the processor (GPT-2's output.weight)
            out = side["tensors"].get(name)
        elif self._gguf_to_hf.get(result.name) == name:
            out = torch.from_numpy(np.copy(result.weights))
        else:
            out = None
        if out is None:
            raise CompressError(f"transformers' GGUF processor did not turn '{tensor.name}' into '{name}'")
        out = out.to(torch.float32)
        if tuple(out.shape) != self._shapes[name]:
            raise CompressError(
                f"GGUF tensor '{tensor.name}' has shape {tuple(out.shape)}, the model expects {self._shapes[name]} for '{name}'"
            )
        return out

    def close(self) -> None:
        """Drop the memory map; names and shapes stay readable, get() no longer works."""
        self._reader = None
        self._tensors = {}

    def __enter__(self) -> GGUFSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
