"""gpuopt's benchmarks against PyTorch and against the memory floor.

    python -m bench [--suite optim|bn|all|host] [--quick] [--no-compile] [--out-dir bench/results]

``--suite host`` (runs anywhere, no GPU needed): the CPU time of an eager step around the
launches, which are stubbed out, gpuopt and torch fused side by side (bench/host_suite.py).

On a CUDA GPU: every row is the median of many timed runs (``triton.testing.do_bench``, warm-up
first, L2 flushed between runs), its effective GB/s from an analytic byte count (DESIGN.md), the
percentage of the copy bandwidth measured in this same run (a 1 GiB device-to-device copy, read +
written bytes), the floor time (bytes / copy bandwidth), and gpuopt's speedup over each PyTorch
alternative timed in this same run. Prints one table per suite, writes
``bench/results/<device>.csv`` (the environment in its first line) and ``<device>.png``
(``<device>-optim.csv`` / ``-bn`` with ``--suite``).

Without a GPU it runs tiny cases through Triton's interpreter, to show the bench works end to end;
those numbers time the interpreter, not the kernels, and are labelled so.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from . import bn_suite, host_suite, optim_suite  # noqa: E402
from .common import Timer, copy_bandwidth_gbps, device_slug, environment, finish, plot, print_table, write_csv  # noqa: E402,E501


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["optim", "bn", "all", "host"], default="all")
    parser.add_argument("--quick", action="store_true", help="a subset of cases and dtypes, shorter timing")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile alternatives (each compiles for minutes in total)")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.suite == "host":
        rows = host_suite.run(args.quick, log=lambda message: print(message, file=sys.stderr, flush=True))
        host_suite.print_host_table(rows)
        return rows

    gpu = torch.cuda.is_available()
    info = environment(gpu)
    timer = Timer(gpu, args.quick)
    copy_gbps = copy_bandwidth_gbps(timer, gpu)
    info["copy_GBps"] = round(copy_gbps, 1)
    print("gpuopt bench — " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if not gpu:
        print("No CUDA GPU: tiny cases through Triton's interpreter, to show the bench runs. These times "
              "measure the interpreter, not the kernels.")
    print(f"copy bandwidth (read + write) measured in this run: {copy_gbps:.0f} GB/s", flush=True)

    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    if args.suite in ("optim", "all"):
        optim_rows = optim_suite.run(timer, copy_gbps, gpu, args.quick, log=log, compile=not args.no_compile)
        finish(optim_rows)
        print_table(optim_rows, "Optimizer step (opt.step() as a user calls it, eager unless marked)")
        rows += optim_rows
    if args.suite in ("bn", "all"):
        bn_rows = bn_suite.run(timer, copy_gbps, gpu, args.quick, log=log, compile=not args.no_compile)
        finish(bn_rows)
        print_table(bn_rows, "Batch norm")
        rows += bn_rows

    slug = device_slug(info, gpu) + ("" if args.suite == "all" else f"-{args.suite}")
    csv_path = os.path.join(args.out_dir, f"{slug}.csv")
    png_path = os.path.join(args.out_dir, f"{slug}.png")
    write_csv(rows, csv_path, info)
    plot(rows, png_path, info)
    print(f"\nwrote {csv_path} and {png_path}")
    return rows


if __name__ == "__main__":
    main()
