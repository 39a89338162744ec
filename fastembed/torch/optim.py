"""Drop-in ``torch.optim`` optimizers whose updates run on fastembed's kernels.

`SGD`, `Adagrad`, `SparseAdam` and `Adam` subclass torch's classes of the same
name: constructor, defaults, hyperparameter checks, ``param_groups``,
``state_dict()`` / ``load_state_dict()``, ``add_param_group``, hooks and lr
schedulers are torch's own, and the state keeps torch's keys and types, so a
state_dict moves between these and torch's optimizers both ways. Only ``step``
differs: a parameter the kernels can take is updated in place by them (through
``tensor.numpy()``, which shares the memory), every other one by torch's own
algorithm, in the same step.

The kernels take a parameter that is a CPU, 2-D, C-contiguous tensor of float32,
float64, float16 or bfloat16 whose gradient has its dtype and shape, dense or sparse COO
with one sparse dimension (coalesced or not: stock ``nn.Embedding(sparse=True)`` gives one
entry per lookup), when the group's options are ones the kernel computes (listed per
class); the rest goes to torch (other dtypes and devices, momentum, weight decay,
maximize, amsgrad, fused, capturable, differentiable...), so those results are torch's
own, bit for bit. State tensors have the parameter's dtype, as torch's. float64 is
computed in float64 with the float32 kernels' formulas; float16 and bfloat16 in float32
(each stored element rounded once, where torch rounds after each of its ops): those match
torch's to the tolerance torch's tests use for the dtype (tests/test_torch_optim_dtypes.py).

Before anything moves, a step checks every kernel parameter (gradient shape, sparse
rows within the table) and every group's lr, and raises torch's own errors (Adam given
a sparse gradient, SparseAdam a dense one, Adagrad weight decay with a sparse one):
a step that raises leaves weights, state and step counts as they were. Unlike torch,
a negative (or NaN) lr set on a param_group after construction is refused by step().

`RowWiseAdagrad` is FBGEMM's row-wise Adagrad (one accumulator per table row), a
``torch.optim.Optimizer`` of its own.

The fused rules `FusedSGD`, `FusedAdagrad`, `FusedRowWiseAdagrad` and `FusedSparseAdam`
are for ``fastembed.torch.Embedding(..., fused=rule)``: the backward itself updates the
rows it touches (no gradient stored, no step to call). They are `fastembed.optim`'s
rules with torch's defaults and torch's formulas: `FusedSGD` rounds once as
torch.optim.SGD does (bit for bit the same result on the same lookups), `FusedSparseAdam`
adds eps before the bias correction as torch.optim.SparseAdam does.
"""
import math

import torch

from .. import _kernels
from .. import optim as _fe_optim

try:
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # a private helper: torch's rule, restated, if it moves
    def _get_scalar_dtype():
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32

__all__ = ["SGD", "Adagrad", "SparseAdam", "Adam", "RowWiseAdagrad",
           "FusedSGD", "FusedAdagrad", "FusedRowWiseAdagrad", "FusedSparseAdam"]


# ---------------------------------------------------------------- what the kernels can take

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _is_table(t):
    """A tensor whose memory the kernels can update in place."""
    return (t.layout == torch.strided and t.device.type == "cpu" and t.dtype in _KERNEL_DTYPES
            and t.dim() == 2 and t.is_contiguous())


def _is_state_like(t, p):
    return isinstance(t, torch.Tensor) and _is_table(t) and t.shape == p.shape and t.dtype == p.dtype


def _scalar(x):
    """A hyperparameter as a Python float, None when it is a tensor autograd follows (torch's
    differentiable path, left to torch)."""
    if isinstance(x, torch.Tensor):
        return None if x.requires_grad else x.item()
    return x


def _is_zero(x):
    return not isinstance(x, torch.Tensor) and x == 0


def _check_lrs(optimizer):
    """Every group's lr >= 0, checked before anything moves (a schedule or a user may set any number)."""
    for i, group in enumerate(optimizer.param_groups):
        lr = group["lr"]
        value = lr.item() if isinstance(lr, torch.Tensor) else lr
        if not value >= 0:
            raise ValueError(f"param_groups[{i}]['lr'] must be >= 0, got {value}")


def _check_grad_shape(p, g):
    """torch refuses ``p.grad = g`` of another shape, but ``p.grad.data = ...`` gets around it."""
    if g.shape != p.shape:
        raise ValueError(f"a gradient must have its parameter's shape {tuple(p.shape)}, got {tuple(g.shape)}")


def _numpy(t):
    """t's memory as a numpy array (bfloat16: its bits as uint16, read with _format="bfloat16")."""
    t = t.detach()
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def _format(p):
    """The kernels' keyword for p's dtype: bfloat16 arrives as uint16 bits."""
    return "bfloat16" if p.dtype == torch.bfloat16 else None


def _kernel_grad(g):
    """(values, ids, coalesced) of a sparse gradient, (grad, None, True) of a dense one, as numpy
    arrays sharing g's memory; None when the kernels cannot take g (torch updates that parameter)."""
    if g.device.type != "cpu" or g.dtype not in _KERNEL_DTYPES:
        return None
    if g.layout == torch.strided:
        return _numpy(g), None, True
    if g.layout == torch.sparse_coo and g.sparse_dim() == 1 and g.dense_dim() == 1:
        return _numpy(g._values()), _numpy(g._indices()[0]), g.is_coalesced()
    return None


def _lookups(grad):
    """(ids, values) of an uncoalesced sparse gradient, one entry per lookup, for the *_scatter kernels
    (which coalesce and update in one pass, the sums never written out); None for a dense or coalesced
    gradient, whose rows (None for a dense one) the *_step kernels take as they are."""
    values, ids, coalesced = grad
    return None if ids is None or coalesced else (ids, values)


def _torch_step(optimizer, base, kernel_params):
    """torch's own step for every parameter but kernel_params, whose gradients are hidden meanwhile
    (set to None and restored), so that none is updated twice."""
    step = base.step
    if getattr(step, "hooked", False):  # torch wrapped it with the step hooks, which our step already ran
        step = step.__wrapped__
    saved = [(p, p.grad) for p in kernel_params]
    try:
        for p in kernel_params:
            p.grad = None
        step(optimizer)
    finally:
        for p, g in saved:
            p.grad = g


class _KernelStep:
    """The step shared by the drop-ins: plan, check every kernel update, torch's step for the rest,
    then the kernel updates. A subclass gives `_torch` (the torch class), `_kernel_options(group)`
    (None: the group is torch's), `_refuse(group, p, g)` (torch's errors, raised up front) and
    `_job(options, p, grad)`: None (the parameter is torch's) or ``job(check_only)``, which moves
    nothing when check_only is true and cannot fail after its check passed."""

    def step(self, closure=None):
        """One optimization step; closure, if given, re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            _check_lrs(self)
            jobs, kernel_params, others = [], [], False
            for group in self.param_groups:
                options = self._kernel_options(group)
                for p in group["params"]:
                    g = p.grad
                    if g is None:
                        continue
                    _check_grad_shape(p, g)
                    self._refuse(group, p, g)
                    grad = _kernel_grad(g) if options is not None and _is_table(p) else None
                    job = None if grad is None else self._job(options, p, grad)
                    if job is None:
                        others = True
                    else:
                        jobs.append(job)
                        kernel_params.append(p)
            for job in jobs:  # every kernel update checked before any moves
                job(True)
            if others:
                self._fallback(kernel_params)
            for job in jobs:
                job(False)
        return loss

    def _refuse(self, group, p, g):
        pass

    def _fallback(self, kernel_params):
        _torch_step(self, self._torch, kernel_params)


# ---------------------------------------------------------------- SGD

class SGD(_KernelStep, torch.optim.SGD):
    """``torch.optim.SGD`` (same signature and defaults) with fastembed's kernels.

    Kernels: a group with momentum 0, weight_decay 0, maximize False, not fused, not
    differentiable (foreach is ignored: torch's result does not depend on it). Each element
    becomes ``fma(-lr, g, w)``, rounded once, as torch's ``param.add_(grad, alpha=-lr)``
    computes it: bit for bit torch's result, dense or sparse, and for an uncoalesced sparse
    gradient the updates are applied one entry at a time in its order (no coalesce), as torch
    does (float64: the same in float64; float16 and bfloat16: -lr rounded to the type and
    ``w + (-lr) * g`` rounded once, torch's vectorised rule, which torch's scalar loop for the
    last columns of a row may round one ulp apart). Anything else is torch's own SGD.
    """

    _torch = torch.optim.SGD

    def _kernel_options(self, group):
        lr = _scalar(group["lr"])
        if (lr is None or group["momentum"] != 0 or not _is_zero(group["weight_decay"]) or group["maximize"]
                or group["differentiable"] or group["fused"]):
            return None
        return lr

    def _job(self, lr, p, grad):
        w, fmt = _numpy(p), _format(p)
        values, ids, _ = grad
        if ids is None:
            def job(check_only):
                _kernels.sgd_step(w, values, None, lr, check_only, fma=True, _format=fmt)
        else:
            def job(check_only):
                _kernels.sgd_scatter(w, ids, values, lr, fma=True, check_only=check_only, _format=fmt)
        return job


# ---------------------------------------------------------------- Adagrad

class Adagrad(_KernelStep, torch.optim.Adagrad):
    """``torch.optim.Adagrad`` (same signature and defaults) with fastembed's kernels.

    Kernels: a group with weight_decay 0, maximize False, not fused, not differentiable
    (lr_decay and initial_accumulator_value are taken). State is torch's: ``sum`` (the
    parameter's shape) and ``step`` (a 0-d float tensor). A sparse gradient is coalesced
    (summed per row) and moves only its rows. The update is torch's formula, ``sum += g * g``,
    ``w -= clr * g / (sqrt(sum) + eps)`` with ``clr = lr / (1 + (step - 1) * lr_decay)``, in
    float32, but torch rounds ``w + (-clr) * (g / std)`` where the kernel rounds
    ``w - (clr * g) / std``, its ``addcmul_`` may round ``sum + g * g`` once, and its coalesce may
    sum repeated rows in another order: weights and ``sum`` match torch's to float32 rounding
    (other dtypes: see the module's docstring).
    Anything else is torch's own Adagrad.
    """

    _torch = torch.optim.Adagrad

    def _kernel_options(self, group):
        lr = _scalar(group["lr"])
        if (lr is None or group["weight_decay"] != 0 or group["maximize"] or group["differentiable"]
                or group["fused"]):
            return None
        return lr, group["lr_decay"], group["eps"]

    def _refuse(self, group, p, g):
        if g.is_sparse and group["weight_decay"] != 0:
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")

    def _job(self, options, p, grad):
        lr, lr_decay, eps = options
        state = self.state[p]
        if len(state) == 0:  # a parameter added by add_param_group: torch starts it the same way
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["sum"] = torch.full_like(p, self.defaults["initial_accumulator_value"],
                                           memory_format=torch.preserve_format)
        step, state_sum = state["step"], state["sum"]
        if not (_is_state_like(state_sum, p) and isinstance(step, torch.Tensor)):
            return None
        w, s, fmt = _numpy(p), _numpy(state_sum), _format(p)
        lookups = _lookups(grad)
        if lookups is None:
            values, rows, _ = grad

            def update(clr, e, check_only=False):
                _kernels.adagrad_step(w, s, values, rows, clr, e, check_only, _format=fmt)
        else:
            ids, values = lookups

            def update(clr, e, check_only=False):
                _kernels.adagrad_scatter(w, s, ids, values, clr, e, check_only=check_only, _format=fmt)

        def job(check_only):
            if check_only:
                update(0.0, 0.0, True)
                return
            step.add_(1)
            update(lr / (1 + (step.item() - 1) * lr_decay), eps)
        return job


# ---------------------------------------------------------------- Adam and SparseAdam

def _adam_state(state, p, step):
    if len(state) == 0:
        state["step"] = step
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    return (m, v) if _is_state_like(m, p) and _is_state_like(v, p) else None


class SparseAdam(_KernelStep, torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` (same signature and defaults) with fastembed's kernels.

    Kernels: a group with maximize False. State is torch's: ``step`` (a Python int, counted on
    every step the parameter has a gradient, an empty one included), ``exp_avg``, ``exp_avg_sq``.
    Only the rows of the (coalesced) gradient move, weights and both moments, by torch's
    formula: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``w -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`` (eps added before the bias
    correction, as torch does), all in float32 with the kernel's order of operations: weights
    and moments match torch's to float32 rounding (other dtypes: the module's docstring). A dense
    gradient raises torch's RuntimeError before anything moves. Anything else is torch's own
    SparseAdam.
    """

    _torch = torch.optim.SparseAdam

    def _kernel_options(self, group):
        lr = _scalar(group["lr"])
        if lr is None or group.get("maximize", False):
            return None
        beta1, beta2 = group["betas"]
        return lr, beta1, beta2, group["eps"]

    def _refuse(self, group, p, g):
        if not g.is_sparse:
            raise RuntimeError("SparseAdam does not support dense gradients, please consider Adam instead")

    def _job(self, options, p, grad):
        lr, beta1, beta2, eps = options
        state = self.state[p]
        moments = _adam_state(state, p, 0)
        if moments is None:
            return None
        w, m, v, fmt = _numpy(p), _numpy(moments[0]), _numpy(moments[1]), _format(p)
        lookups = _lookups(grad)
        if lookups is None:
            values, rows, _ = grad
            empty = len(rows) == 0

            def update(e, bias1, bias2, check_only=False):
                _kernels.adam_step(w, m, v, values, rows, lr, beta1, beta2, e, bias1, bias2, check_only,
                                   _format=fmt)
        else:
            ids, values = lookups
            empty = ids.size == 0

            def update(e, bias1, bias2, check_only=False):
                _kernels.adam_scatter(w, m, v, ids, values, lr, beta1, beta2, e, bias1, bias2,
                                      check_only=check_only, _format=fmt)

        def job(check_only):
            if check_only:
                update(eps, 1.0, 1.0, True)
                return
            state["step"] += 1
            if empty:
                return
            t = int(state["step"])
            bias1, bias2 = 1 - beta1**t, 1 - beta2**t
            # the kernel adds eps after the bias correction: eps / sqrt(bias2) there is torch's eps before it
            update(eps / math.sqrt(bias2), bias1, bias2)
        return job


class Adam(_KernelStep, torch.optim.Adam):
    """``torch.optim.Adam`` (same signature and defaults) with fastembed's kernels.

    Kernels: a group with weight_decay 0, amsgrad False, maximize False, not fused, not
    capturable, not differentiable (foreach is ignored). State is torch's: ``step`` (a 0-d float
    tensor), ``exp_avg``, ``exp_avg_sq``. Every element of a parameter with a gradient moves,
    by torch's formula ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``w -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`` fused per element in float32
    (torch uses lerp for m and other roundings): weights and moments match torch's to float32
    rounding. A sparse gradient raises torch's RuntimeError before anything moves. Anything else
    is torch's own Adam.
    """

    _torch = torch.optim.Adam

    def _kernel_options(self, group):
        lr = _scalar(group["lr"])
        if (lr is None or group["weight_decay"] != 0 or group["amsgrad"] or group["maximize"]
                or group["capturable"] or group["differentiable"] or group["fused"]):
            return None
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        if beta1 is None or beta2 is None:
            return None
        return lr, beta1, beta2, group["eps"]

    def _refuse(self, group, p, g):
        if g.is_sparse:
            raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")

    def _job(self, options, p, grad):
        lr, beta1, beta2, eps = options
        state = self.state[p]
        moments = _adam_state(state, p, torch.tensor(0.0, dtype=_get_scalar_dtype()))
        step = state["step"]
        if moments is None or not isinstance(step, torch.Tensor):
            return None
        w, m, v, fmt = _numpy(p), _numpy(moments[0]), _numpy(moments[1]), _format(p)
        values = grad[0]

        def job(check_only):
            if check_only:
                _kernels.adam_step(w, m, v, values, None, lr, beta1, beta2, eps, 1.0, 1.0, True, _format=fmt)
                return
            step.add_(1)
            t = step.item()
            _kernels.adam_step(w, m, v, values, None, lr, beta1, beta2, eps, 1 - beta1**t, 1 - beta2**t,
                               _format=fmt)
        return job


# ---------------------------------------------------------------- row-wise Adagrad

class RowWiseAdagrad(_KernelStep, torch.optim.Optimizer):
    """Row-wise Adagrad (FBGEMM's default for embedding tables): one accumulator per table row.

    Parameters are 2-D tables (rows, dim). State ``sum`` has one value per row (shape (rows,),
    the parameter's dtype, starting at 0). For each row r of the gradient (every row of a dense
    one, the rows of a sparse one, duplicates summed first):
    ``sum[r] += mean(g[r] ** 2)``, then ``w[r] -= lr * g[r] / (sqrt(sum[r]) + eps)``; a table of
    dim 0 does not change. A CPU contiguous table of float32, float64, float16 or bfloat16 runs
    the kernel (the mean summed in column order, then divided by dim: in float32, in float64 for
    float64, in float32 for the 16-bit types, each stored element rounded once); anything else
    (other dtypes, devices, a sparse gradient with dense rows of more than one dimension) runs the
    same formula in torch ops here, whose sums may round differently. Defaults: lr 0.01, eps 1e-10.
    """

    def __init__(self, params, lr=0.01, eps=1e-10):
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        super().__init__(params, {"lr": lr, "eps": eps})

    def add_param_group(self, param_group):
        if isinstance(param_group, dict) and not isinstance(param_group.get("params"), set):  # torch refuses those
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)  # torch's own conversion
            for p in params:  # refused before the group joins, so a refused group leaves no trace
                if isinstance(p, torch.Tensor) and p.dim() != 2:
                    raise ValueError(f"RowWiseAdagrad updates 2-D tables (rows, dim), got a parameter of shape "
                                     f"{tuple(p.shape)}")
            param_group = {**param_group, "params": params}
        super().add_param_group(param_group)

    def _kernel_options(self, group):
        lr = _scalar(group["lr"])
        return None if lr is None else (lr, group["eps"])

    def _sum(self, p):
        state = self.state[p]
        if len(state) == 0:
            state["sum"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
        return state["sum"]

    def _job(self, options, p, grad):
        lr, eps = options
        state_sum = self._sum(p)
        if not (state_sum.dtype == p.dtype and state_sum.device.type == "cpu" and state_sum.is_contiguous()
                and state_sum.shape == (p.shape[0],)):
            return None
        w, s, fmt = _numpy(p), _numpy(state_sum), _format(p)
        lookups = _lookups(grad)
        if lookups is None:
            values, rows, _ = grad

            def job(check_only):
                _kernels.rowwise_adagrad_step(w, s, values, rows, lr, eps, check_only, _format=fmt)
        else:
            ids, values = lookups

            def job(check_only):
                _kernels.rowwise_adagrad_scatter(w, s, ids, values, lr, eps, check_only=check_only, _format=fmt)
        return job

    def _fallback(self, kernel_params):
        """The same update in torch ops, in the kernel's order of operations but for the mean."""
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None or any(p is q for q in kernel_params):
                    continue
                state_sum = self._sum(p)
                g = p.grad
                if p.shape[1] == 0:
                    continue
                if g.is_sparse:
                    if g.sparse_dim() != 1:  # e.g. a (row, column) COO: made one of rows (zero rows dropped)
                        g = g.to_dense().to_sparse(1)
                    g = g.coalesce()
                    rows, values = g.indices()[0], g.values().reshape(g.indices().shape[1], -1)
                    state_sum.index_add_(0, rows, values.square().mean(dim=1))
                    std = state_sum[rows].sqrt().add_(eps)
                    p.index_add_(0, rows, (values * lr) / std[:, None], alpha=-1)
                else:
                    state_sum.add_(g.square().mean(dim=1))
                    p.sub_((g * lr) / state_sum.sqrt().add_(eps)[:, None])



# ---------------------------------------------------------------- fused rules (torch's defaults and formulas)

class FusedSGD(_fe_optim.FusedSGD):
    """`fastembed.optim.FusedSGD` rounding as torch does: ``w = fma(-lr, g, w)`` per lookup, in the
    order of the ids: bit for bit ``nn.Embedding(sparse=True)`` + ``torch.optim.SGD(lr=lr)``."""

    def __init__(self, lr=1e-3, *, fma=True):
        super().__init__(lr, fma=fma)


class FusedAdagrad(_fe_optim.FusedAdagrad):
    """`fastembed.optim.FusedAdagrad`: torch.optim.Adagrad's defaults and formula (no weight decay,
    which torch refuses with sparse gradients); equal to it to float32 rounding."""


class FusedRowWiseAdagrad(_fe_optim.FusedRowWiseAdagrad):
    """`fastembed.optim.FusedRowWiseAdagrad` (FBGEMM's row-wise Adagrad), the same as `RowWiseAdagrad`."""


class FusedSparseAdam(_fe_optim.FusedSparseAdam):
    """Lazy Adam as ``torch.optim.SparseAdam``: its defaults (lr 1e-3, betas (0.9, 0.999), eps 1e-8)
    and its formula, ``w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`` (eps added before
    the bias correction), t counted per table; equal to it to float32 rounding."""

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(lr, betas, eps)

    def _kernel_eps(self, t):
        # the kernel adds eps to sqrt(v / (1 - b2^t)); torch's eps before the correction is eps / sqrt(1 - b2^t) there
        return self.eps / math.sqrt(1 - self.betas[1] ** t)
