"""gpuopt.LAMB and gpuopt.LARS against the float64 equations (``gpuopt.reference.lamb_step`` /
``lars_step``; neither is in torch, and apex's FusedLAMB needs CUDA): odd shapes, many steps, param
groups, every option, bf16 with master weights, state_dict round trips, AMP and fused clipping,
two launches per group, the functional form, the per-tensor fold of many blocks, and a training
run. FSDP2 (norms of the whole parameter, not of the shard): tests/distributed_worker.py."""

import copy

import numpy as np
import pytest
import torch

import gpuopt
from gpuopt import _launch
from gpuopt import reference as ref
from gpuopt._multi_tensor import LaunchPlan
from gpuopt.kernels import _multi_tensor as walk
from gpuopt.kernels import lamb as lamb_kernel

from .helpers import assert_close, count_launches, odd_params, regression_task, two_groups

STEPS = 10


class _Reference:
    """One float64 reference state per parameter, stepped with ``gpuopt.reference``."""

    def __init__(self, name, params, **options):
        if "betas" in options:
            options = dict(options)
            options["beta1"], options["beta2"] = options.pop("betas")
        self.name, self.options = name, options
        self.W = [p.detach().double().cpu().numpy().copy() for p in params]
        self.t = 0
        if name == "LAMB":
            self.states = [(np.zeros_like(W), np.zeros_like(W)) for W in self.W]
        else:
            self.states = [None for _ in self.W]

    def step(self, grads, options_of=lambda i: {}):
        self.t += 1
        for i, g in enumerate(grads):
            g = g.detach().double().cpu().numpy()
            options = {**self.options, **options_of(i)}
            if self.name == "LAMB":
                self.W[i], *state = ref.lamb_step(self.W[i], g, *self.states[i], self.t, **options)
                self.states[i] = tuple(state)
            else:
                self.W[i], self.states[i] = ref.lars_step(self.W[i], g, self.states[i], **options)


def _make(name, params, **options):
    return (gpuopt.LAMB if name == "LAMB" else gpuopt.LARS)(params, **options)


CASES = [("LAMB", dict(lr=1e-2)),
         ("LAMB", dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.1, max_trust_ratio=0.5)),
         ("LAMB", dict(lr=1e-2, weight_decay=0.01, bias_correction=False, maximize=True)),
         ("LARS", dict(lr=0.5)),
         ("LARS", dict(lr=0.3, momentum=0.5, weight_decay=1e-2, trust_coefficient=0.01, eps=1e-6, maximize=True)),
         ("LARS", dict(lr=0.1, momentum=0.0, weight_decay=0.1))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name, options", CASES)
def test_matches_the_float64_equations(device, dtype, name, options):
    """10 steps on odd shapes (one of them all zeros: its norm is 0 and its ratio 1), two param
    groups (the second with its own lr), fresh gradients each step: parameters and states follow
    the float64 equations, to float64 or float32 rounding."""
    params = odd_params(device, dtype)
    with torch.no_grad():
        params[1].zero_()
    opt = _make(name, two_groups(params, lr=options["lr"] / 2), **options)
    reference = _Reference(name, params, **options)
    for _ in range(STEPS):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        reference.step(grads, lambda i: dict(lr=options["lr"] / 2) if i >= 2 else {})
    tolerance = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for i, p in enumerate(params):
        assert_close(p, reference.W[i], **tolerance)
        state = opt.state[p]
        if name == "LAMB":
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
            assert_close(state["exp_avg"], reference.states[i][0], **tolerance)
            assert_close(state["exp_avg_sq"], reference.states[i][1], **tolerance)
            assert float(state["step"]) == STEPS
        elif options.get("momentum", 0.9) != 0:
            assert_close(state["momentum_buffer"], reference.states[i], **tolerance)


@pytest.mark.parametrize("name", ["LAMB", "LARS"])
def test_bf16_with_master_weights_follows_the_equations(device, name):
    params = odd_params(device, torch.bfloat16)
    options = dict(lr=1e-2, weight_decay=0.01)
    opt = _make(name, params, master_weights=True, state_dtype=torch.float32, **options)
    reference = _Reference(name, params, **options)
    for _ in range(STEPS):
        grads = [torch.randn_like(p, dtype=torch.float32).to(torch.bfloat16) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        reference.step(grads)
    for i, p in enumerate(params):
        master = opt.state[p]["master_param"]
        assert_close(master, reference.W[i], rtol=1e-4, atol=1e-5)
        assert torch.equal(p, master.to(torch.bfloat16))


def test_the_fold_of_a_tensor_with_more_blocks_than_a_block_holds(device):
    """A 16-element block and a tensor of 700 blocks (so its last block folds 700 partials in 44
    chunks), beside a one-block tensor and a 0-element one: LAMB's norms and update, launched on
    that plan, equal the equations, and every arrival counter is back at 0 for the next launch."""
    torch.manual_seed(3)
    shapes = [(16 * 700 - 5,), (9,), (0,)]
    params = [torch.randn(s, device=device) for s in shapes]
    grads = [torch.randn_like(p) for p in params]
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.zeros((), device=device) for _ in params]
    expected = [ref.lamb_step(p.cpu().numpy(), g.cpu().numpy(), np.zeros(p.shape), np.zeros(p.shape), 1, lr=0.1,
                              weight_decay=0.1)[0] for p, g in zip(params, grads)]
    squares = [float((p.double() ** 2).sum()) for p in params]
    plan = LaunchPlan([params, grads, steps, *states, params], block=16)
    assert plan.n_blocks == 700 + 1 + 1
    options = lamb_kernel.LAMB.hyperparameters(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1,
                                               bias_correction=True, max_trust_ratio=None, maximize=False)
    hyper = tuple(float(options[0][n]) for n in lamb_kernel.HYPER)
    flags = lamb_kernel.LambFlags(bias_correction=True, maximize=False, has_grad_scale=False, has_master=False,
                                  stochastic_rounding=False)
    for norms in (True, False):
        _launch.launch_update(lamb_kernel.LAMB, plan, hyper, flags, lr=0.1, has_step=True, norms=norms)
    sums = plan.sum_buffers(2)[0].view(-1, 2).cpu().double().numpy()
    assert_close(sums[:, 0], squares, rtol=1e-5, atol=0)
    for p, e in zip(params, expected):
        assert_close(p, e, rtol=2e-5, atol=2e-6)
    assert [float(s) for s in steps] == [1.0, 1.0, 1.0]
    assert not plan.counter.any()


@pytest.mark.parametrize("name", ["LAMB", "LARS"])
def test_two_launches_per_group_and_the_functional_form(device, name):
    params = odd_params(device)
    twins = [p.detach().clone() for p in params]
    options = dict(lr=1e-2, weight_decay=0.01)
    opt = _make(name, two_groups(params, lr=2e-2), **options)
    for p in params:
        p.grad = torch.randn_like(p)
    with count_launches(walk, "_step_kernel") as counter:
        opt.step()
    assert counter["launches"] == 4  # (norms, update) × 2 groups
    for first, last, lr in ((0, 2, 1e-2), (2, len(params), 2e-2)):
        ps, gs = twins[first:last], [p.grad for p in params[first:last]]
        steps = [torch.zeros((), device=device) for _ in ps]
        if name == "LAMB":
            gpuopt.functional.lamb(ps, gs, [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
                                   steps, lr=lr, weight_decay=0.01)
        else:
            gpuopt.functional.lars(ps, gs, [torch.zeros_like(p) for p in ps], steps, lr=lr, weight_decay=0.01)
        assert all(float(s) == 1.0 for s in steps)
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["LAMB", "LARS"])
def test_state_dict_round_trip_continues_the_run(device, name, tmp_path):
    """Saved mid-run (torch.save / torch.load(weights_only=True)) and loaded into a new optimizer
    over copies of the parameters: the run continues exactly as the uninterrupted one."""
    params = odd_params(device)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = _make(name, params, lr=1e-2, weight_decay=0.01)

    def steps(pairs, n):
        for _ in range(n):
            grads = [torch.randn_like(p) for p in params]
            for o, ps in pairs:
                for p, g in zip(ps, grads):
                    p.grad = g.clone()
                o.step()

    steps([(opt, params)], 3)
    with torch.no_grad():
        for c, p in zip(copies, params):
            c.copy_(p)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed = _make(name, copies, lr=1e-2, weight_decay=0.01)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    steps([(opt, params), (resumed, copies)], 4)
    for p, c in zip(params, copies):
        assert torch.equal(p, c)


@pytest.mark.parametrize("name", ["LAMB", "LARS"])
def test_amp_skip_unscale_and_fused_clipping(device, name):
    """An overflow step changes nothing (nor the norms' arrival counters); a scaled step equals the
    unscaled one; ``opt.clip_grad_norm_`` equals torch's clip followed by the step."""
    params = odd_params(device)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, plain = _make(name, params, lr=1e-2), _make(name, twins, lr=1e-2)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 1024
    opt.step(grad_scale=torch.tensor(1024.0, device=device), found_inf=torch.tensor(1.0, device=device))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
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
    expected = torch.nn.utils.clip_grad_norm_(twins, 1.0)
    assert_close(norm, expected, rtol=1e-6)
    opt.step()
    plain.step()
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=1e-5, atol=1e-7)


def test_bad_arguments_are_refused(device):
    p = [torch.nn.Parameter(torch.ones(3, device=device))]
    with pytest.raises(ValueError, match="Invalid learning rate"):
        gpuopt.LAMB(p, lr=-1.0)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        gpuopt.LAMB(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Invalid max_trust_ratio"):
        gpuopt.LAMB(p, max_trust_ratio=0.0)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        gpuopt.LARS(p, lr=-0.1)
    with pytest.raises(ValueError, match="Invalid momentum"):
        gpuopt.LARS(p, lr=0.1, momentum=-0.5)
    with pytest.raises(TypeError):
        gpuopt.LARS(p)  # lr has no default


@pytest.mark.parametrize("name, lr", [("LAMB", 3e-2), ("LARS", 0.5)])
def test_training_reaches_the_equations_loss(device, name, lr):
    """A small MLP on a fixed regression task, 60 steps: the final loss within 1% of the same run
    stepped by the float64 equations (``gpuopt.reference``), and well below the start."""
    x, y, base = regression_task(device)
    model, twin = copy.deepcopy(base), copy.deepcopy(base).double()
    opt = _make(name, model.parameters(), lr=lr, weight_decay=1e-3)
    reference = _Reference(name, list(twin.parameters()), lr=lr, weight_decay=1e-3)
    for step in range(60):
        batch = slice((step * 64) % 256, (step * 64) % 256 + 64)
        for m in (model, twin):
            m.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(m(x[batch].to(m[0].weight.dtype)), y[batch].to(m[0].weight.dtype)).backward()
        opt.step()
        reference.step([p.grad for p in twin.parameters()])
        with torch.no_grad():
            for p, W in zip(twin.parameters(), reference.W):
                p.copy_(torch.from_numpy(W))
    ours = torch.nn.functional.mse_loss(model(x), y).item()
    theirs = torch.nn.functional.mse_loss(twin(x.double()), y.double()).item()
    assert ours < 0.5 * torch.nn.functional.mse_loss(base(x), y).item()
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)


@pytest.mark.gpu
def test_the_fold_on_a_gpu_is_exact_and_repeats_bit_for_bit(device):
    """On a GPU the norms' blocks run concurrently: a fold that read a partial before its block had
    written it (a missing release/acquire) would give a wrong norm, now and then. Twenty steps of
    LAMB on many-block tensors, from identical copies: every step's parameters equal the float64
    equations to fp32 precision and the two copies agree bit for bit (the fold's order is fixed)."""
    torch.manual_seed(0)
    shapes = [(1 << 22,), (4097,), (3, 1000, 7), (0,), (2048 * 300 + 1,)]
    params = [torch.randn(s, device=device) for s in shapes]
    twins = [p.clone() for p in params]
    states = [[torch.zeros_like(p) for p in params] for _ in range(4)]
    steps = [[torch.zeros((), device=device) for _ in params] for _ in range(2)]
    for step in range(20):
        grads = [torch.randn_like(p) for p in params]
        expected = [ref.lamb_step(p.cpu().numpy(), g.cpu().numpy(), m.cpu().numpy(), v.cpu().numpy(), step + 1,
                                  lr=1e-2, weight_decay=0.1)[0]
                    for p, g, m, v in zip(params, grads, states[0], states[1])]
        gpuopt.functional.lamb(params, grads, states[0], states[1], steps[0], lr=1e-2, weight_decay=0.1)
        gpuopt.functional.lamb(twins, grads, states[2], states[3], steps[1], lr=1e-2, weight_decay=0.1)
        for p, t, e in zip(params, twins, expected):
            assert torch.equal(p, t)
            assert_close(p, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["LAMB", "LARS"])
def test_a_tensor_lr_on_the_device_equals_the_float(device, name):
    """``lr`` as a one-element tensor on the parameters' device (capturable steps, read by both
    launches on the device) and as a float: the same parameters after 3 steps."""
    params = odd_params(device)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = _make(name, params, lr=torch.tensor(0.02, device=device), weight_decay=0.01, capturable=True)
    plain = _make(name, twins, lr=0.02, weight_decay=0.01)
    for _ in range(3):
        for p, t in zip(params, twins):
            p.grad = torch.randn_like(p)
            t.grad = p.grad.clone()
        opt.step()
        plain.step()
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=1e-6, atol=1e-7)
