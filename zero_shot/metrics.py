"""Classification and retrieval metrics (numpy, streaming where the dataset can be large).

Classification (``ClassificationMeter``; the functions below wrap it for whole arrays):

* top-k accuracy: the label is among the ``k`` highest-scoring classes (ties broken by class order);
* mean per-class recall: per-class accuracy averaged over the classes that occur in the labels;
* NLL: ``-mean log p(y|x)`` from log-probabilities;
* ECE: 15 equal-width bins on the max probability, bin ``b`` = ``((b)/15, (b+1)/15]`` (a confidence of
  exactly 0 goes to the first bin); ``ECE = Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|``.

Retrieval (``retrieval_recall``): image→text recall@k counts an image as a hit when **at least one** of
its captions ranks in the top ``k`` texts (CLIP's rule for several captions per image); text→image
recall@k counts a caption as a hit when its image ranks in the top ``k`` images. Ranks count strictly
better scores, so ties are resolved in favour of the correct item.
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence

import numpy as np


def _check(log_probs: np.ndarray, labels: np.ndarray):
    log_probs = np.asarray(log_probs, dtype=np.float64)
    labels = np.asarray(labels)
    if log_probs.ndim != 2:
        raise ValueError(f"expected scores of shape [N, C], got {log_probs.shape}")
    if labels.shape != (log_probs.shape[0],):
        raise ValueError(f"labels shape {labels.shape} does not match scores {log_probs.shape}")
    _require_finite(log_probs, "scores")
    if labels.size and (labels.min() < 0 or labels.max() >= log_probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {log_probs.shape[1]}), got range "
                         f"[{labels.min()}, {labels.max()}]")
    return log_probs, labels.astype(np.int64)


def _require_finite(x: np.ndarray, what: str) -> None:
    """Non-finite scores would count as hits (ranks count strictly better scores): refuse them."""
    bad = ~np.isfinite(x).all(axis=tuple(range(1, x.ndim)))
    if bad.any():
        raise ValueError(f"non-finite {what} for {int(bad.sum())} of {x.shape[0]} item(s) (first: row "
                         f"{int(np.argmax(bad))}); the model's weights or inputs are not finite")


class ClassificationMeter:
    """Accumulates top-k hits, per-class counts, NLL and ECE bins over batches of log-probabilities."""

    def __init__(self, num_classes: int, topk: Sequence[int] = (1, 5), num_bins: int = 15):
        self.num_classes = int(num_classes)
        self.topk = tuple(int(k) for k in topk)
        self.num_bins = int(num_bins)
        self.count = 0
        self.hits = {k: 0 for k in self.topk}
        self.class_total = np.zeros(self.num_classes, np.int64)
        self.class_correct = np.zeros(self.num_classes, np.int64)
        self.nll_sum = 0.0
        self.bin_count = np.zeros(self.num_bins, np.int64)
        self.bin_conf = np.zeros(self.num_bins, np.float64)
        self.bin_correct = np.zeros(self.num_bins, np.float64)

    def update(self, log_probs, labels) -> None:
        """``log_probs [N, C]`` (normalised log-probabilities), ``labels [N]`` int."""
        log_probs, labels = _check(log_probs, labels)
        if log_probs.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} classes, got scores {log_probs.shape}")
        n = labels.shape[0]
        if n == 0:
            return
        rows = np.arange(n)
        true = log_probs[rows, labels]
        # rank of the label = classes scoring strictly higher + equal-scoring classes before it
        higher = (log_probs > true[:, None]).sum(1)
        ties_before = ((log_probs == true[:, None]) & (np.arange(self.num_classes)[None] < labels[:, None])).sum(1)
        rank = higher + ties_before
        for k in self.topk:
            self.hits[k] += int((rank < k).sum())
        pred = np.argmax(log_probs, axis=1)
        correct = pred == labels
        np.add.at(self.class_total, labels, 1)
        np.add.at(self.class_correct, labels, correct.astype(np.int64))
        self.nll_sum += float(-true.sum())
        conf = np.exp(log_probs[rows, pred])
        b = np.clip(np.ceil(conf * self.num_bins).astype(np.int64) - 1, 0, self.num_bins - 1)
        np.add.at(self.bin_count, b, 1)
        np.add.at(self.bin_conf, b, conf)
        np.add.at(self.bin_correct, b, correct.astype(np.float64))
        self.count += n

    def reliability(self) -> Dict[str, list]:
        """The ECE bins as a reliability diagram: per bin its ``lower``/``upper`` confidence edge, the number
        of examples ``count``, their mean confidence ``confidence`` and accuracy ``accuracy`` (``None`` for
        an empty bin). ``Σ count/N · |accuracy − confidence|`` is the ECE of ``result``."""
        filled = self.bin_count > 0
        safe = np.maximum(self.bin_count, 1)
        return {"lower": [b / self.num_bins for b in range(self.num_bins)],
                "upper": [(b + 1) / self.num_bins for b in range(self.num_bins)],
                "count": self.bin_count.tolist(),
                "confidence": [float(c) if f else None for c, f in zip(self.bin_conf / safe, filled)],
                "accuracy": [float(a) if f else None for a, f in zip(self.bin_correct / safe, filled)]}

    def result(self, prefix: str = "") -> Dict[str, float]:
        if self.count == 0:
            raise ValueError("no examples were evaluated")
        out = {f"{prefix}top{k}": self.hits[k] / self.count for k in self.topk}
        present = self.class_total > 0
        out[f"{prefix}mean_per_class_recall"] = float(
            np.mean(self.class_correct[present] / self.class_total[present]))
        out[f"{prefix}nll"] = self.nll_sum / self.count
        out[f"{prefix}ece"] = float(np.sum(np.abs(self.bin_correct - self.bin_conf)) / self.count)
        return out


def _meter(log_probs, labels, **kw) -> ClassificationMeter:
    log_probs, labels = _check(log_probs, labels)
    m = ClassificationMeter(log_probs.shape[1], **kw)
    m.update(log_probs, labels)
    return m


def topk_accuracy(scores, labels, ks: Iterable[int] = (1, 5)) -> Dict[int, float]:
    """Fraction of rows whose label is among the ``k`` highest scores, for each ``k``."""
    m = _meter(scores, labels, topk=tuple(ks))
    return {k: m.hits[k] / m.count for k in m.topk}


def mean_per_class_recall(scores, labels) -> float:
    return _meter(scores, labels).result()["mean_per_class_recall"]


def nll(log_probs, labels) -> float:
    return _meter(log_probs, labels).result()["nll"]


def ece(log_probs, labels, num_bins: int = 15) -> float:
    return _meter(log_probs, labels, num_bins=num_bins).result()["ece"]


def log_softmax(logits, axis: int = -1) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def retrieval_recall(image_emb, text_emb, text_to_image, ks: Sequence[int] = (1, 5, 10),
                     chunk: int = 1024) -> Dict[str, float]:
    """Recall@k both ways from ``image_emb [N, D]``, ``text_emb [M, D]`` (scored by dot product) and
    ``text_to_image [M]`` (index of each caption's image). Every image needs at least one caption."""
    img = np.asarray(image_emb, np.float32)
    txt = np.asarray(text_emb, np.float32)
    t2i = np.asarray(text_to_image, np.int64)
    n, m = img.shape[0], txt.shape[0]
    _require_finite(img, "image embeddings")
    _require_finite(txt, "text embeddings")
    if t2i.shape != (m,):
        raise ValueError(f"text_to_image has shape {t2i.shape}, expected ({m},)")
    if m and (t2i.min() < 0 or t2i.max() >= n):
        raise ValueError(f"text_to_image indices must lie in [0, {n})")
    counts = np.bincount(t2i, minlength=n)
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} image(s) have no caption, e.g. index "
                         f"{int(np.argmin(counts))}")
    # text -> image: rank of the caption's image among all images
    t2i_rank = np.empty(m, np.int64)
    for s in range(0, m, chunk):
        sims = txt[s:s + chunk] @ img.T                          # [c, N]
        own = sims[np.arange(sims.shape[0]), t2i[s:s + chunk]]
        t2i_rank[s:s + chunk] = (sims > own[:, None]).sum(1)
    # image -> text: best rank over the image's own captions = texts strictly above its best own caption
    i2t_rank = np.empty(n, np.int64)
    for s in range(0, n, chunk):
        sims = img[s:s + chunk] @ txt.T                          # [c, M]
        mine = t2i[None, :] == np.arange(s, s + sims.shape[0])[:, None]
        best_own = np.where(mine, sims, -np.inf).max(1)
        i2t_rank[s:s + chunk] = (sims > best_own[:, None]).sum(1)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float(np.mean(i2t_rank < k))
        out[f"text_to_image_R@{k}"] = float(np.mean(t2i_rank < k))
    return out
