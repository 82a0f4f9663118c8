"""gpuopt.Muon against torch.optim.Muon (its users' source of truth) and the float64 equations
(``gpuopt.reference.muon_step``): odd 2-D shapes (repeated ones share a batch), many steps, param
groups with their own options, bf16 with master weights, state_dict both ways, AMP and fused
clipping, the launch and batch counts, the functional form, refusals and a training run. FSDP2
(each matrix orthogonalized whole, on one rank): tests/distributed_worker.py."""

import copy

import numpy as np
import pytest
import torch

import gpuopt
from gpuopt import _muon
from gpuopt import reference as ref
from gpuopt.kernels import _multi_tensor as walk

from .helpers import assert_close, count_launches, regression_task

SHAPES = [(7, 5), (5, 7), (7, 5), (16, 16), (1, 9), (9, 1), (7, 5)]
STEPS = 10


def _flip(lr) -> float:
    """The tolerance against torch: an entry of NS(U) may round to the neighbouring bf16 value on
    one side only (batched products against torch's per-matrix ones), lr · 2⁻⁸ of it in that
    step; twice that, and never below 1e-5."""
    return max(1e-5, 2 * lr * 2.0 ** -8)


def _params(device, dtype=torch.float32):
    params = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in SHAPES]
    params[3].data = params[3].data.t()  # a column-major parameter (its update batch is laid out alike)
    return params


def _groups(params, **second):
    return [{"params": params[:3]}, {"params": params[3:], **second}]


def _steps(pairs, steps=STEPS):
    for _ in range(steps):
        # (values bf16 holds exactly: bf16 and fp32 parameters then get the same gradients)
        grads = [torch.randn(p.shape, device=p.device).to(torch.bfloat16).float() for p in pairs[0][1]]
        for opt, params in pairs:
            for p, g in zip(params, grads):
                p.grad = g.to(p.dtype).clone()
            opt.step()


@pytest.mark.parametrize("options", [dict(), dict(lr=0.02, momentum=0.9, nesterov=False, weight_decay=0.0),
                                     dict(lr=5e-3, ns_steps=3, adjust_lr_fn="match_rms_adamw")])
def test_matches_torch_optim_muon(device, options):
    """10 steps, two groups (the second with its own lr and lr adjustment): parameters and momentum
    buffers equal torch's to the rounding of the bf16 Newton–Schulz iteration both run."""
    params = _params(device)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    second = dict(lr=2e-3, adjust_lr_fn="original")
    opt = gpuopt.Muon(_groups(params, **second), **options)
    theirs = torch.optim.Muon(_groups(twins, **second), **options)
    _steps([(opt, params), (theirs, twins)])
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=1e-4, atol=_flip(options.get("lr", 1e-3)))
        assert_close(opt.state[p]["momentum_buffer"], theirs.state[t]["momentum_buffer"], rtol=1e-5, atol=1e-6)
        assert set(opt.state[p]) == set(theirs.state[t]) == {"momentum_buffer"}


def test_one_step_follows_the_float64_equations(device):
    """From a momentum state, one step of each matrix: the change of the weights is the float64
    update to the precision of torch's bf16 iteration (2⁻⁸ an operation: torch's own
    departs from float64 by up to 8% of the largest entry over 1500 random matrices; 10% allowed)."""
    params = _params(device, torch.float64)
    opt = gpuopt.Muon(params, lr=0.05, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    _steps([(opt, params)], steps=2)
    before = [p.detach().cpu().numpy().copy() for p in params]
    buffers = [opt.state[p]["momentum_buffer"].cpu().numpy().copy() for p in params]
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    for p, W, B, g in zip(params, before, buffers, grads):
        expected, buffer = ref.muon_step(W, g.cpu().numpy(), B, lr=0.05, weight_decay=0.1,
                                         adjust_lr_fn="match_rms_adamw")
        assert_close(opt.state[p]["momentum_buffer"], buffer, rtol=1e-12, atol=1e-14)
        change, expected_change = p.detach().cpu().numpy() - W, expected - W
        assert np.abs(change - expected_change).max() <= 0.1 * np.abs(expected_change).max()


def test_launches_and_batches(device, monkeypatch):
    """Per group one momentum launch and one update launch; one Newton–Schulz chain per (shape,
    layout) of a group, not per tensor."""
    params = _params(device)
    opt = gpuopt.Muon(_groups(params), lr=0.01)
    chains = []
    original = _muon.newton_schulz
    monkeypatch.setattr(_muon, "newton_schulz", lambda x, *a: chains.append(tuple(x.shape)) or original(x, *a))
    for p in params:
        p.grad = torch.randn_like(p)
    with count_launches(walk, "_step_kernel") as counter:
        opt.step()
    assert counter["launches"] == 4
    # group 1: (7,5) ×2, (5,7); group 2: (16,16) column-major, (1,9), (9,1), (7,5)
    assert sorted(chains) == sorted([(2, 7, 5), (1, 5, 7), (1, 16, 16), (1, 1, 9), (1, 9, 1), (1, 7, 5)])


def test_bf16_with_master_weights_follows_torch_on_fp32_copies(device):
    params = _params(device, torch.bfloat16)
    twins = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = gpuopt.Muon(params, lr=0.02, master_weights=True, state_dtype=torch.float32)
    theirs = torch.optim.Muon(twins, lr=0.02)
    _steps([(opt, params), (theirs, twins)])
    for p, t in zip(params, twins):
        master = opt.state[p]["master_param"]
        assert_close(master, t, rtol=1e-3, atol=_flip(0.02))
        assert torch.equal(p, master.to(torch.bfloat16))


def test_bf16_stochastic_rounding_is_unbiased(device):
    """A bf16 matrix reset to 1.0 before each step with the same constant gradient: every step's
    update is the same matrix with equal entries (the orthogonalized rank-1 direction), a fraction
    of one bf16 ULP below 1.0. Over 40 steps the mean of the rounded elements lands on the value a
    float64 twin stepped by torch.optim.Muon reaches (round-to-nearest would stay at 1.0)."""
    shape = (8, 32)
    p = torch.nn.Parameter(torch.ones(shape, device=device, dtype=torch.bfloat16))
    twin = torch.nn.Parameter(torch.ones(shape, dtype=torch.float64))
    opt = gpuopt.Muon([p], lr=1e-2, weight_decay=0.0, stochastic_rounding=True, state_dtype=torch.float32)
    theirs = torch.optim.Muon([twin], lr=1e-2, weight_decay=0.0)
    rows, expected = [], []
    for _ in range(40):
        with torch.no_grad():
            p.fill_(1.0)
            twin.fill_(1.0)
        p.grad, twin.grad = torch.full_like(p, 0.5), torch.full_like(twin, 0.5)
        opt.step()
        theirs.step()
        rows.append(p.detach().double().cpu())
        expected.append(twin.detach().clone())
    rows, expected = torch.stack(rows), torch.stack(expected)
    ulp = 2.0 ** -8  # bf16's spacing just below 1.0
    assert ((expected < 1.0) & (expected > 1.0 - ulp)).all(), "the update must stay within one ULP below 1.0"
    assert set(rows.unique().tolist()) <= {1.0, 1.0 - ulp}
    q = (1.0 - expected) / ulp  # each step's probability of rounding down
    standard_error = ulp * (q * (1 - q)).sum(0).sqrt().max().item() / len(q)
    deviation = (rows - expected).mean(0)  # per element, over the steps (bf16 vs float64 iterations: ~1% of q)
    assert deviation.abs().max().item() < 5 * standard_error + 0.02 * ulp * q.max().item()
    assert abs(deviation.mean().item()) < 5 * standard_error / rows[0].numel() ** 0.5 + 0.02 * ulp * q.max().item()


def test_state_dict_moves_both_ways_with_torch(device, tmp_path):
    params = _params(device)
    copies = [[torch.nn.Parameter(p.detach().clone()) for p in params] for _ in range(3)]
    ours, theirs, straight = (gpuopt.Muon(copies[0], lr=0.01), torch.optim.Muon(copies[1], lr=0.01),
                              torch.optim.Muon(copies[2], lr=0.01))
    _steps([(ours, copies[0]), (theirs, copies[1]), (straight, copies[2])], steps=3)
    torch.save({"ours": ours.state_dict(), "theirs": theirs.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    swapped_ours, swapped_theirs = gpuopt.Muon(copies[1], lr=0.01), torch.optim.Muon(copies[0], lr=0.01)
    swapped_ours.load_state_dict(saved["theirs"])
    swapped_theirs.load_state_dict(saved["ours"])
    _steps([(swapped_ours, copies[1]), (swapped_theirs, copies[0]), (straight, copies[2])], steps=3)
    for a, b, c in zip(*copies):
        assert_close(a, c, rtol=1e-4, atol=_flip(0.01))
        assert_close(b, c, rtol=1e-4, atol=_flip(0.01))


def test_amp_skip_unscale_clipping_and_the_functional_form(device):
    params = _params(device)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, theirs = gpuopt.Muon(params, lr=0.01), torch.optim.Muon(twins, lr=0.01)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 1024
    opt.step(grad_scale=torch.tensor(1024.0, device=device), found_inf=torch.tensor(1.0, device=device))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(not opt.state[p]["momentum_buffer"].any() for p in params)
    opt.step(grad_scale=torch.tensor(1024.0, device=device), found_inf=torch.tensor(0.0, device=device))
    for p, t in zip(params, twins):
        t.grad = p.grad / 1024
    theirs.step()
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=1e-4, atol=_flip(0.01))
        p.grad = torch.randn_like(p) * 10
        t.grad = p.grad.clone()
    assert_close(opt.clip_grad_norm_(1.0), torch.nn.utils.clip_grad_norm_(twins, 1.0), rtol=1e-6)
    opt.step()
    theirs.step()
    copies = [t.detach().clone() for t in twins]
    buffers = [theirs.state[t]["momentum_buffer"].clone() for t in twins]
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=1e-4, atol=_flip(0.01))
        t.grad = torch.randn_like(t)
    theirs.step()
    gpuopt.functional.muon(copies, [t.grad for t in twins], buffers, lr=0.01)
    for c, t, b in zip(copies, twins, buffers):
        assert_close(c, t, rtol=1e-4, atol=_flip(0.01))
        assert_close(b, theirs.state[t]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_refusals_match_torch(device):
    matrix = torch.nn.Parameter(torch.randn(3, 4, device=device))
    for kwargs, message in ((dict(lr=-1.0), "Learning rate should be >= 0"), (dict(momentum=-0.1), "momentum"),
                            (dict(adjust_lr_fn="other"), "Adjust learning rate function other"),
                            (dict(ns_steps=100), "less than 100"), (dict(ns_coefficients=(1.0, 2.0)), "exactly 3")):
        with pytest.raises(ValueError, match=message):
            gpuopt.Muon([matrix], **kwargs)
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        gpuopt.Muon([matrix, torch.nn.Parameter(torch.randn(3, device=device))])
    opt = gpuopt.Muon([matrix])
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2, 2, device=device))]})
    complex_matrix = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.complex64, device=device))
    opt = gpuopt.Muon([matrix, complex_matrix])
    matrix.grad, complex_matrix.grad = torch.randn_like(matrix), torch.randn_like(complex_matrix)
    before = matrix.detach().clone()
    with pytest.raises(RuntimeError, match="Muon does not support complex parameters"):
        opt.step()
    assert torch.equal(matrix, before) and not opt.state


def test_training_reaches_torchs_loss(device):
    """The regression MLP's weight matrices with Muon, its biases with AdamW (Muon's usual split),
    60 steps: the final loss within 1% of the same run with torch.optim.Muon."""
    x, y, base = regression_task(device)
    losses = {}
    for name, cls in (("gpuopt", gpuopt.Muon), ("torch", torch.optim.Muon)):
        model = copy.deepcopy(base)
        matrices = [p for p in model.parameters() if p.ndim == 2]
        others = [p for p in model.parameters() if p.ndim != 2]
        opts = [cls(matrices, lr=0.02, weight_decay=0.01), torch.optim.AdamW(others, lr=1e-2)]
        for step in range(60):
            batch = slice((step * 64) % 256, (step * 64) % 256 + 64)
            model.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x[batch]), y[batch]).backward()
            for opt in opts:
                opt.step()
        losses[name] = torch.nn.functional.mse_loss(model(x), y).item()
    assert losses["gpuopt"] < 0.5 * torch.nn.functional.mse_loss(base(x), y).item()
    assert abs(losses["gpuopt"] - losses["torch"]) <= 0.01 * losses["torch"], losses
