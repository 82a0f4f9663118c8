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
    # fp64 is computed in fp32 by gpuopt's kernels (README): compare at fp32's tolerance there.
    rtol, atol = (2e-5, 2e-6)
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
