"""The fast path (``gpuopt/_reuse.py``): what a step or a batch-norm call reuses of validated
work, and that every change it must see sends it back to the plain path (validate, plan,
launch), with results equal to torch's throughout. The plain path alone (no reuse) is tested
here too."""

import pytest
import torch

import gpuopt
from gpuopt.kernels import _multi_tensor as walk

from .helpers import assert_close, count_launches, run_in_child
from .test_memory_safety import OPTIMIZERS

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
    (``_batch_norm.ModulePlan``), and takes the checked path again — matching torch's module
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
