"""LAMB and LARS written with torch's ``_foreach`` ops, as a torch user without apex would write
them (the bench's torch alternative for the two; neither is in torch.optim): per-tensor norms by
``torch._foreach_norm``, ratios as device tensors (no host sync), about a dozen multi-tensor
launches a step. The equations are ``gpuopt.reference.lamb_step`` / ``lars_step``."""

from __future__ import annotations

import torch


class ForeachLAMB(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            for p, s in zip(params, states):
                if not s:
                    s.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            (beta1, beta2), eps, lr = group["betas"], group["eps"], group["lr"]
            m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            t = states[0]["step"] = states[0]["step"] + 1
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
            denom = torch._foreach_sqrt(torch._foreach_div(v, 1 - beta2 ** t))
            torch._foreach_add_(denom, eps)
            update = torch._foreach_div(torch._foreach_div(m, 1 - beta1 ** t), denom)
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
            w_norm, u_norm = torch._foreach_norm(params), torch._foreach_norm(update)
            ratio = [torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w)) for w, u in zip(w_norm, u_norm)]
            torch._foreach_mul_(update, ratio)
            torch._foreach_add_(params, update, alpha=-lr)


class ForeachLARS(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            wd = group["weight_decay"]
            w_norm, g_norm = torch._foreach_norm(params), torch._foreach_norm(grads)
            local = [torch.where((w > 0) & (g > 0), group["trust_coefficient"] * w / (g + wd * w + group["eps"]),
                                 torch.ones_like(w)) for w, g in zip(w_norm, g_norm)]
            d = torch._foreach_add(grads, params, alpha=wd)
            torch._foreach_mul_(d, local)
            states = [self.state[p] for p in params]
            if "momentum_buffer" not in states[0]:
                for s, x in zip(states, d):
                    s["momentum_buffer"] = x.clone()
            else:
                buffers = [s["momentum_buffer"] for s in states]
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, d)
            torch._foreach_add_(params, [s["momentum_buffer"] for s in states], alpha=-group["lr"])
