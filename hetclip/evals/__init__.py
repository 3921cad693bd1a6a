"""Evaluators: one module per kind, one interface, used by training and the command lines alike.

A run config's ``evals`` is a list of entries ``{kind, name, every_steps, at_end, ...}``. ``kind`` names
the module: ``zero_shot`` is ``hetclip.evals.zero_shot``, a dotted name (``mypkg.my_eval``) is imported
as it is. The module defines ``DEFAULTS`` (its own keys with their defaults) and ``Evaluator(spec, ctx)``
whose ``run(encoders)`` returns a report: a dict with ``"metrics"`` (numbers, or dicts of numbers) and
whatever else the kind records. Training runs an entry every ``every_steps`` steps (0: not during
training) and once more at the end when ``at_end``; ``Suite`` holds that schedule.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from typing import Any

from hetclip.config import ConfigError
from hetclip.suggest import did_you_mean

COMMON = {"kind": "", "name": "", "every_steps": 0, "at_end": True}
_NOT_KINDS = ("common",)


@dataclasses.dataclass(frozen=True)
class Context:
    """What an evaluator needs besides its own settings: the model's config and tokenizer, the device mesh
    its batches are sharded over (None: every local device), and how the images are read."""
    model_cfg: Any
    tokenizer: Any
    mesh: Any = None
    seed: int = 0
    workers: int = 2
    image_size: int | None = None       # default: the model's
    resize_size: int | None = None      # shortest side before the centre crop; default: image_size
    model_id: str | None = None         # names the model in caches and reports
    progress: bool = False
    shard: bool | None = None           # without a mesh: split batches over the local devices (None: when even)

    @property
    def input_size(self) -> int:
        return int(self.image_size or self.model_cfg.vision.image_size)


def kinds() -> list[str]:
    """The evaluator kinds shipped with hetclip."""
    here = os.path.dirname(__file__)
    return sorted(m.name for m in pkgutil.iter_modules([here]) if m.name not in _NOT_KINDS)


def module_of(kind: str, where: str = "evals"):
    """The module of an evaluator kind; an unknown kind is a ``ConfigError`` naming the entry."""
    name = kind if "." in kind else f"hetclip.evals.{kind}"
    if "." not in kind and kind not in kinds():
        raise ConfigError(f"{where}.kind={kind!r} is not an evaluator; one of {kinds()} or a module path"
                          + did_you_mean(kind, kinds()))
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(f"{where}.kind={kind!r}: cannot import {name} ({e})") from None
    if not hasattr(module, "Evaluator") or not isinstance(getattr(module, "DEFAULTS", None), dict):
        raise ConfigError(f"{where}.kind={kind!r}: {name} defines no DEFAULTS dict and Evaluator class")
    return module


def resolve(entry: dict, where: str = "evals") -> dict:
    """An entry with every key of its kind filled from the defaults; unknown keys are errors."""
    entry = dict(entry)
    if not entry.get("kind"):
        raise ConfigError(f"{where} has no kind; one of {kinds()}")
    module = module_of(entry["kind"], where)
    known = {**COMMON, **module.DEFAULTS}
    for key in entry:
        if key not in known:
            raise ConfigError(f"unknown key {where}.{key} for an evaluator of kind {entry['kind']!r}"
                              + did_you_mean(key, list(known)))
    spec = {**known, **entry}
    spec["name"] = spec["name"] or spec["kind"]
    if not spec["every_steps"] >= 0:
        raise ConfigError(f"config {where}.every_steps={spec['every_steps']} must be >= 0 (0: only at the end)")
    return spec


def build(entry: dict, ctx: Context, where: str = "evals"):
    """The evaluator of one config entry."""
    spec = resolve(entry, where)
    if "dir" in spec and not spec["dir"]:
        raise ConfigError(f"evaluator {spec['name']!r} has no data: set --config.{where}.dir=... "
                          "(or run without evaluators: --config.evals='[]')")
    return module_of(spec["kind"], where).Evaluator(spec, ctx)


class Suite:
    """The evaluators of a run and when they run: ``due(step)`` during training, ``at_end()`` after it."""

    def __init__(self, entries, ctx: Context):
        self.ctx = ctx
        self.evaluators = [build(dict(e), ctx, f"evals.{i}") for i, e in enumerate(entries)]
        names = [ev.spec["name"] for ev in self.evaluators]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"evals: names {dup} appear more than once; give each entry its own name")
        self._encoders = None

    def __bool__(self) -> bool:
        return bool(self.evaluators)

    def due(self, step: int, end_step: int) -> list:
        return [ev for ev in self.evaluators
                if ev.spec["every_steps"] and step % ev.spec["every_steps"] == 0 and step < end_step]

    def at_end(self) -> list:
        return [ev for ev in self.evaluators if ev.spec["at_end"]]

    def run(self, evaluators, params, step: int, *, writer=None, say=None, workdir: str | None = None) -> dict:
        """Run ``evaluators`` on ``params`` as they lie on the mesh (no copy to the host): ``{name: metrics}``.
        With ``writer`` (``runlog.MetricsWriter``) the scalars are logged as ``KIND/NAME/METRIC``; with
        ``workdir`` the reports go to ``WORKDIR/eval_step{step}.json`` (and per-image files beside it)."""
        from hetclip.files import write_json_atomic
        from hetclip.model import Encoders

        if self._encoders is None:
            self._encoders = Encoders(self.ctx.model_cfg, params)  # its jitted functions take the params
        self._encoders.params = params
        results, reports = {}, {}
        for ev in evaluators:
            name, kind = ev.spec["name"], ev.spec["kind"]
            report = ev.run(self._encoders)
            per_image = report.pop("per_image", None)
            results[name], reports[name] = report["metrics"], report
            if writer is not None:
                writer.write(step, {f"{kind}/{name}/{k}": v for k, v in flat_scalars(report["metrics"]).items()})
            if say is not None:
                say(f"step {step} {kind.replace('_', '-')} {name}: {headline(report['metrics'])}")
            if workdir is not None and per_image is not None:
                from hetclip.zero_shot.uncertainty import write_per_image

                write_per_image(os.path.join(workdir, f"eval_step{step}_{name}_per_image.csv"), per_image)
        if workdir is not None and reports:
            write_json_atomic(os.path.join(workdir, f"eval_step{step}.json"), reports)
        return results


def flat_scalars(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1.0}}`` -> ``{"a/b": 1.0}`` (numbers only)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def headline(metrics: dict) -> str:
    """The one number a log line shows for a report's metrics: top-1, else mean recall@1, else the loss."""
    flat = flat_scalars(metrics)
    for key in ("top1", "image_retrieval_recall@1", "loss"):
        hit = next((v for k, v in flat.items() if k == key or k.endswith("/" + key)), None)
        if hit is not None:
            return f"{key}={hit:.4f}"
    return ""
