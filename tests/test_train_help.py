"""``hetclip-train --help`` lists every recipe and the most-used overrides, and those overrides exist."""
import re

import pytest

from hetclip import config as config_lib
from hetclip import train


def test_help_lists_recipes_and_overrides(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in config_lib.available_recipes():
        assert re.search(rf"^  {name}\s+\S", text, re.M), name
    for key, _ in config_lib.COMMON_OVERRIDES:
        assert key in text
    assert "--no-cluster-detection" in text and "--coordinator" in text


@pytest.mark.parametrize("recipe", ["clip_b32:het", "clip_l14"])
def test_documented_overrides_are_real_keys(recipe):
    cfg = config_lib.load_config(recipe)
    examples = {"N": "64", "K": "2", "S": "4", "DIR": "tokenizer", "auto|bfloat16|float32": "bfloat16",
                "auto|xla|cudnn": "xla"}
    for entry, _ in config_lib.COMMON_OVERRIDES:
        for part in entry.split(" / "):
            key, _, value = part.partition("=")
            config_lib.apply_overrides(cfg, [f"{key}={examples.get(value, value)}"])  # raises on an unknown key


def test_list_entry_override_sets_one_task_without_touching_the_recipe():
    cfg = config_lib.load_config("clip_b32")
    new = config_lib.apply_overrides(cfg, ["evals.0.dir=/data/imagenet/val"])
    assert new.evals[0]["dir"] == "/data/imagenet/val" and new.evals[0]["name"] == "imagenet"
    assert cfg.evals[0]["dir"] == ""
    with pytest.raises(config_lib.ConfigError, match="has 1 entries"):
        config_lib.apply_overrides(cfg, ["evals.1.dir=/x"])
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'evals.0.nope'"):
        config_lib.apply_overrides(cfg, ["evals.0.nope=1"])
    assert config_lib.apply_overrides(cfg, ["evals=[]"]).evals == []
