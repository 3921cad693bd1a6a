"""A base install (no torch) prints no advice from transformers when hetclip loads it."""
import os
import subprocess
import sys

NOTICE = "PyTorch was not found"
HIDE_TORCH = "import sys; sys.modules['torch'] = None; "


def _stderr(code):
    env_clean = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    out = subprocess.run([sys.executable, "-c", HIDE_TORCH + code], capture_output=True, text=True, env=env_clean,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


def test_transformers_without_torch_is_quiet_under_hetclip():
    assert NOTICE in _stderr("import transformers")          # the notice exists without hetclip
    assert NOTICE not in _stderr("import hetclip.export; from transformers import CLIPConfig, AutoTokenizer")
