"""``--budget``: the loss statistics, the candidates, the knapsack's recipe, and the bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from compress.adapters import get_adapter
from compress.errors import ConfigError
from compress.passes.targeting import matches
from compress.pipeline.gradients import sensitivity_statistics
from compress.search import Budget, parse_search, search
from compress.search.select import _compact, cost_tables
from compress.solvers.metrics import predicted_increase

from .conftest import STORIES, make_tiny, needs
from .test_cli import _assert_one_line_error, _run


def test_layer_qualified_targets() -> None:
    assert matches("3.mlp.down_proj", "3.mlp.down_proj")
    assert matches("3.mlp.down_proj", "2-4.mlp.*")
    assert not matches("5.mlp.down_proj", "2-4.mlp.*")
    assert not matches("mlp.down_proj", "3.mlp.down_proj")  # a name without its layer never matches a layer's pattern
    assert matches("3.mlp.down_proj", "mlp.down_proj")  # an unqualified pattern matches every layer
    names = ["0.mlp.up_proj", "1.mlp.up_proj", "2.mlp.up_proj", "5.mlp.up_proj", "5.self_attn.q_proj"]
    pattern = _compact(names)
    assert pattern == "0-2.mlp.up_proj|5.mlp.up_proj|5.self_attn.q_proj"
    every = [f"{i}.{n}" for i in range(8) for n in ("mlp.up_proj", "self_attn.q_proj")]
    assert [n for n in every if matches(n, pattern)] == sorted(names, key=every.index)


def test_gradient_statistics_match_autograd(calib_ids: torch.Tensor) -> None:
    """The layer-walked backward gives the same output-gradient moments and Grams as one backward
    of the whole model."""
    model = make_tiny("llama")
    adapter = get_adapter(model)
    stats = sensitivity_statistics(model, adapter, calib_ids, device=torch.device("cpu"), batch_size=3)
    name = f"{adapter.layers_path}.0.mlp.down_proj"
    lin = model.get_submodule(name)
    seen: dict[str, torch.Tensor] = {}
    lin.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out) or out.retain_grad())
    logits = model(input_ids=calib_ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), calib_ids[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    g = seen["y"].grad.reshape(-1, seen["y"].shape[-1])
    x = seen["x"].detach().reshape(-1, seen["x"].shape[-1])
    n = calib_ids.numel()
    torch.testing.assert_close(stats.targets[name].grad_sq, g.square().sum(0) / n, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(stats.targets[name].gram, x.T @ x / n, rtol=1e-4, atol=1e-7)
    assert stats.loss == pytest.approx(float(loss.detach()) / calib_ids[:, 1:].numel(), rel=1e-5)
    # the estimate is a second-order term: it grows with the square of the perturbation
    W = lin.weight.detach()
    d = torch.randn_like(W) * 1e-2
    assert predicted_increase(W, W + 2 * d, stats.targets[name]) == pytest.approx(4 * predicted_increase(W, W + d, stats.targets[name]), rel=1e-5)


def test_search_fills_the_budget_and_its_recipe_reproduces_the_choice(calib_ids: torch.Tensor) -> None:
    model = make_tiny("llama", hidden=64, intermediate=128)
    adapter = get_adapter(model)
    result = search(model, adapter, calib_ids, Budget.parse("bits=5"), parse_search("gptq", False), device=torch.device("cpu"), batch_size=4)
    assert result.bits_per_weight <= 5.0
    assert result.bits_per_weight > 4.0  # the knapsack spends what it is given
    # every target's choice is applied by exactly the steps of its candidate
    from compress.passes.targeting import layer_indexed_name

    passes = [s.build() for s in result.recipe.passes]
    for c in result.choices:
        name = layer_indexed_name(c.name, adapter.layers_path)
        applied = [str(s.config.to_dict()["bits"]) + "/" + str(s.config.to_dict()["group"]) for s, p in zip(result.recipe.passes, passes)
                   if matches(name, p.config.targets)]
        expected = [st.split("bits=")[1].split(",group=")[0] + "/" + st.split("group=")[1] for st in c.candidate.steps]
        assert applied == expected, (c.name, applied, expected)
    assert "layer" in "\n".join(result.lines(adapter.layers_path))


def test_budget_and_candidate_refusals() -> None:
    for text, match in [("bits", "KIND=VALUE"), ("weight=3", "KIND=VALUE"), ("bits=x", "needs a number"), ("bits=-1", "must be positive")]:
        with pytest.raises(ConfigError, match=match):
            Budget.parse(text)
    with pytest.raises(ConfigError, match="unknown candidate 'gptx'"):
        parse_search("gptq,gptx", False)
    with pytest.raises(ConfigError, match="'svd-llm\\+gptq' does not compose: gptq cannot follow svd-llm"):
        parse_search("svd-llm+gptq", False)
    with pytest.raises(ConfigError, match="does not remove parameters"):
        parse_search("gptq", True)
    model = make_tiny("llama", hidden=64, intermediate=128)
    adapter = get_adapter(model)
    with pytest.raises(ConfigError, match="at or above the dense model"):
        cost_tables(model, adapter, Budget.parse("bits=32"), parse_search("gptq", False))
    with pytest.raises(ConfigError, match=r"below the cheapest plan these candidates reach \(bits=2\.\d+"):
        cost_tables(model, adapter, Budget.parse("bits=1.5"), parse_search("gptq", False))


@needs(STORIES)
@pytest.mark.parametrize(
    "args, match",
    [
        (["--budget", "bits=3", "--pass", "gptq"], "--budget chooses the passes itself: drop --pass"),
        (["--search", "gptq", "--pass", "gptq"], "--search names the candidates of a --budget search"),
        (["--budget", "bits=40"], "at or above the dense model (bits=32)"),
        (["--budget", "bits=1.5"], "below the cheapest plan these candidates reach"),
        (["--budget", "bits=12", "--search", "svd-llm+gptq"], "does not compose"),
        (["--budget", "params=0.5", "--search", "gptq"], "does not remove parameters"),
    ],
)
def test_budget_bad_inputs(tmp_path: Path, args: list[str], match: str) -> None:
    out = tmp_path / "out"
    p = _run("run", str(STORIES), *args, "--out", str(out))
    _assert_one_line_error(p, match)
    assert not out.exists()


@needs(STORIES)
def test_budget_run_writes_a_plan_that_reruns(tmp_path: Path) -> None:
    out = tmp_path / "b"
    small = ["--calib-samples", "4", "--calib-seqlen", "64"]
    p = _run("run", str(STORIES), "--budget", "bits=12", "--out", str(out), *small)
    assert p.returncode == 0, p.stderr
    assert "search: bits=12 →" in p.stdout
    report = yaml.safe_load((out / "report.json").read_text())
    assert report["search"]["bits_per_weight"] <= 12 and report["search"]["histogram"]
    plan = out / "plan.yaml"
    assert plan.is_file()
    again = _run("run", str(STORIES), "--recipe", str(plan), "--out", str(tmp_path / "again"), *small, "--dry-run")
    assert again.returncode == 0, again.stderr
    bits = report["compression"]["target_bits_after"]
    rerun = _run("run", str(STORIES), "--recipe", str(plan), "--out", str(tmp_path / "again"), *small)
    assert rerun.returncode == 0, rerun.stderr
    assert yaml.safe_load((tmp_path / "again" / "report.json").read_text())["compression"]["target_bits_after"] == bits


def test_cospadi_global_weighs_targets_by_the_loss_gradient(calib_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """allocate=global profiles the loss-gradient statistics and hands each target's to its costs."""
    from compress import compress
    from compress.passes import dictionary

    seen: list[object] = []
    original = dictionary.CoSpaDiPass._cost_candidates

    def spy(self, W, gram, name, sensitivity=None):  # type: ignore[no-untyped-def]
        seen.append(sensitivity)
        return original(self, W, gram, name, sensitivity)

    monkeypatch.setattr(dictionary.CoSpaDiPass, "_cost_candidates", spy)
    compress(make_tiny("llama"), ["cospadi:ratio=0.4,solver=closed-form,allocate=global"], calib_ids)
    assert len(seen) == 14 and all(s is not None and s.grad_sq.ndim == 1 for s in seen)
