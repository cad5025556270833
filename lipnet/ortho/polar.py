"""The one orthogonalization core: approximate polar factors U V^T of stacks of matrices.

Every method works on the short side (X has rows <= cols, so the Gram matrix A = X X^T is the small
one), on a flattened batch ``(B, k, N)``, with one ``baddbmm`` per term:

    A = X X^T;   B = b A + c A A;   X = a X + B X        (one step, coefficients from schedules.py)

or, for clearly wide matrices in the optimizer's methods, the same steps on the k x k side only
(``form="gram"``, see ``iterate_gram``): ~2 k^2 N + 13 k^3 flops for turbo instead of 8 k^2 N + 4 k^3.

Methods (``orthogonalize(W, method=...)``):

``"ns5"``        Keller Jordan's Muon: X = G / (||G||_F + 1e-7), 5 quintic steps (3.4445, -4.7750, 2.0315).
``"turbo"``      Turbo-Muon: AOL preconditioning, X = diag(s) G with s_i = (sum_j |A_ij|)^(-1/2),
                 which guarantees ||X||_2 <= 1; the Gram matrix is rescaled as s_i A_ij s_j instead of
                 recomputed, so the first step costs two matmuls, not three. Then 4 steps of our derived
                 minimax schedule (``schedules.TURBO_SCHEDULE``).
``"convergent"`` AOL preconditioning + 7 steps converging to the fp32 floor for AOL-scaled singular values
                 >= 1e-3 (``schedules.CONVERGENT_SCHEDULE``). For layers: sigma within 1e-6 of 1 in fp32.
``"bjorck"``     AOL preconditioning + cubic Bjorck / Newton-Schulz steps X = 1.5 X - 0.5 A X. Slower,
                 but monotone: singular values never exceed 1 in exact arithmetic.
``"svd"``        exact reference, ``torch.linalg.svd``.

Note that AOL rescales rows, so turbo/convergent/bjorck converge to the polar factor of diag(s) G,
not of G (the two coincide when G's short-side vectors are orthogonal, e.g. for an orthogonal G).
For layers this does not matter (any orthogonal matrix is a valid weight); for optimizer updates it
is Turbo-Muon's trade-off, and ``benchmarks/ortho.py`` measures the distance to the exact polar
factor of G for every method.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..validate import positive_int
from .schedules import (
    BJORCK_STEP,
    CONVERGENT_SCHEDULE,
    KELLER_JORDAN_NS5,
    NEWTON_SCHULZ_QUINTIC,
    TURBO_SCHEDULE,
    Coefficients,
)
from .validation import check_matrices

METHODS = ("turbo", "ns5", "convergent", "bjorck", "svd")
# The methods whose result is (up to convergence) the exact polar factor: what backward="polar" differentiates.
POLAR_BACKWARD_METHODS = ("convergent", "bjorck", "svd")
FORMS = ("auto", "direct", "gram")
# form="auto" takes the Gram form for these methods when N >= _GRAM_MIN_ASPECT * k (fp32/fp64 only):
# there it needs fewer flops (break-even at N = 1.5 k), and its extra rounding (~1e-4 relative for
# turbo) is far inside the optimizer's band. Not for the layers' convergent/bjorck schedules: the Gram
# iterate does not self-correct, so 7 steps end ~1e-2 from orthogonal at condition 1e3 (vs 1e-5).
_GRAM_METHODS = ("turbo", "ns5")
_GRAM_MIN_ASPECT = 2
DEFAULT_BJORCK_STEPS = 25
# How many final steps run in fp32 when the earlier ones run in bf16 (low_precision=True).
_FP32_TAIL = {"ns5": 1, "turbo": 1, "convergent": 2, "bjorck": 2}


def _schedule(method: str, steps: int | None) -> Sequence[Coefficients]:
    if method == "ns5":
        return KELLER_JORDAN_NS5 if steps is None else (KELLER_JORDAN_NS5[0],) * steps
    if method == "bjorck":
        return (BJORCK_STEP,) * (DEFAULT_BJORCK_STEPS if steps is None else steps)
    base = TURBO_SCHEDULE if method == "turbo" else CONVERGENT_SCHEDULE
    if steps is None:
        return base
    # Extra steps beyond the derived schedule: the convergent Newton-Schulz quintic.
    return tuple(base[:steps]) + (NEWTON_SCHULZ_QUINTIC,) * max(0, steps - len(base))


def _compute_dtype(W: torch.Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def _aol_precondition(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AOL row scaling of a (B, k, N) stack with k <= N: returns (diag(s) X, diag(s) A diag(s)).

    With A = X X^T and s_i = (sum_j |A_ij|)^(-1/2), ||diag(s) X||_2 <= 1: for any unit x,
    x^T S A S x <= sum_ij |A_ij| |s_i x_i| |s_j x_j| <= sum_ij |A_ij| (s_i^2 x_i^2 + s_j^2 x_j^2) / 2
    = sum_i x_i^2 = 1 (exact arithmetic; rounding is covered by ``spectral_norm_bound``).
    """
    A = X @ X.mT
    # Clamping only shrinks s for all-zero rows (which stay zero) and keeps s_i s_j finite.
    row_sums = A.abs().sum(dim=-1).clamp_min(torch.finfo(A.dtype).tiny ** 0.5)
    s = row_sums.rsqrt()
    return X * s.unsqueeze(-1), A * s.unsqueeze(-1) * s.unsqueeze(-2)


def aol_rescale(W: torch.Tensor) -> torch.Tensor:
    """AOL-rescaled copy of each matrix in ``(..., m, n)``, scaled on its short side.

    Guarantee (exact arithmetic): every returned matrix has spectral norm <= 1; a matrix whose
    short-side vectors are orthonormal is returned unchanged. Differentiable.
    """
    check_matrices(W, allow_zero=True)
    transpose = W.shape[-2] > W.shape[-1]
    X = W.mT if transpose else W
    with torch.autocast(W.device.type, enabled=False):  # the guarantee needs the input's precision
        X, _ = _aol_precondition(X)
    return X.mT if transpose else X


def iterate(X: torch.Tensor, gram: torch.Tensor | None, schedule: Sequence[Coefficients],
             first_fp32_step: int, dtype: torch.dtype) -> torch.Tensor:
    """The polynomial steps X <- a X + (b A + c A^2) X, A = X X^T, one per ``(a, b, c)`` of
    ``schedule``, on a short-side (B, k, N) stack X; ``gram``: the first step's A if already known
    (None: computed). Steps before ``first_fp32_step`` run in bf16, the others in ``dtype``. X is
    used as given (no validation, no preconditioning): :func:`orthogonalize` preconditions it, the
    retraction hands in factors already near orthogonal."""
    for i, (a, b, c) in enumerate(schedule):
        step_dtype = torch.bfloat16 if i < first_fp32_step else dtype
        X = X.to(step_dtype)
        A = gram.to(step_dtype) if gram is not None else X @ X.mT
        gram = None
        B = A * b if c == 0 else torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X


def iterate_gram(X: torch.Tensor, gram: torch.Tensor | None, schedule: Sequence[Coefficients]) -> torch.Tensor:
    """The steps of ``iterate`` (fp32/fp64) without touching the long side until the end.

    With A_t = X_t X_t^T and P_t = a I + b A_t + c A_t^2, a step is X_{t+1} = P_t X_t, hence
    A_{t+1} = P_t A_t P_t, and after T steps X_T = (P_{T-1} ... P_0) X_0: every step is k x k
    matmuls (A^2, P A P, P Q) and only the final product touches the (k, N) matrix. Equal to the
    direct form in exact arithmetic; A is re-symmetrized each step against rounding drift.
    """
    A = X @ X.mT if gram is None else gram.to(X.dtype)
    Q = None
    for i, (a, b, c) in enumerate(schedule):
        P = A * b if c == 0 else torch.baddbmm(A, A, A, beta=b, alpha=c)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = P if Q is None else P @ Q
        if i < len(schedule) - 1:
            A = P @ A @ P
            A = (A + A.mT) / 2
    return Q @ X


class _PolarBackward(torch.autograd.Function):
    """Forward: the iteration, without a graph. Backward: the derivative of the exact polar factor
    Q = P^{-1} X (P = (X X^T)^{1/2}, X wide) that the iteration converges to:

        dL/dX = P^{-1} G (I - Q^T Q) + (Y - Y^T) Q,   with  P Y + Y P = G Q^T,

    solved in P's eigenbasis (P = Q X^T, eigenvalues clamped at 1e-3, the convergent schedule's
    threshold, so directions the iteration has not converged on get a bounded gradient).
    One k x k eigh and ~7 matmuls instead of back-propagating through every step."""

    generate_vmap_rule = True  # torch.func.vmap batches forward, backward and jvp as written

    @staticmethod
    def forward(X, gram, schedule, first_fp32_step, dtype):
        if schedule is None:  # method="svd": the exact polar factor
            U, _, Vh = torch.linalg.svd(X, full_matrices=False)
            return U @ Vh
        return iterate(X, gram, schedule, first_fp32_step, dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)
        ctx.save_for_forward(inputs[0], output)

    @staticmethod
    def backward(ctx, G):
        with torch.autocast(G.device.type, enabled=False):
            return _PolarBackward._backward(ctx, G)

    @staticmethod
    def jvp(ctx, dX, *_):
        """Forward mode (jvp, jacfwd): dQ = P^{-1} (dX - dP Q), with P dP + dP P = dX X^T + X dX^T
        solved in P's eigenbasis (eigenvalues clamped as in the backward pass)."""
        X, Q = ctx.saved_tensors
        with torch.autocast(dX.device.type, enabled=False):
            dX, X = dX.to(Q.dtype), X.to(Q.dtype)
            P = Q @ X.mT
            s, V = torch.linalg.eigh((P + P.mT) / 2)
            s = s.clamp_min(1e-3)
            C = dX @ X.mT
            C = C + C.mT
            dP = V @ ((V.mT @ C @ V) / (s.unsqueeze(-1) + s.unsqueeze(-2))) @ V.mT
            P_inv = (V / s.unsqueeze(-2)) @ V.mT
            return P_inv @ (dX - dP @ Q)

    @staticmethod
    def _backward(ctx, G):
        X, Q = ctx.saved_tensors
        G, Xf, Qf = G.to(Q.dtype), X.to(Q.dtype), Q
        P = Qf @ Xf.mT
        s, V = torch.linalg.eigh((P + P.mT) / 2)
        s = s.clamp_min(1e-3)
        GQt = G @ Qf.mT
        Y = V @ ((V.mT @ GQt @ V) / (s.unsqueeze(-1) + s.unsqueeze(-2))) @ V.mT
        P_inv = (V / s.unsqueeze(-2)) @ V.mT
        grad = P_inv @ (G - GQt @ Qf) + (Y - Y.mT) @ Qf
        return grad.to(X.dtype), None, None, None, None


def orthogonalize(
    W: torch.Tensor,
    method: str = "turbo",
    steps: int | None = None,
    *,
    low_precision: bool | None = None,
    validate: bool = True,
    backward: str = "iteration",
    form: str = "auto",
) -> torch.Tensor:
    """Approximate polar factor U V^T of each matrix in ``W`` of shape ``(..., m, n)``.

    Tall, wide and square matrices and any leading batch dims are accepted; the iteration runs on
    the short side. Differentiable (autograd through the iteration). Output dtype = input dtype;
    computation in fp32 (fp64 for fp64 inputs), also inside ``torch.autocast`` (disabled here:
    the schedules' guarantees assume that precision; ``low_precision`` is the only way to bf16).

    Guarantees, per method, for the singular values of the result (exact arithmetic):
      * ``"ns5"``: in [0.68, 1.14] for every singular value of G / ||G||_F that is >= 1e-2.
      * ``"turbo"``: in [0.778, 1.222] for every singular value of ``aol_rescale(G)`` >= 3e-3.
      * ``"convergent"``: within 1e-7 of 1 for every singular value of ``aol_rescale(G)`` >= 1e-3
        (in fp32, rounding leaves every sigma within about 1e-6 of 1 for such inputs).
      * ``"bjorck"``: in [0, 1]; converges to 1 (quadratically once past 0.5) for nonzero values.
    Singular values below the stated thresholds end in [0, 1.21] (ns5), [0, 1.222] (turbo),
    [0, 1 + 1e-7] (convergent), not necessarily near 1.
    The exact bands are computed by ``schedules.singular_value_band``; layers must not rely on them
    for soundness: use ``spectral_norm_bound`` on the result.

    Args:
        method: one of ``"turbo"`` (default), ``"ns5"``, ``"convergent"``, ``"bjorck"``, ``"svd"``.
        steps: number of polynomial steps (default per method); not allowed for ``"svd"``.
        low_precision: run all but the last step(s) in bf16 (default: on CUDA only).
        validate: check for non-finite entries and zero matrices (one host sync). The optimizer
            passes False; a zero matrix then maps to zero instead of raising.
        backward: ``"iteration"`` (autograd through every step: the exact derivative of what is
            computed) or ``"polar"`` (``"convergent"`` / ``"bjorck"`` / ``"svd"`` only: the derivative
            of the exact polar factor of the AOL-scaled input, which those schedules converge to
            (of W itself for ``"svd"``); one eigh of the small Gram side instead of
            back-propagating through the steps -- cheaper, equal to the iteration's derivative up
            to its convergence error, and defined where the SVD's own backward is not: equal
            singular values, e.g. an orthogonal W).
        form: ``"direct"`` (X = a X + B X on the (k, N) matrix every step), ``"gram"`` (the same
            polynomial steps carried out on the k x k Gram side, X_T = (P_{T-1} ... P_0) X_0; fewer
            flops when N > 1.5 k, slightly more rounding; fp32/fp64 only) or ``"auto"`` (gram for
            ``"turbo"``/``"ns5"`` in fp32/fp64 when N >= 2 k, else direct). The ns5 / turbo bands
            hold in both forms (tested); the converging schedules end further from orthogonal in the
            Gram form (see the note at ``FORMS``), which is why "auto" never picks it for them.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if steps is not None:
        positive_int(steps, "steps")
        if method == "svd":
            raise ValueError("steps does not apply to method='svd'")
    if backward not in ("iteration", "polar"):
        raise ValueError(f"backward must be 'iteration' or 'polar', got {backward!r}")
    if backward == "polar" and method not in POLAR_BACKWARD_METHODS:
        raise ValueError(f"backward='polar' needs a converging method {POLAR_BACKWARD_METHODS}, got {method!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if validate:
        check_matrices(W)
    elif W.ndim < 2:
        raise ValueError(f"W must have at least 2 dims (..., m, n), got shape {tuple(W.shape)}")

    # The core's precision policy holds under torch.autocast too: autocast would lower every matmul
    # of the iteration (and the eigh of the polar backward) to bf16/fp16.
    with torch.autocast(W.device.type, enabled=False):
        return _orthogonalize(W, method, steps, low_precision, backward, form)


def _orthogonalize(W: torch.Tensor, method: str, steps: int | None, low_precision: bool | None,
                   backward: str, form: str) -> torch.Tensor:
    dtype = _compute_dtype(W)
    if method == "svd":
        if backward == "polar" and torch.is_grad_enabled() and W.requires_grad:
            # the SVD's own backward is undefined for equal singular values (an orthogonal W)
            transpose = W.shape[-2] > W.shape[-1]
            X = W.mT if transpose else W
            X = _PolarBackward.apply(X.to(dtype), None, None, 0, dtype).to(W.dtype)
            return X.mT if transpose else X
        U, _, Vh = torch.linalg.svd(W.to(dtype), full_matrices=False)
        return (U @ Vh).to(W.dtype)

    transpose = W.shape[-2] > W.shape[-1]
    X = W.mT if transpose else W
    batch_shape, (k, n) = X.shape[:-2], X.shape[-2:]
    X = X.reshape(-1, k, n).to(dtype)

    if method == "ns5":
        X = X / (torch.linalg.matrix_norm(X, keepdim=True) + 1e-7)
        gram = None
    else:
        X, gram = _aol_precondition(X)

    schedule = _schedule(method, steps)
    use_bf16 = X.is_cuda if low_precision is None else low_precision
    first_fp32_step = len(schedule) - _FP32_TAIL[method] if use_bf16 else 0
    if form == "gram" and use_bf16:
        raise ValueError("form='gram' runs in fp32/fp64 only; pass low_precision=False")
    if form == "auto":
        form = "gram" if method in _GRAM_METHODS and not use_bf16 and n >= _GRAM_MIN_ASPECT * k else "direct"
    if backward == "polar" and torch.is_grad_enabled() and X.requires_grad:
        X = _PolarBackward.apply(X, gram.detach(), schedule, first_fp32_step, dtype)
    elif form == "gram":
        X = iterate_gram(X, gram, schedule)
    else:
        X = iterate(X, gram, schedule, first_fp32_step, dtype)

    X = X.reshape(*batch_shape, k, n)
    return (X.mT if transpose else X).to(W.dtype)
