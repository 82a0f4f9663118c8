"""A whole training step — forward, backward and a gpuopt optimizer step — captured once in a
CUDA graph and replayed, with capturable=True.

    python examples/cuda_graph_step.py

gpuopt's steps suit graphs: the step counter lives on the device and is advanced inside the
kernel, a tensor learning rate is read on the device, and nothing synchronises with the host. So
the replayed step launches no Python and costs the GPU time alone. Needs a CUDA GPU.
"""

import sys

import torch

import gpuopt

if not torch.cuda.is_available():
    sys.exit("cuda_graph_step.py needs a CUDA GPU (CUDA graphs do not exist on the CPU).")

device = "cuda"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 512), gpuopt.nn.BatchNorm1d(512), torch.nn.ReLU(),
                            torch.nn.Linear(512, 10)).to(device)
lr = torch.tensor(1e-3, device=device)  # a tensor: change it between replays (a schedule) without recapture
optimizer = gpuopt.AdamW(model.parameters(), lr=lr, capturable=True)

# Static inputs: the graph reads these addresses on every replay; copy each new batch into them.
static_x = torch.randn(128, 256, device=device)
static_y = torch.randint(0, 10, (128,), device=device)


def train_step():
    optimizer.zero_grad(set_to_none=False)  # keep .grad tensors at fixed addresses
    loss = torch.nn.functional.cross_entropy(model(static_x), static_y)
    loss.backward()
    optimizer.step()
    return loss


# Warm up on a side stream (allocates state and gradients, compiles kernels), as torch's docs do.
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    for _ in range(3):
        train_step()
torch.cuda.current_stream().wait_stream(side)

graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    static_loss = train_step()

centers = torch.randn(10, 256, device=device)
for step in range(200):
    labels = torch.randint(0, 10, (128,), device=device)
    static_y.copy_(labels)
    static_x.copy_(centers[labels] + 0.5 * torch.randn(128, 256, device=device))
    if step == 150:
        lr.fill_(3e-4)  # a learning-rate drop, seen by the next replay
    graph.replay()
    if step % 50 == 0 or step == 199:
        print(f"replay {step:3d}  loss {static_loss.item():.4f}")

state = optimizer.state[next(model.parameters())]
print(f"optimizer steps taken (counted on the device): {int(state['step'].item())}")
