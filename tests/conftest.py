"""Shared fixtures: tiny random models of several families, built in the test (no downloads),
and the shared fixtures folder (../shared beside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMPRESS_SHARED", REPO.parent / "shared"))
DATA_DIR = SHARED / "data"
STORIES = SHARED / "models" / "stories260k"
SMOLLM = SHARED / "models" / "smollm2-135m-instruct-q4_1-gguf"

if DATA_DIR.is_dir():
    os.environ.setdefault("COMPRESS_DATA_DIR", str(DATA_DIR))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # parallel workers (pytest -n) share the cores instead of each spawning a thread per core
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

# family -> config kwargs; all GQA (kv heads < heads), two layers, tiny widths
TINY_CONFIGS = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=None),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    # fused q/k/v and gate/up projections (a layout of its own, not Llama's)
    "phi3": dict(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # Qwen2.5-0.5B's attention: 14 query heads on 2 key-value heads (7:1), and q/k/v biases that carry much of the
    # projections' output (make_tiny sets them; a fresh model's biases are zero)
    "qwen2-gqa7": dict(num_attention_heads=14, num_key_value_heads=2, head_dim=8),
}


def family_of(key: str) -> str:
    """The transformers model type of a TINY_CONFIGS key (a variant is named family-variant)."""
    return key.split("-")[0]


def _qwen_biases(model: torch.nn.Module, seed: int) -> None:
    """Biases like Qwen2.5's: the query and key biases are large on a few dimensions of every head
    (there they outweigh W x), the value bias is of the size of W x."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:  # type: ignore[union-attr]
            for name, scale, share in (("q_proj", 4.0, 0.25), ("k_proj", 4.0, 0.25), ("v_proj", 1.0, 1.0)):
                lin = layer.self_attn.get_submodule(name)
                size = lin.weight.norm(dim=1).mean()
                mask = torch.rand(lin.out_features, generator=g) < share
                lin.bias.copy_(torch.randn(lin.out_features, generator=g) * size * scale * mask)


#: a family no declared adapter covers: it goes through the generic adapter
GENERIC_FAMILY = "opt"


def make_tiny(family: str, seed: int = 0, hidden: int = 32, intermediate: int = 64, tied: bool = False, vocab: int = 128) -> torch.nn.Module:
    """A two-layer random model of ``family`` (one of TINY_CONFIGS, or GENERIC_FAMILY)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if family == GENERIC_FAMILY:
        cfg = AutoConfig.for_model(
            "opt", vocab_size=vocab, hidden_size=hidden, ffn_dim=intermediate, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=hidden, tie_word_embeddings=tied,
        )
    else:
        cfg = AutoConfig.for_model(
            family_of(family),
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=2,
            max_position_embeddings=128,
            tie_word_embeddings=tied,
            **TINY_CONFIGS[family],
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init is nearly isotropic; give the weights some spectral decay like trained ones
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                U, S, Vh = torch.linalg.svd(m.weight, full_matrices=False)
                decay = torch.exp(-torch.arange(S.numel(), dtype=S.dtype) / 6.0)
                m.weight.copy_((U * (S * decay)) @ Vh)
    if family == "qwen2-gqa7":
        _qwen_biases(model, seed)
    return model.eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def calib_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (8, 32), generator=g)


def needs(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present")
