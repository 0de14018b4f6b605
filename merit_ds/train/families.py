"""GPT-2 model families at a fixed parameter count: wide-shallow to narrow-deep (Chen et al. 2018,
"The Effect of Network Width on the Performance of Large-batch Training": at a fixed number of
parameters, wider networks tolerate larger batches).

The count held fixed is the **non-embedding** parameter count (Kaplan et al. 2020's convention:
the token and position embeddings, and the head tied to the token embedding, are left out,
because they depend on the vocabulary and context, not on the width/depth trade-off)::

    N(L, d) = L (12 d^2 + 13 d) + 2 d        (per block: ln_1, c_attn, attn c_proj, ln_2, c_fc,
                                               mlp c_proj; + the final LayerNorm)

A family is a target **aspect ratio** ``d / L`` (width per layer), so the same name means the same
shape class at every size:

    wide  d/L = 128   (4x GPT-2 XL's per-layer width)
    base  d/L = 32    (GPT-2 Large 35.6, XL 33.3; Small is 64)
    deep  d/L = 8

``L<k>`` (e.g. ``L6``) fixes the depth instead. The width is a multiple of the head dimension
(``n_head = d / head_dim``; GPT-2 uses 64, CPU-scale models 8-16). :func:`solve_shape` tries
depths around the ideal one, the width nearest the count at each, and keeps the shape whose count
is within ``tolerance`` of N and whose aspect is closest to the target; if none is, it says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["FAMILIES", "FamilyShape", "FamilyError", "non_embedding_params", "solve_shape", "DEFAULT_TOLERANCE"]

#: family -> target d / L
FAMILIES = {"wide": 128.0, "base": 32.0, "deep": 8.0}
#: |count - N| / N allowed.
DEFAULT_TOLERANCE = 0.05


class FamilyError(ValueError):
    pass


@dataclass(frozen=True)
class FamilyShape:
    family: str
    n_layer: int
    n_embd: int
    n_head: int
    params: int        # non-embedding parameters of this shape
    target: int        # the N asked for

    @property
    def error(self) -> float:
        return self.params / self.target - 1

    def overrides(self) -> dict:
        return {"n_layer": self.n_layer, "n_embd": self.n_embd, "n_head": self.n_head}

    def describe(self) -> str:
        return (f"family {self.family}: {self.n_layer} layers x {self.n_embd} wide, {self.n_head} heads, "
                f"{self.params:,} non-embedding parameters ({100 * self.error:+.1f}% of {self.target:,})")


def non_embedding_params(n_layer: int, n_embd: int) -> int:
    d = n_embd
    return n_layer * (12 * d * d + 13 * d) + 2 * d


def _width_for(n_layer: int, target: int, head_dim: int) -> int:
    """The multiple of ``head_dim`` whose count at ``n_layer`` layers is nearest ``target``."""
    # 12 L d^2 + (13 L + 2) d - N = 0
    a, b = 12 * n_layer, 13 * n_layer + 2
    d = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
    lo = max(head_dim, int(d // head_dim) * head_dim)
    return min((lo, lo + head_dim), key=lambda w: abs(non_embedding_params(n_layer, w) - target))


def solve_shape(family: str, params: float, *, head_dim: int = 64, tolerance: float = DEFAULT_TOLERANCE) -> FamilyShape:
    target = int(params)
    if target <= 0:
        raise FamilyError(f"--params must be a positive number of non-embedding parameters, got {params!r}")
    if head_dim < 1:
        raise FamilyError(f"head dimension must be >= 1, got {head_dim}")
    if family in FAMILIES:
        aspect = FAMILIES[family]
        ideal = (target / (12 * aspect * aspect)) ** (1 / 3)
        depths = sorted({max(1, round(ideal * f)) for f in (0.6, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5)} |
                        {max(1, math.floor(ideal)), max(1, math.ceil(ideal))})
    elif family[:1] == "L" and family[1:].isdigit() and int(family[1:]) > 0:
        aspect, depths = None, [int(family[1:])]
    else:
        raise FamilyError(f"unknown model family {family!r}: choose {', '.join(FAMILIES)} or L<layers> (e.g. L6)")
    candidates = []
    for n_layer in depths:
        d = _width_for(n_layer, target, head_dim)
        count = non_embedding_params(n_layer, d)
        candidates.append(FamilyShape(family, n_layer, d, d // head_dim, count, target))
    fitting = [c for c in candidates if abs(c.error) <= tolerance]
    if not fitting:
        best = min(candidates, key=lambda c: abs(c.error))
        raise FamilyError(f"family {family} at {target:,} non-embedding parameters: no shape with a width multiple of "
                          f"{head_dim} is within {tolerance:.0%} (nearest: {best.n_layer} x {best.n_embd}, "
                          f"{best.params:,}, {100 * best.error:+.1f}%); choose another --params or a smaller head dimension")
    if aspect is None:
        return fitting[0]
    return min(fitting, key=lambda c: (abs(math.log(c.n_embd / c.n_layer / aspect)), abs(c.error)))
