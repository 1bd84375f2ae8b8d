"""RDP accountant for the Poisson-subsampled Gaussian mechanism (DP-SGD), and noise calibration.

One step of DP-SGD includes each user independently with probability `q`, sums their clipped gradients and
adds N(0, (sigma * clip)^2) per coordinate. Its Renyi DP at integer order a (Mironov, Talwar, Zhang 2019,
"Renyi Differential Privacy of the Sampled Gaussian Mechanism", section 3.3) is

    rdp(a) = log( sum_{k=0..a} C(a, k) (1 - q)^(a - k) q^k exp((k^2 - k) / (2 sigma^2)) ) / (a - 1)

and T steps compose to T * rdp(a). The (epsilon, delta) guarantee is the best order's, converted with
Balle et al. 2020 (Theorem 21; the conversion Opacus and TF Privacy use):

    epsilon = min_a  T rdp(a) + log((a - 1) / a) - (log delta + log a) / (a - 1)

Only integer orders are used: every order gives a valid bound, integers only make it slightly loose. Pure math,
no torch (the test checks it against an independent numerical integration).
"""

from __future__ import annotations

import math

#: the Renyi orders tried (integers: the closed form above is exact for them)
ORDERS: tuple[int, ...] = (*range(2, 65), 72, 80, 96, 112, 128, 160, 192, 256)


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def rdp_step(q: float, sigma: float, order: int) -> float:
    """Renyi DP at integer `order` >= 2 of one step: Poisson sampling rate `q` in (0, 1], noise multiplier `sigma`
    (noise std / clip) > 0."""
    if not 0 < q <= 1 or sigma <= 0 or order < 2 or int(order) != order:
        raise ValueError(f"need 0 < q <= 1, sigma > 0, an integer order >= 2 (got q={q}, sigma={sigma}, order={order})")
    if q == 1:
        return order / (2 * sigma**2)
    terms = [math.lgamma(order + 1) - math.lgamma(k + 1) - math.lgamma(order - k + 1)
             + (order - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
             for k in range(order + 1)]
    return _logsumexp(terms) / (order - 1)


def epsilon(q: float, sigma: float, steps: int, delta: float, orders=ORDERS) -> tuple[float, int]:
    """(epsilon, the order that gives it) of `steps` >= 0 composed steps at (q, sigma), for `delta` in (0, 1)."""
    if not 0 < delta < 1 or steps < 0:
        raise ValueError(f"need 0 < delta < 1 and steps >= 0 (got delta={delta}, steps={steps})")
    if steps == 0:
        return 0.0, orders[0]
    best = min((steps * rdp_step(q, sigma, a) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1), a)
               for a in orders)
    return max(0.0, best[0]), best[1]


def noise_for_epsilon(target: float, q: float, steps: int, delta: float, tol: float = 1e-3) -> float:
    """The smallest noise multiplier sigma (to relative `tol`) whose `steps` steps at rate `q` spend at most
    `target` epsilon at `delta`. Bisection: epsilon falls as sigma grows."""
    if not target > 0 or not math.isfinite(target):
        raise ValueError(f"target epsilon must be a positive finite number (got {target})")
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    lo, hi = 0.05, 1.0
    while epsilon(q, hi, steps, delta)[0] > target:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon {target} (q={q}, steps={steps})")
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        if epsilon(q, mid, steps, delta)[0] > target:
            lo = mid
        else:
            hi = mid
    return hi
