"""A CuPy user's training loop, stepped by gpuopt: a two-layer MLP written in CuPy (forward and
backward by hand, no torch tensors anywhere in the user's code) on scikit-learn's digits, its
weights updated in place by gpuopt.functional.adam — one fused kernel launch for all four
weight arrays, on the caller's CuPy stream.

    python examples/cupy_adam.py

Without a GPU (or without CuPy) the same code runs on NumPy arrays, gpuopt's kernels going
through Triton's interpreter.
"""

import os

try:
    import cupy as xp

    xp.cuda.runtime.getDeviceCount()
except Exception:  # no CuPy, or no GPU: NumPy and the interpreter
    import numpy as xp

    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
from sklearn.datasets import load_digits

import gpuopt  # noqa: E402  (after TRITON_INTERPRET)

images, labels = load_digits(return_X_y=True)
X = xp.asarray(images / 16.0, dtype=xp.float32)
Y = xp.eye(10, dtype=xp.float32)[xp.asarray(labels)]
rng = np.random.default_rng(0)
params = [xp.asarray(rng.standard_normal((64, 32)) * 0.2, dtype=xp.float32), xp.zeros(32, xp.float32),
          xp.asarray(rng.standard_normal((32, 10)) * 0.2, dtype=xp.float32), xp.zeros(10, xp.float32)]
exp_avgs = [xp.zeros_like(p) for p in params]
exp_avg_sqs = [xp.zeros_like(p) for p in params]
steps = [xp.zeros(1, xp.float32) for _ in params]


def loss_and_grads(W1, b1, W2, b2, x, y):
    h = xp.maximum(x @ W1 + b1, 0.0)
    logits = h @ W2 + b2
    logits = logits - logits.max(axis=1, keepdims=True)
    p = xp.exp(logits) / xp.exp(logits).sum(axis=1, keepdims=True)
    loss = -(y * xp.log(p + 1e-9)).sum(axis=1).mean()
    d_logits = (p - y) / len(x)
    d_h = (d_logits @ W2.T) * (h > 0)
    return loss, [x.T @ d_h, d_h.sum(axis=0), h.T @ d_logits, d_logits.sum(axis=0)]


for epoch in range(5):
    order = rng.permutation(len(images))
    for first in range(0, len(order), 128):
        batch = xp.asarray(order[first:first + 128])
        loss, grads = loss_and_grads(*params, X[batch], Y[batch])
        grads = [g.astype(xp.float32) for g in grads]
        gpuopt.functional.adam(params, grads, exp_avgs, exp_avg_sqs, None, steps, lr=1e-2)  # in place
accuracy = float(((xp.maximum(X @ params[0] + params[1], 0) @ params[2] + params[3]).argmax(1)
                  == xp.asarray(labels)).mean())
print(f"{xp.__name__} arrays: {int(steps[0][0])} Adam steps, final batch loss {float(loss):.3f}, "
      f"training accuracy {accuracy:.3f}, weights still {type(params[0]).__module__.split('.')[0]} arrays")
