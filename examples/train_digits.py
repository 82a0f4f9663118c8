"""The main job: train a small CNN on scikit-learn's handwritten digits twice, side by side —
once with gpuopt (gpuopt.nn.BatchNorm2d/1d + a gpuopt optimizer), once with PyTorch
(torch.nn.BatchNorm2d/1d + the matching torch.optim class) — from the same initial weights and the
same batches, and report how closely they agree.

    bash scripts/main.sh [--optimizer sgd|adam|adamw|rmsprop] [--epochs N] [--ema DECAY]
                         [--seed-equations] [--out PATH]

Runs on a CUDA GPU when there is one; otherwise on the CPU with gpuopt's Triton kernels going
through Triton's interpreter (slow, but the same kernels: the defaults finish in well under
3 minutes on 2 cores). Data: sklearn.datasets.load_digits (1797 8×8 images, shipped with
scikit-learn, no download); 80% train, 20% held out (stratified, fixed split).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "rmsprop"], default="adamw")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: per optimizer)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="also keep an exponential moving average of the weights (e.g. 0.9) and "
                        "evaluate with the averaged weights")
    p.add_argument("--seed-equations", action="store_true",
                   help="gpuopt uses the seed's ε placements: Adam/RMSprop divide by sqrt(v + ε), batch "
                        "norm by σ + ε (torch has no such option, so the two runs then differ by that)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--out", default=None, help="PNG with both loss curves (default: runs/digits_<optimizer>.png)")
    return p.parse_args(argv)


def require_dependencies():
    missing = []
    for module, package in [("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"), ("tqdm", "tqdm")]:
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        sys.exit(f"train_digits.py needs {', '.join(missing)}: run it through `bash scripts/main.sh`, which "
                 f"installs everything, or `pip install 'gpuopt[main]'` (i.e. {' '.join(missing)}).")


# Learning rates that reach ≥ 95% held-out accuracy in a few epochs for each optimizer.
DEFAULT_LR = {"sgd": 0.05, "adam": 3e-3, "adamw": 3e-3, "rmsprop": 1e-3}


def make_model(torch, batch_norm_2d, batch_norm_1d):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), batch_norm_2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), batch_norm_2d(32), nn.ReLU(),  # 32 × 4 × 4
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64, bias=False), batch_norm_1d(64), nn.ReLU(),
        nn.Linear(64, 10))


def make_optimizer(torch, gpuopt, library, name, params, lr, seed_equations):
    kwargs = {"sgd": dict(lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True),
              "adam": dict(lr=lr), "adamw": dict(lr=lr, weight_decay=1e-2),
              "rmsprop": dict(lr=lr, momentum=0.5)}[name]
    cls_name = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop"}[name]
    if library == "torch":
        return getattr(torch.optim, cls_name)(params, **kwargs)
    if seed_equations and name != "sgd":
        kwargs["eps_inside_sqrt"] = True
    return getattr(gpuopt, cls_name)(params, **kwargs)


def load_data(torch, device, seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0 - 0.5).reshape(-1, 1, 8, 8)  # pixels are 0..16
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y)
    images = lambda a: torch.tensor(a, dtype=torch.float32, device=device).contiguous(  # noqa: E731
        memory_format=torch.channels_last)
    labels = lambda a: torch.tensor(a, dtype=torch.int64, device=device)  # noqa: E731
    return images(X_train), labels(y_train), images(X_test), labels(y_test)


class Run:
    """One of the two twins: model, optimizer, optional weight average, history, wall time."""

    def __init__(self, torch, gpuopt, library, model, args, lr):
        self.torch, self.library, self.model = torch, library, model
        params = list(model.parameters())
        self.optimizer = make_optimizer(torch, gpuopt, library, args.optimizer, params, lr, args.seed_equations)
        self.ema_decay = args.ema
        if args.ema is not None:
            if library == "gpuopt":
                self.average = gpuopt.EMA(params, decay=args.ema)
            else:  # what a torch user writes: a foreach lerp over clones (as swa_utils' EMA does)
                self.average = [p.detach().clone() for p in params]
        self.losses, self.accuracies, self.seconds = [], [], 0.0

    def train_epoch(self, X, y, batches):
        torch = self.torch
        self.model.train()
        start = time.perf_counter()
        for index in batches:
            loss = torch.nn.functional.cross_entropy(self.model(X[index]), y[index])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.ema_decay is not None:
                if self.library == "gpuopt":
                    self.average.update()
                else:
                    with torch.no_grad():
                        torch._foreach_lerp_(self.average, list(self.model.parameters()), 1.0 - self.ema_decay)
            self.losses.append(loss.item())
        if X.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start

    def evaluation_model(self):
        """The model to evaluate: itself, or a copy holding the averaged weights."""
        if self.ema_decay is None:
            return self.model
        model = copy.deepcopy(self.model)
        if self.library == "gpuopt":
            self.average.copy_to(list(model.parameters()))
        else:
            with self.torch.no_grad():
                for p, a in zip(model.parameters(), self.average):
                    p.copy_(a)
        return model

    def evaluate(self, X, y):
        model = self.evaluation_model()
        model.eval()
        with self.torch.no_grad():
            accuracy = (model(X).argmax(1) == y).float().mean().item()
        self.accuracies.append(accuracy)
        return accuracy


def largest_difference(runs):
    """(largest |gpuopt - torch| over all parameters and buffers, its name)."""
    torch_state, gpuopt_state = runs[0].model.state_dict(), runs[1].model.state_dict()
    worst_name, worst = None, -1.0
    for name, value in torch_state.items():
        if value.is_floating_point():
            difference = (gpuopt_state[name] - value).abs().max().item()
            if difference > worst:
                worst_name, worst = name, difference
    return worst, worst_name


def plot(runs, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run, style in zip(runs, ["-", "--"]):
        ax.plot(run.losses, style, label=f"{run.label} (held-out acc {run.accuracies[-1]:.1%})", linewidth=1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    require_dependencies()
    import torch

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cpu":
        # Must be set before triton is first imported (gpuopt imports it).
        os.environ["TRITON_INTERPRET"] = "1"
    import gpuopt
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    X_train, y_train, X_test, y_test = load_data(torch, device, args.seed)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]

    # Channels-last (NHWC), the layout convolutions run fastest in on GPUs; batch norm reads it in place.
    torch_model = make_model(torch, torch.nn.BatchNorm2d, torch.nn.BatchNorm1d).to(device,
                                                                                    memory_format=torch.channels_last)
    eps_inside_sqrt = not args.seed_equations

    def bn2d(c):
        return gpuopt.nn.BatchNorm2d(c, eps_inside_sqrt=eps_inside_sqrt)

    def bn1d(c):
        return gpuopt.nn.BatchNorm1d(c, eps_inside_sqrt=eps_inside_sqrt)

    gpuopt_model = make_model(torch, bn2d, bn1d).to(device, memory_format=torch.channels_last)
    gpuopt_model.load_state_dict(torch_model.state_dict())  # the same initial weights
    runs = [Run(torch, gpuopt, "torch", torch_model, args, lr), Run(torch, gpuopt, "gpuopt", gpuopt_model, args, lr)]
    runs[0].label = f"PyTorch: torch.nn.BatchNorm + torch.optim.{type(runs[0].optimizer).__name__}"
    runs[1].label = f"gpuopt: gpuopt.nn.BatchNorm + gpuopt.{type(runs[1].optimizer).__name__}"

    where = "CUDA " + torch.cuda.get_device_name(device) if device.type == "cuda" else \
        "CPU, Triton interpreter (TRITON_INTERPRET=1)"
    print(f"gpuopt {gpuopt.__version__}, torch {torch.__version__} on {where}")
    print(f"digits: {len(X_train)} train / {len(X_test)} held-out images; optimizer {args.optimizer} lr={lr}"
          f"{'; EMA decay ' + str(args.ema) if args.ema is not None else ''}"
          f"{'; seed equations (ε placements) in gpuopt' if args.seed_equations else ''}")
    print(f"{'epoch':>5}  {'torch loss':>10} {'torch acc':>9}  {'gpuopt loss':>11} {'gpuopt acc':>10}")
    batch_generator = torch.Generator().manual_seed(args.seed)
    n = len(X_train)
    for epoch in tqdm(range(1, args.epochs + 1), desc="epochs", unit="epoch", leave=False):
        order = torch.randperm(n, generator=batch_generator).to(device)
        # Drop a last batch of 1 (batch norm cannot train on one value per channel).
        batches = [order[i:i + args.batch_size] for i in range(0, n, args.batch_size) if n - i > 1]
        if epoch == 1:  # one step each first: how closely the two implementations agree per step
            for run in runs:
                run.train_epoch(X_train, y_train, batches[:1])
            first_step = largest_difference(runs)
            batches_left = batches[1:]
        else:
            batches_left = batches
        line = [f"{epoch:>5}"]
        for run in runs:
            run.train_epoch(X_train, y_train, batches_left)
            accuracy = run.evaluate(X_test, y_test)
            epoch_loss = sum(run.losses[-len(batches):]) / len(batches)
            line.append(f"{epoch_loss:>10.4f} {accuracy:>9.1%}" if run.library == "torch" else
                        f"{epoch_loss:>11.4f} {accuracy:>10.1%}")
        tqdm.write("  ".join(line))

    final = largest_difference(runs)
    path = args.out or os.path.join("runs", f"digits_{args.optimizer}.png")
    plot(runs, path, f"digits CNN, {args.optimizer}, {args.epochs} epochs ({where.split(',')[0]})")

    print()
    for run in runs:
        print(f"{run.label}: held-out accuracy {run.accuracies[-1]:.1%}, final-epoch loss "
              f"{sum(run.losses[-len(batches):]) / len(batches):.4f}, wall time {run.seconds:.1f} s")
    why = ("gpuopt ran the seed's ε placements (--seed-equations), torch its own: the runs differ by design"
           if args.seed_equations else "fp32 rounding differences (sums taken in another order) grow over "
           "training, as between any two implementations")
    print(f"largest difference between the two runs' parameters and buffers: after one step {first_step[0]:.1e} "
          f"(in {first_step[1]}); after training {final[0]:.1e} (in {final[1]}) — {why}")
    print(f"loss curves: {os.path.abspath(path)}")
    if device.type == "cpu":
        print("(on the CPU gpuopt's kernels run through Triton's interpreter: its wall time is the "
              "interpreter's, not the kernels' speed; see bench/ for GPU timings)")
    return runs


if __name__ == "__main__":
    main()
