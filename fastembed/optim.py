"""Optimizers for fastembed layers: SGD, Adagrad, RowWiseAdagrad, the book's dense Adam, and the lazy SparseAdam.

A parameter is anything with a 2-D ``weight`` array (float32, float64, float16 or bfloat16) and a
``grad`` of weight's dtype that is None, a dense array of weight's shape, a `SparseGrad(rows, values)`, or a
`LookupGrad(ids, values)` (one row per lookup, uncoalesced: the sparse optimizers sum
each row's lookups in ids order as they update it, in one pass, and give the
`SparseGrad` result, bit for bit, except SGD, which moves a row once per lookup); an
`Embedding` is one, and a `TokenPositionEmbedding` gives two by ``parameters()``.

The optimizers' state has the weight's dtype, and each step is the kernel of that dtype (see
`fastembed._kernels`): float32 as documented per optimizer, float64 the same formulas in float64, float16
and bfloat16 computed in float32 from the stored values and rounded once per stored element. Nothing is
cast: a gradient of another dtype than its weight is a TypeError, raised before any parameter moves.
"""
import numpy as np

from . import _kernels
from . import ops as _ops
from .nn import LookupGrad, SparseGrad, _DTYPES, _check_dtype, _is_table_dtype

__all__ = ["SGD", "Adagrad", "RowWiseAdagrad", "Adam", "SparseAdam", "linear_decay",
           "FusedSGD", "FusedAdagrad", "FusedRowWiseAdagrad", "FusedSparseAdam"]

BOOK_LR = 0.01
BOOK_BETAS = (0.85, 0.99)
BOOK_EPS = 1e-8


def linear_decay(lr, step, num_steps):
    """The book's schedule: ``lr * (1 - step / num_steps)`` at step 0, 1, ..., num_steps - 1."""
    if num_steps <= 0:
        raise ValueError(f"num_steps must be > 0, got {num_steps}")
    return lr * (1.0 - step / num_steps)


def _check_nonnegative(holder, *names):
    """Each named hyperparameter of holder >= 0 (NaN refused too), in the order given."""
    for name in names:
        value = getattr(holder, name)
        if not value >= 0.0:
            raise ValueError(f"{name} must be >= 0, got {value}")


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
        if not (isinstance(weight, np.ndarray) and _is_table_dtype(weight.dtype) and weight.ndim == 2):
            raise TypeError(
                f"a parameter is a layer with a 2-D .weight of {_DTYPES} (an Embedding), got "
                f"{type(p).__name__} with .weight {type(weight).__name__} "
                f"{getattr(weight, 'dtype', '')}{getattr(weight, 'shape', '')}"
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
    dense one; checked to fit p.weight exactly (numpy would broadcast a wrong shape, cast another dtype, or
    drop a repeated row)."""
    g, (V, D) = p.grad, p.weight.shape
    if isinstance(g, SparseGrad):
        g.check(V, D, p.weight.dtype)
        return g.values, g.rows.astype(np.int64, copy=False)
    _check_dtype(g, p.weight.dtype, "grad")
    if g.shape != (V, D):
        raise ValueError(f"grad must have weight.shape={(V, D)}, got grad.shape={g.shape}")
    return g, None


def _lookup_arrays(p):
    """(values, ids) of p's LookupGrad for a *_scatter kernel, checked to fit p.weight (the kernels check
    the ids' range again, above their loops)."""
    g = p.grad
    g.check(*p.weight.shape, p.weight.dtype)
    return g.values, g.ids


def _checked_sgd_update(p):
    """A callable ``apply(lr)`` that steps p, made once every check has passed, the kernel's own included
    (a weight it cannot write in place, memory shared between weight and gradient)."""
    if isinstance(p.grad, LookupGrad):
        values, ids = _lookup_arrays(p)
        _kernels.sgd_scatter(p.weight, ids, values, 0.0, check_only=True)
        return lambda lr: _kernels.sgd_scatter(p.weight, ids, values, lr)
    grad, rows = _grad_arrays(p)
    _kernels.sgd_step(p.weight, grad, rows, 0.0, True)
    return lambda lr: _kernels.sgd_step(p.weight, grad, rows, lr)


class SGD(_Optimizer):
    """``weight -= lr * grad``; a sparse gradient moves only its rows.

    In float32, lr rounded to it: each element becomes ``w - (lr * g)``, as numpy's
    ``weight[rows] -= np.float32(lr) * values`` gives it, in one threaded pass (_kernels.sgd_step).
    A `LookupGrad` moves each row once per lookup, in ids order (``w[ids[k]] -= lr * values[k]``,
    _kernels.sgd_scatter, as torch's SGD steps an uncoalesced sparse gradient): with repeated ids
    that differs from the `SparseGrad` step by rounding.
    """

    def __init__(self, params, lr):
        super().__init__(params, lr)

    def step(self):
        updates = [_checked_sgd_update(p) for p in self.params if p.grad is not None]  # all checked first
        for apply in updates:
            apply(self.lr)


def _plus_decay(grad, weight, weight_decay):
    """``grad + weight_decay * weight`` in the weight's dtype, as torch's ``grad.add(param, alpha=wd)`` forms it
    on CPU: float32 (wd rounded to it) and float64 in their own type; float16 and bfloat16 in float32 from the
    stored values, rounded once."""
    if weight.dtype.itemsize == 2:
        wide = grad.astype(np.float32) + np.float32(weight_decay) * weight.astype(np.float32)
        return wide.astype(weight.dtype)
    return grad + weight.dtype.type(weight_decay) * weight


class Adagrad(_Optimizer):
    """torch.optim.Adagrad for embeddings: per element, a sum of squared gradients scales the step.

    Each parameter keeps ``state_sum`` (weight's shape, starting at ``initial_accumulator_value``) and
    its own step count ``steps[i]`` (the steps at which it had a gradient; torch counts the same).
    At its step t, with ``clr = lr / (1 + (t - 1) * lr_decay)`` and, for a dense gradient,
    ``g = g + weight_decay * w``: ``state_sum += g * g``, ``w -= clr * g / (sqrt(state_sum) + eps)``,
    in float32 with torch's order of operations for a dense gradient (for a sparse one torch divides
    before it multiplies by clr, one rounding apart); other dtypes: see the module's doc. A sparse gradient moves only its rows (weight and
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
        _check_nonnegative(self, "lr_decay", "weight_decay", "eps")

    def _checked(self, i):
        """``apply(clr, eps)`` for parameter i, every check passed (weight decay applied)."""
        p, state_sum = self.params[i], self.state_sum[i]
        if isinstance(p.grad, LookupGrad):
            values, ids = _lookup_arrays(p)
            if self.weight_decay != 0:
                raise RuntimeError("weight_decay option is not compatible with sparse gradients")
            _kernels.adagrad_scatter(p.weight, state_sum, ids, values, 0.0, 0.0, -1, True)
            return lambda clr, eps: _kernels.adagrad_scatter(p.weight, state_sum, ids, values, clr, eps)
        grad, rows = _grad_arrays(p)
        if self.weight_decay != 0:
            if rows is not None:
                raise RuntimeError("weight_decay option is not compatible with sparse gradients")
            grad = _plus_decay(grad, p.weight, self.weight_decay)
        _kernels.adagrad_step(p.weight, state_sum, grad, rows, 0.0, 0.0, True)
        return lambda clr, eps: _kernels.adagrad_step(p.weight, state_sum, grad, rows, clr, eps)

    def step(self):
        self._check_hyperparameters()
        updates = [(i, self._checked(i)) for i, p in enumerate(self.params) if p.grad is not None]
        for i, apply in updates:
            t = self.steps[i] + 1
            apply(self.lr / (1 + (t - 1) * self.lr_decay), self.eps)
            self.steps[i] = t


class RowWiseAdagrad(_Optimizer):
    """Row-wise Adagrad (FBGEMM's default for recommendation models): one accumulator per row.

    ``state_sum[i]`` has one element per row of parameter i (shape (V,), weight's dtype, starting at 0). For each
    row r of the gradient: ``state_sum[r] += mean(g[r] ** 2)`` (summed in float32 in column order,
    then divided by D), then ``w[r] -= lr * g[r] / (sqrt(state_sum[r]) + eps)``. A sparse gradient
    moves only its rows; a dense one moves every row (a zero gradient row keeps its weight). D = 0
    changes nothing. Defaults: lr 0.01, eps 1e-10 (torch's Adagrad's).
    """

    def __init__(self, params, lr=0.01, eps=1e-10):
        super().__init__(params, lr)
        self.eps = eps
        self._check_hyperparameters()
        self.state_sum = [np.zeros(p.weight.shape[0], p.weight.dtype) for p in self.params]

    def _check_hyperparameters(self):
        _check_nonnegative(self, "eps")

    def _checked(self, i):
        """``apply(lr, eps)`` for parameter i, every check passed."""
        p, state_sum = self.params[i], self.state_sum[i]
        if isinstance(p.grad, LookupGrad):
            values, ids = _lookup_arrays(p)
            _kernels.rowwise_adagrad_scatter(p.weight, state_sum, ids, values, 0.0, 0.0, -1, True)
            return lambda lr, eps: _kernels.rowwise_adagrad_scatter(p.weight, state_sum, ids, values, lr, eps)
        grad, rows = _grad_arrays(p)
        _kernels.rowwise_adagrad_step(p.weight, state_sum, grad, rows, 0.0, 0.0, True)
        return lambda lr, eps: _kernels.rowwise_adagrad_step(p.weight, state_sum, grad, rows, lr, eps)

    def step(self):
        self._check_hyperparameters()
        updates = [self._checked(i) for i, p in enumerate(self.params) if p.grad is not None]
        for apply in updates:
            apply(self.lr, self.eps)


def _adam_all(updates, lr, betas, eps, steps):
    """Adam updates of (param, exp_avg, exp_avg_sq, grad, rows) at step counts `steps`: every one is
    checked before any moves, so a step that raises leaves every weight and moment as it was. A
    LookupGrad as grad (rows None) goes to adam_scatter: ids' rows, each summed as it is updated."""
    updates = list(updates)
    b1, b2 = betas
    for check_only in (True, False):
        for (p, m, v, g, rows), t in zip(updates, steps):
            if isinstance(g, LookupGrad):
                _kernels.adam_scatter(p.weight, m, v, g.ids, g.values, lr, b1, b2, eps, 1 - b1**t, 1 - b2**t, -1,
                                      check_only)
            else:
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
        _check_nonnegative(self, "eps")


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
            elif isinstance(g, (SparseGrad, LookupGrad)):
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
    row is updated in one fused pass. Needs sparse gradients (layers built with sparse=True): a
    `LookupGrad` (coalesce=False) gives the `SparseGrad` result bit for bit, each row summed as it
    is updated.
    """

    def __init__(self, params, lr=BOOK_LR, betas=BOOK_BETAS, eps=BOOK_EPS):
        super().__init__(params, lr, betas, eps)
        self.steps = [0] * len(self.params)

    def step(self):
        self._check_hyperparameters()
        for p in self.params:
            if p.grad is not None and not isinstance(p.grad, (SparseGrad, LookupGrad)):
                raise TypeError(
                    "SparseAdam needs sparse gradients (SparseGrad or LookupGrad); build the layer with sparse=True, "
                    f"or use Adam for dense ones; got a {type(p.grad).__name__}"
                )
        touched = [i for i, p in enumerate(self.params) if p.grad is not None]
        for i in touched:
            weight, grad = self.params[i].weight, self.params[i].grad
            grad.check(*weight.shape, weight.dtype)
        updates = [(self.params[i], self.exp_avg[i], self.exp_avg_sq[i], *self._arrays(self.params[i].grad))
                   for i in touched]
        _adam_all(updates, self.lr, self.betas, self.eps, [self.steps[i] + 1 for i in touched])
        for i in touched:
            self.steps[i] += 1
        self.t += 1

    @staticmethod
    def _arrays(grad):
        """(grad, rows) as _adam_all takes them: a SparseGrad's (values, rows), a LookupGrad itself."""
        return (grad, None) if isinstance(grad, LookupGrad) else (grad.values, grad.rows)


# ---------------------------------------------------------------- fused rules (issue 9, item 3)
#
# A fused layer applies its optimizer's update inside backward, to the rows it looked up, and
# stores no gradient; the state (moments, accumulators, step counts) lives with the layer, as
# plain numpy arrays a layer or a torch module can save. A rule holds only the hyperparameters,
# so one rule can serve several tables (TokenPositionEmbedding's two, each with its own state).


def _padding_row(padding_idx, num_rows):
    """padding_idx as a row in [0, num_rows), or None; a negative one counts from the end, as in torch."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, (bool, np.bool_)) or not isinstance(padding_idx, (int, np.integer)):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not -num_rows <= padding_idx < num_rows:
        raise ValueError(f"padding_idx must be in [-{num_rows}, {num_rows}), got {padding_idx}")
    return int(padding_idx) % num_rows


def _table(weight, _format=None):
    """The (V, D) shape of a table a fused rule updates: float32, float64, float16 or bfloat16
    (ml_dtypes.bfloat16, or uint16 bits with the private _format="bfloat16" of fastembed.torch), refused
    as the kernels refuse it (TypeError, ValueError)."""
    dtype = getattr(weight, "dtype", None)
    if not (isinstance(weight, np.ndarray)
            and (_is_table_dtype(dtype) or (_format == "bfloat16" and dtype == np.uint16))):
        raise TypeError(f"weight must be {_DTYPES} (fastembed never casts tables), got "
                        f"{dtype if dtype is not None else type(weight).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (rows, dim), got weight.shape={weight.shape}")
    return weight.shape


def _full(weight, shape, value, _format=None):
    """A new state array of weight's dtype, every element value rounded to it (bfloat16 bits: rounded as
    the kernels round)."""
    if _format == "bfloat16" and weight.dtype == np.uint16:
        return _kernels._narrow(np.full(int(np.prod(shape)), value, np.float32), "bfloat16").reshape(shape)
    with np.errstate(over="ignore"):
        return np.full(shape, value, weight.dtype)


def _state_entry(state, key):
    """state[key], with an error that says what a state is when it is missing."""
    try:
        return state[key]
    except (KeyError, TypeError, IndexError):
        raise ValueError(f"state must be the dict that new_state(weight) gave, with {key!r}; got "
                         f"{type(state).__name__} with keys {list(state) if isinstance(state, dict) else '?'}") from None


def _step_counter(state):
    """The writeable 0-d int64 step count of a state."""
    step = _state_entry(state, "step")
    if not (isinstance(step, np.ndarray) and step.dtype == np.int64 and step.shape == ()):
        raise TypeError(f"state['step'] must be a 0-d int64 array, got {getattr(step, 'dtype', type(step).__name__)} "
                        f"of shape {getattr(step, 'shape', '?')}")
    if not step.flags.writeable:
        raise ValueError("state['step'] is read-only; the update counts its steps in it")
    return step


def _lookups(weight, ids, padding_idx, _format=None):
    """ids as the *_scatter kernels take them (int32 or int64, any shape) and the row they skip
    (padding_idx's, -1 for none). The kernels coalesce and update in one pass: ids' distinct rows, each
    with grad_out summed over its lookups in ids order, the sums never written out; they refuse
    negative ids, ids past the table and a grad_out that is not ids.shape + (D,)."""
    pad = _padding_row(padding_idx, _table(weight, _format)[0])
    return _ops.as_ids(ids), -1 if pad is None else pad


class _FusedRule:
    """What the fused rules share: a learning rate that refuses to go negative, and ``update`` as
    ``_prepare`` (every check, nothing moved) followed by the step it returns."""

    def __init__(self, lr):
        self.lr = lr

    lr = _Optimizer.lr

    def update(self, weight, state, ids, grad_out, *, padding_idx=None, check_only=False, _format=None):
        """One optimizer step of weight's rows named by ids (any shape, int32 or int64), from grad_out
        (weight's dtype, ids.shape + (D,)), with state from ``new_state(weight)``. Every check runs before
        anything moves; check_only: run them all, change nothing. Ids equal to padding_idx contribute
        nothing: their row and its state keep their values. weight may be float32, float64, float16 or
        bfloat16 (ml_dtypes.bfloat16), its state in its dtype: see the kernels (fastembed._kernels) for
        each dtype's arithmetic (float64 in float64, the 16-bit types in float32, rounded once)."""
        apply = self._prepare(weight, state, ids, grad_out, padding_idx, _format)
        if not check_only:
            apply()

    def _prepare(self, weight, state, ids, grad_out, padding_idx=None, _format=None):
        """Run every check of an update and return a callable that applies it (no argument, no check
        left that could fail): a layer with two tables prepares both before it moves either."""
        raise NotImplementedError

    def _repr_fields(self):
        return f"lr={self.lr!r}"

    def __repr__(self):
        return f"{type(self).__name__}({self._repr_fields()})"


class FusedSGD(_FusedRule):
    """``weight[ids[i]] -= lr * grad_out[i]`` for each i in the row-major order of ids, with no
    coalescing: a row named twice moves twice, one occurrence after the other. In float32 with lr
    rounded to it (float64: in float64); fma=False rounds the product and then the difference (numpy's
    ``w - lr * g``), fma=True rounds once (torch's ``add_(g, alpha=-lr)``); a float16 or bfloat16 table
    is always torch's ``add_`` (-lr rounded to its type, ``w + (-lr) * g`` in float32, rounded once). Without repeated ids, fma=False equals SGD
    on the layer's dense or sparse gradient bit for bit; with them, the sequential updates differ from
    one update by the summed gradient by rounding. No state: ``new_state`` is ``{}``.
    """

    def __init__(self, lr, *, fma=False):
        super().__init__(lr)
        self.fma = bool(fma)

    def new_state(self, weight, *, _format=None):
        _table(weight, _format)
        return {}

    def update(self, weight, state, ids, grad_out, *, padding_idx=None, check_only=False, _format=None):
        if check_only or padding_idx is not None:
            return super().update(weight, state, ids, grad_out, padding_idx=padding_idx, check_only=check_only,
                                  _format=_format)
        # One table, nothing filtered: the kernel checks everything before its loop writes.
        _check_sgd_state(state)
        _kernels.sgd_scatter(weight, _ops.as_ids(ids), grad_out, self.lr, fma=self.fma, _format=_format)

    def _prepare(self, weight, state, ids, grad_out, padding_idx=None, _format=None):
        _check_sgd_state(state)
        ids = _ops.as_ids(ids)
        _kernels.sgd_scatter(weight, ids, grad_out, self.lr, fma=self.fma, check_only=True, _format=_format)
        pad = _padding_row(padding_idx, weight.shape[0])
        if pad is not None:
            keep = ids != pad
            if not keep.all():
                ids, grad_out = ids[keep], grad_out[keep]
        lr, fma = self.lr, self.fma

        def apply():
            _kernels.sgd_scatter(weight, ids, grad_out, lr, fma=fma, _format=_format)
        return apply

    def _repr_fields(self):
        return f"lr={self.lr!r}, fma={self.fma}"


def _check_sgd_state(state):
    if not isinstance(state, dict):
        raise ValueError(f"state must be the dict that new_state(weight) gave, got {type(state).__name__}")


class FusedAdagrad(_FusedRule):
    """`Adagrad` on the rows each backward touches: grad_out summed per row (coalesce), then at step
    t (the table's step count, 1 on its first update) ``clr = lr / (1 + (t - 1) * lr_decay)``,
    ``sum += g * g``, ``w -= clr * g / (sqrt(sum) + eps)``, the same kernel as ``Adagrad.step`` on the
    layer's sparse gradient, bit for bit. State: ``sum`` (weight's shape, starting at
    initial_accumulator_value) and ``step`` (0-d int64). Every update counts a step, one that touches
    no row too (empty ids, or only padding), as Adagrad counts a step with an empty sparse gradient.
    No weight decay: torch allows none with sparse gradients. Defaults are torch's.
    """

    def __init__(self, lr=0.01, lr_decay=0.0, initial_accumulator_value=0.0, eps=1e-10):
        super().__init__(lr)
        self.lr_decay, self.initial_accumulator_value, self.eps = lr_decay, initial_accumulator_value, eps
        self._check_hyperparameters()

    def _check_hyperparameters(self):
        """At construction and again by each update: they are plain attributes a user may change."""
        _check_nonnegative(self, "lr_decay", "initial_accumulator_value", "eps")

    def new_state(self, weight, *, _format=None):
        return {"sum": _full(weight, _table(weight, _format), self.initial_accumulator_value, _format),
                "step": np.zeros((), np.int64)}

    def _prepare(self, weight, state, ids, grad_out, padding_idx=None, _format=None):
        self._check_hyperparameters()
        state_sum, step = _state_entry(state, "sum"), _step_counter(state)
        ids, skip = _lookups(weight, ids, padding_idx, _format)
        _kernels.adagrad_scatter(weight, state_sum, ids, grad_out, 0.0, 0.0, skip, True, _format=_format)
        t = int(step) + 1
        clr, eps = self.lr / (1 + (t - 1) * self.lr_decay), self.eps

        def apply():
            _kernels.adagrad_scatter(weight, state_sum, ids, grad_out, clr, eps, skip, _format=_format)
            step[()] = t
        return apply

    def _repr_fields(self):
        return (f"lr={self.lr!r}, lr_decay={self.lr_decay!r}, "
                f"initial_accumulator_value={self.initial_accumulator_value!r}, eps={self.eps!r}")


class FusedRowWiseAdagrad(_FusedRule):
    """`RowWiseAdagrad` on the rows each backward touches: grad_out summed per row (coalesce), then
    ``sum[r] += mean(g[r] ** 2)``, ``w[r] -= lr * g[r] / (sqrt(sum[r]) + eps)``, the same kernel as
    ``RowWiseAdagrad.step`` on the layer's sparse gradient, bit for bit. State: ``sum``, one element
    per row (shape (V,), starting at 0); no step count (the rule has no decay).
    """

    def __init__(self, lr=0.01, eps=1e-10):
        super().__init__(lr)
        self.eps = eps
        self._check_hyperparameters()

    def _check_hyperparameters(self):
        _check_nonnegative(self, "eps")

    def new_state(self, weight, *, _format=None):
        return {"sum": _full(weight, _table(weight, _format)[:1], 0.0, _format)}

    def _prepare(self, weight, state, ids, grad_out, padding_idx=None, _format=None):
        self._check_hyperparameters()
        state_sum = _state_entry(state, "sum")
        ids, skip = _lookups(weight, ids, padding_idx, _format)
        _kernels.rowwise_adagrad_scatter(weight, state_sum, ids, grad_out, 0.0, 0.0, skip, True, _format=_format)
        lr, eps = self.lr, self.eps

        def apply():
            _kernels.rowwise_adagrad_scatter(weight, state_sum, ids, grad_out, lr, eps, skip, _format=_format)
        return apply

    def _repr_fields(self):
        return f"lr={self.lr!r}, eps={self.eps!r}"


class FusedSparseAdam(_FusedRule):
    """`SparseAdam` (lazy Adam) on the rows each backward touches: grad_out summed per row
    (coalesce), then the book's Adam update of those rows only, bias-corrected by the table's own
    step count t (1 on its first update), the same kernel as ``SparseAdam.step`` on the layer's
    sparse gradient, bit for bit. State: ``exp_avg``, ``exp_avg_sq`` (weight's shape, zeros) and
    ``step`` (0-d int64). Every update counts a step, one that touches no row too (empty ids, or only
    padding), as SparseAdam counts a step for a parameter whose sparse gradient is empty.
    Defaults are the book's: lr 0.01, betas (0.85, 0.99), eps 1e-8.
    """

    def __init__(self, lr=BOOK_LR, betas=BOOK_BETAS, eps=BOOK_EPS):
        super().__init__(lr)
        self.betas, self.eps = tuple(betas), eps
        self._check_hyperparameters()

    _check_hyperparameters = _AdamFamily._check_hyperparameters

    def new_state(self, weight, *, _format=None):
        shape = _table(weight, _format)
        return {"exp_avg": _full(weight, shape, 0.0, _format), "exp_avg_sq": _full(weight, shape, 0.0, _format),
                "step": np.zeros((), np.int64)}

    def _prepare(self, weight, state, ids, grad_out, padding_idx=None, _format=None):
        self._check_hyperparameters()
        m, v, step = _state_entry(state, "exp_avg"), _state_entry(state, "exp_avg_sq"), _step_counter(state)
        ids, skip = _lookups(weight, ids, padding_idx, _format)
        (b1, b2), lr = self.betas, self.lr
        t = int(step) + 1
        eps = self._kernel_eps(t)
        _kernels.adam_scatter(weight, m, v, ids, grad_out, lr, b1, b2, eps, 1.0, 1.0, skip, True, _format=_format)

        def apply():
            _kernels.adam_scatter(weight, m, v, ids, grad_out, lr, b1, b2, eps, 1 - b1**t, 1 - b2**t, skip,
                                  _format=_format)
            step[()] = t
        return apply

    def _kernel_eps(self, t):
        """The eps the kernel adds to sqrt(v / (1 - beta2**t)) at step t: the book's, as given."""
        return self.eps

    def _repr_fields(self):
        return f"lr={self.lr!r}, betas={self.betas!r}, eps={self.eps!r}"
