"""Memory safety: every tensor a kernel touches is checked against what the kernel assumes, and
nothing is silently wrong. Each test is a case that reached a kernel unchecked (out-of-bounds
accesses, wrong pairing of elements, wrong results) before the validation layer existed. The cases
that corrupted memory run in a child process, so a crash fails the test instead of the CI run."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gpuopt
from gpuopt.kernels import _multi_tensor as walk

from .conftest import DEVICE
from .helpers import assert_close, count_launches

OPTIMIZERS = [("Adam", dict(lr=0.01)), ("AdamW", dict(lr=0.01, weight_decay=0.1)),
              ("SGD", dict(lr=0.01, momentum=0.9)), ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
              ("Adagrad", dict(lr=0.01)), ("Adadelta", dict(lr=0.5))]


def run_in_child(code: str, **env) -> str:
    """Run ``code`` in a fresh Python (same environment and ``env``, same device); a crash is a failure."""
    prelude = f"import torch, gpuopt\nDEVICE = torch.device({str(DEVICE)!r})\n"
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, **env})
    assert result.returncode == 0, (f"child exited with {result.returncode}\nstdout:\n{result.stdout}\n"
                                    f"stderr:\n{result.stderr[-3000:]}")
    return result.stdout


# ------------------------------------------------------------------ 1. states of the wrong size ---


def test_parameter_that_grows_after_a_step_is_refused_not_overrun():
    out = run_in_child("""
        for name in ["Adam", "SGD", "RMSprop", "Adagrad", "Adadelta"]:
            p = torch.nn.Parameter(torch.ones(4, device=DEVICE))
            kwargs = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {}
            opt = getattr(gpuopt, name)([p], **kwargs)
            p.grad = torch.ones(4, device=DEVICE)
            opt.step()
            p.data = torch.ones(4096, device=DEVICE)
            p.grad = torch.ones(4096, device=DEVICE)
            before = p.detach().clone()
            try:
                opt.step()
            except RuntimeError as e:
                assert "has shape (4,) but its parameter has shape (4096,)" in str(e), str(e)
                assert torch.equal(p, before)
                print(name, "refused")
    """)
    assert out.count("refused") == 5


def test_parameter_that_shrinks_is_refused():
    p = torch.nn.Parameter(torch.ones(6, device=DEVICE))
    opt = gpuopt.Adam([p])
    p.grad = torch.ones(6, device=DEVICE)
    opt.step()
    p.data = torch.ones(3, device=DEVICE)
    p.grad = torch.ones(3, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"exp_avg 0 has shape \(6,\) but its parameter has shape \(3,\)"):
        opt.step()


@pytest.mark.parametrize("size", [2, 3, 6000])
def test_checkpoint_with_states_of_the_wrong_size_is_refused_at_load(size):
    """A 2-element exp_avg for a 4096-element parameter (was: accepted, then a segfault), a
    3-element one for a 6-element parameter (was: accepted silently), one too large."""
    out = run_in_child(f"""
        n = 4096 if {size} != 3 else 6
        p = torch.nn.Parameter(torch.ones(n, device=DEVICE))
        opt = gpuopt.Adam([p])
        p.grad = torch.ones(n, device=DEVICE)
        opt.step()
        good = {{k: v.clone() for k, v in opt.state[p].items()}}
        checkpoint = opt.state_dict()
        checkpoint["state"][0] = dict(checkpoint["state"][0], exp_avg=torch.zeros({size}, device=DEVICE))
        try:
            opt.load_state_dict(checkpoint)
            print("accepted")
        except ValueError as e:
            assert "exp_avg" in str(e) and "shape" in str(e), str(e)
            assert all(torch.equal(opt.state[p][k], v) for k, v in good.items())  # nothing changed
            opt.step()
            print("refused")
    """)
    assert "refused" in out


def test_functional_states_of_the_wrong_size_are_refused():
    out = run_in_child("""
        p = torch.ones(4096, device=DEVICE)
        g = torch.ones(4096, device=DEVICE)
        step = torch.zeros((), device=DEVICE)
        for states in ([torch.zeros(2, device=DEVICE)] * 2, [torch.zeros(8192, device=DEVICE)] * 2):
            try:
                gpuopt.functional.adam([p], [g], [states[0]], [states[1].clone()], None, [step])
                print("accepted")
            except RuntimeError as e:
                assert "exp_avg 0 has shape" in str(e), str(e)
                print("refused")
        assert step.item() == 0 and (p == 1).all()
    """)
    assert out.split() == ["refused", "refused"]


def test_functional_sgd_and_ema_refuse_mismatched_tensors(device):
    p = torch.ones(10, device=device)
    with pytest.raises(RuntimeError, match="momentum_buffer 0 has shape"):
        gpuopt.functional.sgd([p], [torch.ones(10, device=device)], [torch.zeros(5, device=device)], lr=0.1,
                              momentum=0.9)
    with pytest.raises(ValueError, match="got 1 exp_avg tensors for 2 parameters"):
        gpuopt.functional.adam([p, p.clone()], [p.clone(), p.clone()], [torch.zeros_like(p)],
                               [torch.zeros_like(p)] * 2, None, [torch.zeros((), device=device) for _ in range(2)])
    with pytest.raises(RuntimeError, match="step 0 must be a one-element float32"):
        gpuopt.functional.adam([p], [p.clone()], [torch.zeros_like(p)], [torch.zeros_like(p)], None,
                               [torch.zeros((), dtype=torch.float64, device=device)])


def test_ema_parameter_resized_is_refused_and_count_not_advanced(device):
    p = torch.nn.Parameter(torch.randn(8, device=device))
    ema = gpuopt.EMA([p], decay=0.9)
    ema.update()
    p.data = torch.randn(16, device=device)
    with pytest.raises(RuntimeError, match="has shape"):
        ema.update()
    assert ema.num_updates == 1


# ------------------------------------------------------------ 2. state and parameter layouts ------


def _conv_model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3)).to(device)


def _train(model, opt, xs):
    for x in xs:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS + [("SGD", dict(lr=0.01, momentum=0.9, dampening=0.2))],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_states_follow_a_parameter_into_channels_last(device, name, kwargs):
    """model.to(memory_format=torch.channels_last) after some steps: the states follow the
    parameters' new layout (was: Adam 0.22 off torch, SGD diverging)."""
    xs = [torch.randn(2, 3, 9, 9, device=device) for _ in range(6)]
    ours, theirs = _conv_model(device), _conv_model(device)
    our_opt = getattr(gpuopt, name)(ours.parameters(), **kwargs)
    their_opt = getattr(torch.optim, name)(theirs.parameters(), **kwargs)
    _train(ours, our_opt, xs[:3])
    _train(theirs, their_opt, xs[:3])
    ours.to(memory_format=torch.channels_last)
    theirs.to(memory_format=torch.channels_last)
    _train(ours, our_opt, [x.to(memory_format=torch.channels_last) for x in xs[3:]])
    _train(theirs, their_opt, [x.to(memory_format=torch.channels_last) for x in xs[3:]])
    for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(a, b, rtol=1e-4, atol=1e-5, name=f"{name} {n}")
        for key, value in our_opt.state[a].items():
            if value.dim() == 4:
                assert value.stride() == a.stride(), f"{key} kept its old layout"


def test_nchw_checkpoint_loads_into_a_channels_last_model(device):
    xs = [torch.randn(2, 3, 9, 9, device=device) for _ in range(5)]
    saved_model, twin = _conv_model(device), _conv_model(device)
    saved_opt = torch.optim.Adam(saved_model.parameters(), lr=0.01)
    _train(saved_model, saved_opt, xs[:2])
    checkpoint = saved_opt.state_dict()
    ours = _conv_model(device)
    ours.load_state_dict(saved_model.state_dict())
    twin.load_state_dict(saved_model.state_dict())
    ours.to(memory_format=torch.channels_last)
    our_opt = gpuopt.Adam(ours.parameters(), lr=0.01)
    our_opt.load_state_dict(checkpoint)
    their_opt = torch.optim.Adam(twin.parameters(), lr=0.01)
    their_opt.load_state_dict(checkpoint)
    _train(ours, our_opt, [x.to(memory_format=torch.channels_last) for x in xs[2:]])
    _train(twin, their_opt, xs[2:])
    for a, b in zip(ours.parameters(), twin.parameters()):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_ema_follows_channels_last(device):
    model = _conv_model(device)
    ema = gpuopt.EMA(model, decay=0.5)
    expected = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, e in zip(model.parameters(), expected):
            p.add_(1.0)
            e.add_(0.5)  # 0.5 e + 0.5 (e + 1)
    model.to(memory_format=torch.channels_last)
    ema.update()
    for average, e, p in zip(ema.averages, expected, model.parameters()):
        assert_close(average, e, name="average")
        assert average.stride() == p.stride()


def test_functional_state_in_another_layout_is_refused(device):
    p = torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="must share its parameter's memory layout"):
        gpuopt.functional.adam([p], [torch.randn_like(p)], [torch.zeros(2, 3, 4, 5, device=device)],
                               [torch.zeros_like(p)], None, [torch.zeros((), device=device)])


# ------------------------------------------------------------------------- 3. misaligned storage ---


def test_misaligned_parameter_storage_is_refused(device):
    """``torch.frombuffer(buf, dtype=torch.float32, offset=2)``: the update landed 2 bytes early."""
    if device.type != "cpu":
        pytest.skip("torch.frombuffer makes CPU tensors; CUDA allocations are aligned")
    raw = bytearray(4 * 17 + 2)
    param = torch.nn.Parameter(torch.frombuffer(raw, dtype=torch.float32, offset=2, count=17))
    assert param.data_ptr() % 4
    param.grad = torch.ones(17)
    before = bytes(raw)
    with pytest.raises(ValueError, match="not a multiple of its element size"):
        gpuopt.Adam([param]).step()
    with pytest.raises(ValueError, match="not a multiple of its element size"):
        gpuopt.EMA([param]).update()
    with pytest.raises(ValueError, match="not a multiple of its element size"):
        gpuopt.functional.sgd([param.detach()], [torch.ones(17)], None, lr=0.1)
    assert bytes(raw) == before


# ------------------------------------------------------------------- 4. overlapping tensors --------


def test_the_same_parameter_twice_is_refused_at_construction(device):
    p = torch.nn.Parameter(torch.randn(5, device=device))
    with pytest.raises(ValueError, match="same parameter twice"):
        gpuopt.Adam([p, p])
    opt = gpuopt.SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="same parameter twice"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, device=device))] * 2})


def test_overlapping_or_shared_tensors_are_refused(device):
    flat = torch.randn(10, device=device)
    a, b = flat[:6], flat[4:]  # two views sharing elements 4 and 5
    with pytest.raises(RuntimeError, match="overlap in memory"):
        gpuopt.functional.sgd([a, b], [torch.ones(6, device=device), torch.ones(6, device=device)], None, lr=0.1)
    step = torch.zeros((), device=device)
    p, q = torch.randn(3, device=device), torch.randn(3, device=device)
    with pytest.raises(RuntimeError, match="overlap in memory"):
        gpuopt.functional.adam([p, q], [torch.ones(3, device=device)] * 2, [torch.zeros(3, device=device) for _ in "ab"],
                               [torch.zeros(3, device=device) for _ in "ab"], None, [step, step])
    assert step.item() == 0


# ------------------------------------------------- 5. SGD's first step, inf weights, EMA state -----


@pytest.mark.parametrize("nesterov", [False])
def test_sgd_dampening_after_a_skipped_first_step_matches_torch(device, nesterov):
    """AMP's found_inf on the very first step leaves a zero buffer: the next real step must still
    be the first (buf = d_p), as torch's (host-skipped) step gives."""
    p = torch.nn.Parameter(torch.randn(37, device=device))
    q = torch.nn.Parameter(p.detach().clone())
    ours = gpuopt.SGD([p], lr=0.1, momentum=0.9, dampening=0.5)
    theirs = torch.optim.SGD([q], lr=0.1, momentum=0.9, dampening=0.5)
    p.grad = torch.randn_like(p)
    ours.step(found_inf=torch.ones((), device=device))  # skipped on the device
    for _ in range(3):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step(found_inf=torch.zeros((), device=device))
        theirs.step()
    assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_sgd_dampening_after_a_step_that_raised_matches_torch(device):
    p = torch.nn.Parameter(torch.randn(37, device=device))
    q = torch.nn.Parameter(p.detach().clone())
    ours = gpuopt.SGD([p], lr=0.1, momentum=0.9, dampening=0.5)
    theirs = torch.optim.SGD([q], lr=0.1, momentum=0.9, dampening=0.5)
    p.grad = torch.randn_like(p)
    ours.state[p]["momentum_buffer"] = torch.zeros(3, device=device)  # refused: the step raises
    with pytest.raises(RuntimeError, match=r"momentum_buffer 0 has shape \(3,\)"):
        ours.step()
    del ours.state[p]["momentum_buffer"]  # as if never made: the next step is torch's first
    for _ in range(3):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop", "Adagrad", "Adadelta"])
def test_infinite_weight_without_weight_decay_stays_infinite(device, name):
    """0 · inf is NaN: with weight_decay=0 the kernels skip the term, as torch does."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], device=device))
    q = torch.nn.Parameter(p.detach().clone())
    ours, theirs = getattr(gpuopt, name)([p], lr=0.1), getattr(torch.optim, name)([q], lr=0.1)
    for g in (torch.tensor([float("inf"), 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])):
        p.grad, q.grad = g.to(device), g.to(device)
        ours.step()
        theirs.step()
    if name == "SGD":
        assert torch.isinf(q[0]) and not torch.isnan(q).any()
    assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_ema_load_state_dict_is_checked_before_it_changes_anything(device):
    p = torch.nn.Parameter(torch.randn(4, device=device))
    ema = gpuopt.EMA([p], decay=0.9)
    ema.update()
    good = ema.state_dict()
    averages = [a.clone() for a in ema.averages]
    for bad, message in [(dict(good, decay=2.0), "Invalid decay"), (dict(good, num_updates=-1), "num_updates"),
                         (dict(good, averages=[torch.zeros(3, device=device)]), "does not fit")]:
        with pytest.raises(ValueError, match=message):
            ema.load_state_dict(bad)
        assert ema.decay == 0.9 and ema.num_updates == 1 and torch.equal(ema.averages[0], averages[0])


# ---------------------------------------------------------------------------------- batch norm -----


def test_batch_norm_strided_and_expanded_per_channel_tensors(device):
    """Weight, bias and running stats as strided views or an expand(): read and updated in place
    as torch does (was: wrong channels, writes outside the view)."""
    x = torch.randn(5, 3, 4, 4, device=device)
    weight = torch.randn(1, device=device).expand(3)
    bias = torch.randn(6, device=device)[::2]
    ours_rm, ours_rv = torch.zeros(6, device=device), torch.ones(6, device=device)
    theirs_rm, theirs_rv = ours_rm.clone(), ours_rv.clone()
    y = gpuopt.functional.batch_norm(x, ours_rm[::2], ours_rv[::2], weight, bias, training=True)
    expected = torch.nn.functional.batch_norm(x, theirs_rm[::2], theirs_rv[::2], weight, bias, training=True)
    assert_close(y, expected)
    assert_close(ours_rm, theirs_rm, name="running_mean (every other element)")
    assert_close(ours_rv, theirs_rv, name="running_var (the others untouched)")
    y = gpuopt.functional.batch_norm(x, ours_rm[::2], ours_rv[::2], weight, bias, training=False)
    assert_close(y, torch.nn.functional.batch_norm(x, theirs_rm[::2], theirs_rv[::2], weight, bias))


def test_batch_norm_eps_checked_as_torch_does(device):
    x = torch.randn(4, 3, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    for training, eps, message in [(True, 0.0, "eps must be positive during training"),
                                   (True, -1.0, "eps must be positive"), (False, -1.0, "must be non-negative")]:
        with pytest.raises(ValueError, match=message):
            gpuopt.functional.batch_norm(x, rm, rv, training=training, eps=eps)
    y = gpuopt.functional.batch_norm(x, rm, rv, training=False, eps=0.0)  # allowed in eval, as torch
    assert_close(y, torch.nn.functional.batch_norm(x, rm, rv, training=False, eps=0.0))


def test_batch_norm_running_stats_requiring_grad_and_double_backward(device):
    x = torch.randn(4, 3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'running_mean'"):
        gpuopt.functional.batch_norm(x, torch.zeros(3, device=device, requires_grad=True),
                                     torch.ones(3, device=device), training=True)
    y = gpuopt.functional.batch_norm(x, None, None, training=True)
    with pytest.raises(RuntimeError, match="first-order backward only"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (grad,) = torch.autograd.grad(gpuopt.functional.batch_norm(x, None, None, training=True).square().sum(), x)
    assert torch.isfinite(grad).all()


def test_batch_norm_counter_is_checked_before_any_launch(device):
    """``num_batches_tracked`` is read by the kernels (momentum=None) and counted by them (a
    module's forward): a counter of no element or several, a bool, a non-tensor, one requiring
    grad or on another device is refused before anything runs (was: read out of bounds)."""
    x = torch.randn(4, 3, 2, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    bad = [(torch.zeros(0, dtype=torch.long, device=device), ValueError, "one integer or floating-point"),
           (torch.zeros(2, dtype=torch.long, device=device), ValueError, "one integer or floating-point"),
           (torch.tensor(True, device=device), ValueError, "one integer or floating-point"),
           (3, TypeError, "must be a tensor"),
           (torch.zeros((), device=device, requires_grad=True), RuntimeError, "not differentiable")]
    if device.type == "cuda":
        bad.append((torch.zeros((), dtype=torch.long), ValueError, "is on cpu"))
    for counter, error, message in bad:
        with pytest.raises(error, match=message):
            gpuopt.functional.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=counter)
        assert torch.equal(rm, torch.zeros(3, device=device)) and torch.equal(rv, torch.ones(3, device=device))
    bn = gpuopt.nn.BatchNorm1d(3, momentum=None).to(device)
    bn(x)
    bn(x)  # (a plan made and used)
    before = (bn.running_mean.clone(), bn.running_var.clone())
    bn.num_batches_tracked = torch.zeros(0, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="one integer or floating-point"):
        bn(x)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])


def test_batch_norm_module_counts_batches_as_torch(device):
    """The module's counter, counted by the statistics kernel (or, for an empty batch, by torch),
    follows torch's through training, an empty batch, evaluation and momentum=None steps; the
    functional form never counts (its counter already counts the batch)."""
    bn, ref = gpuopt.nn.BatchNorm2d(3).to(device), torch.nn.BatchNorm2d(3).to(device)
    for step, (shape, train, momentum) in enumerate([((4, 3, 2, 2), True, 0.1), ((4, 3, 2, 2), True, 0.1),
                                                     ((0, 3, 2, 2), True, 0.1), ((4, 3, 2, 2), False, 0.1),
                                                     ((2, 3, 5, 1), True, None), ((2, 3, 5, 1), True, None)]):
        for module in (bn, ref):
            module.train(train)
            module.momentum = momentum
        x = torch.randn(shape, device=device)
        assert_close(bn(x), ref(x), rtol=1e-4, atol=1e-5)
        assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item(), step
        assert_close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
        assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    counter = torch.tensor(5, device=device)
    gpuopt.functional.batch_norm(torch.randn(4, 3, device=device), torch.zeros(3, device=device),
                                 torch.ones(3, device=device), training=True, momentum=None,
                                 num_batches_tracked=counter)
    assert counter.item() == 5


def test_batch_norm_misaligned_input(device):
    if device.type != "cpu":
        pytest.skip("torch.frombuffer makes CPU tensors")
    x = torch.randn(6, 3)
    raw = bytearray(2) + bytearray(x.numpy().tobytes())
    misaligned = torch.frombuffer(raw, dtype=torch.float32, offset=2, count=18).view(6, 3)
    assert misaligned.data_ptr() % 4
    assert_close(gpuopt.functional.batch_norm(misaligned, None, None, training=True),
                 torch.nn.functional.batch_norm(x, None, None, training=True))


def test_convert_batchnorm_keeps_hooks(device):
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3)).to(device)
    calls = []
    handle = model[0].register_forward_hook(lambda module, args, out: calls.append("forward"))
    model[0].register_forward_pre_hook(lambda module, args: calls.append("pre"))
    converted = gpuopt.nn.convert_batchnorm(model)
    assert isinstance(converted[0], gpuopt.nn.BatchNorm1d)
    converted(torch.randn(4, 3, device=device))
    assert calls == ["pre", "forward"]
    handle.remove()
    converted(torch.randn(4, 3, device=device))
    assert calls == ["pre", "forward", "pre"]


# ---------------------------------------------------------------- the fast path stays checked ------


def _reused(opt) -> list:
    """Whether each of ``opt``'s prepared groups can be reused by the next step."""
    return [prepared.grad_addresses is not None for prepared in opt._prepared.values()]


def test_replaced_state_is_validated_on_the_next_step(device):
    """opt.state[p][key] = ... changes the state's generation: the next step re-validates."""
    p = torch.nn.Parameter(torch.randn(64, device=device))
    opt = gpuopt.Adam([p])
    p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    assert _reused(opt) == [True]
    opt.state[p]["exp_avg"] = torch.zeros(3, device=device)
    with pytest.raises(RuntimeError, match=r"exp_avg 0 has shape \(3,\)"):
        opt.step()
    opt.state[p]["exp_avg"] = torch.zeros(64, device=device)
    opt.step()
    assert opt.state[p]["step"].item() == 3


def test_steady_state_step_launches_without_revalidating(device, monkeypatch):
    """Nothing changed → no validation, one launch; gradients alone moved → their table row is
    rewritten without a full validation; a gradient in another layout or dtype, a new parameter
    address, a gradient that vanished → validated again. Results match a fresh optimizer's."""
    import gpuopt._multi_tensor as plain_path  # (where every validation of a step's tensors is made)

    shapes = [(7,), (3, 5), (2, 3, 4, 5)]
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = gpuopt.Adam(params, lr=0.1), torch.optim.Adam(twins, lr=0.1)
    checks = []
    original = plain_path.check_roles
    monkeypatch.setattr(plain_path, "check_roles", lambda *a: (checks.append(1), original(*a))[1])

    def step(make_grad=torch.randn_like):
        for p, t in zip(params, twins):
            g = make_grad(p)
            p.grad, t.grad = g, g.detach().clone()
        opt.step()
        ref.step()
        for p, t in zip(params, twins):
            assert_close(p, t, rtol=1e-5, atol=1e-6)

    step()
    assert len(checks) == 1 and _reused(opt) == [True]
    kept = [p.grad for p in params]
    with count_launches(walk, "_step_kernel") as counter:
        for _ in range(2):
            for p, g in zip(params, kept):
                g.copy_(torch.randn_like(g))
            for p, t in zip(params, twins):
                t.grad = p.grad.detach().clone()
            opt.step()
            ref.step()
    assert counter["launches"] == 2 and len(checks) == 1  # kept: no validation
    step()  # new gradient storage: the grad row moves, no full validation
    step()
    assert len(checks) == 1
    step(lambda p: torch.randn(p.shape[::-1], device=device).T if p.dim() == 2 else torch.randn_like(p))
    assert len(checks) == 2  # a transposed gradient: validated (and copied to the param's layout)
    step()
    params[0].grad = None
    twins[0].grad = None
    opt.step()
    ref.step()
    assert len(checks) == 4
    params[1].data = params[1].data.clone()  # a parameter at a new address
    twins[1].data = twins[1].data.clone()
    step()
    assert len(checks) == 5
    opt.state[params[2]]["exp_avg"].data = opt.state[params[2]]["exp_avg"].clone()  # a state at a new address
    ref.state[twins[2]]["exp_avg"].data = ref.state[twins[2]]["exp_avg"].clone()
    step()
    assert len(checks) == 6
    params.reverse()  # the same parameters in another order
    twins.reverse()
    opt.param_groups[0]["params"].reverse()
    ref.param_groups[0]["params"].reverse()
    step()
    assert len(checks) == 7
    step()
    assert len(checks) == 7 and _reused(opt) == [True]


def test_plain_path_alone_without_the_layout_check(device, monkeypatch):
    """Where torch has no usable layout check (``_validate.layout_check`` gives None), nothing
    validated is reused: every step is validated afresh, and the steps match torch's, a
    replaced state is refused, a gradient in another layout is read as torch reads it."""
    import gpuopt._multi_tensor as plain_path
    from gpuopt import _validate

    monkeypatch.setattr(_validate, "_TENSOR_GUARDS", None)
    checks = []
    original = plain_path.check_roles
    monkeypatch.setattr(plain_path, "check_roles", lambda *a: (checks.append(1), original(*a))[1])
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in [(6,), (2, 3)]]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = gpuopt.SGD(params, lr=0.1, momentum=0.9), torch.optim.SGD(twins, lr=0.1, momentum=0.9)
    for step in range(4):
        for p, t in zip(params, twins):
            p.grad = torch.randn(p.shape[::-1], device=device).T if step == 2 and p.dim() == 2 else torch.randn_like(p)
            t.grad = p.grad.clone()
        opt.step()
        ref.step()
        assert _reused(opt) == [False] and len(checks) == step + 1
        for p, t in zip(params, twins):
            assert_close(p, t, rtol=1e-5, atol=1e-6)
    opt.state[params[0]]["momentum_buffer"] = torch.zeros(5, device=device)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="momentum_buffer 0 has shape"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_tracked_state_pickles_as_plain_dicts_and_deepcopies(device, tmp_path):
    """opt.state tracks its changes, yet state_dict() saves and loads with weights_only=True, and a
    deep copy steps on its own tensors (its plans are rebuilt, never the original's addresses)."""
    import copy

    p = torch.nn.Parameter(torch.randn(9, device=device))
    opt = gpuopt.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn_like(p)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert type(loaded["state"][0]) is dict and set(loaded["state"][0]) == {"momentum_buffer", "step"}
    twin = copy.deepcopy(opt)
    q = twin.param_groups[0]["params"][0]
    assert q is not p and q.data_ptr() != p.data_ptr()
    q.grad = p.grad.clone()
    opt.step()
    twin.step()
    assert torch.equal(p, q)
    assert torch.equal(twin.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    fresh = gpuopt.SGD([torch.nn.Parameter(torch.randn(9, device=device))], lr=0.1, momentum=0.9)
    fresh.load_state_dict(loaded)
    assert fresh.state[fresh.param_groups[0]["params"][0]]["step"].item() == 1


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS)
def test_gradients_freed_by_zero_grad_are_not_kept_alive(device, name, kwargs):
    """zero_grad(set_to_none=True) frees the gradients, as with torch.optim: neither the
    optimizer's prepared launches nor its plans hold one between steps (a model's worth of
    gradient memory, or its largest gradient, would otherwise stay allocated through the next
    forward). The functional API's cache of plans keeps none of the caller's tensors either."""
    import gc
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(device)
    opt = getattr(gpuopt, name)(model.parameters(), **kwargs)
    for _ in range(3):  # validated, then gradients moved, then kept
        model(torch.randn(4, 6, device=device)).square().sum().backward()
        opt.step()
        grads = [weakref.ref(p.grad) for p in model.parameters()]
        opt.zero_grad(set_to_none=True)
        gc.collect()
        assert not any(ref() is not None for ref in grads)
    p, g, m = torch.randn(7, device=device), torch.randn(7, device=device), torch.zeros(7, device=device)
    gpuopt.functional.sgd([p], [g], [m], lr=0.1, momentum=0.9, first_step=True)
    refs = [weakref.ref(t) for t in (p, g, m)]
    del p, g, m
    gc.collect()
    assert not any(ref() is not None for ref in refs)


def _twin_steps(device, opt_name, kwargs, change):
    """Two steps of gpuopt and torch.optim on the same parameters, ``change(params, opt)`` applied to
    both sides between them; gpuopt must match torch afterwards and for one more step."""
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in [(5, 5), (9,), (3, 4)]]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = getattr(gpuopt, opt_name)(params, **kwargs), getattr(torch.optim, opt_name)(twins, **kwargs)
    for p, t in zip(params, twins):
        p.grad = torch.randn_like(p)
        t.grad = p.grad.clone()
    for _ in range(2):
        opt.step()
        ref.step()
    change(params, opt)
    change(twins, ref)
    for _ in range(2):
        opt.step()
        ref.step()
        for p, t in zip(params, twins):
            assert_close(p, t, rtol=1e-5, atol=1e-6)
            assert_close(p.grad, t.grad, rtol=0, atol=0)


def test_gradient_view_at_the_same_address_is_revalidated(device):
    """A gradient replaced by another view of the same storage keeps its address: the fast path
    compares strides too. A transposed view pairs other elements; an expanded one (stride 0) is
    smaller in memory than the parameter, so reading it as a dense gradient would overrun it."""
    def transpose_and_expand(params, _):
        params[0].grad = params[0].grad.t()  # same address, strides (1, 5)
        params[1].grad = params[1].grad[:1].expand(9)  # same address, stride 0: one element of storage

    _twin_steps(device, "Adam", dict(lr=0.05), transpose_and_expand)


def test_gradient_changed_in_place_is_revalidated(device):
    """The same gradient object, its metadata changed in place at the same address: transposed
    by ``as_strided_`` (other elements paired), or ``resize_``d within its storage's capacity (a
    dense read of the parameter's size would overrun what the gradient now covers). The fast
    path's layout check (sizes and strides of every gradient, each step) sees both: the first is
    read in its new layout, as torch reads it; the second is refused before anything changes."""
    def transpose_in_place(params, _):
        params[0].grad.as_strided_((5, 5), (1, 5))  # same object, same address, transposed

    _twin_steps(device, "Adam", dict(lr=0.05), transpose_in_place)

    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in [(5, 5), (9,)]]
    opt = gpuopt.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    params[1].grad.resize_(4)  # within its capacity: same address
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="gradient shape"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_layout_check_sees_every_change_it_promises():
    """``_validate.layout_check`` (torch's C++ TensorGuards, probed at import; CI's torch has
    it): equal layouts pass at any address; a change of size, stride, dtype, device index or
    tensor type fails; it holds no reference to the tensors it was made from."""
    import weakref

    from gpuopt import _validate

    assert _validate._TENSOR_GUARDS is not None, "the layout check's probe failed on this torch"
    tensors = [torch.randn(4, 6), torch.randn(7), torch.randn(2, 3, 5).to(torch.bfloat16)]
    check = _validate.layout_check(tensors)
    assert check.check(*[torch.randn_like(t) for t in tensors])
    assert check.check(*[torch.randn(t.numel() + 8).to(t.dtype)[8:].view(t.shape) for t in tensors])
    changed = [torch.randn(6, 4).t(), torch.randn(14)[::2], torch.randn(2, 3, 5).to(torch.bfloat16)]
    assert not check.check(*changed)  # strides: a transpose, a step of 2
    assert not check.check(torch.randn(4, 6), torch.randn(8), tensors[2])  # a size
    assert not check.check(torch.randn(4, 6), torch.randn(7), tensors[2].float())  # a dtype
    assert not check.check(torch.nn.Parameter(tensors[0]), tensors[1], tensors[2])  # a type
    alive = [weakref.ref(t) for t in tensors]
    del tensors
    assert all(ref() is None for ref in alive)


def test_prepared_group_sees_every_change_the_fast_path_must_see(device):
    """``_PreparedGroup.same_tensors`` on each change the fast path must see: nothing changed,
    or every gradient at a new address with the same layout (every parameter having one) →
    reused; gradients moved while a parameter has none, a parameter replaced or
    reordered, a parameter or state moved, a gradient transposed, expanded, resized in place,
    sparse, conjugated, vanished or appeared, a list of another length → not reused. It keeps
    no gradient alive."""
    import weakref

    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in [(4, 6), (7,), (2, 3, 5)]]
    params.append(torch.nn.Parameter(torch.randn(3, device=device)))  # without a gradient
    opt = gpuopt.Adam(params, lr=0.1)
    for p in params[:3]:
        p.grad = torch.randn_like(p)
    opt.step()
    prepared = opt._prepared[0]
    assert prepared.same_tensors(params) and prepared.same_tensors(tuple(params))
    alive = [weakref.ref(p.grad) for p in params[:3]]
    for p in params[:3]:
        p.grad = torch.randn_like(p)
    assert all(ref() is None for ref in alive)
    assert not prepared.same_tensors(params)  # moved, and a parameter without one: validated again
    opt.step()
    prepared = opt._prepared[0]
    full = params[:3]
    fopt = gpuopt.Adam(full, lr=0.1)
    fopt.step()
    for p in full:
        p.grad = torch.randn_like(p)
    assert fopt._prepared[0].same_tensors(full)  # every one moved: their rows are rewritten
    for p, g in zip(params, [torch.randn_like(p) for p in full]):
        p.grad = g
    opt.step()
    prepared = opt._prepared[0]
    assert prepared.same_tensors(params)

    def misses(change, undo):
        change()
        try:
            return not prepared.same_tensors(params)
        finally:
            undo()
            assert prepared.same_tensors(params)

    g0, g1 = params[0].grad, params[1].grad

    def put(i, grad):
        return lambda: setattr(params[i], "grad", grad)

    assert misses(put(0, g0.t().contiguous().t()), put(0, g0))  # transposed (at a new address)
    assert misses(put(1, g1[:1].expand(7)), put(1, g1))  # stride 0
    assert misses(put(1, g1.to_sparse()), put(1, g1))
    assert misses(put(1, None), put(1, g1))
    assert misses(put(3, torch.randn(3, device=device)), put(3, None))
    assert misses(lambda: g1.resize_(4), lambda: g1.resize_(7))  # in place, same object and address
    assert misses(lambda: g0.as_strided_((4, 6), (1, 4)), lambda: g0.as_strided_((4, 6), (6, 1)))
    data = params[2].data
    assert misses(lambda: setattr(params[2], "data", data.clone()), lambda: setattr(params[2], "data", data))
    state = opt.state[params[1]]["exp_avg"].data
    assert misses(lambda: setattr(opt.state[params[1]]["exp_avg"], "data", state.clone()),
                  lambda: setattr(opt.state[params[1]]["exp_avg"], "data", state))
    stranger = torch.nn.Parameter(params[0].detach().clone())
    assert not prepared.same_tensors([stranger, *params[1:]])
    assert not prepared.same_tensors(params[::-1]) and not prepared.same_tensors(params[:3])
    complex_param = torch.nn.Parameter(torch.randn(5, dtype=torch.complex64, device=device))
    complex_param.grad = torch.randn_like(complex_param)
    copt = gpuopt.Adam([complex_param])
    copt.step()
    assert copt._prepared[0].same_tensors([complex_param])
    complex_param.grad = complex_param.grad.conj()  # the same memory, read conjugated
    assert not copt._prepared[0].same_tensors([complex_param])


def test_batch_norm_module_reuses_its_last_call_only_while_nothing_changed(device, monkeypatch):
    """A gpuopt batch-norm module calls its kernels directly while its last call's plan fits
    (``_batch_norm.LayerPlan``), and takes the checked path again — matching torch's module
    throughout, forward, backward and buffers — when the input's layout or shape, an option
    (eps, momentum, train/eval), a parameter or buffer (replaced, or moved through ``.data``)
    changed; a running statistic that requires grad, and a weight resized through ``.data``,
    are refused as before."""
    from gpuopt import _batch_norm

    checks = []
    original = _batch_norm.check_batch_norm_args
    monkeypatch.setattr(_batch_norm, "check_batch_norm_args", lambda *a, **k: (checks.append(1), original(*a, **k))[1])
    bn = gpuopt.nn.BatchNorm2d(6).to(device)
    ref = torch.nn.BatchNorm2d(6).to(device)
    with torch.no_grad():
        for mine, theirs in ((bn.weight, ref.weight), (bn.bias, ref.bias)):
            theirs.copy_(mine.uniform_(0.5, 1.5))

    def both(shape=(4, 6, 5, 5), memory_format=torch.contiguous_format, expect_checks=None):
        x = torch.randn(shape, device=device).to(memory_format=memory_format).requires_grad_()
        twin = x.detach().clone().requires_grad_()
        y, y_ref = bn(x), ref(twin)
        upstream = torch.randn_like(y)
        y.backward(upstream)
        y_ref.backward(upstream)
        assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        assert_close(x.grad, twin.grad, rtol=1e-4, atol=1e-4)
        for mine, theirs in ((bn.weight, ref.weight), (bn.bias, ref.bias)):
            if theirs.grad is not None:
                assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-4)
                mine.grad = theirs.grad = None
        for mine, theirs in ((bn.running_mean, ref.running_mean), (bn.running_var, ref.running_var)):
            assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
        assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item()
        if expect_checks is not None:
            assert len(checks) == expect_checks

    both(expect_checks=1)
    both(expect_checks=1)  # the plan: no checks
    plan = bn.__dict__["_gpuopt_plan"]
    assert plan.layouts is not None
    both(memory_format=torch.channels_last, expect_checks=2)  # another layout
    both(memory_format=torch.channels_last, expect_checks=2)
    both(shape=(3, 6, 5, 5), expect_checks=3)  # another shape
    for module in (bn, ref):
        module.eps = 1e-3
    both(shape=(3, 6, 5, 5), expect_checks=4)
    for module in (bn, ref):
        module.momentum = None  # the cumulative average
    both(shape=(3, 6, 5, 5), expect_checks=5)
    both(shape=(3, 6, 5, 5), expect_checks=5)
    for module in (bn, ref):
        module.eval()
    both(expect_checks=6)
    both(expect_checks=6)
    for module in (bn, ref):
        module.train()
    both(expect_checks=7)
    with torch.no_grad():
        new_weight = bn.weight.detach() * 2
    bn.weight.data = new_weight.clone()  # new storage, the same Parameter object
    ref.weight.data = new_weight.clone()
    both(expect_checks=8)
    bn.bias = torch.nn.Parameter(torch.randn(6, device=device))  # a new Parameter
    ref.bias = torch.nn.Parameter(bn.bias.detach().clone())
    both(expect_checks=9)
    bn.running_mean.data = bn.running_mean.clone()
    both(expect_checks=10)
    both(expect_checks=10)
    bn.running_mean.requires_grad_(True)
    with pytest.raises(RuntimeError, match="running_mean"):
        bn(torch.randn(4, 6, 5, 5, device=device))
    bn.running_mean.requires_grad_(False)
    both(expect_checks=11)  # the refused call changed nothing (not even the count): the plan still fits
    bn.weight.data = bn.weight.data[:3]
    with pytest.raises(ValueError, match="weight should contain 6 elements"):
        bn(torch.randn(4, 6, 5, 5, device=device))


@pytest.mark.parametrize("target", ["param", "state"])
def test_tensor_moved_through_data_is_followed(target):
    """``t.data = ...`` gives a parameter or a state new storage without changing the object or
    bumping the state's generation (how some code offloads optimizer states to the CPU and back):
    the next step sees the new address and updates the new storage, never the old one, which is
    freed (before the address compare, this wrote into freed memory and crashed the process)."""
    out = run_in_child(f"""
        params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(5, 5), (9,), (3, 4)]]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt, ref = gpuopt.Adam(params, lr=0.05), torch.optim.Adam(twins, lr=0.05)
        for p, t in zip(params, twins):
            p.grad = torch.randn_like(p)
            t.grad = p.grad.clone()
        for step in range(4):
            if step == 2:
                for ps, o in ((params, opt), (twins, ref)):
                    for p in ps:
                        if {target!r} == "param":
                            p.data = p.data.clone()
                        else:
                            for key in ("exp_avg", "exp_avg_sq", "step"):
                                o.state[p][key].data = o.state[p][key].data.clone()
            opt.step()
            ref.step()
            for p, t in zip(params, twins):
                torch.testing.assert_close(p, t, rtol=1e-5, atol=1e-6)
        assert opt.state[params[0]]["step"].item() == 4
        print("followed", opt._prepared[0].grad_addresses is not None)
    """)
    assert "followed True" in out
