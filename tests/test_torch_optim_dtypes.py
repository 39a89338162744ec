"""fastembed.torch.optim's drop-ins and fused rules on float64, float16 and bfloat16 tables, against torch.

The optimizer kernels take the four table dtypes (fastembed/_optim.pxi); a drop-in now updates a float64,
float16 or bfloat16 table on them (it used to hand it to torch) and a fused module takes those tables.
The spec, and so the tolerance of each comparison:

- float64 computes torch's formulas in float64, in the kernels' order of operations: within a few units
  in the last place of torch's (torch.testing's float64 defaults, rtol 1e-7, atol 1e-7, are far looser).
- float16 and bfloat16 compute in float32 and round each stored element once, where torch rounds after
  each of its ops in the table's dtype. So each step is held to the step computed in float64 from the same
  16-bit weight, state and gradient, rounded to the type: torch's own optimizer on float64 copies
  (`reference_step`), each element within `K_ULPS` ulps of the type at the magnitude of its value before
  the step plus the step's move (`close_16`). A sparse gradient's repeated rows are summed as the kernels'
  coalesce sums them (exactly, then rounded to the type once); torch's 16-bit coalesce rounds after each
  add, and torch's 16-bit Adam stores float16 second moments that go subnormal, so torch's own 16-bit
  result can be many ulps away where a sum cancels or a gradient is small: that is torch's rounding, not
  the kernels' (measured: up to ~0.06 at weights of 0.25 for SparseAdam, bfloat16). SGD has no sums and no
  state: it is held to torch's 16-bit SGD itself (each lookup's ``add_`` in the same order).
  The step's move is far larger than the tolerance (lr and weights are chosen so): a row that does not
  move, moves twice or moves the wrong way fails.
- torch's float16 Adam and Adagrad round eps (1e-8, 1e-10 by default) to zero in float16 and divide
  0 by 0 on a row whose gradient and state are zero (NaN), or a tiny gradient by zero (inf); the kernels
  add eps in float32. That is a deliberate difference: those comparisons use an eps float16 holds, and
  `test_float16_default_eps_keeps_untouched_rows_finite` pins the kernels' behaviour.

Oracles: torch.optim's own optimizers, on nn.Embedding's gradients (dense, or sparse and uncoalesced);
the fused modules against nn.Embedding(sparse=True) + the matching torch optimizer.
"""
import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastembed.torch")
fo = pytest.importorskip("fastembed.torch.optim")

from fastembed import _kernels  # noqa: E402 (after the importorskip of torch)

DTYPES = (torch.float64, torch.float16, torch.bfloat16)
K_ULPS = 4
# Hyperparameters away from the defaults (each must reach the update), with eps that float16 holds.
OPTIONS = {
    "SGD": dict(lr=0.5),
    "Adagrad": dict(lr=0.5, lr_decay=0.25, initial_accumulator_value=0.125, eps=1e-3),
    "SparseAdam": dict(lr=0.25, betas=(0.8, 0.95), eps=1e-3),
    "Adam": dict(lr=0.25, betas=(0.8, 0.95), eps=1e-3),
}
SOURCES = {"SGD": ("dense", "sparse"), "Adagrad": ("dense", "sparse"), "SparseAdam": ("sparse",),
           "Adam": ("dense",)}
CASES = [(name, source) for name in OPTIONS for source in SOURCES[name]]
KERNEL_OF = {  # the kernel a drop-in step must reach for each gradient form (dense / uncoalesced sparse)
    ("SGD", "dense"): "sgd_step", ("SGD", "sparse"): "sgd_scatter",
    ("Adagrad", "dense"): "adagrad_step", ("Adagrad", "sparse"): "adagrad_scatter",
    ("SparseAdam", "sparse"): "adam_scatter", ("Adam", "dense"): "adam_step",
}
V, D, N = 12, 40, 30  # D = 40: not a multiple of 8 or 32 (every column path of the row loops)


def close_16(ours, theirs, before, dtype, what):
    """Each element within K_ULPS units in the last place of dtype at |before| + |theirs - before|."""
    ours, theirs, before = (t.detach().double() for t in (ours, theirs, before))
    eps = torch.finfo(dtype).eps
    scale = before.abs() + (theirs - before).abs() + torch.finfo(dtype).tiny
    excess = (ours - theirs).abs() - K_ULPS * eps * scale
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all(), what
    assert excess.max().item() <= 0, (
        f"{what}: {(excess > 0).sum().item()} elements beyond {K_ULPS} ulps, worst at "
        f"{divmod(int(excess.argmax()), ours.shape[-1]) if ours.dim() == 2 else int(excess.argmax())}")


def assert_close_dtype(ours, theirs, before, dtype, what):
    assert ours.dtype == theirs.dtype == dtype, what
    if dtype == torch.float64:
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12, msg=what)
    else:
        close_16(ours, theirs, before, dtype, what)


def problem(dtype, seed):
    """w0 (small, so that a step's move is many ulps of it), ids with repeats, grad_out."""
    gen = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(V, D, generator=gen) * 0.25).to(dtype)
    ids = torch.randint(0, V // 2, (N,), generator=gen)  # half the rows: the other half has no gradient
    ids[:3] = ids[3]  # a row looked up four times
    grad_out = torch.randn(N, D, generator=gen).to(dtype)
    return w0, ids, grad_out


def summed(grad, dtype):
    """A gradient as the kernels see it: dense as it is; sparse with each row's lookups summed exactly
    (float64) and rounded to dtype once (coalesce's rule), as a dense float64 tensor."""
    if not grad.is_sparse:
        return grad.double()
    return grad.coalesce().to_dense() if dtype == torch.float64 else \
        torch.sparse_coo_tensor(grad._indices(), grad._values().double(), grad.shape).coalesce().to_dense().to(
            dtype).double()


def reference_step(name, weight, state, grad, dtype):
    """(weight, state) after torch's `name` step computed in float64 from the given 16-bit (or float64)
    weight, state and gradient, rounded to dtype: the step the kernels round once."""
    w = torch.nn.Parameter(weight.detach().double().clone())
    opt = getattr(torch.optim, name)([w], **OPTIONS[name])
    dense = summed(grad, dtype)
    if grad.is_sparse:
        w.grad = dense.to_sparse(1)  # the summed rows only (a row summed to zero stays one: torch keeps it)
        keep = grad.coalesce()._indices()[0]
        w.grad = torch.sparse_coo_tensor(keep[None], dense[keep], dense.shape)
    else:
        w.grad = dense
    if state:
        opt.state[w] = {k: (v.double().clone() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim()
                            else (v.clone() if isinstance(v, torch.Tensor) else v)) for k, v in state.items()}
    opt.step()
    return w.detach().to(dtype), {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.dim() else v)
                                  for k, v in opt.state[w].items()}


def train(cls, name, source, dtype, seed, steps, check=None):
    """steps steps of cls on nn.Embedding's gradients of a fixed problem; check(before_w, before_state, grad,
    after_w, after_state) after each step."""
    w0, ids, grad_out = problem(dtype, seed)
    emb = torch.nn.Embedding(V, D, sparse=source == "sparse", _weight=w0.clone(), dtype=dtype)
    opt = cls(emb.parameters(), **OPTIONS[name])
    for k in range(steps):
        opt.zero_grad(set_to_none=True)
        emb(ids[k:]).backward(grad_out[k:])  # each step its own lookups (the first k dropped)
        before_w = emb.weight.detach().clone()
        before_state = {key: (v.clone() if isinstance(v, torch.Tensor) else v) for key, v in opt.state[emb.weight].items()}
        opt.step()
        if check is not None:
            check(before_w, before_state, emb.weight.grad, emb.weight.detach().clone(), opt.state[emb.weight])
    return emb.weight.detach().clone(), opt


# Every case but 16-bit sparse SGD, which rounds after each lookup (as torch's does): held to torch's own
# 16-bit SGD by test_drop_in_sgd_is_torchs_16_bit_sgd.
REFERENCE_CASES = [(name, source, dtype) for name, source in CASES for dtype in DTYPES
                   if not (name == "SGD" and source == "sparse" and dtype != torch.float64)]


@pytest.mark.parametrize("name,source,dtype", REFERENCE_CASES, ids=str)
@pytest.mark.parametrize("steps", [1, 3])
def test_drop_in_step_is_the_float64_step_rounded(name, source, dtype, steps):
    def check(before_w, before_state, grad, after_w, after_state):
        ref_w, ref_state = reference_step(name, before_w, before_state, grad, dtype)
        assert not torch.equal(ref_w, before_w)  # the step moves rows: the comparison can fail
        assert_close_dtype(after_w, ref_w, before_w, dtype, f"{name} weight")
        assert after_state.keys() == ref_state.keys()
        for key, value in ref_state.items():
            if key == "step":
                assert float(after_state[key]) == float(value)
                continue
            assert after_state[key].dtype == dtype
            start = before_state.get(key, torch.zeros_like(after_state[key]))
            assert_close_dtype(after_state[key], value, start, dtype, f"{name} state {key}")

    train(getattr(fo, name), name, source, dtype, seed=steps, steps=steps, check=check)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("source", SOURCES["SGD"])
def test_drop_in_sgd_is_torchs_16_bit_sgd(source, dtype):
    """SGD keeps no state and sums nothing (each lookup's add_ in order, as torch): torch's own result in the
    dtype, to K_ULPS (torch's scalar tail columns round the product first), after three steps."""
    ours, _ = train(fo.SGD, "SGD", source, dtype, seed=4, steps=3)
    theirs, _ = train(torch.optim.SGD, "SGD", source, dtype, seed=4, steps=3)
    w0 = problem(dtype, 4)[0]
    assert not torch.equal(theirs, w0)
    assert_close_dtype(ours, theirs, w0, dtype, "SGD weight")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,source", CASES)
def test_drop_in_runs_the_kernel(monkeypatch, name, source, dtype):
    """The step reaches the kernel (it no longer hands these dtypes to torch), bfloat16 as uint16 bits."""
    kernel = KERNEL_OF[(name, source)]
    real, calls = getattr(_kernels, kernel), []

    def spy(*args, **kwargs):
        calls.append((args[0].dtype, kwargs.get("_format")))
        return real(*args, **kwargs)

    monkeypatch.setattr(fo._kernels, kernel, spy)
    train(getattr(fo, name), name, source, dtype, seed=0, steps=1)
    expected = ({torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "uint16"}[dtype],
                "bfloat16" if dtype == torch.bfloat16 else None)
    assert calls and all((str(d), f) == expected for d, f in calls)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("source", ["dense", "sparse"])
def test_rowwise_adagrad_matches_its_torch_ops(source, dtype):
    """RowWiseAdagrad on the kernel against its own torch-op formula (the fallback it keeps for tables the
    kernel cannot take), computed here on the same gradient in float64 and rounded to the dtype."""
    w0, ids, grad_out = problem(dtype, 7)
    emb = torch.nn.Embedding(V, D, sparse=source == "sparse", _weight=w0.clone(), dtype=dtype)
    opt = fo.RowWiseAdagrad(emb.parameters(), lr=0.5, eps=1e-3)
    emb(ids).backward(grad_out)
    g = emb.weight.grad.to_dense().double()
    opt.step()
    touched = g.abs().sum(dim=1) > 0 if source == "sparse" else torch.ones(V, dtype=torch.bool)
    mean_sq = (g * g).mean(dim=1)
    expected_sum = torch.where(touched, mean_sq, torch.zeros(V, dtype=torch.float64))
    expected_w = w0.double() - torch.where(touched[:, None], 0.5 * g / (expected_sum.sqrt() + 1e-3)[:, None],
                                           torch.zeros_like(g))
    state_sum = opt.state[emb.weight]["sum"]
    assert state_sum.dtype == dtype and emb.weight.dtype == dtype
    assert_close_dtype(state_sum, expected_sum.to(dtype), torch.zeros(V, dtype=dtype), dtype, "sum")
    assert_close_dtype(emb.weight.detach(), expected_w.to(dtype), w0, dtype, "weight")


def test_float16_default_eps_keeps_untouched_rows_finite():
    """torch's float16 Adam and Adagrad (eps 1e-8, 1e-10: zero in float16) give NaN on a row whose gradient
    and state are zero; the kernels add eps in float32 and leave such a row as it was, bit for bit."""
    for name in ("Adam", "Adagrad"):
        w0, ids, grad_out = problem(torch.float16, 3)
        emb = torch.nn.Embedding(V, D, _weight=w0.clone(), dtype=torch.float16)
        opt = getattr(fo, name)(emb.parameters(), lr=0.25)
        emb(ids).backward(grad_out)
        untouched = emb.weight.grad.abs().sum(dim=1) == 0
        assert untouched.any()
        opt.step()
        assert torch.isfinite(emb.weight).all(), name
        assert torch.equal(emb.weight.detach()[untouched], w0[untouched]), name


# ---------------------------------------------------------------- fused modules

FUSED = {"FusedSGD": "SGD", "FusedAdagrad": "Adagrad", "FusedSparseAdam": "SparseAdam"}  # rule: torch's optimizer
STATE_KEYS = {"FusedAdagrad": {"optim_sum": "sum"},
              "FusedSparseAdam": {"optim_exp_avg": "exp_avg", "optim_exp_avg_sq": "exp_avg_sq"}}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", sorted(FUSED))
def test_fused_module_matches_torch(rule, dtype):
    """A fused module's backward: torch's optimizer on nn.Embedding(sparse=True)'s gradient, computed in
    float64 and rounded (Adagrad, SparseAdam), or torch's own 16-bit SGD (SGD), as the drop-ins above."""
    name = FUSED[rule]
    w0, ids, grad_out = problem(dtype, 11)
    ours = ft.Embedding.from_pretrained(w0.clone(), freeze=False, fused=getattr(fo, rule)(**OPTIONS[name]))
    for key in STATE_KEYS.get(rule, {}):
        assert getattr(ours, key).dtype == dtype
    ours(ids).backward(grad_out)
    assert ours.weight.grad is None  # the backward moved the rows; nothing stored
    theirs = torch.nn.Embedding.from_pretrained(w0.clone(), freeze=False, sparse=True)
    theirs(ids).backward(grad_out)
    if name == "SGD":
        torch.optim.SGD(theirs.parameters(), **OPTIONS[name]).step()
        ref_w, ref_state = theirs.weight.detach(), {}
    else:
        ref_w, ref_state = reference_step(name, w0, {}, theirs.weight.grad, dtype)
    assert not torch.equal(ref_w, w0)
    assert_close_dtype(ours.weight.detach(), ref_w, w0, dtype, f"{rule} weight")
    for key, torch_key in STATE_KEYS.get(rule, {}).items():
        start = torch.full_like(ref_state[torch_key], OPTIONS[name].get("initial_accumulator_value", 0.0))
        assert_close_dtype(getattr(ours, key), ref_state[torch_key], start, dtype, f"{rule} {key}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_state_dict_moves_in_the_tables_dtype(dtype):
    """A fused module's state buffers are of its table's dtype and load into a fresh module bit for bit."""
    w0, ids, grad_out = problem(dtype, 5)
    a = ft.Embedding.from_pretrained(w0.clone(), freeze=False, fused=fo.FusedSparseAdam(lr=0.25))
    a(ids).backward(grad_out)
    sd = a.state_dict()
    assert sd["optim_exp_avg"].dtype == sd["optim_exp_avg_sq"].dtype == dtype
    assert sd["optim_step"].item() == 1
    b = ft.Embedding.from_pretrained(torch.zeros(V, D, dtype=dtype), freeze=False, fused=fo.FusedSparseAdam(lr=0.25))
    b.load_state_dict(sd)
    a(ids).backward(grad_out)
    b(ids).backward(grad_out)
    for key, value in a.state_dict().items():
        assert torch.equal(value.view(torch.int16) if value.dtype == torch.bfloat16 else value,
                           b.state_dict()[key].view(torch.int16) if value.dtype == torch.bfloat16
                           else b.state_dict()[key]), key


def hand_set_state(name, opt, p, dtype):
    """The state a step starts from, set by hand in another dtype than p's (torch's load_state_dict would
    cast it to p's dtype: only a hand-set state gets here): Adagrad's sum (made by its constructor), the
    Adams' moments (made at their first step, so made here as torch makes them)."""
    state = opt.state[p]
    if name == "Adagrad":
        state["sum"] = state["sum"].to(dtype)
    elif name == "SparseAdam":
        state.update(step=0, exp_avg=torch.zeros_like(p, dtype=dtype), exp_avg_sq=torch.zeros_like(p, dtype=dtype))
    else:
        state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p, dtype=dtype),
                     exp_avg_sq=torch.zeros_like(p, dtype=dtype))


@pytest.mark.parametrize("state_dtype", (torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("name,source", [c for c in CASES if c[0] != "SGD"])
def test_a_state_of_another_dtype_is_torchs_step(monkeypatch, name, source, state_dtype):
    """A float32 table whose state tensors have another dtype is not the kernels' (they refuse a state of
    another dtype than the weight): the drop-in leaves the step to torch, which gives what torch.optim gives
    on the same table, state and gradient: the same weights and state bit for bit, or the same error."""
    calls = []
    for kernel in set(KERNEL_OF.values()):
        real = getattr(_kernels, kernel)
        monkeypatch.setattr(fo._kernels, kernel, lambda *a, _real=real, **k: calls.append(a) or _real(*a, **k))
    outcomes = []
    for cls in (getattr(torch.optim, name), getattr(fo, name)):
        w0, ids, grad_out = problem(torch.float32, 11)
        emb = torch.nn.Embedding(V, D, sparse=source == "sparse", _weight=w0.clone())
        opt = cls(emb.parameters(), **OPTIONS[name])
        hand_set_state(name, opt, emb.weight, state_dtype)
        emb(ids).backward(grad_out)
        try:
            opt.step()
            outcomes.append((emb.weight.detach().clone(),
                             {k: v.clone() for k, v in opt.state[emb.weight].items() if isinstance(v, torch.Tensor)}))
        except RuntimeError as error:
            outcomes.append(type(error))
    assert not calls, "the kernel took a state of another dtype"
    theirs, ours = outcomes
    if not isinstance(theirs, tuple):
        assert ours is theirs
        return
    assert torch.equal(ours[0], theirs[0]) and not torch.equal(ours[0], w0)
    assert ours[1].keys() == theirs[1].keys()
    for key in theirs[1]:
        assert ours[1][key].dtype == theirs[1][key].dtype and torch.equal(ours[1][key], theirs[1][key]), key
