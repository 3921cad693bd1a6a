"""Files written so that a crash never leaves a half-written one."""
from __future__ import annotations

import json
import os


def write_json_atomic(path: str, obj) -> None:
    """``obj`` as JSON at ``path``: written beside it, flushed to disk, then renamed over it."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=list)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
