"""The host path of a step: what the fast path skips must never change a result. Step hooks and
the profiler range behave as torch's, options changed between steps take effect as in torch,
and launches through cached launchers are keyed by everything Triton specialises on."""

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import gpuopt
from gpuopt import _launch
from gpuopt.kernels import _multi_tensor as walk

from .conftest import HAS_GPU
from .helpers import assert_close, count_launches


def _pair(device, name, shapes=((5,), (3, 4)), **kwargs):
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    return params, twins, getattr(gpuopt, name)(params, **kwargs), getattr(torch.optim, name)(twins, **kwargs)


def _step_both(params, twins, opt, ref):
    for p, t in zip(params, twins):
        g = torch.randn_like(p)
        p.grad, t.grad = g, g.clone()
    opt.step()
    ref.step()
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=1e-5, atol=1e-6)


def test_step_hooks_run_as_in_torch(device):
    """Per-optimizer and global pre/post hooks run around gpuopt's step, in torch's order, and a
    pre-hook may replace the arguments (here: a closure); removing them restores the plain path."""
    params, twins, opt, ref = _pair(device, "SGD", lr=0.1, momentum=0.9)
    calls = []
    handles = [opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o))),
               opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o))),
               register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", o))),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", o)))]
    try:
        _step_both(params, twins, opt, ref)
        mine = [what for what, o in calls if o is opt]
        assert mine == ["global pre", "pre", "post", "global post"]
        closure_ran = []
        handles.append(opt.register_step_pre_hook(
            lambda o, a, k: ((a[0], lambda: closure_ran.append(1) or torch.tensor(2.0)), k)))
        assert opt.step().item() == 2.0 and closure_ran == [1]  # the hook's closure ran, its loss returned
        ref.step()
    finally:
        for handle in handles:
            handle.remove()
    calls.clear()
    _step_both(params, twins, opt, ref)
    assert calls == []


def test_profiler_sees_the_step_range(device):
    """Under the profiler a step records torch's ``Optimizer.step#<class>.step`` range."""
    params, twins, opt, ref = _pair(device, "Adam", lr=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert "Optimizer.step#Adam.step" in {event.name for event in prof.events()}


OPTION_CHANGES = [
    ("SGD", dict(lr=0.1, momentum=0.9), [("momentum", 0.5), ("dampening", 0.3), ("weight_decay", 0.1),
                                         ("maximize", True), ("momentum", 0.0), ("lr", 0.05)]),
    ("Adam", dict(lr=0.01), [("betas", (0.8, 0.99)), ("eps", 1e-3), ("weight_decay", 0.1), ("lr", 0.02),
                             ("maximize", True)]),
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True), [("alpha", 0.9), ("eps", 1e-3), ("momentum", 0.2)]),
    ("Adagrad", dict(lr=0.1), [("lr_decay", 0.01), ("eps", 1e-3)]),
    ("Adadelta", dict(lr=1.0), [("rho", 0.5), ("weight_decay", 0.1)]),
]


@pytest.mark.parametrize("name,kwargs,changes", OPTION_CHANGES, ids=[c[0] for c in OPTION_CHANGES])
def test_options_changed_between_steps_take_effect_as_in_torch(device, name, kwargs, changes):
    """Every option a user (or a scheduler) changes between steps: the next step uses it. (Options
    that need a new state, such as amsgrad switched on, are refused by torch; gpuopt makes the
    state: see the next test.)"""
    params, twins, opt, ref = _pair(device, name, **kwargs)
    _step_both(params, twins, opt, ref)
    for key, value in changes:
        opt.param_groups[0][key] = value
        ref.param_groups[0][key] = value
        _step_both(params, twins, opt, ref)
        _step_both(params, twins, opt, ref)


def test_option_that_needs_a_new_state_makes_it(device):
    """amsgrad switched on after some steps: the group is validated again and the missing state
    made; from then on the step is AMSGrad's, max_exp_avg_sq = max(max_exp_avg_sq, v) from 0."""
    p = torch.nn.Parameter(torch.randn(37, device=device))
    opt = gpuopt.Adam([p], lr=0.01)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    opt.param_groups[0]["amsgrad"] = True
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[p]
    assert state["max_exp_avg_sq"].shape == p.shape
    assert torch.equal(state["max_exp_avg_sq"], state["exp_avg_sq"])  # max(0, v) = v


def test_tensor_betas_changed_in_place_take_effect(device):
    """A CPU tensor option changed in place (no new object in the group) is still read afresh."""
    betas = (torch.tensor(0.9), torch.tensor(0.999))
    params, twins, opt, ref = _pair(device, "Adam", lr=0.01, betas=betas)
    ref.param_groups[0]["betas"] = (torch.tensor(0.9), torch.tensor(0.999))
    _step_both(params, twins, opt, ref)
    for beta in (opt.param_groups[0]["betas"][0], ref.param_groups[0]["betas"][0]):
        beta.fill_(0.5)
    _step_both(params, twins, opt, ref)


def test_step_options_are_made_once_while_the_options_are_unchanged(device, monkeypatch):
    """A group's launch arguments (``step_options``) are reused while its options are the same
    objects; ``lr`` (which schedulers change every step) is read at each launch and never
    remakes them."""
    from gpuopt import _fused

    params, twins, opt, ref = _pair(device, "SGD", lr=0.1, momentum=0.9)
    made = []
    original = _fused.step_options
    monkeypatch.setattr(_fused, "step_options", lambda *a: (made.append(1), original(*a))[1])
    scheduler, twin_scheduler = (torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref))
    for _ in range(3):
        _step_both(params, twins, opt, ref)
        scheduler.step()
        twin_scheduler.step()
    assert len(made) == 1
    opt.param_groups[0]["momentum"] = ref.param_groups[0]["momentum"] = 0.8
    with count_launches(walk, "_step_kernel") as counter:
        _step_both(params, twins, opt, ref)
    assert len(made) == 2 and counter["launches"] == 1


# ------------------------------------------------------------------- cached launchers ---


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: ``compiled[grid](*all_arguments)``."""

    function = object()

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("cached", grid, args))


class _FakeKernel:
    """Stands in for a JITFunction with runtime arguments (a, b, n, x) and constexprs (FLAG, BLOCK)."""

    arg_names = ["a", "b", "n", "x", "FLAG", "BLOCK"]

    def __init__(self):
        self.log = []

    def run(self, *args, grid, warmup, **kwargs):
        self.log.append(("triton", grid, args, kwargs))
        return _FakeCompiled(self.log)


def test_cached_launcher_is_keyed_by_everything_triton_specialises_on(monkeypatch):
    """A launch whose key was seen calls the cached launcher with every argument in signature
    order (constexprs included, as JITFunction.run does); a new constexpr, int value, tensor dtype
    or 16-byte alignment goes through Triton again; a new float value does not."""
    monkeypatch.setattr(_launch, "_compiled_launches", True)
    monkeypatch.setattr(_launch, "_current_device", lambda: 0)
    kernel = _FakeKernel()
    storage = torch.zeros(64)
    a, b = storage[:8], storage[16:24]

    def go(a=a, b=b, n=8, x=0.5, flag=True):
        kernel.log.clear()
        _launch.launch(kernel, (3,), (a, b, n, x), dict(BLOCK=128, FLAG=flag), 4)
        return kernel.log[0][0]

    assert go() == "triton"
    assert go() == "cached"
    assert kernel.log[0] == ("cached", (3, 1, 1), (a, b, 8, 0.5, True, 128))  # 3-D: CompiledKernel reads grid[0..2]
    assert go(x=0.25) == "cached"  # floats are not specialised
    assert go(flag=False) == "triton"  # a constexpr
    assert go(n=16) == "triton"  # an int: divisibility by 16
    assert go(n=1) == "triton"  # an int: equal to 1
    assert go(b=storage[17:25]) == "triton"  # 4 bytes off a 16-byte boundary
    assert go(b=storage[32:40]) == "cached"  # another aligned address: the same specialisation
    assert go(b=storage[16:24].double()) == "triton"  # a dtype
    assert go(a=None) == "triton"  # None is a constexpr to Triton
    assert go(a=torch.nn.Parameter(a)) == "cached"  # a Parameter is a tensor like any other to Triton
    assert go(n=True) == "triton"  # a bool is not the int 1
    assert go(n=1 << 70) == "triton"
    assert go(n=1 << 70) == "cached"
    assert go(n=(1 << 70) + 16) == "triton"
    assert go() == "cached"


class _KeyCheckingKernel:
    """Stands in for a batch-norm JITFunction: its "compiled kernel" remembers the launch key it
    was compiled for, and every call of its launcher logs whether the arguments it gets still
    have that key (what a cached launch relies on)."""

    def __init__(self, kernel, log):
        self.arg_names, self.log = kernel.arg_names, log

    def __getitem__(self, grid):
        raise AssertionError("compiled launches only")

    def run(self, *args, grid, warmup, **kwargs):
        key, n, log = _launch._argument_key(args), len(args), self.log
        log["compiled"] += 1

        class Compiled:
            function = object()

            def __getitem__(self, grid):
                return lambda *arguments: log["calls"].append(_launch._argument_key(arguments[:n]) == key)

        return Compiled()


def test_batch_norm_cached_launchers_keep_their_keys(monkeypatch):
    """A batch-norm layer's passes (``_launch.Launch``) call their cached launchers directly after
    the first launch: every such call has the launch key it was compiled for — through plan
    hits, a new plan for a misaligned input, eval mode, a misaligned upstream gradient (keyed
    again), a weight that stops requiring grad, and a second backward of one graph — and a plan
    hit makes no keyed launch at all."""
    from gpuopt.kernels import batch_norm as bn_kernels

    log = {"compiled": 0, "calls": []}
    monkeypatch.setattr(_launch, "_compiled_launches", True)
    monkeypatch.setattr(_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(_launch, "_launchers", {})
    for name in [n for n in vars(bn_kernels) if n.startswith("_") and n.endswith("_kernel")]:
        monkeypatch.setattr(bn_kernels, name, _KeyCheckingKernel(getattr(bn_kernels, name), log))
    keyed = []
    original = _launch.launch
    monkeypatch.setattr(_launch, "launch", lambda *a, **k: (keyed.append(a[0]), original(*a, **k))[1])
    bn = gpuopt.nn.BatchNorm2d(5)
    storage = torch.randn(4 * 5 * 3 * 3 + 4)

    def step(offset=0, upstream_offset=0, retain=False):
        x = storage[offset:offset + 180].view(4, 5, 3, 3).detach().requires_grad_()
        y = bn(x)
        upstream = torch.randn(200)[upstream_offset:upstream_offset + 180].view_as(y)
        y.backward(upstream, retain_graph=retain)
        if retain:
            y.backward(upstream)

    step()
    step()
    keyed.clear()
    calls = len(log["calls"])
    step()
    assert keyed == [] and len(log["calls"]) == calls + 6  # a plan hit: six cached calls, no keyed launch
    step(upstream_offset=1)  # the gradient 4 bytes off: the backward keyed
    step()
    step(offset=1)  # 4 bytes off 16: a new plan (the record holds the input's alignment)
    step(offset=1)
    bn.weight.requires_grad_(False)
    step()
    step(retain=True)
    bn.eval()
    step()
    step()
    assert log["calls"] and all(log["calls"])
    assert len(log["calls"]) > 3 * log["compiled"]  # most calls were kept ones


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="cached launchers exist only on a GPU")
def test_cached_launchers_give_tritons_results():
    """On a GPU: steps through cached launchers are bitwise those of Triton's own launch
    path, including after the gradients move to addresses of another alignment."""
    results = []
    for kept in (False, True):
        _launch._compiled_launches = kept
        try:
            torch.manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in ((4099,), (33, 65))]
            opt = gpuopt.AdamW(params, lr=0.01)
            storage = torch.randn(10000, device="cuda")
            for step in range(6):
                offset = 0 if step % 2 else 1  # aligned, then 4 bytes off
                for p in params:
                    p.grad = storage[offset:offset + p.numel()].view_as(p)
                    offset += p.numel() + 3
                opt.step()
            results.append([p.detach().clone() for p in params])
        finally:
            _launch._compiled_launches = True
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert _launch._launchers  # the second run cached its launchers


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="cached launchers exist only on a GPU")
def test_batch_norm_cached_launchers_give_tritons_results():
    """On a GPU: a batch-norm module's training and eval steps through its layer's cached launchers
    are bitwise those of Triton's own launch path — outputs, input and parameter gradients,
    running statistics and counter — including a step whose upstream gradient is 4 bytes off."""
    results = []
    for kept in (False, True):
        _launch._compiled_launches = kept
        try:
            torch.manual_seed(0)
            bn = gpuopt.nn.BatchNorm2d(24, momentum=None).cuda()
            storage = torch.randn(8 * 24 * 7 * 7 + 1, device="cuda")
            outputs = []
            for step in range(6):
                bn.train(step != 4)
                x = torch.randn(8, 24, 7, 7, device="cuda", requires_grad=True)
                y = bn(x)
                offset = 1 if step == 3 else 0
                y.backward(storage[offset:offset + y.numel()].view_as(y))
                outputs += [y.detach().clone(), x.grad.clone()]
            outputs += [bn.weight.grad.clone(), bn.bias.grad.clone(), bn.running_mean.clone(),
                        bn.running_var.clone(), bn.num_batches_tracked.clone()]
            results.append(outputs)
        finally:
            _launch._compiled_launches = True
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ graphed_step ---


def test_graphed_step_refuses_what_a_graph_cannot_hold(device):
    """Not a gpuopt optimizer, parameters off the GPU, a GradScaler's tensors: clear errors, and
    nothing stepped."""
    with pytest.raises(TypeError, match="gpuopt optimizer"):
        gpuopt.graphed_step(torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=0.1))
    p = torch.nn.Parameter(torch.randn(8, device=device))
    opt = gpuopt.SGD([p], lr=0.1)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    if device.type != "cuda":
        with pytest.raises(RuntimeError, match="CUDA graphs need every parameter on a CUDA GPU"):
            gpuopt.graphed_step(opt)()
    else:
        opt.grad_scale = torch.ones((), device=device)
        with pytest.raises(RuntimeError, match="GradScaler"):
            gpuopt.graphed_step(opt)()
    assert torch.equal(p, before)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("check", [True, False])
def test_graphed_step_replays_the_eager_step(check):
    """Replays give the eager steps' results bitwise (a twin optimizer steps eagerly), a CUDA-tensor
    learning rate changed in place between replays is read, and one capture serves every replay;
    with check=True, gradients that moved are noticed (warning, capture again), still exact."""
    torch.manual_seed(0)
    shapes = [(4099,), (33, 65), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lrs = [torch.tensor(0.01, device="cuda") for _ in range(2)]
    opt, twin = gpuopt.AdamW(params, lr=lrs[0]), gpuopt.AdamW(twins, lr=lrs[1])
    grads = [torch.zeros_like(p) for p in params]
    step = gpuopt.graphed_step(opt, check=check)
    for i in range(6):
        for p, t, g in zip(params, twins, grads):
            g.copy_(torch.randn_like(g))
            p.grad, t.grad = g, g.clone()
        if i == 3:
            for lr in lrs:
                lr.fill_(0.003)
        step()
        twin.step()
        for p, t in zip(params, twins):
            assert torch.equal(p, t)
    assert step.captures == 1
    if check:
        for p, t in zip(params, twins):
            p.grad, t.grad = torch.randn_like(p), None
            t.grad = p.grad.clone()
        with pytest.warns(UserWarning, match="capturing again"):
            step()
        twin.step()
        for p, t in zip(params, twins):
            assert torch.equal(p, t)
        assert step.captures == 2


def test_a_persistent_launch_runs_one_wave_of_the_compiled_kernel(monkeypatch):
    """On a GPU the walk's grid is what the compiled kernel keeps resident on every SM at once
    (from its registers), not 8 programs per SM; the cached launcher gets a 3-D grid (Triton's
    CompiledKernel launcher reads grid[0..2]) and the runtime arguments then the constexprs."""
    from types import SimpleNamespace

    from gpuopt import _launch

    launched, compiles = [], []

    class Compiled:
        function, n_regs, metadata = object(), 72, SimpleNamespace(shared=0)  # 72 registers, 8 warps: 3 per SM

        def __getitem__(self, grid):
            return lambda *args: launched.append((grid, args))

    class Kernel:
        arg_names = ["x_ptr", "n", "BLOCK"]

        def run(self, *args, grid, warmup, **kwargs):
            compiles.append(warmup)
            return Compiled()

    monkeypatch.setattr(_launch, "_compiled_launches", True)
    monkeypatch.setattr(_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(_launch, "multiprocessor", lambda index: _launch.H100)
    monkeypatch.setattr(_launch, "_launchers", {})
    x, kernel = torch.zeros(4), Kernel()
    for blocks in (5000, 5000, 100):
        _launch.launch(kernel, (blocks,), (x, 7), dict(BLOCK=2048), 8, persistent=True)
    assert compiles == [True, True]  # compiled (not launched) once per grid, then the cached launcher
    assert [grid for grid, _ in launched] == [(132 * 3, 1, 1), (132 * 3, 1, 1), (100, 1, 1)]
    assert launched[0][1] == (x, 7, 2048)
    _launch.launch(kernel, (64, 7), (x, 7), dict(BLOCK=2048), 8)  # not persistent: the grid as given
    assert launched[-1][0] == (64, 7, 1)


@pytest.mark.parametrize("registers,warps,shared,expected", [(32, 8, 0, 8), (64, 8, 0, 4), (72, 8, 0, 3),
                                                             (128, 8, 0, 2), (255, 8, 0, 1), (40, 4, 100_000, 2)])
def test_resident_programs_follow_registers_warps_and_shared_memory(registers, warps, shared, expected):
    from gpuopt._launch import resident_programs

    assert resident_programs(registers, warps, shared) == expected


def _host_functions(fn) -> list:
    """The distinct (file, function) pairs of gpuopt/ and gpuopt/kernels/ that ``fn`` calls, in order."""
    import os
    import sys

    roots = os.path.dirname(gpuopt.__file__) + os.sep  # (gpuopt/kernels/ included)
    seen = {}

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(roots):
            seen.setdefault((os.path.basename(frame.f_code.co_filename), frame.f_code.co_name), None)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return list(seen)


def test_an_adamw_step_passes_few_host_functions():
    """Counted by a profiler over eager AdamW steps with the launches stubbed (the GPU's host
    path down to the C launcher): a steady step passes at most 14 gpuopt functions in at most 4
    files from ``opt.step()`` to the launch; a first step (validation, states, plans) at most 7
    files. (Issue 28's targets; the lists are in DESIGN.md.)"""
    from bench.host_suite import stubbed_launches

    with stubbed_launches():
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 3), (64,), (10, 64)]]
        opt = gpuopt.AdamW(params, lr=1e-3)
        for p in params:
            p.grad = torch.randn_like(p)
        first = _host_functions(opt.step)
        opt.step()
        steady = _host_functions(opt.step)
    assert len({f for f, _ in first}) <= 7, sorted({f for f, _ in first})
    assert len({f for f, _ in steady}) <= 4 and len(steady) <= 14, steady
    assert ("_launch.py", "launch") in steady and ("_fused.py", "_prepare") not in steady
