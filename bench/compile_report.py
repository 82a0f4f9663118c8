"""Compile every gpuopt kernel for an NVIDIA target without a GPU, and report what the compiler did.

    python bench/compile_report.py [--arch 90]

Step 1 runs a small call of each kernel through Triton's interpreter (a child process with
TRITON_INTERPRET=1) and records the argument types and constexprs of every launch. Step 2 compiles
each recorded signature to PTX and cubin with Triton's own LLVM and ptxas, and prints registers,
spills and the widest global load/store (``v4`` = 16-byte accesses). It proves the kernels compile
(the interpreter accepts code the compiler rejects) and shows register pressure; it does not
time anything.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

CAPTURE = r'''
import os, json, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch, gpuopt
records = []
def encode(value):
    """A constexpr as JSON: an update function or a flags namedtuple by where to find it."""
    if hasattr(value, "fn") and hasattr(value, "arg_names"):
        return {"jit": [value.fn.__module__, value.fn.__name__]}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {"flags": [type(value).__module__, type(value).__name__], "values": list(value)}
    return value
def record(module, name, kernel, args, kwargs):
    names = kernel.arg_names
    sig, constexprs, ints = {}, {}, {}
    for n, a in zip(names, args):
        if isinstance(a, torch.Tensor):
            sig[n] = "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                            torch.int32: "i32", torch.int64: "i64", torch.float64: "fp64"}[a.dtype]
        elif isinstance(a, bool) or a is None:
            sig[n] = "constexpr"; constexprs[n] = a
        elif isinstance(a, int):
            sig[n] = "i32" if -2**31 <= a < 2**31 else "i64"
            ints[n] = a
        else:  # a float: the kernel's annotation (tl.float64 hyperparameters) or Triton's default
            sig[n] = "fp64" if str(kernel.fn.__annotations__.get(n)) == "fp64" else "fp32"
    shown = name
    for n, v in kwargs.items():
        if n in ("num_warps", "num_stages"):
            continue
        sig[n] = "constexpr"; constexprs[n] = encode(v)
        if n == "UPDATE":  # the shared walk: named after the algorithm's update
            shown = v.fn.__name__ + ("_f64" if "_f64" in name else "")
    records.append(dict(module=module.__name__, kernel=name, shown=shown, signature=sig,
                        constexprs=constexprs, ints=ints, num_warps=kwargs.get("num_warps", 4)))
def spy(module, name):
    kernel = getattr(module, name)
    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                record(module, name, kernel, args, kwargs)
                return kernel[grid](*args, **kwargs)
            return launch
    setattr(module, name, Spy())
# Adafactor's tile kernels, launched by its plan from the algorithm's tuple: recorded at the launch.
from gpuopt import _launch
from gpuopt.kernels import adafactor as _adafactor
_tiles = {id(getattr(_adafactor, n)): n for n in ("_statistics", "_norms", "_update", "_statistics_f64", "_norms_f64",
                                                   "_update_f64")}
_plain_launch = _launch.launch
def _recorded_launch(kernel, grid, args, constexprs, num_warps, **kw):
    if id(kernel) in _tiles:
        record(_adafactor, _tiles[id(kernel)], kernel, args, dict(constexprs, num_warps=num_warps))
    return _plain_launch(kernel, grid, args, constexprs, num_warps, **kw)
_launch.launch = _recorded_launch
from gpuopt.kernels import _multi_tensor
spy(_multi_tensor, "_step_kernel")
spy(_multi_tensor, "_step_f64_kernel")  # float64 tensors: float64 hyperparameters
for dtype, extra in [(torch.float32, {}), (torch.bfloat16, dict(master_weights=True)),
                     (torch.bfloat16, dict(stochastic_rounding=True)), (torch.float64, {})]:
    for cls, kw in [("Adam", dict(amsgrad=True)), ("AdamW", {}), ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
                    ("RMSprop", dict(centered=True, momentum=0.9)), ("Adagrad", {}), ("Adadelta", {}),
                    ("Lion", dict(weight_decay=0.1)), ("AdamWScheduleFree", dict(weight_decay=0.1)),
                    ("LAMB", dict(weight_decay=0.1)), ("LARS", dict(lr=0.1, weight_decay=0.1)),
                    ("Muon", {}), ("Adafactor", dict(weight_decay=0.1))]:
        shape = (20, 15) if cls == "Muon" else (40, 152) if cls == "Adafactor" else (300,)  # (matrices)
        p = torch.nn.Parameter(torch.randn(shape).to(dtype)); p.grad = torch.randn_like(p)
        opt = getattr(gpuopt, cls)([p], **kw, **extra)
        if cls == "AdamWScheduleFree":
            opt.train()
        opt.step(grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))
        opt.step()  # and without AMP tensors, the common path
        if cls == "AdamWScheduleFree":
            opt.eval()  # the mode switch's launch
    gpuopt.EMA([torch.randn(300).to(dtype)]).update()
# Batch norm at the GPU's tile sizes (GPUOPT_GPU_CONFIG): both layouts, every dtype, both ε
# placements, training and evaluation, forward and backward.
os.environ["GPUOPT_GPU_CONFIG"] = "1"
from gpuopt.kernels import batch_norm as bn
for n in ("_stats_kernel", "_stats_combine_kernel", "_normalize_kernel", "_backward_reduce_kernel",
          "_backward_combine_kernel", "_backward_input_kernel", "_stats_combine_f64_kernel", "_normalize_f64_kernel",
          "_backward_combine_f64_kernel",
          "_backward_input_f64_kernel"):
    spy(bn, n)
# Arguments equal to 1 become compile-time constants in a real launch (Triton specialises them):
# one channel, one sample, one spatial position.
for shape, layout in (((1, 1, 16, 16), torch.contiguous_format), ((4, 1, 8, 8), torch.channels_last),
                      ((2, 8, 1, 1), torch.contiguous_format), ((1, 16, 4, 4), torch.contiguous_format)):
    x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_()
    C = shape[1]
    w = torch.ones(C, requires_grad=True); b = torch.zeros(C, requires_grad=True)
    gpuopt.functional.batch_norm(x, torch.zeros(C), torch.ones(C), w, b, training=True).backward(torch.ones_like(x))
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for layout in (torch.contiguous_format, torch.channels_last):
        for eps_inside_sqrt in ((True, False) if dtype == torch.float32 else (True,)):
            for training in (True, False):
                x = torch.randn(2, 8, 16, 16).to(dtype).contiguous(memory_format=layout).requires_grad_()
                w = torch.ones(8, requires_grad=True); b = torch.zeros(8, requires_grad=True)
                y = gpuopt.functional.batch_norm(x, torch.zeros(8), torch.ones(8), w, b, training=training,
                                                 eps_inside_sqrt=eps_inside_sqrt)
                y.backward(torch.ones_like(y))
# Short rows (channels-first, S = 49: read as columns of C·S, see gpuopt/kernels/batch_norm.py).
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for training in (True, False):
        x = torch.randn(4, 8, 7, 7).to(dtype).requires_grad_()
        w = torch.ones(8, requires_grad=True); b = torch.zeros(8, requires_grad=True)
        gpuopt.functional.batch_norm(x, torch.zeros(8), torch.ones(8), w, b, training=training).backward(
            torch.ones_like(x))
# SyncBatchNorm's combine: a rank's summary, then the fold of the ranks' (here one rank's own).
from gpuopt._batch_norm import passes_of
from gpuopt import _batch_norm_launch
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    x, passes = passes_of(torch.randn(2, 8, 16, 16).to(dtype), None, None, torch.zeros(8), True, 0.1, 1e-5, True)
    _batch_norm_launch.forward_training(x, passes, None, None, torch.zeros(8), torch.ones(8), None,
                                        exchange=lambda summary: summary.view(3, 1, -1))
for extra in CAPTURE_EXTRA:
    exec(extra)
seen, unique = set(), []
for r in records:
    key = json.dumps(r, sort_keys=True, default=str)
    if key not in seen:
        seen.add(key); unique.append(r)
json.dump(unique, open(sys.argv[1], "w"), default=str)
'''


def ptxas_report(ptx: str, arch: int):
    """(registers, spill bytes) from ptxas -v, using the ptxas that ships with Triton."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # Triton may ship two; the newer (named for Blackwell) reads the PTX versions Triton emits.
    ptxas = next(p for p in (os.path.join(bin_dir, "ptxas-blackwell"), os.path.join(bin_dir, "ptxas"))
                 if os.path.exists(p))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        open(src, "w").write(ptx)
        suffix = "a" if arch >= 90 else ""
        res = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    if os.environ.get("GPUOPT_DEBUG_PTXAS"):
        print(text)
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return (regs.group(1) if regs else "?"), (spill.group(1) if spill else "?")


def sass_loops(cubin: bytes):
    """(instructions, barriers, local-memory accesses) of the kernel's data loop in its SASS (``cuobjdump -sass``), a loop
    being the span between a backward branch and its target. The data loop: of the innermost loops,
    the one with the most 16-byte global loads, the leanest if several (the batch-norm statistics
    kernel's edge-tile loops, which see a few tiles per program, load as wide as its main loop);
    the largest loop in a kernel without 16-byte loads (the combine kernels). Its count includes
    the tail-block path where the loop holds one."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        open(path, "wb").write(cubin)
        res = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
    code = []  # (address, instruction text)
    for line in res.stdout.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2).strip()))
    spans = []
    for address, text in code:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < address:
            spans.append((int(m.group(1), 16), address))
    loops = []
    for start, end in spans:
        if any(start <= s2 and e2 <= end and (s2, e2) != (start, end) for s2, e2 in spans):
            continue  # holds another loop: not innermost
        body = [t for a, t in code if start <= a <= end]
        wide = sum("LDG" in t and ".128" in t for t in body)
        barriers = sum("BAR.SYNC" in t or "BAR.ARV" in t or t.startswith("BAR ") for t in body)
        local = sum(t.startswith(("STL", "LDL")) for t in body)  # spilled registers' traffic
        loops.append((wide, -len(body), len(body), barriers, local))
    if not loops:
        return 0, 0, 0
    if max(loop[0] for loop in loops) == 0:  # no 16-byte loads: the largest loop
        _, _, size, barriers, local = max(loops, key=lambda loop: loop[2])
        return size, barriers, local
    _, _, size, barriers, local = max(loops)
    return size, barriers, local


def decode(value, dtypes):
    """A recorded constexpr back as Triton wants it (see ``encode`` in the capture)."""
    import importlib

    if isinstance(value, str):
        return dtypes.get(value, value)
    if isinstance(value, dict) and "jit" in value:
        module, name = value["jit"]
        return getattr(importlib.import_module(module), name)
    if isinstance(value, dict) and "flags" in value:
        module, name = value["flags"]
        return getattr(importlib.import_module(module), name)(*value["values"])
    return value


def compile_record(r: dict, arch: int) -> dict:
    """Compile one recorded launch signature; its figures (or the error) as a dict."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from gpuopt._adafactor import GPU_TILE
    from gpuopt._multi_tensor import GPU_BLOCK, GPU_WARPS
    from gpuopt._launch import resident_programs

    dtypes = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}
    module = importlib.import_module(r["module"])
    fn = getattr(module, r["kernel"])
    constexprs = {k: decode(v, dtypes) for k, v in r["constexprs"].items()}
    num_warps = r["num_warps"]
    if "BLOCK" in constexprs:  # multi-tensor kernels: the interpreter used a small block; a GPU's
        # LaunchPlan takes GPU_BLOCK, half of it for float64 tensors
        constexprs["BLOCK"] = GPU_BLOCK // 2 if "*fp64" in r["signature"].values() else GPU_BLOCK
        num_warps = GPU_WARPS
    if "ROWS" in constexprs:  # Adafactor's tiles: the GPU's (gpuopt._adafactor.GPU_TILE)
        constexprs["ROWS"], constexprs["COLS"], num_warps = GPU_TILE
    # As a real launch specialises: pointers 16-byte aligned, ints equal to 1 constexpr, ints
    # divisible by 16 marked so.
    signature = dict(r["signature"])
    for n, v in r.get("ints", {}).items():
        if v == 1:
            signature[n] = "constexpr"
            constexprs[n] = 1
    attrs = {}
    for i, (n, t) in enumerate(signature.items()):
        if t.startswith("*") or (t in ("i32", "i64") and r.get("ints", {}).get(n, 1) % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    flags = ",".join([k for k, v in constexprs.items() if v is True]
                     + [f for f, v in getattr(constexprs.get("FLAGS"), "_asdict", dict)().items() if v is True])
    if "*fp64" in signature.values():  # float64 data: its 16-byte accesses are v2
        flags = "FP64," + flags
    figures = dict(shown=r["shown"], flags=flags)
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    except Exception as exc:  # report every failure, not just the first
        return dict(figures, error=" | ".join(str(exc).splitlines()[:6])[:600])
    ptx = k.asm["ptx"]
    widest = lambda kind: max(re.findall(kind + r"\.global(?:\.\w+)*?\.(v\d)", ptx) or ["v1"])  # noqa: E731
    nregs, spills = ptxas_report(ptx, arch)
    # The compiled kernel's own figures: SASS instructions of its data loop per element a thread
    # handles in one iteration, barriers in that loop, and programs resident per H100 SM.
    instructions, barriers, local = sass_loops(k.asm["cubin"])
    per_iteration = (constexprs.get("BLOCK") or constexprs.get("BLOCK_R", 1) * constexprs.get("BLOCK_K", 1)
                     * constexprs.get("ROWS", 1) * constexprs.get("COLS", 1))
    registers = k.n_regs if getattr(k, "n_regs", None) else int(nregs)
    return dict(figures, regs=nregs, spills=spills, loads=widest("ld"), stores=widest("st"),
                per_element=instructions / max(1, per_iteration / (32 * num_warps)), barriers=barriers,
                loop_spills=local,
                resident=resident_programs(registers, num_warps, k.metadata.shared))


def launch_record(kernel, args: tuple, constexprs: dict, num_warps: int) -> dict:
    """A launch as the capture records it, from arguments given as dtypes (tensors), ints,
    floats and Nones."""
    import torch
    import triton.language as tl

    module = sys.modules[kernel.fn.__module__]
    name = next(n for n, v in vars(module).items() if v is kernel)
    signature, ints = {}, {}
    for n, a in zip(kernel.arg_names, args):
        if isinstance(a, torch.dtype):
            signature[n] = "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                                  torch.float64: "fp64", torch.int64: "i64"}[a]
        elif a is None or isinstance(a, bool):
            signature[n] = "constexpr"
            constexprs = {**constexprs, n: a}
        elif isinstance(a, int):
            signature[n], ints[n] = ("i32" if -2**31 <= a < 2**31 else "i64"), a
        else:
            signature[n] = "fp64" if str(kernel.fn.__annotations__.get(n)) == "fp64" else "fp32"
    signature.update((n, "constexpr") for n in constexprs)
    encoded = {n: str(v) if isinstance(v, tl.dtype) else v for n, v in constexprs.items()}
    return dict(module=module.__name__, kernel=name, shown=name, signature=signature, constexprs=encoded, ints=ints,
                num_warps=num_warps)


SUITE_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
OPTIMIZER_CASES = ("GPT-2-medium", "ResNet-50", "flat 2^29")


def batch_norm_suite_launches():
    """``[(case, [pass records], [combine records])]``: every batch-norm configuration of the bench
    suite (shape × dtype × layout) on an H100, with the launches its four shared-grid passes and
    its two combine kernels make. Their tiles differ from the small runs of the capture, so their
    occupancy (passes) and registers (combine tiles) are compiled too."""
    import math

    import torch

    from bench.bn_suite import SHAPES
    from gpuopt._launch import H100
    from gpuopt import _batch_norm_launch as bn

    cases = []
    for shape in SHAPES:
        N, C, S = shape[0], shape[1], math.prod(shape[2:])
        for channels_last in ((True,) if len(shape) == 2 else (False, True)):
            R, S_view = (N * S, 1) if channels_last else (N, S)
            for dtype_name in SUITE_DTYPES:
                dtype = getattr(torch, dtype_name)
                grid = bn.make_grid(R, C, S_view, channels_last, dtype.itemsize, True, H100.count)
                layout = "2-D" if len(shape) == 2 else ("NHWC" if channels_last else "NCHW")
                case = ("×".join(map(str, shape)), SUITE_DTYPES[dtype_name], layout, (R, C, S_view, channels_last, dtype.itemsize))
                cases.append((case, [launch_record(kernel, args, constexprs, grid.num_warps)
                                     for kernel, args, constexprs in bn.shared_grid_passes(grid, dtype)],
                              [launch_record(kernel, args, constexprs, grid.combine_warps)
                               for kernel, args, constexprs in bn.combine_launches(grid)]))
    return cases


def waves_tables(compiled_rows: list[dict], suite: list, figures_of) -> list[str]:
    """The grids gpuopt launches on an H100 for the bench suite's shapes, from the compiled
    occupancy, as it computes them on a GPU (``_launch.launch`` persistent, ``make_grid`` with
    ``resident_per_sm``): waves, and *efficiency* — the work over what the grid's rounds of
    programs could have done (1.0: every SM busy to the end; a straggler wave lowers it)."""
    import math

    from bench.shapes import gpt2_medium_shapes, resnet50_shapes
    from gpuopt._multi_tensor import GPU_BLOCK
    from gpuopt._launch import H100
    from gpuopt import _batch_norm_launch as bn

    lines = [f"Waves on H100 ({H100.count} SMs), grids from the compiled occupancy"]
    lines.append(f"{'kernels':12s} {'case':26s} {'per SM':>6s} {'blocks/regs':>11s} {'programs':>8s} {'waves':>6s}"
                 f" {'efficiency':>10s}")
    numels = {"GPT-2-medium": [math.prod(s) for s in gpt2_medium_shapes()],
              "ResNet-50": [math.prod(s) for s in resnet50_shapes()], "flat 2^29": [1 << 29]}
    for resident in sorted({row["resident"] for row in compiled_rows if "_update" in row["shown"]}):
        for case in OPTIMIZER_CASES:
            blocks = sum(-(-n // GPU_BLOCK) for n in numels[case])
            programs = min(blocks, resident * H100.count)
            efficiency = (blocks / programs) / -(-blocks // programs)
            lines.append(f"{'optimizer':12s} {case:26s} {resident:6d} {blocks:11d} {programs:8d}"
                         f" {programs / (resident * H100.count):6.2f} {efficiency:10.3f}")
    for (shape, dtype, layout, (R, C, S, channels_last, element_size)), records, _ in suite:
        per_sm = min(figures_of(r)["resident"] for r in records)
        g = bn.make_grid(R, C, S, channels_last, element_size, True, H100.count, per_sm)
        wave, programs = per_sm * H100.count, g.channel_blocks * g.n_splits
        tiles_per_split = (g.rows_per_split // g.block_r) * (g.cols_per_split // g.block_k)
        all_tiles = g.channel_blocks * -(-R // g.block_r) * (1 if channels_last or g.short_rows else -(-S // g.block_k))
        layout += " (short rows)" if g.short_rows else ""
        efficiency = all_tiles / (-(-programs // wave) * wave * tiles_per_split)
        regs = "/".join(str(figures_of(r)["regs"]) for r in records)
        lines.append(f"{'batch norm':12s} {shape + ' ' + dtype + ' ' + layout:26s} {per_sm:6d} {regs:>11s}"
                     f" {programs:8d} {programs / wave:6.2f} {efficiency:10.3f}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--only", default="", help="compile only the kernels whose name contains this")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "records.json")
        extra = os.environ.get("GPUOPT_CAPTURE_EXTRA", "")
        code = CAPTURE.replace("CAPTURE_EXTRA", repr([extra] if extra else []))
        subprocess.run([sys.executable, "-c", code, out], check=True)
        records = json.load(open(out))
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench.*, as a script
    suite = batch_norm_suite_launches()
    # The suite's combine launches join the signatures' table (and its checks): their tiles grow
    # with the splits, which the capture's small inputs never have many of.
    records = list({json.dumps(r, sort_keys=True, default=str): r
                    for r in records + [r for _, _, combines in suite for r in combines]}.values())
    # Each distinct signature compiled once, in parallel (forked workers: compiling is CPU-bound).
    if args.only:
        records = [r for r in records if args.only in r["kernel"]]
        suite = [(shape, [r for r in rs if args.only in r["kernel"]], [r for r in cs if args.only in r["kernel"]])
                 for shape, rs, cs in suite]
    jobs = {}
    for r in records + [r for _, rs, _ in suite for r in rs]:
        jobs.setdefault(json.dumps(r, sort_keys=True, default=str), r)
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("fork")) as pool:
        figures = dict(zip(jobs, pool.map(compile_record, jobs.values(), [args.arch] * len(jobs))))
    figures_of = lambda r: figures[json.dumps(r, sort_keys=True, default=str)]  # noqa: E731

    print(f"{'kernel':26s} {'constexprs (flags on)':80s} {'regs':>4s} {'spill':>5s} {'loads':>14s} {'stores':>14s}"
          f" {'SASS/el':>7s} {'bars':>4s} {'per SM':>6s} {'loop lmem':>9s}")
    failures = [f for f in figures.values() if "error" in f]
    rows = []
    for r in records:
        f = figures_of(r)
        if "error" in f:
            print(f"{f['shown']:26s} {f['flags']:80s} COMPILE FAILED: {f['error']}")
            continue
        rows.append(f)
        print(f"{f['shown']:26s} {f['flags']:80s} {f['regs']!s:>4s} {f['spills']!s:>5s} {f['loads']:>14s}"
              f" {f['stores']:>14s} {f['per_element']:7.1f} {f['barriers']:4d} {f['resident']:6d} {f['loop_spills']:9d}")
    if not failures and not args.only:
        print()
        print("\n".join(waves_tables(rows, suite, figures_of)))
    print(f"{len(jobs)} launch signatures compiled for sm_{args.arch}, {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
