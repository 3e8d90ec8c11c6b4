"""Pure loss math on embeddings: tensors in, tensors out.

- `info_nce`: SimCSE's unsupervised objective (Gao et al. 2021, eq. 1; SparseCSE §2.1).
- `alignment`, `uniformity`: Wang & Isola (2020), used for scoring (SparseCSE §2.2, eq. 3–4) and analysis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """z1, z2: (N, D) two dropout views; positives on the diagonal, the other N-1 rows negatives.

    loss = -1/N Σ_i log softmax_j(cos(z1_i, z2_j) / τ)[i]
    """
    # normalise, then one (N, D) × (D, N) product: O(N²) memory (a broadcast cosine_similarity builds (N, N, D))
    sim = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T / temperature  # (N, N)
    labels = torch.arange(sim.size(0), device=sim.device)
    return F.cross_entropy(sim, labels)


def alignment(x: torch.Tensor, y: torch.Tensor, log: bool = False) -> torch.Tensor:
    """E ‖f(x) − f(x⁺)‖² over positive pairs of L2-normalised embeddings; log of it when `log` (L_align)."""
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    a = (x - y).pow(2).sum(-1).mean()
    return a.log() if log else a


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log E_{i<j} exp(−t ‖f(x_i) − f(x_j)‖²) over all distinct pairs of L2-normalised embeddings (L_uniform)."""
    x = F.normalize(x, dim=-1)
    sq = torch.pdist(x, p=2).pow(2)
    return sq.mul(-t).exp().mean().log()
