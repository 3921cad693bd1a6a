"""Console-script entry points (``pyproject.toml``) of the heavy tools, and the error policy of every command.

Each heavy tool re-executes once with the faster allocator (``hetclip.allocator``), then imports and
runs the module's ``main``. Calling those ``main`` functions in-process (as the tests do) never
re-executes.

Every ``main`` returns an exit status through ``guarded``: 0 on success, 2 for an expected error
(bad input, config, checkpoint, disk), printed as one message that names the file, key or step;
a traceback only for a bug, or with ``--debug`` / ``HETCLIP_DEBUG=1``. ``guarded`` also sets up the
command's log output (``configure_logging``: hetclip's INFO lines in ``LOG_FORMAT``; ``--quiet``,
``--verbose`` where a command has them).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Callable, Sequence

from hetclip.allocator import reexec_with_mimalloc


def is_expected(e: BaseException) -> bool:
    """Errors a user can act on: bad values and files (ValueError, OSError) and hetclip's own error types."""
    # a hetclip module run as ``python -m`` defines its errors in ``__main__``
    return isinstance(e, (ValueError, OSError)) or type(e).__module__.split(".")[0] in ("hetclip", "__main__")


def guarded(prog: str, body: Callable[[], object], argv: Sequence[str] = ()) -> int:
    """Run ``body`` and turn its outcome into an exit status (see the module docstring)."""
    debug = "--debug" in argv or os.environ.get("HETCLIP_DEBUG", "") not in ("", "0")
    configure_logging("quiet" if "--quiet" in argv else "verbose" if "--verbose" in argv else "info")
    try:
        status = body()
    except KeyboardInterrupt as e:
        print(f"{prog}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into expected errors and bugs below
        if debug or not is_expected(e):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# orbax logs through absl, and its failed background writes through asyncio; hetclip reports each such
# failure itself (``checkpoint.CheckpointError``), so their records show with ``--verbose`` only.
_ONLY_VERBOSE = ("absl", "asyncio")


class _Threshold(logging.Filter):
    """hetclip's records from ``level`` up; other libraries' from WARNING (``_ONLY_VERBOSE``: none) unless
    ``level`` is DEBUG (``--verbose``: everything from INFO up, hetclip's from DEBUG)."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name == "hetclip" or name.startswith("hetclip."):
            return record.levelno >= self.level
        if self.level <= logging.DEBUG:
            return record.levelno >= logging.INFO
        if name.split(".")[0] in _ONLY_VERBOSE:
            return False
        return record.levelno >= logging.WARNING


def configure_logging(verbosity: str = "info") -> None:
    """The log output of a command (``verbosity``: ``quiet``, ``info`` or ``verbose``), on stderr in
    ``LOG_FORMAT``. Replaces whatever handlers the root logger already has: importing orbax lets absl
    call ``logging.basicConfig`` at WARNING first, which would leave hetclip's INFO records unseen."""
    level = {"quiet": logging.WARNING, "info": logging.INFO, "verbose": logging.DEBUG}[verbosity]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_Threshold(level))
    logging.basicConfig(level=min(level, logging.INFO), handlers=[handler], force=True)
    logging.getLogger("absl").setLevel(logging.INFO if level <= logging.DEBUG else logging.ERROR)  # the rest unmade


def _tool(module: str, function: str = "main") -> Callable[[], int]:
    def run() -> int:
        reexec_with_mimalloc()
        return getattr(importlib.import_module(module), function)()
    run.__name__ = run.__qualname__ = f"{module.rsplit('.', 1)[-1]}_{function}"
    return run


train = _tool("hetclip.train")
zero_shot = _tool("hetclip.zero_shot.cli")
retrieval = _tool("hetclip.zero_shot.cli", "retrieval_main")
export = _tool("hetclip.export")
