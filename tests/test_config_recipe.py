"""Pass configs, the registry and recipes: validation and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.errors import CompressError, ConfigError
from compress.recipe import as_recipe, load_recipe, parse_shorthand
from compress.registry import all_passes, get_pass


def test_registry_lists_the_low_rank_family() -> None:
    assert {"svd", "asvd", "svd-llm", "lord"} <= set(all_passes())


def test_unknown_pass_lists_close_matches() -> None:
    with pytest.raises(ConfigError, match="unknown pass 'svdllm'.*did you mean svd-llm"):
        get_pass("svdllm")


def test_shorthand_parses_and_converts_types() -> None:
    spec = parse_shorthand("asvd:ratio=0.3,alpha=1,statistic=rms")
    assert spec.name == "asvd"
    assert spec.config.ratio == 0.3 and spec.config.alpha == 1.0 and spec.config.statistic == "rms"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "text,match",
    [
        ("svd:ratio=1.0", r"ratio' must be in \(0.0, 1.0\)"),
        ("svd:ratio=0", r"ratio' must be in \(0.0, 1.0\)"),
        ("svd:ratio=-0.2", "must be in"),
        ("svd:ratio=abc", "expected a number"),
        ("svd:rank=3", "unknown option.*rank.*valid options: ratio, targets"),
        ("svd:ratio", "not key=value"),
        ("asvd:statistic=median", "must be one of abs_mean, rms, abs_max"),
    ],
)
def test_bad_options_are_one_line_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        parse_shorthand(text)
    assert "\n" not in str(e.value)


def test_recipe_yaml_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("passes:\n  - pass: svd-llm\n    ratio: 0.25\ncalibration:\n  samples: 4\n")
    rec = load_recipe(p)
    assert rec.passes[0].config.ratio == 0.25  # type: ignore[attr-defined]
    assert rec.calibration == {"samples": 4}
    again = as_recipe(rec.to_dict())
    assert again.to_dict() == rec.to_dict()


@pytest.mark.parametrize(
    "text,match",
    [
        ("passes: [\n  - pass", "not valid YAML"),
        ("passes:\n  - pass: svd\nextra: 1\n", "unknown key.*extra"),
        ("passes: []\n", "non-empty list"),
        ("passes:\n  - ratio: 0.2\n", "'pass' key"),
        ("passes:\n  - pass: svd\n    rank: 4\n", "unknown option"),
        ("- svd\n", "mapping"),
    ],
)
def test_bad_recipes(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(CompressError, match=match):
        load_recipe(p)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(CompressError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
