"""Stochastic rounding draws fresh noise on every step, for every algorithm, whatever state roles
it has (SGD without momentum and sign-SGD have no ``step``): the noise's epoch is a launch count
each optimizer keeps on the device, advanced by every rounded launch (so a CUDA-graph replay
advances it too), never reset by a new launch plan, and saved with the seed. Each element of a
bf16 parameter reset to 1.0 before every step must round down with the probability that makes
the rounding unbiased, step after step."""

import pytest
import torch

import gpuopt

from .conftest import DEVICE

schedulefree = pytest.importorskip("schedulefree")
from .test_architecture import SignSGD

ULP = 2.0**-8  # bf16 spacing just below 1.0


def _training(opt):
    opt.train()  # (Schedule-Free steps only in training mode)
    return opt


GRAD = 1e-3
# name → (gpuopt optimizer, the torch reference of one float64 step with the same options, or
# None: sign-SGD's and Lion's update is lr · sign(...), and LAMB's and LARS's (trust coefficient 1),
# of a constant gradient on a constant tensor, is lr: the per-tensor ratio undoes the gradient's
# scale). Rates keep every update below one ULP.
OPTIMIZERS = {
    "SGD": (lambda ps: gpuopt.SGD(ps, lr=1.0, stochastic_rounding=True),
            lambda ps: torch.optim.SGD(ps, lr=1.0)),
    "SGD momentum": (lambda ps: gpuopt.SGD(ps, lr=0.3, momentum=0.5, stochastic_rounding=True,
                                           state_dtype=torch.float32),
                     lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.5)),
    "SignSGD": (lambda ps: SignSGD(ps, lr=1e-3, stochastic_rounding=True), None),
    "Lion": (lambda ps: gpuopt.Lion(ps, lr=1e-3, stochastic_rounding=True, state_dtype=torch.float32), None),
    "LAMB": (lambda ps: gpuopt.LAMB(ps, lr=1e-3, stochastic_rounding=True, state_dtype=torch.float32), None),
    "LARS": (lambda ps: gpuopt.LARS(ps, lr=1e-3, momentum=0.0, trust_coefficient=1.0, eps=0.0,
                                    stochastic_rounding=True), None),
    "Adam": (lambda ps: gpuopt.Adam(ps, lr=1e-3, stochastic_rounding=True, state_dtype=torch.float32),
             lambda ps: torch.optim.Adam(ps, lr=1e-3)),
    "AdamW": (lambda ps: gpuopt.AdamW(ps, lr=1e-3, weight_decay=0.0, stochastic_rounding=True,
                                      state_dtype=torch.float32),
              lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0)),
    "RMSprop centered momentum": (
        lambda ps: gpuopt.RMSprop(ps, lr=1e-4, centered=True, momentum=0.5, stochastic_rounding=True,
                                  state_dtype=torch.float32),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-4, centered=True, momentum=0.5)),
    "Adagrad": (lambda ps: gpuopt.Adagrad(ps, lr=2e-3, stochastic_rounding=True, state_dtype=torch.float32),
                lambda ps: torch.optim.Adagrad(ps, lr=2e-3)),
    "Adadelta": (lambda ps: gpuopt.Adadelta(ps, lr=1.0, stochastic_rounding=True, state_dtype=torch.float32),
                 lambda ps: torch.optim.Adadelta(ps, lr=1.0)),
    "AdamWScheduleFree": (lambda ps: _training(gpuopt.AdamWScheduleFree(ps, lr=2e-3, stochastic_rounding=True,
                                                                        state_dtype=torch.float32)),
                          lambda ps: _training(schedulefree.AdamWScheduleFree(ps, lr=2e-3))),
}


def _outcomes(name, steps, n=256, drop_at=None):
    """The parameter after each of ``steps`` steps, each from 1.0 with the same gradient, and
    the float64 value each step would give without rounding. ``drop_at``: at that step a second
    parameter has no gradient (the launch is planned anew for the first alone; the step after,
    anew for both)."""
    p = torch.nn.Parameter(torch.ones(n, device=DEVICE, dtype=torch.bfloat16))
    other = torch.nn.Parameter(torch.ones(5, device=DEVICE, dtype=torch.bfloat16))
    make, make_reference = OPTIMIZERS[name]
    opt = make([p] if drop_at is None else [p, other])
    twin = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    reference = make_reference([twin]) if make_reference else None
    g = torch.full((n,), GRAD, device=DEVICE, dtype=torch.bfloat16)
    rows, expected = [], []
    for step in range(steps):
        with torch.no_grad():
            p.fill_(1.0)
            twin.fill_(1.0)
        p.grad = g.clone()
        other.grad = None if step == drop_at else torch.zeros(5, device=DEVICE, dtype=torch.bfloat16)
        # (``other`` is in the optimizer only when ``drop_at`` is given)
        opt.step()
        rows.append(p.detach().double().clone())
        if reference is None:
            expected.append(1.0 - 1e-3)
        else:
            twin.grad = torch.full((1,), g[0].double().item(), dtype=torch.float64)
            reference.step()
            expected.append(twin.item())
    return torch.stack(rows), torch.tensor(expected, dtype=torch.float64)


def _moved(rows):
    return [frozenset(torch.nonzero(row < 1.0).flatten().tolist()) for row in rows]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_step_draws_fresh_noise(name):
    moved = _moved(_outcomes(name, 3)[0])
    assert all(moved), moved
    assert len(set(moved)) == 3


@pytest.mark.parametrize("name", ["SGD", "SignSGD", "AdamW"])
def test_a_new_launch_plan_does_not_repeat_the_noise(name):
    """A step where a parameter has no gradient plans a launch for the others; the next step
    plans the whole group again. Neither restarts the noise: the five steps' moved sets all
    differ (a count kept in the plan restarted, and step 3 repeated step 1's noise)."""
    moved = _moved(_outcomes(name, 5, drop_at=2)[0])
    assert len(set(moved)) == 5, [sorted(m)[:8] for m in moved]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_rounding_is_unbiased_per_element_over_200_steps(name):
    rows, expected = _outcomes(name, 200, n=128)  # (one block: one interpreted program a step)
    assert set(rows.unique().tolist()) <= {1.0, 1.0 - ULP}
    assert ((expected > 1.0 - ULP) & (expected < 1.0)).all(), "the rates must keep each update within one ULP"
    q = (1.0 - expected) / ULP  # each step's probability of rounding down
    standard_error = ULP * (q * (1 - q)).sum().sqrt().item() / len(q)
    deviation = (rows - expected[:, None]).mean(0)  # per element, over the steps
    assert deviation.abs().max().item() < 5 * standard_error, (deviation.abs().max().item(), standard_error)
    assert abs(deviation.mean().item()) < 5 * standard_error / rows.shape[1] ** 0.5


def test_resumed_run_continues_the_noise(tmp_path):
    """state_dict() keeps the seed and the launch count: a run resumed from it rounds exactly
    as the uninterrupted one, step-less algorithm included."""
    def run(resume_at=None):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.ones(300, device=DEVICE, dtype=torch.bfloat16))
        opt = gpuopt.SGD([p], lr=1.0, stochastic_rounding=True)
        rows = []
        for step in range(4):
            if step == resume_at:
                torch.save({"p": p.detach().clone(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
                saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
                torch.manual_seed(123)  # a resumed process draws another seed; the checkpoint's wins
                p = torch.nn.Parameter(saved["p"])
                opt = gpuopt.SGD([p], lr=1.0, stochastic_rounding=True)
                opt.load_state_dict(saved["opt"])
            with torch.no_grad():
                p.fill_(1.0)
            p.grad = torch.full_like(p, GRAD)
            opt.step()
            rows.append(p.detach().clone())
        return rows

    straight, resumed = run(), run(resume_at=2)
    assert len(set(_moved([r.double() for r in straight]))) == 4
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["SGD", "SignSGD"])
def test_compiled_step_advances_the_epoch_as_the_eager_one(name):
    """Inside torch.compile the step's operator reads and advances the same device epoch: one
    graph, no break, fresh noise every step, and the very values of the eager run."""
    def run(compiled):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.ones(300, device=DEVICE, dtype=torch.bfloat16))
        opt = OPTIMIZERS[name][0]([p])
        step = opt.step
        rows = []
        for i in range(4):
            p.grad = torch.full_like(p, GRAD)
            if i == 1:  # after the eager first step has drawn the seed and made the epoch: one step more
                if compiled:
                    explained = torch._dynamo.explain(opt.step)()
                    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
                    step = torch.compile(opt.step, backend="aot_eager")
                else:
                    opt.step()
            with torch.no_grad():
                p.fill_(1.0)
            step()
            rows.append(p.detach().clone())
        torch._dynamo.reset()
        return rows

    eager, compiled = run(False), run(True)
    assert len(set(_moved([r.double() for r in compiled]))) == 4
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
