"""Optimizer suite: one ``opt.step()`` as a user calls it (eager, Python overhead included), gpuopt
against every PyTorch alternative, on flat tensors and on GPT-2-medium and ResNet-50 shapes."""

from __future__ import annotations

import gc
import inspect
import math
import time

import torch

import gpuopt

from . import cupy_baseline
from .common import Row
from .shapes import gpt2_medium_shapes, resnet50_shapes

# name → (torch.optim / gpuopt class, kwargs, fp32 state tensors per element)
ALGORITHMS = {
    "SGD momentum": ("SGD", dict(lr=0.01, momentum=0.9), 1),
    "Adam": ("Adam", dict(lr=1e-3), 2),
    "AdamW": ("AdamW", dict(lr=1e-3, weight_decay=0.01), 2),
    "RMSprop": ("RMSprop", dict(lr=1e-3), 1),
    "Adagrad": ("Adagrad", dict(lr=1e-2), 1),
    "Lion": ("Lion", dict(lr=1e-4, weight_decay=0.1), 1),
    "AdamW Schedule-Free": ("AdamWScheduleFree", dict(lr=2.5e-3, weight_decay=0.01), 2),
    "EMA": (None, dict(decay=0.999), None),
}


def cases(gpu: bool, quick: bool):
    """(case name, shapes, param dtype, master weights)."""
    if not gpu:  # the interpreter: tiny sizes, only to show the bench runs end to end
        return [("flat 2^12", [(1 << 12,)], torch.float32, False),
                ("GPT-2-like tiny", gpt2_medium_shapes(n_layer=1, d=16, vocab=64, n_ctx=8), torch.float32, False),
                ("GPT-2-like tiny bf16+master", gpt2_medium_shapes(n_layer=1, d=16, vocab=64, n_ctx=8),
                 torch.bfloat16, True)]
    flat = [20, 27] if quick else [20, 24, 27, 29]
    out = [(f"flat 2^{k}", [(1 << k,)], torch.float32, False) for k in flat]
    out += [("GPT-2 medium (292 tensors)", gpt2_medium_shapes(), torch.float32, False),
            ("ResNet-50 (161 tensors)", resnet50_shapes(), torch.float32, False),
            ("GPT-2 medium bf16+fp32 master", gpt2_medium_shapes(), torch.bfloat16, True)]
    return out


def bytes_moved(numel: int, algorithm: str, param_dtype: torch.dtype, master: bool) -> int:
    """DESIGN.md's floor: read p (and its fp32 master, which follows edits of p), g and the
    states; write p (and master) and the states. EMA: read p and the average, write the average."""
    size = torch.tensor([], dtype=param_dtype).element_size()
    if algorithm == "EMA":
        return 3 * size * numel
    states = ALGORITHMS[algorithm][2]
    weight = 4 if master else size
    extra = size if master else 0  # the 16-bit parameter, read and written beside its master
    per_element = (weight + extra + size + 4 * states) + (weight + extra + 4 * states)
    return per_element * numel


def _parameters(cls):
    return inspect.signature(cls.__init__).parameters


def _torch_variants(algorithm: str, master: bool, gpu: bool = False):
    """(class, [(label, constructor kwargs)]) of the alternatives users come from: torch.optim's
    that exist for this algorithm, or the library that defines it (Lion: lion-pytorch, with its
    Triton kernel on a GPU); (None, []) when that library is not installed."""
    name, kwargs, _ = ALGORITHMS[algorithm]
    if name == "Lion":
        try:
            from lion_pytorch import Lion
        except ImportError:
            return None, []
        return Lion, [("lion-pytorch", dict(kwargs))] + ([("lion-pytorch use_triton", dict(kwargs, use_triton=True))]
                                                         if gpu else [])
    if name == "AdamWScheduleFree":
        try:
            from schedulefree import AdamWScheduleFree
        except ImportError:
            return None, []
        return AdamWScheduleFree, [("schedulefree foreach", dict(kwargs, foreach=True)),
                                   ("schedulefree for-loop", dict(kwargs, foreach=False))]
    cls = getattr(torch.optim, name)
    variants = []
    if "fused" in _parameters(cls):
        variants.append(("torch fused", dict(kwargs, fused=True)))
    variants.append(("torch foreach", dict(kwargs, foreach=True)))
    return cls, variants


def _training(opt):
    """Schedule-Free optimizers step only in training mode (``opt.train()``); others as they are."""
    if callable(getattr(opt, "train", None)):
        opt.train()
    return opt


def _loop_rows(row, loop: list) -> list:
    """The training loop's view of a case (layout "loop"): ``(implementation, ms per step)`` of
    steps called back to back with one synchronisation (``Timer.back_to_back``), eager and
    graph-replayed. The note gives each eager row's eager/graph ratio: the host path's cost,
    1.0 when the GPU never waits for the host."""
    times = dict(loop)
    rows = []
    for impl, ms in loop:
        graph = times.get(impl + ", CUDA graph")
        note = "steps back to back, one sync" + (f"; eager/graph {ms / graph:.2f}" if graph and ms else "")
        rows.append(row(impl, ms, note, layout="loop"))
    return rows


def _graphed(step):
    """Capture ``step`` in a CUDA graph (after a side-stream warm-up) and return its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(timer, copy_gbps: float, gpu: bool, quick: bool, algorithms=None, log=print, compile=True) -> list[Row]:
    device = "cuda" if gpu else "cpu"
    rows = []
    for case, shapes, dtype, master in cases(gpu, quick):
        numel = sum(math.prod(s) for s in shapes)
        params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.1) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        for algorithm in algorithms or ALGORITHMS:
            if master and algorithm not in ("AdamW", "SGD momentum"):
                continue
            dtype_name = str(dtype).replace("torch.", "") + ("+master" if master else "")
            row = lambda impl, ms, note="", layout="—": Row(  # noqa: E731
                "optim", case, algorithm, dtype_name, layout, impl, ms, bytes_moved(numel, algorithm, dtype, master),
                copy_gbps, note)
            log(f"  optim: {case} / {algorithm}")
            rows.extend(_time_algorithm(timer, row, algorithm, params, master, gpu, compile))
            _free()
        del params
        _free()
    return rows


def _time_algorithm(timer, row, algorithm, params, master, gpu, compile):
    out = []
    name, kwargs, _ = ALGORITHMS[algorithm]
    if algorithm == "EMA":
        ema = gpuopt.EMA(params, **kwargs)
        out.append(row("gpuopt", timer(ema.update)))
        del ema
        module = torch.nn.ParameterList(params)
        averaged = torch.optim.swa_utils.AveragedModel(
            module, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(kwargs["decay"]), use_buffers=False)
        averaged.update_parameters(module)  # the first call only copies
        out.append(row("torch swa_utils.AveragedModel", timer(lambda: averaged.update_parameters(module))))
        del averaged
        averages = [p.detach().clone() for p in params]
        out.append(row("torch._foreach_lerp_", timer(
            lambda: torch._foreach_lerp_(averages, [p.detach() for p in params], 1 - kwargs["decay"]))))
        return out

    # gpuopt, eager and (GPU) CUDA-graph replayed
    extra = dict(master_weights=True) if master else {}
    opt = _training(getattr(gpuopt, name)(params, **kwargs, **extra))
    out.append(row("gpuopt", timer(opt.step)))
    loop = [("gpuopt", timer.back_to_back(opt.step))]
    del opt
    if gpu and not getattr(getattr(gpuopt, name), "_host_schedule", False):  # (a host schedule cannot replay)
        opt = _training(getattr(gpuopt, name)(params, **kwargs, **extra, capturable=True))
        replay = _graphed(opt.step)
        out.append(row("gpuopt, CUDA graph", timer(replay), "capturable=True, graph.replay()"))
        loop.append(("gpuopt, CUDA graph", timer.back_to_back(replay)))
        del opt, replay

    if algorithm == "AdamW" and not master and cupy_baseline.available(gpu) and cupy_baseline.supports(params[0].dtype):
        opt = cupy_baseline.AdamW(params, **kwargs)
        out.append(row("CuPy ElementwiseKernel", timer(opt.step), "hand-written CUDA C, one launch per tensor"))
        del opt

    # torch: on fp32 master copies when the params are bf16 (what a torch user writes), then a
    # foreach copy back to the bf16 params, which the row's time includes.
    cls, variants = _torch_variants(algorithm, master, gpu)
    targets = [torch.nn.Parameter(p.detach().float()) for p in params] if master else params
    if master:
        for t, p in zip(targets, params):
            t.grad = p.grad.float()
    for label, kw in variants:
        try:
            opt = _training(cls(targets, **kw))
        except (RuntimeError, ValueError, TypeError) as exc:  # e.g. a fused kernel this build lacks
            out.append(row(label, None, f"unavailable: {str(exc).splitlines()[0][:60]}"))
            continue
        step = opt.step
        if master:
            def step(opt=opt):
                opt.step()
                torch._foreach_copy_([p.data for p in params], [t.data for t in targets])
        out.append(row(label, timer(step), "on fp32 masters + _foreach_copy_ to bf16" if master else ""))
        if label == "torch fused":
            loop.append((label, timer.back_to_back(step)))
        if gpu and label == "torch fused" and "capturable" in _parameters(cls) and not master:
            del opt
            opt = cls(targets, **kw, capturable=True)
            replay = _graphed(opt.step)
            out.append(row("torch fused, CUDA graph", timer(replay), "capturable=True, graph.replay()"))
            loop.append(("torch fused, CUDA graph", timer.back_to_back(replay)))
            del replay
        del opt
        _free()
    out.extend(_loop_rows(row, loop))
    if gpu and compile and not master and cls is not None and cls.__module__.startswith("torch."):
        opt = cls(targets, **kwargs, **(dict(foreach=True) if "foreach" in _parameters(cls) else {}))
        compiled = torch.compile(opt.step)
        start = time.perf_counter()
        compiled()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        out.append(row("torch.compile(opt.step)", timer(compiled), f"compile {compile_s:.1f} s, not in the time"))
        del opt, compiled
        torch._dynamo.reset()
    return out
