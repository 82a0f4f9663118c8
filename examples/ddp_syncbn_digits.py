"""The digits CNN under DDP with gpuopt.nn.SyncBatchNorm: every batch norm normalizes with the
statistics of the whole global batch (all ranks), and the run is checked against one process
training the same model on the concatenated batches with torch.nn.BatchNorm.

    torchrun --nproc-per-node 2 examples/ddp_syncbn_digits.py [--epochs 1] [--batches N]

On GPUs (one per rank, NCCL) or on the CPU (gloo; gpuopt's kernels through Triton's interpreter).
Needs scikit-learn (`bash scripts/main.sh` installs it). Each rank trains on its part of every
global batch (the ranks' parts differ in size: 40 and 24 samples on 2 ranks); SyncBatchNorm makes
the result that of the global batch, which rank 0 also trains in one process as the reference.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: gpuopt's kernels through Triton's interpreter

import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import gpuopt  # noqa: E402  (after TRITON_INTERPRET)

GLOBAL_BATCH = 64


def make_model():
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def parts(world):
    """Unequal shares of each global batch: rank 0 the most."""
    sizes = [GLOBAL_BATCH // world + (GLOBAL_BATCH // 4 if r == 0 else 0) for r in range(world)]
    sizes[-1] = GLOBAL_BATCH - sum(sizes[:-1])
    return sizes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batches", type=int, default=None, help="global batches per epoch (default: all)")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    images, labels = load_digits(return_X_y=True)
    X = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8).div(16.0).to(device)
    y = torch.tensor(labels).to(device)

    base = make_model()
    reference = copy.deepcopy(base).to(device)  # one process, the whole global batch, torch's batch norm
    model = DDP(gpuopt.nn.SyncBatchNorm.convert_sync_batchnorm(base).to(device))
    opt = gpuopt.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    sizes = parts(world)
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    for epoch in range(args.epochs):
        order = torch.randperm(len(X), generator=torch.Generator().manual_seed(epoch)).to(device)
        for first in range(0, len(X) - GLOBAL_BATCH + 1, GLOBAL_BATCH)[:args.batches]:
            batch = order[first:first + GLOBAL_BATCH]
            mine = batch[start:stop]
            # DDP averages gradients over ranks; weighting each rank's mean loss by its share makes
            # the average that of the global batch's mean loss.
            loss = torch.nn.functional.cross_entropy(model(X[mine]), y[mine]) * (len(mine) * world / GLOBAL_BATCH)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ref_loss = torch.nn.functional.cross_entropy(reference(X[batch]), y[batch])
            ref_loss.backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            accuracy = (model(X).argmax(1) == y).float().mean().item()
        model.train()
        if rank == 0:
            print(f"epoch {epoch}: training-set accuracy {accuracy:.3f}")
    difference = max((p - q).abs().max().item() for p, q in zip(model.module.parameters(), reference.parameters()))
    stats = max((a - b).abs().max().item() for a, b in zip(model.module.buffers(), reference.buffers())
                if a.is_floating_point())
    if rank == 0:
        print(f"ranks' batches {sizes}: largest difference from one process on the global batches: "
              f"parameters {difference:.2e}, running statistics {stats:.2e}")
    assert difference < 1e-3 and stats < 1e-3, "SyncBatchNorm over the ranks differs from the global batch"
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
