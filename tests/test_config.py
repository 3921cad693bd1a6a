import json

import ml_collections
import pytest

from hetclip import config as config_lib


def _cfg():
    c = ml_collections.ConfigDict()
    c.batch_size = 32
    c.lr = 1e-3
    c.name = "x"
    c.flag = False
    c.crop = (0.9, 1.0)
    c.optim = dict(weight_decay=0.1, lr_mults=dict(image=1.0))
    c.lock()
    return c


def test_overrides_parse_to_the_existing_types():
    c = config_lib.apply_overrides(_cfg(), ["batch_size=64", "lr=3e-4", "name=y", "flag=true", "crop=(0.5, 1.0)",
                                            "optim.lr_mults.image=0.5"])
    assert c.batch_size == 64 and isinstance(c.batch_size, int)
    assert c.lr == pytest.approx(3e-4)
    assert c.name == "y" and c.flag is True and tuple(c.crop) == (0.5, 1.0)
    assert c.optim.lr_mults.image == 0.5


def test_unknown_key_names_it_and_suggests_the_nearest():
    with pytest.raises(config_lib.ConfigError, match=r"'batch_sise'.*did you mean 'batch_size'"):
        config_lib.apply_overrides(_cfg(), ["batch_sise=3"])
    with pytest.raises(config_lib.ConfigError, match=r"optim.weight_decy.*did you mean 'optim.weight_decay'"):
        config_lib.apply_overrides(_cfg(), ["optim.weight_decy=0"])


def test_wrong_type_names_the_key():
    with pytest.raises(config_lib.ConfigError, match="'batch_size' is an int"):
        config_lib.apply_overrides(_cfg(), ["batch_size=lots"])
    with pytest.raises(config_lib.ConfigError, match="'flag' is a bool"):
        config_lib.apply_overrides(_cfg(), ["flag=maybe"])
    with pytest.raises(config_lib.ConfigError, match="group of settings"):
        config_lib.apply_overrides(_cfg(), ["optim=3"])


def test_split_argv_forms():
    spec, over, rest = config_lib.split_argv(["--config", "demo", "--config.batch_size=8", "--config.lr", "0.1",
                                              "--workdir", "w"])
    assert spec == "demo" and over == ["batch_size=8", "lr=0.1"] and rest == ["--workdir", "w"]


@pytest.mark.parametrize("name", config_lib.available_recipes())
def test_every_recipe_loads_and_is_locked(name):
    c = config_lib.load_config(name)
    assert c.batch_size > 0
    with pytest.raises(AttributeError):
        c.not_a_key = 1
    json.loads(config_lib.to_json(c))


def test_recipes_include_the_issue_list():
    assert {"demo", "clip_b32", "clip_b16", "clip_l14", "lit_b32"} <= set(config_lib.available_recipes())


def test_unknown_recipe_and_missing_file():
    with pytest.raises(config_lib.ConfigError, match="did you mean 'demo'"):
        config_lib.load_config("dem")
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        config_lib.load_config("nowhere/x.py")


def test_recipe_by_path_with_argument(tmp_path):
    import hetclip.configs as pkg
    import os

    path = os.path.join(os.path.dirname(pkg.__file__), "clip_b32.py")
    assert config_lib.load_config(f"{path}:het").model.het.enabled is True
    assert config_lib.load_config(path).model.het.enabled is False


def test_diff_lists_changed_keys():
    assert config_lib.diff({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}}) == ["b.c: 2 -> 3"]


def test_every_demo_generator_knob_is_a_config_key():
    from hetclip.data import demo

    c = config_lib.load_config("demo")
    assert c.demo.params.to_dict() == demo.DEFAULTS
    c = config_lib.apply_overrides(c, ["demo.params.max_offset=0.1", "demo.params.max_rotation=0"])
    assert c.demo.params.max_offset == 0.1 and c.demo.params.max_rotation == 0
    with pytest.raises(config_lib.ConfigError, match=r"demo.params.max_ofset.*did you mean 'demo.params.max_offset'"):
        config_lib.apply_overrides(c, ["demo.params.max_ofset=0.1"])
