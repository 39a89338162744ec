"""fastembed.torch.Embedding and fastembed.torch.functional.embedding as drop-ins for torch's.

Three parts:
  1. PyTorch's own CPU tests of nn.Embedding (test/nn/test_embedding.py, the Embedding entries of
     common_nn's module tests and of common_modules' ModuleInfo), rewritten here, each run twice:
     with torch.nn.Embedding / F.embedding and with fastembed's. Their assertions are torch's, so
     the swapped module passes exactly when it behaves as torch's does.
  2. Differential tests: the same calls on both, every option and dtype, compared result by result
     (forward values, dense and sparse gradients with their _indices()/_values(), the weight after
     max_norm, errors and their types), plus checks that float32 CPU lookups really run on the
     kernels (otherwise every comparison would pass by routing everything to torch).
  3. The renorm kernel (max_norm) against the pure-Python reference (bitwise) and numpy (float64),
     with hypothesis, and its bad inputs (its threaded path against one thread, for every dtype:
     tests/test_renorm_dtypes.py).
"""
import copy
import io
import math
import pickle

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from _helpers import FAST, FEW, Snapshot, assert_bitwise

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastembed.torch")
import fastembed as fe  # noqa: E402
import fastembed.torch.functional as ftf  # noqa: E402
from fastembed import ops, reference  # noqa: E402

F = torch.nn.functional
IMPLS = {"torch": (torch.nn.Embedding, F.embedding), "fastembed": (ft.Embedding, ftf.embedding)}
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# torch's own test tolerances per dtype (torch.testing's defaults)
TOL = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.float64: dict(rtol=1e-7, atol=1e-7),
       torch.float16: dict(rtol=1e-3, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}


@pytest.fixture(params=sorted(IMPLS))
def impl(request):
    """(Embedding class, embedding function): torch's, then fastembed's."""
    return IMPLS[request.param]


@pytest.fixture
def default_dtype():
    """Set torch's default dtype inside a test; restored whatever happens."""
    before = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(before)


def on_kernels(out):
    """Whether a lookup's output came from fastembed's autograd function (the kernel path)."""
    return out.grad_fn is not None and "_EmbeddingFunction" in type(out.grad_fn).__name__


def outcome(fn):
    """fn()'s value, or its exception's type (to compare a call on both implementations)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 (any error, compared by type)
        return type(exc)


# ================================================================ 1. torch's own tests, on both
# (test/nn/test_embedding.py, CPU cases; the EmbeddingBag ones are another module's)

def test_torch_sparse_basic(impl):
    Embedding, _ = impl
    embedding = Embedding(10, 20, sparse=True)
    embedding(torch.tensor([[0, 2, 4, 5], [4, 3, 0, 9]])).sum().backward()
    assert embedding.weight.grad.is_sparse
    assert embedding.weight.grad.shape == embedding.weight.shape


def test_torch_sparse_empty_tensor(impl):
    Embedding, _ = impl
    embedding = Embedding(0, 0, sparse=True)
    embedding(torch.tensor([], dtype=torch.int64)).sum().backward()
    assert embedding.weight.grad.is_sparse and embedding.weight.grad.shape == embedding.weight.shape
    embedding = Embedding(10, 0, sparse=True)
    embedding(torch.tensor([[0, 2, 4, 5], [4, 3, 0, 9]])).sum().backward()
    assert embedding.weight.grad.is_sparse and embedding.weight.grad.shape == embedding.weight.shape


def test_torch_move_sparse_half_embedding(impl):
    Embedding, _ = impl
    embedding = Embedding(10, 3, sparse=True)
    assert embedding.weight.device.type == "cpu"
    assert embedding.weight.dtype == torch.get_default_dtype()
    embedding.to(torch.float16)
    assert embedding.weight.dtype == torch.float16
    assert (embedding.embedding_dim, embedding.num_embeddings) == (3, 10)
    assert embedding(torch.tensor([1, 2])).dtype == torch.float16


def test_torch_max_norm(impl):
    Embedding, _ = impl
    embedding = Embedding(22, 5, max_norm=1.0)
    output = embedding(torch.tensor([2, 8, 8, 6]))
    assert torch.equal(output[1], output[2])
    assert output.data.norm(p=2, dim=1).le(1).all()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float,
                                   torch.double])
def test_torch_from_pretrained(impl, dtype):
    Embedding, _ = impl
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=dtype)
    embedding = Embedding.from_pretrained(a)
    assert torch.equal(a, embedding.weight.data)
    assert torch.equal(a, embedding(torch.LongTensor([0, 1])))


def test_torch_from_pretrained_padding_idx(impl):
    Embedding, _ = impl
    embeddings = torch.rand(4, 3, requires_grad=True)
    with torch.no_grad():
        embeddings[2] = torch.ones(3) * 7
    embedding = Embedding.from_pretrained(embeddings, padding_idx=2)
    assert torch.equal(embedding.weight[2], torch.ones(3) * 7)


def test_torch_from_pretrained_options(impl, default_dtype):
    Embedding, _ = impl
    default_dtype(torch.double)
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    embedding = Embedding.from_pretrained(a, max_norm=2.0, norm_type=0.5, scale_grad_by_freq=False, sparse=True)
    output = embedding(torch.LongTensor([0, 1]))
    assert torch.equal(a, output)  # the weight is a, renormalised in place
    assert a.ne(torch.arange(1, 7, dtype=a.dtype).view(2, 3)).all()
    assert output.data.norm(p=0.5, dim=1).le(2.0).all()


def test_torch_functional(impl):
    Embedding, embedding = impl
    a = torch.tensor([[1, 3, 2], [0, 2, 1]])
    embeddings = torch.rand(4, 3, requires_grad=True)
    module = Embedding(4, 3)
    module.weight.data = embeddings.data
    assert torch.equal(module.weight.data, embeddings.data)
    assert torch.equal(module(a), embedding(a, embeddings))
    module = Embedding(4, 3).from_pretrained(embeddings, padding_idx=2)
    assert torch.equal(module(a), embedding(a, embeddings, padding_idx=2))


def test_torch_dense_grad(impl, default_dtype):
    _, embedding = impl
    default_dtype(torch.double)
    weight = torch.nn.Embedding(20, 20).weight
    inp = torch.tensor([[0, 1, 1, 2], [3, 5, 7, 11]])
    assert torch.autograd.gradcheck(lambda w: embedding(inp, w), (weight,))
    assert torch.autograd.gradgradcheck(lambda w: embedding(inp, w), (weight,))


def test_torch_scalar_weight_error(impl):
    _, embedding = impl
    indices = torch.rand(2, 2).long()
    for weight in (torch.tensor(1.0), torch.tensor(1.0).reshape(1, 1, 1)):
        with pytest.raises(RuntimeError, match="'weight' must be 2-D"):
            embedding(indices, weight)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # torch's CPU case is float64
def test_torch_backward_sparse_layout(impl, dtype):
    Embedding, _ = impl
    embedding = Embedding(10, 3, sparse=True).to(dtype=dtype)
    tensor = torch.tensor([[7, 1, 3]])
    ones = torch.tensor(1.0, dtype=dtype).expand(3, 3)
    tensor_twice, ones_twice = tensor.repeat(1, 2), torch.cat((ones, ones))
    embedding.zero_grad()
    embedding(tensor[0]).sum().backward()
    assert torch.equal(embedding.weight.grad._indices(), tensor)
    assert torch.equal(embedding.weight.grad._values(), ones)
    embedding.zero_grad()
    embedding(tensor[0]).sum().backward()
    embedding(tensor[0]).sum().backward()
    assert torch.equal(embedding.weight.grad._indices(), tensor_twice)
    assert torch.equal(embedding.weight.grad._values(), ones_twice)
    embedding.zero_grad()
    embedding(tensor[0]).sum().backward()
    tensor[0, 0] = 8
    embedding(tensor[0]).sum().backward()
    tensor_twice[0, 3] = 8
    assert torch.equal(embedding.weight.grad._indices(), tensor_twice)
    assert torch.equal(embedding.weight.grad._values(), ones_twice)


def test_torch_max_norm_backward(impl):
    _, embedding = impl
    weight = (torch.randn(4, 4) * 2).requires_grad_()
    embedding(torch.tensor([0, 1, 2, 2]), weight, max_norm=1.0).sum().backward()
    expected = torch.tensor([[1.0, 1.0, 2.0, 0.0]]).transpose(0, 1).expand(4, 4)
    assert torch.equal(weight.grad, expected)


def test_torch_max_norm_forward_ad(impl):
    _, embedding = impl
    weight = torch.randn(4, 4) * 2
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(weight, torch.ones(4, 4))
        out = embedding(torch.tensor([[0, 1], [2, 2]]), dual, max_norm=1.0)
        tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
    assert torch.equal(tangent, torch.ones(2, 2, 4))


def test_torch_padding_idx(impl):
    Embedding, _ = impl
    for sparse in (False, True):
        embedding = Embedding(10, 20, padding_idx=0, sparse=sparse)
        output = embedding(torch.tensor([[0, 2, 4, 5], [4, 3, 0, 9]]))
        assert output[0][0].sum() == 0 and output[1][2].sum() == 0
        embedding = Embedding(10, 20, padding_idx=-2, sparse=sparse)  # row 8
        output = embedding(torch.tensor([[0, 2, 8, 5], [4, 8, 0, 9]]))
        assert output[0][2].sum() == 0 and output[1][1].sum() == 0
    embedding = Embedding(10, 20, padding_idx=2, sparse=True)
    with torch.no_grad():
        embedding.weight[2] = torch.ones(20)
    assert torch.equal(embedding(torch.tensor([0, 2]))[1], torch.ones(20))
    for bad in (25, -25):
        with pytest.raises(AssertionError):
            Embedding(num_embeddings=10, embedding_dim=20, padding_idx=bad)
    embedding = Embedding(5, 2, padding_idx=0)
    for n in (1, 2, 1000):  # torch: large n reaches its other code paths
        for other in ([], [1, 3], [2]):
            indices = torch.tensor(other + [0] * n)
            pre = embedding.weight[0].clone()
            embedding(indices).sum().backward()
            assert torch.equal((embedding.weight + embedding.weight.grad)[0], pre)
            embedding.zero_grad()
            emb_sum = embedding(indices).sum()
            (grad,) = torch.autograd.grad(emb_sum, list(embedding.parameters()), retain_graph=True)
            (grad.sum() + emb_sum).backward()
            assert torch.equal((embedding.weight + embedding.weight.grad)[0], pre)
            embedding.zero_grad()


# common_nn's module tests: 'Embedding', 'Embedding' discontiguous (both with default dtype double)
# and 'Embedding_sparse'; the harness checks the Jacobian against finite differences

@pytest.mark.parametrize("make_ids", [lambda: torch.empty(2, 3, dtype=torch.long).random_(4),
                                      lambda: torch.empty(1, 512, dtype=torch.long).random_(4).expand(7, 512)],
                         ids=["plain", "discontiguous"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # torch's is float64; float32 is the kernels'
def test_common_nn_module(impl, default_dtype, make_ids, dtype):
    Embedding, _ = impl
    default_dtype(dtype)
    module = Embedding(4, 3)
    ids = make_ids()
    out = module(ids)
    assert torch.equal(out, module.weight[ids])
    upstream = torch.randn(out.shape)
    out.backward(upstream)
    flat_ids, terms = ids.reshape(-1), upstream.double().reshape(-1, 3)
    expected = torch.zeros(4, 3, dtype=torch.float64).index_add_(0, flat_ids, terms)
    # a sum of n rounded terms is within n * eps * sum |terms| of the exact one (plus its own rounding)
    eps = torch.finfo(dtype).eps / 2
    bound = ids.numel() * eps * torch.zeros(4, 3, dtype=torch.float64).index_add_(0, flat_ids, terms.abs())
    assert ((module.weight.grad.double() - expected).abs() <= bound + 2 * eps * expected.abs()).all()
    if ids.numel() < 100 and dtype == torch.float64:  # the harness's Jacobian check (too slow on 3584 ids)
        weight = module.weight.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(module, {"weight": w}, (ids,)),
                                        (weight,))


def test_common_nn_embedding_sparse(impl):
    Embedding, _ = impl
    module = Embedding(4, 3, dtype=torch.double, sparse=True)
    ids = torch.randperm(2).repeat(1, 2)
    module(ids).sum().backward()
    grad = module.weight.grad
    assert grad.is_sparse and torch.equal(grad._indices(), ids.reshape(1, -1))
    assert torch.equal(grad.to_dense(), torch.zeros(4, 3, dtype=torch.double).index_add_(
        0, ids.reshape(-1), torch.ones(4, 3, dtype=torch.double)))


# common_methods_invocations' OpInfo for nn.functional.embedding: its sample inputs (M = 10 rows,
# S = 5 columns), for its dtypes (floating, half, bfloat16 and complex), and its error inputs

def opinfo_samples(make):
    """(weight, ids, kwargs) in the OpInfo's order; make(shape) draws a weight."""
    def ids(shape, high):
        return torch.randint(0, high, shape)

    yield make((10, 5)), ids((), 10), {}
    yield make((10, 5)), ids((5,), 10), {}
    yield make((10, 5)), ids((5, 5), 10), {}
    idx = ids((2, 2), 5)
    idx[0, 0] = idx[1, 1] = 2
    yield make((5, 5)), idx, {"padding_idx": 2}
    idx = ids((2, 2), 5)
    idx[0, 0] = idx[1, 1] = 4
    yield make((5, 5)), idx, {"padding_idx": -1}
    yield make((5, 5)) * 2, ids((2, 2), 5), {"max_norm": 1.0}
    yield make((5, 5)) * 2, ids((2, 2), 5), {"max_norm": 1.0, "norm_type": 1.0}
    idx = ids((2, 2), 5)
    idx[0, 0] = idx[0, 1] = 1
    yield make((5, 5)), idx, {"scale_grad_by_freq": True}
    yield make((5, 5)), ids((2, 2), 5), {"sparse": True}
    idx = ids((3, 3), 5)
    idx[0, 0] = idx[0, 1] = 1
    idx[1, 0] = 0
    yield make((5, 5)) * 2, idx, {"sparse": True, "scale_grad_by_freq": True, "padding_idx": 0, "max_norm": 1.0}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (torch.complex64,))
def test_opinfo_samples(dtype):
    torch.manual_seed(0)
    samples = list(opinfo_samples(lambda shape: torch.randn(shape, dtype=dtype)))
    for weight, ids, kwargs in samples:
        def case(Embedding, embedding):
            w = weight.clone().requires_grad_(not dtype.is_complex)

            def run():
                out = embedding(ids, w, **kwargs)
                if w.requires_grad:
                    out.backward(torch.ones_like(out))
                return out.detach(), w.grad
            return outcome(run), w.detach()

        theirs, ours = run_both(case)
        assert_same(theirs, ours, **TOL.get(dtype, {}))
    # the OpInfo's error inputs: a weight that is not 2-D
    for weight in (torch.tensor(1.0), torch.tensor(1.0).reshape(1, 1, 1)):
        with pytest.raises(RuntimeError, match="'weight' must be 2-D"):
            ftf.embedding(torch.rand(2, 2).long(), weight)


# common_modules' ModuleInfo for nn.Embedding: its error inputs, and what its generic tests check

def test_common_modules_error_inputs(impl):
    Embedding, _ = impl
    with pytest.raises(IndexError, match="index out of range in self"):
        Embedding(10, 3)(torch.tensor([0, 5, 15]))
    with pytest.raises(RuntimeError, match=r"Expected tensor for argument.*indices.*to have.*scalar type.*Long.*Int"):
        Embedding(10, 3)(torch.tensor([1.5, 2.5]))
    with pytest.raises(RuntimeError, match="Trying to create tensor with negative dimension"):
        Embedding(-1, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_common_modules_factory_kwargs_and_meta(impl, dtype):
    Embedding, _ = impl
    module = Embedding(4, 3, device="cpu", dtype=dtype)
    assert module.weight.dtype == dtype and module.weight.device.type == "cpu"
    meta = Embedding(4, 3, device="meta", dtype=dtype)
    assert meta.weight.is_meta and meta.weight.dtype == dtype
    out = meta(torch.tensor([[1, 2]], device="meta"))
    assert out.is_meta and out.shape == (1, 2, 3) and out.dtype == dtype


def test_common_modules_pickle_deepcopy_and_save_load(impl):
    Embedding, _ = impl
    module = Embedding(6, 4, padding_idx=1, max_norm=2.0)
    ids = torch.tensor([[0, 1, 5]])
    expected = module(ids).detach()
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert torch.equal(clone(ids), expected)
        assert clone.weight.data_ptr() != module.weight.data_ptr()
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(ids), expected)


# ================================================================ 2. differential, result by result

def run_both(case):
    """case(Embedding, embedding) on torch's and on fastembed's: (torch's result, fastembed's)."""
    torch.manual_seed(0)
    theirs = case(*IMPLS["torch"])
    torch.manual_seed(0)
    ours = case(*IMPLS["fastembed"])
    return theirs, ours


def assert_same(theirs, ours, **tol):
    """Equal results: tensors (sparse ones by _indices() and _values(), uncoalesced), nested tuples,
    exception types, plain values."""
    if isinstance(theirs, (tuple, list)):
        assert isinstance(ours, type(theirs)) and len(ours) == len(theirs)
        for a, b in zip(theirs, ours):
            assert_same(a, b, **tol)
    elif isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), ours
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and ours.layout == theirs.layout
        if theirs.is_sparse:
            assert ours.is_coalesced() == theirs.is_coalesced()
            assert torch.equal(ours._indices(), theirs._indices())
            torch.testing.assert_close(ours._values(), theirs._values(), **tol)
        else:
            torch.testing.assert_close(ours, theirs, equal_nan=True, **tol)
    else:
        assert ours == theirs


def lookup_and_grads(Embedding, dtype, sparse, padding_idx=None, max_norm=None, norm_type=2.0,
                     scale_grad_by_freq=False, ids=None, **kwargs):
    module = Embedding(9, 5, padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                       scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, dtype=dtype, **kwargs)
    if ids is None:
        ids = torch.tensor([[3, 1, 3, 8], [0, 3, 7, 1]])
    out = module(ids)
    upstream = torch.arange(out.numel(), dtype=torch.float64).reshape(out.shape).sin().to(dtype)
    out.backward(upstream)
    return out.detach(), module.weight.detach().clone(), module.weight.grad


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 0, 3, -1, -9])
def test_every_float_dtype_forward_and_grads(dtype, sparse, padding_idx):
    theirs, ours = run_both(lambda E, f: lookup_and_grads(E, dtype, sparse, padding_idx))
    assert_same(theirs, ours, **TOL[dtype])
    if not sparse:  # the kernels' path, not torch's
        assert on_kernels(ft.Embedding(9, 5, padding_idx=padding_idx, dtype=dtype)(torch.tensor([1, 2])))
    if dtype != torch.float32:  # a copy, and sums in the order (and rounding) torch's CPU uses
        assert_same(theirs, ours, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sparse", [False, True])
def test_scale_grad_by_freq(dtype, sparse):
    """torch's result (dense: gradients divided by each id's count; sparse: torch's error at backward)."""
    theirs, ours = run_both(lambda E, f: outcome(lambda: lookup_and_grads(
        E, dtype, sparse, padding_idx=1, scale_grad_by_freq=True)))
    assert_same(theirs, ours, **TOL[dtype])
    if not sparse:
        _, _, grad = ours
        counted = lookup_and_grads(ft.Embedding, dtype, False, padding_idx=1)[2]
        assert torch.allclose(grad[3], counted[3] / 3) and torch.allclose(grad[8], counted[8])


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf, 3.5, 0.5, -math.inf])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("sparse", [False, True])
def test_max_norm_renormalises_the_looked_up_rows_in_place(norm_type, dtype, sparse):
    """Duplicates among the ids, the weight after, the lookup and its gradient; then a second call
    on the rows already renormalised."""
    def case(Embedding, embedding):
        module = Embedding(9, 5, max_norm=1.25, norm_type=norm_type, sparse=sparse, dtype=dtype)
        with torch.no_grad():
            module.weight.mul_(3)
        before = module.weight.detach().clone()
        ids = torch.tensor([[3, 1, 3, 8], [0, 3, 7, 1]])
        first = module(ids)
        first.sum().backward()
        second = module(ids[:, :2]).detach()
        return first.detach(), second, module.weight.detach().clone(), module.weight.grad, before

    theirs, ours = run_both(case)
    assert_same(theirs, ours, **TOL[dtype])
    norms = ours[2].double().norm(p=norm_type, dim=1)
    assert (norms[[0, 1, 3, 7, 8]] <= 1.25 * (1 + 1e-2)).all()  # the rows looked up: at most max_norm
    assert torch.equal(ours[2][[2, 4, 5, 6]], ours[4][[2, 4, 5, 6]])  # the others: as they were
    if norm_type != -math.inf:  # (some row was above max_norm: something moved; min |x| may be small)
        assert not torch.equal(ours[2], ours[4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_max_norm_runs_fastembeds_renorm_for_every_kernel_dtype(monkeypatch, dtype):
    """The renorm kernel takes the four float dtypes: max_norm stays on fastembed's path (renorm, then
    the lookup kernel) with torch's bits, for Embedding and functional.embedding alike."""
    from fastembed import _kernels
    called = []
    real = _kernels.renorm
    monkeypatch.setattr(_kernels, "renorm", lambda *a, **k: called.append(k.get("_format")) or real(*a, **k))
    ids = torch.tensor([[3, 1, 3, 4], [0, 3, 2, 1]])
    g = torch.Generator().manual_seed(5)
    weight = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 3).to(dtype)
    module = ft.Embedding.from_pretrained(weight.clone(), max_norm=1.0)
    out, functional = module(ids), weight.clone()
    out_f = ftf.embedding(ids, functional, max_norm=1.0)
    theirs = weight.clone()
    expected = torch.nn.functional.embedding(ids, theirs, max_norm=1.0)
    assert called == [("bfloat16" if dtype == torch.bfloat16 else None)] * 2
    # float32's kernel may round a norm an ulp away from torch's (see the renorm tests); the others follow
    # torch's order for p = 2 and are its bits
    tol = dict(rtol=4 * 2.0 ** -23, atol=0) if dtype == torch.float32 else dict(rtol=0, atol=0)
    for a, b in ((out, expected), (out_f, expected), (module.weight.detach(), theirs), (functional, theirs)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


def test_max_norm_leaves_rows_not_looked_up_and_rows_within_the_norm():
    torch.manual_seed(0)
    module = ft.Embedding(6, 4, max_norm=1.0)
    with torch.no_grad():
        module.weight.mul_(4)
        module.weight[2] = torch.tensor([0.5, 0.5, 0.5, 0.0])  # norm 0.87 < 1: kept
    before = module.weight.detach().clone()
    module(torch.tensor([2, 3, 3]))
    after = module.weight.detach()
    assert torch.equal(after[[0, 1, 4, 5]], before[[0, 1, 4, 5]]) and torch.equal(after[2], before[2])
    scale = np.float32(1.0 / (np.float32(np.linalg.norm(before[3].double().numpy())) + 1e-7))
    assert torch.equal(after[3], before[3] * torch.tensor(scale))


def test_max_norm_runs_on_the_renorm_kernel_and_moves_the_version(monkeypatch):
    calls = []
    real = ops.renorm
    monkeypatch.setattr(ops, "renorm", lambda *a: calls.append(a[2:]) or real(*a))
    monkeypatch.setattr(torch, "embedding_renorm_", None)  # torch's own would be a TypeError now
    module = ft.Embedding(5, 3, max_norm=0.5, norm_type=3.0)
    version = module.weight._version
    out = module(torch.tensor([1, 1, 4]))
    assert calls == [(0.5, 3.0)] and on_kernels(out)
    assert module.weight._version > version  # as torch's in-place renorm: saved copies of weight see it


@pytest.mark.parametrize("max_norm, norm_type", [(-1.0, 2.0), (math.nan, 2.0), (1.0, math.nan), (0.0, 2.0)])
def test_max_norm_values_torch_takes_and_the_kernel_refuses_give_torch_results(max_norm, norm_type):
    """torch applies a negative or NaN max_norm and a NaN norm_type as they come: so does the drop-in."""
    def case(Embedding, embedding):
        weight = torch.randn(5, 3)
        out = embedding(torch.tensor([0, 2, 2]), weight, max_norm=max_norm, norm_type=norm_type)
        return out, weight

    assert_same(*run_both(case))


@pytest.mark.parametrize("bad", [5, -1, -6])
def test_max_norm_with_a_bad_id_raises_torchs_error_and_changes_nothing(bad):
    """Both raise IndexError. torch's renorm may already have scaled rows (it wraps -1 to the last row
    and scales it); fastembed checks every id first and changes nothing: a deliberate difference."""
    weight = torch.randn(5, 3) * 4
    before = weight.clone()
    with pytest.raises(IndexError, match="index out of range in self"):
        ft.Embedding.from_pretrained(weight, max_norm=1.0)(torch.tensor([0, bad, 2]))
    assert torch.equal(weight, before)
    with pytest.raises(IndexError):
        torch.nn.Embedding.from_pretrained(before.clone(), max_norm=1.0)(torch.tensor([0, bad, 2]))


def test_functional_padding_idx_negative_and_out_of_range():
    for padding_idx in (-1, -5, 4, 0, None):
        def case(Embedding, embedding):
            weight = torch.randn(5, 3, requires_grad=True)
            out = embedding(torch.tensor([4, 0, 1, 4]), weight, padding_idx=padding_idx)
            out.sum().backward()
            return out, weight.grad
        theirs, ours = run_both(case)
        assert_same(theirs, ours)
        if padding_idx is not None:
            assert not ours[1][padding_idx % 5].any()
    for padding_idx in (5, -6):
        for name in IMPLS:
            _, embedding = IMPLS[name]
            with pytest.raises(AssertionError, match="Padding_idx must be within num_embeddings"):
                embedding(torch.tensor([1]), torch.randn(5, 3), padding_idx=padding_idx)


@pytest.mark.parametrize("padding_idx", [0, 4, -1, -5, 5, -6, None])
def test_module_padding_idx_positive_negative_and_out_of_range(padding_idx):
    theirs, ours = run_both(lambda E, f: outcome(lambda: (E(5, 3, padding_idx=padding_idx).padding_idx,
                                                           E(5, 3, padding_idx=padding_idx).weight)))
    assert_same(theirs, ours)


def test_weight_and_freeze():
    def case(Embedding, embedding):
        given_weight = torch.randn(4, 3)
        shared = Embedding(4, 3, _weight=given_weight)
        frozen = Embedding(4, 3, _weight=given_weight, _freeze=True)
        return (shared.weight.data_ptr() == given_weight.data_ptr(), shared.weight.requires_grad,
                frozen.weight.requires_grad, frozen(torch.tensor([1])).requires_grad,
                outcome(lambda: Embedding(4, 2, _weight=given_weight)),
                outcome(lambda: Embedding(3, 3, _weight=given_weight)))

    theirs, ours = run_both(case)
    assert_same(theirs, ours)
    assert theirs[4] is AssertionError
    with pytest.raises(AssertionError, match="Shape of weight does not match num_embeddings and embedding_dim"):
        ft.Embedding(4, 2, _weight=torch.randn(4, 3))


@pytest.mark.parametrize("freeze", [True, False])
def test_from_pretrained_freeze_padding_idx_max_norm(freeze):
    def case(Embedding, embedding):
        given_weight = torch.randn(6, 3) * 3
        module = Embedding.from_pretrained(given_weight, freeze=freeze, padding_idx=-2, max_norm=1.5, norm_type=1.0)
        out = module(torch.tensor([4, 1, 1]))
        if not freeze:
            out.sum().backward()
        return (out.detach(), given_weight, module.weight.grad, module.weight.requires_grad, module.padding_idx,
                module.weight.data_ptr() == given_weight.data_ptr(), module.extra_repr(),
                outcome(lambda: Embedding.from_pretrained(torch.randn(3))),
                outcome(lambda: Embedding.from_pretrained(torch.randn(2, 2, 2))))

    theirs, ours = run_both(case)
    assert_same(theirs, ours)
    assert theirs[-1] is AssertionError


@pytest.mark.parametrize("kwargs", [{}, {"padding_idx": 2}, {"padding_idx": -1}, {"max_norm": 1.0},
                                    {"max_norm": 3, "norm_type": 1}, {"norm_type": 2}, {"norm_type": 2.5},
                                    {"scale_grad_by_freq": True}, {"sparse": True},
                                    {"padding_idx": 0, "max_norm": 2.5, "norm_type": math.inf,
                                     "scale_grad_by_freq": True, "sparse": True}])
def test_extra_repr_and_repr_are_torchs(kwargs):
    theirs = torch.nn.Embedding(7, 3, **kwargs)
    ours = ft.Embedding(7, 3, **kwargs)
    assert ours.extra_repr() == theirs.extra_repr()
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("kwargs", [{}, {"padding_idx": 1, "max_norm": 2.0, "sparse": True}])
def test_state_dict_both_ways(kwargs):
    theirs = torch.nn.Embedding(7, 3, **kwargs)
    ours = ft.Embedding(7, 3, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, theirs.weight)
    ids = torch.tensor([0, 1, 6])
    assert torch.equal(ours(ids), theirs(ids))  # the module reads the loaded weight, not a stale view
    ours2 = ft.Embedding(7, 3, **kwargs)
    theirs.load_state_dict(ours2.state_dict())
    assert torch.equal(theirs.weight, ours2.weight)
    buffer = io.BytesIO()
    torch.save(ours2.state_dict(), buffer)
    buffer.seek(0)
    theirs.load_state_dict(torch.load(buffer))
    assert torch.equal(theirs.weight, ours2.weight)


def test_default_dtype_is_followed_and_restored(default_dtype):
    for dtype in (torch.float64, torch.float16, torch.bfloat16, torch.float32):
        default_dtype(dtype)
        theirs, ours = run_both(lambda E, f: lookup_and_grads(E, None, False, padding_idx=1))
        assert ours[1].dtype == dtype
        assert_same(theirs, ours, **TOL[dtype])
    default_dtype(torch.float64)
    assert ft.Embedding(3, 2, dtype=torch.float32).weight.dtype == torch.float32  # an explicit dtype wins
    # TokenPositionEmbedding's fused op is float32 only: it stays float32 whatever the default
    assert ft.TokenPositionEmbedding(5, 4, 3).token.weight.dtype == torch.float32


def test_reset_parameters_is_torchs():
    theirs, ours = run_both(lambda E, f: (lambda m: (m.reset_parameters(), m.weight.detach())[1])(
        E(6, 4, padding_idx=3)))
    assert torch.equal(theirs, ours)  # same generator draws, same padding row of zeros
    assert not ours[3].any()


def test_ids_torch_refuses_give_torchs_error():
    for ids in (torch.tensor([1.0]), torch.tensor([1], dtype=torch.int16), [1, 2]):
        theirs, ours = run_both(lambda E, f: outcome(lambda: E(4, 3)(ids)))
        assert theirs in (RuntimeError, TypeError) and ours is theirs


def test_int32_ids_and_a_strided_table():
    def case(Embedding, embedding):
        weight = torch.randn(3, 6).t().requires_grad_()  # (6, 3), not contiguous
        out = embedding(torch.tensor([[5, 0, 5]], dtype=torch.int32), weight, padding_idx=0)
        out.sum().backward()
        return out, weight.grad

    assert_same(*run_both(case))


@given(rows=st.integers(1, 12), dim=st.integers(0, 6), ids_shape=st.lists(st.integers(0, 4), max_size=3),
       id32=st.booleans(), padding=st.one_of(st.none(), st.integers(-12, 11)),
       max_norm=st.one_of(st.none(), st.floats(0.1, 4.0)), norm_type=st.sampled_from([1.0, 2.0, math.inf, 3.5]),
       sparse=st.booleans(), seed=st.integers(0, 2**31 - 1))
@FAST
def test_functional_embedding_is_F_embedding(rows, dim, ids_shape, id32, padding, max_norm, norm_type, sparse, seed):
    assume(padding is None or -rows <= padding < rows)
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, dim, generator=gen) * 2
    ids = torch.randint(0, rows, tuple(ids_shape), generator=gen, dtype=torch.int32 if id32 else torch.int64)
    upstream = torch.randn(tuple(ids_shape) + (dim,), generator=gen)
    if max_norm is not None and dim > 0:  # every row's norm away from max_norm (torch's is float32-summed)
        norms = table.double().norm(p=norm_type, dim=1)
        assume(((norms - max_norm).abs() > 1e-3 * max_norm).all())

    def case(Embedding, embedding):
        weight = table.clone().requires_grad_()

        def run():
            out = embedding(ids, weight, padding, max_norm, norm_type, False, sparse)
            out.backward(upstream)
            return out.detach(), weight.grad
        return outcome(run), weight.detach()  # the weight after, even when torch raises

    theirs, ours = run_both(case)
    assert_same(theirs, ours)


def test_fused_keeps_working_with_max_norm():
    from fastembed.torch import optim as fo
    torch.manual_seed(0)
    ours = ft.Embedding(6, 3, max_norm=1.0, fused=fo.FusedSGD(0.5))
    theirs = torch.nn.Embedding.from_pretrained(ours.weight.detach().clone(), freeze=False, max_norm=1.0)
    opt = torch.optim.SGD(theirs.parameters(), lr=0.5)
    ids = torch.tensor([1, 4, 4])
    for _ in range(3):
        ours(ids).pow(2).sum().backward()
        theirs(ids).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(ours.weight, theirs.weight)
    assert "fused=" in ours.extra_repr()
    with pytest.raises(NotImplementedError, match="scale_grad_by_freq"):
        ft.Embedding(6, 3, scale_grad_by_freq=True, fused=fo.FusedSGD(0.5))


def test_modules_swapped_in_unchanged_torch_code(monkeypatch):
    """A small model written for torch, run once with torch.nn.Embedding and once with fastembed's
    patched into torch.nn: the same losses and weights after a few steps of training."""
    def train():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(20, 8, padding_idx=0, max_norm=2.0), torch.nn.Flatten(),
                                    torch.nn.Linear(24, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ids = torch.tensor([[1, 5, 0], [7, 7, 19], [0, 3, 2]])
        losses = []
        for _ in range(4):
            loss = torch.nn.functional.cross_entropy(model(ids), torch.tensor([0, 1, 1]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses), model[0].weight.detach().clone(), type(model[0])

    losses, weight, kind = train()
    monkeypatch.setattr(torch.nn, "Embedding", ft.Embedding)
    losses2, weight2, kind2 = train()
    assert kind is not kind2 and kind2 is ft.Embedding
    torch.testing.assert_close(losses2, losses)
    torch.testing.assert_close(weight2, weight)


# ================================================================ 3. the renorm kernel

NORM_TYPES = [1.0, 2.0, math.inf, -math.inf, 0.0, 3.5, 0.5, -1.5]


def numpy_renorm(table, ids, max_norm, p):
    """The oracle in float64 numpy: (expected table, rows too close to max_norm to call)."""
    out = table.astype(np.float64)
    unclear = []
    for r in np.unique(np.asarray(ids).reshape(-1)):
        row = out[r]
        with np.errstate(divide="ignore"):
            if row.size == 0:
                norm = 0.0 if p >= 0 or p == -math.inf else math.inf  # (an empty sum to a negative power)
            elif abs(p) == math.inf:
                norm = np.abs(row).max() if p > 0 else np.abs(row).min()
            else:
                norm = float(np.count_nonzero(row)) if p == 0 else np.sum(np.abs(row) ** p) ** (1.0 / p)
        if abs(norm - max_norm) <= 1e-5 * max(max_norm, 1e-30):
            unclear.append(r)
        elif norm > max_norm:
            out[r] = row * (max_norm / (norm + 1e-7))
    return out.astype(np.float32), unclear


@given(rows=st.integers(1, 30), dim=st.integers(0, 40), n=st.integers(0, 60), pool=st.integers(1, 30),
       id_dtype=st.sampled_from([np.int32, np.int64]), p=st.sampled_from(NORM_TYPES),
       max_norm=st.floats(0.0, 6.0), scale=st.sampled_from([0.1, 1.0, 5.0]), seed=st.integers(0, 2**32 - 1))
@FAST
def test_renorm_kernel_against_reference_and_numpy(rows, dim, n, pool, id_dtype, p, max_norm, scale, seed):
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((rows, dim)) * scale).astype(np.float32)
    table[rng.random((rows, dim)) < 0.1] = 0.0  # zeros: p = 0 counts them, negative p makes them inf
    ids = rng.integers(0, min(pool, rows), size=n).astype(id_dtype)  # a small pool: many duplicates
    ours = table.copy()
    ops.renorm(ours, ids, max_norm, p)
    ref = table.tolist()
    reference.renorm(ref, ids.tolist(), max_norm, p)
    assert_bitwise(ours, np.array(ref, dtype=np.float32).reshape(rows, dim))
    expected, unclear = numpy_renorm(table, ids, max_norm, p)
    clear = np.setdiff1d(np.arange(rows), unclear)
    np.testing.assert_allclose(ours[clear], expected[clear], rtol=3e-6, atol=1e-30)
    untouched = np.setdiff1d(np.arange(rows), ids)
    assert_bitwise(ours[untouched], table[untouched])


@given(rows=st.integers(1, 12), dim=st.integers(1, 9), n=st.integers(0, 30), p=st.sampled_from(NORM_TYPES[:4]),
       seed=st.integers(0, 2**32 - 1))
@FEW
def test_renorm_kernel_against_torch(rows, dim, n, p, seed):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, dim, generator=gen) * 3
    ids = torch.randint(0, rows, (n,), generator=gen)
    norms = table.double().norm(p=p, dim=1)
    assume(((norms - 1.5).abs() > 1e-4).all())
    theirs = table.clone()
    torch.embedding_renorm_(theirs, ids, 1.5, p)
    ours = table.clone()
    ops.renorm(ours.numpy(), ids.numpy(), 1.5, p)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("bad", [7, -1, 2**40])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_renorm_rejects_an_id_out_of_range_and_changes_nothing(bad, id_dtype):
    if id_dtype is np.int32 and bad > 2**31:
        bad = 2**31 - 1
    table = np.arange(21, dtype=np.float32).reshape(7, 3) * 10
    ids = np.array([0, 3, bad, 6], dtype=id_dtype)
    snap = Snapshot(table=table, ids=ids)
    with pytest.raises(IndexError, match=rf"ids\[2\] = {bad} is out of range for table with 7 rows"):
        ops.renorm(table, ids, 1.0)
    snap.assert_unchanged()
    ref = table.tolist()
    with pytest.raises(IndexError):
        reference.renorm(ref, ids.tolist(), 1.0)
    assert ref == table.tolist()


def test_renorm_bad_arguments():
    table = np.ones((4, 3), np.float32)
    snap = Snapshot(table=table)
    with pytest.raises(ValueError, match="max_norm"):
        ops.renorm(table, [1], -1.0)
    with pytest.raises(ValueError, match="max_norm"):
        ops.renorm(table, [1], math.nan)
    with pytest.raises(ValueError, match="norm_type"):
        ops.renorm(table, [1], 1.0, math.nan)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        ops.renorm(table.astype(np.int32), [1], 1.0)
    with pytest.raises(ValueError, match="read-only"):
        ro = table.copy()
        ro.flags.writeable = False
        ops.renorm(ro, [1], 1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.renorm(np.ones((3, 4), np.float32).T, [1], 1.0)
    with pytest.raises(ValueError, match="2-D"):
        ops.renorm(np.ones(4, np.float32), [1], 1.0)
    with pytest.raises(TypeError):
        ops.renorm(table, [1.5], 1.0)
    snap.assert_unchanged()
    assert fe.renorm is ops.renorm


def test_renorm_empty_ids_and_exact_values():
    table = np.array([[3, 4], [0.3, 0.4], [6, 8]], np.float32)
    before = table.copy()
    ops.renorm(table, np.array([], np.int64), 1.0)
    assert_bitwise(table, before)
    ops.renorm(table, [2, 0, 2, 1], 1.0)
    # row 0: norm 5 -> scale 1 / (5 + 1e-7); row 2 likewise with 10; row 1 (norm 0.5) untouched
    assert_bitwise(table[0], before[0] * np.float32(1.0 / (5.0 + 1e-7)))
    assert_bitwise(table[2], before[2] * np.float32(1.0 / (10.0 + 1e-7)))
    assert_bitwise(table[1], before[1])

