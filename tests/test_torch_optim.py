"""fastembed.torch.optim against torch.optim: the same steps, state, state_dicts and schedules.

Oracles: torch.optim's own SGD, Adagrad, SparseAdam and Adam (bit for bit where fastembed claims it:
SGD, and every case handed to torch), and a float32 numpy transcription of row-wise Adagrad written
here. Gradients come from stock ``torch.nn.Embedding`` (dense, or sparse and uncoalesced: one entry per
lookup) and from ``fastembed.torch.Embedding`` (sparse and coalesced).
"""
import copy
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _helpers import FEW, assert_bitwise, coalesce_oracle, f32, num_threads, serial_elements

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastembed.torch")
fo = pytest.importorskip("fastembed.torch.optim")

NAMES = ("SGD", "Adagrad", "SparseAdam", "Adam")
# Hyperparameters away from the defaults, so that each one must reach the update.
OPTIONS = {
    "SGD": dict(lr=0.3),
    "Adagrad": dict(lr=0.5, lr_decay=0.25, initial_accumulator_value=0.125, eps=1e-6),
    "SparseAdam": dict(lr=0.1, betas=(0.8, 0.95), eps=1e-2),
    "Adam": dict(lr=0.1, betas=(0.8, 0.95), eps=1e-2),
}
# Which gradients each optimizer takes: torch's Adam refuses sparse ones, SparseAdam dense ones.
SOURCES = {
    "SGD": ("dense", "stock", "fastembed"),
    "Adagrad": ("dense", "stock", "fastembed"),
    "SparseAdam": ("stock", "fastembed"),
    "Adam": ("dense",),
}
# The kernels round some steps differently from torch (documented): weights and state within these.
# Adam's eps is large enough that a gradient row summed to near zero from lookups (whose rounding
# depends on the order of the sum) cannot swing m / (sqrt(v) + eps) by more than that.
CLOSE = dict(rtol=2e-5, atol=2e-5)


def pair(name):
    """fastembed's optimizer class and torch's."""
    return getattr(fo, name), getattr(torch.optim, name)


def layer(source, V, D, w0):
    """An embedding layer with weight w0 that gives the gradients of source."""
    if source == "fastembed":
        return ft.Embedding(V, D, sparse=True, _weight=w0.clone())
    return torch.nn.Embedding(V, D, sparse=source == "stock", _weight=w0.clone())


def backward(model, ids, grad_out):
    model.zero_grad(set_to_none=True)
    model(ids).backward(grad_out)


def assert_states(ours, theirs, exact):
    """Same state entries, keys and types (a state_dict moves between them), values equal or close."""
    ps = [p for group in ours.param_groups for p in group["params"]]
    qs = [q for group in theirs.param_groups for q in group["params"]]
    assert len(ps) == len(qs)
    for p, q in zip(ps, qs):
        assert (p in ours.state) == (q in theirs.state)
        if p not in ours.state:
            continue
        a, b = ours.state[p], theirs.state[q]
        assert a.keys() == b.keys()
        for key in a:
            assert type(a[key]) is type(b[key]), key
            if isinstance(b[key], torch.Tensor):
                assert a[key].layout == b[key].layout, key
                if b[key].is_sparse:  # torch's momentum buffer of a sparse gradient
                    a, b = {key: a[key].to_dense()}, {key: b[key].to_dense()}
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
                if exact or key == "step":
                    assert torch.equal(a[key], b[key]), key
                else:
                    torch.testing.assert_close(a[key], b[key], **CLOSE)
            else:
                assert a[key] == b[key], key


@st.composite
def problems(draw):
    """(V, D, steps): per step ids (int32 or int64, duplicates, empty batches) and a gradient seed."""
    V = draw(st.integers(1, 9))
    D = draw(st.integers(0, 5))
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(0, 8))
        pool = draw(st.sampled_from([V, 1, min(2, V)]))
        ids = draw(st.lists(st.integers(0, pool - 1), min_size=n, max_size=n))
        dtype = draw(st.sampled_from([torch.int32, torch.int64]))
        shape = draw(st.sampled_from([(n,), (1, n)]))
        steps.append((torch.tensor(ids, dtype=dtype).reshape(shape), draw(st.integers(0, 2**31 - 1))))
    return V, D, steps


def grad_out(ids, D, seed):
    return torch.randn(tuple(ids.shape) + (D,), generator=torch.Generator().manual_seed(seed))


def run_both(name, source, problem, ours_class=None, theirs_class=None, **options):
    """The same steps through fastembed's and torch's optimizer on two layers starting equal."""
    V, D, steps = problem
    w0 = torch.randn(V, D, generator=torch.Generator().manual_seed(V * 31 + D))
    ours_class = ours_class or getattr(fo, name)
    theirs_class = theirs_class or getattr(torch.optim, name)
    a, b = layer(source, V, D, w0), layer(source, V, D, w0)
    oa, ob = ours_class(a.parameters(), **options), theirs_class(b.parameters(), **options)
    for ids, seed in steps:
        g = grad_out(ids, D, seed)
        for model, opt in ((a, oa), (b, ob)):
            backward(model, ids, g)
            opt.step()
    return w0, (a, oa), (b, ob)


# ---------------------------------------------------------------- against torch.optim

@pytest.mark.parametrize("name,source", [(n, s) for n in NAMES for s in SOURCES[n]])
@FEW
@given(problem=problems())
def test_matches_torch_optim(name, source, problem):
    w0, (a, oa), (b, ob) = run_both(name, source, problem, **OPTIONS[name])
    if name == "SGD":  # fma(-lr, g, w) per element, in torch's order: the same bits
        assert_bitwise(a.weight.detach().numpy(), b.weight.detach().numpy())
    else:
        torch.testing.assert_close(a.weight, b.weight, **CLOSE)
    assert_states(oa, ob, exact=name == "SGD")
    touched = {int(i) for ids, _ in problem[2] for i in ids.reshape(-1)}
    untouched = [r for r in range(problem[0]) if r not in touched]
    assert_bitwise(a.weight.detach().numpy()[untouched], w0.numpy()[untouched])


@pytest.mark.parametrize("name,source", [(n, s) for n in NAMES for s in SOURCES[n]])
def test_matches_torch_optim_on_the_threaded_path(name, source):
    """A few hundred rows, many duplicates, with the kernels' serial threshold at 0: two threads."""
    gen = torch.Generator().manual_seed(7)
    steps = [(torch.randint(0, 40, (3, 100), generator=gen), k) for k in range(3)]
    with serial_elements(0), num_threads(2):
        w0, (a, oa), (b, ob) = run_both(name, source, (300, 33, steps), **OPTIONS[name])
    if name == "SGD":
        assert_bitwise(a.weight.detach().numpy(), b.weight.detach().numpy())
    else:
        torch.testing.assert_close(a.weight, b.weight, **CLOSE)
    assert_states(oa, ob, exact=name == "SGD")
    assert torch.equal(a.weight[40:], w0[40:])


@pytest.mark.parametrize("name,source", [("SGD", "dense"), ("SGD", "stock"), ("Adagrad", "stock"), ("Adam", "dense")])
def test_foreach_true_is_on_the_kernels_and_still_torchs_result(name, source):
    """foreach picks torch's implementation, not the result; the kernels ignore it."""
    problem = (6, 3, [(torch.tensor([0, 5, 5, 2]), 1), (torch.tensor([3, 5]), 2), (torch.tensor([1]), 3)])
    _, (a, oa), (b, ob) = run_both(name, source, problem, foreach=True, **OPTIONS[name])
    if name == "SGD":
        assert torch.equal(a.weight, b.weight)
    else:
        torch.testing.assert_close(a.weight, b.weight, **CLOSE)
    assert_states(oa, ob, exact=name == "SGD")


def test_uncoalesced_duplicates_apply_in_order_for_sgd():
    """torch's SGD adds an uncoalesced gradient's entries one at a time in COO order; a sum of the
    duplicates first would round differently here (1 + 2^-24 + 2^-24: the sum moves, one at a time
    does not), so this tells the two apart."""
    w = torch.ones(2, 1)
    values = torch.tensor([[-2.0**-24], [-2.0**-24], [3.0]])
    indices = torch.tensor([[0, 0, 1]])
    results = []
    for cls in (fo.SGD, torch.optim.SGD):
        p = torch.nn.Parameter(w.clone())
        p.grad = torch.sparse_coo_tensor(indices, values, (2, 1))
        assert not p.grad.is_coalesced()
        cls([p], lr=1.0).step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])
    assert results[0][0, 0].item() == 1.0 and results[0][1, 0].item() == -2.0


@pytest.mark.parametrize("name", NAMES)
def test_empty_sparse_gradient_counts_a_step_and_moves_nothing(name):
    """torch counts a step for a parameter with an empty gradient (it matters for later bias
    corrections and lr decay) and moves nothing; Adam takes only dense gradients, so a zero one."""
    results = []
    for cls in pair(name):
        p = torch.nn.Parameter(torch.arange(6.0).reshape(3, 2))
        opt = cls([p], **OPTIONS[name])
        for grad in (torch.zeros(0, 2), torch.ones(1, 2)):
            if name == "Adam":
                p.grad = torch.zeros(3, 2)
                p.grad[:len(grad)] = grad
            else:
                p.grad = torch.sparse_coo_tensor(torch.arange(len(grad))[None], grad, (3, 2))
            opt.step()
        results.append((p.detach().clone(), opt))
    (pa, oa), (pb, ob) = results
    torch.testing.assert_close(pa, pb, **CLOSE)
    assert_states(oa, ob, exact=name == "SGD")


@pytest.mark.parametrize("name,source,kernels", [
    ("SGD", "dense", {"sgd_step"}), ("SGD", "stock", {"sgd_scatter"}), ("SGD", "fastembed", {"sgd_scatter"}),
    ("Adagrad", "dense", {"adagrad_step"}), ("Adagrad", "stock", {"adagrad_scatter"}),
    ("Adagrad", "fastembed", {"adagrad_scatter"}), ("SparseAdam", "stock", {"adam_scatter"}),
    ("SparseAdam", "fastembed", {"adam_scatter"}), ("Adam", "dense", {"adam_step"}),
])
def test_float32_tables_run_on_the_kernels(name, source, kernels, monkeypatch):
    """The float32 tables above are the kernels' (no silent hand-over to torch), each update checked
    first. fastembed.torch.Embedding gives torch's uncoalesced layout, which the *_scatter kernels coalesce
    and apply in one pass (an already coalesced gradient is not coalesced again: see the next test)."""
    calls = []
    for kernel in ("sgd_step", "sgd_scatter", "adagrad_step", "adam_step", "coalesce", "rowwise_adagrad_step",
                   "adagrad_scatter", "adam_scatter", "rowwise_adagrad_scatter"):
        def spy(*args, _kernel=getattr(fo._kernels, kernel), _name=kernel, **kwargs):
            calls.append((_name, kwargs.get("check_only", args[-1] if args and args[-1] is True else False)))
            return _kernel(*args, **kwargs)
        monkeypatch.setattr(fo._kernels, kernel, spy)
    model = layer(source, 5, 2, torch.zeros(5, 2))
    opt = getattr(fo, name)(model.parameters(), **OPTIONS[name])
    for ids in (torch.tensor([1, 3, 1]), torch.tensor([0, 4])):
        backward(model, ids, torch.ones(len(ids), 2))
        del calls[:]  # the layer's own backward may coalesce
        opt.step()
        assert {k for k, _ in calls} == kernels
        update = [c for c in calls if c[0] != "coalesce"]
        assert update == [(update[-1][0], True), (update[-1][0], False)]


@pytest.mark.parametrize("name,kernel", [("Adagrad", "adagrad_step"), ("SparseAdam", "adam_step")])
def test_a_coalesced_sparse_gradient_is_not_coalesced_again(name, kernel, monkeypatch):
    calls = []
    for k in (kernel, "coalesce", kernel.replace("_step", "_scatter")):
        def spy(*args, _kernel=getattr(fo._kernels, k), _name=k, **kwargs):
            calls.append(_name)
            return _kernel(*args, **kwargs)
        monkeypatch.setattr(fo._kernels, k, spy)
    p = torch.nn.Parameter(torch.zeros(5, 2))
    p.grad = torch.sparse_coo_tensor(torch.tensor([[3, 1, 3]]), torch.ones(3, 2), (5, 2)).coalesce()
    getattr(fo, name)([p], **OPTIONS[name]).step()
    assert calls == [kernel, kernel]  # checked, then run; no coalesce
    assert p[1].ne(0).all() and p[3].ne(0).all() and not p[[0, 2, 4]].any()


# ---------------------------------------------------------------- state_dict, schedules, hooks

@pytest.mark.parametrize("name,source", [(n, SOURCES[n][-1]) for n in NAMES])
@pytest.mark.parametrize("first", ["fastembed", "torch"])
def test_state_dict_moves_between_fastembed_and_torch(name, source, first):
    """Three steps by one optimizer, its state_dict loaded into the other kind, three more: the same
    as six by torch alone (so keys, types and step counts were carried over)."""
    V, D = 7, 3
    problem = (V, D, [(torch.tensor([i % V, (3 * i) % V, i % V]), i) for i in range(6)])
    w0 = torch.randn(V, D, generator=torch.Generator().manual_seed(1))
    ours, theirs = pair(name)
    classes = (ours, theirs) if first == "fastembed" else (theirs, ours)
    a, b = layer(source, V, D, w0), layer(source, V, D, w0)
    opt = classes[0](a.parameters(), **OPTIONS[name])
    reference = theirs(b.parameters(), **OPTIONS[name])
    for k, (ids, seed) in enumerate(problem[2]):
        if k == 3:
            saved = copy.deepcopy(opt.state_dict())
            opt = classes[1](a.parameters(), **OPTIONS[name])
            opt.load_state_dict(saved)
        g = grad_out(ids, D, seed)
        for model, o in ((a, opt), (b, reference)):
            backward(model, ids, g)
            o.step()
    if name == "SGD":
        assert torch.equal(a.weight, b.weight)
    else:
        torch.testing.assert_close(a.weight, b.weight, **CLOSE)
    assert_states(opt, reference, exact=name == "SGD")


@pytest.mark.parametrize("name,scheduler", [
    ("SGD", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)),
    ("Adagrad", lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (k + 1))),
    ("SparseAdam", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.7)),
    ("Adam", lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 0.9**k)),
])
def test_lr_schedulers_drive_both_alike(name, scheduler):
    source = SOURCES[name][-1]
    V, D = 6, 4
    w0 = torch.randn(V, D, generator=torch.Generator().manual_seed(2))
    a, b = layer(source, V, D, w0), layer(source, V, D, w0)
    ours, theirs = pair(name)
    oa, ob = ours(a.parameters(), **OPTIONS[name]), theirs(b.parameters(), **OPTIONS[name])
    sa, sb = scheduler(oa), scheduler(ob)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for k in range(5):
            ids = torch.tensor([k % V, 1, 1])
            g = grad_out(ids, D, k)
            for model, o, s in ((a, oa, sa), (b, ob, sb)):
                backward(model, ids, g)
                o.step()
                s.step()
            assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"]
    if name == "SGD":
        assert torch.equal(a.weight, b.weight)
    else:
        torch.testing.assert_close(a.weight, b.weight, **CLOSE)
    assert sa.state_dict() == sb.state_dict()


@pytest.mark.parametrize("with_torch_params", [False, True])
def test_step_hooks_run_once_per_step(with_torch_params):
    """torch wraps a class's step with the step hooks; ours must not run them again through torch's step."""
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))])  # torch's SGD.step is wrapped from now on
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    if with_torch_params:
        params.append(torch.nn.Parameter(torch.zeros(3)))  # 1-D: torch's own step (hooked) moves it
    opt = fo.SGD(params, lr=1.0)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    for p in params:
        p.grad = torch.ones_like(p)
    assert opt.step(lambda: 42.0) == 42.0
    assert calls == ["pre", "post"]
    assert all(bool((p == -1).all()) for p in params)


# ---------------------------------------------------------------- what goes to torch

FALLBACKS = [
    ("SGD", "dense", dict(lr=0.1, momentum=0.9)),
    ("SGD", "stock", dict(lr=0.1, momentum=0.5, dampening=0.25)),
    ("SGD", "dense", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("SGD", "dense", dict(lr=0.1, weight_decay=0.01)),
    ("SGD", "stock", dict(lr=0.1, maximize=True)),
    ("SGD", "dense", dict(lr=0.1, fused=True)),
    ("Adagrad", "dense", dict(lr=0.1, weight_decay=0.1)),
    ("Adagrad", "stock", dict(lr=0.1, maximize=True)),
    ("Adam", "dense", dict(lr=0.1, amsgrad=True)),
    ("Adam", "dense", dict(lr=0.1, weight_decay=0.1)),
    ("Adam", "dense", dict(lr=0.1, weight_decay=0.1, decoupled_weight_decay=True)),
    ("Adam", "dense", dict(lr=0.1, maximize=True)),
    ("Adam", "dense", dict(lr=0.1, fused=True)),
    ("SparseAdam", "stock", dict(lr=0.1, maximize=True)),
]


@pytest.mark.parametrize("name,source,options", FALLBACKS, ids=lambda x: str(x))
def test_options_the_kernels_do_not_compute_are_torchs_own(name, source, options):
    problem = (5, 3, [(torch.tensor([0, 2, 2, 4]), 1), (torch.tensor([1, 2]), 2), (torch.tensor([4]), 3)])
    _, (a, oa), (b, ob) = run_both(name, source, problem, **options)
    assert torch.equal(a.weight, b.weight)
    assert_states(oa, ob, exact=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["3-D", "strided", "1-D"])
def test_parameters_the_kernels_cannot_take_are_torchs_own(name, kind):
    """A 3-D, non-contiguous or 1-D parameter beside a float32 table in one group: the table by the
    kernel (to rounding, SGD bitwise), the other exactly as torch moves it, in the same step. (float64,
    float16 and bfloat16 tables are the kernels': tests/test_torch_optim_dtypes.py.)"""
    results = []
    for cls in pair(name):
        gen = torch.Generator().manual_seed(5)
        table = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
        other = {"3-D": lambda: torch.randn(2, 2, 3, generator=gen),
                 "strided": lambda: torch.randn(3, 4, generator=gen).t(),
                 "1-D": lambda: torch.randn(5, generator=gen)}[kind]()
        other = torch.nn.Parameter(other)
        opt = cls([table, other], **OPTIONS[name])
        for k in range(3):
            gen_g = torch.Generator().manual_seed(k)
            for p in (table, other):
                g = torch.randn(p.shape, generator=gen_g, dtype=p.dtype)
                g[k % p.shape[0]] = 0
                p.grad = g.to_sparse(1) if name == "SparseAdam" else g
            opt.step()
        results.append((table.detach().clone(), other.detach().clone(), opt))
    (ta, oa_, optA), (tb, ob_, optB) = results
    assert torch.equal(oa_, ob_)
    if name == "SGD":
        assert torch.equal(ta, tb)
    else:
        torch.testing.assert_close(ta, tb, **CLOSE)
    assert_states(optA, optB, exact=name == "SGD")


def test_groups_mix_kernel_and_torch_updates():
    """One group the kernel takes and one with momentum (torch's), in one step, as torch gives both."""
    results = []
    for cls in pair("SGD"):
        gen = torch.Generator().manual_seed(3)
        p, q = (torch.nn.Parameter(torch.randn(5, 2, generator=gen)) for _ in range(2))
        opt = cls([{"params": [p]}, {"params": [q], "momentum": 0.9}], lr=0.3)
        for k in range(3):
            p.grad = torch.sparse_coo_tensor(torch.tensor([[k, 4, k]]), torch.randn(3, 2, generator=gen), (5, 2))
            q.grad = torch.randn(5, 2, generator=gen)
            opt.step()
        results.append((p.detach().clone(), q.detach().clone(), opt.state_dict()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][2]["state"][1]["momentum_buffer"], results[1][2]["state"][1]["momentum_buffer"])


# ---------------------------------------------------------------- bad input: nothing moves

def snapshot(opt, params):
    """Every weight, every state value (tensors copied, step counts as numbers)."""
    state = {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
             for i, p in enumerate(params) if p in opt.state}
    return [p.detach().clone() for p in params], state


def assert_same(before, after):
    (wa, sa), (wb, sb) = before, after
    assert all(torch.equal(x, y) for x, y in zip(wa, wb))
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            x, y = sa[i][k], sb[i][k]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def three_params():
    """A float64 parameter (torch's), a float32 table (the kernel's), and the table the bad gradient
    will reach, in that order, each with a gradient."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(4, 3, generator=gen)),
              torch.nn.Parameter(torch.randn(4, 3, generator=gen))]
    return params


def give_grads(params, sparse, last=None):
    for p in params[:2]:
        g = torch.ones_like(p)
        p.grad = g.to_sparse(1) if sparse else g
    params[2].grad = last if last is not None else (torch.ones(4, 3).to_sparse(1) if sparse else torch.ones(4, 3))


ALL = NAMES + ("RowWiseAdagrad",)


def make(name, params):
    options = OPTIONS.get(name, dict(lr=0.1))
    return getattr(fo, name)(params, **options)


@pytest.mark.parametrize("name", [n for n in ALL if n != "Adam"])
@pytest.mark.parametrize("row", [4, -1, 1 << 40])
def test_sparse_rows_outside_the_table_move_nothing(name, row):
    """A sparse gradient whose rows fall outside its table (one for another table: torch's own
    optimizers write out of bounds) raises, after a good step, with weights, state and step counts
    as they were, the torch-updated parameter included."""
    params = three_params()
    opt = make(name, params)
    give_grads(params, sparse=True)
    opt.step()
    bad = torch.sparse_coo_tensor(torch.tensor([[0, row]]), torch.ones(2, 3), (4, 3), check_invariants=False)
    give_grads(params, sparse=True, last=bad)
    before = snapshot(opt, params)
    with pytest.raises((ValueError, IndexError)):
        opt.step()
    assert_same(before, snapshot(opt, params))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("lr", [-0.1, float("nan")])
def test_a_negative_lr_set_later_moves_nothing(name, lr):
    params = three_params()
    opt = make(name, params)
    give_grads(params, sparse=name == "SparseAdam")
    opt.step()
    opt.param_groups[0]["lr"] = lr
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert_same(before, snapshot(opt, params))


@pytest.mark.parametrize("name,sparse,match", [
    ("Adam", True, "Adam does not support sparse gradients"),
    ("SparseAdam", False, "SparseAdam does not support dense gradients"),
])
def test_torchs_own_errors_come_before_anything_moves(name, sparse, match):
    params = three_params()
    opt = make(name, params)
    give_grads(params, sparse=not sparse)
    opt.step()
    last = torch.ones(4, 3).to_sparse(1) if sparse else torch.ones(4, 3)
    give_grads(params, sparse=not sparse, last=last)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert_same(before, snapshot(opt, params))
    with pytest.raises(RuntimeError, match=match):  # torch's own message, checked against torch
        getattr(torch.optim, name)(params, **OPTIONS[name]).step()


def test_adagrad_weight_decay_with_a_sparse_gradient_moves_nothing():
    params = three_params()
    opt = fo.Adagrad(params, lr=0.1, weight_decay=0.1)
    give_grads(params, sparse=False)
    opt.step()
    give_grads(params, sparse=False, last=torch.ones(4, 3).to_sparse(1))
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible with sparse gradients"):
        opt.step()
    assert_same(before, snapshot(opt, params))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("which", [0, 2])
def test_a_gradient_of_another_shape_moves_nothing(name, which):
    """torch refuses ``p.grad = g`` of another shape, not ``p.grad.data = g``; a dense (4, 1) one
    would broadcast in torch's own update of the float64 parameter."""
    params = three_params()
    opt = make(name, params)
    sparse = name == "SparseAdam"
    give_grads(params, sparse=sparse)
    opt.step()
    give_grads(params, sparse=sparse)
    bad = torch.ones(4, 1, dtype=params[which].dtype) if which == 0 else torch.ones(5, 3)
    params[which].grad.data = bad.to_sparse(1) if sparse else bad
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="shape"):
        opt.step()
    assert_same(before, snapshot(opt, params))


# ---------------------------------------------------------------- RowWiseAdagrad

def rowwise_oracle(w, s, ids, g, lr, eps, sparse):
    """Row-wise Adagrad in float32 numpy, in place: duplicates summed in ids order; the mean square
    summed over columns in order, then divided by D; ``w -= (lr * g) / (sqrt(s) + eps)``."""
    D = w.shape[1]
    if D == 0:  # no mean square of no columns: nothing changes
        return
    if sparse:
        rows, values = coalesce_oracle(ids, g)
    else:
        rows, values = np.arange(w.shape[0]), np.zeros_like(w)
        np.add.at(values, np.asarray(ids).reshape(-1), g.reshape(-1, D))
    acc = np.zeros(len(rows), np.float32)
    for d in range(D):
        acc = acc + values[:, d] * values[:, d]
    s[rows] = s[rows] + acc / np.float32(D)
    w[rows] = w[rows] - (f32(lr) * values) / (np.sqrt(s[rows]) + f32(eps))[:, None]


@pytest.mark.parametrize("source", ["dense", "stock", "fastembed"])
@FEW
@given(problem=problems(), lr=st.sampled_from([0.01, 0.5, 3.0]), eps=st.sampled_from([1e-10, 1e-3]))
def test_rowwise_adagrad_matches_the_transcription(source, problem, lr, eps):
    V, D, steps = problem
    w0 = torch.randn(V, D, generator=torch.Generator().manual_seed(V + D))
    model = layer(source, V, D, w0)
    opt = fo.RowWiseAdagrad(model.parameters(), lr=lr, eps=eps)
    w, s = w0.numpy().copy(), np.zeros(V, np.float32)
    for ids, seed in steps:
        g = grad_out(ids, D, seed)
        backward(model, ids, g)
        opt.step()
        rowwise_oracle(w, s, ids.numpy(), g.numpy(), lr, eps, sparse=source != "dense")
        assert_bitwise(model.weight.detach().numpy(), w)
        assert_bitwise(opt.state[model.weight]["sum"].numpy(), s)


@pytest.mark.parametrize("sparse", [False, True])
def test_rowwise_adagrad_in_torch_ops_for_a_strided_float64_table(sparse):
    """A table the kernel cannot take (strided) takes the torch-ops path: the same formula, checked in float64
    numpy. (A contiguous float64 table is the kernel's: tests/test_torch_optim_dtypes.py.)"""
    V, D = 6, 3
    gen = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(D, V, generator=gen, dtype=torch.float64).t())
    assert not p.is_contiguous()
    w, s = p.detach().numpy().copy(), np.zeros(V)
    opt = fo.RowWiseAdagrad([p], lr=0.3, eps=1e-6)
    for k in range(3):
        ids = torch.tensor([k, 5, k, 2])
        g = torch.randn(4, D, generator=gen, dtype=torch.float64)
        dense = torch.zeros(V, D, dtype=torch.float64).index_add_(0, ids, g)
        p.grad = torch.sparse_coo_tensor(ids[None], g, (V, D)) if sparse else dense
        opt.step()
        rows = np.unique(ids.numpy()) if sparse else np.arange(V)
        gr = dense.numpy()[rows]
        s[rows] += (gr * gr).mean(axis=1)
        w[rows] -= 0.3 * gr / (np.sqrt(s[rows]) + 1e-6)[:, None]
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-13, atol=0)
        np.testing.assert_allclose(opt.state[p]["sum"].numpy(), s, rtol=1e-13, atol=0)
    assert opt.state[p]["sum"].dtype == torch.float64


def test_rowwise_adagrad_state_dict_round_trip():
    V, D = 5, 2
    gen = torch.Generator().manual_seed(6)
    p, q = (torch.nn.Parameter(torch.randn(V, D, generator=gen)) for _ in range(2))
    with torch.no_grad():
        q.copy_(p)
    one, two = fo.RowWiseAdagrad([p], lr=0.2), fo.RowWiseAdagrad([q], lr=0.2)
    for k in range(4):
        g = torch.randn(V, D, generator=gen)
        if k == 2:
            two = fo.RowWiseAdagrad([q], lr=0.9)
            two.load_state_dict(copy.deepcopy(one.state_dict()))
        p.grad, q.grad = g.clone(), g.clone()
        one.step()
        two.step()
    assert torch.equal(p, q)
    assert torch.equal(one.state[p]["sum"], two.state[q]["sum"])


def test_rowwise_adagrad_constructor_refuses():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="learning rate"):
        fo.RowWiseAdagrad([p], lr=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        fo.RowWiseAdagrad([p], eps=-1.0)
    with pytest.raises(ValueError, match="2-D"):
        fo.RowWiseAdagrad([torch.nn.Parameter(torch.zeros(3))])
    opt = fo.RowWiseAdagrad(iter([p]))
    assert (opt.defaults["lr"], opt.defaults["eps"]) == (0.01, 1e-10)
    with pytest.raises(ValueError, match="2-D"):
        opt.add_param_group({"params": torch.nn.Parameter(torch.zeros(2, 2, 2)), "lr": 0.5})
    opt.add_param_group({"params": (q for q in [torch.nn.Parameter(torch.zeros(4, 1))]), "lr": 0.5})
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.5]


def test_constructors_are_torchs():
    """Same defaults and the same refusals as torch's classes."""
    p = torch.nn.Parameter(torch.zeros(3, 2))
    for name in NAMES:
        ours, theirs = pair(name)
        assert ours([p]).defaults == theirs([p]).defaults
        assert issubclass(ours, theirs)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fo.SGD([p], lr=-0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fo.SparseAdam([p], lr=0.0)
