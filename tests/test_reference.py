"""Tests of the oracle itself: the seed's study questions, finite differences, and PyTorch (float64)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gpuopt import reference as ref

from .helpers import assert_close

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)


# ---------------------------------------------------------------- B.0.1.1 running averages ----

@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30).flatmap(lambda T: arrays(np.float64, (T, 3), elements=finite)))
def test_exact_mean_schedule_gives_the_mean(cs):
    """Study question: γ_t = (t-1)/t makes C_t the average of c_1..c_t."""
    C = ref.running_average(cs, gamma=None)
    expected = np.cumsum(cs, axis=0) / np.arange(1, cs.shape[0] + 1)[:, None]
    assert_close(C, expected, rtol=1e-12, atol=1e-9, name="C_t")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 25).flatmap(lambda T: arrays(np.float64, (T, 2), elements=finite)),
       st.floats(0.0, 0.999))
def test_constant_gamma_closed_form(cs, gamma):
    """C_T = Σ_t γ^{T-t} (1-γ) c_t (the seed's expansion, C_0 = 0)."""
    T = cs.shape[0]
    weights = gamma ** (T - np.arange(1, T + 1)) * (1 - gamma)
    expected = (weights[:, None] * cs).sum(axis=0)
    assert_close(ref.running_average(cs, gamma)[-1], expected, rtol=1e-10, atol=1e-9, name="C_T")


def test_exact_mean_gamma_rejects_t0():
    with pytest.raises(ValueError):
        ref.exact_mean_gamma(0)


# ---------------------------------------------------------------- B.0.1.2 momentum ------------

@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, 5, elements=st.floats(-3, 3)), st.floats(0.0, 0.99), st.floats(1e-3, 0.5))
def test_momentum_forms_are_equivalent(W0, gamma, eta_prime):
    """Study question: V-form with η = η′(1-γ) and M-form with η′ give the same trajectory
    (gradients are taken at the current W of each run, on J(W) = Σ a W² + b sin W)."""
    a = np.linspace(0.5, 2.0, W0.size)

    def grad(W):
        return 2 * a * W + 0.3 * np.cos(W)

    Wv, V = W0.copy(), np.zeros_like(W0)
    Wm, M = W0.copy(), np.zeros_like(W0)
    for _ in range(25):
        Wv, V = ref.momentum_step_v_form(Wv, V, grad(Wv), eta_prime * (1 - gamma), gamma)
        Wm, M = ref.momentum_step_m_form(Wm, M, grad(Wm), eta_prime, gamma)
        assert_close(V, eta_prime * M, rtol=1e-9, atol=1e-12, name="V = η′M")
    assert_close(Wv, Wm, rtol=1e-9, atol=1e-12, name="W")


def test_larger_gamma_averages_over_more_steps():
    """Study question (γ = 0.1 vs 0.9): after an alternating gradient sequence, momentum with
    γ = 0.9 has cancelled far more of the oscillation than γ = 0.1."""
    grads = np.array([1.0, -1.0] * 20)
    amplitude = {}
    for gamma in (0.1, 0.9):
        M = 0.0
        for g in grads:
            _, M = ref.momentum_step_m_form(0.0, M, g, 1.0, gamma)
        amplitude[gamma] = abs(float(M))
    assert amplitude[0.9] < 0.1 < amplitude[0.1]


# ---------------------------------------------------------------- B.0.1.4 Adam: m̂ ------------

@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, (20, 3), elements=st.floats(-5, 5)), st.floats(0.5, 0.99))
def test_bias_corrected_mean_is_a_running_average(grads, B1):
    """Study question: m̂_t is a running average of g with decay γ_t = B1(1-B1^{t-1})/(1-B1^t)."""
    m, m_hat_running = np.zeros(3), np.zeros(3)
    for t, g in enumerate(grads, start=1):
        m = B1 * m + (1 - B1) * g
        m_hat_running = ref.running_average_step(m_hat_running, g, ref.bias_corrected_mean_decay(t, B1))
        assert_close(m_hat_running, m / (1 - B1**t), rtol=1e-9, atol=1e-12, name=f"m̂_{t}")


def test_seed_forms_are_the_torch_forms_with_eps_inside_sqrt():
    rng = np.random.default_rng(0)
    W, grads = rng.normal(size=7), rng.normal(size=(10, 7))
    W1, G = W.copy(), np.zeros(7)
    W2, s2 = W.copy(), None
    W3, m, v = W.copy(), np.zeros(7), np.zeros(7)
    W4, s4 = W.copy(), None
    for t, g in enumerate(grads, start=1):
        W1, G = ref.seed_adadelta_step(W1, G, g, 0.01, 0.9, 1e-8)
        W2, s2 = ref.torch_rmsprop_step(W2, g, s2, lr=0.01, alpha=0.9, eps=1e-8, eps_inside_sqrt=True)
        W3, m, v = ref.seed_adam_step(W3, m, v, g, t, 0.01)
        W4, s4 = ref.torch_adam_step(W4, g, s4, lr=0.01, eps_inside_sqrt=True)
    assert_close(W1, W2, rtol=1e-12, name="seed adadelta vs RMSprop(eps_inside_sqrt)")
    assert_close(W3, W4, rtol=1e-12, name="seed Adam vs Adam(eps_inside_sqrt)")


# ---------------------------------------------------------------- PyTorch optimizers, float64 --

def _torch_run(opt_cls, kwargs, W0, grads):
    p = torch.nn.Parameter(torch.tensor(W0))
    opt = opt_cls([p], **kwargs)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    return p.detach().numpy()


OPT_CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True)),
    ("Adam", dict(lr=0.01, maximize=True, eps=1e-3)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01, alpha=0.9, maximize=True, momentum=0.9)),
    ("Adagrad", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.3, maximize=True)),
    ("Adadelta", dict()),
    ("Adadelta", dict(lr=0.5, rho=0.8, weight_decay=0.1, maximize=True)),
]


def reference_run(name, kwargs, W0, grads):
    """The reference's version of torch.optim.<name>(**kwargs) over the gradient sequence."""
    kw = dict(kwargs)
    W = W0.copy()
    if name == "SGD":
        buf = None
        for g in grads:
            W, buf = ref.torch_sgd_step(W, g, buf, **kw)
    elif name in ("Adam", "AdamW"):
        state = None
        for g in grads:
            W, state = ref.torch_adam_step(W, g, state, decoupled_weight_decay=name == "AdamW",
                                           **({"weight_decay": 0.01} if name == "AdamW" else {}) | kw)
    elif name == "RMSprop":
        state = None
        for g in grads:
            W, state = ref.torch_rmsprop_step(W, g, state, **kw)
    elif name == "Adagrad":
        s = np.full_like(W, kw.pop("initial_accumulator_value", 0.0))
        for t, g in enumerate(grads, start=1):
            W, s = ref.torch_adagrad_step(W, g, s, t, **kw)
    elif name == "Adadelta":
        sq, acc = np.zeros_like(W), np.zeros_like(W)
        for g in grads:
            W, sq, acc = ref.torch_adadelta_step(W, g, sq, acc, **kw)
    return W


@pytest.mark.parametrize("name,kwargs", OPT_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPT_CASES)])
def test_torch_convention_matches_torch_optim(name, kwargs):
    rng = np.random.default_rng()
    W0, grads = rng.normal(size=(3, 5)), rng.normal(size=(30, 3, 5))
    got = reference_run(name, kwargs, W0, grads)
    expected = _torch_run(getattr(torch.optim, name), kwargs, W0, grads)
    assert_close(got, expected, rtol=1e-11, atol=1e-13, name=name)


@pytest.mark.parametrize("shape", [(3, 5), (7,), (2, 3, 4), ()])
@pytest.mark.parametrize("kwargs", [dict(), dict(lr=0.05, beta2_decay=-0.5, eps=(1e-20, 1e-2), d=1.5,
                                                 weight_decay=0.1, maximize=True)])
def test_adafactor_reference_matches_torch(shape, kwargs):
    """gpuopt.reference.adafactor_step (float64) = torch.optim.Adafactor on float64 tensors over 12
    steps: factored (2-D, 3-D: the row mean per leading index) and not (1-D, 0-d)."""
    rng = np.random.default_rng()
    W0 = rng.normal(size=shape)
    param = torch.nn.Parameter(torch.tensor(W0))
    opt = torch.optim.Adafactor([param], **kwargs)
    W = W0.copy()
    state = (dict(row_var=np.zeros(shape[:-1] + (1,)), col_var=np.zeros(shape[:-2] + (1,) + shape[-1:]))
             if len(shape) > 1 else dict(variance=np.zeros(shape)))
    for step in range(1, 13):
        g = rng.normal(size=shape)
        param.grad = torch.tensor(g)
        opt.step()
        W, state = ref.adafactor_step(W, g, state, step, eps1_dtype=np.float64, **kwargs)
    assert_close(param.detach(), W, rtol=1e-10, atol=1e-12)
    for key, value in state.items():
        assert_close(opt.state[param][key], value, rtol=1e-10, atol=1e-14, name=key)


def test_muon_reference_matches_torch_in_float64_to_bf16_rounding():
    """gpuopt.reference.muon_step iterates in float64; torch.optim.Muon in bf16: one step from a
    momentum state agrees to bf16's precision (torch's departs by up to ~8% of the update's largest
    entry over 1500 random matrices; 10% allowed), the buffer exactly."""
    rng = np.random.default_rng()
    for shape in ((6, 9), (9, 6)):
        W0, B0, g = rng.normal(size=shape), rng.normal(size=shape), rng.normal(size=shape)
        param = torch.nn.Parameter(torch.tensor(W0))
        opt = torch.optim.Muon([param], lr=0.05)
        opt.state[param]["momentum_buffer"] = torch.tensor(B0)
        param.grad = torch.tensor(g)
        opt.step()
        W, B = ref.muon_step(W0, g, B0, lr=0.05)
        assert_close(opt.state[param]["momentum_buffer"], B, rtol=1e-12, atol=1e-14)
        change, expected = param.detach().numpy() - W0, W - W0
        assert np.abs(change - expected).max() <= 0.1 * np.abs(expected).max()


# ---------------------------------------------------------------- B.0.2 batch norm ------------

def _finite_difference_dZ(Z, G, B, R, eps, eps_inside_sqrt, h=1e-6):
    """Central differences of L(Z) = Σ R ⊙ Ẑ(Z)."""
    dZ = np.zeros_like(Z)
    for idx in np.ndindex(Z.shape):
        Zp, Zm = Z.copy(), Z.copy()
        Zp[idx] += h
        Zm[idx] -= h
        Lp = (R * ref.batch_norm_forward(Zp, G, B, eps, eps_inside_sqrt)[0]).sum()
        Lm = (R * ref.batch_norm_forward(Zm, G, B, eps, eps_inside_sqrt)[0]).sum()
        dZ[idx] = (Lp - Lm) / (2 * h)
    return dZ


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(2, 9), st.booleans(), st.sampled_from([1e-5, 1e-2, 0.3]),
       st.integers(0, 2**31))
def test_closed_form_backward_equals_finite_differences(n, K, eps_inside_sqrt, eps, seed):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, K)) * rng.uniform(0.5, 3, size=(n, 1)) + rng.normal(size=(n, 1))
    G, B, R = rng.normal(size=n), rng.normal(size=n), rng.normal(size=(n, K))
    _, cache = ref.batch_norm_forward(Z, G, B, eps, eps_inside_sqrt)
    dZ, dG, dB = ref.batch_norm_backward(R, cache, G)
    fd = _finite_difference_dZ(Z, G, B, R, eps, eps_inside_sqrt)
    # Relative to the size of the terms the closed form sums, |G dẐ| / s: with K = 2 the true
    # gradient nearly cancels to zero (the output is ±1 whatever Z), and the difference quotient's
    # rounding, not the closed form, would set a relative error measured against |fd| alone.
    s = np.sqrt(cache.sigma**2 + eps) if eps_inside_sqrt else cache.sigma + eps
    scale = max(np.abs(fd).max(), (np.abs(G)[:, None] * np.abs(R) / s[:, None]).max())
    assert np.abs(dZ - fd).max() / scale < 1e-6, f"max rel err {np.abs(dZ - fd).max() / scale:.2e}"
    assert_close(dB, R.sum(axis=1), rtol=1e-12, name="dB")
    assert_close(dG, (R * cache.Z_bar).sum(axis=1), rtol=1e-12, name="dG")


def test_closed_form_is_the_seeds_summed_equation():
    """With ε = 0 both conventions coincide with the seed's final equation, summed term by term."""
    rng = np.random.default_rng(1)
    Z, G, R = rng.normal(size=(3, 6)), rng.normal(size=3), rng.normal(size=(3, 6))
    for eps_inside_sqrt in (True, False):
        _, cache = ref.batch_norm_forward(Z, G, None, 0.0, eps_inside_sqrt)
        dZ, _, _ = ref.batch_norm_backward(R, cache, G)
        assert_close(dZ, ref.batch_norm_backward_sum_form(R, cache, G), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("eps_inside_sqrt", [True, False])
def test_constant_unit_gives_finite_results(eps_inside_sqrt):
    Z = np.array([[2.5] * 5, [1.0, 2.0, 3.0, 4.0, 6.0]])
    G, B, R = np.array([1.5, 0.5]), np.array([0.1, 0.2]), np.random.default_rng(2).normal(size=(2, 5))
    Zh, cache = ref.batch_norm_forward(Z, G, B, 1e-5, eps_inside_sqrt)
    dZ, dG, dB = ref.batch_norm_backward(R, cache, G)
    for arr in (Zh, dZ, dG, dB):
        assert np.isfinite(arr).all()
    assert_close(Zh[0], np.full(5, 0.1), name="constant unit output = B")
    # For a constant unit only the mean term survives: G/(K s) (K dẐ - Σ dẐ).
    s = np.sqrt(1e-5) if eps_inside_sqrt else 1e-5
    assert_close(dZ[0], 1.5 / (5 * s) * (5 * R[0] - R[0].sum()), rtol=1e-10)


@pytest.mark.parametrize("K", [2, 7, 33])
def test_batch_norm_matches_torch_float64(K):
    rng = np.random.default_rng()
    n = 4
    Z = rng.normal(size=(n, K)) * 3 + 1
    G, B, R = rng.normal(size=n), rng.normal(size=n), rng.normal(size=(n, K))
    x = torch.tensor(Z.T.copy(), requires_grad=True)  # torch is (N, C) = Zᵀ
    w = torch.tensor(G, requires_grad=True)
    b = torch.tensor(B, requires_grad=True)
    rm, rv = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    y = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
    y.backward(torch.tensor(R.T.copy()))
    Zh, cache = ref.batch_norm_forward(Z, G, B, 1e-5, eps_inside_sqrt=True)
    dZ, dG, dB = ref.batch_norm_backward(R, cache, G)
    assert_close(Zh, y.detach().T, rtol=1e-10, atol=1e-12, name="forward")
    assert_close(dZ, x.grad.T, rtol=1e-9, atol=1e-11, name="dZ")
    assert_close(dG, w.grad, rtol=1e-10, atol=1e-12, name="dG")
    assert_close(dB, b.grad, rtol=1e-10, atol=1e-12, name="dB")
    mean, var, t = ref.batch_norm_running_stats(np.zeros(n), np.ones(n), Z, 0, 0.1)
    assert_close(mean, rm, rtol=1e-12, name="running_mean")
    assert_close(var, rv, rtol=1e-12, name="running_var")
    assert t == 1
    y_eval = torch.nn.functional.batch_norm(x.detach(), rm, rv, w.detach(), b.detach(), training=False, eps=1e-5)
    assert_close(ref.batch_norm_eval(Z, mean, var, G, B, 1e-5), y_eval.T, rtol=1e-10, atol=1e-12, name="eval")


def test_cumulative_running_stats_match_torch_momentum_none():
    """momentum=None is the seed's γ_t = (t-1)/t: the running stats are the exact means."""
    rng = np.random.default_rng()
    bn = torch.nn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    mean, var, t = np.zeros(3), np.ones(3), 0
    batch_means, batch_vars = [], []
    for _ in range(6):
        Z = rng.normal(size=(3, 8)) * 2 + 5
        bn(torch.tensor(Z.T.copy()))
        mean, var, t = ref.batch_norm_running_stats(mean, var, Z, t, momentum=None)
        batch_means.append(Z.mean(axis=1))
        batch_vars.append(Z.var(axis=1, ddof=1))
    assert_close(mean, bn.running_mean, rtol=1e-12, name="running_mean")
    assert_close(var, bn.running_var, rtol=1e-12, name="running_var")
    assert_close(mean, np.mean(batch_means, axis=0), rtol=1e-12, name="exact mean of batch means")
    assert_close(var, np.mean(batch_vars, axis=0), rtol=1e-12, name="exact mean of batch variances")
    assert t == int(bn.num_batches_tracked)


def _bitsandbytes_dynamic_map(signed, max_exponent_bits, total_bits):
    """The map as bitsandbytes and torchao build it: float32 ``torch.linspace`` grids."""
    values, magnitude_bits = [0.0, 1.0], total_bits - 1
    for i in range(max_exponent_bits):
        intervals = 2 ** (i + magnitude_bits - max_exponent_bits) * (1 if signed else 2)
        grid = torch.linspace(0.1, 1, intervals + 1)
        means = ((grid[:-1] + grid[1:]) / 2.0 * 10.0 ** (i + 1 - max_exponent_bits)).tolist()
        values += means + ([-m for m in means] if signed else [])
    return np.sort(np.array(values))


@pytest.mark.parametrize("signed, max_exponent_bits, total_bits", [(True, 7, 8), (False, 7, 8), (True, 3, 4)])
def test_dynamic_maps_are_bitsandbytes_and_torchaos(signed, max_exponent_bits, total_bits):
    """The 8-bit maps (signed and unsigned) and torchao's signed 4-bit map: 2^bits sorted distinct
    values in [-1, 1] with 0 and 1 (not -1), equal to the float32 construction bitsandbytes and
    torchao use to within 2 float32 ulps (their linspace's last bit varies with the CPU)."""
    ours = ref.dynamic_map(signed, max_exponent_bits, total_bits)
    theirs = _bitsandbytes_dynamic_map(signed, max_exponent_bits, total_bits)
    assert ours.size == theirs.size == 2 ** total_bits
    assert (np.diff(ours) > 0).all() and ours[-1] == 1.0 and 0.0 in ours and -1.0 not in ours
    assert (ours >= 0).all() != signed
    assert (np.abs(ours - theirs) <= 2.5e-7 * np.abs(theirs)).all()
    assert (ours.astype(np.float32) == ours).all()  # float32 values
    assert_close(ref.linear_map(4), torch.linspace(0, 1, 17)[1:], rtol=0, atol=0)


@pytest.mark.parametrize("block", [256, 128, 7])
def test_blockwise_quantization_rounds_each_block_to_the_nearest_code(block):
    """Blocks of ``block`` elements and a shorter tail: each block's scale is its largest
    magnitude, every element's code the nearest map value to x / scale (a tie to the larger), so
    the dequantized value is within half a gap of x; a value already on the grid comes back
    exactly."""
    qmap = ref.dynamic_map(True)
    x = np.random.standard_normal(3 * block + block // 2 + 1) * np.logspace(-6, 0, 3 * block + block // 2 + 1)
    codes, absmax = ref.quantize_blockwise(x, qmap, block)
    assert absmax.size == -(-x.size // block)
    for k, start in enumerate(range(0, x.size, block)):
        assert absmax[k] == np.abs(x[start:start + block]).max()
    scaled = x / np.repeat(absmax, block)[:x.size]
    distance = np.abs(qmap[None, :] - scaled[:, None])
    best = distance.min(axis=1)
    assert (np.abs(qmap[codes] - scaled) == best).all()
    ties = (distance == best[:, None]).sum(axis=1) > 1
    assert (codes[ties] == np.argmax(distance[ties] == best[ties, None], axis=1) + 1).all()
    back = ref.dequantize_blockwise(codes, absmax, qmap, block)
    again, absmax_again = ref.quantize_blockwise(back, qmap, block)
    positive_max = [np.argmax(np.abs(back[s:s + block])) for s in range(0, x.size, block)]
    for k, start in enumerate(range(0, x.size, block)):  # a block whose largest value is positive: 1 stays 1
        if back[start + positive_max[k]] > 0:
            assert (again[start:start + block] == codes[start:start + block]).all()


def test_e4m3_rounding_is_torchs_float8_e4m3fn():
    """``round_to_e4m3`` equals torch's float → float8_e4m3fn conversion (to nearest, ties to
    even) over normals, subnormals and exact ties; fp8 blocks scale their largest magnitude to 448."""
    x = np.concatenate([np.random.standard_normal(4000) * 10.0 ** np.random.uniform(-4, 2.5, 4000),
                        np.arange(-64, 65) * 2.0 ** -10, [448.0, -448.0, 0.0]])
    x = x[np.abs(x) <= 448]
    expected = torch.from_numpy(x).float().to(torch.float8_e4m3fn).double().numpy()
    rounded = ref.round_to_e4m3(x.astype(np.float32).astype(np.float64))
    assert (rounded == expected).all()
    values, scale = ref.quantize_fp8_blockwise(x, 256)
    assert np.abs(values[:256]).max() == 448.0
    per_element = np.repeat(scale, 256)[:x.size]  # within half an ulp (2^-4 relative), or of the subnormal step
    assert (np.abs(values * per_element - x) <= 2.0 ** -4 * np.abs(x) + 2.0 ** -10 * per_element).all()
