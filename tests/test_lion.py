"""gpuopt.Lion against lion-pytorch's Lion (its users' source of truth) and against the float64
reference (``gpuopt.reference.lion_step``): odd shapes, many steps, param groups, decoupled weight
decay, bf16 with master weights and with stochastic rounding, state_dict both ways, one launch per
group, and a training run."""

import copy

import numpy as np
import pytest
import torch

import gpuopt
from gpuopt import reference as ref
from gpuopt.kernels import _multi_tensor as walk

from .helpers import assert_close, count_launches, odd_params, regression_task, two_groups

lion_pytorch = pytest.importorskip("lion_pytorch")

STEPS = 12


def _steps(opts_and_params, steps=STEPS, hook=None):
    """Step each (optimizer, params) pair with the same fresh gradients."""
    for step in range(steps):
        grads = [torch.randn_like(p, dtype=torch.float32) for p in opts_and_params[0][1]]
        for opt, params in opts_and_params:
            for p, g in zip(params, grads):
                p.grad = g.to(p.dtype).clone()
            opt.step()
        if hook:
            hook(step)


@pytest.mark.parametrize("kwargs", [dict(lr=1e-3), dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1),
                                    dict(lr=1e-3, weight_decay=0.5, decoupled_weight_decay=True)])
def test_matches_lion_pytorch(device, kwargs):
    """12 steps, two param groups (the second with its own lr and weight decay), a learning-rate
    scheduler: parameters and ``exp_avg`` equal lion-pytorch's."""
    params = odd_params(device)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = gpuopt.Lion(two_groups(params, lr=2e-3, weight_decay=0.05), **kwargs)
    theirs = lion_pytorch.Lion(two_groups(twins, lr=2e-3, weight_decay=0.05), **kwargs)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5) for o in (opt, theirs)]
    _steps([(opt, params), (theirs, twins)], hook=lambda step: [s.step() for s in schedulers])
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=1e-6, atol=1e-6)
        assert_close(opt.state[p]["exp_avg"], theirs.state[t]["exp_avg"], rtol=1e-6, atol=1e-7)
        assert set(opt.state[p]) == set(theirs.state[t]) == {"exp_avg"}


@pytest.mark.parametrize("maximize", [False, True])
def test_float64_matches_the_reference(device, maximize):
    params = odd_params(device, torch.float64)
    start = [p.detach().cpu().numpy().copy() for p in params]
    opt = gpuopt.Lion(params, lr=1e-2, betas=(0.85, 0.97), weight_decay=0.2, maximize=maximize)
    grads = []

    def keep(step):
        grads.append([p.grad.detach().cpu().numpy().copy() for p in params])

    _steps([(opt, params)], hook=keep)
    for i, p in enumerate(params):
        W, m = start[i], np.zeros_like(start[i])
        for step_grads in grads:
            W, m = ref.lion_step(W, step_grads[i], m, lr=1e-2, beta1=0.85, beta2=0.97, weight_decay=0.2,
                                 maximize=maximize)
        assert_close(p, W, rtol=1e-12, atol=1e-12)
        assert_close(opt.state[p]["exp_avg"], m, rtol=1e-12, atol=1e-12)


def test_bf16_with_master_weights_follows_the_float32_reference(device):
    """bf16 parameters with fp32 master copies: the master follows the reference (fp32 math), the
    parameter is its rounding."""
    params = odd_params(device, torch.bfloat16)
    start = [p.detach().double().cpu().numpy() for p in params]
    opt = gpuopt.Lion(params, lr=1e-2, weight_decay=0.1, master_weights=True, state_dtype=torch.float32)
    grads = []
    _steps([(opt, params)], hook=lambda step: grads.append([p.grad.double().cpu().numpy() for p in params]))
    for i, p in enumerate(params):
        W, m = start[i], np.zeros_like(start[i])
        for step_grads in grads:
            W, m = ref.lion_step(W, step_grads[i], m, lr=1e-2, weight_decay=0.1)
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert_close(master, W, rtol=1e-5, atol=1e-5)
        assert torch.equal(p, master.to(torch.bfloat16))


def test_bf16_stochastic_rounding_is_unbiased(device):
    """A step of lr below one bf16 ULP, from 1.0, many times: the mean lands on the exact value."""
    n = 4096
    p = torch.nn.Parameter(torch.ones(n, device=device, dtype=torch.bfloat16))
    opt = gpuopt.Lion([p], lr=1e-3, stochastic_rounding=True)
    values = []
    for _ in range(40):
        with torch.no_grad():
            p.fill_(1.0)
        p.grad = torch.ones_like(p)
        opt.step()
        values.append(p.detach().double().mean().item())
    ulp = 2.0**-8
    q = 1e-3 / ulp
    standard_error = ulp * (q * (1 - q) / (n * len(values))) ** 0.5
    assert abs(np.mean(values) - (1.0 - 1e-3)) < 5 * standard_error


def test_state_dict_moves_both_ways_with_lion_pytorch(device, tmp_path):
    """Mid-run, lion-pytorch's state_dict loads into gpuopt and gpuopt's into lion-pytorch (through
    torch.save / torch.load(weights_only=True)); every run continues as the uninterrupted one."""
    params = odd_params(device)
    copies = [[torch.nn.Parameter(p.detach().clone()) for p in params] for _ in range(3)]
    ours, theirs = gpuopt.Lion(copies[0], lr=1e-3, weight_decay=0.1), lion_pytorch.Lion(copies[1], lr=1e-3,
                                                                                          weight_decay=0.1)
    straight = gpuopt.Lion(copies[2], lr=1e-3, weight_decay=0.1)
    _steps([(ours, copies[0]), (theirs, copies[1]), (straight, copies[2])], steps=3)
    torch.save({"ours": ours.state_dict(), "theirs": theirs.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    swapped_ours, swapped_theirs = gpuopt.Lion(copies[1], lr=1e-3, weight_decay=0.1), lion_pytorch.Lion(
        copies[0], lr=1e-3, weight_decay=0.1)
    swapped_ours.load_state_dict(saved["theirs"])
    swapped_theirs.load_state_dict(saved["ours"])
    _steps([(swapped_ours, copies[1]), (swapped_theirs, copies[0]), (straight, copies[2])], steps=4)
    for a, b, c in zip(*copies):
        assert_close(a, c, rtol=1e-6, atol=1e-6)
        assert_close(b, c, rtol=1e-6, atol=1e-6)


def test_one_launch_per_group_and_the_functional_form(device):
    params = odd_params(device)
    twins = [p.detach().clone() for p in params]
    opt = gpuopt.Lion(two_groups(params, lr=2e-3), lr=1e-3, weight_decay=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    with count_launches(walk, "_step_kernel") as counter:
        opt.step()
    assert counter["launches"] == 2
    exp_avgs = [torch.zeros_like(t) for t in twins]
    gpuopt.functional.lion(twins[:2], [p.grad for p in params[:2]], exp_avgs[:2], lr=1e-3, weight_decay=0.1)
    gpuopt.functional.lion(twins[2:], [p.grad for p in params[2:]], exp_avgs[2:], lr=2e-3, weight_decay=0.1)
    for p, t, m in zip(params, twins, exp_avgs):
        assert_close(p, t, rtol=1e-6, atol=1e-7)
        assert_close(opt.state[p]["exp_avg"], m, rtol=1e-6, atol=1e-7)


def test_amp_skips_an_overflow_step_and_unscales(device):
    params = odd_params(device)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, theirs = gpuopt.Lion(params, lr=1e-3), lion_pytorch.Lion(twins, lr=1e-3)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 1024
    opt.step(grad_scale=torch.tensor(1024.0, device=device), found_inf=torch.tensor(1.0, device=device))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[p]["exp_avg"], torch.zeros_like(p)) for p in params)
    opt.step(grad_scale=torch.tensor(1024.0, device=device), found_inf=torch.tensor(0.0, device=device))
    for p, t in zip(params, twins):
        t.grad = p.grad / 1024
    theirs.step()
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_refused_before_anything_changes(device):
    with pytest.raises(ValueError, match="Invalid learning rate"):
        gpuopt.Lion([torch.nn.Parameter(torch.ones(3, device=device))], lr=-1.0)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        gpuopt.Lion([torch.nn.Parameter(torch.ones(3, device=device))], betas=(0.9, 1.5))
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64, device=device))
    q = torch.nn.Parameter(torch.randn(5, device=device))
    opt = gpuopt.Lion([q, p])
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    before = q.detach().clone()
    with pytest.raises(RuntimeError, match="Lion does not support complex parameters"):
        opt.step()
    assert torch.equal(q, before) and not opt.state


def test_training_reaches_lion_pytorchs_loss(device):
    """A small MLP on a fixed regression task, 60 steps each from the same weights and batches:
    the final loss within 1% of lion-pytorch's."""
    x, y, base = regression_task(device)
    losses = {}
    for name, cls in (("gpuopt", gpuopt.Lion), ("lion-pytorch", lion_pytorch.Lion)):
        model = copy.deepcopy(base)
        opt = cls(model.parameters(), lr=3e-3, weight_decay=0.01)
        for step in range(60):
            batch = slice((step * 64) % 256, (step * 64) % 256 + 64)
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            loss.backward()
            opt.step()
        losses[name] = torch.nn.functional.mse_loss(model(x), y).item()
    assert losses["gpuopt"] < 0.5 * torch.nn.functional.mse_loss(base(x), y).item()  # it trained
    assert abs(losses["gpuopt"] - losses["lion-pytorch"]) <= 0.01 * losses["lion-pytorch"], losses
