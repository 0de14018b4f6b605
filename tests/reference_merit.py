"""An independent MERIT reference for the tests, written from the published algorithm.

Deliberately shares no code with merit_ds: plain loops over rows/columns where that reads
clearest, float64 throughout.
"""

import torch


def reference_step(w, g, m, v, *, lr, beta1, beta2, eps, weight_decay):
    """One MERIT step; returns new (w, m, v) as float64 tensors (inputs untouched)."""
    w, g, m, v = (t.detach().double().clone() for t in (w, g, m, v))
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    u = m / (torch.sqrt(v) + eps) + weight_decay * w
    W, U = w.abs(), u.abs()
    if w.dim() >= 2:
        rows, cols = w.shape[0], w.shape[1]
        s = torch.empty_like(w)
        max_w, max_u = W.max(), U.max()
        for i in range(rows):
            for j in range(cols):
                row_w, row_u = W[i].amax(dim=0), U[i].amax(dim=0)  # over dim 1 -> trailing dims kept
                col_w, col_u = W[:, j].amax(dim=0), U[:, j].amax(dim=0)
                ratio = torch.maximum(row_w / row_u, col_w / col_u)
                ratio = torch.maximum(ratio, max_w / max_u)
                zero = (row_w == 0) | (row_u == 0) | (col_w == 0) | (col_u == 0)
                s[i, j] = torch.where(zero, torch.ones_like(ratio), ratio)
    else:
        max_w, max_u = (W.max(), U.max()) if w.numel() else (torch.tensor(0.0), torch.tensor(0.0))
        s = torch.ones_like(w) if (max_w == 0 or max_u == 0) else (max_w / max_u).expand_as(w)
    w = w - lr * torch.clamp(s * u, -1, 1)
    return w, m, v
