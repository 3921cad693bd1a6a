"""bench/profile_step.py through its command line: a tiny profile of the real training step, whose op
classification is checked against the step's analytic matmul FLOPs."""
import json
import math

import pytest

from hetclip.model import preset

KINDS = ["dense matmul", "attention matmul", "layout copy", "reduction", "elementwise", "async matmul"]


def _matmul_flops(batch: int) -> tuple[float, float]:
    """(dense, attention) matmul FLOPs of one DET training step of the tiny preset (2 per multiply-add).

    Backward = 2x forward (input and weight gradients), except the patch embedding (no input gradient:
    the images are data) and the token embedding (a gather, no matmul)."""
    c = preset("tiny")
    v, t, d = c.vision, c.text, c.embed_dim
    tv, tt = (v.image_size // v.patch_size) ** 2 + 1, t.context_length
    dense = (24 * tv * v.width ** 2 * v.layers + 24 * tt * t.width ** 2 * t.layers
             + 2 * v.width * d + 2 * t.width * d)  # towers and projections, forward, per example
    patch = 2 * (tv - 1) * v.patch_size ** 2 * 3 * v.width
    logits = 2 * batch * batch * d  # image-text similarities of the batch, forward
    attention = 4 * tv ** 2 * v.width * v.layers + 4 * tt ** 2 * t.width * t.layers
    return 3 * batch * dense + 2 * batch * patch + 3 * logits, 3 * batch * attention


@pytest.mark.slow
def test_tiny_profile_accounts_for_every_matmul(run_bench, tmp_path):
    batch = 2
    proc = run_bench("profile_step", "--model", "tiny", "--batch", batch, "--steps", 1, "--timed-steps", 1,
                     "--torch-python", "", "--out", tmp_path / "prof",
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "prof.json").read_text())
    dense, attention = _matmul_flops(batch)
    # every dot of the compiled step found in its HLO and classified by whether it has batch dimensions
    assert rep["dense_gflop"] * 1e9 == pytest.approx(dense, rel=1e-6)
    kinds = {r["kind"]: r for r in rep["kinds"]}
    assert list(kinds) == KINDS
    # the traced ops cover all of them (async ones are dense or attention matmuls whose event is the launch)
    traced = sum(kinds[k]["gflop"] for k in ("dense matmul", "attention matmul", "async matmul")) * 1e9
    assert traced == pytest.approx(dense + attention, rel=1e-6)
    assert kinds["attention matmul"]["gflop"] * 1e9 <= attention * (1 + 1e-6)
    assert math.isclose(sum(r["share"] for r in rep["kinds"]), 1.0)
    assert sum(r["ops"] for r in rep["kinds"]) == sum(g["count"] for g in rep["op_groups"])
    assert all(r["s"] >= 0 for r in rep["kinds"]) and rep["op_s"] > 0 and rep["step_s"] > 0
    assert rep["ceiling"]["jax_gflops"] > 0 and "torch_gflops" not in rep["ceiling"]
    text = (tmp_path / "prof.md").read_text()
    assert "| dense matmul |" in text and "Matmul ceiling" in text


def test_unknown_model_is_named(run_bench, tmp_path):
    proc = run_bench("profile_step", "--model", "B/23", "--torch-python", "", "--out", tmp_path / "prof",
                     env={"HETCLIP_ALLOCATOR": "system"}, timeout=120)
    assert proc.returncode == 2 and "--model: unknown model preset 'B/23'" in proc.stderr
    assert list(tmp_path.iterdir()) == []
