"""The body of tests/test_distributed.py's processes: each rank of a gloo process group (CPU,
kernels through Triton's interpreter) runs one scenario and raises on any mismatch; the
parent's ``torch.multiprocessing.spawn`` re-raises it with the rank's traceback.

Every comparison is against torch on the same sharding: the same model, the same data, the
same FSDP2 ``fully_shard`` (or DDP, or ZeRO) with ``torch.optim`` instead of gpuopt.
"""

from __future__ import annotations

import copy
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

import gpuopt

# Every optimizer, with options that touch every state role.
OPTIMIZERS = [("AdamW", dict(lr=1e-2, weight_decay=0.1)), ("Adam", dict(lr=1e-2, amsgrad=True)),
              ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
              ("RMSprop", dict(lr=1e-2, momentum=0.5, centered=True)), ("Adagrad", dict(lr=0.1)),
              ("Adadelta", dict(lr=1.0))]


def close(actual, expected, what, rtol=2e-5, atol=1e-6):
    actual = actual.full_tensor() if isinstance(actual, DTensor) else actual
    expected = expected.full_tensor() if isinstance(expected, DTensor) else expected
    if not torch.allclose(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True):
        worst = (actual.double() - expected.double()).abs().max().item()
        raise AssertionError(f"rank {dist.get_rank()}: {what}: differs by up to {worst:.3g}")


def model_and_data(seed=0):
    """An MLP whose layers shard unevenly over 2 and 3 ranks (5 and 7 rows), plus a batch of
    data that differs per rank (as a data-parallel loader's would)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 3))
    torch.manual_seed(100 + dist.get_rank())
    return model, torch.randn(8, 6), torch.randn(8, 3)


def whole_batch(x, y):
    """Every rank's batch, concatenated in rank order: what one process steps on."""
    world = dist.get_world_size()
    xs, ys = [torch.empty_like(x) for _ in range(world)], [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(xs, x)
    dist.all_gather(ys, y)
    return torch.cat(xs), torch.cat(ys)


def sharded(model):
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def train(model, opt, x, y, steps, clip=None):
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if clip is not None:
            clip(model.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)


def fsdp_optimizers(tmp, optimizers=OPTIMIZERS):
    """FSDP2 + every gpuopt optimizer = FSDP2 + torch.optim, states are DTensors placed like their
    parameters, and clipping inside the loop (in place, or fused into the step) equals torch's."""
    for index, (name, kwargs) in enumerate(optimizers):
        base, x, y = model_and_data()
        ours, theirs = sharded(copy.deepcopy(base)), sharded(copy.deepcopy(base))
        opt = getattr(gpuopt, name)(ours.parameters(), **kwargs)
        ref = getattr(torch.optim, name)(theirs.parameters(), **kwargs)
        # Clipping in place (gpuopt.clip_grad_norm_), or fused into the step (opt.clip_grad_norm_).
        clip = (lambda ps: gpuopt.clip_grad_norm_(ps, 0.5)) if index % 2 else (lambda ps: opt.clip_grad_norm_(0.5))
        train(ours, opt, x, y, 3, clip=clip)
        train(theirs, ref, x, y, 3, clip=lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5))
        # A loaded state_dict (every group validated again, from DTensor gradients) and a step in
        # which one parameter has no gradient.
        opt.load_state_dict(opt.state_dict())
        ref.load_state_dict(ref.state_dict())
        for model, optimizer in ((ours, opt), (theirs, ref)):
            torch.nn.functional.mse_loss(model(x), y).backward()
            next(model.parameters()).grad = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert isinstance(p, DTensor)
            close(p, q, f"{name}: {n}")
            for key, value in opt.state[p].items():
                if key != "step":
                    assert isinstance(value, DTensor) and value.placements == p.placements, (name, key)
                    close(value, ref.state[q][key], f"{name}: state {key} of {n}", rtol=1e-4, atol=1e-5)


def fsdp_checkpoint(tmp):
    """torch.distributed.checkpoint saves gpuopt's sharded state and loads it into a fresh run,
    both ways between torch.optim.AdamW and gpuopt.AdamW: the continuations are identical."""
    for source, target in (("gpuopt", "torch"), ("torch", "gpuopt"), ("gpuopt", "gpuopt")):
        base, x, y = model_and_data()
        model = sharded(copy.deepcopy(base))
        make = {"gpuopt": gpuopt.AdamW, "torch": torch.optim.AdamW}
        opt = make[source](model.parameters(), lr=1e-2, weight_decay=0.1)
        train(model, opt, x, y, 2)
        path = os.path.join(tmp, f"ckpt-{source}-{target}")
        dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
        train(model, opt, x, y, 2)  # the run continued as it was

        resumed = sharded(copy.deepcopy(base))
        resumed_opt = make[target](resumed.parameters(), lr=1e-2, weight_decay=0.1)
        state = {"model": resumed.state_dict(), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
        # A torch.optim checkpoint lacks gpuopt's own group options (state_dtype, master_weights,
        # ...): DCP's strict default load needs allow_partial_load (they keep their defaults).
        dcp.load(state, checkpoint_id=path,
                 planner=dcp.DefaultLoadPlanner(allow_partial_load=(source, target) == ("torch", "gpuopt")))
        resumed.load_state_dict(state["model"])
        set_optimizer_state_dict(resumed, resumed_opt, state["optim"])
        train(resumed, resumed_opt, x, y, 2)
        for (n, p), q in zip(resumed.named_parameters(), model.parameters()):
            close(p, q, f"checkpoint {source} -> {target}: {n}")


def clip_norms(tmp):
    """clip_grad_norm_ on FSDP2's sharded gradients and on plain ones equals torch's, for the
    2-norm, the 1-norm, a 3-norm and the max norm, and a non-finite gradient gives a non-finite
    norm on every rank (error_if_nonfinite raises)."""
    for norm_type in (2.0, 1.0, 3.0, math.inf):
        base, x, y = model_and_data()
        models = [sharded(copy.deepcopy(base)) for _ in range(2)]
        for m in models:
            torch.nn.functional.mse_loss(m(x), y).backward()
        ours = gpuopt.clip_grad_norm_(models[0].parameters(), 0.1, norm_type)
        theirs = torch.nn.utils.clip_grad_norm_(models[1].parameters(), 0.1, norm_type)
        # torch returns the norm as a DTensor, Replicate (the max norm: Partial(max), still to reduce);
        # gpuopt's is reduced already: Replicate, the full norm on every rank.
        assert isinstance(ours, DTensor) and all(p.is_replicate() for p in ours.placements), ours
        close(ours, theirs, f"total {norm_type}-norm")
        for p, q in zip(*(m.parameters() for m in models)):
            close(p.grad, q.grad, f"clipped gradient ({norm_type}-norm)")
    # A NaN on one rank's shard: every rank's norm is NaN, and error_if_nonfinite raises everywhere.
    base, x, y = model_and_data()
    model = sharded(copy.deepcopy(base))
    torch.nn.functional.mse_loss(model(x), y).backward()
    weight = next(model.parameters())
    if dist.get_rank() == dist.get_world_size() - 1:
        weight.grad._local_tensor.view(-1)[0] = float("nan")
    norm = gpuopt.get_total_norm([p.grad for p in model.parameters()])
    assert torch.isnan(norm.full_tensor() if isinstance(norm, DTensor) else norm), "NaN lost in the norm"
    try:
        gpuopt.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
    except RuntimeError as error:
        assert "non-finite" in str(error)
    else:
        raise AssertionError("error_if_nonfinite did not raise")


def tensor_parallel_and_ema(tmp):
    """DTensors placed by hand on a 1-D mesh (Shard on either dimension): a step equals torch's,
    EMA averages them shard by shard, and a Partial gradient is refused before anything changes."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    full = [torch.randn(7, 5), torch.randn(4, 9)]
    grads = [torch.randn_like(t) for t in full]
    params = [torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(d)])) for d, t in enumerate(full)]
    reference = [torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(d)])) for d, t in enumerate(full)]
    for ps in (params, reference):
        for p, g, d in zip(ps, grads, range(2)):
            p.grad = distribute_tensor(g, mesh, [Shard(d)])
    ema = gpuopt.EMA(params, decay=0.9)
    gpuopt.Adam(params, lr=0.1).step()
    torch.optim.Adam(reference, lr=0.1).step()
    for p, q in zip(params, reference):
        close(p, q, "Adam on hand-placed DTensors")
    ema.update()
    for average, p, start in zip(ema.averages, params, full):
        assert isinstance(average, DTensor) and average.placements == p.placements
        close(average, 0.9 * start + 0.1 * p.full_tensor(), "EMA of DTensors")
    from torch.distributed.tensor import Partial

    opt = gpuopt.SGD(params, lr=0.1)
    before = [p.full_tensor().clone() for p in params]
    params[0].grad = DTensor.from_local(torch.randn(7, 5), mesh, [Partial()], run_check=False)
    try:
        opt.step()
    except RuntimeError as error:
        assert "Partial" in str(error), error
    else:
        raise AssertionError("a Partial gradient was used")
    for p, b in zip(params, before):
        close(p, b, "parameters after a refused step", rtol=0, atol=0)
    # FSDP2's CPU offload on a GPU machine (DTensors on the CPU, no interpreter): a clear error.
    from gpuopt import _distributed

    params[0].grad = distribute_tensor(grads[0], mesh, [Shard(0)])
    interpreter = _distributed.interpreter_enabled
    _distributed.interpreter_enabled = lambda: False
    try:
        gpuopt.AdamW(params, lr=0.1).step()
    except RuntimeError as error:
        assert "CPUOffloadPolicy" in str(error), error
    else:
        raise AssertionError("offloaded DTensors were stepped on a GPU machine")
    finally:
        _distributed.interpreter_enabled = interpreter


def fsdp_mixed_precision(tmp):
    """FSDP2 with MixedPrecisionPolicy (bf16 compute, fp32 sharded parameters and reduced
    gradients): gpuopt.AdamW steps the fp32 shards as torch.optim.AdamW does."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    base, x, y = model_and_data()
    models = []
    for _ in range(2):
        model = copy.deepcopy(base)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mp_policy=policy)
        models.append(fully_shard(model, mp_policy=policy))
    opt = gpuopt.AdamW(models[0].parameters(), lr=1e-2)
    ref = torch.optim.AdamW(models[1].parameters(), lr=1e-2)
    for model, optimizer in zip(models, (opt, ref)):
        train(model, optimizer, x.bfloat16(), y.bfloat16(), 3)
    for p, q in zip(*(m.parameters() for m in models)):
        assert p.dtype == torch.float32 and isinstance(p, DTensor)
        close(p, q, "AdamW under MixedPrecisionPolicy")


def ddp_and_zero(tmp):
    """DDP with gpuopt.SGD, and ZeroRedundancyOptimizer(optimizer_class=gpuopt.AdamW), equal DDP
    with torch's optimizers; ZeRO's consolidated state_dict round-trips."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    for kind in ("ddp", "zero"):
        base, x, y = model_and_data()
        ours, theirs = DDP(copy.deepcopy(base)), DDP(copy.deepcopy(base))
        if kind == "ddp":
            opt = gpuopt.SGD(ours.parameters(), lr=0.05, momentum=0.9)
            ref = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
        else:
            opt = ZeroRedundancyOptimizer(ours.parameters(), optimizer_class=gpuopt.AdamW, lr=1e-2)
            ref = ZeroRedundancyOptimizer(theirs.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2)
        train(ours, opt, x, y, 3)
        train(theirs, ref, x, y, 3)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            close(p, q, kind)
        if kind == "zero":
            opt.consolidate_state_dict(to=0)
            if dist.get_rank() == 0:
                saved = opt.state_dict()
                assert saved["state"] and all("exp_avg" in s for s in saved["state"].values())


def sync_batch_norm(tmp):
    """gpuopt.nn.SyncBatchNorm on each rank's batch = torch.nn.BatchNorm on the concatenated global
    batch: outputs, input gradients, weight/bias gradients (summed over ranks, as DDP would),
    running statistics; unequal batches, a rank with an empty batch (3 ranks), a rank with one
    value per channel, channels-last, short NCHW rows (S = 9: one partial per column), momentum=None,
    the seed's ε placement forward."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = [((3, 2, 0)[:world] if world == 3 else (3, 2), (5, 3, 3), torch.contiguous_format, 0.1, torch.float32),
             ((2, 4, 1)[:world], (5, 3, 3), torch.channels_last, None, torch.float32),
             ((4, 1, 3)[:world], (6,), torch.contiguous_format, 0.1, torch.float32),
             ((3, 2, 2)[:world], (4, 2, 5), torch.channels_last, 0.1, torch.bfloat16)]
    for sizes, shape, layout, momentum, dtype in cases:
        torch.manual_seed(7)  # every rank makes the whole batch, then takes its part
        xs = [(torch.randn(n, *shape) * 3 + 1).to(dtype) for n in sizes]
        dys = [torch.randn(n, *shape).to(dtype) for n in sizes]
        # bf16 input: the reference normalizes the same bf16 values in fp32; gpuopt stores bf16
        tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        ours = gpuopt.nn.SyncBatchNorm(shape[0], momentum=momentum)
        reference = (torch.nn.BatchNorm2d if len(shape) == 3 else torch.nn.BatchNorm1d)(shape[0], momentum=momentum)
        with torch.no_grad():
            for m in (ours, reference):
                m.weight.copy_(torch.linspace(0.5, 1.5, shape[0]))
                m.bias.copy_(torch.linspace(-1, 1, shape[0]))
        for _ in range(2):  # two steps: the running statistics' update is checked twice
            x = xs[rank].clone().contiguous(memory_format=layout if len(shape) == 3 else torch.contiguous_format)
            x.requires_grad_()
            y = ours(x)
            y.backward(dys[rank])
            for p in (ours.weight, ours.bias):
                dist.all_reduce(p.grad)  # as DDP would (it averages; the sum is the global batch's)
            full = torch.cat(xs).float().requires_grad_()
            expected = reference(full)
            expected.backward(torch.cat(dys).float())
            start = sum(sizes[:rank])
            what = f"SyncBatchNorm {sizes} {shape}"
            close(y, expected[start:start + sizes[rank]], f"{what}: output", **tolerance)
            close(x.grad, full.grad[start:start + sizes[rank]], f"{what}: input gradient", **tolerance)
            close(ours.weight.grad, reference.weight.grad, f"{what}: weight gradient", **tolerance)
            close(ours.bias.grad, reference.bias.grad, f"{what}: bias gradient", **tolerance)
            close(ours.running_mean, reference.running_mean, f"{what}: running mean")
            close(ours.running_var, reference.running_var, f"{what}: running var")
            assert int(ours.num_batches_tracked) == int(reference.num_batches_tracked)
            for m in (ours, reference):
                m.zero_grad()
    # convert_sync_batchnorm: torch's and gpuopt's layers, shared parameters and buffers
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), gpuopt.nn.BatchNorm2d(4,
                                eps_inside_sqrt=False))
    weight = model[1].weight
    converted = gpuopt.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert all(type(m) is gpuopt.nn.SyncBatchNorm for m in list(converted)[1:])
    assert converted[1].weight is weight and converted[2].eps_inside_sqrt is False
    converted(torch.randn(2, 3, 6, 6)).sum().backward()


def fsdp_lion_and_schedule_free(tmp):
    """FSDP2 + gpuopt.Lion = FSDP2 + lion-pytorch's Lion, and FSDP2 + gpuopt.AdamWScheduleFree =
    FSDP2 + schedulefree's, on the same sharding: parameters (the averages, after eval()) and states,
    which are DTensors placed like their parameters."""
    import lion_pytorch
    import schedulefree

    for ours_cls, theirs_cls, kwargs in ((gpuopt.Lion, lion_pytorch.Lion, dict(lr=1e-3, weight_decay=0.1)),
                                         (gpuopt.AdamWScheduleFree, schedulefree.AdamWScheduleFree,
                                          dict(lr=1e-2, warmup_steps=2, weight_decay=0.01))):
        base, x, y = model_and_data()
        ours, theirs = sharded(copy.deepcopy(base)), sharded(copy.deepcopy(base))
        opt, ref = ours_cls(ours.parameters(), **kwargs), theirs_cls(theirs.parameters(), **kwargs)
        for o in (opt, ref):
            if hasattr(o, "train"):
                o.train()
        train(ours, opt, x, y, 4)
        train(theirs, ref, x, y, 4)
        for o in (opt, ref):
            if hasattr(o, "eval"):
                o.eval()
        name = ours_cls.__name__
        for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert isinstance(p, DTensor)
            close(p, q, f"{name}: {n}")
            for key, value in opt.state[p].items():
                assert isinstance(value, DTensor) and value.placements == p.placements, (name, key)
                close(value, ref.state[q][key], f"{name}: state {key} of {n}", rtol=1e-4, atol=1e-5)


def fsdp_lamb_and_lars(tmp):
    """FSDP2 + gpuopt.LAMB / LARS = one process stepping the whole model on the whole batch: their
    per-tensor norms are of the whole parameter (the shards' sums all-reduced), not of the shard."""
    for cls, kwargs in ((gpuopt.LAMB, dict(lr=1e-2, weight_decay=0.01)),
                        (gpuopt.LARS, dict(lr=0.5, weight_decay=1e-3, trust_coefficient=0.02))):
        base, x, y = model_and_data()
        whole_x, whole_y = whole_batch(x, y)
        ours, whole = sharded(copy.deepcopy(base)), copy.deepcopy(base)
        opt, ref = cls(ours.parameters(), **kwargs), cls(whole.parameters(), **kwargs)
        train(ours, opt, x, y, 4)
        train(whole, ref, whole_x, whole_y, 4)  # (the mean loss of equal batches: FSDP2's gradient)
        name = cls.__name__
        for (n, p), q in zip(ours.named_parameters(), whole.parameters()):
            close(p, q, f"{name}: {n}", rtol=1e-4, atol=1e-6)
            for key, value in opt.state[p].items():
                if key != "step":  # (a scalar)
                    assert isinstance(value, DTensor) and value.placements == p.placements, (name, key)
                close(value, ref.state[q][key], f"{name}: state {key} of {n}", rtol=1e-4, atol=1e-6)


def fsdp_muon(tmp):
    """FSDP2 + gpuopt.Muon = one process stepping the whole model with torch.optim.Muon on the whole
    batch: each matrix is orthogonalized whole (gathered on one rank, scattered back), rows split
    unevenly (7, 5 and 3 rows over 2 and 3 ranks)."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 7, bias=False), torch.nn.Tanh(), torch.nn.Linear(7, 5, bias=False),
                               torch.nn.Tanh(), torch.nn.Linear(5, 3, bias=False))
    torch.manual_seed(100 + dist.get_rank())
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    whole_x, whole_y = whole_batch(x, y)
    ours, whole = sharded(copy.deepcopy(base)), copy.deepcopy(base)
    opt = gpuopt.Muon(ours.parameters(), lr=0.02, weight_decay=0.01)
    ref = torch.optim.Muon(whole.parameters(), lr=0.02, weight_decay=0.01)
    train(ours, opt, x, y, 3)
    train(whole, ref, whole_x, whole_y, 3)
    for (n, p), q in zip(ours.named_parameters(), whole.parameters()):
        assert isinstance(p, DTensor)
        close(p, q, f"Muon: {n}", rtol=1e-3, atol=2e-4)  # (bf16 Newton–Schulz on both sides)
        buffer = opt.state[p]["momentum_buffer"]
        assert isinstance(buffer, DTensor) and buffer.placements == p.placements
        close(buffer, ref.state[q]["momentum_buffer"], f"Muon: momentum of {n}", rtol=1e-3, atol=1e-5)


def fsdp_adafactor(tmp):
    """FSDP2 + gpuopt.Adafactor = one process stepping the whole model with torch.optim.Adafactor
    on the whole batch: the weights' rows are sharded (7 and 5 rows over 2 and 3 ranks, one rank
    of 3 with a single row), so each matrix's column statistics and RMS are summed over the
    ranks (a rank of 3 holds none of the last layer's 2 rows); row_var is sharded like its weight,
    col_var held by the first rank (torch.chunk of its one row), as torch's own states are placed."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 2))  # (2 rows: one of 3 ranks holds none of them)
    torch.manual_seed(100 + dist.get_rank())
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    whole_x, whole_y = whole_batch(x, y)
    ours, whole = sharded(copy.deepcopy(base)), copy.deepcopy(base)
    opt = gpuopt.Adafactor(ours.parameters(), lr=0.02, weight_decay=0.01)
    ref = torch.optim.Adafactor(whole.parameters(), lr=0.02, weight_decay=0.01)
    train(ours, opt, x, y, 4)
    train(whole, ref, whole_x, whole_y, 4)
    for (n, p), q in zip(ours.named_parameters(), whole.parameters()):
        close(p, q, f"Adafactor: {n}", rtol=1e-4, atol=1e-6)
        for key, value in opt.state[p].items():
            if key != "step":
                assert isinstance(value, DTensor) and value.placements == p.placements, key
                close(value, ref.state[q][key], f"Adafactor: state {key} of {n}", rtol=1e-4, atol=1e-7)


def fsdp_adamw_and_sgd(tmp):
    """fsdp_optimizers for two of them (the 3-rank run: uneven shards, 3 + 3 + 1 rows)."""
    fsdp_optimizers(tmp, [OPTIMIZERS[0], OPTIMIZERS[2]])


SCENARIOS = {f.__name__: f for f in (fsdp_optimizers, fsdp_mixed_precision, fsdp_checkpoint, clip_norms,
                                     tensor_parallel_and_ema, ddp_and_zero, sync_batch_norm,
                                     fsdp_lion_and_schedule_free, fsdp_lamb_and_lars, fsdp_muon, fsdp_adafactor)}
SCENARIOS["fsdp_adamw_and_sgd"] = fsdp_adamw_and_sgd


def run(rank, world, port, tmp, names):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name in names:
            SCENARIOS[name](tmp)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every check passed: leave without the interpreter's teardown, which gloo's worker threads
    # can abort (SIGABRT, "terminate called without an active exception": pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
