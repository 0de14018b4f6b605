"""An independent LAMB reference for the tests, written from the published algorithm
(You et al. 2019, Algorithm 2). Deliberately shares no code with merit_ds; float64
throughout, norms by torch.linalg.norm."""

import torch


def reference_lamb_step(w, g, m, v, t, *, lr, beta1, beta2, eps, weight_decay, max_trust_ratio=None,
                        bias_correction=True):
    """Step number ``t`` (1-based); returns new (w, m, v, ratio) in float64 (inputs untouched)."""
    w, g, m, v = (x.detach().double().clone() for x in (w, g, m, v))
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    if bias_correction:
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
    else:
        m_hat, v_hat = m, v
    u = m_hat / (torch.sqrt(v_hat) + eps) + weight_decay * w
    norm_w, norm_u = torch.linalg.norm(w.flatten()), torch.linalg.norm(u.flatten())
    ratio = 1.0 if (norm_w == 0 or norm_u == 0) else float(norm_w / norm_u)
    if max_trust_ratio is not None:
        ratio = min(ratio, max_trust_ratio)
    return w - lr * ratio * u, m, v, ratio
