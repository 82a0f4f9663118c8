"""Stochastic rounding draws fresh noise on every step, for every algorithm, also those without a
``step`` state (SGD without momentum, a step-less algorithm such as sign-SGD): the noise's epoch is
then a launch count kept on the device. Each element of a bf16 parameter reset to 1.0 before every
step must round down with the probability that makes the rounding unbiased, step after step."""

import pytest
import torch

import gpuopt

from .conftest import DEVICE
from .test_architecture import SignSGD

ULP = 2.0**-8  # bf16 spacing just below 1.0
OPTIMIZERS = {
    "SGD": lambda ps: gpuopt.SGD(ps, lr=1.0, stochastic_rounding=True),
    "SGD momentum": lambda ps: gpuopt.SGD(ps, lr=1.0, momentum=0.0 + 1e-30, stochastic_rounding=True),
    "SignSGD": lambda ps: SignSGD(ps, lr=1e-3, stochastic_rounding=True),
    "AdamW": lambda ps: gpuopt.AdamW(ps, lr=1e-3, weight_decay=0.0, stochastic_rounding=True),
}


def _outcomes(name, steps, n=256):
    """The parameter after each of ``steps`` steps, each from 1.0 with the same gradient."""
    p = torch.nn.Parameter(torch.ones(n, device=DEVICE, dtype=torch.bfloat16))
    opt = OPTIMIZERS[name]([p])
    g = torch.full((n,), 1e-3, device=DEVICE, dtype=torch.bfloat16)
    rows = []
    for _ in range(steps):
        with torch.no_grad():
            p.fill_(1.0)
        p.grad = g.clone()
        opt.step()
        rows.append(p.detach().double().clone())
    return torch.stack(rows), 1.0 - g[0].double().item() if name.startswith("SGD") else 1.0 - 1e-3


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_step_draws_fresh_noise(name):
    rows, _ = _outcomes(name, 3)
    moved = [set(torch.nonzero(row < 1.0).flatten().tolist()) for row in rows]
    assert all(moved), moved
    assert moved[0] != moved[1] and moved[1] != moved[2] and moved[0] != moved[2]


@pytest.mark.parametrize("name", ["SGD", "SignSGD", "AdamW"])
def test_rounding_is_unbiased_per_element_over_200_steps(name):
    rows, expected = _outcomes(name, 200)
    assert set(rows.unique().tolist()) <= {1.0, 1.0 - ULP}
    q = (1.0 - expected) / ULP  # the probability of rounding down
    standard_error = ULP * (q * (1 - q) / rows.shape[0]) ** 0.5
    deviation = (rows.mean(0) - expected).abs()
    assert deviation.max().item() < 5 * standard_error, (deviation.max().item(), standard_error)
    assert abs(rows.mean().item() - expected) < 5 * standard_error / rows.shape[1] ** 0.5
