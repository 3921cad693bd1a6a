"""Experiment configs: ``ml_collections`` Python files, command-line overrides, validation.

A config file defines ``get_config(arg=None)`` returning a ``ConfigDict``. It is named by path
(``configs/demo.py``, optionally ``configs/demo.py:arg``) or by the name of a recipe shipped in
``hetclip.configs`` (``demo``, ``clip_b32`` ...). Overrides are ``--config.a.b=value`` as in JAX
research code; the value is parsed to the type of the existing entry. Unknown keys and values of the
wrong type are errors that name the key and suggest the nearest valid one.
"""
from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import json
import os
from typing import Any, Iterable

import ml_collections

from hetclip.suggest import did_you_mean


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message says which and why."""


def _module_from_path(path: str):
    spec = importlib.util.spec_from_file_location(f"hetclip_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path}: syntax error at line {e.lineno}: {e.msg}") from None
    return module


def available_recipes() -> list[str]:
    import hetclip.configs as pkg

    folder = os.path.dirname(pkg.__file__)
    return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


# The overrides most runs need (shown by ``hetclip-train --help``); every key of the recipe can be set.
COMMON_OVERRIDES = (
    ("data.shards='/data/laion/{00000..41407}.tar'", "training shards (brace pattern, `::` joins sources)"),
    ("data.tokenizer.path=DIR", "a Hugging Face tokenizer directory (tokenizer.json)"),
    ("batch_size=N", "global batch over all processes and devices (the negatives of each example)"),
    ("accum_steps=K", "split each device's share into K micro-batches (less memory, same result)"),
    ("total_samples=N / total_steps=N", "training length (total_steps wins when > 0)"),
    ("model.dtype=auto|bfloat16|float32", "compute dtype (auto: bf16 where matmuls are fast)"),
    ("model.remat=True", "recompute activations in the backward pass (less memory, ~1/3 more compute)"),
    ("model.attention=auto|xla|cudnn", "attention kernel (cudnn: fused attention on NVIDIA GPUs)"),
    ("mesh.fsdp=8", "shard parameters and optimizer state over 8 devices (mesh.data=-1 takes the rest)"),
    ("model.het.mc_samples=S", "HET-XL MC samples (the :het recipes; num_factors, sample_chunk beside it)"),
    ("init_from_hf=DIR", "start from a Hugging Face CLIP directory (init_from_hf_groups=image: LiT's image tower only)"),
    ("freeze.image=True", "hold a parameter group fixed (image, text, head, temperature): no gradient, no update"),
    ("optim.lr=5e-4", "peak learning rate (optim.warmup_steps, optim.weight_decay, ...)"),
    ("evals.0.dir=/data/imagenet/val", "evaluation data of the first evaluator (evals.0.every_steps, .mc_samples)"),
    ("checkpoint.every_steps=N", "checkpoint interval (resuming: rerun the same command)"),
)


def recipe_summaries() -> dict[str, str]:
    """Recipe name -> the first line of its module docstring."""
    out = {}
    for name in available_recipes():
        doc = importlib.import_module(f"hetclip.configs.{name}").__doc__ or ""
        out[name] = doc.strip().splitlines()[0].replace("``", "") if doc.strip() else ""
    return out


def help_epilog() -> str:
    """``hetclip-train --help``'s epilog: the recipes and the most-used overrides."""
    lines = ["--config FILE|RECIPE[:het] (required), then any number of --config.KEY=VALUE overrides.", "",
             "recipes (add :het for the HET-XL head):"]
    lines += [f"  {name:<10} {summary}" for name, summary in recipe_summaries().items()]
    lines += ["", "most-used overrides (--config.KEY=VALUE):"]
    lines += [f"  {key}\n      {what}" for key, what in COMMON_OVERRIDES]
    return "\n".join(lines)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``path[:arg]`` or ``recipe[:arg]`` and return its (locked) ``ConfigDict``."""
    name, _, arg = spec.partition(":")
    if os.path.exists(name) or name.endswith(".py"):
        if not os.path.exists(name):
            raise ConfigError(f"config file {name!r} does not exist")
        module = _module_from_path(os.path.abspath(name))
    else:
        recipes = available_recipes()
        if name not in recipes:
            raise ConfigError(f"unknown config {name!r}: not a file and not one of the recipes {recipes}"
                              f"{did_you_mean(name, recipes)}")
        module = importlib.import_module(f"hetclip.configs.{name}")
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config {spec!r} defines no get_config()")
    try:
        cfg = module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a config file is user code: name it and where it failed
        raise ConfigError(f"config {spec!r}: get_config() failed: {type(e).__name__}: {e}") from e
    if not isinstance(cfg, ml_collections.ConfigDict):
        cfg = ml_collections.ConfigDict(cfg)
    check_renamed(cfg, f"config {spec!r}")
    cfg.lock()
    return cfg


def flat_keys(cfg, prefix: str = "") -> list[str]:
    """Every dotted key of a ``ConfigDict`` or a plain nested dict (groups and their entries)."""
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, (dict, ml_collections.ConfigDict)):
            keys.extend(flat_keys(v, full + "."))
    return keys


# Keys that have a new name: old dotted key of the run config -> its present key. A config or an
# override that uses an old key is refused naming the new one; stored configs (a work directory's
# config.json, a checkpoint's metadata, an exported head) are read through ``upgrade_stored``.
RENAMED_KEYS = {
    "data.num_samples": "data.epoch_size",
    "model.het.num_samples": "model.het.mc_samples",
}


# Run-config keys added after runs were stored, with the value that reproduces those runs (a nested key
# is added where its parent group exists).
ADDED_KEYS = {
    "init_from_hf_groups": ["image", "text", "head", "temperature"],
    "optim.wd_mults": {"image": 1.0, "text": 1.0, "head": 1.0, "temperature": 1.0},
    "model.het.noise_space": "embedding",
    "model.het.estimator": "mc",
}


# Groups whose layout changed: old group -> what a config should say now. Stored configs are converted
# (``upgrade_stored``); a config or override that uses the old group is refused with this advice.
RESTRUCTURED = {
    "eval": "the 'eval' group became 'evals', a list of evaluators {kind, name, every_steps, at_end, ...}: "
            "e.g. evals=[dict(kind='zero_shot', name='imagenet', dir=..., layout='imagenet')] "
            "(hetclip.evals lists the kinds)",
}


def renamed_message(key: str) -> str | None:
    """``"data.num_samples was renamed to data.epoch_size"`` for an old key, else None."""
    new = RENAMED_KEYS.get(key)
    if new:
        return f"{key} was renamed to {new}"
    return RESTRUCTURED.get(key.split(".")[0]) if "." in key or key in RESTRUCTURED else None


def evals_from_eval_group(group: dict) -> list[dict]:
    """The ``evals`` entries of a stored config's old ``eval`` group: one zero-shot evaluator per task,
    with the group's schedule and settings (``classnames="imagenet"`` meant ImageNet's folder layout)."""
    out = []
    for task in group.get("tasks") or []:
        imagenet = task.get("classnames") == "imagenet"
        out.append({"kind": "zero_shot", "name": task.get("name", ""), "dir": task.get("dir", ""),
                    "layout": "imagenet" if imagenet else "auto",
                    "classnames": "" if imagenet else (task.get("classnames") or ""),
                    "templates": task.get("templates") or "clip80",
                    "every_steps": group.get("every_steps", 0), "at_end": group.get("at_end", True),
                    "batch_size": group.get("batch_size", 256), "mc_samples": group.get("mc_samples", 0),
                    "limit": group.get("limit", 0)})
    return out


def _suggest(key: str, cfg) -> str:
    renamed = renamed_message(key)
    if renamed:
        return f"; {renamed}"
    return did_you_mean(key, flat_keys(cfg), cutoff=0.5)


def check_renamed(cfg, where: str) -> None:
    """Refuse a run config (``ConfigDict`` or dict) that uses an old key, naming the new one."""
    for key in flat_keys(cfg):
        renamed = renamed_message(key)
        if renamed:
            raise ConfigError(f"{where}: {renamed}")


def upgrade_stored(stored: dict, prefix: str = "") -> dict:
    """A stored config with its renamed keys under their present names (a copy; the file is not changed).

    ``prefix`` says which part of the run config ``stored`` is: ``""`` a whole run config
    (``WORKDIR/config.json``, a checkpoint's ``meta["config"]``), ``"model."`` a model config,
    ``"model.het."`` the HET-XL head's settings. A present key wins over its old name. Keys added since
    (``ADDED_KEYS``) get the value the stored run had."""
    out = copy.deepcopy(dict(stored))
    if prefix == "" and isinstance(out.get("eval"), dict) and "evals" not in out:
        out["evals"] = evals_from_eval_group(out.pop("eval"))
    for key, value in ADDED_KEYS.items():
        if not key.startswith(prefix):
            continue
        *parents, last = key[len(prefix):].split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(last, copy.deepcopy(value))
    for old, new in RENAMED_KEYS.items():
        if not (old.startswith(prefix) and new.startswith(prefix)):
            continue
        *old_parents, old_last = old[len(prefix):].split(".")
        node = out
        for part in old_parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_last not in node:
            continue
        value = node.pop(old_last)
        *new_parents, new_last = new[len(prefix):].split(".")
        target = out
        for part in new_parents:
            target = target.setdefault(part, {})
        target.setdefault(new_last, value)
    return out


def _parse_value(raw: str, current: Any, key: str):
    if isinstance(current, bool):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config key {key!r} is a bool; cannot use {raw!r}")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            try:
                as_float = float(raw)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise ConfigError(f"config key {key!r} is an int; cannot use {raw!r}") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"config key {key!r} is a float; cannot use {raw!r}") from None
    if isinstance(current, str):
        return raw
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = tuple(x.strip() for x in raw.split(",") if x.strip())
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(current)(value)
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a group of settings; override one of its entries "
                          f"({', '.join(sorted(current.keys())[:8])}...)")
    # None or another type: a Python literal if it parses, else the string.
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def set_key(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Set dotted ``key`` of ``cfg`` from its string form, checking that the key exists."""
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list) and part.isdigit():  # an entry of a list of groups: evals.0.dir
            if int(part) >= len(node) or not isinstance(node[int(part)], (dict, ml_collections.ConfigDict)):
                raise ConfigError(f"config key {'.'.join(parts[:i])!r} has {len(node)} entries; "
                                  f"{'.'.join(parts[:i + 1])!r} is not one of its groups (in override {key}={raw})")
            node = node[int(part)]
            continue
        if not isinstance(node, (dict, ml_collections.ConfigDict)) or part not in node or \
                not isinstance(node[part], (ml_collections.ConfigDict, list, dict)):
            raise ConfigError(f"unknown config key {'.'.join(parts[:i + 1])!r} (in override {key}={raw}){_suggest(key, cfg)}")
        node = node[part]
    last = parts[-1]
    if not isinstance(node, (dict, ml_collections.ConfigDict)) or last not in node:
        raise ConfigError(f"unknown config key {key!r}{_suggest(key, cfg)}")
    value = _parse_value(raw, node[last], key)
    if isinstance(node, ml_collections.ConfigDict):
        with node.unlocked():
            node[last] = value
    else:
        node[last] = value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Apply ``a.b=value`` strings to a copy of ``cfg``."""
    cfg = ml_collections.ConfigDict(copy.deepcopy(cfg.to_dict()))  # lists of groups are not shared
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} needs the form key=value")
        set_key(cfg, key.strip(), raw)
    cfg.lock()
    return cfg


def split_argv(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """Split ``argv`` into (config spec, config overrides, remaining args).

    Accepts ``--config X``, ``--config=X`` and ``--config.key=value`` / ``--config.key value``.
    """
    spec, overrides, rest = None, [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a value (a config file or recipe name)")
            spec = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a.startswith("--config."):
            body = a[len("--config."):]
            if "=" in body:
                overrides.append(body)
            else:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{a} needs a value")
                overrides.append(f"{body}={argv[i + 1]}")
                i += 1
        else:
            rest.append(a)
        i += 1
    return spec, overrides, rest


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def diff(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    out = []
    for k in sorted(set(saved) | set(new)):
        a, b = saved.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(diff(a, b, f"{prefix}{k}."))
        elif _normal(a) != _normal(b):
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _normal(v):
    if isinstance(v, (list, tuple)):
        return [_normal(x) for x in v]
    return v
