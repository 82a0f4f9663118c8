"""What every suite shares: timing, the copy-bandwidth floor, the environment, rows, CSV and plot."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Row:
    """One timed implementation of one case. ``bytes`` is the analytic minimum traffic (DESIGN.md)."""

    suite: str
    case: str            # what is being stepped / normalized (shapes)
    op: str              # algorithm or pass
    dtype: str
    layout: str
    impl: str            # "gpuopt", "torch fused", ...
    median_ms: float | None
    bytes: int
    copy_gbps: float
    note: str = ""
    speedup: float | None = field(default=None)  # gpuopt's time / this row's, filled in by finish()

    @property
    def gbps(self):
        return self.bytes / (self.median_ms * 1e-3) / 1e9 if self.median_ms else None

    @property
    def pct_of_copy(self):
        return 100.0 * self.gbps / self.copy_gbps if self.median_ms else None

    @property
    def floor_ms(self):
        return self.bytes / (self.copy_gbps * 1e9) * 1e3


class Timer:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on a GPU (warm-up first, L2
    flushed between runs, CUDA events), wall-clock median of a few calls on the CPU."""

    def __init__(self, gpu: bool, quick: bool):
        self.gpu, self.quick = gpu, quick

    def __call__(self, fn) -> float:
        if self.gpu:
            import triton

            return float(triton.testing.do_bench(fn, warmup=25, rep=50 if self.quick else 200, return_mode="median"))
        fn()  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def back_to_back(self, fn) -> float:
        """Milliseconds per call of ``fn()`` called many times back to back with one
        synchronisation at the end — what a training loop sees. ``do_bench`` times one call at a
        time behind an L2 flush, which keeps the GPU busy while the host prepares the call; here
        a host path longer than the kernel shows as time (the median of 5 runs of 100 calls on a
        GPU, 3 of 20 with --quick; 1 of 2 on the CPU, where it times nothing)."""
        calls, runs = (2, 1) if not self.gpu else ((20, 3) if self.quick else (100, 5))
        synchronize = torch.cuda.synchronize if self.gpu else (lambda: None)
        fn()  # warm-up
        synchronize()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            synchronize()
            times.append((time.perf_counter() - start) * 1e3 / calls)
        return statistics.median(times)


def copy_bandwidth_gbps(timer: Timer, gpu: bool) -> float:
    """Device-to-device copy of 1 GiB (16 MiB on the CPU), read + written bytes per second / 1e9."""
    n_bytes = (1 << 30) if gpu else (16 << 20)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda" if gpu else "cpu").uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def environment(gpu: bool) -> dict:
    import triton

    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version()}
    if gpu:
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda, sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()}), Triton interpreter — not a timing",
                    cuda=None)
    return info


def device_slug(info: dict, gpu: bool) -> str:
    if not gpu:
        return "cpu-interpreter"
    return "".join(c if c.isalnum() else "-" for c in info["device"]).strip("-").lower()


def finish(rows: list[Row]) -> None:
    """Speedup of gpuopt over every other implementation of the same case (same run)."""
    groups = {}
    for r in rows:
        groups.setdefault((r.suite, r.case, r.op, r.dtype, r.layout), []).append(r)
    for group in groups.values():
        ours = next((r for r in group if r.impl == "gpuopt"), None)
        for r in group:
            if ours and ours.median_ms and r.median_ms:
                r.speedup = r.median_ms / ours.median_ms


def print_table(rows: list[Row], title: str) -> None:
    print(f"\n## {title}\n")
    header = f"{'case':28s} {'op':14s} {'dtype':9s} {'layout':8s} {'implementation':30s} {'median ms':>10s} " \
             f"{'GB/s':>8s} {'% copy':>7s} {'floor ms':>9s} {'gpuopt ×':>9s}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        ms = f"{r.median_ms:10.4f}" if r.median_ms else f"{'—':>10s}"
        gbps = f"{r.gbps:8.0f}" if r.median_ms else f"{'—':>8s}"
        pct = f"{r.pct_of_copy:6.1f}%" if r.median_ms else f"{'—':>7s}"
        speed = f"{r.speedup:8.2f}×" if (r.speedup and r.impl != "gpuopt") else f"{'':9s}"
        print(f"{r.case[:28]:28s} {r.op[:14]:14s} {r.dtype:9s} {r.layout:8s} {r.impl[:30]:30s} {ms} {gbps} {pct} "
              f"{r.floor_ms:9.4f} {speed}  {r.note}")


def write_csv(rows: list[Row], path: str, info: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write("# " + ", ".join(f"{k}={v}" for k, v in info.items()) + "\n")
        writer = csv.writer(f)
        writer.writerow(["suite", "case", "op", "dtype", "layout", "implementation", "median_ms", "bytes", "GB/s",
                         "pct_of_copy", "floor_ms", "gpuopt_speedup", "note"])
        for r in rows:
            d = asdict(r)
            writer.writerow([d["suite"], d["case"], d["op"], d["dtype"], d["layout"], d["impl"],
                             f"{r.median_ms:.5f}" if r.median_ms else "", r.bytes,
                             f"{r.gbps:.1f}" if r.median_ms else "", f"{r.pct_of_copy:.1f}" if r.median_ms else "",
                             f"{r.floor_ms:.5f}", f"{r.speedup:.4g}" if r.speedup else "", r.note])


def plot(rows: list[Row], path: str, info: dict) -> None:
    """Per suite, % of copy bandwidth: gpuopt against the fastest PyTorch alternative, case by case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = sorted({r.suite for r in rows})
    fig, axes = plt.subplots(len(suites), 1, figsize=(11, 0.32 * len(rows) / max(1, len(suites)) + 2.5),
                             squeeze=False)
    for ax, suite in zip(axes[:, 0], suites):
        groups = {}
        for r in rows:
            if r.suite == suite and r.median_ms and "graph" not in r.impl and "compile time" not in r.note:
                groups.setdefault((r.case, r.op, r.dtype, r.layout), []).append(r)
        labels, ours, best = [], [], []
        for key, group in groups.items():
            mine = [r for r in group if r.impl == "gpuopt"]
            others = [r for r in group if r.impl != "gpuopt"]
            if not mine or not others:
                continue
            labels.append(" ".join(k for k in key if k and k != "—"))
            ours.append(mine[0].pct_of_copy)
            best.append(max(r.pct_of_copy for r in others))
        y = range(len(labels))
        ax.barh([i + 0.2 for i in y], ours, height=0.4, label="gpuopt")
        ax.barh([i - 0.2 for i in y], best, height=0.4, label="fastest PyTorch alternative")
        ax.set_yticks(list(y))
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("% of measured copy bandwidth (higher is faster)")
        ax.set_title(f"{suite} — {info['device']}", fontsize=9)
        ax.axvline(100, color="gray", linewidth=0.5)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
