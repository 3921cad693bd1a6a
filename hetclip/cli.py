"""Console-script entry points (``pyproject.toml``) of the heavy tools: each re-executes once with the
faster allocator (``hetclip.allocator``), then imports and runs the module's ``main``. Calling those
``main`` functions in-process (as the tests do) never re-executes."""
from __future__ import annotations

import importlib
from typing import Callable

from hetclip.allocator import reexec_with_mimalloc


def _tool(module: str, function: str = "main") -> Callable[[], object]:
    def run():
        reexec_with_mimalloc()
        return getattr(importlib.import_module(module), function)()
    run.__name__ = run.__qualname__ = f"{module.rsplit('.', 1)[-1]}_{function}"
    return run


train = _tool("hetclip.train")
zero_shot = _tool("hetclip.zero_shot.cli")
retrieval = _tool("hetclip.zero_shot.cli", "retrieval_main")
export = _tool("hetclip.export")
