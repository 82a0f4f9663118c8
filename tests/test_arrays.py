"""NumPy arrays in gpuopt's functional API and EMA (the DLPack path; CuPy's is tests/test_cupy.py):
updated in place with no copy, results equal to the same call on torch tensors, arrays of the
caller's kind back, clear errors before anything changes."""

import numpy as np
import pytest
import torch

import gpuopt
from gpuopt import functional as F

from .helpers import assert_close

SHAPES = [(5, 7), (33,), (2, 3, 4)]


def arrays(rng, fill=None):
    return [rng.standard_normal(s).astype(np.float32) if fill is None else np.full(s, fill, np.float32)
            for s in SHAPES]


CALLS = {  # name: (states made with fill values, call(params, grads, states, steps))
    "adam": ((0.0, 0.0), lambda p, g, s, t: F.adam(p, g, s[0], s[1], None, t, lr=0.1, weight_decay=0.01)),
    "adamw": ((0.0, 0.0), lambda p, g, s, t: F.adamw(p, g, s[0], s[1], None, t, lr=0.1)),
    "sgd": ((0.0,), lambda p, g, s, t: F.sgd(p, g, s[0], lr=0.1, momentum=0.9, state_steps=t)),
    "rmsprop": ((0.0, 0.0), lambda p, g, s, t: F.rmsprop(p, g, s[0], s[1], None, t, lr=0.01, centered=True)),
    "adagrad": ((0.0,), lambda p, g, s, t: F.adagrad(p, g, s[0], t, lr=0.1)),
    "adadelta": ((0.0, 0.0), lambda p, g, s, t: F.adadelta(p, g, s[0], s[1], t)),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_functional_optimizers_update_numpy_arrays_in_place_as_they_update_tensors(name):
    fills, call = CALLS[name]
    rng = np.random.default_rng(0)
    params, grads = arrays(rng), arrays(rng)
    states = [arrays(rng, fill) for fill in fills]
    steps = [np.zeros(1, np.float32) for _ in SHAPES]
    tensors = [torch.tensor(a) for a in params], [torch.tensor(a) for a in grads]
    tensor_states = [[torch.tensor(a) for a in role] for role in states]
    tensor_steps = [torch.zeros(1) for _ in SHAPES]
    addresses = [a.ctypes.data for a in params]
    for _ in range(2):
        call(params, grads, states, steps)
        call(*tensors, tensor_states, tensor_steps)
    assert [a.ctypes.data for a in params] == addresses and all(type(a) is np.ndarray for a in params)
    for a, t in zip(params + [s for role in states for s in role] + steps,
                    tensors[0] + [t for role in tensor_states for t in role] + tensor_steps):
        assert np.array_equal(a, t.numpy()), name  # the same kernels on the same memory


def test_batch_norm_on_numpy_arrays_returns_an_array():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 3, 4, 5)) * 2 + 3).astype(np.float32)
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    weight, bias = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    y = F.batch_norm(x, mean, var, weight, bias, training=True, momentum=0.5)
    expected_mean, expected_var = torch.zeros(3), torch.ones(3)
    expected = torch.nn.functional.batch_norm(torch.tensor(x), expected_mean, expected_var, torch.tensor(weight),
                                              torch.tensor(bias), True, 0.5)
    assert type(y) is np.ndarray and y.shape == x.shape and y.dtype == np.float32
    assert_close(torch.tensor(y), expected, rtol=1e-5, atol=1e-5, name="output")
    assert_close(torch.tensor(mean), expected_mean, name="running mean (updated in place)")
    assert_close(torch.tensor(var), expected_var, name="running var (updated in place)")
    y_eval = F.batch_norm(x, mean, var, weight, bias, training=False)
    assert type(y_eval) is np.ndarray


def test_ema_of_numpy_arrays():
    rng = np.random.default_rng(2)
    params = arrays(rng)
    ema = gpuopt.EMA(params, decay=0.75)
    assert all(type(a) is np.ndarray for a in ema.averages)
    start = [p.copy() for p in params]
    for p in params:
        p += 1.0  # the caller's arrays change in place, as a training step's would
    ema.update()
    for average, s, p in zip(ema.averages, start, params):
        assert_close(torch.tensor(average), torch.tensor(0.75 * s.astype(np.float64) + 0.25 * p), name="average")
    saved = ema.state_dict()
    targets = [np.zeros_like(p) for p in params]
    ema.copy_to(targets)
    assert all(np.array_equal(t, a) for t, a in zip(targets, ema.averages))
    other = gpuopt.EMA([p.copy() for p in params], decay=0.75)
    other.load_state_dict(saved)
    assert all(np.array_equal(a, b) for a, b in zip(other.averages, ema.averages))


def test_array_errors_are_clear_and_change_nothing():
    rng = np.random.default_rng(3)
    params, grads = arrays(rng), arrays(rng)
    exp_avgs, exp_avg_sqs = arrays(rng, 0.0), arrays(rng, 0.0)
    steps = [np.zeros(1, np.float32) for _ in SHAPES]
    params[1].flags.writeable = False
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match=r"params\[1\] is a read-only array"):
        F.adam(params, grads, exp_avgs, exp_avg_sqs, None, steps, lr=0.1)
    assert all(np.array_equal(p, b) for p, b in zip(params, before)) and not any(s.any() for s in steps)
    params[1].flags.writeable = True
    grads[0].flags.writeable = False  # a gradient is only read: fine
    F.adam(params, grads, exp_avgs, exp_avg_sqs, None, steps, lr=0.1)
    assert all(s[0] == 1 for s in steps)
    strided = [np.zeros((4, 6), np.float32)[:, ::2]]  # not dense: the kernels' rule, torch's message
    with pytest.raises(ValueError, match="not dense"):
        F.sgd(strided, [np.ones((4, 3), np.float32)], [None], lr=0.1)
    with pytest.raises(TypeError, match="not a mix"):
        gpuopt.EMA([np.zeros(3, np.float32), torch.zeros(3)])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("eps_inside_sqrt", [True, False])
def test_batch_norm_forward_and_backward_as_plain_functions_on_arrays(training, eps_inside_sqrt):
    """batch_norm_forward / batch_norm_backward (no autograd, arrays in and out) give what the
    differentiable batch_norm gives on tensors; output_mask leaves out what is not asked for."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((5, 4, 3, 3)) * 2 - 1).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    weight, bias = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    mean, var = np.full(4, 0.5, np.float32), np.full(4, 2.0, np.float32)
    running = (torch.tensor(mean), torch.tensor(var))
    y, statistics = F.batch_norm_forward(x, mean, var, weight, bias, training=training,
                                         eps_inside_sqrt=eps_inside_sqrt)
    assert type(y) is np.ndarray and (statistics is None) == (not training)
    if training:
        assert type(statistics) is np.ndarray and statistics.shape == (4, 4)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    expected = F.batch_norm(xt, *running, wt, bt, training=training, eps_inside_sqrt=eps_inside_sqrt)
    expected.backward(torch.tensor(dy))
    assert_close(torch.tensor(y), expected, rtol=1e-5, atol=1e-5, name="output")
    assert_close(torch.tensor(mean), running[0], name="running mean")
    dx, dw, db = F.batch_norm_backward(dy, x, weight, statistics, None if training else mean,
                                       None if training else var, eps_inside_sqrt=eps_inside_sqrt)
    for got, want, name in ((dx, xt.grad, "grad input"), (dw, wt.grad, "grad weight"), (db, bt.grad, "grad bias")):
        assert type(got) is np.ndarray
        assert_close(torch.tensor(got), want, rtol=1e-4, atol=1e-5, name=name)
    dx, dw, db = F.batch_norm_backward(dy, x, weight, statistics, None if training else mean,
                                       None if training else var, eps_inside_sqrt=eps_inside_sqrt,
                                       output_mask=(True, False, False))
    assert dw is None and db is None and type(dx) is np.ndarray
    if training:
        with pytest.raises(ValueError, match="statistics must be"):
            F.batch_norm_backward(dy, x, weight, statistics[:2])
