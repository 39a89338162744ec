"""bfloat16 tables in the torch adapter: Embedding, functional.embedding, TokenPositionEmbedding and the
custom ops run the kernels' bfloat16 path (the table's memory viewed as uint16, ``_format="bfloat16"``).

The oracle is torch's own CPU code on the same bfloat16 tensors (nn.Embedding, F.embedding, aten's
embedding_dense_backward, the bfloat16 add of two lookups). Every comparison is bitwise (the uint16 bits):
a lookup is a copy, ``token + position`` is one float32 add rounded once in both, and torch's dense
backward on CPU adds each row into the bfloat16 gradient one rounding at a time, in the order of the ids,
as the kernels do. A spy on `fastembed._kernels` proves each case ran the kernels with the bfloat16
format (and on the table's own memory), not torch's fallback, which would pass every comparison.
"""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from _helpers import FAST, FEW

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastembed.torch")
import fastembed.torch.functional as ftf  # noqa: E402
from fastembed import _kernels  # noqa: E402

F = torch.nn.functional
OPS = torch.ops.fastembed
BF16 = torch.bfloat16
KERNELS = ("gather", "gather_add", "scatter_add", "gather_add_backward", "coalesce", "renorm")


def bits(t):
    """A tensor's bits (bitwise comparison: -0.0 and NaN payloads included)."""
    return t.detach().contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


@pytest.fixture
def spy(monkeypatch):
    """Records (kernel, _format, the data pointer of its first element array) for each call of the
    kernels; the calls still run."""
    calls = []

    def wrap(name, real):
        def kernel(*args, **kwargs):
            first = args[1] if name == "coalesce" else args[0]
            calls.append((name, kwargs.get("_format"), first.__array_interface__["data"][0]))
            return real(*args, **kwargs)
        return kernel

    for name in KERNELS:
        monkeypatch.setattr(_kernels, name, wrap(name, getattr(_kernels, name)))
    return calls


def kernels_run(calls):
    return [(name, fmt) for name, fmt, _ in calls]


def table(rows, dim, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, dim, generator=g, dtype=torch.float64) * scale).to(BF16)


# ---------------------------------------------------------------- Embedding and functional.embedding

@FAST
@given(rows=st.integers(1, 9), dim=st.integers(0, 7),
       shape=st.lists(st.integers(0, 5), max_size=3), id_dtype=st.sampled_from([torch.int32, torch.int64]),
       padding=st.one_of(st.none(), st.integers(-9, 8)), functional=st.booleans(),
       seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1.0, 1e-3, 1e30]))
def test_lookup_and_dense_gradient_are_torchs_bits(rows, dim, shape, id_dtype, padding, functional, seed, scale):
    """Random bit patterns in the table (NaNs, infinities, -0.0 and subnormals among them: a lookup copies
    bits), upstream gradients whose sums round (and overflow at scale 1e30) where ids repeat."""
    padding = None if padding is None or not -rows <= padding < rows else padding
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(-2**15, 2**15, (rows, dim), generator=g, dtype=torch.int16).view(BF16)
    ids = torch.randint(0, rows, shape, generator=g).to(id_dtype)
    upstream = (torch.randn(*shape, dim, generator=g, dtype=torch.float64) * scale).to(BF16)
    results = []
    for ours in (True, False):
        w = weight.clone().requires_grad_()
        if ours and not functional:
            module = ft.Embedding.from_pretrained(w, freeze=False, padding_idx=padding)
            w = module.weight  # (a Parameter over the same memory)
            out = module(ids)
        else:
            out = (ftf.embedding if ours else F.embedding)(ids, w, padding)
        if ours:  # the kernels' path (the spy tests below show which kernels, with which format)
            assert "_EmbeddingFunction" in type(out.grad_fn).__name__
        out.backward(upstream)
        results.append((out, w.grad))
    (out, grad), (torch_out, torch_grad) = results
    assert same_bits(out, torch_out) and same_bits(grad, torch_grad)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("padding_idx", [None, 0, 3, -1])
def test_lookup_and_backward_run_the_bfloat16_kernels_on_the_tables_memory(spy, id_dtype, padding_idx):
    module = ft.Embedding(9, 5, padding_idx=padding_idx, dtype=BF16)
    ids = torch.tensor([[3, 1, 3, 8], [0, 3, 7, 1]], dtype=id_dtype)
    out = module(ids)
    assert out.dtype == BF16 and "_EmbeddingFunction" in type(out.grad_fn).__name__
    out.backward(torch.ones_like(out))
    assert kernels_run(spy) == [("gather", "bfloat16"), ("scatter_add", "bfloat16")]
    assert spy[0][2] == module.weight.data_ptr()  # the weight's own memory: never a copy or a cast
    assert spy[1][2] == module.weight.grad.data_ptr()  # the gradient: written in place, viewed back
    expected = torch.zeros(9, 5, dtype=BF16).index_add_(0, ids.reshape(-1).long(), torch.ones(8, 5, dtype=BF16))
    if padding_idx is not None:
        expected[padding_idx] = 0
    assert same_bits(module.weight.grad, expected)


@pytest.mark.parametrize("padding_idx", [None, 1])
def test_sparse_gradient_has_torchs_layout_and_bits(spy, padding_idx):
    ids = torch.tensor([[5, 1, 5], [1, 0, 5]], dtype=torch.int32)
    upstream = table(6, 4, 2).reshape(2, 3, 4)
    grads = []
    for cls in (ft.Embedding, torch.nn.Embedding):
        m = cls.from_pretrained(table(7, 4, 1), freeze=False, sparse=True, padding_idx=padding_idx)
        m(ids).backward(upstream)
        grads.append(m.weight.grad)
    ours, theirs = grads
    assert ours.is_sparse and not ours.is_coalesced() and ours.dtype == BF16
    assert torch.equal(ours._indices(), theirs._indices()) and same_bits(ours._values(), theirs._values())


def test_empty_ids_give_torchs_empty_lookup_and_zero_gradient(spy):
    for ids in (torch.empty(0, dtype=torch.int64), torch.empty(2, 0, dtype=torch.int32)):
        w = table(4, 3, 1).requires_grad_()
        out = ftf.embedding(ids, w, 2)
        out.sum().backward()
        assert out.shape == (*ids.shape, 3) and out.dtype == BF16
        assert same_bits(w.grad, torch.zeros(4, 3, dtype=BF16))
    assert {name for name, _ in kernels_run(spy)} == {"gather", "scatter_add"}


@pytest.mark.parametrize("bad", [4, -1])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("functional", [False, True])
def test_an_id_out_of_range_raises_torchs_error_and_changes_nothing(bad, sparse, functional):
    weight = table(4, 3, 1)
    for id_dtype in (torch.int32, torch.int64):
        ids = torch.tensor([0, bad, 2], dtype=id_dtype)
        errors = []
        for module_cls, embedding in ((ft.Embedding, ftf.embedding), (torch.nn.Embedding, F.embedding)):
            w = weight.clone().requires_grad_()
            with pytest.raises(Exception) as info:
                if functional:
                    embedding(ids, w, sparse=sparse)
                else:
                    module_cls.from_pretrained(w, freeze=False, sparse=sparse)(ids)
            assert same_bits(w, weight) and w.grad is None
            errors.append(info.type)
        assert errors == [IndexError, IndexError]
        with pytest.raises(IndexError, match="index out of range in self"):
            ftf.embedding(ids, weight)


def _train_both(ids, upstream, **kw):
    results = []
    for cls in (ft.Embedding, torch.nn.Embedding):
        m = cls.from_pretrained(table(5, 5, 1, scale=3.0), freeze=False, **kw)
        out = m(ids)
        out.backward(upstream)
        results.append((out, m.weight.detach(), m.weight.grad))
    for a, b in zip(*results):
        assert same_bits(a, b)


@pytest.mark.parametrize("kw", [dict(max_norm=1.0), dict(max_norm=0.5, norm_type=1.0),
                                dict(max_norm=2.0, norm_type=math.inf)])
def test_max_norm_runs_the_renorm_kernel_on_the_tables_bits(spy, kw):
    """max_norm on a bfloat16 table: the renorm kernel on the weight's own memory (bits), then the lookup,
    torch's bits throughout (the renorm kernel follows torch's order for p in 0, 1, 2 and +-inf)."""
    ids = torch.tensor([[3, 1, 3, 4], [0, 3, 2, 1]])
    _train_both(ids, table(8, 5, 3).reshape(2, 4, 5), **kw)
    assert ("renorm", "bfloat16") in kernels_run(spy) and ("gather", "bfloat16") in kernels_run(spy)


def test_scale_grad_by_freq_stays_torchs(spy):
    """No kernel scales by frequency: torch's whole lookup, as for float16."""
    ids = torch.tensor([[3, 1, 3, 4], [0, 3, 2, 1]])
    _train_both(ids, table(8, 5, 3).reshape(2, 4, 5), scale_grad_by_freq=True)
    assert spy == []


def test_fused_rules_take_bfloat16_as_they_take_float16():
    """(their updates against torch: tests/test_torch_optim_dtypes.py)"""
    from fastembed.torch.optim import FusedSGD, FusedSparseAdam
    for dtype in (torch.float16, BF16):
        assert ft.Embedding(4, 3, dtype=dtype, fused=FusedSGD(lr=0.1)).weight.dtype == dtype
        held = ft.Embedding(4, 3, dtype=dtype, fused=FusedSparseAdam(lr=0.1))
        assert held.optim_exp_avg.dtype == held.optim_exp_avg_sq.dtype == dtype
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        ft.Embedding.from_pretrained(torch.zeros(4, 3, dtype=torch.int64), fused=FusedSGD(lr=0.1))


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_double_backward_is_torchs(spy, padding_idx):
    ids = torch.tensor([[3, 1, 3], [0, 2, 3]])
    c = table(5, 4, 9)
    results = []
    for cls in (ft.Embedding, torch.nn.Embedding):
        m = cls.from_pretrained(table(5, 4, 8), freeze=False, padding_idx=padding_idx)
        (g,) = torch.autograd.grad((m(ids) ** 2).sum(), m.weight, create_graph=True)
        (gg,) = torch.autograd.grad((g * c).sum() + (g ** 3).sum(), m.weight)
        results.append((g, gg))
    for a, b in zip(*results):
        assert same_bits(a, b)
    assert ("scatter_add", "bfloat16") in kernels_run(spy) and kernels_run(spy).count(("gather", "bfloat16")) == 2


# ---------------------------------------------------------------- TokenPositionEmbedding

def _torch_token_position(tok, pos, ids, positions):
    if positions is None or isinstance(positions, int):
        p = ((positions or 0) + torch.arange(ids.shape[-1])).expand_as(ids)
    else:
        p = positions.long().expand_as(ids)
    return F.embedding(ids, tok) + F.embedding(p, pos)


@FEW
@given(shape=st.lists(st.integers(0, 4), min_size=1, max_size=3), positions=st.sampled_from(["none", "start", "tensor"]),
       frozen=st.sampled_from(["none", "token", "position"]), id_dtype=st.sampled_from([torch.int32, torch.int64]),
       seed=st.integers(0, 2**31 - 1))
def test_token_position_is_torchs_bits(shape, positions, frozen, id_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randn(6, 5, generator=g).to(BF16)
    pos = (torch.randn(9, 5, generator=g) * 100).to(BF16)  # sums that round
    ids = torch.randint(0, 6, shape, generator=g).to(id_dtype)
    where = {"none": None, "start": 9 - shape[-1],
             "tensor": torch.randint(0, 9, shape[-1:], generator=g).to(id_dtype)}[positions]
    upstream = torch.randn(*shape, 5, generator=g).to(BF16)
    results = []
    for ours in (True, False):
        t = tok.clone().requires_grad_(frozen != "token")
        p = pos.clone().requires_grad_(frozen != "position")
        if ours:
            layer = ft.TokenPositionEmbedding.from_pretrained(t, p, freeze=False)
            t, p = layer.token.weight, layer.position.weight  # (Parameters over the same memory)
            t.requires_grad_(frozen != "token")
            p.requires_grad_(frozen != "position")
            out = layer(ids, where)
            assert "_TokenPositionFunction" in type(out.grad_fn).__name__
        else:
            out = _torch_token_position(t, p, ids, where)
        out.backward(upstream)
        results.append((out, t.grad, p.grad))
    for a, b in zip(*results):
        assert (a is None and b is None) or same_bits(a, b)


def test_token_position_runs_the_bfloat16_kernels(spy):
    layer = ft.TokenPositionEmbedding(7, 4, 3, dtype=BF16)
    assert layer.token.weight.dtype == layer.position.weight.dtype == BF16
    ids = torch.tensor([[1, 3, 1, 0]])
    layer(ids).sum().backward()
    layer.position.weight.requires_grad_(False)
    layer(ids, 0).sum().backward()
    assert kernels_run(spy) == [("gather_add", "bfloat16"), ("gather_add_backward", "bfloat16"),
                                ("gather_add", "bfloat16"), ("scatter_add", "bfloat16")]
    assert spy[0][2] == layer.token.weight.data_ptr()


def test_token_position_sparse_and_double_backward_are_torchs():
    ids = torch.tensor([[1, 3, 1, 0]])
    tok, pos = table(5, 3, 1), table(4, 3, 2)
    for sparse in (True, False):
        results = []
        for ours in (True, False):
            t, p = tok.clone().requires_grad_(), pos.clone().requires_grad_()
            if ours:
                layer = ft.TokenPositionEmbedding.from_pretrained(t, p, freeze=False, sparse=sparse)
                t, p = layer.token.weight, layer.position.weight
                out = layer(ids)
            else:
                out = (F.embedding(ids, t, sparse=sparse)
                       + F.embedding(torch.arange(4).expand_as(ids), p, sparse=sparse))
            if sparse:
                out.backward(table(4, 3, 3).reshape(1, 4, 3))
                results.append((t.grad._indices(), t.grad._values(), p.grad._indices(), p.grad._values()))
            else:
                gt, gp = torch.autograd.grad((out ** 2).sum(), (t, p), create_graph=True)
                results.append((gt, gp, *torch.autograd.grad((gt ** 3).sum() + (gp * 3).sum(), (t, p))))
        for a, b in zip(*results):
            assert same_bits(a, b)


def test_token_position_tables_of_two_dtypes_are_refused():
    with pytest.raises(TypeError, match="one dtype"):
        ft.TokenPositionEmbedding.from_pretrained(table(5, 3, 1), table(4, 3, 2).half())
    with pytest.raises(NotImplementedError, match="int64"):
        ft.TokenPositionEmbedding(5, 4, 3, dtype=torch.int64)


# ---------------------------------------------------------------- the custom ops, compiled

def test_custom_ops_are_torchs_bits_on_the_kernels(spy):
    w, ids = table(9, 4, 5), torch.tensor([[3, 1, 3, 8], [0, 3, 7, 3]], dtype=torch.int32)
    g = table(8, 4, 7, scale=50.0).reshape(2, 4, 4)
    assert same_bits(OPS.embedding(w, ids, -1), F.embedding(ids, w))
    assert same_bits(OPS.embedding_backward(g, ids, 9, 3),
                     torch.ops.aten.embedding_dense_backward(g, ids, 9, 3, False))
    pos, where = table(6, 4, 8, scale=100.0), torch.tensor([5, 0, 5, 2], dtype=torch.int32)  # broadcast to ids
    assert same_bits(OPS.token_position(w, pos, ids, where, 0), _torch_token_position(w, pos, ids, where))
    tg, pg = OPS.token_position_backward(g, ids, None, 2, 9, 6)
    p = (2 + torch.arange(4)).expand_as(ids)
    assert same_bits(tg, torch.ops.aten.embedding_dense_backward(g, ids, 9, -1, False))
    assert same_bits(pg, torch.ops.aten.embedding_dense_backward(g, p, 6, -1, False))
    assert kernels_run(spy) == [(k, "bfloat16") for k in ("gather", "scatter_add", "gather_add",
                                                           "gather_add_backward")]


@pytest.mark.parametrize("name,make", [
    ("embedding", lambda: (table(20, 4, 1).requires_grad_(), torch.tensor([[1, 19, 1], [0, 2, 1]]), 2)),
    ("embedding_backward", lambda: (table(6, 4, 3).reshape(2, 3, 4).requires_grad_(),
                                    torch.tensor([[1, 19, 1], [0, 2, 1]]), 20, 1)),
    ("token_position", lambda: (table(20, 4, 1).requires_grad_(), table(5, 4, 2).requires_grad_(),
                                torch.tensor([[1, 19, 1], [0, 2, 1]]), None, 1)),
    ("token_position_backward", lambda: (table(6, 4, 3).reshape(2, 3, 4).requires_grad_(),
                                         torch.tensor([[1, 19, 1], [0, 2, 1]]), torch.tensor([4, 0, 4]), 0, 20, 5)),
])
def test_opcheck(name, make):
    result = torch.library.opcheck(getattr(OPS, name).default, make())
    assert set(result.values()) == {"SUCCESS"}, result


class _Model(torch.nn.Module):
    def __init__(self, embed, tp):
        super().__init__()
        self.embed, self.tp = embed, tp

    def forward(self, ids):
        return (self.embed(ids) * self.tp(ids)).float().tanh().sum()


def test_compiled_modules_hold_the_ops_without_a_break_and_give_torchs_bits():
    torch._dynamo.reset()
    seen = []

    def recording(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    tok, pos, ids = table(30, 8, 1), table(6, 8, 2), torch.randint(0, 30, (4, 6), generator=torch.Generator().manual_seed(3))
    ids[0, 0] = 2  # the padding row among the lookups
    fast = _Model(ft.Embedding.from_pretrained(tok.clone(), freeze=False, padding_idx=2),
                  ft.TokenPositionEmbedding.from_pretrained(tok.clone(), pos.clone(), freeze=False))
    loss = torch.compile(fast, fullgraph=True, backend=recording)(ids)
    assert seen.count(OPS.embedding.default) == 1 and seen.count(OPS.token_position.default) == 1, seen
    fast_grads = torch.autograd.grad(loss, list(fast.parameters()))
    params = [tok.clone().requires_grad_() for _ in range(2)] + [pos.clone().requires_grad_()]
    emb = F.embedding(ids, params[0], 2)
    h = _torch_token_position(params[1], params[2], ids, None)
    ref = (emb * h).float().tanh().sum()
    assert same_bits(loss, ref)
    for a, b in zip(fast_grads, torch.autograd.grad(ref, params)):
        assert same_bits(a, b)
