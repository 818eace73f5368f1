"""The Fréchet distance between two Gaussians fitted to feature vectors — the
formula behind FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500):

    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½)

computed here with numpy and scipy's ``sqrtm``. It is an independent reference
for tests and analyses: the ``fid`` and ``reconstruction`` metrics take their
numbers from ``torch_fidelity.calculate_metrics`` (see :mod:`tokenloom.fidelity`),
never from this module.
"""

from __future__ import annotations

from typing import Any


def gaussian_fit(features: Any) -> tuple[Any, Any]:
    """``features``: ``[N, D]`` (array-like) -> (mean ``[D]``, unbiased
    covariance ``[D, D]``) as float64 numpy arrays — what FID fits to each set,
    and what an ADM-style ``.npz`` of reference statistics holds."""
    import numpy as np

    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"gaussian_fit: expected features [N >= 2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between N(``mu1``, ``sigma1``) and N(``mu2``,
    ``sigma2``) with scipy's ``sqrtm`` (its imaginary part, numerical noise for
    covariance matrices, dropped)."""
    import numpy as np
    from scipy import linalg

    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    covmean = np.asarray(linalg.sqrtm(sigma1 @ sigma2)).real
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


__all__ = ["frechet_distance", "gaussian_fit"]
