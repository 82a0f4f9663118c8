"""A small character-level transformer language model trained the way Muon is used: Muon for the
hidden layers' 2-D weights (attention and MLP matrices), AdamW for everything else (embeddings,
the output head, norms' gains and biases). The same run with torch.optim.Muon + torch.optim.AdamW
from the same weights and batches, side by side.

    python examples/muon_lm.py [--steps 200]

On a GPU or on the CPU (gpuopt's kernels through Triton's interpreter: give it fewer steps).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import io
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: gpuopt's kernels through Triton's interpreter

import gpuopt  # noqa: E402  (after TRITON_INTERPRET)

with contextlib.redirect_stdout(io.StringIO()):  # (importing it prints it)
    import this
TEXT = codecs.decode(this.s, "rot13")  # the Zen of Python, 850 characters
WIDTH, HEADS, LAYERS, CONTEXT, BATCH = 64, 4, 2, 32, 16


class LanguageModel(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, WIDTH)
        self.position = torch.nn.Parameter(torch.randn(CONTEXT, WIDTH) * 0.02)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(LAYERS))
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[:tokens.shape[1]]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


def split_parameters(model: LanguageModel):
    """Muon's parameters: the hidden layers' matrices. AdamW's: the rest (embeddings, head, gains)."""
    hidden = [p for name, p in model.blocks.named_parameters() if p.ndim == 2]
    others = [p for p in model.parameters() if not any(p is h for h in hidden)]
    return hidden, others


def optimizers(model, library):
    hidden, others = split_parameters(model)
    muon, adamw = (gpuopt.Muon, gpuopt.AdamW) if library == "gpuopt" else (torch.optim.Muon, torch.optim.AdamW)
    return [muon(hidden, lr=0.02, weight_decay=0.01, adjust_lr_fn="match_rms_adamw"),
            adamw(others, lr=3e-3, weight_decay=0.01)]


def batches(data, steps, device):
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - CONTEXT - 1, (BATCH,), generator=generator)
        window = torch.stack([data[s:s + CONTEXT + 1] for s in starts.tolist()]).to(device)
        yield window[:, :-1], window[:, 1:]


def train(model, opts, data, steps, device):
    losses, start = [], time.perf_counter()
    for inputs, targets in batches(data, steps, device):
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return losses, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    alphabet = sorted(set(TEXT))
    data = torch.tensor([alphabet.index(c) for c in TEXT])
    torch.manual_seed(0)
    base = LanguageModel(len(alphabet)).to(device)
    hidden, others = split_parameters(base)
    print(f"{sum(p.numel() for p in hidden)} parameters in {len(hidden)} hidden matrices (Muon), "
          f"{sum(p.numel() for p in others)} in {len(others)} other tensors (AdamW)")
    results = {}
    for library in ("gpuopt", "torch"):
        model = copy.deepcopy(base)
        losses, seconds = train(model, optimizers(model, library), data, args.steps, device)
        results[library] = losses[-1]
        print(f"{library} Muon + AdamW: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps, {seconds:.1f} s")
    gap = abs(results["gpuopt"] - results["torch"]) / results["torch"]
    print(f"final losses differ by {100 * gap:.2f}%")


if __name__ == "__main__":
    main()
