"""The PyTorch twin of jaxgpt/optim.py: nanoGPT's AdamW groups, and float32 Muon (Keller Jordan's
formulation) for the blocks' matrices beside AdamW for the rest — the same arithmetic in the same order."""
from __future__ import annotations

import torch

from jaxgpt.config import NS_COEFFS, NS_EPS, NS_GRAM_RESTART, NS_STEPS, TrainConfig
from torchref.model import GPT


def newton_schulz(G: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Orthogonalise the last two dims of G (..., rows, cols) in float32 (jaxgpt.optim.newton_schulz)."""
    a, b, c = NS_COEFFS
    X = G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (torch.sqrt((X * X).sum(dim=(-2, -1), keepdim=True)) + NS_EPS)
    if X.size(-1) >= 2 * X.size(-2):
        X = _gram_iteration(X, steps)
    else:
        for _ in range(steps):
            A = X @ X.mT
            B = b * A + (c * A) @ A
            X = a * X + B @ X
    return X.mT if tall else X


def _gram_iteration(X: torch.Tensor, steps: int) -> torch.Tensor:
    """Newton-Schulz on a wide X through its Gram matrix A = X X^T (jaxgpt.optim._gram_iteration)."""
    a, b, c = NS_COEFFS
    eye = torch.eye(X.size(-2), dtype=X.dtype)
    for first in range(0, steps, NS_GRAM_RESTART):
        A = X @ X.mT
        Q = P = a * eye + b * A + c * (A @ A)
        for _ in range(first + 1, min(first + NS_GRAM_RESTART, steps)):
            A = P @ (P @ A)
            P = a * eye + b * A + c * (A @ A)
            Q = P @ Q
        X = Q @ X
    return X


def _matrices(name: str, u: torch.Tensor) -> torch.Tensor:
    """An nn.Linear weight (out, in) as the matrices Muon orthogonalises: c_attn's fused q, k, v are three."""
    if name.endswith("attn.c_attn.weight"):
        out3, fan_in = u.shape
        return u.view(3, out3 // 3, fan_in)
    return u


def _neuron_dim(G: torch.Tensor) -> int:
    return -1 if G.size(-2) >= G.size(-1) else -2


def normuon(O: torch.Tensor, second: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon's per-neuron normalisation (jaxgpt.optim.normuon); updates `second` in place."""
    dim = _neuron_dim(O)
    n = O.size(dim)
    mean_sq = (O * O).mean(dim=dim, keepdim=True)
    norm = torch.sqrt(mean_sq.sum(dim=(-2, -1), keepdim=True) * n)
    second.add_((1 - beta2) * (mean_sq - second))  # lerp(second, mean_sq, 1 - beta2)
    scale = torch.rsqrt(second.clamp_min(1e-10))
    new_norm = torch.sqrt((mean_sq * n * scale * scale).sum(dim=(-2, -1), keepdim=True))
    return O * (scale * (norm / new_norm.clamp_min(1e-10)))


def orthogonalize(name: str, u: torch.Tensor, second: torch.Tensor | None = None, beta2: float = 0.0) -> torch.Tensor:
    """Muon's update for an nn.Linear weight (out, in), NorMuon's normalisation when `second` is given."""
    G = _matrices(name, u)
    O = newton_schulz(G)
    if second is not None:
        O = normuon(O, second, beta2)
    fan_out, fan_in = G.shape[-2:]
    return O.reshape(u.shape) * max(1.0, fan_out / fan_in) ** 0.5


class Muon(torch.optim.Optimizer):
    """Momentum, Nesterov, Newton-Schulz (NorMuon with beta2 > 0), decoupled weight decay: p -= lr * (update + wd * p)."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], lr: float, momentum: float, weight_decay: float,
                 beta2: float = 0.0):
        self.names, self.beta2 = {id(p): n for n, p in named}, beta2  # beta2 > 0: NorMuon
        super().__init__([p for _, p in named], dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _second(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        if not self.beta2:
            return None
        if "second_moment" not in self.state[p]:
            G = _matrices(self.names[id(p)], p)
            self.state[p]["second_moment"] = torch.zeros_like(G.mean(dim=_neuron_dim(G), keepdim=True))
        return self.state[p]["second_moment"]

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta = group["momentum"]
            for p in group["params"]:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.add_((1 - beta) * (g - buf))  # lerp(buf, g, 1 - beta)
                u = g + beta * (buf - g)  # Nesterov: lerp(g, buf, beta)
                O = orthogonalize(self.names[id(p)], u, self._second(p), self.beta2)
                p.sub_(group["lr"] * (O + group["weight_decay"] * p))


class MuonAdamW:
    """Muon on the blocks' 2-D weights, AdamW (nanoGPT's decay rule) on the rest, stepped together.
    `param_groups` lists both optimizers' groups; Muon's is marked `muon` (set_lr)."""

    def __init__(self, model: GPT, tc: TrainConfig):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        hidden = [(n, p) for n, p in named if n.startswith("transformer.h.") and p.dim() == 2]
        rest = [p for n, p in named if not (n.startswith("transformer.h.") and p.dim() == 2)]
        self.muon = Muon(hidden, tc.muon_lr, tc.muon_momentum, tc.weight_decay, tc.muon_beta2)
        self.adamw = adamw([p for p in rest if p.dim() >= 2], [p for p in rest if p.dim() < 2], tc)
        self.muon.param_groups[0]["muon"] = True
        self.param_groups = self.adamw.param_groups + self.muon.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()


def adamw(decayed: list[torch.nn.Parameter], other: list[torch.nn.Parameter], tc: TrainConfig) -> torch.optim.AdamW:
    groups = [{"params": decayed, "weight_decay": tc.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.beta1, tc.beta2), eps=1e-8)


def make_optimizer(model: GPT, tc: TrainConfig) -> torch.optim.AdamW | MuonAdamW:
    """Decay matrices and embeddings (dim >= 2), not biases or norm weights — nanoGPT's rule;
    --optimizer=muon moves the blocks' matrices to Muon."""
    if tc.optimizer == "muon":
        return MuonAdamW(model, tc)
    params = [p for p in model.parameters() if p.requires_grad]  # the tied wte/lm_head appears once
    return adamw([p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2], tc)


def set_lr(opt: torch.optim.Optimizer | MuonAdamW, lr: float, tc: TrainConfig) -> None:
    """The AdamW learning rate of this step; Muon's is the same schedule times muon_lr (jaxgpt.optim)."""
    multiplier = lr / tc.learning_rate if tc.learning_rate else 0.0
    for group in opt.param_groups:
        group["lr"] = tc.muon_lr * multiplier if group.get("muon") else lr
