"""Batch norm kernels against the float64 reference (the seed's B.0.2, both ε placements) and
against torch.nn.functional.batch_norm + autograd and the torch modules."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpuopt
from gpuopt import reference as ref
from gpuopt.kernels import batch_norm as bn_kernels

from .helpers import TOLERANCES, assert_close, count_launches, to_numpy

# Every rank; C = 1, 3, 5; N·S = 2, 7, 129 (and a few more).
SHAPES = [(2, 3), (7, 5), (129, 1), (1, 3, 7), (2, 3, 1), (3, 5, 43), (1, 5, 1, 2), (3, 3, 43, 1),
          (1, 1, 7, 1), (2, 5, 3, 7), (1, 3, 1, 1, 7), (3, 5, 43, 1, 1), (2, 3, 2, 3, 4),
          # one channel of few rows and many values: its columns are split over programs too;
          # more channels than one channels-last block holds (64 in the interpreter): 2 blocks.
          (1, 1, 300), (2, 1, 17, 19), (9, 67), (3, 67, 2, 3)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def make_input(shape, layout, device, dtype=torch.float32, mean=0.0, std=1.0):
    """Random (N, C, ...) input in the given memory layout, with a per-channel offset so channels differ."""
    C = shape[1]
    offsets = torch.randn(C, device=device).view(1, C, *([1] * (len(shape) - 2)))
    values = (torch.randn(shape, device=device) * std + mean + offsets).to(dtype)
    if layout == "strided":  # every other element of a twice-as-wide tensor along the last dim of size > 1
        d = max(i for i, n in enumerate(shape) if n > 1)
        wide = torch.empty(*shape[:d], 2 * shape[d], *shape[d + 1:], device=device, dtype=dtype)
        x = wide.narrow(d, 0, 2 * shape[d])[(slice(None),) * d + (slice(None, None, 2),)]
        x.copy_(values)
    elif layout == "channels_last":  # channel the fastest index, for every rank
        x = values.movedim(1, -1).contiguous().movedim(-1, 1)
    else:
        x = values
    assert (layout == "strided") != (x.is_contiguous() or x.movedim(1, -1).is_contiguous())
    return x


def as_seed_layout(t):
    """(N, C, ...) → the seed's (n, K) = (C, N·S) matrix, in float64."""
    a = to_numpy(t)
    return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)


def from_seed_layout(a, shape):
    return np.moveaxis(a.reshape(shape[1], shape[0], *shape[2:]), 0, 1)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def _ids(shape):
    return "x".join(map(str, shape))


# --------------------------------------------------------------- against the reference -------


@pytest.mark.parametrize("eps_inside_sqrt", [True, False], ids=["torch-eps", "seed-eps"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_training_forward_backward_and_running_stats_match_reference(device, shape, layout, eps_inside_sqrt):
    """Output, running stats and all three gradients against the float64 reference. ε = 0.3 so the
    two ε placements give visibly different answers (the test also checks that they do)."""
    eps, momentum, C = 0.3, 0.1, shape[1]
    x = leaf(make_input(shape, layout, device))
    w, b = leaf(torch.randn(C, device=device)), leaf(torch.randn(C, device=device))
    running_mean, running_var = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    expected_rm, expected_rv, _ = ref.batch_norm_running_stats(to_numpy(running_mean), to_numpy(running_var),
                                                               as_seed_layout(x), 0, momentum)
    y = gpuopt.functional.batch_norm(x, running_mean, running_var, w, b, training=True, momentum=momentum, eps=eps,
                                     eps_inside_sqrt=eps_inside_sqrt)
    dy = torch.randn_like(y)
    y.backward(dy)

    Z_hat, cache = ref.batch_norm_forward(as_seed_layout(x), to_numpy(w), to_numpy(b), eps, eps_inside_sqrt)
    dZ, dG, dB = ref.batch_norm_backward(as_seed_layout(dy), cache, to_numpy(w))
    assert_close(y, from_seed_layout(Z_hat, shape), rtol=1e-5, atol=1e-5, name="output")
    assert_close(running_mean, expected_rm, name="running_mean")
    assert_close(running_var, expected_rv, rtol=1e-5, name="running_var")
    assert_close(x.grad, from_seed_layout(dZ, shape), rtol=1e-4, atol=1e-5, name="grad input")
    assert_close(w.grad, dG, rtol=1e-4, atol=1e-5, name="grad weight")
    assert_close(b.grad, dB, rtol=1e-4, atol=1e-5, name="grad bias")
    if layout != "strided":  # the output keeps the input's memory layout
        assert y.stride() == x.stride()
    # (compared before the affine part: a random weight can be ~0 and hide the difference)
    other, other_cache = ref.batch_norm_forward(as_seed_layout(x), eps=eps, eps_inside_sqrt=not eps_inside_sqrt)
    # The two placements agree where σ + ε = sqrt(σ² + ε) (σ = 0.35 at ε = 0.3): check elsewhere.
    if np.abs(cache.sigma + eps - np.sqrt(cache.sigma ** 2 + eps)).min() > 1e-2:
        assert np.abs(other_cache.Z_bar - cache.Z_bar).max() > 1e-4, "the ε placement should matter at ε = 0.3"


@pytest.mark.parametrize("eps_inside_sqrt", [True, False], ids=["torch-eps", "seed-eps"])
@pytest.mark.parametrize("shape", [(1, 3), (1, 5, 1, 1), (2, 3, 7), (3, 5, 2, 3, 4)], ids=_ids)
def test_eval_forward_and_backward_match_reference(device, shape, eps_inside_sqrt):
    """Evaluation uses the running stats (N·S = 1 is fine here); the gradient treats them as constants."""
    eps, C = 0.3, shape[1]
    x = leaf(make_input(shape, "contiguous", device))
    w, b = leaf(torch.randn(C, device=device)), leaf(torch.randn(C, device=device))
    running_mean, running_var = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    before = running_mean.clone(), running_var.clone()
    y = gpuopt.functional.batch_norm(x, running_mean, running_var, w, b, training=False, eps=eps,
                                     eps_inside_sqrt=eps_inside_sqrt)
    dy = torch.randn_like(y)
    y.backward(dy)
    Z = as_seed_layout(x)
    expected = ref.batch_norm_eval(Z, to_numpy(running_mean), to_numpy(running_var), to_numpy(w), to_numpy(b), eps,
                                   eps_inside_sqrt)
    s = np.sqrt(to_numpy(running_var) + eps) if eps_inside_sqrt else np.sqrt(to_numpy(running_var)) + eps
    Z_bar = (Z - to_numpy(running_mean)[:, None]) / s[:, None]
    assert_close(y, from_seed_layout(expected, shape), rtol=1e-5, atol=1e-5, name="output")
    assert_close(x.grad, from_seed_layout(as_seed_layout(dy) * (to_numpy(w) / s)[:, None], shape),
                 rtol=1e-5, atol=1e-6, name="grad input")
    assert_close(w.grad, (as_seed_layout(dy) * Z_bar).sum(axis=1), rtol=1e-4, atol=1e-5, name="grad weight")
    assert_close(b.grad, as_seed_layout(dy).sum(axis=1), rtol=1e-4, atol=1e-5, name="grad bias")
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", ["input", "float32"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_precision_inputs_match_reference(device, dtype, param_dtype, layout):
    """bf16/fp16 input, weight in the input dtype or fp32 (as under autocast); statistics in fp32."""
    shape, C = (3, 5, 7, 9), 5
    pdtype = dtype if param_dtype == "input" else torch.float32
    x = leaf(make_input(shape, layout, device, dtype))
    w, b = leaf(torch.randn(C, device=device).to(pdtype)), leaf(torch.randn(C, device=device).to(pdtype))
    running_mean, running_var = torch.zeros(C, device=device, dtype=pdtype), torch.ones(C, device=device, dtype=pdtype)
    y = gpuopt.functional.batch_norm(x, running_mean, running_var, w, b, training=True)
    assert y.dtype == dtype and w.grad is None
    dy = torch.randn_like(y)
    y.backward(dy)
    Z_hat, cache = ref.batch_norm_forward(as_seed_layout(x), to_numpy(w), to_numpy(b))
    dZ, dG, dB = ref.batch_norm_backward(as_seed_layout(dy), cache, to_numpy(w))
    tol = TOLERANCES[dtype]
    assert_close(y, from_seed_layout(Z_hat, shape), name="output")
    assert_close(x.grad, from_seed_layout(dZ, shape), rtol=tol[0], atol=tol[1] * 4, name="grad input")
    assert w.grad.dtype == pdtype and b.grad.dtype == pdtype
    # Σ over 189 values rounded once to the parameter dtype.
    assert_close(w.grad, dG, dtype=pdtype, rtol=tol[0] if pdtype != torch.float32 else 1e-4, atol=1e-2,
                 name="grad weight")
    assert_close(b.grad, dB, dtype=pdtype, rtol=tol[0] if pdtype != torch.float32 else 1e-4, atol=1e-2,
                 name="grad bias")
    rm, rv, _ = ref.batch_norm_running_stats(np.zeros(C), np.ones(C), as_seed_layout(x), 0, 0.1)
    assert_close(running_mean, rm, dtype=pdtype, name="running_mean")
    assert_close(running_var, rv, dtype=pdtype, name="running_var")


def test_parameter_gradients_keep_each_parameters_dtype(device):
    """bf16 input with only an fp32 bias, and with a bf16 weight beside an fp32 bias."""
    x = leaf(make_input((4, 3, 5), "contiguous", device, torch.bfloat16))
    for weight in (None, leaf(torch.rand(3, device=device).to(torch.bfloat16))):
        bias = leaf(torch.randn(3, device=device))
        y = gpuopt.functional.batch_norm(x, None, None, weight, bias, training=True)
        dy = torch.ones_like(y)
        dy[0, :, 0] = 1.0625
        y.backward(dy)
        assert bias.grad.dtype == torch.float32
        # Σ dẐ over N·S = 20 values is 20.0625: exact in fp32, not representable in bf16
        assert torch.equal(bias.grad, torch.full((3,), 20.0625, device=device)), bias.grad
        if weight is not None:
            assert weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("eps_inside_sqrt", [True, False], ids=["torch-eps", "seed-eps"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64_finite_differences(device, eps_inside_sqrt, training, layout):
    """The kernels' analytic gradients (float64 input accumulates in float64) against central finite
    differences, for input, weight and bias."""
    shape, C = (3, 2, 5), 2
    x = leaf(make_input(shape, layout, device, torch.float64))
    w, b = leaf(torch.randn(C, device=device, dtype=torch.float64)), leaf(torch.randn(C, device=device,
                                                                                       dtype=torch.float64))
    rm, rv = torch.randn(C, device=device, dtype=torch.float64), torch.rand(C, device=device, dtype=torch.float64) + .5

    def f(x, w, b):
        # training updates the running stats in place: give each call its own copy
        return gpuopt.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training, eps=0.1,
                                            eps_inside_sqrt=eps_inside_sqrt)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------- against torch ------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 43), (2, 3, 5, 7), (1, 3, 1, 1, 7), (2, 3, 2, 3, 4)], ids=_ids)
def test_functional_matches_torch(device, shape, layout):
    """Output, running stats and gradients against torch.nn.functional.batch_norm + autograd, with
    weight only, bias only, both and neither."""
    C = shape[1]
    for with_weight, with_bias in [(True, True), (True, False), (False, True), (False, False)]:
        x = make_input(shape, layout, device)
        w = torch.randn(C, device=device) if with_weight else None
        b = torch.randn(C, device=device) if with_bias else None
        outs = []
        for fn in (gpuopt.functional.batch_norm, F.batch_norm):
            xi, wi, bi = leaf(x), (leaf(w) if w is not None else None), (leaf(b) if b is not None else None)
            rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
            y = fn(xi, rm, rv, wi, bi, True, 0.2, 1e-5)
            y.backward(torch.sin(torch.arange(y.numel(), device=device, dtype=y.dtype).view(y.shape)))
            outs.append([y, rm, rv, xi.grad] + [t.grad for t in (wi, bi) if t is not None])
        for name, a, e in zip(["output", "running_mean", "running_var", "grad input", "grad w/b", "grad b"], *outs):
            assert_close(a, e, rtol=1e-4, atol=1e-5, name=f"{name} (weight={with_weight}, bias={with_bias})")
        if layout != "strided":  # the input's memory layout is kept (torch makes 3-D (N, C, L) output contiguous)
            assert outs[0][0].stride() == x.stride()


def test_every_value_is_counted_once_by_the_splits():
    """The launch grid covers each (row, channel) exactly once: rows split in rows_per_split
    pieces, channels-first columns in cols_per_split pieces, channels-last channels in blocks
    (a channels-last C of 67 over 64-wide blocks once made two programs read the same rows)."""
    from gpuopt._batch_norm_launch import make_grid

    for R, C, S, channels_last in [(1, 1, 300, False), (2, 1, 323, False), (9, 67, 1, True), (18, 67, 1, True),
                                   (256 * 196, 256, 1, True), (256, 64, 3136, False), (8, 64, 65536, False),
                                   (65536, 1024, 1, True), (256, 2048, 49, False)]:
        for gpu_config in (False, True):
            g = make_grid(R, C, S, channels_last, 4, gpu_config, 132)
            columns = channels_last or g.short_rows  # programs own runs of C·S columns
            assert g.short_rows == (S == 49)  # rows of 49: read as columns (16-byte accesses)
            n_cols = C * S if columns else S
            width = g.block_k if columns else g.cols_per_split
            assert g.n_splits == g.col_splits * -(-R // g.rows_per_split)
            assert g.rows_per_split % g.block_r == 0 and g.cols_per_split % g.block_k == 0
            assert (g.col_splits == 1) if columns else (g.col_splits == -(-S // width))
            assert g.channel_blocks * (width if columns else 1) >= (n_cols if columns else 1)
            assert n_cols % g.vec == 0
            if g.short_rows:  # 2048·49 columns a row: 16-byte accesses, where rows of 49 allow 4-byte ones
                assert g.vec == 4


def test_short_rows_switch_restores_channels_first_tiles(monkeypatch):
    """GPUOPT_SHORT_ROWS=0 (read at import; the bench's A/B switch) gives rows of 49 the
    channels-first tiles again: one program per channel, 4-byte accesses."""
    from gpuopt import _batch_norm_launch as bn

    monkeypatch.setattr(bn, "_SHORT_ROWS", False)
    g = bn.make_grid.__wrapped__(256, 2048, 49, False, 4, True, 132)
    assert not g.short_rows and g.group == 1 and g.channel_blocks == 2048 and g.vec == 1
    monkeypatch.setattr(bn, "_SHORT_ROWS", True)
    g = bn.make_grid.__wrapped__(256, 2048, 49, False, 4, True, 132)
    assert g.short_rows and g.group == 49 and g.vec == 4 and g.channel_blocks == -(-2048 * 49 // g.block_k)


RESULT_NAMES = ["output", "running_mean", "running_var", "grad input", "grad weight", "grad bias"]


def train_step_both(x, dy):
    """One training step (momentum 0.1, ε 1e-5) of gpuopt's and of torch's batch norm on the same
    input, weight, bias and upstream gradient: two tuples in RESULT_NAMES order."""
    C, device = x.shape[1], x.device
    weight, bias = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    results = []
    for fn in (gpuopt.functional.batch_norm, F.batch_norm):
        xi, w, b = leaf(x), leaf(weight), leaf(bias)
        rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
        y = fn(xi, rm, rv, w, b, True, 0.1, 1e-5)
        y.backward(dy)
        results.append((y, rm, rv, xi.grad, w.grad, b.grad))
    return results


@pytest.mark.parametrize("shape,layout,dtype", [((4, 300, 3, 3), "channels_last", torch.float32),
                                                ((4, 300, 3, 3), "channels_last", torch.bfloat16),
                                                ((6, 40, 7, 7), "contiguous", torch.float32),  # short rows
                                                ((6, 40, 7, 7), "contiguous", torch.bfloat16),
                                                ((2, 3, 40, 40), "contiguous", torch.float32),
                                                ((3, 5, 7, 28), "contiguous", torch.float16),
                                                ((40, 520), "contiguous", torch.float32)], ids=str)
def test_gpu_tile_sizes_match_torch(device, monkeypatch, shape, layout, dtype):
    """The tile sizes, channel blocks (128 or 256 wide) and splits a GPU launch uses, run here (on
    the CPU through the interpreter with GPUOPT_GPU_CONFIG=1): forward, running stats, gradients."""
    monkeypatch.setenv("GPUOPT_GPU_CONFIG", "1")
    x = make_input(shape, layout, device, dtype)
    dy = torch.randn_like(x)
    results = train_step_both(x, dy)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    for name, a, e in zip(RESULT_NAMES, *results):
        assert_close(a, e.to(a.dtype), dtype=a.dtype if name.startswith("grad ") or name == "output" else torch.float32,
                     name=name, **(tol if name in ("output", "grad input") or dtype == torch.float32 else
                                   dict(rtol=2e-2, atol=5e-2)))


def test_only_the_gradients_asked_for_are_computed(device):
    """needs_input_grad: a frozen input runs no input-gradient kernel; a frozen weight gets no grad."""
    x = make_input((3, 5, 7), "contiguous", device)
    w, b = leaf(torch.randn(5, device=device)), torch.randn(5, device=device)
    y = gpuopt.functional.batch_norm(x, None, None, w, b, training=True)
    dy = torch.randn_like(y)  # (not ones: Σ Z̄ = 0, and the weight's gradient would be rounding noise)
    with count_launches(bn_kernels, "_backward_input_kernel") as inputs, \
            count_launches(bn_kernels, "_backward_reduce_kernel") as reductions:
        y.backward(dy)
    assert inputs["launches"] == 0 and reductions["launches"] == 1
    assert b.grad is None
    w_torch = leaf(w)
    F.batch_norm(x, None, None, w_torch, b, True).backward(dy)
    assert_close(w.grad, w_torch.grad, rtol=1e-4, atol=1e-5, name="grad weight")


def test_launch_counts(device):
    """Training forward: statistics, combine, normalize. Eval: one launch."""
    x = make_input((3, 5, 7), "contiguous", device)
    rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
    names = ["_stats_kernel", "_stats_combine_kernel", "_normalize_kernel"]
    with count_launches(bn_kernels, names[0]) as a, count_launches(bn_kernels, names[1]) as b, \
            count_launches(bn_kernels, names[2]) as c:
        gpuopt.functional.batch_norm(x, rm, rv, training=True)
        assert (a["launches"], b["launches"], c["launches"]) == (1, 1, 1)
        gpuopt.functional.batch_norm(x, rm, rv, training=False)
        assert (a["launches"], b["launches"], c["launches"]) == (1, 1, 2)


def test_every_output_element_is_written(device, monkeypatch):
    """Outputs and partials are allocated NaN-filled: an element a kernel forgets to write fails."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def poisoned_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    x = make_input((3, 5, 43), "contiguous", device)
    xl = make_input((2, 5, 3, 7), "channels_last", device)
    expected = [F.batch_norm(leaf(t), None, None, None, None, True) for t in (x, xl)]
    monkeypatch.setattr(torch, "empty", poisoned)
    monkeypatch.setattr(torch, "empty_like", poisoned_like)
    for t, e in zip((x, xl), expected):
        xi = leaf(t)
        y = gpuopt.functional.batch_norm(xi, None, None, None, None, True)
        y.backward(torch.ones_like(y))
        assert_close(y, e, rtol=1e-5, atol=1e-5, name="output")
        assert not torch.isnan(xi.grad).any()


@pytest.mark.parametrize("layout,length", [("contiguous", 129), ("channels_last", 129), ("contiguous", 49)],
                         ids=["contiguous", "channels_last", "short-rows"])
def test_large_mean_is_normalized_stably(device, layout, length):
    """A channel with mean 1e4 and std 1 in fp32: E[x²] - E[x]² would lose every digit (x² ≈ 1e8,
    whose fp32 spacing is 8); shifted Welford keeps the variance to 1e-5. Short rows (49 values,
    read as columns) fold S partials per channel and split: the same accuracy."""
    x = leaf(make_input((64, 3, length), layout, device, mean=1e4, std=1.0))
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = gpuopt.functional.batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    Z = as_seed_layout(x)
    Z_hat, cache = ref.batch_norm_forward(Z)
    assert_close(running_var, Z.var(axis=1, ddof=1), rtol=1e-5, name="batch variance")
    assert_close(running_mean, Z.mean(axis=1), rtol=1e-6, name="batch mean")  # ~10 fp32 ulps at 1e4
    # fp32 spacing at 1e4 is 1e-3: the mean itself can only be that exact.
    assert_close(y, from_seed_layout(Z_hat, x.shape), rtol=0, atol=2e-3, name="output")
    dy = torch.randn_like(y)
    y.backward(dy)
    dZ, _, _ = ref.batch_norm_backward(as_seed_layout(dy), cache)
    assert_close(x.grad, from_seed_layout(dZ, x.shape), rtol=0, atol=2e-3, name="grad input")


@pytest.mark.parametrize("eps_inside_sqrt", [True, False], ids=["torch-eps", "seed-eps"])
def test_constant_channel_gives_finite_output_and_gradients(device, eps_inside_sqrt):
    x = make_input((4, 3, 5), "contiguous", device)
    x[:, 1] = 2.5
    x = leaf(x)
    w, b = leaf(torch.randn(3, device=device)), leaf(torch.randn(3, device=device))
    y = gpuopt.functional.batch_norm(x, None, None, w, b, training=True, eps_inside_sqrt=eps_inside_sqrt)
    dy = torch.randn_like(y)
    y.backward(dy)
    for t in (y, x.grad, w.grad, b.grad):
        assert torch.isfinite(t).all()
    Z_hat, cache = ref.batch_norm_forward(as_seed_layout(x), to_numpy(w), to_numpy(b), 1e-5, eps_inside_sqrt)
    dZ, dG, dB = ref.batch_norm_backward(as_seed_layout(dy), cache, to_numpy(w))
    assert_close(y, from_seed_layout(Z_hat, x.shape), rtol=1e-5, atol=1e-5, name="output")
    # 1/ε = 1e5 amplifies fp32 rounding of dẐ - mean(dẐ) in the constant channel
    assert_close(x.grad, from_seed_layout(dZ, x.shape), rtol=1e-3, atol=1e-3, name="grad input")
    assert_close(w.grad, dG, rtol=1e-4, atol=1e-5, name="grad weight")


def test_empty_batch_behaves_like_torch(device):
    x = torch.randn(0, 3, 4, device=device)
    w, b = leaf(torch.randn(3, device=device)), leaf(torch.randn(3, device=device))
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = gpuopt.functional.batch_norm(x, rm, rv, w, b, training=True)
    expected = F.batch_norm(x, rm.clone(), rv.clone(), w, b, True)
    assert y.shape == expected.shape == x.shape
    assert torch.equal(rm, torch.zeros(3, device=device)) and torch.equal(rv, torch.ones(3, device=device))
    y.sum().backward()
    assert w.grad is not None and b.grad is not None


def test_bad_input_is_refused_before_any_kernel(device):
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with count_launches(bn_kernels, "_stats_kernel") as launches:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            gpuopt.functional.batch_norm(torch.randn(1, 3, 1, 1, device=device), rm, rv, training=True)
        with pytest.raises(ValueError, match="should contain 3 elements"):
            gpuopt.functional.batch_norm(torch.randn(4, 3, device=device), torch.zeros(4, device=device), rv,
                                         training=True)
        with pytest.raises(ValueError, match="weight should contain 3 elements"):
            gpuopt.functional.batch_norm(torch.randn(4, 3, device=device), rm, rv, torch.ones(2, device=device))
        with pytest.raises(TypeError, match="float32, bfloat16, float16"):
            gpuopt.functional.batch_norm(torch.ones(4, 3, dtype=torch.int32, device=device), rm, rv, training=True)
        with pytest.raises(ValueError, match="at least 2 dimensions"):
            gpuopt.functional.batch_norm(torch.randn(3, device=device), rm, rv, training=True)
        with pytest.raises(ValueError, match="evaluation mode"):
            gpuopt.functional.batch_norm(torch.randn(4, 3, device=device), None, None, training=False)
        with pytest.raises(TypeError, match="weight must be torch.float32"):
            gpuopt.functional.batch_norm(torch.randn(4, 3, device=device), rm, rv,
                                         torch.ones(3, dtype=torch.float16, device=device))
        with pytest.raises(ValueError, match="momentum=None"):
            gpuopt.functional.batch_norm(torch.randn(4, 3, device=device), rm, rv, training=True, momentum=None)
        with pytest.raises(ValueError, match="expected 4D input"):
            gpuopt.nn.BatchNorm2d(3)(torch.randn(4, 3, 5, device=device))
    assert launches["launches"] == 0


# ---------------------------------------------------------------------------- modules ------


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("cls,shape,channels_last", [
    ("BatchNorm1d", (6, 5), False), ("BatchNorm1d", (4, 5, 7), False), ("BatchNorm2d", (3, 5, 4, 3), False),
    ("BatchNorm2d", (3, 5, 4, 3), True), ("BatchNorm3d", (2, 5, 2, 3, 2), True)])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_modules_match_torch_over_train_and_eval_steps(device, cls, shape, channels_last, momentum, affine, track):
    """Four training steps, an eval step, two more training steps: outputs, gradients, buffers and
    state_dict equal torch's module (momentum=None is the cumulative average)."""
    ours = getattr(gpuopt.nn, cls)(5, momentum=momentum, affine=affine, track_running_stats=track).to(device)
    theirs = getattr(torch.nn, cls)(5, momentum=momentum, affine=affine, track_running_stats=track).to(device)
    if affine:
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight.copy_(torch.linspace(0.5, 1.5, 5))
                m.bias.copy_(torch.linspace(-1, 1, 5))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for step, mode in enumerate(["train"] * 4 + ["eval"] + ["train"] * 2):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = make_input(shape, "channels_last" if channels_last else "contiguous", device, mean=step, std=step + 1)
        outs = []
        for m in (ours, theirs):
            xi = leaf(x)
            y = m(xi)
            y.backward(torch.cos(torch.arange(y.numel(), device=device, dtype=y.dtype).view(y.shape)))
            outs.append((y, xi.grad))
        assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5, name=f"step {step} output")
        assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5, name=f"step {step} grad input")
    for key, value in theirs.state_dict().items():
        mine = ours.state_dict()[key]
        if value.is_floating_point():
            assert_close(mine, value, rtol=1e-4, atol=1e-6, name=key)
        else:
            assert torch.equal(mine, value), key
    if affine:
        assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-5, name="weight.grad")
        assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-5, name="bias.grad")
    # state_dict round trip, torch → gpuopt
    fresh = getattr(gpuopt.nn, cls)(5, momentum=momentum, affine=affine, track_running_stats=track).to(device)
    fresh.load_state_dict(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_eps_inside_sqrt_flag_on_modules(device):
    m = gpuopt.nn.BatchNorm1d(3, eps=0.5, eps_inside_sqrt=False).to(device)
    x = make_input((8, 3), "contiguous", device)
    Z_hat, _ = ref.batch_norm_forward(as_seed_layout(x), eps=0.5, eps_inside_sqrt=False)
    assert_close(m(x), from_seed_layout(Z_hat, x.shape), rtol=1e-5, atol=1e-5, name="seed-ε output")
    assert "eps_inside_sqrt=False" in repr(m)


def small_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3), torch.nn.BatchNorm2d(6, momentum=None)), torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, 10), torch.nn.BatchNorm1d(10), torch.nn.Linear(10, 3))


def test_used_module_pickles_and_deep_copies(device):
    """A module that has run (and keeps its last call's plan: addresses, kept launchers) saves with
    torch.save, loads, and deep-copies; each copy then trains on as torch's module does, its
    buffers its own."""
    import io

    bn, twin = gpuopt.nn.BatchNorm2d(3).to(device), torch.nn.BatchNorm2d(3).to(device)
    for _ in range(2):
        x = torch.randn(4, 3, 5, 5, device=device)
        bn(x), twin(x)
    assert bn.__dict__.get("_gpuopt_plan") is not None
    buffer = io.BytesIO()
    torch.save(bn, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for copy_ in (loaded, copy.deepcopy(bn)):
        reference = copy.deepcopy(twin)
        x = torch.randn(4, 3, 5, 5, device=device)
        assert_close(copy_(x), reference(x), rtol=1e-4, atol=1e-5)
        assert_close(copy_.running_mean, reference.running_mean, rtol=1e-5, atol=1e-6)
        assert copy_.num_batches_tracked.item() == reference.num_batches_tracked.item() == 3
    assert bn.num_batches_tracked.item() == 2  # the copies counted their own batches


def test_convert_batchnorm_small_cnn(device):
    """Every torch BatchNorm*d replaced, sharing parameters and buffers; identical outputs and state_dict."""
    model = small_cnn().to(device)
    reference_model = copy.deepcopy(model)
    weight = model[1].weight
    converted = gpuopt.nn.convert_batchnorm(model)
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(gpuopt.nn.BatchNorm2d) == 2 and kinds.count(gpuopt.nn.BatchNorm1d) == 1
    assert torch.nn.BatchNorm2d not in kinds and torch.nn.BatchNorm1d not in kinds
    assert converted[1].weight is weight  # the same Parameter: optimizers built before still work
    assert converted.state_dict().keys() == reference_model.state_dict().keys()
    for training in (True, True, False):
        converted.train(training)
        reference_model.train(training)
        x = torch.randn(5, 1, 6, 6, device=device)
        assert_close(converted(x), reference_model(x), rtol=1e-4, atol=1e-5, name=f"output (training={training})")
    for key, value in reference_model.state_dict().items():
        assert_close(converted.state_dict()[key], value, dtype=torch.float32, rtol=1e-4, atol=1e-6, name=key)
    assert isinstance(gpuopt.nn.convert_batchnorm(torch.nn.BatchNorm1d(3)), gpuopt.nn.BatchNorm1d)


@pytest.mark.parametrize("case", ["training", "eval", "channels_last", "no_affine", "cumulative", "fp64",
                                  "no_running_stats"])
def test_torch_compile_traces_batch_norm_with_no_graph_break(device, case):
    """torch.compile of a model with gpuopt batch norm: one graph, no break (the forward and the
    closed-form backward are custom operators), and outputs, gradients and running statistics
    equal the eager model's over two training steps (through AOTAutograd, so the compiled
    backward is the operators' autograd formula)."""
    dtype = torch.float64 if case == "fp64" else torch.float32

    def make():
        torch.manual_seed(0)
        bn = gpuopt.nn.BatchNorm2d(4, affine=case != "no_affine", momentum=None if case == "cumulative" else 0.1,
                                   track_running_stats=case != "no_running_stats")
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bn, torch.nn.ReLU()).to(device, dtype)
        if case == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        return model.eval() if case == "eval" else model

    x = torch.randn(4, 3, 7, 7, device=device, dtype=dtype)
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    explained = torch._dynamo.explain(make())(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    model, twin = make(), make()
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):
        y, y_twin = compiled(x), twin(x)
        y.square().sum().backward()
        y_twin.square().sum().backward()
    torch._dynamo.reset()
    assert_close(y, y_twin, rtol=1e-6, atol=1e-6, name="output")
    assert y.stride() == y_twin.stride()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, name=f"grad {name}")
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(a, b), name


def test_compiled_training_step_with_backward_and_step(device):
    """torch.compile of a whole training step — forward, ``loss.backward()`` and ``opt.step()`` —
    over a model with gpuopt batch norm: Dynamo evaluates the batch-norm backward's frame while the
    backward runs eagerly, and once traced into its launch and crashed; now it breaks the graph
    there. Loss, gradients and updated weights equal the eager step's."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), gpuopt.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 5)).to(device)
        return model, gpuopt.SGD(model.parameters(), lr=0.1, momentum=0.9)

    x, y = torch.randn(4, 3, 7, 7, device=device), torch.randint(0, 5, (4,), device=device)
    results = []
    for compile_it in (False, True):
        model, opt = make()

        def train_step(x, y):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        step = torch.compile(train_step, backend="eager") if compile_it else train_step
        losses = [step(x, y).detach() for _ in range(2)]
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    torch._dynamo.reset()
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert_close(a, b, rtol=1e-5, atol=1e-6, name="compiled vs eager")


@pytest.mark.skipif("trace_autograd_ops" not in torch._dynamo.config._config,
                    reason="this torch's Dynamo cannot trace loss.backward() (no trace_autograd_ops)")
def test_whole_training_step_compiles_to_one_graph(device):
    """With Dynamo tracing autograd (``trace_autograd_ops``), a whole training step — forward
    through gpuopt batch norm, ``loss.backward()``, ``opt.step()`` — is one graph with no break
    (the first step eager, to make the optimizer's states), and two compiled steps equal two
    eager ones."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), gpuopt.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 5)).to(device)
        return model, gpuopt.AdamW(model.parameters(), lr=0.01)

    def stepper(model, opt):
        def train_step(x, y):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()
        return train_step

    x, y = torch.randn(4, 3, 7, 7, device=device), torch.randint(0, 5, (4,), device=device)
    (model, opt), (twin, twin_opt) = make(), make()
    step, twin_step = stepper(model, opt), stepper(twin, twin_opt)
    for s, o in ((step, opt), (twin_step, twin_opt)):
        s(x, y)
        o.zero_grad()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explained = torch._dynamo.explain(step)(x, y)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        opt.zero_grad()
        twin_step(x, y)  # explain ran one step
        twin_opt.zero_grad()
        compiled = torch.compile(step, backend="aot_eager")
        for _ in range(2):
            x = torch.randn(4, 3, 7, 7, device=device)
            assert_close(compiled(x, y), twin_step(x, y), rtol=1e-5, atol=1e-6, name="loss")
            opt.zero_grad()
            twin_opt.zero_grad()
    torch._dynamo.reset()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a, b, rtol=1e-5, atol=1e-6, name="param")
    for a, b in zip(model.buffers(), twin.buffers()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------- GPU shapes --------

GPU_SHAPES = [(256, 64, 56, 56), (256, 2048, 7, 7), (8192, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_ids)
def test_realistic_shapes_match_torch_on_gpu(device, shape, layout, dtype):
    x = make_input(shape, layout, device, dtype)
    dy = torch.randn_like(x)
    results = train_step_both(x, dy)
    # Torch's own reductions differ from ours in order; sums over up to 800k values in fp32.
    rtol, atol = (1e-3, 1e-3) if dtype == torch.float32 else TOLERANCES[dtype]
    for name, a, e in zip(RESULT_NAMES, *results):
        scale = e.abs().max().item() if name.startswith("grad w") or name.startswith("grad b") else 1.0
        assert_close(a.float(), e.float(), dtype=torch.float32, rtol=rtol, atol=atol * scale, name=name)
    assert results[0][0].stride() == results[1][0].stride()


@pytest.mark.parametrize("training", [False, True])
def test_one_dimensional_empty_input_as_torch(device, training):
    """An OpInfo sample of F.batch_norm: input (0,) with (0,) running stats gives an empty result."""
    x = torch.empty(0, device=device)
    rm, rv = torch.empty(0, device=device), torch.empty(0, device=device)
    y = gpuopt.functional.batch_norm(x, rm, rv, training=training)
    expected = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), training=training)
    assert y.shape == expected.shape == (0,) and y.dtype == expected.dtype
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        gpuopt.functional.batch_norm(torch.randn(5, device=device), torch.zeros(5, device=device),
                                     torch.ones(5, device=device))


def test_splits_fill_whole_waves_of_the_compiled_occupancy():
    """make_grid spreads each channel over the splits that run the layer in whole waves of
    ``sm_count × programs_per_sm`` programs: one wave when the channel blocks fit in one, else
    a last wave nearly full. (bench/compile_report.py shows it on every suite shape with the
    compiled kernels' occupancy; tests/test_compile.py asserts it.)"""
    from gpuopt._batch_norm_launch import make_grid

    for R, C, S, channels_last in [(256 * 3136, 64, 1, True), (256, 64, 3136, False), (256, 2048, 49, False),
                                   (8192, 4096, 1, True), (128, 128, 784, False)]:
        for per_sm in (2, 3, 4, 5, 6):
            g = make_grid(R, C, S, channels_last, 4, True, 132, per_sm)
            columns = channels_last or g.short_rows
            wave, programs = 132 * per_sm, g.channel_blocks * g.n_splits
            rounds = -(-programs // wave)
            tiles = g.channel_blocks * -(-R // g.block_r) * (1 if columns else -(-S // g.block_k))
            per_program = (g.rows_per_split // g.block_r) * (g.cols_per_split // g.block_k)
            # (128 channels of 50 tiles on 792 slots can do no better than 0.90: the tiles' granularity)
            assert tiles / (rounds * wave * per_program) >= 0.88, (R, C, S, channels_last, per_sm, g)
            if programs <= wave:  # one wave: not a program more than the slots, and most slots busy
                assert programs >= 0.9 * wave or g.n_splits == -(-R // g.block_r) * (1 if columns else -(-S // g.block_k))
    # 64 channels on 528 slots: 8 splits (512 programs), not 9 and a second wave of 48.
    g = make_grid(256, 64, 3136, False, 4, True, 132, 4)
    assert g.channel_blocks * g.n_splits == 512
