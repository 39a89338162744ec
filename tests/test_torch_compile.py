"""fastembed's kernels as PyTorch custom operators (fastembed/torch/_library.py): what torch.compile and
torch.export need of them, and their values.

Oracles: torch's own ops (F.embedding, aten's embedding_dense_backward, double backward through
nn.functional.embedding, F.embedding_bag and aten's _embedding_bag for the bags) and np.add.at, never
fastembed's eager path alone (a compiled bag is also compared bitwise with it: the same kernels);
torch.library.opcheck checks each registration (schema, fake tensors, autograd, AOT dispatch) as torch's
own custom-op tests do.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
L = pytest.importorskip("fastembed.torch._library")

OPS = torch.ops.fastembed


def _table(rows, dim, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g, dtype=dtype)


def _ids(rows, shape, seed, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, rows, shape, generator=g).to(dtype)


def _scatter_oracle(grad, ids, rows, padding_idx):
    """np.add.at in float32, in the order of ids: the order fastembed's scatter-add promises."""
    out = np.zeros((rows, grad.shape[-1]), dtype=np.float32)
    np.add.at(out, ids.reshape(-1).numpy(), grad.reshape(-1, grad.shape[-1]).numpy())
    if padding_idx >= 0:
        out[padding_idx] = 0.0
    return out


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (0,), (2, 0, 3)])
def test_embedding_op_is_the_lookup(shape, id_dtype):
    w = _table(11, 6, 1)
    ids = _ids(11, shape, 2, id_dtype)
    out = OPS.embedding(w, ids, -1)
    assert out.shape == (*shape, 6) and out.dtype == torch.float32
    assert torch.equal(out, F.embedding(ids.long(), w))


@pytest.mark.parametrize("padding_idx", [-1, 0, 4])
def test_embedding_backward_op_sums_in_order_and_skips_padding(padding_idx):
    ids = torch.tensor([[4, 1, 4], [0, 4, 9]])  # a repeated id, and the padding row among them
    grad = _table(6, 5, 3).reshape(2, 3, 5)
    out = OPS.embedding_backward(grad, ids, 10, padding_idx)
    assert out.shape == (10, 5)
    np.testing.assert_array_equal(out.numpy(), _scatter_oracle(grad, ids, 10, padding_idx))
    torch_grad = torch.ops.aten.embedding_dense_backward(grad, ids, 10, padding_idx, False)
    torch.testing.assert_close(out, torch_grad)  # torch's own order of additions may round differently


def test_embedding_backward_op_with_no_ids_is_zero():
    out = OPS.embedding_backward(torch.empty(0, 4), torch.empty(0, dtype=torch.int64), 3, -1)
    assert torch.equal(out, torch.zeros(3, 4))


def test_an_id_out_of_range_raises_fastembeds_error():
    w = _table(5, 3, 1)
    with pytest.raises(IndexError, match="5"):
        OPS.embedding(w, torch.tensor([0, 5]), -1)
    with pytest.raises(IndexError):
        OPS.embedding(w, torch.tensor([-1]), -1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_table_dtypes_give_torchs_result(dtype):
    w = _table(9, 4, 5, dtype)
    ids = _ids(9, (3, 4), 6)
    assert torch.equal(OPS.embedding(w, ids, -1), F.embedding(ids, w))
    g = _table(12, 4, 7, dtype).reshape(3, 4, 4)
    assert torch.equal(OPS.embedding_backward(g, ids, 9, 2),
                       torch.ops.aten.embedding_dense_backward(g, ids, 9, 2, False))


@pytest.mark.parametrize("positions", ["none", "start", "tensor"])
def test_token_position_op_and_its_backward(positions):
    tok, pos = _table(13, 6, 1), _table(9, 6, 2)
    ids = _ids(13, (2, 4), 3)
    p_tensor = torch.tensor([8, 0, 8, 3]) if positions == "tensor" else None
    start = 5 if positions == "start" else 0
    p = p_tensor.expand(2, 4) if p_tensor is not None else (start + torch.arange(4)).expand(2, 4)
    out = OPS.token_position(tok, pos, ids, p_tensor, start)
    assert torch.equal(out, F.embedding(ids, tok) + F.embedding(p, pos))
    grad = _table(8, 6, 4).reshape(2, 4, 6)
    tg, pg = OPS.token_position_backward(grad, ids, p_tensor, start, 13, 9)
    np.testing.assert_array_equal(tg.numpy(), _scatter_oracle(grad, ids, 13, -1))
    np.testing.assert_array_equal(pg.numpy(), _scatter_oracle(grad, p, 9, -1))


OPCHECK_CASES = [
    ("embedding", lambda: (_table(20, 4, 1).requires_grad_(), _ids(20, (3, 5), 2), -1)),
    ("embedding", lambda: (_table(20, 4, 1).requires_grad_(), _ids(20, (6,), 2, torch.int32), 3)),
    ("embedding_backward", lambda: (_table(15, 4, 3).reshape(3, 5, 4).requires_grad_(), _ids(20, (3, 5), 2), 20, 1)),
    ("token_position", lambda: (_table(20, 4, 1).requires_grad_(), _table(5, 4, 2).requires_grad_(),
                                _ids(20, (3, 5), 3), None, 0)),
    ("token_position", lambda: (_table(20, 4, 1).requires_grad_(), _table(9, 4, 2).requires_grad_(),
                                _ids(20, (2, 5), 3), _ids(9, (5,), 4), 0)),
    ("token_position_backward", lambda: (_table(10, 4, 1).reshape(2, 5, 4).requires_grad_(), _ids(20, (2, 5), 3),
                                         None, 2, 20, 7)),
]


@pytest.mark.parametrize("name,make", OPCHECK_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPCHECK_CASES)])
def test_opcheck(name, make):
    """torch's own checker of a custom op's registration: schema (no hidden aliasing or mutation), fake
    implementation against the real one, autograd registered, and AOT dispatch with dynamic shapes."""
    result = torch.library.opcheck(getattr(OPS, name).default, make())
    assert set(result.values()) == {"SUCCESS"}, result


def test_double_backward_is_torchs():
    ids = torch.tensor([[3, 1, 3], [0, 2, 3]])
    for padding_idx in (-1, 3):
        grads = []
        for lookup in (lambda w: OPS.embedding(w, ids, padding_idx),
                       lambda w: F.embedding(ids, w, None if padding_idx < 0 else padding_idx)):
            w = _table(5, 4, 8).requires_grad_()
            (g,) = torch.autograd.grad((lookup(w) ** 2).sum(), w, create_graph=True)
            (gg,) = torch.autograd.grad((g ** 3).sum(), w)
            grads.append((g, gg))
        (g, gg), (tg, tgg) = grads
        torch.testing.assert_close(g, tg)
        torch.testing.assert_close(gg, tgg)
        assert gg.abs().sum() > 0  # the second derivative is not trivially zero here


def test_backward_op_adjoint_is_torchs():
    """The backward's own gradient with respect to its incoming gradient (what double backward runs), taken
    directly: the lookups of the padding row get nothing back, as in aten's embedding_dense_backward."""
    ids = torch.tensor([[3, 1, 3], [0, 2, 3]])
    c = _table(5, 4, 9)  # a gradient on every row, the padding row's included
    for padding_idx in (-1, 3):
        results = []
        for backward in (OPS.embedding_backward, lambda *a: torch.ops.aten.embedding_dense_backward(*a, False)):
            v = _table(6, 4, 10).reshape(2, 3, 4).requires_grad_()
            (gv,) = torch.autograd.grad(backward(v, ids, 5, padding_idx), v, grad_outputs=c)
            results.append(gv)
        assert torch.equal(*results)
        assert results[0].abs().sum() > 0


def test_token_position_double_backward_is_torchs():
    ids, tok0, pos0 = torch.tensor([[3, 1, 3]]), _table(5, 4, 1), _table(3, 4, 2)
    results = []
    for fast in (True, False):
        tok, pos = tok0.clone().requires_grad_(), pos0.clone().requires_grad_()
        h = OPS.token_position(tok, pos, ids, None, 0) if fast else F.embedding(ids, tok) + pos[:3]
        gt, gp = torch.autograd.grad((h ** 2).sum(), (tok, pos), create_graph=True)
        results.append(torch.autograd.grad((gt ** 3).sum() + (gp ** 2).sum(), (tok, pos)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def _model(ops):
    """A small graph around both lookups (ops=True: fastembed's custom ops; False: torch's)."""
    def f(tok, pos, ids):
        if ops:
            h = OPS.token_position(tok, pos, ids, None, 0)
            e = OPS.embedding(tok, ids, 2)
        else:
            h = F.embedding(ids, tok) + F.embedding(torch.arange(ids.shape[-1]).expand_as(ids), pos)
            e = F.embedding(ids, tok, 2)
        return (h * e).sum(-1).tanh().sum()
    return f


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_graph_has_no_break_and_torchs_values(backend):
    """fullgraph=True fails on any graph break. Compiled, the ops give the bits of torch's own lookups
    compiled the same way (inductor fuses the arithmetic around them, which changes its rounding)."""
    torch._dynamo.reset()
    tok, pos, ids = _table(30, 8, 1), _table(6, 8, 2), _ids(30, (4, 6), 3)
    results = []
    for ops in (True, False):
        t, p = tok.clone().requires_grad_(), pos.clone().requires_grad_()
        loss = torch.compile(_model(ops), fullgraph=True, backend=backend)(t, p, ids)
        results.append((loss, *torch.autograd.grad(loss, (t, p))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_export_holds_one_node_per_lookup():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = torch.nn.Parameter(_table(30, 8, 1))
            self.pos = torch.nn.Parameter(_table(6, 8, 2))

        def forward(self, ids):
            return OPS.token_position(self.tok, self.pos, ids, None, 0) + OPS.embedding(self.tok, ids, -1)

    m, ids = M(), _ids(30, (2, 6), 4)
    exported = torch.export.export(m, (ids,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(OPS.token_position.default) == 1 and targets.count(OPS.embedding.default) == 1
    assert not any("aten.embedding" in str(t) or "index" in str(t) for t in targets), targets
    other = _ids(30, (2, 6), 5)
    assert torch.equal(exported.module()(other), (F.embedding(other, m.tok) + m.pos) + F.embedding(other, m.tok))


# ---------------------------------------------------------------- the modules, compiled and exported

import fastembed.torch as fet  # noqa: E402


class _Model(torch.nn.Module):
    """A tiny GPT's first steps: one module's lookup, a projection back to the vocabulary."""

    def __init__(self, embed_mod, tp_mod, rows=30, dim=8):
        super().__init__()
        self.embed, self.tp = embed_mod, tp_mod
        self.head = torch.nn.Linear(dim, rows)

    def forward(self, ids):
        if self.tp is not None:
            h = self.tp(ids)
        else:
            h = self.embed(ids)
        return torch.log_softmax(self.head(torch.tanh(h)), -1).sum()


def _pair(kind, **kw):
    """The same model twice, with the same parameters: with fastembed's modules and with torch's."""
    torch.manual_seed(0)
    if kind == "embedding":
        fast = _Model(fet.Embedding(30, 8, **kw), None)
        ref = _Model(torch.nn.Embedding(30, 8, **kw), None)
    else:
        fast = _Model(None, fet.TokenPositionEmbedding(30, 6, 8, **kw))
        ref = _Model(None, _TorchTokenPosition(fast.tp))
    ref.load_state_dict(fast.state_dict(), strict=False)
    ref.head.load_state_dict(fast.head.state_dict())
    return fast, ref


class _TorchTokenPosition(torch.nn.Module):
    def __init__(self, like):
        super().__init__()
        self.token = torch.nn.Embedding.from_pretrained(like.token.weight.detach().clone(), freeze=False)
        self.position = torch.nn.Embedding.from_pretrained(like.position.weight.detach().clone(), freeze=False)

    def forward(self, ids):
        return self.token(ids) + self.position(torch.arange(ids.shape[-1]))


@pytest.mark.parametrize("kind,kw", [("embedding", {}), ("embedding", {"padding_idx": 3}),
                                     ("embedding", {"sparse": True}), ("tp", {})])
def test_compiled_module_has_no_graph_break_and_torchs_results(kind, kw):
    torch._dynamo.reset()
    fast, ref = _pair(kind, **kw)
    ids = _ids(30, (4, 6), 1)
    ids[0, 0] = 3  # the padding row among the lookups
    results = []
    for model in (fast, ref):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        loss = compiled(ids)
        params = [p for p in model.parameters()]
        results.append((loss, *torch.autograd.grad(loss, params)))
    for a, b in zip(*results):
        if a.is_sparse:
            a, b = a.coalesce(), b.coalesce()
            assert torch.equal(a.indices(), b.indices())
            a, b = a.values(), b.values()
        assert torch.equal(a, b)


def test_exported_model_holds_fastembeds_op():
    fast, ref = _pair("embedding")
    ids = _ids(30, (2, 6), 2)
    exported = torch.export.export(fast, (ids,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert OPS.embedding.default in targets
    assert torch.equal(exported.module()(ids), ref(ids))


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_eager_double_backward_is_torchs(padding_idx):
    ids = torch.tensor([[3, 1, 3], [0, 2, 3]])
    results = []
    for cls in (fet.Embedding, torch.nn.Embedding):
        torch.manual_seed(1)
        m = cls(5, 4, padding_idx=padding_idx)
        c = _table(5, 4, 9)
        (g,) = torch.autograd.grad((m(ids) ** 2).sum(), m.weight, create_graph=True)
        (gg,) = torch.autograd.grad((g * c).sum() + (g ** 3).sum(), m.weight)
        results.append((g, gg))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_compiled_modules_call_fastembeds_ops():
    """The graphs Dynamo captures hold the custom ops (not torch's lookups, nor a break around numpy)."""
    torch._dynamo.reset()
    seen = []

    def recording(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    embed, tp = fet.Embedding(30, 8, padding_idx=2), fet.TokenPositionEmbedding(30, 6, 8)
    ids = _ids(30, (2, 6), 1)
    compiled = torch.compile(lambda i: embed(i).sum() + tp(i).sum() + tp(i, 0).sum() + tp(i, ids[0] % 6).sum(),
                             fullgraph=True, backend=recording)
    compiled(ids)
    assert seen.count(OPS.embedding.default) == 1 and seen.count(OPS.token_position.default) == 3, seen


@pytest.mark.parametrize("kind", ["embedding", "tp", "tp-sparse"])
def test_fused_and_sparse_layers_run_eagerly_inside_a_compiled_model(kind):
    """A fused layer's backward moves its weight and a sparse token+position layer builds torch's sparse
    gradients in Python: both run eagerly (a graph break), with the eager results; fullgraph=True refuses."""
    from fastembed.torch.optim import FusedAdagrad
    torch._dynamo.reset()
    ids = _ids(30, (3, 6), 7)
    results = []
    for compiled in (False, True):
        torch.manual_seed(2)
        if kind == "embedding":
            layer = fet.Embedding(30, 8, fused=FusedAdagrad(lr=0.5))
        else:
            layer = fet.TokenPositionEmbedding(30, 6, 8, sparse=kind == "tp-sparse",
                                               fused=None if kind == "tp-sparse" else FusedAdagrad(lr=0.5))
        step = (lambda i: torch.tanh(layer(i)).sum())
        if compiled:
            step = torch.compile(step, backend="aot_eager")
        for _ in range(2):
            step(ids).backward()
        results.append([p.detach().clone() for p in layer.parameters()]
                       + [p.grad.to_dense() for p in layer.parameters() if p.grad is not None])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    with pytest.raises(Exception, match="(?i)graph break|skip|disable"):
        torch.compile(lambda i: layer(i).sum(), fullgraph=True, backend="aot_eager")(ids)


@pytest.mark.parametrize("positions", [None, 2, "tensor"])
def test_eager_token_position_double_backward_is_torchs(positions):
    ids = torch.tensor([[3, 1, 3], [0, 2, 3]])
    p = torch.tensor([4, 0, 4]) if positions == "tensor" else positions
    rows = (torch.arange(3) + (positions or 0)) if not isinstance(p, torch.Tensor) else p
    c_tok, c_pos = _table(5, 4, 9), _table(6, 4, 10)
    results = []
    for fast in (True, False):
        torch.manual_seed(1)
        layer = fet.TokenPositionEmbedding(5, 6, 4)
        tok, pos = layer.token.weight, layer.position.weight
        h = layer(ids, p) if fast else F.embedding(ids, tok) + F.embedding(rows.expand_as(ids), pos)
        gt, gp = torch.autograd.grad((h ** 2).sum(), (tok, pos), create_graph=True)
        results.append(torch.autograd.grad((gt * c_tok).sum() + (gp ** 3).sum() + (gp * c_pos).sum(), (tok, pos)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0


def test_export_refuses_fused_layers_and_takes_sparse_ones():
    from fastembed.torch.optim import FusedSGD
    ids = _ids(5, (2, 4), 3)
    for layer in (fet.Embedding(5, 3, fused=FusedSGD(lr=1.0)), fet.TokenPositionEmbedding(5, 4, 3, fused=FusedSGD(lr=1.0))):
        with pytest.raises(RuntimeError, match="cannot be exported"):
            torch.export.export(layer, (ids,))
    layer = fet.TokenPositionEmbedding(5, 4, 3, sparse=True)
    exported = torch.export.export(layer, (ids,))
    assert torch.equal(exported.module()(ids), layer(ids))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_token_position_tables_of_other_dtypes_train_as_torch(dtype):
    tok, pos = _table(5, 3, 1, dtype), _table(4, 3, 2, dtype)
    ids = torch.tensor([[1, 3, 1, 0]])
    layer = fet.TokenPositionEmbedding.from_pretrained(tok.clone(), pos.clone(), freeze=False)
    layer(ids).sum().backward()
    t, p = tok.clone().requires_grad_(), pos.clone().requires_grad_()
    (F.embedding(ids, t) + F.embedding(torch.arange(4).expand_as(ids), p)).sum().backward()
    assert torch.equal(layer.token.weight.grad, t.grad) and torch.equal(layer.position.weight.grad, p.grad)


def test_token_position_op_refuses_tables_of_two_dtypes():
    with pytest.raises(TypeError, match="same dtype"):
        OPS.token_position(_table(5, 3, 1), _table(4, 3, 2, torch.float64), torch.tensor([[1, 2]]), None, 0)


# ---------------------------------------------------------------- bags: fastembed::embedding_bag and its backward ops
#
# Oracles: torch's F.embedding_bag and aten's _embedding_bag (its max_indices), and torch's autograd through
# them. torch sums a bag in its own order (FBGEMM on CPU), so values agree to float rounding; against
# fastembed's eager EmbeddingBag (the same kernels, the same order) a compiled one agrees bitwise.

BAG_CLOSE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
BAG_IDS = torch.tensor([1, 8, 4, 5, 4, 3, 2, 9, 4])  # 4 repeated, 3 and 8 possible padding rows
BAG_OFFSETS = torch.tensor([0, 3, 3, 6])  # an empty bag; the last runs to the end


def _bag_call(mode, layout, dtype=torch.float32, psw=False):
    """weight, ids, offsets, per_sample_weights of one bag call (layout: "offsets" or "2d")."""
    w = _table(10, 5, 11, dtype)
    ids, offsets = (BAG_IDS, BAG_OFFSETS) if layout == "offsets" else (BAG_IDS[:8].reshape(2, 4), None)
    p = _table(ids.numel(), 1, 12, dtype).reshape(ids.shape) if psw else None
    return w, ids, offsets, p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode,layout,padding_idx,psw", [
    ("sum", "offsets", -1, True), ("mean", "offsets", 4, False), ("max", "offsets", -1, False),
    ("sum", "2d", 3, True), ("mean", "2d", -1, False), ("max", "2d", 4, False)])
def test_bag_op_and_its_backward_ops_are_torchs(mode, layout, padding_idx, psw, dtype):
    w, ids, offsets, p = _bag_call(mode, layout, dtype, psw)
    pad = None if padding_idx < 0 else padding_idx
    ref = F.embedding_bag(ids, w, offsets, mode=mode, per_sample_weights=p, padding_idx=pad)
    out, argmax = OPS.embedding_bag(w, ids, offsets, p, mode, padding_idx, False)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **BAG_CLOSE[dtype])
    if mode == "max":
        flat = ids.reshape(-1) if offsets is None else ids
        torch_offsets = offsets if offsets is not None else torch.arange(0, ids.numel(), ids.shape[1])
        mode_code = 2
        max_indices = torch.ops.aten._embedding_bag(w, flat, torch_offsets, False, mode_code, False, None, False,
                                                    padding_idx)[3]
        assert torch.equal(argmax, max_indices)  # random values: no ties for the two to break differently
    else:
        assert argmax.numel() == 0
    grad = _table(out.shape[0], 5, 13, dtype)
    weight = w.clone().requires_grad_()
    pw = None if p is None else p.clone().requires_grad_()
    torch_grads = torch.autograd.grad(
        F.embedding_bag(ids, weight, offsets, mode=mode, per_sample_weights=pw, padding_idx=pad), [weight] + (
            [pw] if psw else []), grad)
    ours = OPS.embedding_bag_backward(grad, ids, offsets, p, argmax, 10, mode, padding_idx, False)
    torch.testing.assert_close(ours, torch_grads[0], **BAG_CLOSE[dtype])
    assert ours.abs().sum() > 0
    if padding_idx >= 0:
        assert not ours[padding_idx].any()
    if psw:
        psw_grad = OPS.embedding_bag_weights_grad(w, ids, offsets, grad, padding_idx, False)
        torch.testing.assert_close(psw_grad, torch_grads[1], **BAG_CLOSE[dtype])


def test_bag_op_include_last_offset_and_int32_ids():
    w, ids = _table(10, 5, 11), BAG_IDS.to(torch.int32)
    offsets = torch.tensor([0, 3, 3, 6, 9], dtype=torch.int32)
    for mode in ("sum", "mean", "max"):
        out, _ = OPS.embedding_bag(w, ids, offsets, None, mode, -1, True)
        assert out.shape == (4, 5)
        torch.testing.assert_close(out, F.embedding_bag(ids, w, offsets, mode=mode, include_last_offset=True),
                                   **BAG_CLOSE[torch.float32])


def test_bag_op_refuses_tables_the_kernels_do_not_take():
    with pytest.raises(TypeError, match="int64"):
        OPS.embedding_bag(torch.ones(5, 3, dtype=torch.int64), torch.tensor([[1, 2]]), None, None, "sum", -1, False)


BAG_OPCHECK_CASES = [
    ("embedding_bag", lambda: (_table(10, 5, 1).requires_grad_(), BAG_IDS, BAG_OFFSETS,
                               _table(9, 1, 2).reshape(9).requires_grad_(), "sum", 4, False)),
    ("embedding_bag", lambda: (_table(10, 5, 1).requires_grad_(), BAG_IDS[:8].reshape(2, 4), None, None, "max", -1,
                               False)),
    ("embedding_bag", lambda: (_table(10, 5, 1, torch.float64).requires_grad_(), BAG_IDS, BAG_OFFSETS[:3], None,
                               "mean", 3, True)),
    ("embedding_bag_backward", lambda: (_table(4, 5, 3), BAG_IDS, BAG_OFFSETS, None, torch.empty(0, dtype=torch.int64),
                                        10, "mean", 4, False)),
    ("embedding_bag_weights_grad", lambda: (_table(10, 5, 1), BAG_IDS[:8].reshape(2, 4), None, _table(2, 5, 3), 3,
                                            False)),
]


@pytest.mark.parametrize("name,make", BAG_OPCHECK_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAG_OPCHECK_CASES)])
def test_bag_opcheck(name, make):
    result = torch.library.opcheck(getattr(OPS, name).default, make())
    assert set(result.values()) == {"SUCCESS"}, result


class _BagModel(torch.nn.Module):
    """A fastText-style classifier: one bag per example, a linear head."""

    def __init__(self, bag, classes=3):
        super().__init__()
        self.bag = bag
        self.head = torch.nn.Linear(bag.embedding_dim, classes, dtype=bag.weight.dtype)

    def forward(self, ids, offsets=None, per_sample_weights=None):
        return torch.log_softmax(self.head(torch.tanh(self.bag(ids, offsets, per_sample_weights))), -1).sum()


def _bag_models(dtype=torch.float32, **kw):
    """fastembed's bag model and torch's, with the same parameters."""
    torch.manual_seed(3)
    fast = _BagModel(fet.EmbeddingBag(10, 5, dtype=dtype, **kw))
    ref = _BagModel(torch.nn.EmbeddingBag(10, 5, dtype=dtype, **kw))
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _loss_and_grads(model, args, psw_index=None):
    args = list(args)
    inputs = list(model.parameters())
    if psw_index is not None:
        args[psw_index] = args[psw_index].clone().requires_grad_()
        inputs.append(args[psw_index])
    loss = model(*args)
    return (loss.detach(), *torch.autograd.grad(loss, inputs))


BAG_COMPILE_CASES = [  # few: compiling is slow (inductor's case alone takes about 20 s)
    (dict(mode="sum"), "offsets", True, torch.float32, "aot_eager"),
    (dict(mode="mean", padding_idx=4), "2d", False, torch.float32, "aot_eager"),
    (dict(mode="max", padding_idx=-2), "offsets", False, torch.float64, "aot_eager"),
    (dict(mode="sum", padding_idx=3), "2d", True, torch.float64, "aot_eager"),
    (dict(mode="max"), "2d", False, torch.float32, "inductor"),
]


@pytest.mark.parametrize("kw,layout,psw,dtype,backend", BAG_COMPILE_CASES)
def test_compiled_bag_has_no_graph_break_and_torchs_results(kw, layout, psw, dtype, backend):
    """fullgraph=True fails on any graph break. Compiled, the bag gives eager torch's loss and gradients
    (to torch's rounding: torch sums in its own order) and, with aot_eager, eager fastembed's bits (the same
    kernels; inductor fuses the arithmetic around the op, which changes its rounding)."""
    torch._dynamo.reset()
    fast, ref = _bag_models(dtype, **kw)
    _, ids, offsets, p = _bag_call(kw["mode"], layout, dtype, psw)
    args, psw_index = (ids, offsets, p), (2 if psw else None)
    compiled = _loss_and_grads(torch.compile(fast, fullgraph=True, backend=backend), args, psw_index)
    eager_fast = _loss_and_grads(fast, args, psw_index)
    eager_torch = _loss_and_grads(ref, args, psw_index)
    assert len(compiled) == len(eager_torch) == 4 + (psw_index is not None)
    for a, b, c in zip(compiled, eager_fast, eager_torch):
        assert backend != "aot_eager" or torch.equal(a, b)
        torch.testing.assert_close(a, c, **BAG_CLOSE[dtype])
    assert compiled[1].abs().sum() > 0


@pytest.mark.parametrize("mode,layout,padding_idx,psw", [("sum", "offsets", -7, True), ("max", "2d", -2, False)])
def test_compiled_functional_bag_is_torchs(mode, layout, padding_idx, psw):
    """functional.embedding_bag compiled, on a random table (a module's padding row starts at zero, which
    hides a padding row taken into a max, or its per_sample_weight's gradient), with a negative padding_idx
    (a module's is made non-negative by torch's constructor): eager torch's values and gradients."""
    torch._dynamo.reset()
    w, ids, offsets, p = _bag_call(mode, layout, torch.float32, psw)
    assert (ids == padding_idx + 10).any()
    results = []
    for fn in (torch.compile(fet.functional.embedding_bag, fullgraph=True, backend="aot_eager"), F.embedding_bag):
        weight = w.clone().requires_grad_()
        pw = None if p is None else p.clone().requires_grad_()
        out = fn(ids, weight, offsets, mode=mode, per_sample_weights=pw, padding_idx=padding_idx)
        loss = (torch.tanh(out) * _table(*out.shape, 14)).sum()
        results.append((out.detach(), *torch.autograd.grad(loss, [weight] + ([pw] if psw else []))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **BAG_CLOSE[torch.float32])


def test_compiled_bag_graph_calls_fastembeds_op():
    """The captured graph holds the custom op, once per bag call, and none of torch's bags; torch's own path
    stays for sparse=True and max_norm."""
    torch._dynamo.reset()
    seen = []

    def recording(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    bags = [fet.EmbeddingBag(10, 5, mode=m, padding_idx=p) for m, p in (("sum", None), ("mean", 3), ("max", -1))]
    other = [fet.EmbeddingBag(10, 5, mode="sum", sparse=True), fet.EmbeddingBag(10, 5, mode="sum", max_norm=1.0)]
    p = _table(9, 1, 4).reshape(9)
    w = _table(10, 5, 5)
    compiled = torch.compile(lambda i, o: bags[0](i, o, p).sum() + bags[1](i, o).sum() + bags[2](i.reshape(3, 3)).sum()
                             + fet.functional.embedding_bag(i, w, o, mode="max").sum(),
                             fullgraph=True, backend=recording)
    compiled(BAG_IDS, BAG_OFFSETS)
    assert seen.count(OPS.embedding_bag.default) == 4, seen
    assert not any("embedding_bag" in str(t) and t != OPS.embedding_bag.default for t in seen), seen
    seen.clear()
    torch._dynamo.reset()
    torch.compile(lambda i, o: other[0](i, o).sum() + other[1](i, o).sum(), fullgraph=True, backend=recording)(
        BAG_IDS, BAG_OFFSETS)
    assert OPS.embedding_bag.default not in seen and len(seen) > 0, seen


@pytest.mark.parametrize("kw", [dict(mode="sum", sparse=True), dict(mode="mean", max_norm=0.5)])
def test_compiled_bag_on_torchs_path_gives_torchs_results(kw):
    """sparse=True and max_norm are torch's own F.embedding_bag while compiling: torch's results, the sparse
    gradient's layout and max_norm's renormalised weight included."""
    torch._dynamo.reset()
    fast, ref = _bag_models(**kw)
    results = []
    for model in (fast, ref):
        loss = torch.compile(model, fullgraph=True, backend="aot_eager")(BAG_IDS, BAG_OFFSETS)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((loss, model.bag.weight.detach(), *grads))
    for a, b in zip(*results):
        if a.is_sparse:
            assert torch.equal(a._indices(), b._indices())
            a, b = a._values(), b._values()
        assert torch.equal(a, b)
    if "max_norm" in kw:
        assert fast.bag.weight[BAG_IDS].norm(dim=1).max() <= 0.5 + 1e-6


def test_exported_bag_model_holds_fastembeds_op_and_runs():
    fast, ref = _bag_models(mode="sum", padding_idx=3)
    p = _table(9, 1, 4).reshape(9)
    exported = torch.export.export(fast, (BAG_IDS, BAG_OFFSETS, p))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(OPS.embedding_bag.default) == 1, targets
    assert not any("aten._embedding_bag" in str(t) or "aten.embedding_bag" in str(t) for t in targets), targets
    other_ids, other_p = torch.tensor([3, 0, 7, 7, 2, 9, 1, 3, 5]), _table(9, 1, 5).reshape(9)
    for args in ((BAG_IDS, BAG_OFFSETS, p), (other_ids, torch.tensor([0, 1, 5, 9]), other_p)):
        torch.testing.assert_close(exported.module()(*args), ref(*args), **BAG_CLOSE[torch.float32])
        assert torch.equal(exported.module()(*args), fast(*args))


def test_fused_bag_runs_eagerly_inside_a_compiled_model_and_export_refuses_it():
    from fastembed.torch.optim import FusedSGD
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        torch.manual_seed(2)
        bag = fet.EmbeddingBag(10, 5, mode="mean", fused=FusedSGD(lr=0.5))
        before = bag.weight.detach().clone()
        step = (lambda i, o: torch.tanh(bag(i, o)).sum())
        if compiled:
            step = torch.compile(step, backend="aot_eager")
        for _ in range(2):
            step(BAG_IDS, BAG_OFFSETS).backward()
        assert bag.weight.grad is None and not torch.equal(bag.weight, before)  # updated in backward
        results.append(bag.weight.detach().clone())
    assert torch.equal(*results)
    with pytest.raises(RuntimeError, match="cannot be exported"):
        torch.export.export(bag, (BAG_IDS, BAG_OFFSETS))


@pytest.mark.parametrize("padding_idx", [5, -6])
def test_compiled_functional_bag_refuses_a_bad_padding_idx_as_torch(padding_idx):
    """Out-of-range padding_idx while compiling: the RuntimeError F.embedding_bag raises eagerly (and
    fastembed's eager kernels), not the module constructor's AssertionError."""
    w, ids, offsets = torch.randn(5, 3), torch.tensor([1, 2, 4]), torch.tensor([0, 1])
    with pytest.raises(RuntimeError) as theirs:
        F.embedding_bag(ids, w, offsets, padding_idx=padding_idx)
    compiled = torch.compile(lambda i, w, o: fet.functional.embedding_bag(i, w, o, padding_idx=padding_idx),
                             backend="eager")
    with pytest.raises(RuntimeError, match="padding_idx must be within the number of embeddings") as ours:
        compiled(ids, w, offsets)
    assert not isinstance(ours.value, AssertionError) and str(theirs.value) in str(ours.value)
