"""What a CuPy user would write: the AdamW step and batch norm (forward + closed-form backward) as
hand-written CUDA C through ``cupy.ElementwiseKernel`` / ``cupy.ReductionKernel``, one launch per
tensor (the optimizer) or per pass (batch norm). An alternative row of both suites on a GPU with
CuPy installed, so Triton is compared with CUDA C in the same run. The tensors are the suites' own
(torch), seen by CuPy through DLPack on the same memory and the same (default) stream.
"""

from __future__ import annotations

import functools

import torch


def available(gpu: bool) -> bool:
    if not gpu:
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _kernels():
    import cupy

    adamw = cupy.ElementwiseKernel(
        "T g, float32 lr, float32 beta1, float32 beta2, float32 eps, float32 weight_decay, float32 bc1, float32 bc2",
        "T p, T m, T v",
        """
        float grad = (float)g;
        float w = (float)p * (1.0f - lr * weight_decay);
        float m_t = beta1 * (float)m + (1.0f - beta1) * grad;
        float v_t = beta2 * (float)v + (1.0f - beta2) * grad * grad;
        p = (T)(w - lr / bc1 * m_t / (sqrtf(v_t) / sqrtf(bc2) + eps));
        m = (T)m_t;
        v = (T)v_t;
        """, "gpuopt_bench_adamw")
    total = cupy.ReductionKernel("T x", "float32 y", "(float)x", "a + b", "y = a", "0", "gpuopt_bench_sum")
    squares = cupy.ReductionKernel("T x, float32 mean", "float32 y", "((float)x - mean) * ((float)x - mean)",
                                   "a + b", "y = a", "0", "gpuopt_bench_squares")
    products = cupy.ReductionKernel("T dy, T x, float32 mean", "float32 y", "(float)dy * ((float)x - mean)",
                                    "a + b", "y = a", "0", "gpuopt_bench_products")
    normalize = cupy.ElementwiseKernel(
        "T x, float32 mean, float32 invstd, float32 weight, float32 bias", "T y",
        "y = (T)(((float)x - mean) * invstd * weight + bias)", "gpuopt_bench_normalize")
    input_grad = cupy.ElementwiseKernel(
        "T dy, T x, float32 mean, float32 invstd, float32 weight, float32 mean_dy, float32 projection", "T dx",
        "dx = (T)(weight * invstd * ((float)dy - mean_dy - ((float)x - mean) * projection))", "gpuopt_bench_dx")
    return adamw, total, squares, products, normalize, input_grad


class AdamW:
    """``torch.optim.AdamW``'s step, one ``ElementwiseKernel`` launch per tensor (fp32 or fp16)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        import cupy

        self.lr, self.betas, self.eps, self.weight_decay, self.t = lr, betas, eps, weight_decay, 0
        self.params = [cupy.from_dlpack(p.detach()) for p in params]
        self.grads = [cupy.from_dlpack(p.grad) for p in params]
        self.exp_avgs = [cupy.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [cupy.zeros_like(p) for p in self.params]

    def step(self):
        adamw = _kernels()[0]
        self.t += 1
        beta1, beta2 = self.betas
        bc1, bc2 = 1 - beta1 ** self.t, 1 - beta2 ** self.t
        for p, g, m, v in zip(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs):
            adamw(g, self.lr, beta1, beta2, self.eps, self.weight_decay, bc1, bc2, p, m, v)


class _BatchNorm(torch.autograd.Function):
    """Training batch norm in CuPy kernels: Σx, Σ(x-μ)² (two reductions), normalize; backward
    Σdy, Σdy(x-μ) (two reductions) and the closed-form input gradient. Any layout: the kernels
    index through the input's strides."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        import cupy

        _, total, squares, _, normalize, _ = _kernels()
        xa = cupy.from_dlpack(x.detach())
        axes = (0,) + tuple(range(2, xa.ndim))
        shape = (1, xa.shape[1]) + (1,) * (xa.ndim - 2)
        count = xa.size // xa.shape[1]
        mean = total(xa, axis=axes) / count
        var = squares(xa, mean.reshape(shape), axis=axes) / count
        invstd = 1.0 / cupy.sqrt(var + eps)
        w, b = cupy.from_dlpack(weight.detach()), cupy.from_dlpack(bias.detach())
        y = normalize(xa, mean.reshape(shape), invstd.reshape(shape), w.reshape(shape), b.reshape(shape))
        rm, rv = cupy.from_dlpack(running_mean), cupy.from_dlpack(running_var)
        rm *= 1 - momentum
        rm += momentum * mean
        rv *= 1 - momentum
        rv += momentum * var * count / max(count - 1, 1)
        ctx.save_for_backward(x, weight)
        ctx.cupy = (mean, invstd, shape, axes, count)
        return torch.from_dlpack(y)

    @staticmethod
    def backward(ctx, dy):
        import cupy

        _, total, _, products, _, input_grad = _kernels()
        x, weight = ctx.saved_tensors
        mean, invstd, shape, axes, count = ctx.cupy
        xa, dya, w = cupy.from_dlpack(x.detach()), cupy.from_dlpack(dy), cupy.from_dlpack(weight.detach())
        sum_dy = total(dya, axis=axes)
        sum_dy_xmu = products(dya, xa, mean.reshape(shape), axis=axes)
        dx = input_grad(dya, xa, mean.reshape(shape), invstd.reshape(shape), w.reshape(shape),
                        (sum_dy / count).reshape(shape), (invstd * invstd * sum_dy_xmu / count).reshape(shape))
        return (torch.from_dlpack(dx), torch.from_dlpack(sum_dy_xmu * invstd), torch.from_dlpack(sum_dy), None, None,
                None, None)


def batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """``F.batch_norm``'s signature, for the bench's timing loop; training only (its two rows)."""
    if not training:
        raise ValueError("the CuPy baseline times training batch norm")
    return _BatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps)


def supports(dtype: torch.dtype) -> bool:
    """CuPy has no bfloat16."""
    return dtype in (torch.float32, torch.float16)


__all__ = ["AdamW", "available", "batch_norm", "supports"]
