"""Memory safety: every tensor a kernel touches is checked against what the kernel assumes, and
nothing is silently wrong. Each test is a case that reached a kernel unchecked (out-of-bounds
accesses, wrong pairing of elements, wrong results) before the validation layer existed. The cases
that corrupted memory run in a child process, so a crash fails the test instead of the CI run."""

import pytest
import torch

import gpuopt

from .conftest import DEVICE
from .helpers import assert_close, run_in_child

OPTIMIZERS = [("Adam", dict(lr=0.01)), ("AdamW", dict(lr=0.01, weight_decay=0.1)),
              ("SGD", dict(lr=0.01, momentum=0.9)), ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
              ("Adagrad", dict(lr=0.01)), ("Adadelta", dict(lr=0.5))]


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
