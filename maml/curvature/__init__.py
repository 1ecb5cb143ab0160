"""Curvature diagnostics: Hessian and Gauss-Newton operators of any scalar function of a pytree, Lanczos
eigenvalues with Ritz bounds, randomised traces, SLQ spectral densities, and the per-task / meta-objective
diagnostics of a batch of tasks.

- `operators`: `Hessian`, `GaussNewton`, `hvp`, `ggnvp`, `dense`;
- `eigenvalues`: `top_eigenvalues` (`Largest`, `Smallest`, `LargestMagnitude`), `lanczos_ritz`;
- `traces`: `trace` (`Hutchinson`, `HutchPlusPlus`);
- `densities`: `spectral_density` (SLQ, with standard errors over probes), `negative_fraction` (its dense
  reference);
- `diagnostics`: `support_objective`, `meta_objective`, `task_curvature`;
- `krylov`: the Lanczos iteration itself (float64 Krylov scalars, or compensated float32 ones).

How products are differentiated is a value from the core: `maml.ForwardOverReverse()` (default) or
`maml.ReverseOverReverse()`.
"""

from .densities import SpectralDensity, negative_fraction, spectral_density
from .diagnostics import TaskCurvature, meta_objective, support_objective, task_curvature
from .eigenvalues import AbstractWhich, Eigenpairs, Largest, LargestMagnitude, Smallest, lanczos_ritz, top_eigenvalues
from .krylov import LanczosState, dot_pair, gauss_quadrature, lanczos, ritz, tridiagonal_eigh
from .operators import AbstractCurvature, GaussNewton, Hessian, dense, ggnvp, hvp
from .traces import AbstractTraceEstimator, HutchPlusPlus, Hutchinson, TraceEstimate, trace

__all__ = [
    # operators
    "AbstractCurvature", "GaussNewton", "Hessian", "dense", "ggnvp", "hvp",
    # eigenvalues
    "AbstractWhich", "Eigenpairs", "Largest", "LargestMagnitude", "Smallest", "lanczos_ritz", "top_eigenvalues",
    # traces
    "AbstractTraceEstimator", "HutchPlusPlus", "Hutchinson", "TraceEstimate", "trace",
    # densities
    "SpectralDensity", "negative_fraction", "spectral_density",
    # per-task and meta-objective diagnostics
    "TaskCurvature", "meta_objective", "support_objective", "task_curvature",
    # the Lanczos iteration
    "LanczosState", "dot_pair", "gauss_quadrature", "lanczos", "ritz", "tridiagonal_eigh",
]
