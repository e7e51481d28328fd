"""Fig. 2.12: how magnitude pruning lowers a rectified neuron's entropy, in the thesis' analytic model (sec. 2.6.1,
eq. 2.18-2.22). ``scripts/plot_nepenthe.py --analytic out.png`` draws it.

The model: one weight W ~ N(0, 1) pruned at threshold T (zeroed where |W| <= T), one input X ~ N(0, 1), the
pre-activation Z = W X, and the neuron's state ON when Z > eps (eps: the smallest value told from 0, 1e-7).

- :func:`pruned_fraction`: psi(T) of eq. 2.19, the fraction of weights pruned (erf(T / sqrt 2) for N(0, 1)).
- :func:`weight_density`: eq. 2.18, the density of the kept weights (|w| > T; the pruned ones are the point mass
  psi(T) at 0).
- :func:`preactivation_density`: eq. 2.20 as printed, f_Z(z, T) = K_0(|z| / c) / pi with c = 1 - erf(T / sqrt 2).
  For T = 0 it is the density of the product of two standard normals; for T > 0 it integrates to c, not 1.
- :func:`struve_integral`: I(x) of eq. 2.22, x [L_{-1}(x) K_0(x) + L_0(x) K_1(x)], which equals
  (2 / pi) * integral_0^x K_0(t) dt (tested against ``scipy.integrate.quad``).

Two curves for p[Z > eps] (methods.md): eq. 2.21 **as printed**, ``p_printed = (1 - I(eps / c)) / 2``, drops the
factor c that the substitution z = c t brings out of the integral: it stays at 1/2 (1 bit) until c ~ eps, i.e. T
about 4.5 with eps = 1e-7. The **normalised** curve keeps the factor: ``p_normalised = c (1 - I(eps / c)) / 2``,
the mass of eq. 2.20's density above eps; with the mass 1 - c of the pruned weights at Z = 0 (OFF), this is what a
Monte Carlo of the stated model gives, erfc(T / sqrt 2) / 2 for small eps (entropy 0.63 bit at T = 1, 0.16 at
T = 2; :func:`monte_carlo_p_on`). Neither is fitted to the other; each is tested against what it claims.

scipy (``scipy.special``, ``scipy.integrate``) is imported inside the functions: it comes with scikit-learn.
"""
from __future__ import annotations

import math

import numpy as np

#: the smallest pre-activation told from 0 (IEEE 754 single precision, the thesis' choice)
EPS = 1e-7


def pruned_fraction(t: float | np.ndarray, mu: float = 0.0, sigma: float = 1.0) -> np.ndarray:
    """Eq. 2.19: psi(T) = [erf((T - mu) / (sigma sqrt 2)) - erf((-T - mu) / (sigma sqrt 2))] / 2."""
    from scipy.special import erf

    t = np.asarray(t, dtype=float)
    return 0.5 * (erf((t - mu) / (sigma * math.sqrt(2))) - erf((-t - mu) / (sigma * math.sqrt(2))))


def kept_fraction(t: float | np.ndarray) -> np.ndarray:
    """c = 1 - erf(T / sqrt 2) = erfc(T / sqrt 2): the fraction of N(0, 1) weights above the threshold."""
    from scipy.special import erfc

    return erfc(np.asarray(t, dtype=float) / math.sqrt(2))


def weight_density(w: float | np.ndarray, t: float, mu: float = 0.0, sigma: float = 1.0) -> np.ndarray:
    """Eq. 2.18 for |w| > T (the normal density), 0 for |w| <= T (there the point mass psi(T) sits at w = 0)."""
    w = np.asarray(w, dtype=float)
    normal = np.exp(-0.5 * ((w - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return np.where(np.abs(w) > t, normal, 0.0)


def preactivation_density(z: float | np.ndarray, t: float) -> np.ndarray:
    """Eq. 2.20 as printed: K_0(|z / (1 - erf(T / sqrt 2))|) / pi (integrates to 1 - erf(T / sqrt 2))."""
    from scipy.special import k0

    z = np.abs(np.asarray(z, dtype=float)) / kept_fraction(t)
    with np.errstate(divide="ignore"):
        return k0(z) / math.pi


def struve_integral(x: float | np.ndarray) -> np.ndarray:
    """Eq. 2.22: I(x) = x [L_{-1}(x) K_0(x) + L_0(x) K_1(x)] (L: modified Struve, K: modified Bessel of the second
    kind); 0 at x = 0 and 1 as x -> infinity (taken as 1 beyond x = 700, where L overflows)."""
    from scipy.special import k0, k1, modstruve

    x = np.asarray(x, dtype=float)
    safe = np.clip(x, 1e-300, 700.0)
    value = safe * (modstruve(-1, safe) * k0(safe) + modstruve(0, safe) * k1(safe))
    return np.where(x <= 0, 0.0, np.where(x > 700, 1.0, value))


def p_printed(t: float | np.ndarray, eps: float = EPS) -> np.ndarray:
    """Eq. 2.21 as printed: p[Z > eps] = (1 - I(eps / (1 - erf(T / sqrt 2)))) / 2 (not normalised)."""
    return 0.5 * (1.0 - struve_integral(eps / kept_fraction(t)))


def p_normalised(t: float | np.ndarray, eps: float = EPS) -> np.ndarray:
    """The integral of eq. 2.21 with its factor c kept: c (1 - I(eps / c)) / 2, c = 1 - erf(T / sqrt 2)."""
    c = kept_fraction(t)
    return 0.5 * c * (1.0 - struve_integral(eps / c))


def binary_entropy(p: float | np.ndarray) -> np.ndarray:
    """Eq. 2.17 in bits, 0 at p = 0 or 1."""
    p = np.clip(np.asarray(p, dtype=float), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(h, nan=0.0)


def entropy_printed(t: float | np.ndarray, eps: float = EPS) -> np.ndarray:
    """Fig. 2.12c from eq. 2.21 as printed."""
    return binary_entropy(p_printed(t, eps))


def entropy_normalised(t: float | np.ndarray, eps: float = EPS) -> np.ndarray:
    """Fig. 2.12c from the normalised p[Z > eps] (what the Monte Carlo of the stated model follows)."""
    return binary_entropy(p_normalised(t, eps))


def monte_carlo_p_on(t: float, samples: int = 200_000, eps: float = EPS, seed: int = 0) -> float:
    """p[Z > eps] estimated from the stated model: W, X ~ N(0, 1) independent, W zeroed where |W| <= T, Z = W X."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(samples)
    w[np.abs(w) <= t] = 0.0
    z = w * rng.standard_normal(samples)
    return float(np.mean(z > eps))
