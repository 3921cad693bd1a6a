"""bench/profile_step.py: op classification of optimised HLO and per-op times from a real profiler trace."""
import math

import jax
import jax.numpy as jnp
import pytest


@pytest.fixture(scope="module")
def prof(bench_script):
    return bench_script("profile_step")


def _attention_block(x, w, wo):
    b, t, d = x.shape
    h = (x @ w).reshape(b, t, 2, d // 2).transpose(0, 2, 1, 3)  # dense matmul, then heads-major
    p = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", h, h), axis=-1)  # batched matmul, reduction
    ctx = jnp.einsum("bhqk,bhkd->bhqd", p, h).transpose(0, 2, 1, 3).reshape(b, t, d)
    return jnp.tanh(ctx @ wo)


def test_classify_and_time_a_real_trace(prof, tmp_path):
    b, t, d = 4, 24, 32
    args = (jnp.ones((b, t, d)), jnp.ones((d, d)) * 0.01, jnp.ones((d, d)) * 0.01)
    compiled = jax.jit(_attention_block).lower(*args).compile()
    table = prof.classify(compiled.as_text())
    assert set(r["kind"] for r in table.values()) <= set(prof.KINDS)
    dense = sum(r["flops"] for r in table.values() if r["kind"] == "dense matmul")
    attention = sum(r["flops"] for r in table.values() if r["kind"] == "attention matmul")
    # two [b*t, d] x [d, d] projections; q·kᵀ and p·v over 2 heads of d/2
    assert dense == pytest.approx(2 * 2 * b * t * d * d)
    assert attention == pytest.approx(2 * (2 * b * 2 * t * t * (d // 2)))
    assert any(r["kind"] in ("reduction", "elementwise") for r in table.values() if not r["flops"])

    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(2):
            jax.block_until_ready(compiled(*args))
    times = prof.op_times(prof.read_trace(str(tmp_path)), table, steps=2)
    assert times and set(times) <= set(table)
    assert all(v > 0 for v in times.values())
    rows = prof.summarise(table, times)
    assert [r["kind"] for r in rows] == list(prof.KINDS)
    assert math.isclose(sum(r["share"] for r in rows), 1.0)
    assert sum(r["ops"] for r in rows) == len(times)


def test_parse_hlo_and_dot_flops(prof):
    text = """HloModule m

%fused (p0: f32[8,4,16], p1: f32[16,3]) -> f32[8,4,3] {
  %p0 = f32[8,4,16]{2,1,0} parameter(0)
  %p1 = f32[16,3]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,4,3]{2,1,0} dot(f32[8,4,16]{2,1,0} %p0, f32[16,3]{1,0} %p1), lhs_contracting_dims={2}, rhs_contracting_dims={0}
}

%moved (p0.1: f32[8,4,3]) -> f32[3,32] {
  %p0.1 = f32[8,4,3]{2,1,0} parameter(0)
  %transpose.2 = f32[3,8,4]{0,2,1} transpose(f32[8,4,3]{2,1,0} %p0.1), dimensions={2,0,1}
  %copy.3 = f32[3,8,4]{2,1,0} copy(f32[3,8,4]{0,2,1} %transpose.2)
  ROOT %bitcast.4 = f32[3,32]{1,0} bitcast(f32[3,8,4]{2,1,0} %copy.3)
}

ENTRY %main (a: f32[8,4,16], w: f32[16,3]) -> f32[3,32] {
  %a = f32[8,4,16]{2,1,0} parameter(0)
  %w = f32[16,3]{1,0} parameter(1)
  %dot_fusion = f32[8,4,3]{2,1,0} fusion(f32[8,4,16]{2,1,0} %a, f32[16,3]{1,0} %w), kind=kOutput, calls=%fused
  ROOT %copy_fusion = f32[3,32]{1,0} fusion(f32[8,4,3]{2,1,0} %dot_fusion), kind=kLoop, calls=%moved
}
"""
    table = prof.classify(text)
    assert table["dot_fusion"]["kind"] == "dense matmul"
    assert table["dot_fusion"]["flops"] == 2 * 8 * 4 * 3 * 16
    assert table["copy_fusion"]["kind"] == "layout copy"
    assert table["a"]["kind"] == "layout copy" and table["a"]["flops"] == 0


def test_async_matmuls_and_groups(prof):
    table = {"fast": {"kind": "dense matmul", "flops": 2e9, "shape": "f32[8,8]", "ops": ["dot"]},
             "launch_only": {"kind": "dense matmul", "flops": 2e9, "shape": "f32[8,8]", "ops": ["dot"]},
             "add1": {"kind": "elementwise", "flops": 0.0, "shape": "f32[8]", "ops": ["add"]},
             "add2": {"kind": "elementwise", "flops": 0.0, "shape": "f32[8]", "ops": ["add"]}}
    times = {"fast": 0.02, "launch_only": 0.0001, "add1": 0.003, "add2": 0.001}  # 100 vs 20,000 GFLOP/s
    assert prof.mark_async(table, times, max_gflops=150.0) == 1
    assert table["fast"]["kind"] == "dense matmul" and table["launch_only"]["kind"] == "async matmul"
    groups = prof.group_ops(table, times)
    assert groups[0]["example"] == "fast" and groups[0]["count"] == 1
    adds = next(g for g in groups if g["kind"] == "elementwise")
    assert adds["count"] == 2 and adds["s"] == pytest.approx(0.004)
    assert sum(g["s"] for g in groups) == pytest.approx(sum(times.values()))
