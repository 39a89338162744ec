"""fastembed.torch.EmbeddingBag and embedding_bag against torch's own nn.EmbeddingBag / F.embedding_bag.

The oracle is torch: each case runs twice on copies of the same weight, once through torch and once
through fastembed, and compares outputs, the weight's gradient (dense values; sparse indices and values
in torch's uncoalesced layout), per_sample_weights' gradient, max_norm's effect on the weight, and the
exception types of bad calls (with nothing changed).
"""
import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _helpers import FEW, serial_elements

torch = pytest.importorskip("torch")
F = torch.nn.functional
ft = pytest.importorskip("fastembed.torch")
fbag = pytest.importorskip("fastembed.torch._bag")

# torch sums a bag in its own order (FBGEMM's kernels on CPU): float32 rounding apart.
CLOSE = dict(rtol=1e-5, atol=1e-6)


@st.composite
def bag_calls(draw, modes=("sum", "mean", "max")):
    """A random F.embedding_bag call: weight, ids (1-D with offsets, or 2-D), and its options."""
    rows = draw(st.integers(1, 12))
    dim = draw(st.integers(1, 9))
    mode = draw(st.sampled_from(modes))
    id_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    two_d = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if two_d:
        shape = (draw(st.integers(1, 5)), draw(st.integers(1, 6)))
        ids = torch.randint(0, rows, shape, generator=g)
        offsets, include_last = None, False
    else:
        n = draw(st.integers(0, 16))
        ids = torch.randint(0, rows, (n,), generator=g)
        cuts = sorted(draw(st.lists(st.integers(0, n), min_size=1, max_size=6)))
        cuts[0] = 0  # empty bags come from repeated cuts
        include_last = draw(st.booleans())
        if include_last:
            # torch's contract: the last offset is len(ids). (Past it, torch's CPU kernels disagree with
            # themselves: sum leaves the ids out, mean counts them, max takes them; fastembed leaves them
            # out everywhere, which tests/test_bag.py checks against its own oracles.)
            cuts.append(n)
        offsets = torch.tensor(cuts).to(id_dtype)
    ids = ids.to(id_dtype)
    padding_idx = draw(st.one_of(st.none(), st.integers(-rows, rows - 1)))
    psw = None
    if mode == "sum" and draw(st.booleans()):
        psw = torch.randn(ids.shape, generator=g)
    weight = torch.randn(rows, dim, generator=g)
    return dict(weight=weight, ids=ids, offsets=offsets, mode=mode, psw=psw, include_last_offset=include_last,
                padding_idx=padding_idx, seed=seed)


def _run(fn, call, sparse=False, max_norm=None):
    """One call through fn (F.embedding_bag or fastembed's), then a backward of a fixed random gradient:
    (output, weight after, weight grad, psw grad)."""
    weight = call["weight"].clone().requires_grad_()
    psw = None if call["psw"] is None else call["psw"].clone().requires_grad_()
    out = fn(call["ids"], weight, call["offsets"], max_norm=max_norm, mode=call["mode"], sparse=sparse,
             per_sample_weights=psw, include_last_offset=call["include_last_offset"],
             padding_idx=call["padding_idx"])
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(call["seed"] + 1))
    out.backward(upstream)
    return out.detach(), weight.detach(), weight.grad, None if psw is None else psw.grad


def _assert_same_grad(ours, theirs):
    assert (ours is None) == (theirs is None)
    if ours is None:
        return
    assert ours.layout == theirs.layout
    if ours.is_sparse:
        assert not ours.is_coalesced() or theirs.is_coalesced()
        assert torch.equal(ours._indices(), theirs._indices())  # the same entries, in the same order
        ours, theirs = ours._values(), theirs._values()
    torch.testing.assert_close(ours, theirs, **CLOSE)


@FEW
@given(call=bag_calls())
def test_embedding_bag_is_torchs(call):
    ours = _run(ft.functional.embedding_bag, call)
    theirs = _run(F.embedding_bag, call)
    torch.testing.assert_close(ours[0], theirs[0], **CLOSE)
    if call["mode"] == "max":
        assert torch.equal(ours[0], theirs[0])  # a max picks, it does not round
    for a, b in zip(ours[2:], theirs[2:]):
        _assert_same_grad(a, b)


@FEW
@given(call=bag_calls(modes=("sum", "mean")))
def test_sparse_gradient_has_torchs_layout(call):
    ours = _run(ft.functional.embedding_bag, call, sparse=True)
    theirs = _run(F.embedding_bag, call, sparse=True)
    torch.testing.assert_close(ours[0], theirs[0], **CLOSE)
    for a, b in zip(ours[2:], theirs[2:]):
        _assert_same_grad(a, b)


@FEW
@given(call=bag_calls(), max_norm=st.sampled_from([0.5, 1.0, 2.5]), norm_type=st.sampled_from([1.0, 2.0, 3.5]))
def test_max_norm_renormalises_the_rows_as_torch(call, max_norm, norm_type):
    def run(fn):
        return _run(lambda *a, **k: fn(*a, norm_type=norm_type, **k), call, max_norm=max_norm)
    ours, theirs = run(ft.functional.embedding_bag), run(F.embedding_bag)
    torch.testing.assert_close(ours[1], theirs[1], **CLOSE)  # the weight, renormalised in place
    torch.testing.assert_close(ours[0], theirs[0], **CLOSE)
    assert not torch.equal(ours[1], call["weight"]) or torch.equal(theirs[1], call["weight"])


def test_a_sum_of_one_row_is_that_row_bitwise():
    w = torch.randn(7, 5)
    ids, offsets = torch.tensor([3, 1, 3]), torch.tensor([0, 1, 2])
    assert torch.equal(ft.functional.embedding_bag(ids, w, offsets, mode="sum"), w[ids])
    assert torch.equal(ft.functional.embedding_bag(ids, w, offsets, mode="max"), w[ids])


def test_module_is_torchs_class_but_forward():
    torch.manual_seed(3)
    ours = ft.EmbeddingBag(10, 4, mode="max", padding_idx=-2)
    torch.manual_seed(3)
    theirs = torch.nn.EmbeddingBag(10, 4, mode="max", padding_idx=-2)
    assert isinstance(ours, torch.nn.EmbeddingBag)
    assert torch.equal(ours.weight, theirs.weight) and ours.padding_idx == theirs.padding_idx == 8
    assert repr(ours).replace("EmbeddingBag", "X") == repr(theirs).replace("EmbeddingBag", "X")
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    ids = torch.tensor([[1, 8, 3], [8, 8, 8]])  # the second bag is padding only: zeros
    out = ours(ids)
    assert torch.equal(out, theirs(ids)) and torch.equal(out[1], torch.zeros(4))
    pre = ft.EmbeddingBag.from_pretrained(theirs.weight.detach(), mode="sum", freeze=False)
    assert type(pre) is ft.EmbeddingBag and pre.weight.requires_grad and pre.mode == "sum"


def test_calls_off_the_kernels_give_torchs_result():
    """torch's results where fastembed's bag kernels are not (scale_grad_by_freq) and for float64, which the
    kernels run: values and gradients identical."""
    ids, offsets = torch.tensor([1, 2, 1, 4, 4, 0]), torch.tensor([0, 2, 2, 5])
    for dtype, scale in [(torch.float64, False), (torch.float32, True), (torch.float64, True)]:
        results = []
        for fn in (ft.functional.embedding_bag, F.embedding_bag):
            w = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
            out = fn(ids, w, offsets, mode="sum", scale_grad_by_freq=scale)
            out.sum().backward()
            results.append((out, w.grad))
        for a, b in zip(*results):
            assert torch.equal(a, b)


BAD_CALLS = [
    ("offsets not starting at 0", dict(ids=[1, 2, 3], offsets=[1, 2])),
    ("offsets decreasing", dict(ids=[1, 2, 3], offsets=[0, 2, 1])),
    ("offsets past the ids", dict(ids=[1, 2, 3], offsets=[0, 4])),
    ("last offset past the ids", dict(ids=[1, 2, 3], offsets=[0, 1, 4], include_last_offset=True)),
    ("negative offset", dict(ids=[1, 2, 3], offsets=[0, -1])),
    ("id == rows", dict(ids=[1, 6, 3], offsets=[0, 1])),
    ("id == -1", dict(ids=[1, -1, 3], offsets=[0, 1])),
    ("psw with mean", dict(ids=[1, 2, 3], offsets=[0, 1], psw=[1.0, 2.0, 3.0], mode="mean")),
    ("psw of another shape", dict(ids=[1, 2, 3], offsets=[0, 1], psw=[1.0, 2.0], mode="sum")),
    ("2-D ids with offsets", dict(ids=[[1, 2], [3, 4]], offsets=[0, 1])),
    ("1-D ids without offsets", dict(ids=[1, 2], offsets=None)),
    ("3-D ids", dict(ids=[[[1]]], offsets=None)),
    ("bad mode", dict(ids=[1, 2], offsets=[0], mode="median")),
    ("max with sparse", dict(ids=[1, 2], offsets=[0], mode="max", sparse=True)),
    ("padding_idx == rows", dict(ids=[1, 2], offsets=[0], padding_idx=6)),
]


@pytest.mark.parametrize("name,bad", BAD_CALLS, ids=[n for n, _ in BAD_CALLS])
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_bad_calls_raise_torchs_exception_and_change_nothing(name, bad, max_norm):
    def call(fn, weight):
        psw = None if "psw" not in bad else torch.tensor(bad["psw"])
        offsets = None if bad["offsets"] is None else torch.tensor(bad["offsets"])
        return fn(torch.tensor(bad["ids"]), weight, offsets, max_norm=max_norm, mode=bad.get("mode", "mean"),
                  sparse=bad.get("sparse", False), per_sample_weights=psw,
                  include_last_offset=bad.get("include_last_offset", False), padding_idx=bad.get("padding_idx"))
    weight = torch.randn(6, 3) * 10  # every row above max_norm
    with pytest.raises(Exception) as theirs:
        call(F.embedding_bag, weight.clone())
    kept = weight.clone()
    with pytest.raises(type(theirs.value)):
        call(ft.functional.embedding_bag, kept)
    assert torch.equal(kept, weight)  # nothing renormalised, even where torch would have


def test_ids_changed_in_place_before_backward_are_refused():
    w = torch.randn(5, 3, requires_grad=True)
    ids, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 1])
    out = ft.functional.embedding_bag(ids, w, offsets)
    ids[0] = 4
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_threaded_path_gives_the_same_bits():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(50, 40, generator=g, requires_grad=True)
    ids = torch.randint(0, 50, (300,), generator=g)
    offsets = torch.tensor([0, 0, 7, 100, 100, 299])
    psw = torch.randn(300, generator=g, requires_grad=True)
    results = []
    for context in (contextlib.nullcontext, lambda: serial_elements(0)):  # one thread; the threaded loops
        w.grad = psw.grad = None
        with context():
            out = ft.functional.embedding_bag(ids, w, offsets, mode="sum", per_sample_weights=psw)
            out.backward(torch.ones_like(out))
        results.append((out.detach().clone(), w.grad.clone(), psw.grad.clone()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a.numpy().view(np.uint32), b.numpy().view(np.uint32))


FUSED_PAIRS = [("FusedSGD", "SGD", dict(lr=0.5)), ("FusedAdagrad", "Adagrad", dict(lr=0.5)),
               ("FusedSparseAdam", "SparseAdam", dict(lr=0.1)), ("FusedRowWiseAdagrad", "RowWiseAdagrad", dict(lr=0.5))]


@pytest.mark.parametrize("fused_name,optim_name,hyper", FUSED_PAIRS, ids=[p[0] for p in FUSED_PAIRS])
@pytest.mark.parametrize("mode,psw", [("sum", False), ("sum", True), ("mean", False)])
def test_fused_bag_is_the_sparse_bag_and_its_optimizer(fused_name, optim_name, hyper, mode, psw):
    """Fused: backward moves the looked-up rows as sparse=True + the matching fastembed.torch.optim
    optimizer does (bitwise: the same gradient rows, the same kernel), and as torch's own optimizer
    on torch's nn.EmbeddingBag does (to float32 rounding; torch's for SGD, Adagrad, SparseAdam)."""
    fo = pytest.importorskip("fastembed.torch.optim")
    g = torch.Generator().manual_seed(11)
    w0 = torch.randn(12, 5, generator=g)
    batches = [(torch.randint(0, 12, (9,), generator=g), torch.tensor([0, 3, 3, 7]), torch.randn(9, generator=g))
               for _ in range(3)]  # repeated ids across and within bags; an empty bag
    fused = ft.EmbeddingBag.from_pretrained(w0.clone(), freeze=False, mode=mode, padding_idx=4,
                                            fused=getattr(fo, fused_name)(**hyper))
    plain = ft.EmbeddingBag.from_pretrained(w0.clone(), freeze=False, mode=mode, padding_idx=4, sparse=True)
    opt = getattr(fo, optim_name)(plain.parameters(), **hyper)
    stock = torch.nn.EmbeddingBag.from_pretrained(w0.clone(), freeze=False, mode=mode, padding_idx=4, sparse=True)
    stock_opt = getattr(torch.optim, optim_name)(stock.parameters(), **hyper) if optim_name != "RowWiseAdagrad" else None
    for ids, offsets, weights in batches:
        up = torch.randn(4, 5, generator=g)
        psw_grads = []
        for module, optimizer in ((fused, None), (plain, opt), (stock, stock_opt)):
            if module is stock and optimizer is None:
                continue
            w = weights.clone().requires_grad_() if psw else None
            if optimizer is not None:
                optimizer.zero_grad()
            module(ids, offsets, w).backward(up)
            if optimizer is not None:
                optimizer.step()
            psw_grads.append(None if w is None else w.grad)
        assert fused.weight.grad is None
        if psw:  # the weights' gradient reads the rows before the fused update moves them
            assert torch.equal(psw_grads[0], psw_grads[1])
    assert torch.equal(fused.weight, plain.weight)
    assert not torch.equal(fused.weight, w0)
    if stock_opt is not None:
        torch.testing.assert_close(fused.weight, stock.weight, rtol=2e-5, atol=2e-5)
    state = fused.state_dict()
    assert all(k == "weight" or k.startswith("optim_") for k in state)
    assert (set(state) == {"weight"}) == (fused_name == "FusedSGD")  # SGD keeps no state


def test_fused_bag_refuses_what_it_cannot_update():
    fo = pytest.importorskip("fastembed.torch.optim")
    with pytest.raises(NotImplementedError, match="max"):
        ft.EmbeddingBag(5, 3, mode="max", fused=fo.FusedSGD(lr=0.1))
    with pytest.raises(ValueError):
        ft.EmbeddingBag(5, 3, sparse=True, fused=fo.FusedSGD(lr=0.1))
    with pytest.raises(TypeError, match="float32"):
        ft.EmbeddingBag(5, 3, dtype=torch.float64, fused=fo.FusedSGD(lr=0.1))
    assert "fused=" in repr(ft.EmbeddingBag(5, 3, fused=fo.FusedSGD(lr=0.1)))


def test_max_norm_moves_the_weights_version_as_torch():
    """The renorm is an in-place change: a graph that saved the weight before it refuses to backward."""
    for fn in (F.embedding_bag, ft.functional.embedding_bag):
        w = (torch.randn(5, 3, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
        y = (w * w).sum()
        out = fn(torch.tensor([1, 2, 3, 4]), w, torch.tensor([0, 2]), max_norm=1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (y + out.sum()).backward()


@pytest.mark.parametrize("max_norm,norm_type", [(-1.0, 2.0), (1.0, float("nan"))])
def test_max_norm_values_the_kernel_refuses_are_torchs(max_norm, norm_type):
    results = []
    for fn in (F.embedding_bag, ft.functional.embedding_bag):
        w = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)) * 3
        results.append((fn(torch.tensor([1, 2, 3]), w, torch.tensor([0, 1]), max_norm=max_norm, norm_type=norm_type), w))
    for a, b in zip(*results):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_create_graph_gives_first_order_gradients():
    fo = pytest.importorskip("fastembed.torch.optim")
    ids, offsets = torch.tensor([1, 2, 1]), torch.tensor([0, 2])
    for module in (ft.EmbeddingBag(5, 3, mode="sum"), ft.EmbeddingBag(5, 3, mode="sum", fused=fo.FusedSGD(lr=0.5))):
        torch.manual_seed(0)
        ref = torch.nn.EmbeddingBag(5, 3, mode="sum")
        ref.load_state_dict({"weight": module.weight.detach().clone()})
        s = torch.randn(2, 3, requires_grad=True)
        (module(ids, offsets) * s).sum().backward(create_graph=True)
        (ref(ids, offsets) * s).sum().backward(create_graph=True)
        if module.fused is None:
            assert torch.equal(module.weight.grad, ref.weight.grad)
        else:
            torch.testing.assert_close(module.weight.detach(), (ref.weight - 0.5 * ref.weight.grad).detach())


def test_a_torch_function_mode_keeps_the_fused_rule():
    fo = pytest.importorskip("fastembed.torch.optim")
    m = ft.EmbeddingBag(5, 3, mode="sum", fused=fo.FusedSGD(lr=1.0))
    before = m.weight.detach().clone()
    with torch.device("cpu"):  # a TorchFunctionMode: torch functions dispatch through it
        out = m(torch.tensor([1, 2]), torch.tensor([0]))
    out.sum().backward()
    assert m.weight.grad is None and torch.equal(m.weight[1], before[1] - 1.0)


def test_two_d_ids_with_no_columns_are_torchs_error():
    for fn in (F.embedding_bag, ft.functional.embedding_bag):
        with pytest.raises(RuntimeError):
            fn(torch.empty(3, 0, dtype=torch.long), torch.randn(5, 3), mode="sum")
