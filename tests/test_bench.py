"""The bench runs end to end (here through the interpreter, at tiny sizes): both suites, every
algorithm, CSV and PNG written, byte counts as DESIGN.md's table. It times nothing meaningful on
the CPU; the GPU numbers live in bench/RESULTS.md."""

import csv
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_both_suites_and_writes_csv_and_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from bench import bn_suite, optim_suite, run

    monkeypatch.setattr(optim_suite, "cases", lambda gpu, quick: [("flat 2^12", [(4096,)], torch.float32, False)])
    monkeypatch.setattr(bn_suite, "TINY_SHAPES", [(4, 3, 5, 7)])
    rows = run.main(["--quick", "--out-dir", str(tmp_path)])  # both suites: <device>.csv
    slug = "cpu-interpreter" if not torch.cuda.is_available() else None
    if slug is None:
        pytest.skip("on a GPU the bench is run by hand, not by the tests")
    assert (tmp_path / f"{slug}.png").stat().st_size > 10_000
    with open(tmp_path / f"{slug}.csv") as f:
        assert f.readline().startswith("# date=")
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    ops = {(r["suite"], r["op"]) for r in table}
    for algorithm in optim_suite.ALGORITHMS:
        assert ("optim", algorithm) in ops
    for op in bn_suite.PASSES:
        assert ("bn", op) in ops
    for r in table:
        assert r["median_ms"] and float(r["median_ms"]) > 0, r
        assert r["implementation"] == "gpuopt" or float(r["gpuopt_speedup"]) > 0, r
    loop = {(r["op"], r["implementation"]) for r in table if r["layout"] == "loop"}
    for algorithm in optim_suite.ALGORITHMS:  # the training loop's view: steps back to back, one sync
        assert algorithm == "EMA" or (algorithm, "gpuopt") in loop, algorithm
    assert ("AdamW", "torch fused") in loop
    adam = next(r for r in table if r["op"] == "Adam" and r["implementation"] == "gpuopt" and r["layout"] == "—")
    assert int(adam["bytes"]) == 28 * 4096  # read p, g, m, v; write p, m, v (fp32)
    bn = next(r for r in table if r["op"] == "train fwd+bwd" and r["dtype"] == "bfloat16")
    assert int(bn["bytes"]) == 8 * 2 * 4 * 3 * 5 * 7  # 8 passes of 2-byte elements


def test_host_suite_runs_with_launches_stubbed_and_restores_them(monkeypatch):
    """python -m bench --suite host: every row timed for gpuopt and its reference, and the
    kernels (gpuopt's and torch's fused ones) are back in place afterwards."""
    from bench import host_suite
    from gpuopt.kernels import _multi_tensor as walk

    monkeypatch.setattr(host_suite, "_shape_lists", lambda: [("tiny", [(7,), (3, 5), (64,)])])
    kernel, fused = walk._step_kernel, torch._fused_adamw_
    rows = host_suite.run(quick=True, log=lambda message: None)
    assert walk._step_kernel is kernel and torch._fused_adamw_ is fused
    assert {(r["op"], r["grads"]) for r in rows} >= {("AdamW", "kept"), ("AdamW", "moved"),
                                                    ("SGD momentum", "kept"), ("SGD momentum", "moved")}
    assert {r["case"] for r in rows if r["op"] == "AdamW"} >= {"tiny", "tiny DTensor"}  # FSDP2's DTensors too
    assert all(r["gpuopt_us"] > 0 and r["torch_us"] > 0 for r in rows)
    import torch.distributed as dist

    assert not dist.is_initialized()  # the DTensor rows' 1-rank group is gone
