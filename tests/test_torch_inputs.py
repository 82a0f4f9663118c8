"""PyTorch's own optimizer test inputs against gpuopt: every configuration ``optim_db`` lists for
the six optimizers gpuopt provides (the CUDA list: tensor lr, tensor betas, capturable, ...), and
every error input, must give torch's result or torch's error. Needs ``expecttest`` (a test
extra), which torch's testing package imports."""

import copy

import pytest
import torch

import gpuopt

from .helpers import assert_close

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")

NAMES = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta")
OPTIM_INFOS = {info.name: info for info in common_optimizers.optim_db if info.name in NAMES}

# A vector, a matrix, a channels-last conv weight, one element.
SHAPES = [(11,), (5, 7), (4, 3, 3, 2), (1,)]
STEPS = 4


def _configurations():
    for name in NAMES:
        for index, optim_input in enumerate(OPTIM_INFOS[name].optim_inputs_func(device="cuda", dtype=torch.float32)):
            yield pytest.param(name, index, id=f"{name}-{optim_input.desc.replace(' ', '_')}")


def _inputs(name, index):
    return OPTIM_INFOS[name].optim_inputs_func(device="cuda", dtype=torch.float32)[index]


def _torch_kwargs(kwargs, device):
    """torch's reference runs its default implementation; ``capturable`` needs a GPU in torch (it
    selects an implementation, not different math), so it is dropped on the CPU."""
    kwargs = copy.deepcopy(kwargs)
    if device.type != "cuda":
        kwargs.pop("capturable", None)
    return kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64], ids=["fp32", "fp64", "complex64"])
@pytest.mark.parametrize("name,index", list(_configurations()))
def test_optim_db_configuration_matches_torch(device, name, index, dtype):
    """Four steps of each configuration on odd shapes (one channels-last): parameters and every
    state torch keeps equal torch's. Complex parameters are updated as (re, im) pairs, as torch's
    optimizers do."""
    kwargs = _inputs(name, index).kwargs
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in SHAPES]
    params[2].data = params[2].data.to(memory_format=torch.channels_last)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = getattr(gpuopt, name)(params, **copy.deepcopy(kwargs))
    ref = getattr(torch.optim, name)(twins, **_torch_kwargs(kwargs, device))
    # float64 is float64 end to end (hyperparameters included): torch's results to ~1e-12. With
    # float32 *tensor* hyperparameters torch forms e.g. lr / (1 - β1^t) as a float32 tensor, so it
    # is the one rounding there (gpuopt reads the tensor's value and goes on in float64).
    tensor_options = any(isinstance(v, torch.Tensor) for v in kwargs.values()) or any(
        isinstance(b, torch.Tensor) for b in kwargs.get("betas", ()))
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 and not tensor_options else (2e-5, 2e-6)
    for _ in range(STEPS):
        for p, t in zip(params, twins):
            g = torch.randn_like(p)
            p.grad, t.grad = g, g.clone()
        opt.step()
        ref.step()
    for i, (p, t) in enumerate(zip(params, twins)):
        assert_close(p, t, rtol=rtol, atol=atol, name=f"{name} param {i}")
        for key, value in ref.state[t].items():
            if key == "step":
                assert float(opt.state[p]["step"]) == float(value), f"{name} step of param {i}"
            elif isinstance(value, torch.Tensor):
                assert_close(opt.state[p][key], value, rtol=rtol, atol=atol, name=f"{name} state {key} of {i}")


def _error_inputs():
    for name in NAMES:
        for index, error_input in enumerate(OPTIM_INFOS[name].optim_error_inputs_func(device="cpu",
                                                                                     dtype=torch.float32)):
            yield pytest.param(name, index, id=f"{name}-{index}-{error_input.optimizer_error_input.desc[:40]}")


@pytest.mark.parametrize("name,index", list(_error_inputs()))
def test_optim_db_error_input_raises_torchs_error(device, name, index):
    """Each of torch's error inputs: the same exception type and message, at the same point
    (construction or step), and the parameters untouched."""
    error_input = OPTIM_INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)[index]
    optim_input = error_input.optimizer_error_input
    params = optim_input.params
    if isinstance(params, torch.Tensor) and params.device.type == "cpu" and device.type == "cuda":
        params = params.to(device)
    on_step = error_input.error_on == common_optimizers.OptimizerErrorEnum.STEP_ERROR
    if issubclass(error_input.error_type, Warning):
        # torch warns of a parameter listed twice and steps it twice; gpuopt gives the same
        # warning and then refuses (one launch would update the tensor twice at once: a race).
        with pytest.warns(error_input.error_type, match=error_input.error_regex), \
                pytest.raises(ValueError, match="same parameter twice"):
            getattr(gpuopt, name)(params, **optim_input.kwargs)
        return
    with pytest.raises(error_input.error_type, match=error_input.error_regex):
        with torch.no_grad():
            opt = getattr(gpuopt, name)(params, **optim_input.kwargs)
        if on_step:
            opt.step()


SPARSE_CASES = [("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
                ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
                ("SGD", dict(lr=0.1, momentum=0.5, dampening=0.3)),
                ("Adagrad", dict(lr=0.1)), ("Adagrad", dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.2))]


@pytest.mark.parametrize("name,kwargs", SPARSE_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SPARSE_CASES)])
def test_sparse_gradients_where_torch_takes_them(device, name, kwargs):
    """An ``nn.Embedding(sparse=True)`` (sparse gradients, repeated indices): SGD and Adagrad give
    torch's results (gpuopt densifies the gradient). SGD with weight decay, which torch's sparse
    path cannot run, gives torch's result on the dense gradient."""
    embedding = torch.nn.Embedding(13, 5, sparse=True).to(device)
    twin = torch.nn.Embedding(13, 5, sparse=True).to(device)
    twin.load_state_dict(embedding.state_dict())
    opt = getattr(gpuopt, name)(embedding.parameters(), **kwargs)
    ref = getattr(torch.optim, name)(twin.parameters(), **kwargs)
    for _ in range(4):
        index = torch.randint(0, 13, (9,), device=device)  # repeats: the sparse grad sums them
        weights = torch.randn(9, 5, device=device)
        for module, optimizer in ((embedding, opt), (twin, ref)):
            optimizer.zero_grad()
            (module(index) * weights).sum().backward()
            assert module.weight.grad.is_sparse
            if optimizer is ref and kwargs.get("weight_decay"):
                # torch's SGD fails here (add(sparse, dense)); gpuopt's result is torch's on the dense gradient
                module.weight.grad = module.weight.grad.to_dense()
            optimizer.step()
        assert_close(embedding.weight, twin.weight, rtol=2e-5, atol=2e-6, name=name)
    for key, value in ref.state[twin.weight].items():
        if isinstance(value, torch.Tensor) and key != "step":
            assert_close(opt.state[embedding.weight][key], value.to_dense(), rtol=2e-5, atol=2e-6, name=key)


@pytest.mark.parametrize("name,kwargs,message", [
    ("Adagrad", dict(weight_decay=0.1), "weight_decay option is not compatible with sparse gradients"),
    ("Adam", {}, "Adam does not support sparse gradients"), ("AdamW", {}, "AdamW does not support sparse gradients"),
    ("RMSprop", {}, "RMSprop does not support sparse gradients"),
    ("Adadelta", {}, "Adadelta does not support sparse gradients")])
def test_sparse_gradients_refused_where_torch_refuses_them(device, name, kwargs, message):
    embedding = torch.nn.Embedding(7, 3, sparse=True).to(device)
    before = embedding.weight.detach().clone()
    opt = getattr(gpuopt, name)(embedding.parameters(), **kwargs)
    embedding(torch.tensor([1, 4, 1], device=device)).sum().backward()
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    with pytest.raises(RuntimeError, match=message.replace("AdamW", "Adam")):  # torch's AdamW says "Adam"
        _torch_step_with_sparse_grad(name, kwargs, before)
    assert torch.equal(embedding.weight, before)


def _torch_step_with_sparse_grad(name, kwargs, weight):
    twin = torch.nn.Embedding(7, 3, sparse=True).to(weight.device)
    ref = getattr(torch.optim, name)(twin.parameters(), **kwargs)
    twin(torch.tensor([1, 4, 1], device=weight.device)).sum().backward()
    ref.step()


# ------------------------------------------------- beyond torch's inputs, as test_optim.py checks ---


def test_named_parameters_and_param_names_round_trip(device):
    """``named_parameters()`` as torch accepts it (torch ≥ 2.6): the names are kept in the groups and
    the state_dict, and a checkpoint moves between torch and gpuopt."""
    model = torch.nn.Linear(4, 3).to(device)
    twin = copy.deepcopy(model)
    opt, ref = gpuopt.AdamW(model.named_parameters(), lr=0.01), torch.optim.AdamW(twin.named_parameters(), lr=0.01)
    assert opt.param_groups[0]["param_names"] == ref.param_groups[0]["param_names"] == ["weight", "bias"]
    x = torch.randn(5, 4, device=device)
    for module, optimizer in ((model, opt), (twin, ref)):
        module(x).square().sum().backward()
        optimizer.step()
    assert_close(model.weight, twin.weight, rtol=2e-5, atol=2e-6)
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]
    ref.load_state_dict(opt.state_dict())
    opt.load_state_dict(ref.state_dict())


def test_state_dict_and_load_hooks_run_as_in_torch(device):
    """state_dict pre/post hooks and load_state_dict pre/post hooks (torch's Optimizer API): called,
    in order, and a pre-load hook may edit what is loaded."""
    p = torch.nn.Parameter(torch.randn(6, device=device))
    opt = gpuopt.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn_like(p)
    opt.step()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd pre"))
    opt.register_state_dict_post_hook(lambda o, sd: (calls.append("sd post"), sd)[1])

    def edit(o, sd):
        calls.append("load pre")
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.5
        return sd

    opt.register_load_state_dict_pre_hook(edit)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["sd pre", "sd post", "load pre", "load post"]
    assert opt.param_groups[0]["lr"] == 0.5


def test_loaded_groups_without_newer_keys_get_the_defaults(device):
    """A checkpoint whose groups lack keys added in later versions (foreach, maximize,
    differentiable, fused, capturable): loaded as torch loads it, the defaults fill in, steps run."""
    params = [torch.nn.Parameter(torch.randn(5, device=device)) for _ in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = gpuopt.Adam(params, lr=0.01), torch.optim.Adam(twins, lr=0.01)
    for p, t in zip(params, twins):
        p.grad = torch.randn_like(p)
        t.grad = p.grad.clone()
    opt.step()
    ref.step()
    state = ref.state_dict()
    for key in ("foreach", "maximize", "differentiable", "fused", "capturable"):
        del state["param_groups"][0][key]
    opt.load_state_dict(state)
    ref.load_state_dict(state)
    for _ in range(2):
        opt.step()
        ref.step()
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=2e-5, atol=2e-6)
    assert opt.param_groups[0]["maximize"] is False


@pytest.mark.parametrize("name,kwargs,make_scheduler", [
    ("Adam", dict(lr=0.01), lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10)),
    ("AdamW", dict(lr=0.01), lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10,
                                                                            three_phase=True)),
    ("SGD", dict(lr=0.01, momentum=0.9), lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.001, 0.05, step_size_up=3)),
    ("RMSprop", dict(lr=0.01, momentum=0.9), lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05,
                                                                                          total_steps=10)),
], ids=["Adam-OneCycle", "AdamW-OneCycle3", "SGD-Cyclic", "RMSprop-OneCycle"])
def test_schedulers_that_edit_betas_and_momentum(device, name, kwargs, make_scheduler):
    """OneCycleLR and CyclicLR change ``lr`` and also ``betas`` / ``momentum`` every step: the
    next step uses them, as torch's."""
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in ((7,), (2, 3))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = getattr(gpuopt, name)(params, **kwargs), getattr(torch.optim, name)(twins, **kwargs)
    schedulers = [make_scheduler(opt), make_scheduler(ref)]
    for _ in range(8):
        for p, t in zip(params, twins):
            p.grad = torch.randn_like(p)
            t.grad = p.grad.clone()
        opt.step()
        ref.step()
        for scheduler in schedulers:
            scheduler.step()
        for p, t in zip(params, twins):
            assert_close(p, t, rtol=2e-5, atol=2e-6)


def test_add_param_group_mid_run(device):
    """A group added after some steps (fine-tuning unfreezes a layer) steps from fresh states, as
    torch's; the old group keeps its states."""
    first, second = (torch.nn.Parameter(torch.randn(6, device=device)) for _ in range(2))
    twins = [torch.nn.Parameter(t.detach().clone()) for t in (first, second)]
    opt, ref = gpuopt.Adam([first], lr=0.01), torch.optim.Adam([twins[0]], lr=0.01)
    for step in range(5):
        if step == 2:
            opt.add_param_group({"params": [second], "lr": 0.05})
            ref.add_param_group({"params": [twins[1]], "lr": 0.05})
        for p, t in zip((first, second), twins):
            p.grad = torch.randn_like(p)
            t.grad = p.grad.clone()
        opt.step()
        ref.step()
        for p, t in zip((first, second), twins):
            assert_close(p, t, rtol=2e-5, atol=2e-6)
    assert float(opt.state[second]["step"]) == 3.0


@pytest.mark.parametrize("name", NAMES)
def test_transposed_and_channels_last_parameters(device, name):
    """Parameters in any dense layout (a transposed matrix, a channels-last conv weight, a permuted
    3-D tensor) with gradients in the same or another layout: torch's results."""
    shapes_layouts = [torch.randn(6, 4, device=device).t(), torch.randn(3, 2, 4, 5, device=device).to(
        memory_format=torch.channels_last), torch.randn(2, 3, 4, device=device).permute(2, 0, 1)]
    params = [torch.nn.Parameter(t) for t in shapes_layouts]
    twins = [torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format)) for p in params]
    assert not params[0].is_contiguous() and params[0].stride() == twins[0].stride()
    kwargs = dict(lr=0.01) if name != "Adadelta" else {}
    opt, ref = getattr(gpuopt, name)(params, **kwargs), getattr(torch.optim, name)(twins, **kwargs)
    for step in range(3):
        for p, t in zip(params, twins):
            g = torch.randn(p.shape, device=device)  # contiguous: another layout than the parameter's
            p.grad, t.grad = g, g.clone()
        opt.step()
        ref.step()
    for p, t in zip(params, twins):
        assert_close(p, t, rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------- batch_norm's OpInfo samples ---


def _batch_norm_samples():
    from torch.testing._internal.common_methods_invocations import op_db

    info = next(op for op in op_db if op.name == "nn.functional.batch_norm" and op.variant_test_name == "")
    return info, len(list(info.sample_inputs("cpu", torch.float32, requires_grad=True)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("index", range(_batch_norm_samples()[1]))
def test_batch_norm_opinfo_sample_matches_torch(device, index, dtype):
    """Every OpInfo sample of ``nn.functional.batch_norm`` (training and eval, with and without
    weight, bias and running stats, 0-element and one-channel inputs, negative momentum): output,
    running statistics and every gradient equal torch's."""
    info = _batch_norm_samples()[0]
    sample = list(info.sample_inputs(device, dtype, requires_grad=True))[index]

    def cloned(t):
        return t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t

    ours = [cloned(sample.input)] + [cloned(a) for a in sample.args]
    theirs = [cloned(sample.input)] + [cloned(a) for a in sample.args]
    out = gpuopt.functional.batch_norm(*ours, **sample.kwargs)
    expected = torch.nn.functional.batch_norm(*theirs, **sample.kwargs)
    tolerance = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    assert_close(out, expected, name="output", **tolerance)
    for mine, reference, what in zip(ours[1:3], theirs[1:3], ("running_mean", "running_var")):
        if isinstance(reference, torch.Tensor):
            assert_close(mine, reference, name=what, **tolerance)
    if out.requires_grad and out.numel():
        grad = torch.randn_like(out)
        wrt = [(m, t) for m, t in zip(ours, theirs) if isinstance(m, torch.Tensor) and m.requires_grad]
        mine = torch.autograd.grad(out, [m for m, _ in wrt], grad, allow_unused=True)
        reference = torch.autograd.grad(expected, [t for _, t in wrt], grad, allow_unused=True)
        for a, b in zip(mine, reference):
            if b is not None:
                assert_close(a, b, name="gradient", **(dict(rtol=1e-8, atol=1e-10) if dtype == torch.float64
                                                       else dict(rtol=1e-4, atol=1e-5)))
