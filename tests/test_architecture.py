"""Adding an algorithm is one update function and one ``Algorithm`` (gpuopt/kernels/_multi_tensor.py):
sign-SGD, written here as a user would, gets the whole machinery — one launch per group, param
groups, AMP's grad_scale / found_inf, fp32 master weights for bf16 params, validation, the fast
path — and matches its reference written with torch ops."""

import inspect

import pytest
import torch
import triton
import triton.language as tl

import gpuopt
import gpuopt._multi_tensor
from gpuopt._fused import FusedOptimizer
from gpuopt.kernels import _multi_tensor as walk
from gpuopt.kernels._multi_tensor import Algorithm, load_grad, load_param, step_flags, store_param

from .helpers import assert_close, count_launches


@triton.jit
def _sign_sgd_update(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    """W ← W (1 - η λ) - η sign(g)."""
    param_ptr, grad_ptr, master_ptr = ptrs
    (weight_decay,) = hyper
    w = load_param(param_ptr, master_ptr, offsets, mask, FLAGS.has_master)
    g = load_grad(grad_ptr, offsets, mask, grad_scale_ptr, FLAGS.has_grad_scale, FLAGS.maximize)
    sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
    w = w * (1.0 - lr * weight_decay) - lr * sign
    store_param(param_ptr, master_ptr, offsets, mask, w, seed, FLAGS.has_master, FLAGS.stochastic_rounding)


def _sign_sgd_hyperparameters(*, weight_decay, maximize):
    return dict(weight_decay=weight_decay), dict(maximize=maximize)


def _no_step(options):
    return False


SIGN_SGD = Algorithm(roles=("param", "grad", "master"), hyper=("weight_decay",), update=_sign_sgd_update,
                     flags=step_flags("SignSGDFlags", "", __name__), hyperparameters=_sign_sgd_hyperparameters,
                     uses_step=_no_step)


class SignSGD(FusedOptimizer):
    _algorithm = SIGN_SGD

    def __init__(self, params, lr=1e-3, weight_decay=0.0, **precision):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, **precision))

    def _options(self, group):
        return dict(weight_decay=group["weight_decay"], maximize=group["maximize"])


def reference_step(params, lr, weight_decay):
    with torch.no_grad():
        for p in params:
            p.mul_(1 - lr * weight_decay).add_(torch.sign(p.grad), alpha=-lr)


def test_sign_sgd_from_one_update_and_one_spec(device):
    shapes = [(7,), (3, 5), (2, 3, 4, 5), (130,)]
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = SignSGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.05, "weight_decay": 0.1}], lr=0.01)
    for _ in range(3):
        for p, t in zip(params, twins):
            p.grad = torch.randn_like(p)
            p.grad[..., 0] = 0.0  # sign(0) = 0
            t.grad = p.grad.clone()
        with count_launches(walk, "_step_kernel") as counter:
            opt.step()
        assert counter["launches"] == 2  # one per param group
        reference_step(twins[:2], 0.01, 0.0)
        reference_step(twins[2:], 0.05, 0.1)
        for p, t in zip(params, twins):
            assert_close(p, t, rtol=1e-6, atol=1e-6)
    assert opt.state_dict()["param_groups"][1]["weight_decay"] == 0.1


def test_sign_sgd_gets_amp_and_master_weights_for_free(device):
    p = torch.nn.Parameter(torch.randn(300, device=device).to(torch.bfloat16))
    opt = SignSGD([p], lr=1e-3, master_weights=True)
    master = p.detach().float()
    p.grad = torch.randn_like(p)
    opt.step(grad_scale=torch.tensor(4.0, device=device), found_inf=torch.tensor(0.0, device=device))
    master -= 1e-3 * torch.sign(p.grad.float())
    assert torch.equal(opt.state[p]["master_param"], master)  # fp32 copy updated exactly
    assert torch.equal(p, master.to(torch.bfloat16))  # and the parameter rounded from it
    before = p.detach().clone()
    opt.step(found_inf=torch.tensor(1.0, device=device))  # an overflowed step: skipped on the device
    assert torch.equal(p, before)


def test_sign_sgd_is_validated_like_the_others(device):
    """The shared validation layer names the algorithm and changes nothing when it refuses."""
    p = torch.randn(6, device=device)
    before = p.clone()
    with pytest.raises(RuntimeError, match=r"SignSGD: gradient shape \(5,\) does not match parameter shape \(6,\)"):
        gpuopt._multi_tensor.run_functional("SignSGD", SIGN_SGD, dict(param=[p], grad=[torch.ones(5, device=device)]),
                                     dict(weight_decay=0.0, maximize=False), lr=0.1, grad_scale=None,
                                     found_inf=None, seed=0, stochastic_rounding=False)
    assert torch.equal(p, before)


# ------------------------------------------------------------------ how the package is layered ----

def _imports():
    """``{module: (modules it imports from gpuopt, imports made inside a function)}`` for every
    module of gpuopt/ and gpuopt/kernels/."""
    import ast
    import pathlib

    root = pathlib.Path(gpuopt.__file__).parent.parent
    found = {}
    for folder, package in (("gpuopt", "gpuopt"), ("gpuopt/kernels", "gpuopt.kernels")):
        for path in sorted((root / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            tree = ast.parse(path.read_text())
            imported, inside = set(), []
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    base = package.split(".") if path.stem == "__init__" else name.split(".")[:-1]
                    module = ".".join(base[:len(base) - node.level + 1] + [node.module] if node.module else
                                      base[:len(base) - node.level + 1]) if node.level else node.module
                    targets = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                else:
                    continue
                targets = [t for t in targets if t.startswith("gpuopt")]
                imported.update(targets)
            for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
                inside += [f"{name}.{function.name}" for n in ast.walk(function)
                           if isinstance(n, (ast.Import, ast.ImportFrom))
                           and not (isinstance(n, ast.Import) and [a.name for a in n.names] == ["cupy"])]
            found[name] = (imported, inside)
    return found


def test_imports_flow_one_way():
    """gpuopt/kernels/ imports nothing from gpuopt's host modules; no module imports inside a function
    (but CuPy, optional, imported where a CuPy array arrives); the host modules import each
    other without a cycle."""
    imports = _imports()
    for name, (imported, inside) in imports.items():
        if name.startswith("gpuopt.kernels"):
            assert all(t.startswith("gpuopt.kernels") for t in imported), (name, imported)
        assert not inside, inside
    graph = {name: {t for t in imported if t in imports and t != name} for name, (imported, _) in imports.items()}
    done, path = set(), []

    def visit(node):
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph[node] - {"gpuopt"}):  # (a submodule importing its package's __init__ is not a cycle)
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_nothing_is_compiled_or_generated_at_run_time():
    """No C/C++ source in the package, no eval/exec/sys._getframe, no compiler invoked."""
    import pathlib

    root = pathlib.Path(gpuopt.__file__).parent.parent
    files = list((root / "gpuopt").iterdir()) + list((root / "gpuopt" / "kernels").iterdir())
    assert not [f for f in files if f.suffix in (".c", ".cc", ".cpp", ".h", ".so")]
    import ast

    for f in files:
        if f.suffix == ".py":
            for node in ast.walk(ast.parse(f.read_text())):
                name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else (
                    node.module if isinstance(node, ast.ImportFrom) else None)
                assert name not in ("eval", "exec", "_getframe", "cpp_extension", "subprocess"), (f.name, name)


def _algorithms():
    from gpuopt.kernels import adadelta, adagrad, adam, ema, lamb, lars, lion, muon, rmsprop, schedule_free, sgd

    return {"Adam": adam.ADAM, "SGD": sgd.SGD, "RMSprop": rmsprop.RMSPROP, "Adagrad": adagrad.ADAGRAD,
            "Adadelta": adadelta.ADADELTA, "EMA": ema.AVERAGE, "Lion": lion.LION, "LAMB": lamb.LAMB, "LARS": lars.LARS,
            "MuonMomentum": muon.MOMENTUM, "MuonUpdate": muon.UPDATE,
            "ScheduleFree": schedule_free.SCHEDULE_FREE, "ScheduleFreeSwitch": schedule_free.SWITCH,
            "SignSGD": SIGN_SGD}


@pytest.mark.parametrize("name", list(_algorithms()))
def test_kernels_unpack_the_names_their_spec_declares(name):
    """Each algorithm names its roles and hyperparameters once (``Algorithm.roles``,
    ``Algorithm.hyper``): the host packs the values by those names, and every unpacking of
    ``ptrs`` and ``hyper`` in its update and per-tensor function lists them in that order
    (``<role>_ptr`` or ``_``; a hyperparameter's name or ``_``)."""
    import ast
    import inspect
    import textwrap

    algorithm = _algorithms()[name]
    unpacked = {"ptrs": [], "hyper": [], "scalars": []}
    for function in (algorithm.update, algorithm.per_tensor, algorithm.norms):
        if function is None:
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(function.fn)))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id in unpacked
                    and isinstance(node.targets[0], ast.Tuple)
                    and (node.value.id != "scalars" or function is algorithm.update)):
                unpacked[node.value.id].append([t.id for t in node.targets[0].elts])
    assert unpacked["ptrs"] and unpacked["hyper"], unpacked
    for names in unpacked["ptrs"]:
        assert len(names) == len(algorithm.roles), names
        assert all(n == "_" or n == f"{role}_ptr" for n, role in zip(names, algorithm.roles)), names
    for names in unpacked["hyper"]:
        assert len(names) == len(algorithm.hyper), names
        assert all(n == "_" or n == h for n, h in zip(names, algorithm.hyper)), names
    if algorithm.sums:  # the update's scalars end with the sums its norms pass makes, by name
        assert unpacked["scalars"] and all(names[-len(algorithm.sums):] == list(algorithm.sums)
                                           for names in unpacked["scalars"]), unpacked["scalars"]
    values, _ = algorithm.hyperparameters(**_some_options(algorithm))
    assert set(values) == set(algorithm.hyper)


def _some_options(algorithm) -> dict:
    import inspect

    defaults = dict(maximize=False, weight_decay=0.0, eps=1e-8, beta1=0.9, beta2=0.999, amsgrad=False,
                    eps_inside_sqrt=False, decoupled_weight_decay=True, momentum=0.9, dampening=0.0, nesterov=False,
                    has_step=True, alpha=0.99, centered=False, lr_decay=0.0, rho=0.9, gamma=0.5, bias_correction2=0.1,
                    ckp1=0.5, y_rate=-1e-3, z_rate=1e-3, weight=0.1, bias_correction=True, max_trust_ratio=None,
                    trust_coefficient=1e-3)
    return {n: defaults[n] for n in inspect.signature(algorithm.hyperparameters).parameters if n in defaults}


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adadelta", "Lion", "AdamWScheduleFree",
                                  "LAMB", "LARS", "SignSGD"])
def test_traced_operator_schema_names_the_roles(name):
    """The ``torch.compile`` operator of each optimizer takes one list per role, named after the
    spec's roles, and declares every one mutated but the gradients (and the rounding epoch)."""
    cls = SignSGD if name == "SignSGD" else getattr(gpuopt, name)
    schema = getattr(torch.ops.gpuopt, cls._traced_op).default._schema
    arguments = {a.name: a for a in schema.arguments}
    roles = cls._algorithm.roles
    assert [a.name for a in schema.arguments[:len(roles)]] == list(roles)
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == (set(roles) - {"grad"}) | {"epoch"}
    assert "grad" in arguments
    assert cls._traced_options == tuple(sorted(inspect.signature(cls._algorithm.hyperparameters).parameters))


def test_tile_kernels_take_the_names_their_spec_declares():
    """An algorithm with kernels of its own (``Algorithm.tiles``: Adafactor's) takes one argument
    list for all of them: each role's base as ``<role>_base`` in ``roles`` order and the
    hyperparameters by their ``hyper`` names, in order (the host packs them so); and every
    unpacking of ``ptrs`` in them names the roles."""
    import ast
    import inspect

    from gpuopt.kernels import adafactor

    algorithm = adafactor.ADAFACTOR
    for kernel in algorithm.tiles:
        names = kernel.arg_names
        bases = [n for n in names if n.endswith("_base")]
        assert bases == [f"{role}_base" for role in algorithm.roles], bases
        start = names.index(algorithm.hyper[0])
        assert tuple(names[start:start + len(algorithm.hyper)]) == algorithm.hyper
        assert names[start - 2:start] == ["lr", "lr_ptr"]
    tree = ast.parse(inspect.getsource(adafactor))  # (the kernels and their helpers)
    unpacked = [[t.id for t in node.targets[0].elts] for node in ast.walk(tree)
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id == "ptrs"]
    assert unpacked
    for unpacking in unpacked:
        assert len(unpacking) == len(algorithm.roles)
        assert all(n == "_" or n == f"{role}_ptr" for n, role in zip(unpacking, algorithm.roles)), unpacking
