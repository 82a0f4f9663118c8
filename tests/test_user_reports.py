"""What trying gpuopt as a user would found (issue 27): bad inputs, threads, checkpoints from
elsewhere, state edited behind the optimizer's back. Each test failed on the code before its fix;
the cases that corrupted memory or aborted the process run in a child process."""

import copy
import io
import pickle
import threading

import numpy as np
import pytest
import torch

import gpuopt
import gpuopt.functional as F

from .conftest import DEVICE
from .helpers import assert_close, run_in_child

# ------------------------------------------- 1. functional state lists the options need, left None


@pytest.mark.parametrize("case", ["adam_steps", "amsgrad_max", "rmsprop_centered", "rmsprop_momentum", "sgd_momentum",
                                  "adagrad_sums", "adadelta_deltas"])
def test_functional_refuses_a_missing_state_list_before_any_write(case):
    out = run_in_child(f"""
        import gpuopt.functional as F
        case = {case!r}
        params = [torch.tensor([1.0, 2.0, 3.0], device=DEVICE), torch.zeros(0, device=DEVICE)]
        grads = [torch.ones_like(p) for p in params]
        z = lambda: [torch.zeros_like(p) for p in params]
        steps = lambda: [torch.zeros((), device=DEVICE) for _ in params]
        calls = dict(
            adam_steps=lambda: F.adam(params, grads, z(), z(), None, None, lr=0.1),
            amsgrad_max=lambda: F.adam(params, grads, z(), z(), None, steps(), lr=0.1, amsgrad=True),
            rmsprop_centered=lambda: F.rmsprop(params, grads, z(), None, None, steps(), lr=0.1, centered=True),
            rmsprop_momentum=lambda: F.rmsprop(params, grads, z(), None, None, steps(), lr=0.1, momentum=0.9),
            sgd_momentum=lambda: F.sgd(params, grads, None, lr=0.1, momentum=0.9),
            adagrad_sums=lambda: F.adagrad(params, grads, None, steps(), lr=0.1),
            adadelta_deltas=lambda: F.adadelta(params, grads, z(), None, steps(), lr=0.1),
        )
        try:
            calls[case]()
        except ValueError as e:
            print("refused:", e)
        assert params[0].tolist() == [1.0, 2.0, 3.0], params[0].tolist()
    """)
    assert "refused:" in out and "None" in out


# --------------------------------------------------------------- 2. NumPy arrays, negative strides


@pytest.mark.parametrize("where", ["param", "grad", "batch_norm", "ema"])
def test_numpy_array_with_negative_strides_is_refused_not_aborted(where):
    out = run_in_child(f"""
        import numpy as np, gpuopt.functional as F
        where = {where!r}
        p = np.arange(6, dtype=np.float32)
        g = np.ones(6, dtype=np.float32)
        m = lambda: np.zeros(6, dtype=np.float32)
        try:
            if where == "param":
                F.sgd([p[::-1]], [g], [m()], lr=0.1)
            elif where == "grad":
                F.sgd([p], [g[::-1]], [m()], lr=0.1)
            elif where == "batch_norm":
                x = np.random.randn(4, 3, 5).astype(np.float32)[::-1]
                F.batch_norm_forward(x, None, None, training=True)
            else:
                gpuopt.EMA([p[::-1]], decay=0.9)
        except ValueError as e:
            print("refused:", e)
        assert p.tolist() == list(range(6))
    """)
    assert "refused:" in out and "negative strides" in out


# ---------------------------------------------------------- 3. module-level plans and threads


def _run_threads(work, n_threads=4, rounds=6):
    errors, barrier = [], threading.Barrier(n_threads)

    def body(k):
        try:
            barrier.wait()
            for r in range(rounds):
                work(k, r)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=body, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_total_norm_from_several_threads_is_each_threads_own():
    def work(k, r):
        grads = [torch.full((17 + k,), float(k + 1), device=DEVICE), torch.full((5,), float(r), device=DEVICE)]
        expected = torch.linalg.vector_norm(torch.cat(grads))
        assert_close(gpuopt.get_total_norm(grads), expected, name=f"thread {k} round {r}")
        params = [torch.nn.Parameter(g.clone()) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        norm = gpuopt.clip_grad_norm_(params, 1.0)
        assert_close(norm, expected, name=f"clip thread {k}")
    _run_threads(work)


def test_functional_steps_from_several_threads_update_each_threads_tensors():
    def work(k, r):
        params = [torch.full((9 + k,), float(k), device=DEVICE), torch.full((3,), 1.0, device=DEVICE)]
        grads = [torch.ones_like(p) for p in params]
        bufs = [torch.zeros_like(p) for p in params]
        expected = [p - 0.5 for p in params]
        F.sgd(params, grads, bufs, lr=0.5)
        for p, e in zip(params, expected):
            assert_close(p, e, name=f"sgd thread {k} round {r}")
        exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        steps = [torch.zeros((), device=DEVICE) for _ in params]
        before = [p.clone() for p in params]
        F.adam(params, grads, exp_avgs, exp_avg_sqs, None, steps, lr=0.1)
        for p, b in zip(params, before):
            assert_close(p, b - 0.1, rtol=1e-5, atol=1e-5, name=f"adam thread {k}")
        assert all(s.item() == 1.0 for s in steps)
    _run_threads(work)


def test_optimizer_clip_from_several_threads():
    def work(k, r):
        p = torch.nn.Parameter(torch.zeros(11 + k, device=DEVICE))
        opt = gpuopt.SGD([p], lr=1.0)
        p.grad = torch.full_like(p, 3.0)
        norm = opt.clip_grad_norm_(1.0)
        assert_close(norm, torch.linalg.vector_norm(p.grad), name=f"thread {k}")
        opt.step()
        assert_close(p.detach(), -3.0 / (norm + 1e-6) * torch.ones_like(p), rtol=1e-5, atol=1e-6)
    _run_threads(work)


# ------------------------------------------------------- 4. master weights follow in-place edits


@pytest.mark.parametrize("edit", ["data_clamp", "load_state_dict", "ema_copy_to", "copy_"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_follow_edits_of_the_parameter(edit, dtype):
    torch.manual_seed(0)
    model = torch.nn.Linear(13, 7).to(DEVICE, dtype)
    saved = copy.deepcopy(model.state_dict())
    opt = gpuopt.AdamW(model.parameters(), lr=0.05, master_weights=True)
    ema = gpuopt.EMA(model, decay=0.5)
    for _ in range(2):
        model(torch.randn(5, 13, device=DEVICE, dtype=dtype)).float().pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        ema.update()
    if edit == "data_clamp":
        model.weight.data.clamp_(-0.01, 0.01)
    elif edit == "load_state_dict":
        model.load_state_dict(saved)
    elif edit == "ema_copy_to":
        ema.copy_to()
    else:
        with torch.no_grad():
            model.weight.copy_(torch.linspace(-1, 1, 91, device=DEVICE).reshape(7, 13))
    master = opt.state[model.weight]["master_param"].clone()
    edited = model.weight.detach() != master.to(dtype)
    assert edited.any()
    # Where the parameter was edited it is the new start; elsewhere the master keeps its digits.
    start = torch.where(edited, model.weight.detach().to(torch.float64), master.to(torch.float64))
    reference = torch.optim.AdamW([torch.nn.Parameter(start)], lr=0.05)
    reference.load_state_dict({"state": {0: {k: v.to(torch.float64) for k, v in opt.state[model.weight].items()
                                             if k != "master_param"}},
                               "param_groups": [dict(reference.param_groups[0], params=[0])]})
    g = torch.randn(7, 13, device=DEVICE, dtype=dtype)
    model.weight.grad, model.bias.grad = g, torch.zeros_like(model.bias)
    reference.param_groups[0]["params"][0].grad = g.to(torch.float64)
    opt.step()
    reference.step()
    expected = reference.param_groups[0]["params"][0].detach()
    assert_close(opt.state[model.weight]["master_param"], expected, rtol=1e-5, atol=1e-6, name="master")
    assert not torch.equal(master, opt.state[model.weight]["master_param"])
    if edit in ("data_clamp", "copy_"):  # the bias was not edited: its master keeps its fp32 digits
        bias_master = opt.state[model.bias]["master_param"]
        assert bias_master.to(dtype).equal(model.bias.detach())
        assert not torch.equal(bias_master, bias_master.to(dtype).float())


def test_functional_master_follows_an_edited_param():
    p = torch.full((37,), 1.0, device=DEVICE, dtype=torch.bfloat16)
    master = torch.full((37,), 1.0009765625, device=DEVICE)  # rounds to 1.0 in bf16: consistent
    p[5:9] = 3.0  # edited behind the master's back
    F.sgd([p], [torch.zeros_like(p)], None, lr=0.1, master_params=[master])
    assert master[5:9].tolist() == [3.0] * 4, master[5:9]
    assert master[0].item() == 1.0009765625  # a consistent element keeps its fp32 digits


# ------------------------------------------------- 5. options edited in place are read by value


def test_list_betas_edited_in_place_are_used():
    """betas arrive as a list when a checkpoint's param groups went through JSON or YAML."""
    p = torch.nn.Parameter(torch.ones(5, device=DEVICE))
    q = torch.nn.Parameter(torch.ones(5, device=DEVICE, dtype=torch.float64))
    opt, ref = gpuopt.Adam([p], lr=0.1), torch.optim.Adam([q], lr=0.1)
    for o in (opt, ref):
        o.load_state_dict({"state": {}, "param_groups": [dict(o.state_dict()["param_groups"][0], betas=[0.9, 0.999])]})
    for step in range(4):
        g = torch.randn(5, device=DEVICE)
        p.grad, q.grad = g, g.double()
        if step == 2:
            opt.param_groups[0]["betas"][0] = 0.5
            ref.param_groups[0]["betas"][0] = 0.5
        opt.step()
        ref.step()
    assert_close(p.detach(), q.detach(), dtype=torch.float32)


# --------------------------------------------------------------- 6. β outside [0, 1) mid-run


@pytest.mark.parametrize("betas", [(-0.5, 0.999), (0.9, -0.1), (1.0, 0.999), (0.9, 1.5)])
def test_betas_set_mid_run_outside_their_range_are_refused_before_any_write(betas):
    a = torch.nn.Parameter(torch.ones(4, device=DEVICE))
    b = torch.nn.Parameter(torch.ones(4, device=DEVICE))
    opt = gpuopt.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.ones(4, device=DEVICE), torch.ones(4, device=DEVICE)
    opt.step()
    opt.param_groups[1]["betas"] = betas
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(ValueError, match="beta"):
        opt.step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])  # group 0 untouched too


# ----------------------------------------------------- 7. checkpoints with missing state entries


def test_checkpoint_of_another_optimizer_class_is_refused_whole():
    p = torch.nn.Parameter(torch.ones(4, device=DEVICE))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(4, device=DEVICE)
    sgd.step()
    opt = gpuopt.Adam([p], lr=0.1)
    state_before = opt.state_dict()
    with pytest.raises(KeyError, match="exp_avg"):
        opt.load_state_dict(sgd.state_dict())
    assert opt.state_dict()["state"] == state_before["state"] == {}
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


def _adam_after_one_step():
    """(parameter, its Adam, a copy of the Adam's state_dict)."""
    p = torch.nn.Parameter(torch.ones(4, device=DEVICE))
    opt = gpuopt.Adam([p], lr=0.1)
    p.grad = torch.ones(4, device=DEVICE)
    opt.step()
    return p, opt, copy.deepcopy(opt.state_dict())


def test_checkpoint_missing_one_moment_is_refused():
    p, opt, sd = _adam_after_one_step()
    del sd["state"][0]["exp_avg_sq"]
    with pytest.raises(KeyError, match="exp_avg_sq"):
        opt.load_state_dict(sd)
    assert opt.state[p]["step"].item() == 1.0 and "exp_avg_sq" in opt.state[p]


# ------------------------------------------------------------------ 8. EMA.copy_to shapes


def test_ema_copy_to_refuses_other_shapes():
    ema = gpuopt.EMA([torch.ones(1, 3, device=DEVICE)], decay=0.9)
    target = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="shape"):
        ema.copy_to([target])
    assert torch.equal(target, torch.zeros(2, 3, device=DEVICE))


# ------------------------------------------------------------ 9. load_state_dict pre-hooks


def test_load_state_dict_pre_hook_that_rewrites_the_state_is_honoured():
    p, opt, sd = _adam_after_one_step()

    def replace(optimizer, state_dict):
        new = copy.deepcopy(state_dict)
        new["state"][0]["exp_avg"] = torch.full((4,), 7.0)
        return new

    def edit(optimizer, state_dict):
        state_dict["state"][0]["exp_avg_sq"] = torch.full((4,), 3.0)

    opt.register_load_state_dict_pre_hook(replace)
    opt.register_load_state_dict_pre_hook(edit)
    seen = []
    opt.register_load_state_dict_post_hook(lambda o: seen.append(o.state[p]["exp_avg"].clone()))
    opt.load_state_dict(sd)
    assert opt.state[p]["exp_avg"].tolist() == [7.0] * 4
    assert opt.state[p]["exp_avg_sq"].tolist() == [3.0] * 4
    assert seen and seen[0].tolist() == [7.0] * 4


# --------------------------------------------------------------- 10. SGD without momentum


def test_sgd_without_momentum_keeps_no_state_entries():
    params = [torch.nn.Parameter(torch.ones(3, device=DEVICE)) for _ in range(3)]
    opt, ref = gpuopt.SGD(params, lr=0.1), torch.optim.SGD(params, lr=0.1)
    for p in params:
        p.grad = torch.ones(3, device=DEVICE)
    opt.step()
    ref.step()
    assert opt.state_dict()["state"] == ref.state_dict()["state"] == {}
    assert len(opt.state) == 0


# ------------------------------------------------- 11. stochastic rounding is reproducible


def _sr_run(opt_factory, steps=3):
    p = torch.nn.Parameter(torch.full((257,), 1.0, device=DEVICE, dtype=torch.bfloat16))
    opt = opt_factory([p])
    for _ in range(steps):
        p.grad = torch.full_like(p, 1e-3)
        opt.step()
    return p, opt


def test_stochastic_rounding_seed_follows_torch_manual_seed():
    factory = lambda ps: gpuopt.SGD(ps, lr=1.0, momentum=0.9, stochastic_rounding=True)  # noqa: E731
    torch.manual_seed(1234)
    a, _ = _sr_run(factory)
    torch.manual_seed(1234)
    b, _ = _sr_run(factory)
    torch.manual_seed(4321)
    c, _ = _sr_run(factory)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_stochastic_rounding_seed_travels_in_state_dict_and_copies():
    factory = lambda ps: gpuopt.AdamW(ps, lr=1e-3, stochastic_rounding=True)  # noqa: E731
    p, opt = _sr_run(factory, steps=2)
    sd = opt.state_dict()
    twin = copy.deepcopy((p, opt))
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    pickled = pickle.loads(pickle.dumps((p, opt)))
    q = torch.nn.Parameter(p.detach().clone())
    resumed = gpuopt.AdamW([q], lr=1e-3, stochastic_rounding=True)
    resumed.load_state_dict(loaded)
    runs = [(p, opt), twin, pickled, (q, resumed)]
    g = torch.full_like(p, 3e-4)
    for param, o in runs:
        param.grad = g.clone()
        o.step()
    for param, _ in runs[1:]:
        assert torch.equal(param.detach(), p.detach())


# ------------------------------------------------------------------ 12. batch norm with inf


@pytest.mark.parametrize("shape", [(4, 3, 5), (4, 3, 5, 2), (3, 4, 7, 7), (4, 3), (64, 3, 5)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_running_stats_with_an_infinite_value_match_torch(shape, sign, channels_last):
    if channels_last and len(shape) != 4:
        pytest.skip("channels-last needs 4 dimensions")
    x = torch.randn(*shape, device=DEVICE)
    x.view(-1)[torch.randint(x.numel(), ()).item()] = sign * float("inf")
    x.view(-1)[0] = sign * float("inf")  # the channel's first value too: the statistics' shift
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
    trm, trv = rm.clone(), rv.clone()
    y = F.batch_norm(x, rm, rv, training=True)
    expected = torch.nn.functional.batch_norm(x, trm, trv, training=True)
    assert torch.equal(rm.isnan(), trm.isnan()) and torch.equal(rm.isinf(), trm.isinf()), (rm, trm)
    assert_close(rm, trm, name="running_mean")
    assert_close(rv, trv, name="running_var")
    assert torch.equal(y.isnan(), expected.isnan())


# --------------------------------------------------------- 13. opt.clip_grad_norm_ is not lost


def test_pending_clip_survives_a_step_that_failed_its_checks():
    p = torch.nn.Parameter(torch.zeros(6, device=DEVICE))
    opt = gpuopt.SGD([p], lr=1.0, momentum=0.9)
    p.grad = torch.full((6,), 2.0, device=DEVICE)
    norm = opt.clip_grad_norm_(1.0)
    opt.state[p]["momentum_buffer"] = torch.zeros(7, device=DEVICE)  # the step refuses it
    with pytest.raises(RuntimeError, match="shape"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(6, device=DEVICE))
    del opt.state[p]["momentum_buffer"]
    opt.step()  # its first step: buf = the clipped gradient
    assert_close(p.detach(), -p.grad / (norm + 1e-6), rtol=1e-5, atol=1e-6)


def test_pending_clip_reaches_the_optimizer_through_a_subclassing_wrapper():
    """Lightning's ``LightningOptimizer`` in manual optimization: a dynamic subclass of the
    optimizer's class with a shallow copy of its ``__dict__``; ``step`` goes to the real optimizer."""

    class Wrapper:
        def __init__(self, optimizer):
            self.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k not in ("step", "__del__")}
            self.__class__ = type("Wrapped" + type(optimizer).__name__, (Wrapper, type(optimizer)), {})
            self._optimizer = optimizer

        def step(self, closure=None):
            return self._optimizer.step(closure)

    p = torch.nn.Parameter(torch.zeros(6, device=DEVICE))
    opt = Wrapper(gpuopt.SGD([p], lr=1.0))
    p.grad = torch.full((6,), 2.0, device=DEVICE)
    norm = opt.clip_grad_norm_(1.0)
    opt.step()
    assert_close(p.detach(), -p.grad / (norm + 1e-6), rtol=1e-5, atol=1e-6)


# ------------------------------------------------ 14. a torch SGD checkpoint with sparse buffers


def test_torch_sgd_checkpoint_with_a_sparse_momentum_buffer_loads_dense():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=True).to(DEVICE)
    twin = copy.deepcopy(emb)
    ref = torch.optim.SGD(emb.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        emb(torch.tensor([1, 4, 4], device=DEVICE)).sum().backward()
        ref.step()
        ref.zero_grad()
    assert ref.state[emb.weight]["momentum_buffer"].is_sparse
    twin.load_state_dict(emb.state_dict())
    opt = gpuopt.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(ref.state_dict())
    assert opt.state[twin.weight]["momentum_buffer"].layout is torch.strided
    for model, o in ((emb, ref), (twin, opt)):
        model(torch.tensor([2, 4], device=DEVICE)).sum().backward()
        o.step()
    assert_close(twin.weight.detach(), emb.weight.detach())


def test_checkpoint_with_a_sparse_state_of_the_wrong_shape_is_refused_whole():
    p = torch.nn.Parameter(torch.ones(10, 3, device=DEVICE))
    opt = gpuopt.SGD([p], lr=0.1, momentum=0.9)
    bad = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.ones(1, 3), (9, 3))
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict({"state": {0: {"momentum_buffer": bad}},
                             "param_groups": [dict(opt.param_groups[0], params=[0])]})
    assert len(opt.state) == 0


# ------------------------------------------- 15. hyperparameters of the kinds torch accepts


def test_functional_takes_numpy_scalar_hyperparameters():
    p, q = torch.ones(5, device=DEVICE), torch.ones(5, device=DEVICE)
    g = torch.full((5,), 0.5, device=DEVICE)
    F.sgd([p], [g], [torch.zeros(5, device=DEVICE)], lr=np.float32(0.1), momentum=np.float64(0.9),
          dampening=np.float32(0.0))
    F.sgd([q], [g], [torch.zeros(5, device=DEVICE)], lr=0.1, momentum=0.9)
    assert torch.equal(p, q)
    F.adam([p], [g], [torch.zeros_like(p)], [torch.zeros_like(p)], None, [torch.zeros((), device=DEVICE)],
           lr=np.float32(0.01), beta1=np.float64(0.9), eps=np.float32(1e-8))


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adadelta", "adam"])
def test_functional_takes_zero_dim_tensor_hyperparameters(name):
    def run(hyper):
        p = torch.linspace(-1, 1, 23, device=DEVICE)
        g = torch.linspace(0.5, -0.3, 23, device=DEVICE)
        z = lambda: torch.zeros_like(p)  # noqa: E731
        step = [torch.zeros((), device=DEVICE)]
        if name == "sgd":
            F.sgd([p], [g], [z()], lr=0.1, momentum=hyper(0.9), dampening=hyper(0.25), weight_decay=hyper(0.01),
                  state_steps=step)
            F.sgd([p], [g], [z()], lr=0.1, momentum=hyper(0.9), dampening=hyper(0.25), state_steps=step)
        elif name == "rmsprop":
            F.rmsprop([p], [g], [z()], None, None, step, lr=0.1, alpha=hyper(0.9), eps=hyper(1e-6))
        elif name == "adadelta":
            F.adadelta([p], [g], [z()], [z()], step, lr=1.0, rho=hyper(0.8), eps=hyper(1e-5))
        else:
            F.adam([p], [g], [z()], [z()], None, step, lr=0.1, beta1=hyper(0.8), beta2=hyper(0.99),
                   weight_decay=hyper(0.1))
        return p

    assert_close(run(lambda v: torch.tensor(v)), run(float), name=name)
