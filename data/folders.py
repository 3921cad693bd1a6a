"""Class-folder trees: ``root/<class>/.../<image>``, label = position of the class folder in sorted order
(the torchvision ``ImageFolder`` convention, and the layout of ImageNet's validation set).

Hidden folders and files are ignored, so are files whose extension is not in ``shards.IMAGE_EXTS``
(counted in ``ignored``). A class folder without images keeps its label (listed in ``empty``): class
indices must not shift because one folder is empty.
"""

from __future__ import annotations

import dataclasses
import os

from .shards import IMAGE_EXTS, is_image_name


@dataclasses.dataclass
class ClassFolders:
    root: str
    classes: list[str]                # folder names, sorted; label k = classes[k]
    files: list[tuple[str, int]]      # (path, label), folders in label order, files sorted within
    empty: list[str]                  # class folders holding no image
    ignored: int                      # non-image files skipped


def summarise(items: list[str], limit: int = 10) -> str:
    """``a, b, c, ... and 7 more``."""
    head = ", ".join(items[:limit])
    return head + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def scan(root: str) -> ClassFolders:
    """List a class-folder tree; raises ``FileNotFoundError`` / ``ValueError`` naming ``root`` when it is
    missing, has no class folders, or holds no image at all."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root!r}")
    entries = sorted(os.listdir(root))
    classes = [e for e in entries if not e.startswith(".") and os.path.isdir(os.path.join(root, e))]
    if not classes:
        stray = [e for e in entries if is_image_name(e)]
        hint = f" (it holds {len(stray)} image files directly; expected one sub-folder per class)" if stray else ""
        raise ValueError(f"no class folders in {root!r}{hint}")
    files: list[tuple[str, int]] = []
    empty: list[str] = []
    ignored = 0
    for label, folder in enumerate(classes):
        n = len(files)
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.startswith("."):
                    continue
                if is_image_name(f):
                    files.append((os.path.join(dirpath, f), label))
                else:
                    ignored += 1
        if len(files) == n:
            empty.append(folder)
    if not files:
        raise ValueError(f"no images (extensions {', '.join(IMAGE_EXTS)}) under {root!r}")
    return ClassFolders(root, classes, files, empty, ignored)
