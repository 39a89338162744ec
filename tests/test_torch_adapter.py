"""fastembed.torch against torch.nn.Embedding: outputs, dense and sparse gradients, padding, errors."""
import subprocess
import sys

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


def test_sparse_gradient_is_coalesced_and_marked():
    ours, _ = pair(sparse=True)
    ids = torch.tensor([[9, 1, 9], [4, 1, 1]])
    (grad,) = torch.autograd.grad(ours(ids).sum(), ours.weight)  # what the Function returns
    assert grad.is_sparse and grad.is_coalesced()
    assert grad._indices().tolist() == [[1, 4, 9]]
    assert grad._indices().dtype == torch.int64
    torch.testing.assert_close(grad._values(), torch.tensor([[3.0] * D, [1.0] * D, [2.0] * D]))
    ours(ids).sum().backward()  # what lands in .grad, through torch's AccumulateGrad
    assert ours.weight.grad.is_coalesced()
    ours(torch.tensor([0, 9])).sum().backward()  # accumulated over two backward calls
    assert ours.weight.grad.coalesce()._indices().tolist() == [[0, 1, 4, 9]]
    torch.testing.assert_close(dense(ours.weight.grad)[9], torch.full((D,), 3.0))


def test_copies_and_unpickled_modules_keep_coalesced_gradients():
    import copy
    import io

    ours, _ = pair(sparse=True)
    ours(torch.tensor([1, 2])).sum().backward()
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(ours), torch.load(buffer, weights_only=False)):
        clone.weight.grad = None
        clone(torch.tensor([4, 0, 4])).sum().backward()
        assert clone.weight.grad.is_coalesced()
        assert clone.weight.grad._indices().tolist() == [[0, 4]]
    for _ in range(3):
        ours(torch.tensor([3])).sum().backward()
    assert len(ours.weight._post_accumulate_grad_hooks) == 1  # registered once, not once per call


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
    with pytest.raises(ValueError, match="padding_idx"):
        ft.Embedding(V, D, padding_idx=V)
    with pytest.raises(ValueError, match="padding_idx"):
        ft.Embedding(V, D, padding_idx=-V - 1)


@pytest.mark.parametrize("kwargs", [{"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"dtype": torch.float64},
                                    {"device": "meta"}])
def test_unsupported_options_raise_not_implemented(kwargs):
    with pytest.raises(NotImplementedError):
        ft.Embedding(V, D, **kwargs)


def test_gradcheck_dense():
    """torch's numerical Jacobian against ours; float32 (our tables' only dtype): the op is linear,
    so central differences are exact up to rounding and a loose tolerance is enough."""
    weight = torch.randn(6, 3, requires_grad=True)
    ids = torch.tensor([[1, 2, 2], [0, 5, 1]])
    with pytest.warns(UserWarning):  # gradcheck warns about float32 inputs
        assert torch.autograd.gradcheck(lambda w: ft._EmbeddingFunction.apply(w, ids, None, False), (weight,),
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


def test_double_backward_is_refused_clearly():
    ours, _ = pair()
    (grad,) = torch.autograd.grad(ours(torch.tensor([1, 2])).pow(2).sum(), ours.weight, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiable"):
        grad.sum().backward()


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

def test_bad_inputs_raise_clear_errors():
    ours, _ = pair()
    with pytest.raises(TypeError, match="int32 or int64"):
        ours(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="int32 or int64"):
        ours(torch.tensor([1, 2], dtype=torch.int16))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ours([1, 2])
    with pytest.raises(IndexError, match="out of range"):
        ours(torch.tensor([1, V]))
    with pytest.raises(IndexError):
        ours(torch.tensor([-1]))
    with pytest.raises(TypeError, match="float32"):
        ft.Embedding.from_pretrained(torch.randn(V, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        ft.Embedding.from_pretrained(torch.randn(D, V).t())
    ours.weight = torch.nn.Parameter(torch.randn(D, V).t())  # made strided after construction
    with pytest.raises(ValueError, match="contiguous"):
        ours(torch.tensor([1]))


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
                lambda a, b: ft._TokenPositionFunction.apply(a, b, ids, positions, False), (token, position),
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


def test_token_position_sparse_gradients_are_coalesced():
    ours, _, _ = tp_pair(sparse=True)
    ours(torch.tensor([[5, 5, 1], [1, 0, 5]])).sum().backward()
    assert ours.token.weight.grad.is_coalesced() and ours.position.weight.grad.is_coalesced()
    assert ours.token.weight.grad._indices().tolist() == [[0, 1, 5]]
    assert ours.position.weight.grad._indices().tolist() == [[0, 1, 2]]


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
    with pytest.raises(NotImplementedError):
        ft.TokenPositionEmbedding(V, P, D, dtype=torch.float64)


# ---------------------------------------------------------------- torch stays optional

def test_import_fastembed_does_not_import_torch():
    code = "import sys, fastembed; fastembed.TokenPositionEmbedding(5, 4, 3); assert 'torch' not in sys.modules"
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
