"""Swap the batch norms of an existing model for gpuopt's, and check nothing else changed.

    python examples/convert_batchnorm.py

convert_batchnorm replaces every torch.nn.BatchNorm1d/2d/3d in place of the old module, sharing
its Parameters and buffers: an optimizer built before the swap, checkpoints and state_dict keys
all keep working.
"""

import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: gpuopt's kernels through Triton's interpreter

import gpuopt  # noqa: E402  (after TRITON_INTERPRET)

device = "cuda" if torch.cuda.is_available() else "cpu"


def basic_block(channels):  # a ResNet basic block, as torchvision writes it
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False), torch.nn.BatchNorm2d(channels),
        torch.nn.ReLU(), torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(channels))


model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), basic_block(8), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4)).to(device)
model = model.to(memory_format=torch.channels_last)  # optional: NHWC is read in place too
original = copy.deepcopy(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the swap

model = gpuopt.nn.convert_batchnorm(model)  # ← the one line
print(model)

x = torch.randn(16, 3, 12, 12, device=device).contiguous(memory_format=torch.channels_last)
for training in (True, False):
    model.train(training)
    original.train(training)
    difference = (model(x) - original(x)).abs().max().item()
    print(f"{'train' if training else 'eval '} mode: largest output difference vs torch.nn.BatchNorm {difference:.1e}")
    assert difference < 1e-4

loss = model(x).square().mean()
loss.backward()
optimizer.step()  # the optimizer still holds the same Parameters
print("state_dict keys unchanged:", list(model.state_dict()) == list(original.state_dict()))
