"""Gradient whitening for SWAN: (G G^T)^(-1/2) G by the coupled Newton-Schulz iteration.

For G = U S V^T (rank m, m <= n) the whitened gradient is the polar factor U V^T. SWAN (Ma et al.,
Alg. 2) computes it on the small Gram side, in fp32, with the coupled inverse-square-root iteration

    Y_0 = A,  Z_0 = I,   T = (3I - Z Y) / 2,   Y <- Y T,   Z <- T Z,

for which Y -> A^(1/2) and Z -> A^(-1/2) when the eigenvalues of A lie in (0, 1]. We start from
A = G G^T / ||G G^T||_F: the Frobenius norm of the Gram bounds its largest eigenvalue more tightly than
||G||_F^2 = trace does (the brief's start), so small eigenvalues start larger and fewer steps converge;
the fixed point is the same. Each step costs three m x m matmuls; the Gram and Z G cost O(m^2 n).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["inverse_sqrt_newton_schulz", "whiten", "whiten_reference"]


def inverse_sqrt_newton_schulz(a: Tensor, iters: int) -> Tensor:
    """Z ~ A^(-1/2) for a symmetric positive semi-definite ``a`` whose eigenvalues lie in [0, 1].

    Eigen-directions with eigenvalue 0 grow by 1.5 per step instead of converging (harmless when the
    result multiplies a matrix with no component there, as in ``whiten``).
    """
    m = a.shape[-1]
    eye = torch.eye(m, dtype=a.dtype, device=a.device)
    y, z = a, eye.clone()
    for _ in range(iters):
        t = torch.addmm(eye, z, y, beta=1.5, alpha=-0.5)  # T = (3I - Z Y) / 2
        y = y @ t
        z = t @ z
    return z


def whiten(grad: Tensor, iters: int) -> Tensor:
    """(G G^T)^(-1/2) G for a matrix ``grad``, computed in fp32 on the smaller Gram side.

    A tall matrix (m > n) is whitened as ((G^T G)^(-1/2) G^T)^T, which is the same polar factor.
    """
    if grad.ndim != 2:
        raise ValueError(f"whiten expects a matrix, got shape {tuple(grad.shape)}")
    g = grad.float()
    tall = g.shape[0] > g.shape[1]
    if tall:
        g = g.t()
    gram = g @ g.t()
    scale = torch.linalg.matrix_norm(gram).clamp_min_(1e-30)  # ||G G^T||_F >= its top eigenvalue
    z = inverse_sqrt_newton_schulz(gram.div_(scale), iters)
    out = (z @ g).div_(scale.sqrt_())  # (G G^T / s)^(-1/2) G / sqrt(s) = (G G^T)^(-1/2) G
    return out.t() if tall else out


def whiten_reference(grad: Tensor) -> Tensor:
    """U V^T from a float64 SVD: the exact whitened gradient (``whiten``'s reference)."""
    u, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    return u @ vh
