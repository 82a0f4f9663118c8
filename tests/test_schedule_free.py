"""gpuopt.AdamWScheduleFree against the schedulefree package's AdamWScheduleFree (its users' source
of truth) and the float64 reference: step by step with warmup, polynomial weighting, weight decay
and train/eval switches; param-group and state keys; state_dict both ways; launch counts; bf16
with master weights; a training run."""

import copy

import numpy as np
import pytest
import torch

import gpuopt
from gpuopt import reference as ref
from gpuopt.kernels import _multi_tensor as walk

from .helpers import assert_close, count_launches, odd_params, regression_task, two_groups

schedulefree = pytest.importorskip("schedulefree")

GROUP_KEYS = ("k", "weight_sum", "lr_max", "scheduled_lr", "train_mode")


def _step_both(pairs):
    grads = [torch.randn_like(p, dtype=torch.float32) for p in pairs[0][1]]
    for opt, params in pairs:
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype).clone()  # (schedulefree divides the gradient in place)
        opt.step()


def _assert_same(opt, params, theirs, twins, rtol=1e-5, atol=1e-6):
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=rtol, atol=atol)
        for key in ("z", "exp_avg_sq"):
            assert_close(opt.state[p][key], theirs.state[t][key], rtol=rtol, atol=atol, name=key)
    for ours, their in zip(opt.param_groups, theirs.param_groups):
        for key in GROUP_KEYS:
            assert ours[key] == pytest.approx(their[key], rel=1e-12), key


@pytest.mark.parametrize("kwargs", [dict(lr=1e-2), dict(lr=5e-3, betas=(0.8, 0.95), weight_decay=0.1, warmup_steps=3),
                                    dict(lr=1e-2, warmup_steps=4, r=0.5, weight_lr_power=1.0, eps=1e-6)])
def test_matches_schedulefree_with_mode_switches(device, kwargs):
    """14 steps, two param groups (the second with its own lr and weight decay), eval() after step 5
    (the averages compared), train() again, eval() at the end: parameters, states and the
    groups' counters equal schedulefree's throughout."""
    params = odd_params(device)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = gpuopt.AdamWScheduleFree(two_groups(params, lr=2e-2, weight_decay=0.05), **kwargs)
    theirs = schedulefree.AdamWScheduleFree(two_groups(twins, lr=2e-2, weight_decay=0.05), **kwargs)
    for o in (opt, theirs):
        o.train()
    for step in range(14):
        _step_both([(opt, params), (theirs, twins)])
        if step == 5:
            opt.eval()
            theirs.eval()
            _assert_same(opt, params, theirs, twins)
            opt.train()
            theirs.train()
    opt.eval()
    theirs.eval()
    _assert_same(opt, params, theirs, twins)
    assert set(opt.state[params[0]]) == set(theirs.state[twins[0]]) == {"z", "exp_avg_sq"}


@pytest.mark.parametrize("maximize", [False, True])
def test_float64_matches_the_reference(device, maximize):
    params = odd_params(device, torch.float64)
    opt = gpuopt.AdamWScheduleFree(params, lr=1e-2, weight_decay=0.1, warmup_steps=2, maximize=maximize)
    opt.train()
    ys = [p.detach().cpu().numpy().copy() for p in params]
    zs = [y.copy() for y in ys]
    vs = [np.zeros_like(y) for y in ys]
    weight_sum, lr_max = 0.0, -1.0
    for step in range(1, 9):
        for p in params:
            p.grad = torch.randn_like(p)
        grads = [p.grad.cpu().numpy().copy() for p in params]
        opt.step()
        lr = 1e-2 * min(1.0, step / 2)
        lr_max = max(lr, lr_max)
        weight_sum += lr_max**2
        for i in range(len(params)):
            ys[i], zs[i], vs[i] = ref.schedule_free_adamw_step(ys[i], zs[i], grads[i], vs[i], lr=lr, weight_decay=0.1,
                                                               ckp1=lr_max**2 / weight_sum, step=step,
                                                               maximize=maximize)
    for p, y, z in zip(params, ys, zs):
        assert_close(p, y, rtol=1e-12, atol=1e-12)
        assert_close(opt.state[p]["z"], z, rtol=1e-12, atol=1e-12)


def test_bf16_master_weights_follow_schedulefree_in_float32(device):
    params = odd_params(device, torch.bfloat16)
    twins = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = gpuopt.AdamWScheduleFree(params, lr=1e-2, master_weights=True, state_dtype=torch.float32)
    theirs = schedulefree.AdamWScheduleFree(twins, lr=1e-2)
    opt.train()
    theirs.train()
    for _ in range(6):
        for p, t in zip(params, twins):
            p.grad = torch.randn_like(p)
            t.grad = p.grad.float()  # the same (bf16) gradient values
        opt.step()
        theirs.step()
    opt.eval()
    theirs.eval()
    for p, t in zip(params, twins):
        master = opt.state[p]["master_param"]
        assert_close(master, t, rtol=1e-5, atol=1e-6)
        assert torch.equal(p, master.to(torch.bfloat16))


def test_state_dict_moves_both_ways_with_schedulefree(device, tmp_path):
    """Saved in eval mode (as schedulefree asks), loaded across libraries through torch.save /
    torch.load(weights_only=True): both continue as the uninterrupted run."""
    params = odd_params(device)
    copies = [[torch.nn.Parameter(p.detach().clone()) for p in params] for _ in range(3)]
    make = [gpuopt.AdamWScheduleFree, schedulefree.AdamWScheduleFree, gpuopt.AdamWScheduleFree]
    opts = [cls(ps, lr=1e-2, warmup_steps=2, weight_decay=0.1) for cls, ps in zip(make, copies)]
    for o in opts:
        o.train()
    for _ in range(3):
        _step_both(list(zip(opts, copies)))
    for o in opts:
        o.eval()
    torch.save({"ours": opts[0].state_dict(), "theirs": opts[1].state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    swapped = [gpuopt.AdamWScheduleFree(copies[1], lr=1e-2), schedulefree.AdamWScheduleFree(copies[0], lr=1e-2)]
    swapped[0].load_state_dict(saved["theirs"])
    swapped[1].load_state_dict(saved["ours"])
    pairs = [(swapped[1], copies[0]), (swapped[0], copies[1]), (opts[2], copies[2])]
    for o, _ in pairs:
        o.train()
    for _ in range(4):
        _step_both(pairs)
    for o, _ in pairs:
        o.eval()
    for a, b, c in zip(*copies):
        assert_close(a, c, rtol=1e-5, atol=1e-6)
        assert_close(b, c, rtol=1e-5, atol=1e-6)


def test_launch_counts_and_the_functional_form(device):
    """One launch per group per step, one per group per mode switch; the functional form with the
    caller's schedule gives the class's step."""
    params = odd_params(device)
    twins = [p.detach().clone() for p in params]
    opt = gpuopt.AdamWScheduleFree(two_groups(params, lr=2e-2), lr=1e-2, weight_decay=0.1)
    with count_launches(walk, "_step_kernel") as counter:
        opt.train()  # nothing stepped yet: nothing to move
    assert counter["launches"] == 0
    for p in params:
        p.grad = torch.randn_like(p)
    with count_launches(walk, "_step_kernel") as counter:
        opt.step()
    assert counter["launches"] == 2
    zs, vs = [t.clone() for t in twins], [torch.zeros_like(t) for t in twins]
    for sl, lr in ((slice(0, 2), 1e-2), (slice(2, None), 2e-2)):
        gpuopt.functional.adamw_schedule_free(twins[sl], [p.grad for p in params[sl]], zs[sl], vs[sl], lr=lr,
                                              ckp1=1.0, step=1, weight_decay=0.1)
    for p, t, z in zip(params, twins, zs):
        assert_close(p, t, rtol=1e-6, atol=1e-7)
        assert_close(opt.state[p]["z"], z, rtol=1e-6, atol=1e-7)
    with count_launches(walk, "_step_kernel") as counter:
        opt.eval()
        opt.eval()  # already there: nothing
    assert counter["launches"] == 2


def test_refusals_change_nothing(device):
    params = odd_params(device)
    opt = gpuopt.AdamWScheduleFree(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="not in train mode"):
        opt.step()
    assert opt.param_groups[0]["k"] == 0 and not opt.state
    opt.train()
    opt.step()
    before = ({key: opt.param_groups[0][key] for key in GROUP_KEYS}, [p.detach().clone() for p in params])
    opt.state[params[1]]["z"] = torch.zeros(3, device=device)
    with pytest.raises(RuntimeError, match="z 1 has shape"):
        opt.step()
    assert {key: opt.param_groups[0][key] for key in GROUP_KEYS} == before[0]
    assert all(torch.equal(p, b) for p, b in zip(params, before[1]))
    with pytest.raises(RuntimeError, match="graphed_step: AdamWScheduleFree works out"):
        gpuopt.graphed_step(opt)()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        gpuopt.AdamWScheduleFree(params, lr=-1.0)


def test_compiled_step_runs_eagerly_with_the_same_results(device):
    params = odd_params(device)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref_opt = gpuopt.AdamWScheduleFree(params, lr=1e-2), gpuopt.AdamWScheduleFree(twins, lr=1e-2)
    opt.train()
    ref_opt.train()
    compiled = torch.compile(opt.step, backend="eager")
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g.clone(), g.clone()
        compiled()
        ref_opt.step()
    torch._dynamo.reset()
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=0, atol=0)


def test_training_reaches_schedulefrees_loss(device):
    """A small MLP, 60 steps each from the same weights and batches, evaluated in eval mode: the
    final loss within 1% of schedulefree's."""
    x, y, base = regression_task(device)
    losses = {}
    for name, cls in (("gpuopt", gpuopt.AdamWScheduleFree), ("schedulefree", schedulefree.AdamWScheduleFree)):
        model = copy.deepcopy(base)
        opt = cls(model.parameters(), lr=1e-2, warmup_steps=5, weight_decay=0.01)
        opt.train()
        for step in range(60):
            batch = slice((step * 64) % 256, (step * 64) % 256 + 64)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x[batch]), y[batch]).backward()
            opt.step()
        opt.eval()
        with torch.no_grad():
            losses[name] = torch.nn.functional.mse_loss(model(x), y).item()
    assert losses["gpuopt"] < 0.5 * torch.nn.functional.mse_loss(base(x), y).item()
    assert abs(losses["gpuopt"] - losses["schedulefree"]) <= 0.01 * losses["schedulefree"], losses
