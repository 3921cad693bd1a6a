"""Command lines ``hetclip-zero-shot`` and ``hetclip-retrieval``: argument parsing and output around the
evaluation API in ``evaluate.py``.

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
import os
import sys
from typing import Any, Dict, Optional, Sequence

from hetclip import evals
from hetclip.zero_shot import evaluate as ev
from hetclip.zero_shot import report, uncertainty
from hetclip.zero_shot.templates import TEMPLATE_SETS, load_templates

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
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="image decoding processes (default: the CPU count, at most 16; 0: decode in this process)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail when more than this fraction of the images cannot be used (default 0.01)")
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
    p.add_argument("--plot", metavar="DIR", default=None, help="write the reliability diagram and the selective-"
                   "prediction curve (PNG) here; needs the plot extra: pip install 'hetclip[plot]'")
    p.add_argument("--per-image", metavar="FILE", default=None, help="write each image's prediction, confidence, "
                   "entropy and (HET-XL) noise size here (.csv or .jsonl; default with --out: beside it, "
                   "<out>_per_image.csv)")
    p.add_argument("--no-per-image", action="store_true", help="do not write the per-image file")
    args = p.parse_args(argv)
    _check_out(args.out)
    if args.per_image and os.path.splitext(args.per_image)[1].lower() not in (".csv", ".jsonl"):
        raise ValueError(f"--per-image {args.per_image!r} must end in .csv or .jsonl")
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
    ck = ev.load_model(args.checkpoint, args.step)
    het = getattr(getattr(ck["encoders"], "config", None), "het", None)
    if args.mc_samples and het is not None and not het.enabled:
        raise ValueError("--mc-samples needs a model with the HET-XL head (het.enabled=False)")
    ctx = _context(ck, args, seed=args.seed)
    evaluator = evals.build({"kind": "zero_shot", "name": "zero-shot", "dir": args.imagenet or args.data,
                             "layout": "imagenet" if args.imagenet else "auto", "classnames": args.classnames or "",
                             "templates": args.templates, "canonicalize": args.canonicalize,
                             "batch_size": args.batch_size, "text_batch_size": args.text_batch_size,
                             "limit": args.limit or 0, "mc_samples": args.mc_samples,
                             "max_bad_fraction": args.max_bad_fraction, "cache_dir": args.cache_dir or "",
                             "per_image": not args.no_per_image and bool(args.per_image or args.out)},
                            ctx, "hetclip-zero-shot")
    result = evaluator.run(ck["encoders"])
    images = result.pop("per_image", None)
    result.update(ck["info"])
    result["command"] = "hetclip-zero-shot"
    result["argv"] = list(argv)
    result["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    print(_table(dict(dataset=args.imagenet or args.data, images=result["dataset"]["images_evaluated"],
                      templates=args.templates, **result["metrics"])))
    print(_selective_text(result))
    name = args.dataset_name or report.dataset_name(args.imagenet or args.data, bool(args.imagenet))
    out_path = _write_record(args.out, result, report.CLASSIFICATION, name, ck)
    if images is not None:
        path = args.per_image or f"{os.path.splitext(out_path)[0]}_per_image.csv"
        print(f"per-image predictions: {uncertainty.write_per_image(path, images)}")
    if args.plot:
        from hetclip.zero_shot.plots import write_reliability_plot, write_selective_plot

        print(f"reliability diagram: {write_reliability_plot(result, args.plot, name)}")
        print(f"selective prediction: {write_selective_plot(result, args.plot, name)}")
    return result


def _context(ck: Dict[str, Any], args, seed: int = 0) -> "evals.Context":
    """The evaluators' context for a loaded model (``evaluate.load_model``) and the common arguments."""
    return evals.Context(getattr(ck["encoders"], "config", None), ck["tokenizer"], seed=seed, workers=args.workers,
                         image_size=ck["image_size"], resize_size=ck["resize_size"], model_id=ck["model_id"],
                         progress=not args.no_progress, shard=False if args.no_shard else None)


def _selective_text(result: Dict[str, Any]) -> str:
    """One line: how well each certainty score ranks the mistakes (AUROC) and the accuracy of the most
    certain 80 %; which scores are missing and why."""
    parts = []
    for name, rep in result.get("selective", {}).items():
        auroc = "n/a" if rep["auroc"] is None else f"{rep['auroc']:.4f}"
        parts.append(f"{name} AUROC {auroc} (top-80% acc {rep['accuracy_at']['0.8']:.4f})")
    missing = result.get("uncertainty", {}).get("missing", {})
    line = "misclassification detection: " + "; ".join(parts)
    if "noise" in missing:
        line += f" [noise size: {missing['noise']}]"
    return line


def _write_record(template: Optional[str], result: Dict[str, Any], task: str, dataset: str,
                  ck: Dict[str, Any]) -> Optional[str]:
    """Write the CLIP_benchmark record to ``template`` (placeholders filled); its path."""
    if not template:
        return None
    model = report.model_name(getattr(ck["encoders"], "config", None))
    rec = report.record(result, task=task, dataset=dataset, model=model,
                        pretrained=report.pretrained_tag(ck["info"], ck.get("model_id")))
    path = report.output_path(template, rec)
    _write_json(path, rec)
    return path


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
    ck = ev.load_model(args.checkpoint, args.step)
    ctx = _context(ck, args)
    result = evals.build({"kind": "retrieval", "dir": args.data, "batch_size": args.batch_size,
                          "text_batch_size": args.text_batch_size, "limit": args.limit or 0,
                          "max_bad_fraction": args.max_bad_fraction}, ctx, "hetclip-retrieval").run(ck["encoders"])
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
