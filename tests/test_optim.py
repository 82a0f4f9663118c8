"""Fused optimizers against the float64 reference (the seed's equations) and against torch.optim."""

import copy
import math

import numpy as np
import pytest
import torch

import gpuopt
from gpuopt import reference as ref
from gpuopt.kernels import _multi_tensor as walk

from .conftest import HAS_GPU
from .helpers import TOLERANCES, assert_close, count_launches
from .test_reference import OPT_CASES, reference_run

# 1 element, a prime, fewer elements than a block, several blocks, a channels-last conv weight.
SHAPES = [(1,), (131,), (7, 3), (300,), (4, 3, 5, 7)]
if HAS_GPU:
    SHAPES = SHAPES + [(4099, 1021), (3, 64, 7, 7)]
STEPS = 20


def make_params(device, dtype=torch.float32, shapes=SHAPES):
    params = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]
    params[4].data = params[4].data.to(memory_format=torch.channels_last)
    return params


def grads_like(params, steps=STEPS):
    return [[torch.randn_like(p, dtype=torch.float32).to(p.dtype) for p in params] for _ in range(steps)]


# Every option of every optimizer, as (name, kwargs): the cases the reference is held to torch with.
CASES = OPT_CASES
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CASES)]


def run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_against_reference_float64(device, name, kwargs):
    """20 steps of every option against the float64 reference."""
    params = make_params(device)
    start = [p.detach().double().cpu().numpy() for p in params]
    grads = grads_like(params)
    run(getattr(gpuopt, name)(params, **kwargs), params, grads)
    for i, p in enumerate(params):
        gs = [g[i].double().cpu().numpy() for g in grads]
        expected = reference_run(name, kwargs, start[i], gs)
        assert_close(p, expected, rtol=1e-4, atol=1e-5, name=f"{name} param {i} {tuple(p.shape)}")


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_against_torch_optim(device, name, kwargs):
    ours = make_params(device)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    grads = grads_like(ours)
    run(getattr(gpuopt, name)(ours, **kwargs), ours, grads)
    run(getattr(torch.optim, name)(theirs, **kwargs), theirs, grads)
    for a, b in zip(ours, theirs):
        assert_close(a, b, rtol=1e-4, atol=1e-5, name=name)
        assert a.stride() == b.stride()


# RMSprop without weight decay here: over 12k random elements, g + λW now and then cancels to a few
# ulps, and centered RMSprop divides by its magnitude, so any two fp32 orders of operations differ
# there by ~1e-4 (the float64 reference tests cover its weight decay at small sizes).
@pytest.mark.parametrize("name,kwargs", [CASES[3], CASES[5], ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5)),
                                         CASES[13], CASES[15], CASES[-1]],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_gpu_block_size_and_grid_match_torch(device, monkeypatch, name, kwargs):
    """The 2048-element blocks and the SMs × 8 programs a GPU launch uses (here on the CPU through
    the interpreter with GPUOPT_GPU_CONFIG=1), on tensors of several full blocks plus a tail."""
    monkeypatch.setenv("GPUOPT_GPU_CONFIG", "1")
    shapes = [(5000,), (2048,), (64, 3, 3, 3), (7,), (3, 4099)]
    ours = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    grads = grads_like(ours, steps=3)
    opt = getattr(gpuopt, name)(ours, **kwargs)
    run(opt, ours, grads)
    plan = next(iter(opt._plans._plans.values()))
    assert plan.block == 2048 and plan.grid[0] == plan.n_blocks == 3 + 1 + 1 + 1 + 7
    run(getattr(torch.optim, name)(theirs, **kwargs), theirs, grads)
    for a, b in zip(ours, theirs):
        assert_close(a, b, rtol=1e-4, atol=1e-5, name=name)


COMPILED_CASES = [("AdamW", dict(lr=0.1)), ("Adam", dict(lr=0.1, amsgrad=True, weight_decay=0.1)),
                  ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)), ("SGD", dict(lr=0.1)),
                  ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5)), ("Adagrad", dict(lr=0.1, lr_decay=0.01)),
                  ("Adadelta", dict(lr=0.5)), ("Lion", dict(lr=0.01, weight_decay=0.1)),
                  ("LAMB", dict(lr=0.01, weight_decay=0.1)), ("LARS", dict(lr=0.1, weight_decay=0.01))]


@pytest.mark.parametrize("name,kwargs", COMPILED_CASES)
def test_step_traced_by_torch_compile_without_graph_break(device, name, kwargs):
    """Inside torch.compile, opt.step() (after the eager first step has made the states) is one
    gpuopt::<Optimizer>_step operator per param group (its role lists by name): one graph, no break, and the same
    parameters and states as the eager step over three steps, with two param groups and a
    parameter without a gradient."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(device)
        groups = [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.05},
                  {"params": model[2].parameters()}]
        return model, getattr(gpuopt, name)(groups, **kwargs)

    def backward(model, x):
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        model[2].bias.grad = None  # a parameter without a gradient is left alone

    (model, opt), (twin, twin_opt) = make(), make()
    x = torch.randn(8, 5, device=device)
    for m, o in ((model, opt), (twin, twin_opt)):
        backward(m, x)
        o.step()  # eager: makes the states
        backward(m, x)
    explained = torch._dynamo.explain(opt.step)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    twin_opt.step()  # explain ran one step
    compiled = torch.compile(opt.step, backend="aot_eager")
    for _ in range(3):
        x = torch.randn(8, 5, device=device)
        backward(model, x)
        backward(twin, x)
        compiled()
        twin_opt.step()
    torch._dynamo.reset()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a, b, rtol=1e-6, atol=1e-7, name="param")
    for a, b in zip(model.parameters(), twin.parameters()):
        for key, value in opt.state[a].items():
            assert_close(value, twin_opt.state[b][key], rtol=1e-6, atol=1e-7, name=key)


def test_ema_update_inside_torch_compile_runs_eagerly(device):
    """EMA.update() stays a graph break (its γ_t depends on a Python counter): same result."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(5, 3).to(device) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    emas = [gpuopt.EMA(m.parameters(), decay=None) for m in models]

    def update(model, ema, x):
        with torch.no_grad():
            model.weight.add_(x.mean())
        ema.update()

    compiled = torch.compile(update, backend="eager")
    for _ in range(3):
        x = torch.randn(8, 5, device=device)
        compiled(models[0], emas[0], x)
        update(models[1], emas[1], x)
    torch._dynamo.reset()
    for a, b in zip(emas[0].averages, emas[1].averages):
        assert_close(a, b, rtol=1e-6, atol=1e-7, name="average")


@pytest.mark.parametrize("eps_inside_sqrt", [True, False])
def test_seed_equations_adam_and_rmsprop(device, eps_inside_sqrt):
    """eps_inside_sqrt=True gives the seed's exact Adam and "adadelta"; big ε makes the two
    placements differ far beyond rounding, so the right one must have run."""
    eps = 1e-2
    params = make_params(device)
    start = [p.detach().double().cpu().numpy() for p in params]
    grads = grads_like(params, 12)
    run(gpuopt.Adam(params, lr=0.01, eps=eps, eps_inside_sqrt=eps_inside_sqrt), params, grads)
    params2 = [torch.nn.Parameter(torch.tensor(s, dtype=torch.float32, device=device)) for s in start]
    run(gpuopt.RMSprop(params2, lr=0.01, alpha=0.9, eps=eps, eps_inside_sqrt=eps_inside_sqrt), params2, grads)
    for i in range(len(params)):
        W, m, v = start[i], 0.0, 0.0
        W2, G = start[i], 0.0
        for t, g in enumerate(grads, start=1):
            gi = g[i].double().cpu().numpy()
            if eps_inside_sqrt:
                W, m, v = ref.seed_adam_step(W, m, v, gi, t, 0.01, eps=eps)
                W2, G = ref.seed_adadelta_step(W2, G, gi, 0.01, 0.9, eps)
        if not eps_inside_sqrt:
            W = reference_run("Adam", dict(lr=0.01, eps=eps), start[i], [g[i].double().cpu().numpy() for g in grads])
            W2 = reference_run("RMSprop", dict(lr=0.01, alpha=0.9, eps=eps), start[i],
                               [g[i].double().cpu().numpy() for g in grads])
        assert_close(params[i], W, rtol=1e-4, atol=1e-5, name="Adam")
        assert_close(params2[i], W2, rtol=1e-4, atol=1e-5, name="RMSprop")


def test_param_groups_scheduler_and_closure(device):
    params = make_params(device)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.003, "weight_decay": 0.1}]  # noqa: E731
    ours_opt = gpuopt.AdamW(groups(params), lr=0.01)
    torch_opt = torch.optim.AdamW(groups(theirs), lr=0.01)
    sched_a = torch.optim.lr_scheduler.StepLR(ours_opt, step_size=3, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=3, gamma=0.5)
    for step_grads in grads_like(params, 10):
        def closure_for(ps):
            def closure():
                for p, g in zip(ps, step_grads):
                    p.grad = g.clone()
                return torch.tensor(1.5)
            return closure
        assert ours_opt.step(closure_for(params)).item() == 1.5
        torch_opt.step(closure_for(theirs))
        sched_a.step()
        sched_b.step()
    assert ours_opt.param_groups[1]["lr"] == torch_opt.param_groups[1]["lr"] != 0.003
    for a, b in zip(params, theirs):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,kwargs", [CASES[2], CASES[5], CASES[10], CASES[13], CASES[15]],
                         ids=["SGD", "Adam", "RMSprop", "Adagrad", "Adadelta"])
def test_state_dict_round_trips_both_ways_mid_run(device, name, kwargs):
    """torch → gpuopt → torch mid-run, then both continue identically; keys are PyTorch's."""
    ours = make_params(device)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    grads = grads_like(ours, 9)
    torch_opt = getattr(torch.optim, name)(theirs, **kwargs)
    run(torch_opt, theirs, grads[:3])
    for a, b in zip(ours, theirs):
        a.data.copy_(b.data)
    our_opt = getattr(gpuopt, name)(ours, **kwargs)
    our_opt.load_state_dict(torch_opt.state_dict())  # torch → gpuopt
    run(our_opt, ours, grads[3:6])
    run(torch_opt, theirs, grads[3:6])
    for a, b in zip(ours, theirs):
        assert_close(a, b, rtol=1e-4, atol=1e-5, name="after torch → gpuopt")
    # PyTorch's keys; gpuopt's SGD adds `step` (which tells a new momentum buffer from a kept one)
    extra = {"step"} if name == "SGD" else set()
    assert set(our_opt.state_dict()["state"][0]) == set(torch_opt.state_dict()["state"][0]) | extra
    fresh_torch = getattr(torch.optim, name)(theirs, **kwargs)
    fresh_torch.load_state_dict(copy.deepcopy(our_opt.state_dict()))  # gpuopt → torch (torch may alias)
    for a, b in zip(ours, theirs):
        b.data.copy_(a.data)
    run(our_opt, ours, grads[6:])
    run(fresh_torch, theirs, grads[6:])
    for a, b in zip(ours, theirs):
        assert_close(a, b, rtol=1e-4, atol=1e-5, name="after gpuopt → torch")


def test_launch_count_is_one_per_group(device):
    """One launch per (param group, dtype) per step, however many tensors."""
    params = make_params(device) + make_params(device, torch.bfloat16)
    opt = gpuopt.Adam([{"params": params[:3]}, {"params": params[3:], "lr": 1e-4}])
    for p in params:
        p.grad = torch.randn_like(p)
    with count_launches(walk, "_step_kernel") as counter:
        opt.step()
        opt.step()
    # group 0: 3 fp32 tensors; group 1: 2 fp32 + 5 bf16 → 3 launches per step
    assert counter["launches"] == 6
    sgd = gpuopt.SGD(params[:5], lr=0.1, momentum=0.9)
    with count_launches(walk, "_step_kernel") as counter:
        for _ in range(3):
            sgd.step()
    assert counter["launches"] == 3


def test_plan_tables_rebuilt_only_when_storage_moves(device):
    params = make_params(device)
    opt = gpuopt.Adam(params, lr=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    (plan,) = opt._plans._plans.values()
    table = plan.offsets
    before = table.clone()
    opt.step()
    assert plan.offsets is table and torch.equal(table, before)  # same grads: table untouched
    for p in params:
        p.grad = torch.randn_like(p)  # zero_grad(set_to_none=True) + backward: new storage
    opt.step()
    # only the gradient row is rewritten, in place
    assert plan.offsets is table and torch.equal(table[0], before[0]) and torch.equal(table[2:], before[2:])
    assert plan.bases[1] is None  # released after the launch: the plan keeps no gradient alive
    base = params[0].grad.data_ptr()
    assert table[1].tolist() == [(p.grad.data_ptr() - base) // 4 for p in params]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("master_weights", [False, True])
def test_low_precision_params(device, dtype, master_weights):
    """bf16/fp16 params, math in fp32; with master weights the fp32 copy follows the fp32
    reference tightly and the param is its rounding."""
    params = make_params(device, dtype)
    start = [p.detach().double().cpu().numpy() for p in params]
    grads = grads_like(params, 10)
    opt = gpuopt.AdamW(params, lr=0.01, master_weights=master_weights, state_dtype=torch.float32)
    run(opt, params, grads)
    for i, p in enumerate(params):
        expected = reference_run("AdamW", dict(lr=0.01), start[i], [g[i].double().cpu().numpy() for g in grads])
        if master_weights:
            master = opt.state[p]["master_param"]
            assert master.dtype == torch.float32
            assert_close(master, expected, rtol=1e-4, atol=1e-5, name="master")
            assert torch.equal(p, master.to(dtype))
        else:
            rtol, atol = TOLERANCES[dtype]
            assert_close(p, expected, rtol=4 * rtol, atol=4 * atol, name=str(dtype))
        assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_states_default_to_param_dtype(device):
    params = make_params(device, torch.bfloat16)
    opt = gpuopt.Adam(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 for p in params)


def test_stochastic_rounding_is_unbiased(device):
    """A bf16 weight updated by a step far below its rounding step: round-to-nearest never moves
    it, stochastic rounding moves it in proportion, so the mean over many trials is right."""
    trials = 4096
    w0 = 1.0  # bf16 spacing at 1.0 is 2^-7
    p = torch.nn.Parameter(torch.full((trials,), w0, device=device, dtype=torch.bfloat16))
    opt = gpuopt.SGD([p], lr=1.0, stochastic_rounding=True)
    p.grad = torch.full_like(p, 2.0**-9)  # a quarter of the spacing
    opt.step()
    mean = p.double().mean().item()
    expected = w0 - 2.0**-9
    assert abs(mean - expected) < 4 * (2.0**-7) * 0.5 / math.sqrt(trials), f"mean {mean} vs {expected}"
    assert set(p.double().unique().tolist()) == {1.0 - 2.0**-8, 1.0}  # only the two neighbours
    q = torch.nn.Parameter(torch.full((trials,), w0, device=device, dtype=torch.bfloat16))
    rne = gpuopt.SGD([q], lr=1.0)
    q.grad = p.grad.clone()
    rne.step()
    assert (q == w0).all()


def test_grad_scale_and_found_inf(device):
    """AMP: grads divided by grad_scale in the kernel; found_inf skips the whole step, step counter
    included, without any host synchronisation."""
    params = make_params(device)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref_opt = gpuopt.Adam(params, lr=0.01), gpuopt.Adam(twins, lr=0.01)
    scale = torch.tensor(1024.0, device=device)
    for step in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, t, g in zip(params, twins, grads):
            p.grad = g * 1024.0
            t.grad = g.clone()
        found = torch.tensor(1.0 if step == 2 else 0.0, device=device)
        before = [p.detach().clone() for p in params]
        opt.step(grad_scale=scale, found_inf=found)
        if step == 2:
            assert all(torch.equal(b, p) for b, p in zip(before, params))
        else:
            ref_opt.step()
    assert opt.state[params[0]]["step"].item() == 3
    for a, b in zip(params, twins):
        assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tensor_lr_and_capturable(device):
    params = make_params(device)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lr = torch.tensor(0.01, device=device)
    opt = gpuopt.Adam(params, lr=lr, capturable=True)
    ref_opt = gpuopt.Adam(twins, lr=0.01)
    for step_grads in grads_like(params, 4):
        for p, t, g in zip(params, twins, step_grads):
            p.grad, t.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert opt.state[params[0]]["step"].device == params[0].device
    for a, b in zip(params, twins):
        assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_zero_element_params_and_params_without_grad(device):
    params = [torch.nn.Parameter(torch.empty(0, device=device)), torch.nn.Parameter(torch.randn(5, device=device)),
              torch.nn.Parameter(torch.randn(3, device=device))]
    params[0].grad = torch.empty(0, device=device)
    params[1].grad = torch.randn(5, device=device)
    untouched = params[2].detach().clone()
    opt = gpuopt.Adam(params, lr=0.1)
    opt.step()
    assert torch.equal(params[2], untouched) and len(opt.state[params[2]]) == 0
    assert opt.state[params[0]]["step"].item() == 1 and opt.state[params[1]]["step"].item() == 1


def test_grad_in_another_layout_is_handled(device):
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last))
    q = torch.nn.Parameter(p.detach().clone().contiguous())
    g = torch.randn(2, 3, 4, 5, device=device)  # contiguous grad for a channels-last param
    p.grad, q.grad = g.clone(), g.clone()
    gpuopt.SGD([p], lr=0.1).step()
    gpuopt.SGD([q], lr=0.1).step()
    assert torch.equal(p.contiguous(), q)


def test_bad_input_gets_clear_errors(device, monkeypatch):
    p = torch.nn.Parameter(torch.randn(3, device=device))
    for kwargs, message in [(dict(lr=-1.0), "Invalid learning rate"), (dict(eps=-1.0), "Invalid epsilon value"),
                            (dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0"),
                            (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
                            (dict(weight_decay=-1.0), "Invalid weight_decay value")]:
        with pytest.raises(ValueError, match=message):
            gpuopt.Adam([p], **kwargs)
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
        gpuopt.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="Invalid momentum value"):
        gpuopt.SGD([p], lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError, match="Invalid alpha value"):
        gpuopt.RMSprop([p], alpha=-0.5)
    with pytest.raises(ValueError, match="Invalid rho value"):
        gpuopt.Adadelta([p], rho=1.5)
    with pytest.raises(ValueError, match="Invalid lr_decay value"):
        gpuopt.Adagrad([p], lr_decay=-1)
    with pytest.raises(NotImplementedError, match="differentiable"):
        gpuopt.Adam([p], differentiable=True)
    sparse = torch.nn.Parameter(torch.randn(4, device=device))
    sparse.grad = torch.randn(4, device=device).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        gpuopt.Adam([sparse]).step()
    complex_p = torch.randn(4, dtype=torch.complex64, device=device)
    with pytest.raises(RuntimeError, match="complex parameter needs a complex gradient"):
        gpuopt.functional.sgd([complex_p], [torch.randn(4, device=device)], None, lr=0.1)
    integer = torch.zeros(4, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="floating-point"):
        gpuopt.functional.sgd([integer], [integer], None, lr=0.1)
    cpu = torch.nn.Parameter(torch.randn(3))
    cpu.grad = torch.randn(3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Move the model to a CUDA GPU"):
        gpuopt.Adam([cpu]).step()


def test_functional_api_matches_class(device):
    params = [torch.randn(s, device=device) for s in SHAPES[:4]]
    twins = [torch.nn.Parameter(p.clone()) for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=device) for _ in params]
    opt = gpuopt.AdamW(twins, lr=0.01)
    for step_grads in grads_like(params, 5):
        gpuopt.functional.adamw(params, step_grads, exp_avgs, exp_avg_sqs, None, steps, lr=0.01)
        for t, g in zip(twins, step_grads):
            t.grad = g.clone()
        opt.step()
    assert steps[0].item() == 5
    for a, b in zip(params, twins):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- GPU only -------------------

@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(device):
    params = make_params(device) + [torch.nn.Parameter(torch.randn(1 << 20, device=device))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    lr = torch.tensor(0.01, device=device)
    opt = gpuopt.Adam(params, lr=lr, capturable=True)
    ref_opt = gpuopt.Adam(twins, lr=0.01)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for g in grads:
            g.normal_()
        opt.step()  # warm-up: state, plans, compilation
    torch.cuda.current_stream().wait_stream(stream)
    for p, t, g in zip(params, twins, grads):
        t.data.copy_(p.data)
    ref_opt.load_state_dict(opt.state_dict())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(5):
        for p, t, g in zip(params, twins, grads):
            g.normal_()
            t.grad = g.clone()
        graph.replay()
        ref_opt.step()
    torch.cuda.synchronize()
    assert opt.state[params[0]]["step"].item() == ref_opt.state[twins[0]]["step"].item() == 6
    for a, b in zip(params, twins):
        assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_grad_scaler_skips_exactly_the_inf_step(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(device)
    twin = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(device)
    twin.load_state_dict(model.state_dict())
    opt = gpuopt.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, fused=True)
    scaler, ref_scaler = torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda")
    for step in range(6):
        x, y = torch.randn(32, 64, device=device), torch.randn(32, 8, device=device)
        for m, o, s in ((model, opt, scaler), (twin, ref_opt, ref_scaler)):
            o.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(m(x), y)
            s.scale(loss).backward()
            if step == 3:
                next(m.parameters()).grad[0, 0] = float("inf")
            s.step(o)
            s.update()
    assert opt.state[next(model.parameters())]["step"].item() == 5
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_more_than_2_31_elements(device):
    n = 2**31 + 1000
    p = torch.nn.Parameter(torch.zeros(n, device=device, dtype=torch.bfloat16))
    p.grad = torch.ones(n, device=device, dtype=torch.bfloat16)
    gpuopt.SGD([p], lr=0.5).step()
    assert p[-1000:].float().eq(-0.5).all() and p[:1000].float().eq(-0.5).all()
    assert p[2**31 - 5: 2**31 + 5].float().eq(-0.5).all()


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_tensor_betas_match_torch(device, name):
    """optim_db's "Tensor lr, Tensor betas, with capturable": the launch crashed inside Triton."""
    ours = make_params(device)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kwargs = dict(lr=torch.tensor(0.01), betas=(torch.tensor(0.8), torch.tensor(0.95)))
    grads = grads_like(ours, 5)
    run(getattr(gpuopt, name)(ours, **kwargs), ours, grads)
    run(getattr(torch.optim, name)(theirs, **kwargs), theirs, grads)
    for a, b in zip(ours, theirs):
        assert_close(a, b, rtol=1e-4, atol=1e-5, name=name)


@pytest.mark.parametrize("step_value", [3, 3.0])
def test_state_dict_with_a_python_number_step_loads(device, step_value):
    """Older torch checkpoints hold `step` as a Python number: load, then step, as torch does."""
    ours = make_params(device)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    torch_opt = torch.optim.Adam(theirs, lr=0.01)
    run(torch_opt, theirs, grads_like(theirs, 3))
    checkpoint = copy.deepcopy(torch_opt.state_dict())
    for state in checkpoint["state"].values():
        state["step"] = step_value
    for a, b in zip(ours, theirs):
        a.data.copy_(b.data)
    our_opt = gpuopt.Adam(ours, lr=0.01)
    our_opt.load_state_dict(checkpoint)
    assert our_opt.state[ours[0]]["step"].dtype == torch.float32 and our_opt.state[ours[0]]["step"].item() == 3
    grads = grads_like(ours, 2)
    run(our_opt, ours, grads)
    run(torch_opt, theirs, grads)
    for a, b in zip(ours, theirs):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_add_param_group_takes_a_generator(device):
    """model.parameters() is a generator: the duplicate check must not use it up before torch does."""
    model = torch.nn.Linear(3, 2).to(device)
    opt = gpuopt.SGD([torch.nn.Parameter(torch.zeros(1, device=device))], lr=0.1)
    opt.add_param_group({"params": model.parameters(), "lr": 0.01})
    assert opt.param_groups[1]["params"] == list(model.parameters()) and opt.param_groups[1]["lr"] == 0.01
    with pytest.raises(TypeError):
        opt.add_param_group({"params": {torch.nn.Parameter(torch.zeros(1, device=device))}})  # torch's error
