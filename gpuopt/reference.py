"""The seed's equations (appendix B, "Optimizing Neural Networks") as plain float64 NumPy — or CuPy.

This module is the oracle for the tests and the bench, and a page to read beside the seed. It is
deliberately slow and literal: one function per equation, in the seed's notation, no fusion.

Layout and notation follow the seed:

* optimizers work on one weight array ``W`` of any shape, element by element (the seed's ``W_j``);
* batch norm works on ``Z`` of shape ``(n, K)``: ``n`` units by a batch of ``K`` examples, so the
  statistics of unit ``i`` are taken along row ``i`` (PyTorch's ``(N, C)`` is ``Z.T``).

Functions named after a PyTorch class (``torch_sgd_step``, ``torch_adam_step``, ...) follow that
class's documented algorithm exactly, so the tests can hold the kernels to both conventions.
Every function returns new arrays and never modifies its inputs.

**On the GPU, through CuPy.** Give the functions CuPy arrays and they compute in float64 on the
GPU and return CuPy arrays: ``_f64`` keeps a CuPy array a CuPy array, NumPy's functions hand CuPy
arrays to CuPy (NEP 13/18: ``np.sqrt``, ``np.where``, ``np.zeros_like`` ... dispatch on their
arguments' type), and the few arrays made from a shape are made ``like=`` an input. The same
equations then check the kernels at GPU sizes (355M parameters, a (256, 64, 56, 56) batch norm),
where the NumPy oracle would take minutes (``tests/test_cupy.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _f64(x) -> np.ndarray:
    """A float64 copy of ``x``: a NumPy array, or a CuPy array (on its GPU) for a CuPy one."""
    if type(x).__module__.split(".")[0] == "cupy":
        return x.astype("float64", copy=True)
    return np.array(x, dtype=np.float64, copy=True)


# --------------------------------------------------------------------------------------------
# B.0.1.1 Running averages
# --------------------------------------------------------------------------------------------


def running_average_step(C_prev, c_t, gamma_t):
    """One step of the seed's running average: ``C_t = γ_t C_{t-1} + (1 - γ_t) c_t``."""
    return gamma_t * _f64(C_prev) + (1.0 - gamma_t) * _f64(c_t)


def exact_mean_gamma(t: int) -> float:
    """The schedule ``γ_t = (t - 1) / t`` (t = 1, 2, ...) that turns the running average into the
    exact mean of ``c_1 .. c_t``."""
    if t < 1:
        raise ValueError(f"t counts from 1, got {t}")
    return (t - 1) / t


def running_average(cs, gamma=None):
    """All running averages ``C_1 .. C_T`` of the sequence ``cs`` (first axis is time).

        C_0 = 0
        C_t = γ_t C_{t-1} + (1 - γ_t) c_t

    ``gamma`` a float gives the moving average with constant γ, whose closed form is
    ``C_T = Σ_t γ^{T-t} (1-γ) c_t``; ``gamma=None`` uses ``γ_t = (t-1)/t``, the exact mean.
    """
    cs = _f64(cs)
    C = np.zeros_like(cs[0])
    out = np.empty_like(cs)
    for t in range(1, cs.shape[0] + 1):
        g = exact_mean_gamma(t) if gamma is None else float(gamma)
        C = running_average_step(C, cs[t - 1], g)
        out[t - 1] = C
    return out


# --------------------------------------------------------------------------------------------
# B.0.1.2 Momentum
# --------------------------------------------------------------------------------------------


def momentum_step_v_form(W, V, grad, eta, gamma):
    """The seed's momentum, V-form::

        V_t = γ V_{t-1} + η ∇_W J(W_{t-1})
        W_t = W_{t-1} - V_t

    Returns ``(W_t, V_t)``.
    """
    V_t = gamma * _f64(V) + eta * _f64(grad)
    return _f64(W) - V_t, V_t


def momentum_step_m_form(W, M, grad, eta_prime, gamma):
    """The seed's momentum, M-form (a moving average of gradients, step η′)::

        M_t = γ M_{t-1} + (1 - γ) ∇_W J(W_{t-1})
        W_t = W_{t-1} - η′ M_t

    Equivalent to the V-form with ``η = η′ (1 - γ)`` (then ``V_t = η′ M_t``). Returns ``(W_t, M_t)``.
    """
    M_t = gamma * _f64(M) + (1.0 - gamma) * _f64(grad)
    return _f64(W) - eta_prime * M_t, M_t


def torch_sgd_step(W, grad, buf, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                   nesterov=False, maximize=False):
    """``torch.optim.SGD``, one step. ``buf`` is the momentum buffer or ``None`` before the first
    step (then ``buf = d_p``, no dampening)::

        d_p = ±g + λ W
        buf = d_p                                  (first step)
        buf = μ buf + (1 - dampening) d_p          (later steps)
        d_p = d_p + μ buf  if nesterov else buf
        W   = W - lr d_p

    With ``dampening = 0`` this is the seed's V-form with ``V = lr · buf``, ``η = lr``, ``γ = μ``.
    Returns ``(W, buf)`` (``buf`` is ``None`` when momentum is 0).
    """
    W, d_p = _f64(W), _f64(grad)
    if maximize:
        d_p = -d_p
    if weight_decay:
        d_p = d_p + weight_decay * W
    if momentum:
        buf = d_p.copy() if buf is None else momentum * _f64(buf) + (1.0 - dampening) * d_p
        d_p = d_p + momentum * buf if nesterov else buf
    else:
        buf = None
    return W - lr * d_p, buf


# --------------------------------------------------------------------------------------------
# B.0.1.3 "Adadelta" (the rest of the world: RMSprop) and PyTorch's RMSprop, Adagrad, Adadelta
# --------------------------------------------------------------------------------------------


def seed_adadelta_step(W, G, grad, eta, gamma, eps):
    """The seed's "adadelta" (RMSprop with ε inside the square root)::

        G_t = γ G_{t-1} + (1 - γ) g_t²
        W_t = W_{t-1} - η g_t / sqrt(G_t + ε)

    Returns ``(W_t, G_t)``.
    """
    g = _f64(grad)
    G_t = gamma * _f64(G) + (1.0 - gamma) * g * g
    return _f64(W) - eta * g / np.sqrt(G_t + eps), G_t


@dataclass
class RMSpropState:
    square_avg: np.ndarray
    grad_avg: np.ndarray | None = None
    momentum_buffer: np.ndarray | None = None


def torch_rmsprop_step(W, grad, state: RMSpropState | None, *, lr=1e-2, alpha=0.99, eps=1e-8,
                       weight_decay=0.0, momentum=0.0, centered=False, maximize=False,
                       eps_inside_sqrt=False):
    """``torch.optim.RMSprop``, one step (state ``None`` before the first)::

        g   = ±g + λ W
        G   = α G + (1 - α) g²
        ḡ   = α ḡ + (1 - α) g                     (centered)
        avg = sqrt(G - ḡ²) + ε                    (ε outside: PyTorch)
        avg = sqrt(G - ḡ² + ε)                    (eps_inside_sqrt: the seed)
        buf = μ buf + g / avg; W -= lr buf        (momentum > 0)
        W  -= lr g / avg                          (otherwise)

    With ``alpha=γ``, ``eps_inside_sqrt=True`` and no options this is :func:`seed_adadelta_step`.
    Returns ``(W, state)``.
    """
    W, g = _f64(W), _f64(grad)
    if state is None:
        state = RMSpropState(
            square_avg=np.zeros_like(W),
            grad_avg=np.zeros_like(W) if centered else None,
            momentum_buffer=np.zeros_like(W) if momentum > 0 else None,
        )
    if maximize:
        g = -g
    if weight_decay:
        g = g + weight_decay * W
    square_avg = alpha * _f64(state.square_avg) + (1.0 - alpha) * g * g
    grad_avg = None
    variance = square_avg
    if centered:
        grad_avg = alpha * _f64(state.grad_avg) + (1.0 - alpha) * g
        variance = square_avg - grad_avg * grad_avg
    avg = np.sqrt(variance + eps) if eps_inside_sqrt else np.sqrt(variance) + eps
    buf = None
    if momentum > 0:
        buf = momentum * _f64(state.momentum_buffer) + g / avg
        W = W - lr * buf
    else:
        W = W - lr * g / avg
    return W, RMSpropState(square_avg, grad_avg, buf)


def torch_adagrad_step(W, grad, state_sum, step, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                       eps=1e-10, maximize=False):
    """``torch.optim.Adagrad``, one step; ``step`` counts from 1 and ``state_sum`` starts at
    ``initial_accumulator_value``::

        g    = ±g + λ W
        clr  = lr / (1 + (step - 1) lr_decay)
        sum += g²
        W   -= clr g / (sqrt(sum) + ε)

    Returns ``(W, sum)``.
    """
    W, g = _f64(W), _f64(grad)
    if maximize:
        g = -g
    if weight_decay:
        g = g + weight_decay * W
    clr = lr / (1.0 + (step - 1) * lr_decay)
    state_sum = _f64(state_sum) + g * g
    return W - clr * g / (np.sqrt(state_sum) + eps), state_sum


def torch_adadelta_step(W, grad, square_avg, acc_delta, *, lr=1.0, rho=0.9, eps=1e-6,
                        weight_decay=0.0, maximize=False):
    """``torch.optim.Adadelta`` (Zeiler's ADADELTA, not the seed's), one step::

        g     = ±g + λ W
        E[g²] = ρ E[g²] + (1 - ρ) g²
        Δ     = sqrt(E[Δ²] + ε) / sqrt(E[g²] + ε) · g
        E[Δ²] = ρ E[Δ²] + (1 - ρ) Δ²
        W    -= lr Δ

    Returns ``(W, square_avg, acc_delta)``.
    """
    W, g = _f64(W), _f64(grad)
    if maximize:
        g = -g
    if weight_decay:
        g = g + weight_decay * W
    square_avg = rho * _f64(square_avg) + (1.0 - rho) * g * g
    delta = np.sqrt(_f64(acc_delta) + eps) / np.sqrt(square_avg + eps) * g
    acc_delta = rho * _f64(acc_delta) + (1.0 - rho) * delta * delta
    return W - lr * delta, square_avg, acc_delta


def lion_step(W, grad, exp_avg, *, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False):
    """Lion (Chen et al. 2023; lion-pytorch's ``Lion``), one step::

        c = β1 m + (1 - β1) g
        W = W (1 - lr λ) - lr sign(c)
        m = β2 m + (1 - β2) g

    Returns ``(W, exp_avg)``.
    """
    W, g, m = _f64(W), _f64(grad), _f64(exp_avg)
    if maximize:
        g = -g
    c = beta1 * m + (1.0 - beta1) * g
    return W * (1.0 - lr * weight_decay) - lr * np.sign(c), beta2 * m + (1.0 - beta2) * g


def lamb_step(W, grad, exp_avg, exp_avg_sq, step, *, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0,
              bias_correction=True, max_trust_ratio=None, maximize=False):
    """LAMB (You et al. 2020; apex's ``FusedLAMB`` with ``adam_w_mode=True``, no clipping), one
    step of one tensor (``step`` counts from 1)::

        m = β1 m + (1 - β1) g;   v = β2 v + (1 - β2) g²
        u = m̂ / (sqrt(v̂) + ε) + λ W        (m̂ = m / (1 - β1^t), v̂ = v / (1 - β2^t) when bias_correction)
        r = ‖W‖ / ‖u‖  (1 when either is 0; at most max_trust_ratio)
        W = W - lr r u

    Returns ``(W, exp_avg, exp_avg_sq)``.
    """
    W, g, m, v = _f64(W), _f64(grad), _f64(exp_avg), _f64(exp_avg_sq)
    if maximize:
        g = -g
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    c1, c2 = (1.0 - beta1 ** step, 1.0 - beta2 ** step) if bias_correction else (1.0, 1.0)
    u = (m / c1) / (np.sqrt(v / c2) + eps) + weight_decay * W
    w_norm, u_norm = np.linalg.norm(W.ravel()), np.linalg.norm(u.ravel())
    ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
    if max_trust_ratio is not None:
        ratio = min(ratio, max_trust_ratio)
    return W - lr * ratio * u, m, v


def lars_step(W, grad, momentum_buffer, *, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8,
              maximize=False):
    """LARS (You et al. 2017), one step of one tensor (``momentum_buffer`` ``None`` before the
    first)::

        local = tc ‖W‖ / (‖g‖ + λ ‖W‖ + ε)    (1 when ‖W‖ or ‖g‖ is 0)
        d = local (g + λ W);   buf = μ buf + d  (buf = d at the first step);   W = W - lr buf

    Returns ``(W, momentum_buffer)``.
    """
    W, g = _f64(W), _f64(grad)
    if maximize:
        g = -g
    w_norm, g_norm = np.linalg.norm(W.ravel()), np.linalg.norm(g.ravel())
    local = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps) if w_norm > 0 and g_norm > 0 else 1.0
    d = local * (g + weight_decay * W)
    buf = d if momentum_buffer is None else momentum * _f64(momentum_buffer) + d
    return W - lr * buf, buf


def muon_step(W, grad, momentum_buffer, *, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
              ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None):
    """Muon (``torch.optim.Muon``), one step of one matrix, in float64 throughout (torch runs the
    Newton–Schulz iteration in bf16)::

        B = B + (1 - μ)(g - B);   U = g + μ (B - g)  if nesterov  else  B
        X = U / max(‖U‖_F, ε)  (transposed if tall);  X = a X + (b G + c G²) X, G = X Xᵀ, ns_steps times
        W = W (1 - lr λ) - lr · s · X,  s = sqrt(max(1, A/B)), or 0.2 sqrt(max(A, B)) ("match_rms_adamw")

    Returns ``(W, momentum_buffer)``.
    """
    W, g, B = _f64(W), _f64(grad), _f64(momentum_buffer)
    B = B + (1.0 - momentum) * (g - B)
    X = g + momentum * (B - g) if nesterov else B
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / max(np.linalg.norm(X), eps)
    a, b, c = ns_coefficients
    for _ in range(ns_steps):
        G = X @ X.T
        X = a * X + (b * G + c * G @ G) @ X
    if tall:
        X = X.T
    rows, columns = W.shape
    scale = 0.2 * np.sqrt(max(rows, columns)) if adjust_lr_fn == "match_rms_adamw" else np.sqrt(max(1.0, rows / columns))
    return W * (1.0 - lr * weight_decay) - lr * scale * X, B


def adafactor_step(W, grad, state: dict, step, *, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                   weight_decay=0.0, maximize=False, eps1_dtype=np.float32):
    """Adafactor (Shazeer & Stern 2018; ``torch.optim.Adafactor``'s form), one step of one tensor
    (``step`` counts from 1). ``state``: ``{"row_var", "col_var"}`` (shapes ``[..., R, 1]`` and
    ``[..., 1, C]``) for a tensor of 2+ dims, ``{"variance"}`` otherwise; zeros at the start::

        ρ = min(lr, 1/√t);  α = max(ε2, RMS(W)) ρ;   w = t^beta2_decay
        2+ dims: r = lerp(r, mean_C g², w);  c = lerp(c, mean_R g², w);  V = r c / max(mean_R r, ε1)
        else:    V = lerp(V, g², w)
        u = g / √max(V, ε1²);   W = W (1 - lr λ) - α / max(1, RMS(u)/d) · u

    ``ε1`` ``None`` is the machine epsilon of ``eps1_dtype`` (torch: the parameter's dtype).
    Returns ``(W, state)`` (new arrays).
    """
    W, g = _f64(W), _f64(grad)
    if maximize:
        g = -g
    eps1, eps2 = eps
    eps1 = float(np.finfo(eps1_dtype).eps) if eps1 is None else eps1
    rho = min(lr, 1.0 / np.sqrt(step))
    alpha = max(eps2, np.linalg.norm(W.ravel()) / np.sqrt(max(W.size, 1))) * rho
    w = step ** beta2_decay
    W = W * (1.0 - lr * weight_decay)
    if g.ndim > 1:
        row = state["row_var"] + w * ((g * g).mean(axis=-1, keepdims=True) - state["row_var"])
        col = state["col_var"] + w * ((g * g).mean(axis=-2, keepdims=True) - state["col_var"])
        V = row * col / np.maximum(row.mean(axis=-2, keepdims=True), eps1)
        state = dict(row_var=row, col_var=col)
    else:
        V = state["variance"] + w * (g * g - state["variance"])
        state = dict(variance=V)
    u = g / np.sqrt(np.maximum(V, eps1 * eps1))
    denominator = max(1.0, np.linalg.norm(u.ravel()) / (np.sqrt(max(u.size, 1)) * d))
    return W - alpha / denominator * u, state


def schedule_free_adamw_step(y, z, grad, exp_avg_sq, *, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                             ckp1, step, maximize=False):
    """Schedule-Free AdamW (Defazio et al. 2024; the schedulefree package's ``AdamWScheduleFree``),
    one step in training mode, ``step`` counting from 1, ``lr`` the scheduled rate and ``ckp1``
    the averaging weight ``w_t / Σ w``::

        v = β2 v + (1 - β2) g²
        u = g / (sqrt(v / (1 - β2^t)) + ε) + λ y
        y = y + c (z - y) + lr (β1 (1 - c) - 1) u
        z = z - lr u

    Returns ``(y, z, exp_avg_sq)``.
    """
    y, z, g = _f64(y), _f64(z), _f64(grad)
    if maximize:
        g = -g
    v = beta2 * _f64(exp_avg_sq) + (1.0 - beta2) * g * g
    u = g / (np.sqrt(v / (1.0 - beta2 ** step)) + eps) + weight_decay * y
    return y + ckp1 * (z - y) + lr * (beta1 * (1.0 - ckp1) - 1.0) * u, z - lr * u, v


# --------------------------------------------------------------------------------------------
# B.0.1.4 Adam
# --------------------------------------------------------------------------------------------


def seed_adam_step(W, m, v, grad, t, eta, B1=0.9, B2=0.999, eps=1e-8):
    """The seed's Adam, one step (``t`` counts from 1)::

        m_t = B1 m_{t-1} + (1 - B1) g_t
        v_t = B2 v_{t-1} + (1 - B2) g_t²
        m̂_t = m_t / (1 - B1^t)
        v̂_t = v_t / (1 - B2^t)
        W_t = W_{t-1} - η m̂_t / sqrt(v̂_t + ε)

    Returns ``(W_t, m_t, v_t)``.
    """
    g = _f64(grad)
    m_t = B1 * _f64(m) + (1.0 - B1) * g
    v_t = B2 * _f64(v) + (1.0 - B2) * g * g
    m_hat = m_t / (1.0 - B1**t)
    v_hat = v_t / (1.0 - B2**t)
    return _f64(W) - eta * m_hat / np.sqrt(v_hat + eps), m_t, v_t


def bias_corrected_mean_decay(t: int, B1: float) -> float:
    """The seed's study question: m̂ is itself a running average ``m̂_t = γ_t m̂_{t-1} + (1-γ_t) g_t``
    with the time-varying decay ``γ_t = B1 (1 - B1^{t-1}) / (1 - B1^t)`` (γ_1 = 0)."""
    return B1 * (1.0 - B1 ** (t - 1)) / (1.0 - B1**t)


@dataclass
class AdamState:
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray
    max_exp_avg_sq: np.ndarray | None = None
    step: int = 0


def torch_adam_step(W, grad, state: AdamState | None, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                    weight_decay=0.0, amsgrad=False, maximize=False, decoupled_weight_decay=False,
                    eps_inside_sqrt=False):
    """``torch.optim.Adam`` (``decoupled_weight_decay=False``) or ``torch.optim.AdamW`` (``True``)::

        g  = ±g (+ λ W for Adam)
        W  = W (1 - lr λ)                                   (AdamW)
        m  = β1 m + (1 - β1) g;     v = β2 v + (1 - β2) g²
        v' = max(v'_prev, v) if amsgrad else v
        W -= lr/(1-β1^t) · m / (sqrt(v') / sqrt(1-β2^t) + ε)     (PyTorch)
        W -= lr/(1-β1^t) · m / sqrt(v' / (1-β2^t) + ε)           (eps_inside_sqrt: the seed)

    With ``eps_inside_sqrt=True`` and no options this is :func:`seed_adam_step`. Returns ``(W, state)``.
    """
    W, g = _f64(W), _f64(grad)
    b1, b2 = betas
    if state is None:
        state = AdamState(np.zeros_like(W), np.zeros_like(W), np.zeros_like(W) if amsgrad else None, 0)
    if maximize:
        g = -g
    if weight_decay:
        if decoupled_weight_decay:
            W = W * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * W
    t = state.step + 1
    exp_avg = b1 * _f64(state.exp_avg) + (1.0 - b1) * g
    exp_avg_sq = b2 * _f64(state.exp_avg_sq) + (1.0 - b2) * g * g
    max_sq = None
    second = exp_avg_sq
    if amsgrad:
        max_sq = np.maximum(_f64(state.max_exp_avg_sq), exp_avg_sq)
        second = max_sq
    bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
    if eps_inside_sqrt:
        denom = np.sqrt(second / bc2 + eps)
    else:
        denom = np.sqrt(second) / math.sqrt(bc2) + eps
    W = W - (lr / bc1) * exp_avg / denom
    return W, AdamState(exp_avg, exp_avg_sq, max_sq, t)


# --------------------------------------------------------------------------------------------
# B.0.2 Batch normalization (Z is n × K: units × batch)
# --------------------------------------------------------------------------------------------


@dataclass
class BatchNormCache:
    """What the forward pass keeps for the backward pass (per unit i: μ_i, σ_i, and Z̄)."""

    mu: np.ndarray  # (n,)
    sigma: np.ndarray  # (n,)  batchwise standard deviation, 1/K
    Z_bar: np.ndarray  # (n, K)
    eps: float
    eps_inside_sqrt: bool


def _bn_denominator(sigma, eps, eps_inside_sqrt):
    # PyTorch: sqrt(σ² + ε); the seed: σ + ε.
    return np.sqrt(sigma * sigma + eps) if eps_inside_sqrt else sigma + eps


def batch_norm_forward(Z, G=None, B=None, eps=1e-5, eps_inside_sqrt=True):
    """Batch-norm forward pass over a batch ``Z`` of shape ``(n, K)``::

        μ_i = (1/K) Σ_j Z_ij
        σ_i = sqrt((1/K) Σ_j (Z_ij - μ_i)²)
        Z̄_ij = (Z_ij - μ_i) / (σ_i + ε)            (the seed: eps_inside_sqrt=False)
        Z̄_ij = (Z_ij - μ_i) / sqrt(σ_i² + ε)       (PyTorch: eps_inside_sqrt=True)
        Ẑ_ij = G_i Z̄_ij + B_i

    ``G`` and ``B`` default to ones and zeros (``affine=False``). Returns ``(Ẑ, cache)``.
    """
    Z = _f64(Z)
    if Z.ndim != 2:
        raise ValueError(f"Z must be (n, K), got shape {Z.shape}")
    n, K = Z.shape
    G = np.ones(n, like=Z) if G is None else _f64(G)
    B = np.zeros(n, like=Z) if B is None else _f64(B)
    mu = Z.mean(axis=1)
    sigma = np.sqrt(((Z - mu[:, None]) ** 2).mean(axis=1))
    Z_bar = (Z - mu[:, None]) / _bn_denominator(sigma, eps, eps_inside_sqrt)[:, None]
    Z_hat = G[:, None] * Z_bar + B[:, None]
    return Z_hat, BatchNormCache(mu, sigma, Z_bar, eps, eps_inside_sqrt)


def batch_norm_backward(dZ_hat, cache: BatchNormCache, G=None):
    """Batch-norm backward pass: returns ``(∂L/∂Z, ∂L/∂G, ∂L/∂B)`` given ``∂L/∂Ẑ`` of shape (n, K)::

        ∂L/∂B_i = Σ_j ∂L/∂Ẑ_ij
        ∂L/∂G_i = Σ_j ∂L/∂Ẑ_ij Z̄_ij

    and ∂L/∂Z by the seed's closed form, made exact for either ε placement. The seed's final
    equation (B.0.2) is derived with ε dropped::

        ∂L/∂Z_ij = Σ_k ∂L/∂Ẑ_ik G_i (δ_jk K - 1 - Z̄_ik Z̄_ij) / (K σ_i)

    Keeping ε, write the denominator as s_i (s = σ + ε for the seed, s = sqrt(σ² + ε) for
    PyTorch). Then ∂Z̄_ik/∂Z_ij = (δ_jk - 1/K)/s - (Z_ik - μ)/s² · ∂s/∂Z_ij with
    ∂s/∂Z_ij = (Z_ij - μ)/(K r), where r = σ for the seed (∂σ/∂Z_ij = (Z_ij - μ)/(Kσ)) and r = s
    for PyTorch (∂ sqrt(σ²+ε)/∂σ = σ/s). Summing over k::

        ∂L/∂Z_ij = G_i / (K s_i) · [ K ∂L/∂Ẑ_ij - Σ_k ∂L/∂Ẑ_ik - (s_i/r_i) Z̄_ij Σ_k ∂L/∂Ẑ_ik Z̄_ik ]

    For PyTorch s/r = 1: the familiar formula. For the seed s/r = (σ + ε)/σ, which reduces to the
    seed's equation as ε → 0. A constant unit (σ = 0) has Z̄ = 0 and Z_ij - μ = 0, and the last
    term, (Z_ij - μ) Σ_k ∂L/∂Ẑ_ik (Z_ik - μ) / (K s σ), goes to 0 as σ → 0: we take it as 0, so
    the result is finite (the gradient of the 1/K-mean part alone).
    """
    dY = _f64(dZ_hat)
    n, K = dY.shape
    G = np.ones(n, like=dY) if G is None else _f64(G)
    sigma, eps, Z_bar = cache.sigma, cache.eps, cache.Z_bar
    s = _bn_denominator(sigma, eps, cache.eps_inside_sqrt)
    if cache.eps_inside_sqrt:
        s_over_r = np.ones_like(s)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            s_over_r = np.where(sigma > 0, s / np.where(sigma > 0, sigma, 1.0), 0.0)
    dB = dY.sum(axis=1)
    dG = (dY * Z_bar).sum(axis=1)
    dZ = (G / (K * s))[:, None] * (K * dY - dB[:, None] - (s_over_r * dG)[:, None] * Z_bar)
    return dZ, dG, dB


def batch_norm_backward_sum_form(dZ_hat, cache: BatchNormCache, G=None):
    """∂L/∂Z by literally summing the seed's final equation over k (O(n K²), ε dropped in the
    derivative as the seed does, i.e. the PyTorch convention's exact gradient when ε = 0).
    Kept to show the closed form above is the seed's equation, term by term."""
    dY = _f64(dZ_hat)
    n, K = dY.shape
    G = np.ones(n, like=dY) if G is None else _f64(G)
    Z_bar, sigma = cache.Z_bar, cache.sigma
    dZ = np.zeros_like(dY)
    for i in range(n):
        for j in range(K):
            total = 0.0
            for k in range(K):
                delta = 1.0 if j == k else 0.0
                total += dY[i, k] * G[i] * (delta * K - 1.0 - Z_bar[i, k] * Z_bar[i, j]) / (K * sigma[i])
            dZ[i, j] = total
    return dZ


def batch_norm_eval(Z, running_mean, running_var, G=None, B=None, eps=1e-5, eps_inside_sqrt=True):
    """Batch norm in evaluation mode: the running statistics stand in for μ and σ²::

        Ẑ_ij = G_i (Z_ij - μ̄_i) / sqrt(σ̄²_i + ε) + B_i      (PyTorch)
        Ẑ_ij = G_i (Z_ij - μ̄_i) / (sqrt(σ̄²_i) + ε) + B_i    (the seed's placement)
    """
    Z = _f64(Z)
    n = Z.shape[0]
    G = np.ones(n, like=Z) if G is None else _f64(G)
    B = np.zeros(n, like=Z) if B is None else _f64(B)
    s = _bn_denominator(np.sqrt(_f64(running_var)), eps, eps_inside_sqrt)
    return G[:, None] * (Z - _f64(running_mean)[:, None]) / s[:, None] + B[:, None]


def batch_norm_running_stats(running_mean, running_var, Z, num_batches_tracked, momentum=0.1):
    """The running statistics as ``torch.nn.BatchNorm*d`` keeps them, after one training batch.

    ``num_batches_tracked`` is the count *before* this batch. With a float ``momentum`` m::

        μ̄ = (1 - m) μ̄ + m μ                 σ̄² = (1 - m) σ̄² + m σ² K/(K-1)   (unbiased)

    With ``momentum=None`` the factor is m = 1/t (t = batches seen, this one included): the seed's
    running average with ``γ_t = 1 - m = (t-1)/t``, i.e. the exact mean of all batch statistics.
    Returns ``(running_mean, running_var, num_batches_tracked + 1)``.
    """
    Z = _f64(Z)
    K = Z.shape[1]
    t = num_batches_tracked + 1
    m = 1.0 / t if momentum is None else float(momentum)
    mu = Z.mean(axis=1)
    var_unbiased = Z.var(axis=1, ddof=1) if K > 1 else np.full(Z.shape[0], np.nan, like=Z)
    gamma = 1.0 - m
    new_mean = running_average_step(running_mean, mu, gamma)
    new_var = running_average_step(running_var, var_unbiased, gamma)
    return new_mean, new_var, t


# --------------------------------------------------------------------------------------------
# Low-bit optimizer states: quantization maps and blockwise (de)quantization
# --------------------------------------------------------------------------------------------
# A state tensor is stored as codes plus one float32 scale per block of ``block`` consecutive
# elements (the last block may be shorter): 8- and 4-bit codes index a map of 2^bits values in
# [-1, 1] (``dynamic_map``, ``linear_map``), the block's scale is its largest magnitude; fp8 codes
# are float8_e4m3fn values, the scale the block's largest magnitude over 448. The maps are the
# ones bitsandbytes and torchao index, to the bit (float32 values), so codes mean the same there.


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """The dynamic-tree quantization map (Dettmers 2015) as bitsandbytes' ``create_dynamic_map``
    defines it (torchao's for 8 and 4 bits): for each exponent ``i < max_exponent_bits``, the
    midpoints of an even grid of ``2^(i + bits - 1 - max_exponent_bits)`` intervals on [0.1, 1]
    (twice as many unsigned) scaled by ``10^(i + 1 - max_exponent_bits)``, signed: with their
    negatives; then 0 and 1. Sorted, ``2^total_bits`` values rounded to float32 (held in float64).
    The signed map has 1 but not -1.

    The values are the exact midpoints rounded once: bitsandbytes and torchao build them with
    float32 ``torch.linspace``, whose last bit depends on the CPU's vector width, so theirs can
    differ from these by an ulp or two (``tests/test_reference.py`` checks the bound)."""
    magnitude_bits = total_bits - 1

    def midpoints(intervals, exponent):
        boundaries = np.linspace(0.1, 1.0, intervals + 1)
        return (boundaries[:-1] + boundaries[1:]) / 2.0 * 10.0 ** exponent

    data = [np.zeros(1), np.ones(1)]
    for i in range(max_exponent_bits):
        intervals = 2 ** (i + magnitude_bits - max_exponent_bits) * (1 if signed else 2)
        data.append(midpoints(intervals, i + 1 - max_exponent_bits))
    extra = 2 ** (magnitude_bits - max_exponent_bits) - 1  # codes whose exponent bits are all zero
    if extra > 0:
        data.append(midpoints(extra, 0))
    if signed:
        data += [-d for d in data[2:]]
    values = np.sort(np.concatenate(data)).astype(np.float32).astype(np.float64)
    assert values.size == 2 ** total_bits, values.size
    return values


def linear_map(total_bits: int = 4) -> np.ndarray:
    """torchao's map of 4-bit second moments: ``1/2^bits, 2/2^bits, ..., 1`` — no zero (a zero
    level turns a small second moment into a division by zero; Li et al. 2023), float32 values."""
    return np.arange(1, 2 ** total_bits + 1) / 2.0 ** total_bits


def quantize_blockwise(x, qmap, block: int):
    """``(codes, absmax)``: ``x`` (flattened) in blocks of ``block`` elements (the last one
    possibly shorter), each scaled by its largest magnitude (at least 1e-12, as torchao) and
    rounded to the nearest value of the sorted map ``qmap`` (a tie to the larger), as
    bitsandbytes and torchao quantize. ``codes``: int64 indices into ``qmap``."""
    x = _f64(x).ravel()
    qmap = _f64(qmap)
    starts = np.arange(0, x.size, block)
    absmax = np.maximum(np.maximum.reduceat(np.abs(x), starts) if x.size else np.zeros(0), 1e-12)
    scaled = x / np.repeat(absmax, np.diff(np.append(starts, x.size)))
    below = np.clip(np.searchsorted(qmap, scaled, side="right") - 1, 0, qmap.size - 1)
    above = np.minimum(below + 1, qmap.size - 1)
    codes = np.where(scaled - qmap[below] >= (qmap[above] - qmap[below]) * 0.5, above, below)
    return codes, absmax


def dequantize_blockwise(codes, absmax, qmap, block: int) -> np.ndarray:
    """The values ``quantize_blockwise`` stored: ``qmap[code] × absmax`` of each element's block
    (flattened)."""
    codes = np.asarray(codes).ravel()
    return _f64(qmap)[codes] * np.repeat(_f64(absmax), block)[:codes.size]


E4M3_MAX = 448.0


def round_to_e4m3(x) -> np.ndarray:
    """``x`` rounded to float8_e4m3fn (to nearest, ties to even): 3 mantissa bits, exponents from
    -6 (below it, steps of 2^-9), at most 448 in magnitude (``x`` must not exceed it)."""
    x = _f64(x)
    _, exponent = np.frexp(x)  # |x| = m 2^exponent, m in [0.5, 1)
    quantum = np.ldexp(1.0, np.maximum(exponent - 1, -6) - 3)
    return np.round(x / quantum) * quantum


def quantize_fp8_blockwise(x, block: int):
    """``(values, scale)`` as torchao's fp8 states: per block of ``block`` elements, the scale is the
    block's largest magnitude (at least 1e-12) over 448 and the values ``x / scale`` rounded to
    float8_e4m3fn (``values`` as float64; dequantized: ``values × scale``)."""
    x = _f64(x).ravel()
    starts = np.arange(0, x.size, block)
    scale = np.maximum(np.maximum.reduceat(np.abs(x), starts) if x.size else np.zeros(0), 1e-12) / E4M3_MAX
    return round_to_e4m3(x / np.repeat(scale, np.diff(np.append(starts, x.size)))), scale
