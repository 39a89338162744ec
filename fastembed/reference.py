"""The oracle: a scalar autograd engine and the book's embedding, in plain Python.

Standard library only, and it never imports compiled code: every fast path in
fastembed is checked against what this file computes. It follows the book's
`Value(data, children, localGrads)`: each operation records its inputs and the
local derivative with respect to each, and `backward()` walks the graph in
reverse topological order doing `child.grad += local_grad * v.grad`.
"""
import math
import random

INIT_STD = 0.08  # the book's (and microgpt's) Gaussian init for every matrix


class Value:
    """A scalar that remembers how it was computed."""

    __slots__ = ("data", "grad", "children", "local_grads", "on_backward")

    def __init__(self, data, children=(), local_grads=()):
        self.data = float(data)
        self.grad = 0.0
        self.children = tuple(children)
        self.local_grads = tuple(local_grads)
        self.on_backward = None  # optional hook(): see backward()

    def __repr__(self):
        return f"Value(data={self.data!r}, grad={self.grad!r})"

    # the book's operations
    def add(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data + other.data, (self, other), (1.0, 1.0))

    def mul(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data * other.data, (self, other), (other.data, self.data))

    def pow(self, exponent):
        if isinstance(exponent, Value):
            raise TypeError("Value.pow takes a number exponent, not a Value")
        return Value(self.data**exponent, (self,), (exponent * self.data ** (exponent - 1),))

    def log(self):
        return Value(math.log(self.data), (self,), (1.0 / self.data,))

    def exp(self):
        e = math.exp(self.data)
        return Value(e, (self,), (e,))

    def relu(self):
        return Value(max(0.0, self.data), (self,), (float(self.data > 0),))

    def neg(self):
        return self.mul(-1.0)

    def sub(self, other):
        return self.add(other.neg() if isinstance(other, Value) else -other)

    def div(self, other):
        return self.mul(other.pow(-1.0) if isinstance(other, Value) else 1.0 / other)

    # the same, as Python operators
    __add__ = add
    __mul__ = mul
    __pow__ = pow
    __neg__ = neg
    __sub__ = sub
    __truediv__ = div

    def __radd__(self, other):
        return self.add(other)

    def __rmul__(self, other):
        return self.mul(other)

    def __rsub__(self, other):
        return self.neg().add(other)

    def __rtruediv__(self, other):
        return self.pow(-1.0).mul(other)

    def backward(self):
        """Set d(self)/d(v) into v.grad for every v this Value depends on, then run the hooks.

        Each distinct `on_backward` callable found in the graph is called once, with
        no argument, after the reverse walk: many Values can share one hook (a layer
        that hands out Values and takes their gradients back in one call).
        """
        order, seen = [], set()
        stack = [(self, False)]
        while stack:  # iterative post-order DFS: deep graphs must not hit the recursion limit
            v, expanded = stack.pop()
            if expanded:
                order.append(v)
            elif id(v) not in seen:
                seen.add(id(v))
                stack.append((v, True))
                stack.extend((c, False) for c in v.children)
        self.grad = 1.0
        for v in reversed(order):
            for child, local_grad in zip(v.children, v.local_grads):
                child.grad += local_grad * v.grad
        for hook in dict.fromkeys(v.on_backward for v in order if v.on_backward is not None):
            hook()


def _rows_like(ids, row_of):
    """Map an int, or nested lists of ints, to the same nesting of rows."""
    if isinstance(ids, int):
        return row_of(ids, 0)
    ids = list(ids)
    if ids and not isinstance(ids[0], int):
        return [_rows_like(seq, row_of) for seq in ids]
    return [row_of(i, t) for t, i in enumerate(ids)]


def _check_id(i, rows, what):
    if isinstance(i, bool) or not isinstance(i, int):
        raise TypeError(f"{what} must be integers, got {type(i).__name__}")
    if not 0 <= i < rows:
        raise IndexError(f"{what} value {i} is out of range for a table of {rows} rows")


class Embedding:
    """The book's lookup table: `weight[i]` is the list of Values of row i."""

    def __init__(self, num_embeddings, embedding_dim, *, sparse=False, seed=None):
        rng = random.Random(seed)
        self.num_embeddings, self.embedding_dim, self.sparse = num_embeddings, embedding_dim, sparse
        self.weight = [[Value(rng.gauss(0.0, INIT_STD)) for _ in range(embedding_dim)] for _ in range(num_embeddings)]

    @classmethod
    def from_rows(cls, rows):
        """An Embedding whose weight holds the given rows (a list of lists of floats)."""
        rows = [list(map(float, r)) for r in rows]
        layer = cls(0, len(rows[0]) if rows else 0)
        layer.num_embeddings = len(rows)
        layer.weight = [[Value(x) for x in r] for r in rows]
        return layer

    def __call__(self, ids):
        """Rows of Values for ids (an int, or nested lists of ints); the same Values as in weight."""
        def row_of(i, _t):
            _check_id(i, self.num_embeddings, "ids")
            return self.weight[i]
        return _rows_like(ids, row_of)

    @property
    def grad(self):
        """The dense gradient as a list of rows of floats."""
        return [[v.grad for v in row] for row in self.weight]

    def zero_grad(self):
        for row in self.weight:
            for v in row:
                v.grad = 0.0


class TokenPositionEmbedding:
    """The book's first op: `hidden[i] = token[id][i] + position[pos][i]` on Values."""

    def __init__(self, vocab_size, context_length, embedding_dim, *, sparse=False, seed=None):
        rng = random.Random(seed)
        self.token = Embedding(vocab_size, embedding_dim, sparse=sparse, seed=rng.random())
        self.position = Embedding(context_length, embedding_dim, sparse=sparse, seed=rng.random())

    def __call__(self, ids, positions=None):
        """Hidden rows for ids (nested lists of ints); positions: None (0..T-1), an int start, or nested lists like ids."""
        def row_of(i, t):
            return self._hidden(i, positions if isinstance(positions, int) and not isinstance(positions, bool) else 0, t)

        if positions is None or isinstance(positions, int):
            return _rows_like(ids, row_of)
        return _zip_nested(ids, positions, lambda i, p: self._hidden(i, p, 0))

    def _hidden(self, token_id, start, t):
        _check_id(token_id, self.token.num_embeddings, "ids")
        _check_id(start + t, self.position.num_embeddings, "positions")
        return [tok + pos for tok, pos in zip(self.token.weight[token_id], self.position.weight[start + t])]

    def zero_grad(self):
        self.token.zero_grad()
        self.position.zero_grad()


def _zip_nested(ids, positions, fn):
    if isinstance(ids, int):
        return fn(ids, positions)
    return [_zip_nested(i, p, fn) for i, p in zip(ids, positions, strict=True)]


def _float32(x):
    """x rounded to the nearest float32 (as a Python float)."""
    import struct

    return struct.unpack("f", struct.pack("f", x))[0]


def _norm(row, p):
    """The p-norm of a row of floats as torch defines it for every p, summed in order in double."""
    if p == math.inf or p == -math.inf:
        if not row:
            return 0.0
        best = abs(row[0])
        for x in row[1:]:
            a = abs(x)
            if a != a or (a > best if p > 0 else a < best):  # NaN wins, as in torch
                best = a
        return best
    if p == 0:
        return float(sum(1 for x in row if x != 0))
    total = 0.0
    for x in row:
        a = abs(x)
        if p == 2:
            total += a * a
        elif p == 1:
            total += a
        else:
            total += math.inf if a == 0 and p < 0 else a ** p  # Python's 0.0 ** -p raises; C's pow is inf
    if p == 2:
        return math.sqrt(total)
    if p == 1:
        return total
    return math.inf if total == 0 and p < 0 else total ** (1.0 / p)


def renorm(table, ids, max_norm, norm_type=2.0):
    """torch's embedding_renorm_ on nested lists: each distinct row r of table named in ids (a flat list of
    ints) whose norm_type-norm, rounded to float32, exceeds max_norm is multiplied in place by the float32
    nearest max_norm / (norm + 1e-7), each product rounded to float32. Rows must hold float32 values.
    Every id is checked before any row changes."""
    rows = len(table)
    for i in ids:
        _check_id(i, rows, "ids")
    for r in sorted(set(ids)):
        norm = _float32(_norm(table[r], norm_type))
        if norm > max_norm:
            scale = _float32(max_norm / (norm + 1e-7))
            table[r] = [_float32(x * scale) for x in table[r]]
