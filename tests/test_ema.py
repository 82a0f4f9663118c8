"""gpuopt.EMA and its kernel (the seed's running average over a tensor list, one launch)."""

import numpy as np
import pytest
import torch

import gpuopt
from gpuopt import reference as ref
from gpuopt.kernels import _multi_tensor as walk

from .helpers import TOLERANCES, assert_close, count_launches

# 1 element, a prime, fewer elements than a block, several blocks, a 4-D channels-last weight.
SHAPES = [(1,), (131,), (7, 3), (300,), (2, 3, 5, 7)]


def _params(device, dtype, channels_last=True):
    params = [torch.randn(s, device=device).to(dtype) for s in SHAPES]
    if channels_last:
        params[-1] = params[-1].to(memory_format=torch.channels_last)
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decay", [0.9, None])
def test_ema_matches_reference(device, dtype, decay):
    params = _params(device, dtype)
    ema = gpuopt.EMA(params, decay=decay)
    history = [[p.clone()] for p in params]  # C_0 = the initial weights
    for _ in range(6):
        for p, h in zip(params, history):
            p.copy_(torch.randn_like(p, dtype=torch.float32).to(dtype))
            h.append(p.clone())
        ema.update()
    for average, h in zip(ema.averages, history):
        cs = np.stack([x.double().cpu().numpy() for x in h])
        if decay is None:
            expected = ref.running_average(cs[1:], None)[-1]  # C_0 drops out: γ_1 = 0
        else:
            C = cs[0]
            for c in cs[1:]:
                C = ref.running_average_step(C, c, decay)
            expected = C
        rtol, atol = TOLERANCES[dtype]
        # Each of the 6 updates rounds to the storage dtype once.
        assert_close(average, expected, rtol=6 * rtol, atol=6 * atol, name=f"average {tuple(average.shape)}")
    assert ema.averages[-1].is_contiguous(memory_format=torch.channels_last)


def test_ema_is_one_launch_per_dtype_group(device):
    params = _params(device, torch.float32) + _params(device, torch.bfloat16)
    ema = gpuopt.EMA(params, decay=0.5)
    with count_launches(walk, "_step_kernel") as counter:
        ema.update()
        ema.update()
    assert counter["launches"] == 4  # two dtype groups, two updates


def test_ema_first_exact_mean_update_copies(device):
    params = _params(device, torch.float32)
    ema = gpuopt.EMA(params, decay=None)
    for p in params:
        p.add_(1.0)
    ema.update()
    for p, a in zip(params, ema.averages):
        assert torch.equal(p, a)


def test_ema_state_dict_round_trip_and_copy_to(device):
    params = _params(device, torch.float32)
    ema = gpuopt.EMA(params, decay=0.8)
    for p in params:
        p.mul_(2)
    ema.update()
    state = ema.state_dict()
    other = gpuopt.EMA([torch.zeros_like(p) for p in params], decay=0.1)
    other.load_state_dict(state)
    assert other.decay == 0.8 and other.num_updates == 1
    for a, b in zip(ema.averages, other.averages):
        assert torch.equal(a, b)
    targets = [torch.full_like(p, float("nan")) for p in params]
    ema.copy_to(targets)
    for t, a in zip(targets, ema.averages):
        assert torch.equal(t, a)


def test_ema_zero_element_parameter_is_a_no_op(device):
    params = [torch.empty(0, device=device), torch.randn(5, device=device)]
    ema = gpuopt.EMA(params, decay=0.5)
    params[1].add_(2.0)
    ema.update()
    assert_close(ema.averages[1], params[1] - 1.0, name="average")


def test_ema_bad_input():
    with pytest.raises(ValueError, match="decay"):
        gpuopt.EMA([torch.zeros(3)], decay=1.0)
    with pytest.raises(TypeError, match="floating-point"):
        gpuopt.EMA([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="empty"):
        gpuopt.EMA([])


def test_cpu_tensors_without_interpreter_get_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        gpuopt.EMA([torch.zeros(3)])
