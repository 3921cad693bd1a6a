"""Command lines ``hetclip-zero-shot`` and ``hetclip-retrieval``, and ``run_zero_shot`` for training hooks.

Examples::

    hetclip-zero-shot --checkpoint runs/b32 --imagenet /data/imagenet/val --out imagenet.json
    hetclip-zero-shot --checkpoint runs/b32 --data /data/cifar10_wds --templates clip7 --mc-samples 32
    hetclip-retrieval --checkpoint runs/b32 --data '/data/flickr30k/test/{0..4}.tar'

``--out`` writes CLIP_benchmark's results layout (``report.py``: ``dataset``, ``model``, ``pretrained``,
``task``, ``metrics`` under its key names, plus ours); its ``hetclip`` part echoes everything that changes
the number: checkpoint and step, dataset and its layout, resolution/crop and normalisation, tokenizer
spec and context length, lower-casing/canonicalisation, template set, class count, number of images
evaluated and skipped. ``--plot DIR`` draws the reliability diagram (``plots.py``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from typing import Any, Dict, Optional, Sequence, Union

import jax
import numpy as np

from hetclip.zero_shot import datasets as ds
from hetclip.zero_shot import report
from hetclip.zero_shot.classifier import build_classifier, classifier_info
from hetclip.zero_shot.evaluate import evaluate_retrieval, evaluate_zero_shot
from hetclip.zero_shot.templates import TEMPLATE_SETS, load_classnames, load_templates

log = logging.getLogger(__name__)


def _logit_scale(encoders) -> float:
    s = encoders.logit_scale
    return float(s() if callable(s) else s)


def _progress(total: Optional[int], desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr)


def _source(dataset: str, classnames, imagenet: bool):
    if imagenet:
        if classnames is not None:
            raise ValueError("--imagenet uses the built-in ImageNet class names; do not pass --classnames")
        return ds.imagenet(dataset)
    source = ds.open_source(dataset, classnames)
    if len(source.classnames) < 2:
        log.warning("%s has %d class(es): zero-shot accuracy is meaningless with fewer than 2", dataset,
                    len(source.classnames))
    return source


def run_zero_shot(encoders, tokenizer, dataset_dir: str,
                  classnames: Union[None, str, Sequence[str]] = None,
                  templates: Union[str, Sequence[str]] = "clip80", image_size: int = 224, *,
                  imagenet: bool = False, canonicalize: bool = False, batch_size: int = 64,
                  text_batch_size: int = 256, limit: Optional[int] = None, mc_samples: int = 0,
                  seed: int = 0, workers: int = 4, resize_size: Optional[int] = None,
                  model_id: Optional[str] = None, cache_dir: Optional[str] = None, memory_cache=None,
                  shard: Optional[bool] = None, progress: bool = False) -> Dict[str, Any]:
    """Zero-shot evaluation of ``encoders`` (``image_embeddings``, ``text_embeddings``, ``logit_scale``,
    optional ``image_samples``) on a class-folder tree, an ImageNet val folder or ``.cls`` shards.

    ``classnames``: a list, a file, ``"imagenet"``, or ``None`` (dataset's own: folder names or
    ``classnames.txt``). ``templates``: a list or a set name / file (``clip80``, ``clip7``, ``bare``).
    Returns ``{"metrics": {...}, "dataset": {...}, "preprocess": {...}, "text": {...}, "reliability": {...},
    ...}`` (``reliability``: the diagrams of ``evaluate_zero_shot``).
    """
    source = _source(dataset_dir, classnames, imagenet)
    names = source.classnames
    template_list = list(templates) if not isinstance(templates, str) else load_templates(templates)
    weights = build_classifier(encoders.text_embeddings, tokenizer, names, template_list,
                               canonical=canonicalize, batch_size=text_batch_size, model_id=model_id,
                               cache_dir=cache_dir, memory_cache=memory_cache)
    batches = ds.EvalBatches(source, image_size, batch_size, workers=workers, limit=limit,
                             resize_size=resize_size)
    try:
        total = len(batches)
    except TypeError:
        total = limit
    bar = _progress(total, "zero-shot", progress)
    sampler = getattr(encoders, "image_samples", None) if mc_samples > 0 else None
    reliability: Dict[str, Any] = {}
    try:
        metrics = evaluate_zero_shot(encoders.image_embeddings, weights, batches, _logit_scale(encoders),
                                     sample_image=sampler, mc_samples=mc_samples,
                                     key=jax.random.PRNGKey(seed), batch_size=batch_size, shard=shard,
                                     progress=bar, reliability=reliability)
    finally:
        if bar is not None:
            bar.close()
    text = classifier_info(names, template_list, tokenizer, canonicalize)
    text["templates"] = templates if isinstance(templates, str) else "list"
    return {
        "metrics": metrics,
        "dataset": dict(source.describe(), images_evaluated=batches.num_images,
                        images_skipped=len(batches.skipped),
                        skipped_files=[n for n, _ in batches.skipped[:20]],
                        limit=limit, classnames=classnames if isinstance(classnames, str) else
                        ("list" if classnames is not None else "dataset")),
        "preprocess": {"image_size": int(image_size), "resize_shortest_side": int(resize_size or image_size),
                       "crop": "center", "interpolation": "bicubic",
                       "mean": ds.CLIP_MEAN.tolist(), "std": ds.CLIP_STD.tolist()},
        "text": text,
        "logit_scale": _logit_scale(encoders),
        "mc_samples": int(mc_samples), "seed": int(seed), "batch_size": int(batch_size),
        "reliability": reliability,
    }


# ---------------------------------------------------------------------------------------------- loading

def load_checkpoint(path: str, step: Optional[int] = None) -> Dict[str, Any]:
    """``{"encoders", "tokenizer", "image_size", "model_id", "info"}`` from a training checkpoint."""
    from hetclip.checkpoint import load_run
    from hetclip.model import Encoders

    if os.path.isfile(os.path.join(path, "config.json")) and \
            os.path.isfile(os.path.join(path, "model.safetensors")):
        return _load_hf_export(path)
    run = load_run(path, step)
    preprocess = run.preprocess
    image_size = int(preprocess.get("image_size", run.model_cfg.vision.image_size))
    info = {"checkpoint": run.meta["checkpoint"], "step": run.step, "preprocess_saved": preprocess}
    return {"encoders": Encoders(run.model_cfg, run.params), "tokenizer": run.tokenizer(), "image_size": image_size,
            "resize_size": preprocess.get("resize_size"),
            "model_id": f"{info['checkpoint']}@{info['step']}", "info": info}


def _load_hf_export(path: str) -> Dict[str, Any]:
    """A directory written by ``hetclip-export --format hf`` (or any HF CLIP directory with a fast tokenizer)."""
    import json

    from hetclip.data.tokenizers import load_tokenizer
    from hetclip.hf import params_from_hf
    from hetclip.model import Encoders

    params, cfg = params_from_hf(path)
    image_size = cfg.vision.image_size
    resize_size = None
    pre_path = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pre_path):
        with open(pre_path, encoding="utf-8") as f:
            pre = json.load(f)
        crop = pre.get("crop_size", image_size)
        image_size = int(crop.get("height", image_size) if isinstance(crop, dict) else crop)
        size = pre.get("size")
        if isinstance(size, dict) and "shortest_edge" in size:
            resize_size = int(size["shortest_edge"])
    tok = load_tokenizer(path, context_length=cfg.text.context_length)
    info = {"checkpoint": os.path.abspath(path), "step": None, "format": "hf_export"}
    return {"encoders": Encoders(cfg, params), "tokenizer": tok, "image_size": image_size,
            "resize_size": resize_size, "model_id": f"hf:{info['checkpoint']}", "info": info}


def _table(rows: Dict[str, Any]) -> str:
    width = max(len(k) for k in rows)
    out = []
    for k, v in rows.items():
        out.append(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(out)


def _write_json(path: Optional[str], obj) -> None:
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="training work dir or its checkpoints/ dir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="image decoding threads")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N images")
    p.add_argument("--out", default=None, help="write results JSON here, in CLIP_benchmark's layout; may hold its "
                   "placeholders {dataset} {model} {pretrained} {task} {language}")
    p.add_argument("--dataset-name", default=None, help="dataset name in the results (default: imagenet1k for "
                   "--imagenet, else the data directory's name)")
    p.add_argument("--no-shard", action="store_true", help="do not shard batches over devices")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def _check_out(template: Optional[str]) -> None:
    """A bad ``--out`` placeholder fails before the evaluation, not after it."""
    if template:
        try:
            report.output_path(template, {k: "x" for k in report.PLACEHOLDERS})
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``hetclip-zero-shot``: exit status 0, or 2 with one message for a user error."""
    from hetclip.cli import guarded

    argv = sys.argv[1:] if argv is None else list(argv)
    return guarded("hetclip-zero-shot", lambda: run(argv), argv)


def run(argv: Sequence[str]) -> Dict[str, Any]:
    """The zero-shot command's work: parse ``argv``, evaluate, print the table, write ``--out``; the results."""
    p = argparse.ArgumentParser(prog="hetclip-zero-shot", description="Zero-shot classification evaluation.")
    _common_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--imagenet", metavar="DIR", help="ImageNet val: 1000 WNID class folders")
    src.add_argument("--data", metavar="DIR|PATTERN", help="class-folder tree or .cls webdataset shards")
    p.add_argument("--classnames", default=None, help="class names file (default: folder names/classnames.txt)")
    p.add_argument("--templates", default="clip80", help=f"{'|'.join(TEMPLATE_SETS)} or a file")
    p.add_argument("--canonicalize", action="store_true",
                   help="lower-case and strip punctuation from class names and prompts")
    p.add_argument("--mc-samples", type=int, default=0, help="HET-XL MC samples for the predictive (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-batch-size", type=int, default=256)
    p.add_argument("--cache-dir", default=None, help="cache classifier weights here")
    p.add_argument("--plot", metavar="DIR", default=None, help="write a reliability diagram (PNG) here; needs "
                   "the plot extra: pip install 'hetclip[plot]'")
    args = p.parse_args(argv)
    _check_out(args.out)
    if args.plot:
        from hetclip.zero_shot.plots import PlotUnavailable, require_matplotlib

        try:
            require_matplotlib()  # before any work
        except PlotUnavailable as e:
            raise SystemExit(f"error: {e}") from None
    _positive("--batch-size", args.batch_size)
    _positive("--limit", args.limit)
    if args.mc_samples < 0:
        raise ValueError(f"--mc-samples must be >= 0, got {args.mc_samples}")
    load_templates(args.templates)  # fail early on a bad template spec
    ck = load_checkpoint(args.checkpoint, args.step)
    het = getattr(getattr(ck["encoders"], "config", None), "het", None)
    if args.mc_samples and het is not None and not het.enabled:
        raise ValueError("--mc-samples needs a model with the HET-XL head (het.enabled=False)")
    result = run_zero_shot(
        ck["encoders"], ck["tokenizer"], args.imagenet or args.data, args.classnames, args.templates,
        ck["image_size"], imagenet=bool(args.imagenet), canonicalize=args.canonicalize,
        batch_size=args.batch_size, text_batch_size=args.text_batch_size, limit=args.limit,
        mc_samples=args.mc_samples, seed=args.seed, workers=args.workers, resize_size=ck["resize_size"],
        model_id=ck["model_id"], cache_dir=args.cache_dir, shard=False if args.no_shard else None,
        progress=not args.no_progress)
    result.update(ck["info"])
    result["command"] = "hetclip-zero-shot"
    result["argv"] = list(argv)
    result["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    print(_table(dict(dataset=args.imagenet or args.data, images=result["dataset"]["images_evaluated"],
                      templates=args.templates, **result["metrics"])))
    name = args.dataset_name or report.dataset_name(args.imagenet or args.data, bool(args.imagenet))
    _write_record(args.out, result, report.CLASSIFICATION, name, ck)
    if args.plot:
        from hetclip.zero_shot.plots import write_reliability_plot

        print(f"reliability diagram: {write_reliability_plot(result, args.plot, name)}")
    return result


def _write_record(template: Optional[str], result: Dict[str, Any], task: str, dataset: str, ck: Dict[str, Any]):
    if not template:
        return
    model = report.model_name(getattr(ck["encoders"], "config", None))
    rec = report.record(result, task=task, dataset=dataset, model=model,
                        pretrained=report.pretrained_tag(ck["info"], ck.get("model_id")))
    _write_json(report.output_path(template, rec), rec)


def run_retrieval(encoders, tokenizer, shards: str, image_size: int = 224, *, batch_size: int = 64,
                  text_batch_size: int = 256, limit: Optional[int] = None, workers: int = 4,
                  resize_size: Optional[int] = None, shard: Optional[bool] = None,
                  progress: bool = False) -> Dict[str, Any]:
    """Image–text retrieval recall@{1,5,10} on webdataset shards (``KEY.jpg`` + ``KEY.txt``)."""
    source = ds.WdsRetrieval(shards)
    batches = ds.EvalBatches(source, image_size, batch_size, workers=workers, limit=limit,
                             resize_size=resize_size)
    bar = _progress(limit, "retrieval", progress)
    try:
        metrics = evaluate_retrieval(encoders.image_embeddings, encoders.text_embeddings, tokenizer, batches,
                                     batch_size=batch_size, text_batch_size=text_batch_size, shard=shard,
                                     progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return {"metrics": metrics,
            "dataset": dict(source.describe(), images_skipped=len(batches.skipped), limit=limit,
                            samples_without_image_or_caption=source.incomplete),
            "preprocess": {"image_size": int(image_size), "resize_shortest_side": int(resize_size or image_size),
                           "crop": "center", "interpolation": "bicubic"},
            "text": {"tokenizer": classifier_info([], [], tokenizer, False)["tokenizer"],
                     "context_length": getattr(tokenizer, "context_length", None)},
            "batch_size": int(batch_size)}


def retrieval_main(argv: Optional[Sequence[str]] = None) -> int:
    """``hetclip-retrieval``: exit status 0, or 2 with one message for a user error."""
    from hetclip.cli import guarded

    argv = sys.argv[1:] if argv is None else list(argv)
    return guarded("hetclip-retrieval", lambda: retrieval_run(argv), argv)


def retrieval_run(argv: Sequence[str]) -> Dict[str, Any]:
    """The retrieval command's work: parse ``argv``, evaluate, print, write ``--out``; the results."""
    p = argparse.ArgumentParser(prog="hetclip-retrieval", description="Image-text retrieval evaluation.")
    _common_args(p)
    p.add_argument("--data", required=True, metavar="DIR|PATTERN", help="image-text webdataset shards")
    p.add_argument("--text-batch-size", type=int, default=256)
    args = p.parse_args(argv)
    _positive("--batch-size", args.batch_size)
    _positive("--limit", args.limit)
    _check_out(args.out)
    ck = load_checkpoint(args.checkpoint, args.step)
    result = run_retrieval(ck["encoders"], ck["tokenizer"], args.data, ck["image_size"],
                           batch_size=args.batch_size, text_batch_size=args.text_batch_size, limit=args.limit,
                           workers=args.workers, resize_size=ck["resize_size"],
                           shard=False if args.no_shard else None, progress=not args.no_progress)
    result.update(ck["info"])
    result["command"] = "hetclip-retrieval"
    result["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    print(_table(dict(data=args.data, **result["metrics"])))
    _write_record(args.out, result, report.RETRIEVAL, args.dataset_name or report.dataset_name(args.data), ck)
    return result


if __name__ == "__main__":
    from hetclip.allocator import reexec_with_mimalloc

    reexec_with_mimalloc()  # as the console script does (python -m is kept on re-execution)
    sys.exit(main())
