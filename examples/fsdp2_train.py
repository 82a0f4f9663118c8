"""A small transformer language model trained with FSDP2 and gpuopt: sharded parameters, AdamW on
the local shards, gradient clipping fused into the step, and a checkpoint saved and resumed with
torch.distributed.checkpoint.

    torchrun --nproc-per-node 2 examples/fsdp2_train.py [--steps 6]

On GPUs (one per rank, NCCL) or on the CPU (gloo; gpuopt's kernels through Triton's interpreter).
The run trains --steps steps, saves a checkpoint (model and optimizer, sharded), trains 2 more,
then builds a fresh model and optimizer, loads the checkpoint into them, trains the same 2 steps
and checks that the resumed run ends where the first did.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: gpuopt's kernels through Triton's interpreter

import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

import gpuopt  # noqa: E402  (after TRITON_INTERPRET)

VOCAB, WIDTH, HEADS, LAYERS, CONTEXT = 64, 32, 4, 2, 16


class LanguageModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.position = torch.nn.Parameter(torch.randn(CONTEXT, WIDTH) * 0.02)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(LAYERS))
        self.head = torch.nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(h.flatten(0, 1))  # logits, (batch · position, vocabulary)


def make(device):
    torch.manual_seed(0)  # the same initial weights on every rank, before sharding
    model = LanguageModel().to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model, gpuopt.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def batch(step, device):
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())  # each rank its own data
    tokens = torch.randint(0, VOCAB, (4, CONTEXT + 1), generator=g)
    # a learnable pattern: the next token is the current one plus one
    tokens[:, 1:] = (tokens[:, :1] + torch.arange(1, CONTEXT + 1)) % VOCAB
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def train_step(model, opt, step, device):
    x, y = batch(step, device)
    loss = torch.nn.functional.cross_entropy(model(x), y.flatten())
    loss.backward()
    norm = opt.clip_grad_norm_(1.0)  # the total norm over every rank's shards; the clip is in step()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), norm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model, opt = make(device)
    for step in range(args.steps):
        loss, norm = train_step(model, opt, step, device)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}, gradient norm {norm.item():.3f}")

    path = [tempfile.mkdtemp(prefix="gpuopt-fsdp2-") if rank == 0 else None]
    dist.broadcast_object_list(path)
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path[0])
    state = next(iter(opt.state.values()))
    if rank == 0:
        print(f"checkpoint saved: exp_avg is a {type(state['exp_avg']).__name__} "
              f"placed {tuple(state['exp_avg'].placements)}")
    for step in range(args.steps, args.steps + 2):
        train_step(model, opt, step, device)

    resumed, resumed_opt = make(device)
    loaded = {"model": resumed.state_dict(), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
    dcp.load(loaded, checkpoint_id=path[0])
    resumed.load_state_dict(loaded["model"])
    set_optimizer_state_dict(resumed, resumed_opt, loaded["optim"])
    for step in range(args.steps, args.steps + 2):
        train_step(resumed, resumed_opt, step, device)
    difference = max((a.full_tensor() - b.full_tensor()).abs().max().item()
                     for a, b in zip(model.parameters(), resumed.parameters()))
    if rank == 0:
        print(f"resumed run vs uninterrupted run: largest parameter difference {difference:.3g}")
    assert difference == 0.0, "the resumed run diverged from the uninterrupted one"
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
