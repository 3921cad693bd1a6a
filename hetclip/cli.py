"""Console-script entry points (``pyproject.toml``): the heavy tools run with the faster allocator
(``hetclip.allocator``); calling the modules' ``main`` functions in-process changes nothing."""
from __future__ import annotations

from hetclip.allocator import reexec_with_mimalloc


def train():
    reexec_with_mimalloc()
    from hetclip.train import main
    return main()


def zero_shot():
    reexec_with_mimalloc()
    from hetclip.zero_shot.cli import main
    return main()


def retrieval():
    reexec_with_mimalloc()
    from hetclip.zero_shot.cli import retrieval_main
    return retrieval_main()


def export():
    reexec_with_mimalloc()
    from hetclip.export import main
    return main()
