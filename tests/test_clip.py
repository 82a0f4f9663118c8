"""gpuopt.clip_grad_norm_ / get_total_norm on plain tensors: the total norm against a float64
oracle (NumPy) and torch.nn.utils, the clipped gradients against torch's, one launch per
(device, dtype), odd shapes and layouts, non-finite gradients. (DTensor gradients:
tests/test_distributed.py.)"""

import math

import numpy as np
import pytest
import torch

import gpuopt

from .helpers import assert_close, count_launches

SHAPES = [(3, 5), (7,), (0,), (129,), (2, 3, 4), (1,)]


def oracle_norm(grads, norm_type):
    values = np.concatenate([g.detach().double().cpu().numpy().ravel() for g in grads])
    if math.isinf(norm_type):
        return np.abs(values).max(initial=0.0)
    return (np.abs(values) ** norm_type).sum() ** (1.0 / norm_type)


def params_with_grads(device, dtype, shapes=SHAPES):
    params = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]
    for p in params:
        # (unit scale: the 0.5-norm of these 176 values, ~2e4, must stay inside fp16's range, 65504)
        p.grad = torch.randn(p.shape, device=device).to(dtype)
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, 0.5, math.inf])
def test_total_norm_and_clipped_gradients_match_the_oracle_and_torch(device, dtype, norm_type):
    params = params_with_grads(device, dtype)
    grads = [p.grad.clone() for p in params]
    expected = oracle_norm(grads, norm_type)
    with count_launches(gpuopt.kernels.grad_norm, "norm_partials_kernel") as launches:
        norm = gpuopt.clip_grad_norm_(params, max_norm=1.0, norm_type=norm_type)
    assert launches["launches"] == 1  # every tensor of one dtype: one launch
    assert norm.dtype == dtype and norm.device == params[0].device and norm.dim() == 0
    assert_close(norm, torch.tensor(expected), dtype=dtype, name="total norm")
    coefficient = min(1.0, 1.0 / (float(norm) + 1e-6))
    for p, g in zip(params, grads):
        assert_close(p.grad, g.double() * coefficient, dtype=dtype, name="clipped gradient")
    # torch's own (its max norm refuses an empty tensor, which gpuopt's skips)
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params if p.numel() or not math.isinf(norm_type)]
    for q, g in zip(reference, [g for g in grads if g.numel() or not math.isinf(norm_type)]):
        q.grad = g.clone()
    theirs = torch.nn.utils.clip_grad_norm_(reference, max_norm=1.0, norm_type=norm_type)
    assert_close(norm, theirs, dtype=dtype, name="torch's total norm")


def test_mixed_dtypes_strided_and_misaligned_gradients(device):
    """One launch per dtype; a strided slice or a misaligned gradient is read from a copy; the
    norm is in the promoted dtype, as torch's."""
    storage = torch.randn(2000, device=device)
    grads = [torch.randn(33, 7, device=device).t(),                 # transposed: dense, read in place
             torch.randn(40, 40, device=device)[::2, 1::3],         # strided: read from a copy
             storage[1:301].view(torch.float32),                     # an offset of one element: fine
             torch.randn(17, device=device, dtype=torch.bfloat16),
             torch.randn(5, device=device, dtype=torch.float64)]
    with count_launches(gpuopt.kernels.grad_norm, "norm_partials_kernel") as launches:
        norm = gpuopt.get_total_norm(grads)
    assert launches["launches"] == 3
    assert norm.dtype == torch.float64
    assert_close(norm, torch.tensor(oracle_norm(grads, 2.0)), dtype=torch.float32, name="norm")
    # (torch rounds the bf16 tensor's own norm to bf16 first)
    assert_close(norm, torch.nn.utils.get_total_norm(grads), rtol=1e-3, atol=0, name="torch's norm")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients(device, bad):
    """A NaN or inf anywhere gives the norm torch gives (NaN or inf, every norm type), scales
    the gradients as torch does, and error_if_nonfinite raises before anything is scaled."""
    for norm_type in (2.0, math.inf, 1.0):
        params = params_with_grads(device, torch.float32, shapes=[(300,), (5, 5)])
        params[0].grad[123] = bad
        reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, q in zip(params, reference):
            q.grad = p.grad.clone()
        with pytest.raises(RuntimeError, match="non-finite"):
            gpuopt.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True)
        for p, q in zip(params, reference):
            assert torch.equal(p.grad.nan_to_num(), q.grad.nan_to_num())  # untouched
        norm = gpuopt.clip_grad_norm_(params, 1.0, norm_type)
        theirs = torch.nn.utils.clip_grad_norm_(reference, 1.0, norm_type)
        assert torch.equal(norm.isnan(), theirs.isnan()) and torch.equal(norm.isinf(), theirs.isinf()), norm_type
        for p, q in zip(params, reference):
            assert torch.equal(p.grad.isnan(), q.grad.isnan()), norm_type


def test_torch_signature_and_edge_cases(device):
    """A single tensor, parameters without gradients, an empty list, a generator, foreach=..."""
    p = params_with_grads(device, torch.float32, shapes=[(10,)])[0]
    no_grad = torch.nn.Parameter(torch.randn(3, device=device))
    expected = p.grad.norm()
    norm = gpuopt.clip_grad_norm_(p, max_norm=100.0, foreach=True)  # below max_norm: unchanged
    assert_close(norm, expected, name="single tensor")
    assert_close(gpuopt.clip_grad_norm_([p, no_grad], 100.0, foreach=False), expected, name="without a grad")
    assert no_grad.grad is None
    assert float(gpuopt.clip_grad_norm_([], 1.0)) == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        gpuopt.clip_grad_norm_((q for q in []), 1.0)
    # p <= 0 and -inf are torch's own (delegated), with its results
    for norm_type in (-math.inf, 0.0):
        assert_close(gpuopt.get_total_norm([p.grad], norm_type), torch.nn.utils.get_total_norm([p.grad], norm_type),
                     name=f"{norm_type}-norm")


@pytest.mark.parametrize("name,kwargs", [("AdamW", dict(lr=0.01, weight_decay=0.1)),
                                         ("SGD", dict(lr=0.1, momentum=0.9)), ("Adagrad", dict(lr=0.1))])
def test_clipping_fused_into_the_step_equals_clip_then_step(device, name, kwargs):
    """opt.clip_grad_norm_(max_norm) returns torch's norm and leaves the gradients as they are;
    the next step() applies the coefficient inside its kernel: the same parameters and states as
    torch's clip_grad_norm_ followed by torch's step. A non-finite norm skips that step (params,
    states and step counts unchanged), where torch would step with NaN gradients."""
    ours = params_with_grads(device, torch.float32)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours, theirs):
        q.grad = p.grad.clone()
    opt = getattr(gpuopt, name)(ours, **kwargs)
    ref = getattr(torch.optim, name)(theirs, **kwargs)
    for step in range(3):
        grads = [p.grad.clone() for p in ours]
        norm = opt.clip_grad_norm_(0.5)
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, grads))  # not rewritten
        assert_close(norm, torch.nn.utils.clip_grad_norm_(theirs, 0.5), name="norm")
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            assert_close(p, q, name=f"{name} parameter after step {step + 1}")
            p.grad = torch.randn_like(p) * 2
            q.grad = p.grad.clone()
    before = [p.detach().clone() for p in ours]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in ours]
    ours[0].grad[0] = float("nan")
    assert torch.isnan(opt.clip_grad_norm_(0.5))
    opt.step()
    for p, b, s in zip(ours, before, states):
        assert torch.equal(p, b)
        assert all(torch.equal(opt.state[p][k], v) for k, v in s.items())
    opt.step()  # the pending clip was used once: this step runs (with the NaN gradient, as asked)
    assert torch.isnan(ours[0]).any()
