"""Optimizers for fastembed layers: SGD, Adagrad, RowWiseAdagrad, the book's dense Adam, and the lazy SparseAdam.

A parameter is anything with a float32 ``weight`` array and a ``grad`` that is
None, a dense array of weight's shape, or a `SparseGrad(rows, values)`; an
`Embedding` is one, and a `TokenPositionEmbedding` gives two by ``parameters()``.
"""
import numpy as np

from . import _kernels
from .nn import SparseGrad

__all__ = ["SGD", "Adagrad", "RowWiseAdagrad", "Adam", "SparseAdam", "linear_decay"]

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


def _grad_arrays(p):
    """(grad, rows) for a row-update kernel: (values, int64 rows) of a sparse gradient, (grad, None) of a
    dense one; checked to fit p.weight exactly (numpy would broadcast a wrong shape, cast a float64, or
    drop a repeated row)."""
    g, (V, D) = p.grad, p.weight.shape
    if isinstance(g, SparseGrad):
        g.check(V, D)
        return g.values, g.rows.astype(np.int64, copy=False)
    if not isinstance(g, np.ndarray) or g.dtype != np.float32:
        raise TypeError(f"grad must be a float32 array, got {getattr(g, 'dtype', type(g).__name__)}")
    if g.shape != (V, D):
        raise ValueError(f"grad must have weight.shape={(V, D)}, got grad.shape={g.shape}")
    return g, None


def _checked_sgd_grad(p):
    """(grad, rows) for sgd_step once every check has passed, the kernel's own included (a weight it
    cannot write in place, memory shared between weight and gradient)."""
    grad, rows = _grad_arrays(p)
    _kernels.sgd_step(p.weight, grad, rows, 0.0, True)
    return grad, rows


class SGD(_Optimizer):
    """``weight -= lr * grad``; a sparse gradient moves only its rows.

    In float32, lr rounded to it: each element becomes ``w - (lr * g)``, as numpy's
    ``weight[rows] -= np.float32(lr) * values`` gives it, in one threaded pass (_kernels.sgd_step).
    """

    def __init__(self, params, lr):
        super().__init__(params, lr)

    def step(self):
        updates = [(p, _checked_sgd_grad(p)) for p in self.params if p.grad is not None]  # all checked first
        for p, (grad, rows) in updates:
            _kernels.sgd_step(p.weight, grad, rows, self.lr)


class Adagrad(_Optimizer):
    """torch.optim.Adagrad for embeddings: per element, a sum of squared gradients scales the step.

    Each parameter keeps ``state_sum`` (weight's shape, starting at ``initial_accumulator_value``) and
    its own step count ``steps[i]`` (the steps at which it had a gradient; torch counts the same).
    At its step t, with ``clr = lr / (1 + (t - 1) * lr_decay)`` and, for a dense gradient,
    ``g = g + weight_decay * w``: ``state_sum += g * g``, ``w -= clr * g / (sqrt(state_sum) + eps)``,
    in float32 with torch's order of operations for a dense gradient (for a sparse one torch divides
    before it multiplies by clr, one rounding apart). A sparse gradient moves only its rows (weight and
    state_sum); as in torch, weight_decay with a sparse gradient is a RuntimeError, raised before
    anything moves. Defaults are torch's: lr 0.01, lr_decay 0, weight_decay 0,
    initial_accumulator_value 0, eps 1e-10.
    """

    def __init__(self, params, lr=0.01, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10):
        super().__init__(params, lr)
        self.lr_decay, self.weight_decay, self.eps = lr_decay, weight_decay, eps
        if not initial_accumulator_value >= 0.0:
            raise ValueError(f"initial_accumulator_value must be >= 0, got {initial_accumulator_value}")
        self._check_hyperparameters()
        self.state_sum = [np.full_like(p.weight, initial_accumulator_value) for p in self.params]
        self.steps = [0] * len(self.params)

    def _check_hyperparameters(self):
        """Checked at construction and again by step(): they are plain attributes a user may change."""
        for name in ("lr_decay", "weight_decay", "eps"):
            value = getattr(self, name)
            if not value >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    def _checked(self, i):
        """(grad, rows) for parameter i's adagrad_step, every check passed (weight decay applied)."""
        p = self.params[i]
        grad, rows = _grad_arrays(p)
        if self.weight_decay != 0:
            if rows is not None:
                raise RuntimeError("weight_decay option is not compatible with sparse gradients")
            grad = grad + np.float32(self.weight_decay) * p.weight
        _kernels.adagrad_step(p.weight, self.state_sum[i], grad, rows, 0.0, 0.0, True)
        return grad, rows

    def step(self):
        self._check_hyperparameters()
        updates = [(i, self._checked(i)) for i, p in enumerate(self.params) if p.grad is not None]
        for i, (grad, rows) in updates:
            t = self.steps[i] + 1
            clr = self.lr / (1 + (t - 1) * self.lr_decay)
            _kernels.adagrad_step(self.params[i].weight, self.state_sum[i], grad, rows, clr, self.eps)
            self.steps[i] = t


class RowWiseAdagrad(_Optimizer):
    """Row-wise Adagrad (FBGEMM's default for recommendation models): one accumulator per row.

    ``state_sum[i]`` has one float32 per row of parameter i (shape (V,), starting at 0). For each
    row r of the gradient: ``state_sum[r] += mean(g[r] ** 2)`` (summed in float32 in column order,
    then divided by D), then ``w[r] -= lr * g[r] / (sqrt(state_sum[r]) + eps)``. A sparse gradient
    moves only its rows; a dense one moves every row (a zero gradient row keeps its weight). D = 0
    changes nothing. Defaults: lr 0.01, eps 1e-10 (torch's Adagrad's).
    """

    def __init__(self, params, lr=0.01, eps=1e-10):
        super().__init__(params, lr)
        self.eps = eps
        self._check_hyperparameters()
        self.state_sum = [np.zeros(p.weight.shape[0], np.float32) for p in self.params]

    def _check_hyperparameters(self):
        if not self.eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")

    def _checked(self, i):
        grad, rows = _grad_arrays(self.params[i])
        _kernels.rowwise_adagrad_step(self.params[i].weight, self.state_sum[i], grad, rows, 0.0, 0.0, True)
        return grad, rows

    def step(self):
        self._check_hyperparameters()
        updates = [(i, self._checked(i)) for i, p in enumerate(self.params) if p.grad is not None]
        for i, (grad, rows) in updates:
            _kernels.rowwise_adagrad_step(self.params[i].weight, self.state_sum[i], grad, rows, self.lr, self.eps)


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
