"""the seed's running average computed by
the float64 reference and by gpuopt's fused EMA kernel, side by side, with their agreement."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import numpy as np  # noqa: E402

import gpuopt  # noqa: E402
from gpuopt import reference as ref  # noqa: E402


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"gpuopt {gpuopt.__version__} on {device} ({'compiled' if device == 'cuda' else 'Triton interpreter'})")
    torch.manual_seed(0)
    params = [torch.randn(s, device=device) for s in [(1,), (131,), (64, 3, 3, 3), (1000,)]]
    worst = 0.0
    for decay in (0.9, None):
        ema = gpuopt.EMA(params, decay=decay)
        history = [[p.double().cpu().numpy()] for p in params]
        for _ in range(10):
            for p, h in zip(params, history):
                p.normal_()
                h.append(p.double().cpu().numpy())
            ema.update()
        for average, h in zip(ema.averages, history):
            if decay is None:
                expected = ref.running_average(np.stack(h[1:]), None)[-1]
            else:
                expected = h[0]
                for c in h[1:]:
                    expected = ref.running_average_step(expected, c, decay)
            err = float(np.max(np.abs(average.double().cpu().numpy() - expected)))
            worst = max(worst, err)
            label = "exact mean" if decay is None else f"gamma={decay}"
            print(f"  running average ({label:10s}) shape {str(tuple(average.shape)):14s} max |kernel - reference| = {err:.2e}")
    ok = worst < 1e-5
    print(f"agreement: {'OK' if ok else 'FAILED'} (worst {worst:.2e}, tolerance 1e-5)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
