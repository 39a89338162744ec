"""fastembed.torch modules with fused= : backward updates the table, state in buffers, saved by state_dict.

Oracles: torch's own nn.Embedding(sparse=True) + torch.optim (SGD bitwise: the fused SGD rounds once, as
torch's add_ does; Adagrad to float32 rounding), the numpy fused layer (the same rule on the same ids:
bitwise), and a float64 transcription of row-wise Adagrad written here.
"""
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastembed.torch")
import fastembed as fe  # noqa: E402
from fastembed import optim as fo  # noqa: E402

V, P, D = 11, 6, 7


def batches(seed, n=4, shape=(3, 5)):
    """Id batches with repeats (row 0 in every batch), and their upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, shape, generator=g)
        ids[0, 0] = ids[1, 1] = 0
        out.append((ids, torch.randn(shape + (D,), generator=g)))
    return out


def fused_and_torch(rule, torch_opt, padding_idx=None, seed=0):
    torch.manual_seed(seed)
    ours = ft.Embedding(V, D, padding_idx=padding_idx, fused=rule)
    theirs = torch.nn.Embedding(V, D, padding_idx=padding_idx, sparse=True)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
    return ours, theirs, torch_opt([theirs.weight])


def train(ours, theirs, opt, data):
    for ids, grad in data:
        ours(ids).backward(grad)
        opt.zero_grad()
        theirs(ids).backward(grad)
        opt.step()
    assert ours.weight.grad is None  # a fused layer stores no gradient


@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_fused_sgd_is_torch_sgd_bit_for_bit(padding_idx, ids_dtype):
    ours, theirs, opt = fused_and_torch(fo.FusedSGD(0.3, fma=True), lambda p: torch.optim.SGD(p, lr=0.3),
                                        padding_idx)
    data = [(ids.to(ids_dtype), g) for ids, g in batches(1)]
    train(ours, theirs, opt, data)
    assert torch.equal(ours.weight, theirs.weight)
    if padding_idx is not None:
        assert not ours.weight[padding_idx].any()


@pytest.mark.parametrize("hyper", [{}, {"lr": 0.5, "lr_decay": 0.1, "initial_accumulator_value": 0.2}])
def test_fused_adagrad_is_torch_adagrad_to_rounding(hyper):
    ours, theirs, opt = fused_and_torch(fo.FusedAdagrad(**hyper), lambda p: torch.optim.Adagrad(p, **hyper))
    train(ours, theirs, opt, batches(2))
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(ours.optim_sum, opt.state[theirs.weight]["sum"], rtol=2e-6, atol=0)
    assert int(ours.optim_step) == int(opt.state[theirs.weight]["step"]) == 4


@pytest.mark.parametrize("make", [lambda: fo.FusedSGD(0.2, fma=True), lambda: fo.FusedAdagrad(0.3),
                                  lambda: fo.FusedRowWiseAdagrad(0.3), lambda: fo.FusedSparseAdam(0.05)],
                         ids=["sgd", "adagrad", "rowwise", "sparseadam"])
def test_torch_fused_equals_the_numpy_fused_layer_bitwise(make):
    torch.manual_seed(0)
    ours = ft.Embedding(V, D, fused=make())
    layer = fe.Embedding.from_pretrained(ours.weight.detach().numpy().copy(), fused=make())
    for ids, grad in batches(3):
        ours(ids).backward(grad)
        layer(ids.numpy())
        layer.backward(grad.numpy())
    assert np.array_equal(ours.weight.detach().numpy(), layer.weight)
    for key, value in layer.state.items():
        assert np.array_equal(getattr(ours, "optim_" + key).numpy(), value), key


def test_rowwise_adagrad_against_a_float64_transcription():
    torch.manual_seed(0)
    ours = ft.Embedding(V, D, fused=fo.FusedRowWiseAdagrad(lr=0.4, eps=1e-3))
    w = ours.weight.detach().double().numpy().copy()
    s = np.zeros(V)
    for ids, grad in batches(4):
        ours(ids).backward(grad)
        rows = {}
        for i, r in enumerate(ids.reshape(-1).tolist()):
            rows[r] = rows.get(r, 0) + grad.reshape(-1, D)[i].double().numpy()
        for r, g in rows.items():
            s[r] += (g * g).mean()
            w[r] -= 0.4 * g / (np.sqrt(s[r]) + 1e-3)
    np.testing.assert_allclose(ours.weight.detach().numpy(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.optim_sum.numpy(), s, rtol=1e-5)


def test_state_dict_saves_the_state_and_training_resumes_identically():
    rule = fo.FusedAdagrad(0.3)
    torch.manual_seed(0)
    a = ft.Embedding(V, D, fused=rule)
    data = batches(5, n=6)
    for ids, grad in data[:3]:
        a(ids).backward(grad)
    assert set(a.state_dict()) == {"weight", "optim_sum", "optim_step"}
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = ft.Embedding(V, D, fused=fo.FusedAdagrad(0.3))
    b.load_state_dict(torch.load(buffer))
    for ids, grad in data[3:]:
        a(ids).backward(grad)
        b(ids).backward(grad)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.optim_sum, b.optim_sum)
    assert int(b.optim_step) == 6


def test_token_position_fused_updates_both_tables_as_two_torch_embeddings():
    torch.manual_seed(0)
    ours = ft.TokenPositionEmbedding(V, P, D, fused=fo.FusedSGD(0.1, fma=True))
    tok = torch.nn.Embedding(V, D, sparse=True)
    pos = torch.nn.Embedding(P, D, sparse=True)
    with torch.no_grad():
        tok.weight.copy_(ours.token.weight)
        pos.weight.copy_(ours.position.weight)
    opt = torch.optim.SGD([tok.weight, pos.weight], lr=0.1)
    positions = torch.arange(P).expand(3, P)  # one lookup per token, as the fused layer makes
    for ids, grad in batches(6, shape=(3, P)):
        h = ours(ids)
        assert torch.equal(h, tok(ids) + pos(positions))
        h.backward(grad)
        opt.zero_grad()
        (tok(ids) + pos(positions)).backward(grad)
        opt.step()
    assert torch.equal(ours.token.weight, tok.weight) and torch.equal(ours.position.weight, pos.weight)
    assert ours.token.weight.grad is None and ours.position.weight.grad is None


def test_token_position_checks_both_updates_before_moving_either():
    """A broken position state: the token table (updated first) must not move."""
    torch.manual_seed(0)
    ours = ft.TokenPositionEmbedding(V, P, D, fused=fo.FusedAdagrad(0.1))
    before = ours.token.weight.detach().clone(), ours.token.optim_sum.clone()
    ours.position.optim_sum = torch.zeros(P + 1, D)  # the wrong shape for the position table
    h = ours(torch.tensor([[1, 2, 1]]))
    with pytest.raises(ValueError):
        h.sum().backward()
    assert torch.equal(ours.token.weight, before[0]) and torch.equal(ours.token.optim_sum, before[1])
    assert int(ours.token.optim_step) == 0


def test_a_frozen_fused_table_does_not_move():
    torch.manual_seed(0)
    ours = ft.Embedding(V, D, fused=fo.FusedSGD(1.0), _freeze=True)
    before = ours.weight.detach().clone()
    out = ours(torch.tensor([1, 2]))
    assert not out.requires_grad
    assert torch.equal(ours.weight, before)


def test_a_fused_that_is_not_a_rule_is_a_type_error():
    with pytest.raises(TypeError, match="fused rule"):
        ft.Embedding(V, D, fused=torch.optim.SGD)
    with pytest.raises(TypeError, match="fused rule"):
        ft.TokenPositionEmbedding(V, P, D, fused="adagrad")


def test_fused_and_sparse_together_is_refused():
    with pytest.raises(ValueError, match="fused"):
        ft.Embedding(V, D, sparse=True, fused=fo.FusedSGD(0.1))
    with pytest.raises(ValueError, match="fused"):
        ft.TokenPositionEmbedding(V, P, D, sparse=True, fused=fo.FusedSGD(0.1))


def test_the_learning_rate_set_on_the_rule_is_used_from_the_next_backward():
    torch.manual_seed(0)
    ours = ft.Embedding(V, D, fused=fo.FusedSGD(0.5, fma=True))
    w0 = ours.weight.detach().clone()
    ours.fused.lr = 0.0
    ours(torch.tensor([4])).sum().backward()
    assert torch.equal(ours.weight, w0)
    ours.fused.lr = 0.25
    ours(torch.tensor([4])).sum().backward()
    expected = w0[4].clone()
    expected.add_(torch.ones(D), alpha=-0.25)
    assert torch.equal(ours.weight[4], expected)
    with pytest.raises(ValueError, match="lr"):
        ours.fused.lr = -1.0


def test_repr_names_the_rule():
    assert "fused=FusedAdagrad(" in repr(ft.Embedding(V, D, fused=fo.FusedAdagrad(0.1)))


# ---------------------------------------------------------------- fastembed.torch.optim's fused rules (torch's flavour)

from fastembed.torch import optim as fto  # noqa: E402


def test_torch_fused_sgd_rounds_as_torch_by_default():
    ours, theirs, opt = fused_and_torch(fto.FusedSGD(lr=0.3), lambda p: torch.optim.SGD(p, lr=0.3))
    train(ours, theirs, opt, batches(7))
    assert torch.equal(ours.weight, theirs.weight)


@pytest.mark.parametrize("hyper", [{}, {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3}])
def test_torch_fused_sparse_adam_is_torch_sparse_adam_to_rounding(hyper):
    """Default eps 1e-8 and small gradients (v near eps^2): where eps enters matters, and the rule
    must put it where torch does (before the bias correction)."""
    ours, theirs, opt = fused_and_torch(fto.FusedSparseAdam(**hyper), lambda p: torch.optim.SparseAdam(p, **hyper))
    data = [(ids, g * 1e-7) for ids, g in batches(8, n=5)]
    train(ours, theirs, opt, data)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-6)
    state = opt.state[theirs.weight]
    torch.testing.assert_close(ours.optim_exp_avg, state["exp_avg"], rtol=1e-5, atol=0)
    # torch moves v by (g^2 - v) * (1 - b2), which cancels where g^2 is near v; the kernel's
    # b2 * v + (1 - b2) * g^2 does not: a few float32 ulps apart after 5 steps
    torch.testing.assert_close(ours.optim_exp_avg_sq, state["exp_avg_sq"], rtol=1e-4, atol=0)
    assert int(ours.optim_step) == int(state["step"]) == 5


def test_torch_fused_rules_defaults_are_torchs():
    import inspect

    def defaults(cls):
        return {k: v.default for k, v in inspect.signature(cls).parameters.items()
                if v.default is not inspect.Parameter.empty}

    assert defaults(fto.FusedSparseAdam) == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
    assert defaults(torch.optim.SparseAdam) == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "maximize": False}
    adagrad = defaults(torch.optim.Adagrad)
    assert {k: adagrad[k] for k in defaults(fto.FusedAdagrad)} == defaults(fto.FusedAdagrad)
    assert fto.FusedSGD(0.1).fma and defaults(fto.FusedSGD)["lr"] == defaults(torch.optim.SGD)["lr"]


# ---------------------------------------------------------------- the in-place update is visible to autograd

def _fused_modules():
    torch.manual_seed(5)
    return {
        "Embedding": (ft.Embedding(V, D, fused=fto.FusedSGD(lr=0.5)), lambda m, ids: m(ids), lambda m: [m.weight]),
        "EmbeddingBag": (ft.EmbeddingBag(V, D, mode="sum", fused=fto.FusedSGD(lr=0.5)), lambda m, ids: m(ids),
                         lambda m: [m.weight]),
        "TokenPositionEmbedding": (ft.TokenPositionEmbedding(V, P, D, fused=fto.FusedSGD(lr=0.5)),
                                   lambda m, ids: m(ids), lambda m: [m.token.weight, m.position.weight]),
    }


@pytest.mark.parametrize("name", ["Embedding", "EmbeddingBag", "TokenPositionEmbedding"])
def test_a_node_that_saved_a_fused_table_refuses_after_the_update(name):
    # An L2 penalty built before the lookup runs its backward after the lookup's, which moves the rows:
    # it must refuse (torch's in-place check), not give 2 * (the updated table) as its gradient.
    module, lookup, tables = _fused_modules()[name]
    ids = torch.tensor([[1, 4, 4], [0, 2, 9]])
    penalty = sum((w ** 2).sum() for w in tables(module))
    loss = lookup(module, ids).sum() + penalty
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("name", ["Embedding", "EmbeddingBag", "TokenPositionEmbedding"])
def test_a_penalty_built_after_the_lookup_reads_the_table_before_the_update(name):
    # built after: its backward runs first, on the rows as they were; then the fused update moves them
    module, lookup, tables = _fused_modules()[name]
    ids = torch.tensor([[1, 4, 4], [0, 2, 9]])
    before = [w.detach().clone() for w in tables(module)]
    out = lookup(module, ids)
    loss = out.sum() + sum((w ** 2).sum() for w in tables(module))
    loss.backward()
    for w, w0 in zip(tables(module), before):
        assert torch.equal(w.grad, 2 * w0)  # the penalty's gradient only: the lookup's went into the update
        assert not torch.equal(w.detach(), w0)  # and the update happened
