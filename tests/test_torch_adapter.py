"""fastembed.torch against torch.nn.Embedding: outputs, dense and sparse gradients, padding, errors."""
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastembed.torch")

V, P, D = 13, 7, 5


def pair(num=V, dim=D, seed=0, **kwargs):
    """A fastembed Embedding and a torch.nn.Embedding with the same weights."""
    torch.manual_seed(seed)
    ours = ft.Embedding(num, dim, **kwargs)
    theirs = torch.nn.Embedding(num, dim, **kwargs)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
    return ours, theirs


def dense(grad):
    return grad.to_dense() if grad.is_sparse else grad


ID_CASES = [
    torch.tensor([3, 1, 3, 0, 12]),
    torch.tensor([[3, 1, 3], [0, 12, 3]]),
    torch.tensor(4),
    torch.tensor([], dtype=torch.int64),
    torch.tensor([[2, 2, 2, 2]]),
    torch.tensor([[1, 2, 3], [4, 5, 6]]).t(),  # not contiguous
]


# ---------------------------------------------------------------- Embedding vs torch.nn.Embedding

@pytest.mark.parametrize("ids", ID_CASES, ids=lambda t: f"shape{tuple(t.shape)}")
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("sparse", [False, True])
def test_embedding_matches_torch(ids, dtype, sparse):
    ours, theirs = pair(sparse=sparse)
    ids = ids.to(dtype)
    out, expected = ours(ids), theirs(ids)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert torch.equal(out, expected)
    grad = torch.randn(out.shape)
    out.backward(grad)
    expected.backward(grad)
    assert ours.weight.grad.is_sparse == sparse
    torch.testing.assert_close(dense(ours.weight.grad), dense(theirs.weight.grad), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("padding_idx", [None, 4])
def test_sparse_gradient_has_torchs_layout(dtype, padding_idx):
    """One entry per lookup, in the order of the ids, uncoalesced, int64 indices, the padding entries
    left out: the very tensor nn.Embedding(sparse=True) gives, so code reading _indices() keeps working."""
    ours, theirs = pair(sparse=True, padding_idx=padding_idx)
    ids = torch.tensor([[9, 1, 9], [4, 1, 1]], dtype=dtype)
    grad_out = torch.randn(2, 3, D)
    (grad,) = torch.autograd.grad(ours(ids), ours.weight, grad_out)
    (expected,) = torch.autograd.grad(theirs(ids), theirs.weight, grad_out)
    assert grad.is_sparse and not grad.is_coalesced() and not expected.is_coalesced()
    assert grad._indices().dtype == torch.int64
    assert torch.equal(grad._indices(), expected._indices())
    assert torch.equal(grad._values(), expected._values())
    kept = [i for i in ids.flatten().tolist() if i != padding_idx]
    assert grad._indices().tolist() == [kept]  # an oracle of its own, not only torch's word
    ours(ids).sum().backward()  # through torch's AccumulateGrad, over two calls
    ours(torch.tensor([0, 9])).sum().backward()
    assert ours.weight.grad.coalesce()._indices().tolist() == [sorted(set(kept) | {0, 9})]
    torch.testing.assert_close(dense(ours.weight.grad)[9], torch.full((D,), 3.0))


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("padding_idx", [2, -1])
def test_padding_idx_rows_get_no_gradient(sparse, padding_idx):
    ours, theirs = pair(padding_idx=padding_idx, sparse=sparse)
    pad = padding_idx % V
    assert ours.padding_idx == theirs.padding_idx == pad
    assert not ours.weight[pad].any()  # initialised to zero, as torch does
    ids = torch.tensor([[pad, 1, pad], [3, pad, 1]])
    out = ours(ids)
    assert torch.equal(out, theirs(ids))
    grad = torch.randn(out.shape)
    out.backward(grad)
    theirs(ids).backward(grad)
    ours_grad = dense(ours.weight.grad)
    assert not ours_grad[pad].any()
    torch.testing.assert_close(ours_grad, dense(theirs.weight.grad), rtol=1e-6, atol=1e-7)
    if sparse:
        assert pad not in ours.weight.grad.coalesce()._indices().tolist()[0]


def test_padding_idx_out_of_range():
    """torch's error, type and words (a drop-in: code may catch it); the rest of torch's options are
    tested against torch in test_torch_embedding_dropin.py."""
    for bad in (V, -V - 1):
        with pytest.raises(AssertionError, match="Padding_idx must be within num_embeddings"):
            ft.Embedding(V, D, padding_idx=bad)
        with pytest.raises(AssertionError, match="Padding_idx must be within num_embeddings"):
            torch.nn.Embedding(V, D, padding_idx=bad)


def test_gradcheck_dense():
    """torch's numerical Jacobian against ours; float32 (our tables' only dtype): the op is linear,
    so central differences are exact up to rounding and a loose tolerance is enough."""
    weight = torch.randn(6, 3, requires_grad=True)
    ids = torch.tensor([[1, 2, 2], [0, 5, 1]])
    with pytest.warns(UserWarning):  # gradcheck warns about float32 inputs
        assert torch.autograd.gradcheck(lambda w: ft._EmbeddingFunction.apply(w, ids, w.detach().numpy(), None, False, None), (weight,),
                                        eps=1e-2, atol=1e-3, rtol=1e-3)
    # with padding_idx the Jacobian column of the padding row is zero by design (as torch's), so gradcheck
    # cannot hold there; instead, vector-Jacobian products against torch, with one-hot upstream gradients:
    theirs = torch.nn.Embedding.from_pretrained(weight.detach(), freeze=False, padding_idx=2)
    ours = ft.Embedding.from_pretrained(weight.detach().clone(), freeze=False, padding_idx=2)
    for k in range(ids.numel() * 3):
        upstream = torch.zeros(2, 3, 3).view(-1).index_fill_(0, torch.tensor(k), 1.0).view(2, 3, 3)
        (a,) = torch.autograd.grad(ours(ids), ours.weight, upstream)
        (b,) = torch.autograd.grad(theirs(ids), theirs.weight, upstream)
        assert torch.equal(a, b)


def test_double_backward_is_torchs():
    """backward(create_graph=True) gives a differentiable gradient, as torch's embedding does (it was
    refused before the custom ops; tests/test_torch_compile.py checks it with padding and both modules)."""
    ours, theirs = pair()
    grads = []
    for module in (ours, theirs):
        (grad,) = torch.autograd.grad(module(torch.tensor([1, 2, 1])).pow(2).sum(), module.weight, create_graph=True)
        grad.pow(2).sum().backward()
        grads.append(module.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_frozen_weight_gets_no_gradient():
    weight = torch.randn(V, D)
    ours = ft.Embedding.from_pretrained(weight)
    assert not ours.weight.requires_grad
    out = ours(torch.tensor([1, 2]))
    assert not out.requires_grad and torch.equal(out, weight[[1, 2]])


def test_from_pretrained_shares_memory_like_torch():
    weight = torch.randn(V, D)
    ours = ft.Embedding.from_pretrained(weight, freeze=False, padding_idx=3)
    assert ours.weight.data_ptr() == weight.data_ptr() and ours.weight.requires_grad
    assert ours.weight[3].any()  # from_pretrained does not zero the padding row (nor does torch)
    weight[5] = 7.0
    assert torch.equal(ours(torch.tensor([5])), torch.full((1, D), 7.0))


def test_forward_reads_the_parameter_without_a_copy():
    ours, _ = pair()
    table = ft._table(ours.weight, "weight")
    assert table.ctypes.data == ours.weight.data_ptr()
    with torch.no_grad():
        ours.weight[4] = 2.5
    assert torch.equal(ours(torch.tensor([4])), torch.full((1, D), 2.5))


def test_state_dict_is_interchangeable_with_torch():
    ours, theirs = pair()
    torch.nn.init.normal_(theirs.weight)
    ours.load_state_dict(theirs.state_dict())
    ids = torch.tensor([0, 5, 12])
    assert torch.equal(ours(ids), theirs(ids))
    assert repr(ours) == "Embedding(13, 5)"


def test_training_steps_match_torch():
    ours, theirs = pair(seed=3)
    opts = [torch.optim.Adam(m.parameters(), lr=0.01, betas=(0.85, 0.99), eps=1e-8) for m in (ours, theirs)]
    rng = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(0, V, (4, 6), generator=rng)
        target = torch.randn(4, 6, D, generator=rng)
        for module, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            ((module(ids) - target) ** 2).mean().backward()
            opt.step()
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("bad", [V, -1, 2**40])
def test_an_id_out_of_range_names_itself_and_the_row_count(sparse, bad):
    """The same error from the dense lookup (fastembed's kernel) and the sparse one (torch's
    F.embedding, whose own message says only 'index out of range in self')."""
    ours, _ = pair(sparse=sparse)
    with pytest.raises(IndexError, match=rf"ids\[1\] = {bad} is out of range for table with {V} rows"):
        ours(torch.tensor([1, bad, 2]))
    assert ours.weight.grad is None


@pytest.mark.parametrize("sparse", [False, True])
def test_bad_inputs_raise_clear_errors(sparse):
    ours, _ = pair(sparse=sparse)
    # ids torch refuses are refused with torch's own error (code written for torch may catch it)
    with pytest.raises(RuntimeError, match="Long, Int"):
        ours(torch.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="Long, Int"):
        ours(torch.tensor([1, 2], dtype=torch.int16))
    with pytest.raises(TypeError, match="must be Tensor, not list"):
        ours([1, 2])
    with pytest.raises(IndexError, match="out of range"):
        ours(torch.tensor([1, V]))
    with pytest.raises(IndexError):
        ours(torch.tensor([-1]))
    # a float64 or strided table is torch's own lookup now (a drop-in gives torch's result)
    for table in (torch.randn(V, D, dtype=torch.float64), torch.randn(D, V).t()):
        assert torch.equal(ft.Embedding.from_pretrained(table)(torch.tensor([1, 3])), table[[1, 3]])
    # fused= is fastembed's own option: it needs a table the kernels take, and says so
    from fastembed.torch import optim as fo
    with pytest.raises(TypeError, match=r"float32, float64, float16 or bfloat16 .*got weight.dtype=torch.int32"):
        ft.Embedding.from_pretrained(torch.zeros(V, D, dtype=torch.int32), fused=fo.FusedSGD(0.1))
    with pytest.raises(ValueError, match="contiguous"):
        ft.Embedding.from_pretrained(torch.randn(D, V).t(), fused=fo.FusedSGD(0.1))


# ---------------------------------------------------------------- TokenPositionEmbedding

def tp_pair(sparse=False, seed=0):
    torch.manual_seed(seed)
    ours = ft.TokenPositionEmbedding(V, P, D, sparse=sparse)
    tok = torch.nn.Embedding.from_pretrained(ours.token.weight.detach().clone(), freeze=False, sparse=sparse)
    pos = torch.nn.Embedding.from_pretrained(ours.position.weight.detach().clone(), freeze=False, sparse=sparse)
    return ours, tok, pos


def torch_positions(ids, positions):
    T = ids.shape[-1] if ids.dim() else 1
    if positions is None or isinstance(positions, int):
        return (positions or 0) + torch.arange(T).expand(ids.shape)
    return positions.expand(ids.shape)


@pytest.mark.parametrize("ids, positions", [
    (torch.tensor([3, 1, 3, 0]), None),
    (torch.tensor([[3, 1, 3], [0, 12, 3]]), None),
    (torch.tensor([[3, 1], [0, 12]]), 5),
    (torch.tensor([[3, 1, 3], [0, 12, 3]]), torch.tensor([[6, 0, 6], [1, 1, 1]])),
    (torch.tensor([[3, 1, 3], [0, 12, 3]]), torch.tensor([4, 2, 0], dtype=torch.int32)),  # broadcast
    (torch.tensor([], dtype=torch.int64), None),
])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("sparse", [False, True])
def test_token_position_matches_two_torch_embeddings(ids, positions, dtype, sparse):
    ours, tok, pos = tp_pair(sparse=sparse)
    ids = ids.to(dtype)
    hidden = ours(ids, positions)
    expected = tok(ids) + pos(torch_positions(ids, positions))
    assert hidden.shape == ids.shape + (D,)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)
    grad = torch.randn(hidden.shape)
    hidden.backward(grad)
    expected.backward(grad)
    for mine, theirs in ((ours.token, tok), (ours.position, pos)):
        assert mine.weight.grad.is_sparse == sparse
        torch.testing.assert_close(dense(mine.weight.grad), dense(theirs.weight.grad), rtol=1e-6, atol=1e-7)


def test_token_position_gradcheck_dense():
    token = torch.randn(6, 3, requires_grad=True)
    position = torch.randn(4, 3, requires_grad=True)
    ids = torch.tensor([[1, 2, 2], [0, 5, 1]])
    for positions in (None, 1, torch.tensor([[3, 3, 0], [1, 2, 3]])):
        with pytest.warns(UserWarning):
            assert torch.autograd.gradcheck(
                lambda a, b: ft._TokenPositionFunction.apply(
                    a, b, ids, positions, (a.detach().numpy(), b.detach().numpy()), False, None), (token, position),
                eps=1e-2, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("frozen", ["token", "position"])
def test_a_frozen_table_gets_no_gradient(sparse, frozen):
    ours, tok, pos = tp_pair(sparse=sparse)
    getattr(ours, frozen).weight.requires_grad_(False)
    trained = ours.position if frozen == "token" else ours.token
    reference = pos if frozen == "token" else tok
    ids = torch.tensor([[3, 1, 3], [0, 12, 3]])
    ours(ids).pow(2).sum().backward()
    (tok(ids) + pos(torch_positions(ids, None))).pow(2).sum().backward()
    assert getattr(ours, frozen).weight.grad is None
    torch.testing.assert_close(dense(trained.weight.grad), dense(reference.weight.grad), rtol=1e-6, atol=1e-7)


def test_token_position_sparse_gradients_have_torchs_layout():
    ours, _, _ = tp_pair(sparse=True)
    grad_out = torch.randn(2, 3, D)
    ours(torch.tensor([[5, 5, 1], [1, 0, 5]])).backward(grad_out)
    assert ours.token.weight.grad._indices().tolist() == [[5, 5, 1, 1, 0, 5]]
    assert ours.position.weight.grad._indices().tolist() == [[0, 1, 2, 0, 1, 2]]
    for grad in (ours.token.weight.grad, ours.position.weight.grad):
        assert not grad.is_coalesced()
        assert torch.equal(grad._values(), grad_out.reshape(6, D))


def test_token_position_init_from_pretrained_and_errors():
    torch.manual_seed(0)
    layer = ft.TokenPositionEmbedding(V, P, D)
    assert 0.04 < layer.token.weight.std().item() < 0.16  # the book's init, std 0.08
    assert sorted(k for k, _ in layer.named_parameters()) == ["position.weight", "token.weight"]
    tok, pos = torch.randn(V, D), torch.randn(P, D)
    frozen = ft.TokenPositionEmbedding.from_pretrained(tok, pos)
    assert torch.equal(frozen(torch.tensor([2, 3])), tok[[2, 3]] + pos[[0, 1]])
    with pytest.raises(ValueError, match="same dim"):
        ft.TokenPositionEmbedding.from_pretrained(tok, torch.randn(P, D + 1))
    with pytest.raises(IndexError, match="positions"):
        layer(torch.tensor([1] * (P + 1)))
    with pytest.raises(IndexError, match="positions"):
        layer(torch.tensor([1, 2]), P - 1)
    with pytest.raises(TypeError, match="positions"):
        layer(torch.tensor([1, 2]), 1.5)
    with pytest.raises(NotImplementedError, match="int64"):
        ft.TokenPositionEmbedding(V, P, D, dtype=torch.int64)
    with pytest.raises(TypeError, match="one dtype"):
        ft.TokenPositionEmbedding.from_pretrained(tok.double(), pos.half())
    with pytest.raises(NotImplementedError, match="CPU"):
        ft.TokenPositionEmbedding(V, P, D, device="meta")


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_token_position_tables_of_each_dtype_match_two_torch_embeddings(dtype, sparse):
    # the oracle: torch's own lookups and add (sum in float32, one rounding for float16), and torch's
    # dense backward (float16 rounds after each add, as the kernels do, in the same order)
    torch.manual_seed(3)
    ours = ft.TokenPositionEmbedding(V, P, D, sparse=sparse, dtype=dtype)
    assert ours.token.weight.dtype == ours.position.weight.dtype == dtype
    tok = torch.nn.Embedding.from_pretrained(ours.token.weight.detach().clone(), freeze=False, sparse=sparse)
    pos = torch.nn.Embedding.from_pretrained(ours.position.weight.detach().clone(), freeze=False, sparse=sparse)
    ids = torch.tensor([[3, 3, 12, 0, 3], [5, 3, 0, 0, 11]])
    grad_out = torch.randn(2, 5, D).to(dtype)
    hidden = ours(ids)
    expected = tok(ids) + pos(torch.arange(5).expand(2, 5))
    assert hidden.dtype == dtype and torch.equal(hidden, expected)
    hidden.backward(grad_out)
    expected.backward(grad_out)
    for got, want in ((ours.token.weight.grad, tok.weight.grad), (ours.position.weight.grad, pos.weight.grad)):
        assert got.dtype == dtype and got.is_sparse == sparse
        if sparse:
            got, want = got.coalesce().to_dense(), want.coalesce().to_dense()
        assert torch.equal(got, want)


def test_sparse_token_position_backward_of_one_sentence_warns_nothing():
    # 1-D ids: the positions are arange(T); torch.from_numpy of a read-only array would warn "not writable"
    layer = ft.TokenPositionEmbedding(V, P, D, sparse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.tensor([4, 1, 4])).sum().backward()
    assert layer.position.weight.grad._indices().tolist() == [[0, 1, 2]]
    assert layer.token.weight.grad._indices().tolist() == [[4, 1, 4]]
    # positions given as a tensor: the gradient's indices are a copy of them, not the caller's memory
    layer.zero_grad()
    positions = torch.tensor([[2, 0, 1], [1, 1, 0]])  # int64 of ids.shape: the kernels could take it as it is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.tensor([[4, 1, 4], [0, 0, 0]]), positions).sum().backward()
    positions.fill_(6)
    assert layer.position.weight.grad._indices().tolist() == [[2, 0, 1, 1, 1, 0]]


# ---------------------------------------------------------------- torch stays optional

def test_import_fastembed_does_not_import_torch():
    code = "import sys, fastembed; fastembed.TokenPositionEmbedding(5, 4, 3); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_and_eager_use_do_not_load_the_compiler():
    # torch._dynamo costs seconds of CPU per process (every rank of a sharded table pays it); fastembed.torch
    # needs it only once torch compiles. An eager step through every module must not load it either.
    code = (
        "import sys, torch, fastembed.torch as fet, fastembed.torch.distributed\n"
        "assert 'torch._dynamo' not in sys.modules, 'at import'\n"
        "ids = torch.tensor([[1, 2, 1]])\n"
        "fet.Embedding(5, 3, sparse=True)(ids).sum().backward()\n"
        "fet.TokenPositionEmbedding(5, 4, 3)(ids).sum().backward()\n"
        "fet.EmbeddingBag(5, 3, mode='max')(ids).sum().backward()\n"
        "assert 'torch._dynamo' not in sys.modules, 'after an eager step'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_torch_the_error_says_how_to_install_it():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as if torch were not installed\n"
        "import fastembed\n"
        "try:\n"
        "    import fastembed.torch\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install torch" in result.stdout


@pytest.mark.parametrize("how", ["data", "set_", "transposed"])
def test_a_replaced_weight_is_read_not_the_old_one(how):
    """The module keeps a numpy view of its weight between calls; replacing the weight's memory (as
    optimizers, loaders and users do with .data or set_) must be seen by the next call."""
    ours, theirs = pair()
    ids = torch.tensor([[0, 3], [12, 3]])
    ours(ids)  # the view is made
    new = torch.randn(V, D) if how != "transposed" else torch.randn(D, V).t()
    with torch.no_grad():
        if how == "data":
            ours.weight.data = new
        elif how == "set_":
            ours.weight.set_(new)
        else:
            ours.weight.data = new  # same shape, not contiguous: torch's lookup then, never misread
    assert torch.equal(ours(ids), torch.nn.functional.embedding(ids, new))


@pytest.mark.parametrize("sparse", [False, True])
def test_ids_changed_in_place_before_backward_is_an_error(sparse):
    ours, _ = pair(sparse=sparse)
    ids = torch.tensor([1, 2, 3])
    out = ours(ids)
    ids[0] = 7
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    assert ours.weight.grad is None
