"""gpuopt under torch.distributed, on the CPU: gloo process groups of 2 and 3 ranks (each a
spawned process running the kernels through Triton's interpreter), compared with torch.optim on
the same sharding. The scenarios are in tests/distributed_worker.py."""

import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from . import distributed_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no gloo backend")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, names, tmp_path):
    # (the 2-rank run takes every scenario; the 3-rank one those where a third rank changes things)
    mp.spawn(distributed_worker.run, args=(world, _free_port(), str(tmp_path), names), nprocs=world, join=True)


def test_fsdp2_ddp_zero_checkpoint_clipping_and_sync_batch_norm_match_torch_on_two_ranks(tmp_path):
    _spawn(2, list(distributed_worker.SCENARIOS), tmp_path)


def test_uneven_shards_and_batches_on_three_ranks(tmp_path):
    _spawn(3, ["fsdp_adamw_and_sgd", "clip_norms", "tensor_parallel_and_ema", "sync_batch_norm", "fsdp_lamb_and_lars",
               "fsdp_muon", "fsdp_adafactor"],
           tmp_path)

