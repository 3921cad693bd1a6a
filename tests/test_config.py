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


# --------------------------------------------------------------------------------------------------
# Renamed keys and nearest-name suggestions


def test_did_you_mean_names_the_nearest_choice_or_nothing():
    from hetclip.suggest import did_you_mean, nearest

    assert did_you_mean("shufle_buffer", ["shuffle_buffer", "shards"]) == "; did you mean 'shuffle_buffer'?"
    assert did_you_mean("zzz", ["shuffle_buffer", "shards"]) == ""
    assert nearest("B/33", {"B/32": 1, "L/14": 2}) == "B/32"  # any iterable of names (a dict's keys)
    assert nearest("ab", ["abc"], cutoff=0.99) is None
    assert nearest("het", ("het",)) == "het"


@pytest.mark.parametrize("old,new", sorted(config_lib.RENAMED_KEYS.items()))
def test_an_override_with_an_old_key_names_the_new_one(old, new):
    from hetclip.configs._base import base_config

    cfg = base_config("tiny", het=True)
    with pytest.raises(config_lib.ConfigError, match=f"{old} was renamed to {new}"):
        config_lib.apply_overrides(cfg, [f"{old}=8"])
    node = config_lib.apply_overrides(cfg, [f"{new}=8"])
    for part in new.split("."):
        node = node[part]
    assert node == 8


def test_a_config_file_with_an_old_key_names_the_new_one(tmp_path):
    path = tmp_path / "old.py"
    path.write_text("from hetclip.configs._base import base_config\n\n\ndef get_config():\n"
                    "    c = base_config('tiny', het=True)\n    c.data.num_samples = 1000\n    return c\n")
    with pytest.raises(config_lib.ConfigError, match=r"old.py.*data.num_samples was renamed to data.epoch_size"):
        config_lib.load_config(str(path))


def test_a_model_config_with_an_old_key_names_the_new_one():
    from hetclip.model import ModelConfig, preset

    with pytest.raises(ValueError, match="model.het.num_samples was renamed to model.het.mc_samples"):
        preset("tiny", het={"enabled": True, "num_samples": 4})
    d = preset("tiny").to_dict()
    d["het"]["num_samples"] = d["het"].pop("mc_samples")
    with pytest.raises(ValueError, match="ModelConfig.het: unknown key 'num_samples'; model.het.num_samples was "
                                         "renamed to model.het.mc_samples"):
        ModelConfig.from_dict(d)


def _aged(d: dict) -> dict:
    """A run config as written before the renames (old key names, same values)."""
    d = json.loads(json.dumps(d))
    d["data"]["num_samples"] = d["data"].pop("epoch_size")
    d["model"]["het"]["num_samples"] = d["model"]["het"].pop("mc_samples")
    return d


def test_upgrade_stored_reads_old_keys_under_their_new_names():
    from hetclip.configs._base import base_config
    from hetclip.model import ModelConfig

    cfg = config_lib.apply_overrides(base_config("tiny", het=True), ["data.epoch_size=1234", "model.het.mc_samples=7"])
    new = json.loads(config_lib.to_json(cfg))
    old = _aged(new)
    assert config_lib.upgrade_stored(old) == new and "num_samples" in old["data"]  # a copy; the input is kept
    assert config_lib.upgrade_stored(new) == new
    assert config_lib.upgrade_stored(old["model"], "model.") == new["model"]
    assert ModelConfig.from_dict(config_lib.upgrade_stored(old["model"], "model.")).het.mc_samples == 7
    assert config_lib.upgrade_stored(old["model"]["het"], "model.het.") == new["model"]["het"]
    both = dict(old, data=dict(old["data"], epoch_size=99))  # the present key wins over an old one
    assert config_lib.upgrade_stored(both)["data"]["epoch_size"] == 99


def test_an_old_config_json_resumes_without_a_config_change(tmp_path):
    from hetclip import workdir as workdir_lib
    from hetclip.configs._base import base_config

    new = json.loads(config_lib.to_json(base_config("tiny", het=True)))
    (tmp_path / "config.json").write_text(json.dumps(_aged(new)))
    workdir_lib.save_or_check_config(new, str(tmp_path), allow_change=False)
    assert json.loads((tmp_path / "config.json").read_text()) == new  # rewritten with the present names
    (tmp_path / "config.json").write_text(json.dumps(_aged(new)))
    changed = dict(new, data=dict(new["data"], epoch_size=5))
    with pytest.raises(config_lib.ConfigError, match="data.epoch_size: 0 -> 5"):
        workdir_lib.save_or_check_config(changed, str(tmp_path), allow_change=False)


def test_settings_of_a_head_that_is_off_do_not_block_a_resume(tmp_path):
    from hetclip import workdir as workdir_lib
    from hetclip.configs._base import base_config

    new = json.loads(config_lib.to_json(base_config("tiny")))
    saved = json.loads(json.dumps(new))
    saved["model"]["het"]["num_factors"] = 16
    (tmp_path / "config.json").write_text(json.dumps(saved))
    workdir_lib.save_or_check_config(new, str(tmp_path), allow_change=False)
    on = json.loads(json.dumps(new))
    on["model"]["het"].update(enabled=True, num_factors=4)
    (tmp_path / "config.json").write_text(json.dumps(dict(on, model=dict(on["model"], het=dict(on["model"]["het"], num_factors=3)))))
    with pytest.raises(config_lib.ConfigError, match="model.het.num_factors: 3 -> 4"):
        workdir_lib.save_or_check_config(on, str(tmp_path), allow_change=False)
