"""The scalar bridge: `TokenPositionEmbedding.to_values` inside the book's `Value` graph.

Oracle: the same loss built on `reference.TokenPositionEmbedding` with the same
(float32-representable) weights. The bridge's forward sums tok + pos in float32
and scatters float32 gradients, the reference does both in float64: they agree
to float32 precision, not bitwise.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import fastembed as fe
from fastembed import reference
from fastembed.reference import Value

V, P, D = 11, 6, 4
RTOL, ATOL = 1e-5, 1e-7  # float32 precision on values of order 0.1 to 1


def make_pair(seed=0, sparse=False):
    """A fastembed layer and a reference layer holding the same weights."""
    fast = fe.TokenPositionEmbedding(V, P, D, sparse=sparse, seed=seed)
    ref = reference.TokenPositionEmbedding(V, P, D)
    ref.token = reference.Embedding.from_rows(fast.token.weight.tolist())
    ref.position = reference.Embedding.from_rows(fast.position.weight.tolist())
    return fast, ref


def head(seed=1):
    """A fixed linear map D -> 5 (plain floats): logits of a small classifier."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((5, D)).tolist()


def loss_of(hidden, targets, weights):
    """Mean cross-entropy of softmax(weights @ rmsnorm(h)) over every row of hidden (nested lists of Value)."""
    rows = hidden if isinstance(hidden[0][0], Value) else [r for seq in hidden for r in seq]
    losses = []
    for h, target in zip(rows, targets):
        scale = (sum(x * x for x in h) / len(h) + 1e-5) ** -0.5
        h = [x * scale for x in h]
        logits = [sum(w * x for w, x in zip(row, h)) for row in weights]
        top = max(v.data for v in logits)
        exps = [(v - top).exp() for v in logits]
        losses.append(-(exps[target] / sum(exps)).log())
    return sum(losses) / len(losses)


def dense(grad, rows):
    if grad is None:
        return np.zeros((rows, D), dtype=np.float32)
    if isinstance(grad, fe.SparseGrad):
        return grad.to_dense(rows)
    return grad


def assert_same_grads(fast, ref):
    np.testing.assert_allclose(dense(fast.token.grad, V), ref.token.grad, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dense(fast.position.grad, P), ref.position.grad, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- the hook mechanism of reference.Value

def test_a_shared_hook_runs_once_per_backward():
    calls = []
    hook = lambda: calls.append("a")  # noqa: E731
    leaves = [Value(float(k)) for k in range(5)]
    for v in leaves:
        v.on_backward = hook
    other = Value(2.0)
    other.on_backward = lambda: calls.append("b")
    unreached = Value(3.0)
    unreached.on_backward = lambda: calls.append("c")
    loss = sum(v * v for v in leaves) * other
    loss.backward()
    assert sorted(calls) == ["a", "b"]
    loss.backward()
    assert sorted(calls) == ["a", "a", "b", "b"]


def test_hooks_run_after_the_walk():
    seen = []
    x = Value(3.0)
    x.on_backward = lambda: seen.append(x.grad)
    (x * x + x).backward()
    assert seen == [7.0]


def test_reference_stays_stdlib_only():
    """reference.py imported on its own, with numpy and the compiled kernels unavailable."""
    path = os.path.join(os.path.dirname(fe.__file__), "reference.py")
    code = (
        "import sys, importlib.util\n"
        "sys.modules['numpy'] = None\n"
        f"spec = importlib.util.spec_from_file_location('ref', {path!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "v = m.Value(2.0); (v * v).backward(); assert v.grad == 4.0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- to_values: forward

@pytest.mark.parametrize("ids, positions", [
    ([3, 1, 3, 0], None),
    ([[3, 1, 3], [0, 10, 3]], None),
    ([2, 2], 3),
    ([[4, 5], [6, 7]], [[0, 5], [2, 2]]),
])
def test_forward_matches_the_kernels_and_the_reference(ids, positions):
    fast, ref = make_pair()
    hidden = fast.to_values(ids, positions)
    expected = fast(ids, positions)
    got = np.array([[x.data for x in row] for row in np.array(hidden, dtype=object).reshape(-1, D)])
    assert got.shape == (expected.size // D, D)
    np.testing.assert_array_equal(got, expected.reshape(-1, D).astype(np.float64))
    ref_hidden = np.array(ref(ids, positions), dtype=object)
    np.testing.assert_allclose(got, np.vectorize(lambda v: v.data)(ref_hidden).reshape(-1, D), rtol=1e-6)
    assert all(not v.children for v in np.array(hidden, dtype=object).reshape(-1))


def test_shapes_of_the_nesting():
    fast, _ = make_pair()
    assert len(fast.to_values(4)) == D and isinstance(fast.to_values(4)[0], Value)
    assert fast.to_values([]) == []
    nested = fast.to_values([[1, 2, 3], [4, 5, 6]])
    assert len(nested) == 2 and len(nested[0]) == 3 and len(nested[0][0]) == D


def test_bad_ids_raise_before_any_value_is_made():
    fast, _ = make_pair()
    with pytest.raises(IndexError, match="out of range"):
        fast.to_values([1, V])
    with pytest.raises(IndexError):
        fast.to_values([1] * (P + 1))
    with pytest.raises(TypeError):
        fast.to_values([1.5, 2.0])


# ---------------------------------------------------------------- to_values: gradients

@pytest.mark.parametrize("sparse", [False, True])
def test_gradients_match_the_reference(sparse):
    fast, ref = make_pair(sparse=sparse)
    ids, targets, weights = [[3, 1, 3, 0, 3], [7, 7, 2, 10, 1]], [0, 1, 2, 3, 4] * 2, head()
    loss_fast = loss_of(fast.to_values(ids), targets, weights)
    loss_ref = loss_of(ref(ids), targets, weights)
    assert math.isclose(loss_fast.data, loss_ref.data, rel_tol=1e-6)
    loss_fast.backward()
    loss_ref.backward()
    assert isinstance(fast.token.grad, fe.SparseGrad) == sparse
    assert_same_grads(fast, ref)
    untouched = sorted(set(range(V)) - {i for seq in ids for i in seq})
    assert not dense(fast.token.grad, V)[untouched].any()  # exactly zero, not just small


def test_two_sentences_two_backwards_accumulate_like_the_reference():
    fast, ref = make_pair()
    weights = head()
    for ids, targets in (([4, 2, 4], [1, 2, 3]), ([2, 9], [0, 0])):
        loss_of(fast.to_values(ids), targets, weights).backward()
        loss_of(ref(ids), targets, weights).backward()
    assert_same_grads(fast, ref)


def test_one_loss_over_two_forward_calls():
    fast, ref = make_pair()
    weights = head()
    a, b = fast.to_values([1, 2]), fast.to_values([2, 5, 6], positions=2)
    ra, rb = ref([1, 2]), ref([2, 5, 6], positions=2)
    loss_of(a + b, [0, 1, 2, 3, 4], weights).backward()
    loss_of(ra + rb, [0, 1, 2, 3, 4], weights).backward()
    assert_same_grads(fast, ref)


def test_a_later_forward_does_not_redirect_an_earlier_bridge():
    fast, ref = make_pair()
    weights = head()
    hidden = fast.to_values([1, 2, 3])
    fast([9, 9, 9, 9])  # a plain forward call in between: the layer's own backward would now use these ids
    loss_of(hidden, [0, 1, 2], weights).backward()
    loss_of(ref([1, 2, 3]), [0, 1, 2], weights).backward()
    assert_same_grads(fast, ref)
    ids, positions = fast._saved
    assert ids.tolist() == [9, 9, 9, 9] and positions is None  # and the layer's own state is as it was


def test_the_bridge_keeps_its_own_copy_of_the_ids():
    fast, ref = make_pair()
    ids = np.array([1, 2, 3])
    hidden = fast.to_values(ids)
    ids[:] = 0
    loss_of(hidden, [0, 1, 2], head()).backward()
    loss_of(ref([1, 2, 3]), [0, 1, 2], head()).backward()
    assert_same_grads(fast, ref)


@pytest.mark.parametrize("sparse", [False, True])
def test_repeated_backward_scatters_only_what_is_new(sparse):
    """The engine adds into every grad on each backward(); the layer's gradient is always
    the scatter of its Values' grads as they stand (nothing sent twice)."""
    fast, _ = make_pair(sparse=sparse)
    ids, positions = [[3, 1, 3], [0, 3, 1]], [[0, 1, 2], [3, 4, 5]]
    hidden = fast.to_values(ids, positions)
    loss = loss_of(hidden, [0, 1, 2, 3, 4, 0], head())
    for _ in range(3):
        loss.backward()
        grads = np.array([[[x.grad for x in row] for row in seq] for seq in hidden])
        expected_token = np.zeros((V, D))
        expected_position = np.zeros((P, D))
        np.add.at(expected_token, np.array(ids), grads)
        np.add.at(expected_position, np.array(positions), grads)
        np.testing.assert_allclose(dense(fast.token.grad, V), expected_token, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(dense(fast.position.grad, P), expected_position, rtol=RTOL, atol=ATOL)


def test_backward_of_a_graph_without_the_values_scatters_nothing():
    fast, _ = make_pair()
    fast.to_values([1, 2])
    (Value(2.0) * 3.0).backward()
    assert fast.token.grad is None and fast.position.grad is None


# ---------------------------------------------------------------- the optimizer step

def book_adam(params, state, step, num_steps, lr=0.01, betas=(0.85, 0.99), eps=1e-8):
    """The book's Adam on Values, in float64, written out as the book does it."""
    b1, b2 = betas
    lr_t = lr * (1 - step / num_steps)
    for k, p in enumerate(params):
        m, v = state.get(k, (0.0, 0.0))
        m = b1 * m + (1 - b1) * p.grad
        v = b2 * v + (1 - b2) * p.grad ** 2
        state[k] = (m, v)
        p.data -= lr_t * (m / (1 - b1 ** (step + 1))) / ((v / (1 - b2 ** (step + 1))) ** 0.5 + eps)
        p.grad = 0.0


def test_the_same_training_steps_as_the_reference():
    fast, ref = make_pair()
    weights = head()
    opt = fe.optim.Adam(fast.parameters())
    ref_params = [v for table in (ref.token, ref.position) for row in table.weight for v in row]
    state, num_steps = {}, 4
    sentences = [([1, 4, 1], [2, 0, 1]), ([4, 4], [3, 3]), ([5, 6, 7, 8], [0, 1, 2, 3]), ([1], [4])]
    for step, (ids, targets) in enumerate(sentences):
        loss_fast = loss_of(fast.to_values(ids), targets, weights)
        loss_ref = loss_of(ref(ids), targets, weights)
        assert math.isclose(loss_fast.data, loss_ref.data, rel_tol=1e-5), step
        loss_fast.backward()
        loss_ref.backward()
        assert_same_grads(fast, ref)
        opt.lr = fe.optim.linear_decay(0.01, step, num_steps)
        opt.step()
        opt.zero_grad()
        book_adam(ref_params, state, step, num_steps)
        np.testing.assert_allclose(fast.token.weight, [[v.data for v in r] for r in ref.token.weight],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fast.position.weight, [[v.data for v in r] for r in ref.position.weight],
                                   rtol=1e-5, atol=1e-6)
