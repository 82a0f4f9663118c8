"""Optimizer suite: one ``opt.step()`` as a user calls it (eager, Python overhead included), gpuopt
against every PyTorch alternative, on flat tensors and on GPT-2-medium and ResNet-50 shapes."""

from __future__ import annotations

import gc
import inspect
import math
import time

import torch

import gpuopt

from . import cupy_baseline, foreach_optimizers
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
    "LAMB": ("LAMB", dict(lr=1e-3, weight_decay=0.01), 2),
    "LARS": ("LARS", dict(lr=0.1, momentum=0.9, weight_decay=1e-4), 1),
    "Muon": ("Muon", dict(lr=0.02, weight_decay=0.01), 1),
    "Adafactor": ("Adafactor", dict(lr=1e-2, weight_decay=0.01), 0),
    "EMA": (None, dict(decay=0.999), None),
}
# The floor of the algorithms a single pass cannot do, in bytes per fp32 element (gpuopt/kernels/*.py):
# LAMB and LARS need whole-tensor norms before any weight moves (a second pass); Muon's
# orthogonalization sits between its two elementwise passes (its matrix products not counted);
# Adafactor reads g for its row and column statistics, W and g for the norms of W and of the update,
# then moves W (its factors, O(R + C) a matrix, not counted).
TWO_PASS_BYTES = {"LAMB": 40, "LARS": 28, "Muon": 24, "Adafactor": 24}


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
    if algorithm in TWO_PASS_BYTES:  # (fp32 cases only: masters run for AdamW and SGD)
        return TWO_PASS_BYTES[algorithm] * numel
    states = ALGORITHMS[algorithm][2]
    weight = 4 if master else size
    extra = size if master else 0  # the 16-bit parameter, read and written beside its master
    per_element = (weight + extra + size + 4 * states) + (weight + extra + 4 * states)
    return per_element * numel


def _parameters(cls):
    return inspect.signature(cls.__init__).parameters


def _torch_variants(algorithm: str, master: bool, gpu: bool = False):
    """(torch.optim class or None, [(label, class, constructor kwargs)]) of the alternatives users
    come from: torch.optim's variants of this algorithm, or the library that defines it (Lion:
    lion-pytorch, with its Triton kernel on a GPU; Schedule-Free: schedulefree; LAMB: apex's
    FusedLAMB where installed; LAMB and LARS: the equations in torch's foreach ops); the
    torch.optim class is also compiled with torch.compile. Empty when the library is missing."""
    name, kwargs, _ = ALGORITHMS[algorithm]
    if name in ("LAMB", "LARS"):
        variants = []
        if gpu and name == "LAMB":
            try:
                from apex.optimizers import FusedLAMB
                variants.append(("apex FusedLAMB", FusedLAMB, dict(kwargs, adam_w_mode=True, max_grad_norm=0.0)))
            except ImportError:
                pass
        return None, variants + [("torch foreach (the equations)", getattr(foreach_optimizers, f"Foreach{name}"),
                                  dict(kwargs))]
    if name == "Lion":
        try:
            from lion_pytorch import Lion
        except ImportError:
            return None, []
        return None, [("lion-pytorch", Lion, dict(kwargs))] + (
            [("lion-pytorch use_triton", Lion, dict(kwargs, use_triton=True))] if gpu else [])
    if name == "AdamWScheduleFree":
        try:
            from schedulefree import AdamWScheduleFree
        except ImportError:
            return None, []
        return None, [("schedulefree foreach", AdamWScheduleFree, dict(kwargs, foreach=True)),
                      ("schedulefree for-loop", AdamWScheduleFree, dict(kwargs, foreach=False))]
    cls = getattr(torch.optim, name)
    variants = []
    if "fused" in _parameters(cls):
        variants.append(("torch fused", cls, dict(kwargs, fused=True)))
    if "foreach" in _parameters(cls):
        variants.append(("torch foreach", cls, dict(kwargs, foreach=True)))
        if name == "Adafactor":  # (torch's default for it: foreach costs ~a parameter's size of memory)
            variants.append(("torch for-loop (default)", cls, dict(kwargs, foreach=False)))
    else:
        variants.append(("torch", cls, dict(kwargs)))
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
            stepped = matrices(params) if algorithm == "Muon" else params
            count = sum(p.numel() for p in stepped)
            dtype_name = str(dtype).replace("torch.", "") + ("+master" if master else "")
            row = lambda impl, ms, note="", layout="—": Row(  # noqa: E731
                "optim", case, algorithm, dtype_name, layout, impl, ms, bytes_moved(count, algorithm, dtype, master),
                copy_gbps, "; ".join(filter(None, (note, algorithm == "Muon" and newton_schulz_rate(stepped, ms)))))
            log(f"  optim: {case} / {algorithm}")
            rows.extend(_time_algorithm(timer, row, algorithm, stepped, master, gpu, compile))
            _free()
        del params
        _free()
    return rows


def matrices(params) -> list:
    """Muon's parameters of a case: its matrices, and a flat tensor of 2^k elements viewed as one
    2^⌊k/2⌋ × 2^⌈k/2⌉ matrix (sharing its storage and gradient); other 1-D tensors left out."""
    out = [p for p in params if p.ndim == 2]
    for p in params:
        if p.ndim == 1 and len(params) == 1:
            k = p.numel().bit_length() - 1
            shape = (1 << (k // 2), p.numel() >> (k // 2))
            view = torch.nn.Parameter(p.detach().view(shape))
            view.grad = p.grad.view(shape)
            out.append(view)
    return out


def newton_schulz_rate(matrices, ms) -> str:
    """The step's Newton–Schulz work (torch's 5 bf16 iterations on each matrix, m ≤ n its sides:
    2(2m²n + m³) flops an iteration) and its rate over the whole step's time."""
    flops = sum(5 * 2 * (2 * m * m * n + m ** 3) for m, n in (sorted(p.shape) for p in matrices))
    rate = f", {flops / (ms * 1e-3) / 1e12:.2f} TFLOP/s" if ms else ""
    return f"Newton–Schulz {flops / 1e9:.2f} GFLOP a step{rate}"


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
    for label, variant, kw in variants:
        try:
            opt = _training(variant(targets, **kw))
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
    if gpu and compile and not master and cls is not None:
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
