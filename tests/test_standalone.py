"""The repository stands on its own: no tracked text file names one machine's absolute paths (a home,
scratch or work directory) or a file beside the repository (`../shared`), which a clone does not have.
Results and reports use relative paths or placeholders (`<pretrain>/export_hf`, `runs/lit/...`)."""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# an absolute path into a machine's own directories: not part of a longer word or path
# (`runs/tmp/`, `~/work/` and `x.home/` are not absolute), `/tmp` alone or followed by `/`, a quote...
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:work|tmp|root|home|Users|mnt)(?![\w.-])")
OUTSIDE = re.compile(r"\.\./shared\b")
SELF = Path(__file__).resolve().relative_to(REPO).as_posix()


def offending_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line naming a machine path or `../shared`."""
    return [(i, line) for i, line in enumerate(text.splitlines(), 1)
            if MACHINE_PATH.search(line) or OUTSIDE.search(line)]


def test_the_pattern_finds_machine_paths_and_spares_relative_ones():
    text = ("--pretrained /work/lit/export_hf\n"      # 1: a work directory
            'demo_dir = "/tmp"\n'                      # 2: the scratch directory itself
            "cd /home/me && ls /root/x\n"              # 3
            "see ../shared/DESIGN.md §2\n"             # 4: a file beside the repository
            "--root runs/tmp/e1 --venv ../ocvenv\n"    # relative: fine
            "~/work/x and a.home/y and /data/imagenet/val and /dev/shm and /proc/self\n"
            "<pretrain>/export_hf, https://example.org/home/page\n")
    assert [i for i, _ in offending_lines(text)] == [1, 2, 3, 4]


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout ({e})")
    files = []
    for name in out.decode().split("\0"):
        path = REPO / name
        if not name or name == SELF or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary (figures)
            continue
        files.append(path)
    return files


def test_no_tracked_file_names_a_machine_path_or_a_file_beside_the_repository():
    files = tracked_text_files()
    assert any(f.name == "README.md" for f in files)  # the listing itself worked
    hits = [f"{f.relative_to(REPO).as_posix()}:{i}: {line.strip()[:160]}"
            for f in files for i, line in offending_lines(f.read_text(encoding="utf-8", errors="replace"))]
    assert not hits, "machine paths or ../shared in tracked files (use relative paths or placeholders):\n" + \
        "\n".join(hits)
