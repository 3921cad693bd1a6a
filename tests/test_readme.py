"""The README's commands use flags the tools have, its quick start is the two commands, and its size
stays within the guide's budget."""
import re
import shlex
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")

# console script -> (module, function) run in-process with --help (the scripts re-execute themselves)
TOOLS = {
    "hetclip-train": ("hetclip.train", "main"),
    "hetclip-zero-shot": ("hetclip.zero_shot.cli", "main"),
    "hetclip-retrieval": ("hetclip.zero_shot.cli", "retrieval_main"),
    "hetclip-export": ("hetclip.export", "main"),
    "hetclip-shards": ("hetclip.data.tools", "main"),
    "hetclip-train-bpe": ("hetclip.data.bpe", "main"),
}


def readme_commands():
    """``(tool, [args])`` for every hetclip command in the README's shell blocks (continuations joined)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            for part in re.split(r"&&|\"", line):
                m = re.search(r"(hetclip-[a-z-]+)((?:\s+[^#]*)?)", part)
                if m and m.group(1) in TOOLS:
                    out.append((m.group(1), shlex.split(m.group(2).replace("…", "X"), comments=True)))
    return out


def _help(tool, sub, capsys):
    import importlib

    module, function = TOOLS[tool]
    fn = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit):
        fn(([sub] if sub else []) + ["--help"])
    return capsys.readouterr().out


def test_readme_flags_exist(capsys):
    commands = readme_commands()
    assert {tool for tool, _ in commands} >= {"hetclip-train", "hetclip-zero-shot", "hetclip-export",
                                              "hetclip-shards", "hetclip-train-bpe", "hetclip-retrieval"}
    for tool, args in commands:
        sub = args[0] if tool == "hetclip-shards" and args and not args[0].startswith("-") else None
        text = _help(tool, sub, capsys)
        for flag in (a.split("=")[0] for a in args if a.startswith("--") and not a.startswith("--config.")):
            if flag == "--config":
                continue  # hetclip-train's --config is parsed before argparse
            assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", text), f"{tool} {sub or ''}: {flag} is not in --help"


def test_quick_start_is_the_two_commands():
    assert "pip install -e . && hetclip-train --config demo\n" in README
    assert 'pip install -e ".[test]" && pytest\n' in README


def test_readme_budget():
    lines = README.splitlines()
    assert len(lines) <= 150
    perf = README[README.index("## Performance"):]
    perf = perf[:perf.index("\n## ", 1)] if "\n## " in perf[1:] else perf
    assert len(perf.splitlines()) <= 20


def test_readme_train_overrides_are_real_keys():
    from hetclip import config as config_lib

    for tool, args in readme_commands():
        if tool != "hetclip-train":
            continue
        spec, overrides, _ = config_lib.split_argv(args)
        config_lib.apply_overrides(config_lib.load_config(spec), overrides)  # raises on an unknown key
