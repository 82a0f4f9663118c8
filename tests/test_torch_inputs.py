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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,index", list(_configurations()))
def test_optim_db_configuration_matches_torch(device, name, index, dtype):
    """Four steps of each configuration on odd shapes (one channels-last): parameters and every
    state torch keeps equal torch's."""
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
