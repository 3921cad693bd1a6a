"""Parameter counting: DET / HET / HET-XL classifier heads and dual-encoder towers.

``hetclip-params --scale jft4b`` reproduces the paper's headline (HET's extra parameters ≈ 14×
HET-XL's at JFT-4B scale: ``K / D = 29,593 / 2,048``); ``hetclip-params --preset B/32`` prints the
dual-encoder parameter count by tower. Counts match the Flax modules in ``hetclip.heads`` exactly
(classifier ``W [D, K]`` + bias, noise projections with bias, one temperature parameter).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional, Sequence

# Paper settings. JFT-4B: 29,593 classes, 2,048-wide pre-logits, R = 50, parameter-efficient.
# ImageNet-21k: 21,843 classes; D = 2,048 (a ResNet-152's pre-logit width; pass --dim for a ViT's
# width) and the same R so that the two rows are comparable.
SCALES = {
    "jft4b": {"num_classes": 29593, "dim": 2048, "num_factors": 50, "param_efficient": True},
    "imagenet21k": {"num_classes": 21843, "dim": 2048, "num_factors": 50, "param_efficient": True},
}


@dataclasses.dataclass(frozen=True)
class HeadCount:
    method: str
    classifier: int  # W [D, K] + bias [K]
    extra: int       # noise projections (+ C) + temperature

    @property
    def total(self) -> int:
        return self.classifier + self.extra


def _check(num_classes: int, dim: int, num_factors: int):
    for name, value in (("num_classes", num_classes), ("dim", dim), ("num_factors", num_factors)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


def noise_params(dim: int, num_inputs: int, num_factors: int, param_efficient: bool) -> int:
    """Parameters of ``hetclip.heads.low_rank_noise`` over ``dim`` coordinates from ``num_inputs`` features:
    diag ``A_d [F, dim] + b_d``; PE ``A_v [F, dim] + b_v`` and ``C [dim, R]``; full ``A_V [F, dim·R] + b_V``."""
    diag = num_inputs * dim + dim
    if param_efficient:
        low = num_inputs * dim + dim + dim * num_factors
    else:
        low = num_inputs * dim * num_factors + dim * num_factors
    return diag + low


def head_counts(num_classes: int, dim: int, num_factors: int, param_efficient: bool = True) -> list[HeadCount]:
    """DET, HET (noise over the ``K`` logits) and HET-XL (noise over the ``D`` pre-logits)."""
    _check(num_classes, dim, num_factors)
    classifier = dim * num_classes + num_classes
    temperature = 1
    return [
        HeadCount("DET", classifier, 0),
        HeadCount("HET", classifier, noise_params(num_classes, dim, num_factors, param_efficient) + temperature),
        HeadCount("HET-XL", classifier, noise_params(dim, dim, num_factors, param_efficient) + temperature),
    ]


def extra_ratio(num_classes: int, dim: int, num_factors: int, param_efficient: bool = True) -> float:
    """HET's extra parameters divided by HET-XL's (≈ K / D)."""
    counts = {c.method: c for c in head_counts(num_classes, dim, num_factors, param_efficient)}
    return counts["HET"].extra / counts["HET-XL"].extra


def head_table(num_classes: int, dim: int, num_factors: int, param_efficient: bool = True) -> str:
    counts = head_counts(num_classes, dim, num_factors, param_efficient)
    xl = counts[2].extra
    form = "parameter-efficient" if param_efficient else "full"
    lines = [f"K={num_classes:,} classes, D={dim:,} pre-logits, R={num_factors}, {form} low rank",
             f"{'method':<8} {'classifier':>15} {'extra (noise)':>15} {'total':>15} {'extra / HET-XL':>15}",
             "-" * 72]
    for c in counts:
        ratio = f"{c.extra / xl:.2f}x" if c.extra else "-"
        lines.append(f"{c.method:<8} {c.classifier:>15,} {c.extra:>15,} {c.total:>15,} {ratio:>15}")
    return "\n".join(lines)


def tower_counts(cfg) -> dict[str, int]:
    """Parameters of ``DualEncoder(cfg)`` by top-level group (abstract init, no allocation)."""
    from hetclip.model import abstract_params, count_params
    params = abstract_params(cfg)
    out = {name: count_params(sub) for name, sub in params.items()}
    out["total"] = sum(out.values())
    return out


def tower_table(name: str, cfg) -> str:
    counts = tower_counts(cfg)
    lines = [f"DualEncoder {name}: embed_dim={cfg.embed_dim}, vision {cfg.vision.width}x{cfg.vision.layers} "
             f"patch {cfg.vision.patch_size} @ {cfg.vision.image_size}px, text {cfg.text.width}x{cfg.text.layers} "
             f"vocab {cfg.text.vocab_size} ctx {cfg.text.context_length}, HET-XL {'on' if cfg.het.enabled else 'off'}",
             f"{'group':<20} {'parameters':>15}", "-" * 36]
    for group, n in counts.items():
        if group == "total":
            lines.append("-" * 36)
        lines.append(f"{group:<20} {n:>15,}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetclip-params", description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), help="paper setting for K, D, R (overridable below)")
    p.add_argument("--classes", type=int, help="number of classes K")
    p.add_argument("--dim", type=int, help="pre-logit width D")
    p.add_argument("--factors", type=int, help="low-rank factors R")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--full", action="store_true", help="full low-rank form V = reshape(A h + b)")
    form.add_argument("--param-efficient", action="store_true", help="V = diag(v) C (default)")
    p.add_argument("--preset", help="count a dual-encoder preset by tower instead (e.g. B/32)")
    p.add_argument("--het", action="store_true", help="with --preset: enable the HET-XL embedding head")
    p.add_argument("--loss", choices=("softmax", "sigmoid"), default="softmax", help="with --preset")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.preset:
            from hetclip.model import preset
            het = {"enabled": args.het}
            if args.factors:
                het["num_factors"] = args.factors
            if args.full:
                het["param_efficient"] = False
            cfg = preset(args.preset, het=het, loss=args.loss)
            print(json.dumps(tower_counts(cfg), indent=2) if args.json else tower_table(args.preset, cfg))
            return 0
        base = dict(SCALES[args.scale]) if args.scale else {"num_classes": None, "dim": None, "num_factors": 50,
                                                               "param_efficient": True}
        for key, val in (("num_classes", args.classes), ("dim", args.dim), ("num_factors", args.factors)):
            if val is not None:
                base[key] = val
        if args.full:
            base["param_efficient"] = False
        missing = [k for k in ("num_classes", "dim") if base[k] is None]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}: give --scale {{{','.join(sorted(SCALES))}}} "
                             "or --classes K --dim D (or --preset NAME)")
        if args.json:
            counts = head_counts(**base)
            print(json.dumps({"settings": base, "heads": [dict(dataclasses.asdict(c), total=c.total) for c in counts],
                              "het_over_hetxl_extra": extra_ratio(**base)}, indent=2))
        else:
            print(head_table(**base))
            print(f"HET extra / HET-XL extra = {extra_ratio(**base):.2f}x (K/D = {base['num_classes'] / base['dim']:.2f})")
        return 0
    except ValueError as e:
        print(f"hetclip-params: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
