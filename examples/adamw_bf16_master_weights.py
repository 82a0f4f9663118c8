"""AdamW on bf16 parameters with fp32 master weights, under torch.amp.GradScaler.

    python examples/adamw_bf16_master_weights.py

The model's parameters are bf16 (half the memory and bandwidth of fp32 in forward and
backward); gpuopt keeps an fp32 master copy of each in the optimizer state, applies the update to
it and writes the rounded bf16 parameter in the same pass — one kernel launch for the whole model.
GradScaler is how fp16 training guards against overflow; gpuopt's optimizers take its scale and
inf flag on the device (no host sync) and skip the step there, as torch's fused optimizers do.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: gpuopt's kernels through Triton's interpreter

import gpuopt  # noqa: E402

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
model = model.to(device=device, dtype=torch.bfloat16)

optimizer = gpuopt.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2, master_weights=True)
scaler = torch.amp.GradScaler(device)

x = torch.randn(512, 32, device=device, dtype=torch.bfloat16)
y = x[:, :4].float().sum(dim=1, keepdim=True).sin()  # something to learn
for step in range(201):
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    if step == 100:  # an overflow, as fp16 training meets now and then: this step must be skipped
        next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(optimizer)  # unscales inside gpuopt's kernel; skipped on the device when inf was found
    scaler.update()
    if step % 50 == 0:
        print(f"step {step:3d}  loss {loss.item():.2e}  scale {scaler.get_scale():.0f}")

first = next(model.parameters())
state = optimizer.state[first]
print(f"parameter dtype {first.dtype}, master copy dtype {state['master_param'].dtype}, "
      f"steps taken {int(state['step'].item())} of 201 (one skipped for the inf)")
