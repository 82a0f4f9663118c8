"""gpuopt.Adafactor against torch.optim.Adafactor (its source of truth) and the float64 equations
(``gpuopt.reference.adafactor_step``): 0/1-dim, packed and split matrices, batches of matrices in
any dense layout (channels-last, transposed, permuted), param groups, every option, bf16 with
master weights or stochastic rounding, three launches per group, state_dict both ways with
torch, AMP and fused clipping, a tensor lr, the functional form, and a training run."""

import copy

import numpy as np
import pytest
import torch

import gpuopt
from gpuopt import _adafactor
from gpuopt import reference as ref
from gpuopt.kernels import adafactor as kernels

from .helpers import assert_close, count_launches, regression_task

STEPS = 10


def _shapes_params(device, dtype=torch.float32):
    """0, 1 and 2+ dims: a matrix of a few rows (packed with others in a tile), tall ones (split
    over tiles, one beyond what a tile's rows hold many times), a batch of matrices, a
    channels-last conv weight, a transposed matrix, a permuted batch, a single row and column."""
    tensors = [torch.randn(()), torch.randn(37), torch.randn(3, 5), torch.randn(23, 9), torch.randn(101, 6),
               torch.randn(2, 70, 5), torch.randn(6, 5, 3, 3).to(memory_format=torch.channels_last),
               torch.randn(9, 7).t(), torch.randn(4, 3, 5).permute(1, 0, 2), torch.randn(1, 17), torch.randn(13, 1)]
    return [torch.nn.Parameter(t.to(device=device, dtype=dtype)) for t in tensors]


def _twins(params, dtype=None):
    return [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in params]


def _step_both(ours, theirs, params, twins, steps):
    """``steps`` steps of both optimizers, on the same fresh gradients (new tensors each step)."""
    for _ in range(steps):
        for p, t in zip(params, twins):
            p.grad = torch.randn_like(p)
            t.grad = p.grad.clone()
        ours.step()
        theirs.step()


CASES = [dict(),
         dict(lr=0.05, beta2_decay=-0.5, eps=(1e-20, 1e-2), d=1.5, weight_decay=0.1),
         dict(lr=1e-3, weight_decay=0.01, maximize=True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", CASES)
def test_matches_torch_adafactor(device, dtype, options):
    """10 steps, fresh gradients (new tensors each step), two param groups (the second with its own
    lr): parameters and every state equal torch.optim.Adafactor's, to float64 or float32
    rounding."""
    params = _shapes_params(device, dtype)
    twins = _twins(params)
    groups = lambda ps: [{"params": ps[:5]}, {"params": ps[5:], "lr": 0.02}]  # noqa: E731
    opt = gpuopt.Adafactor(groups(params), **options)
    theirs = torch.optim.Adafactor(groups(twins), **options)
    _step_both(opt, theirs, params, twins, STEPS)
    tolerance = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    for p, t in zip(params, twins):
        assert_close(p, t, **tolerance)
        ours, expected = opt.state[p], theirs.state[t]
        assert set(ours) == set(expected), (set(ours), set(expected))
        for key in expected:
            assert ours[key].shape == expected[key].shape
            assert_close(ours[key], expected[key], **tolerance)


def test_aligned_tensors_take_the_16_byte_path(device):
    """Column counts, strides and vector lengths all multiples of 4 (and fresh, aligned fp32
    tensors): the plan promises the kernels 4-element runs (``VEC``, 16-byte accesses), and the results
    still equal torch's, packed, split and batched matrices alike."""
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in [(8, 12), (3, 16, 8), (150, 20), (24,)]]
    twins = _twins(params)
    opt, theirs = gpuopt.Adafactor(params, weight_decay=0.01), torch.optim.Adafactor(twins, weight_decay=0.01)
    _step_both(opt, theirs, params, twins, 3)
    plan = opt._prepared[0].buckets[0].plan
    assert plan.aligned and plan.multiples_of_vec and plan.vec == 4
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=2e-5, atol=1e-6)


def test_fp32_follows_the_float64_equations(device):
    params = _shapes_params(device)
    opt = gpuopt.Adafactor(params, lr=0.03, weight_decay=0.05)
    W = [p.detach().double().cpu().numpy() for p in params]
    states = [dict(row_var=np.zeros((*w.shape[:-1], 1)), col_var=np.zeros((*w.shape[:-2], 1, w.shape[-1])))
              if w.ndim > 1 else dict(variance=np.zeros(w.shape)) for w in W]
    for step in range(1, STEPS + 1):
        for i, p in enumerate(params):
            p.grad = torch.randn_like(p)
            W[i], states[i] = ref.adafactor_step(W[i], p.grad.cpu().numpy(), states[i], step, lr=0.03,
                                                 weight_decay=0.05)
        opt.step()
    for p, w, s in zip(params, W, states):
        assert_close(p, w, rtol=2e-5, atol=1e-6)
        for key, value in s.items():
            assert_close(opt.state[p][key], value, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("precision", ["master_weights", "stochastic_rounding"])
def test_bf16_follows_the_equations(device, precision):
    """bf16 parameters and gradients, fp32 states: with master weights the fp32 copy follows the
    float64 equations (ε1 = bf16's epsilon, as torch takes it from the parameter's dtype) and
    the parameter is its rounding; with stochastic rounding the parameter stays within a few bf16
    ulps of them (each step rounds at the weights' scale, ~1, whatever the final value), and
    differs from rounding to nearest."""
    params = _shapes_params(device, torch.bfloat16)
    opt = gpuopt.Adafactor(params, lr=0.03, weight_decay=0.05, state_dtype=torch.float32, **{precision: True})
    bf16_eps = float(torch.finfo(torch.bfloat16).eps)
    W = [p.detach().double().cpu().numpy() for p in params]
    states = [dict(row_var=np.zeros((*w.shape[:-1], 1)), col_var=np.zeros((*w.shape[:-2], 1, w.shape[-1])))
              if w.ndim > 1 else dict(variance=np.zeros(w.shape)) for w in W]
    for step in range(1, STEPS + 1):
        for i, p in enumerate(params):
            p.grad = torch.randn_like(p, dtype=torch.float32).to(torch.bfloat16)
            W[i], states[i] = ref.adafactor_step(W[i], p.grad.float().cpu().numpy(), states[i], step, lr=0.03,
                                                 weight_decay=0.05, eps=(bf16_eps, 1e-3))
        opt.step()
    rounded_to_nearest = 0  # elements that differ from the equations' value rounded to nearest
    assert opt._options(opt.param_groups[0])["eps1"] == bf16_eps
    for p, w in zip(params, W):
        if precision == "master_weights":
            master = opt.state[p]["master_param"]
            assert_close(master, w, rtol=1e-4, atol=1e-5)
            assert torch.equal(p, master.to(torch.bfloat16))
        else:
            assert_close(p.float(), w, rtol=4 * bf16_eps, atol=4 * bf16_eps)  # (4 ulps at the weights' scale, 1)
            rounded_to_nearest += int((p != torch.as_tensor(w).to(p.device, torch.bfloat16)).sum())
    if precision == "stochastic_rounding":
        assert rounded_to_nearest > 0


def test_three_launches_per_group_and_the_functional_form(device):
    params = _shapes_params(device)
    twins = _twins(params)
    opt = gpuopt.Adafactor([{"params": params[:4]}, {"params": params[4:], "lr": 0.02}], weight_decay=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    counters = {}
    with count_launches(kernels, "_statistics") as counters["statistics"], \
            count_launches(kernels, "_norms") as counters["norms"], \
            count_launches(kernels, "_update") as counters["update"]:
        opt.step()
    assert {name: c["launches"] for name, c in counters.items()} == dict(statistics=2, norms=2, update=2)
    for first, last, lr in ((0, 4, 1e-2), (4, len(params), 2e-2)):
        ps, gs = twins[first:last], [p.grad for p in params[first:last]]
        rows = [torch.zeros(*p.shape[:-1], 1, device=device) if p.dim() > 1 else None for p in ps]
        cols = [torch.zeros(*p.shape[:-2], 1, p.shape[-1], device=device) if p.dim() > 1 else None for p in ps]
        variances = [None if p.dim() > 1 else torch.zeros_like(p) for p in ps]
        steps = [torch.zeros((), device=device) for _ in ps]
        gpuopt.functional.adafactor(ps, gs, rows, cols, variances, steps, lr=lr, weight_decay=0.01)
        assert all(float(s) == 1.0 for s in steps)
    for p, t in zip(params, twins):
        assert torch.equal(p, t)


def test_state_dict_moves_both_ways_with_torch(device):
    """torch.optim.Adafactor's state_dict loaded into gpuopt.Adafactor mid-run (and gpuopt's into
    torch's) continues the run as the original optimizer does."""
    params = _shapes_params(device)
    copies = _twins(params)

    def grads():
        return [torch.randn_like(p) for p in params]

    def step(opt, ps, gs):
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()

    for source, target in ((torch.optim.Adafactor, gpuopt.Adafactor), (gpuopt.Adafactor, torch.optim.Adafactor)):
        first = source(params, lr=0.02, weight_decay=0.01)
        for _ in range(3):
            step(first, params, grads())
        with torch.no_grad():
            for c, p in zip(copies, params):
                c.copy_(p)
        second = target(copies, lr=0.02, weight_decay=0.01)
        second.load_state_dict(copy.deepcopy(first.state_dict()))
        for _ in range(3):
            gs = grads()
            step(first, params, gs)
            step(second, copies, gs)
        for p, c in zip(params, copies):
            assert_close(c, p, rtol=2e-5, atol=1e-6)


def test_state_dict_round_trip_is_exact(device, tmp_path):
    params = _shapes_params(device)
    copies = _twins(params)
    opt = gpuopt.Adafactor(params, weight_decay=0.01)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    with torch.no_grad():
        for c, p in zip(copies, params):
            c.copy_(p)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed = gpuopt.Adafactor(copies, weight_decay=0.01)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for _ in range(3):
        for p, c in zip(params, copies):
            p.grad = torch.randn_like(p)
            c.grad = p.grad.clone()
        opt.step()
        resumed.step()
    for p, c in zip(params, copies):
        assert torch.equal(p, c)


def test_a_loaded_state_of_the_wrong_shape_is_refused(device):
    params = _shapes_params(device)[2:4]
    opt = gpuopt.Adafactor(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    state["state"][0]["row_var"] = torch.zeros(3, 2)
    fresh = gpuopt.Adafactor(_twins(params))
    with pytest.raises(ValueError, match=r"keeps a row_var of shape \(3, 1\)"):
        fresh.load_state_dict(state)
    state = copy.deepcopy(opt.state_dict())
    del state["state"][1]["col_var"]
    with pytest.raises(KeyError, match="'col_var'"):
        fresh.load_state_dict(state)
    assert not fresh.state


def test_amp_skip_unscale_and_fused_clipping(device):
    """An overflow step changes nothing (parameters, factors, step, the arrival counters); a
    scaled step equals the unscaled one; ``opt.clip_grad_norm_`` equals torch's clip and step."""
    params = _shapes_params(device)
    twins = _twins(params)
    opt, plain = gpuopt.Adafactor(params, weight_decay=0.01), gpuopt.Adafactor(twins, weight_decay=0.01)
    for p, t in zip(params, twins):
        p.grad = torch.randn_like(p)
        t.grad = p.grad.clone()
    opt.step()
    plain.step()
    before = copy.deepcopy(opt.state_dict()["state"]), [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 1024
    opt.step(grad_scale=torch.tensor(1024.0, device=device), found_inf=torch.tensor(1.0, device=device))
    assert all(torch.equal(p, b) for p, b in zip(params, before[1]))
    for index, state in opt.state_dict()["state"].items():
        assert all(torch.equal(value, before[0][index][key]) for key, value in state.items())
    opt.step(grad_scale=torch.tensor(1024.0, device=device), found_inf=torch.tensor(0.0, device=device))
    for p, t in zip(params, twins):
        t.grad = p.grad / 1024
    plain.step()
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=1e-6, atol=1e-7)
    for p, t in zip(params, twins):
        p.grad = torch.randn_like(p) * 10
        t.grad = p.grad.clone()
    norm = opt.clip_grad_norm_(1.0)
    assert_close(norm, torch.nn.utils.clip_grad_norm_(twins, 1.0), rtol=1e-6)
    opt.step()
    plain.step()
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=1e-5, atol=1e-7)
    assert not any(bucket.plan.counter.any() for prepared in opt._prepared.values() for bucket in prepared.buckets)


def test_a_tensor_lr_on_the_device_equals_the_float(device):
    params = _shapes_params(device)
    twins = _twins(params)
    opt = gpuopt.Adafactor(params, lr=torch.tensor(0.02, device=device), weight_decay=0.1)
    plain = gpuopt.Adafactor(twins, lr=0.02, weight_decay=0.1)
    _step_both(opt, plain, params, twins, 3)
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=1e-6, atol=1e-7)


def test_torch_refusals(device):
    p = [torch.nn.Parameter(torch.ones(3, 2, device=device))]
    for kwargs, message in ((dict(lr=-1.0), "Learning rate should be >= 0"),
                            (dict(beta2_decay=0.5), "beta2_decay should be <= 0"),
                            (dict(eps=(-1.0, 1e-3)), "epsilon1 should be >= 0"),
                            (dict(eps=(None, -1.0)), "epsilon2 should be >= 0"),
                            (dict(d=0.5), "Clipping threshold d should be >= 1"),
                            (dict(weight_decay=-0.1), "weight_decay should be >= 0")):
        with pytest.raises(ValueError, match=message):
            gpuopt.Adafactor(p, **kwargs)
    z = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.complex64, device=device))
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match="does not support complex parameters"):
        gpuopt.Adafactor([z]).step()


def test_split_matrices_fold_every_tile_and_reset_their_counters(device):
    """Tall matrices (several tiles each, several sub-tiles a tile) beside a batch of them and a
    vector: each tile's column sums folded by the last to arrive, as torch's column means, with
    every counter back at 0."""
    shapes = [(1000, 7), (3, 150, 17), (129,)]
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    twins = _twins(params)
    opt, theirs = gpuopt.Adafactor(params), torch.optim.Adafactor(twins)
    _step_both(opt, theirs, params, twins, 3)
    plan = opt._prepared[0].buckets[0].plan
    split = plan.meta[:, kernels.META.index("split")]
    tiles = plan.meta[:, kernels.META.index("tiles_per_matrix")]
    assert split.tolist()[:2] == [1, 1] and int(tiles[0]) > 2
    assert not plan.counter.any()
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=2e-5, atol=1e-6)
        for key in theirs.state[t]:
            assert_close(opt.state[p][key], theirs.state[t][key], rtol=2e-5, atol=1e-7)


def test_tile_geometry():
    """A matrix of at most ROWS rows packs ROWS // R matrices a tile; a taller one is split into
    tiles of ROWS·⌈√⌈R/ROWS⌉⌉ rows (tiles and the fold of their column sums about equally long)."""
    rows, cols = _adafactor.INTERPRETER_TILE[:2]
    tall = rows * 15 + 1  # ⌈tall / ROWS⌉ = 16: tiles of 4·ROWS rows
    plan = _adafactor.TilePlan([[torch.zeros(5, 3, 2), torch.zeros(tall, 8), torch.zeros(10)]] * len(kernels.ROLES))
    meta = {name: plan.meta[:, kernels.META.index(name)].tolist() for name in kernels.META}
    assert meta["split"] == [0, 1, 0]
    assert meta["tile_rows"][:2] == [(rows // 3) * 3, rows * 4]
    assert meta["n_tiles"] == [-(-5 // (rows // 3)), 4, 1]
    assert meta["columns"][2] == cols and meta["view_rows"][2] == 1


def test_training_reaches_torchs_loss(device):
    """A small MLP on a fixed regression task, 60 steps: the final loss within 1% of
    torch.optim.Adafactor's on the same run, and well below the start."""
    x, y, base = regression_task(device)
    model, twin = copy.deepcopy(base), copy.deepcopy(base)
    opt = gpuopt.Adafactor(model.parameters(), lr=0.05, weight_decay=1e-3)
    theirs = torch.optim.Adafactor(twin.parameters(), lr=0.05, weight_decay=1e-3)
    for step in range(60):
        batch = slice((step * 64) % 256, (step * 64) % 256 + 64)
        for m, o in ((model, opt), (twin, theirs)):
            m.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(m(x[batch]), y[batch]).backward()
            o.step()
    ours = torch.nn.functional.mse_loss(model(x), y).item()
    expected = torch.nn.functional.mse_loss(twin(x), y).item()
    assert ours < 0.5 * torch.nn.functional.mse_loss(base(x), y).item()
    assert abs(ours - expected) <= 0.01 * expected, (ours, expected)


@pytest.mark.gpu
def test_the_folds_on_a_gpu_are_exact_and_repeat_bit_for_bit(device):
    """On a GPU a split matrix's tiles run concurrently: a fold that read a tile's column sums
    before they were written would be wrong now and then. Twenty steps on tall matrices (many
    tiles each) from identical copies: every step equals torch.optim.Adafactor to fp32 precision
    and the two copies agree bit for bit."""
    torch.manual_seed(0)
    shapes = [(50257, 64), (4096, 1024), (8, 300, 129), (1000,), (7, 0)]
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    copies, twins = _twins(params), _twins(params)
    opts = [gpuopt.Adafactor(params), gpuopt.Adafactor(copies), torch.optim.Adafactor(twins)]
    for _ in range(20):
        for p, c, t in zip(params, copies, twins):
            p.grad = torch.randn_like(p)
            c.grad, t.grad = p.grad.clone(), p.grad.clone()
        for opt in opts:
            opt.step()
        for p, c, t in zip(params, copies, twins):
            assert torch.equal(p, c)
            assert_close(p, t, rtol=1e-5, atol=1e-6)


def test_a_compiled_training_step_runs_the_step_eagerly(device):
    """``torch.compile`` of a training step with ``opt.step()`` inside: the step runs eagerly (a
    graph break, as Muon's) and the run equals the uncompiled one."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(device)
        return model, gpuopt.Adafactor(model.parameters(), weight_decay=0.01)

    def train_step(model, opt, x):
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    x = torch.randn(6, 5, device=device)
    (model, opt), (twin, twin_opt) = make(), make()
    compiled = torch.compile(train_step, backend="eager")
    for _ in range(3):
        compiled(model, opt, x)
        train_step(twin, twin_opt, x)
    for p, t in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, t)
