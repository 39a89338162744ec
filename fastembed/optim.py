"""Optimizers for fastembed layers: SGD, the book's dense Adam, and the lazy SparseAdam.

A parameter is anything with a float32 ``weight`` array and a ``grad`` that is
None, a dense array of weight's shape, or a `SparseGrad(rows, values)`; an
`Embedding` is one, and a `TokenPositionEmbedding` gives two by ``parameters()``.
"""
import numpy as np

from . import _kernels
from .nn import SparseGrad

__all__ = ["SGD", "Adam", "SparseAdam", "linear_decay"]

BOOK_LR = 0.01
BOOK_BETAS = (0.85, 0.99)
BOOK_EPS = 1e-8


def linear_decay(lr, step, num_steps):
    """The book's schedule: ``lr * (1 - step / num_steps)`` at step 0, 1, ..., num_steps - 1."""
    if num_steps <= 0:
        raise ValueError(f"num_steps must be > 0, got {num_steps}")
    return lr * (1.0 - step / num_steps)


def _flatten(params):
    out = []
    for p in params:
        if hasattr(p, "parameters") and not hasattr(p, "weight"):
            out.extend(p.parameters())
        else:
            out.append(p)
    if not out:
        raise ValueError("the optimizer got an empty parameter list")
    for p in out:
        weight = getattr(p, "weight", None)
        if not (isinstance(weight, np.ndarray) and weight.dtype == np.float32 and weight.ndim == 2):
            raise TypeError(
                "a parameter is a layer with a float32 2-D .weight (an Embedding), got "
                f"{type(p).__name__} with .weight {type(weight).__name__}"
            )
    return out


class _Optimizer:
    def __init__(self, params, lr):
        if isinstance(params, (list, tuple)):
            params = list(params)
        elif hasattr(params, "parameters"):
            params = [params]
        else:
            params = list(params)
        self.params = _flatten(params)
        self.lr = lr

    @property
    def lr(self):
        """The learning rate; a schedule sets it between steps (a negative one is refused when it is set)."""
        return self._lr

    @lr.setter
    def lr(self, value):
        if value < 0:
            raise ValueError(f"lr must be >= 0, got {value}")
        self._lr = value

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def _checked_sgd_grad(p):
    """p.grad, if it fits p.weight exactly (numpy would broadcast a wrong shape, cast a float64, or drop a repeated row)."""
    g, (V, D) = p.grad, p.weight.shape
    if isinstance(g, SparseGrad):
        return g.check(V, D)
    if not isinstance(g, np.ndarray) or g.dtype != np.float32:
        raise TypeError(f"grad must be a float32 array, got {getattr(g, 'dtype', type(g).__name__)}")
    if g.shape != (V, D):
        raise ValueError(f"grad must have weight.shape={(V, D)}, got grad.shape={g.shape}")
    return g


class SGD(_Optimizer):
    """``weight -= lr * grad``; a sparse gradient moves only its rows."""

    def __init__(self, params, lr):
        super().__init__(params, lr)

    def step(self):
        updates = [(p, _checked_sgd_grad(p)) for p in self.params if p.grad is not None]  # all checked first
        lr = np.float32(self.lr)
        for p, g in updates:
            if isinstance(g, SparseGrad):
                p.weight[g.rows] -= lr * g.values
            else:
                p.weight -= lr * g


def _adam_all(updates, lr, betas, eps, steps):
    """Adam updates of (param, exp_avg, exp_avg_sq, grad, rows) at step counts `steps`: every one is
    checked before any moves, so a step that raises leaves every weight and moment as it was."""
    updates = list(updates)
    b1, b2 = betas
    for check_only in (True, False):
        for (p, m, v, g, rows), t in zip(updates, steps):
            _kernels.adam_step(p.weight, m, v, g, rows, lr, b1, b2, eps, 1 - b1**t, 1 - b2**t, check_only)


class _AdamFamily(_Optimizer):
    """What Adam and SparseAdam share: betas, eps, a step count t, and both moments of every weight."""

    def __init__(self, params, lr=BOOK_LR, betas=BOOK_BETAS, eps=BOOK_EPS):
        super().__init__(params, lr)
        self.betas, self.eps, self.t = tuple(betas), eps, 0  # t: completed step() calls
        self._check_hyperparameters()
        self.exp_avg = [np.zeros_like(p.weight) for p in self.params]
        self.exp_avg_sq = [np.zeros_like(p.weight) for p in self.params]


    def _check_hyperparameters(self):
        """betas in [0, 1) (a beta of 1 makes the bias correction divide by zero) and eps >= 0; checked at
        construction and again by step(), since both are plain attributes a user may change."""
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")


class Adam(_AdamFamily):
    """The book's Adam: every parameter moves every step, through its moments.

    With t the step count (1 on the first step), per element:
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``w -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``.
    A missing gradient counts as zero (the row still moves by its momentum), and a
    sparse gradient is made dense: this is what the book does, whatever rows were looked up.
    Defaults are the book's: lr 0.01, betas (0.85, 0.99), eps 1e-8. For its learning-rate
    schedule set ``opt.lr = linear_decay(0.01, step, num_steps)`` before each step.
    """

    def step(self):
        self._check_hyperparameters()
        grads = []
        for p in self.params:
            g = p.grad
            if g is None:
                g = np.zeros_like(p.weight)
            elif isinstance(g, SparseGrad):
                g = g.to_dense(p.weight.shape[0])
            grads.append(g)
        t = self.t + 1
        _adam_all(zip(self.params, self.exp_avg, self.exp_avg_sq, grads, [None] * len(grads)),
                  self.lr, self.betas, self.eps, [t] * len(grads))
        self.t = t


class SparseAdam(_AdamFamily):
    """Lazy Adam: only the rows in this step's sparse gradient move; NOT the book's Adam.

    Untouched rows keep their weight and both moments exactly as they were (the
    book's Adam would keep moving them by their momentum). The update of a touched
    row is the book's formula above (eps added after the bias correction; torch's
    SparseAdam adds it before, so the two differ when sqrt(v) is near eps). The bias
    correction uses each parameter's own step count (``steps[i]``: the steps at
    which it had a gradient), as torch.optim.SparseAdam counts them. Each touched
    row is updated in one fused pass. Needs sparse gradients (layers built with sparse=True).
    """

    def __init__(self, params, lr=BOOK_LR, betas=BOOK_BETAS, eps=BOOK_EPS):
        super().__init__(params, lr, betas, eps)
        self.steps = [0] * len(self.params)

    def step(self):
        self._check_hyperparameters()
        for p in self.params:
            if p.grad is not None and not isinstance(p.grad, SparseGrad):
                raise TypeError(
                    "SparseAdam needs sparse gradients (SparseGrad); build the layer with sparse=True, "
                    f"or use Adam for dense ones; got a {type(p.grad).__name__}"
                )
        touched = [i for i, p in enumerate(self.params) if p.grad is not None]
        updates = [(self.params[i], self.exp_avg[i], self.exp_avg_sq[i], self.params[i].grad.values,
                    self.params[i].grad.rows) for i in touched]
        _adam_all(updates, self.lr, self.betas, self.eps, [self.steps[i] + 1 for i in touched])
        for i in touched:
            self.steps[i] += 1
        self.t += 1
