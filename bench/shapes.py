"""The shapes the suite measures, and the data (tables, ids, upstream gradient) of each.

Axes as in fastembed: V token rows, P position rows, D dim, B sequences, T positions
per sequence (ids have shape (B, T), positions are ``arange(T)`` along the last axis).
"""
from dataclasses import dataclass

import numpy as np

SEED = 1234  # one seed for every array: every method of a case sees the same numbers
DTYPES = ("float32", "float64", "float16", "bfloat16")  # table dtypes of --dtypes, in report order
DEFAULT_DTYPE = "float32"  # the tables of every op; the one dtype whose cases keep the op's plain name


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: table sizes, ids layout and id distribution."""

    name: str
    vocab: int  # V
    context: int  # P (rows of the position table)
    dim: int  # D
    batch: int  # B
    seq: int  # T
    ids: str = "uniform"  # or "zipf"
    big: bool = False  # medium and wide: thread scaling and the memory-limit targets apply

    @property
    def tokens(self):
        """N, the number of ids."""
        return self.batch * self.seq

    def label(self):
        """A short description for tables: tables and ids."""
        return (f"{self.vocab:,} x {self.dim} table, {self.context} x {self.dim} positions, "
                f"ids ({self.batch}, {self.seq}) {self.ids}")


SEED_SHAPES = (
    Shape("seed-1x16", 597, 16, 32, 1, 16),
    Shape("seed-32x16", 597, 16, 32, 32, 16),
)
BIG_SHAPES = (
    Shape("medium", 50_257, 1024, 768, 8, 1024, big=True),
    Shape("wide-uniform", 1_000_000, 1024, 64, 64, 1024, big=True),
    Shape("wide-zipf", 1_000_000, 1024, 64, 64, 1024, ids="zipf", big=True),
)
ALL_SHAPES = SEED_SHAPES + BIG_SHAPES


def scaled(shape, scale):
    """The shape with its vocabulary and sequence length shrunk by scale (dim kept); seed shapes never shrink."""
    if scale == 1.0 or not shape.big:
        return shape
    seq = max(1, round(shape.seq * scale))
    return Shape(shape.name, max(16, round(shape.vocab * scale)), seq, shape.dim, shape.batch, seq,
                 shape.ids, shape.big)


def select(names=None, run_all=False, scale=1.0, default=None):
    """The shapes to run: the named ones, every shape (run_all), or the default (names; the seed shapes
    when None)."""
    if not names and not run_all and default:
        names = default
    if names:
        by_name = {s.name: s for s in ALL_SHAPES}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SystemExit(f"unknown shape(s) {unknown}; known: {list(by_name)}")
        chosen = [by_name[n] for n in names]
    else:
        chosen = ALL_SHAPES if run_all else SEED_SHAPES
    return [scaled(s, scale) for s in chosen]


def zipf_ids(rng, a, vocab, size):
    """Ids drawn with P(id = k) proportional to (k + 1) ** -a, for k in [0, vocab).

    This is Zipf(a) restricted to the vocabulary and renormalised. Clipping
    ``rng.zipf(a)`` at vocab - 1 instead would put about a quarter of the ids
    (for a = 1.1 and a million rows) on the last row, which no corpus does.
    """
    weights = np.arange(1, vocab + 1, dtype=np.float64) ** -a
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), vocab - 1).astype(np.int64)


@dataclass
class Data:
    """The arrays of one shape, shared (read-only by convention) by every method."""

    shape: Shape
    token_table: np.ndarray  # (V, D) float32
    position_table: np.ndarray  # (P, D) float32
    ids: np.ndarray  # (B, T) int64
    positions: np.ndarray  # (T,) int64, arange(T): what positions=None means
    grad_hidden: np.ndarray  # (B, T, D) float32, the stand-in for the rest of the model's gradient

    @property
    def positions_full(self):
        """positions broadcast to ids.shape, for the scatter idioms that need one position per id."""
        return np.array(np.broadcast_to(self.positions, self.ids.shape))  # a writeable copy, for torch too

    def unique_rows(self):
        """Distinct token rows and distinct position rows touched: what an op must read or write at least."""
        return len(np.unique(self.ids)), min(self.shape.seq, self.shape.context)


def make_data(shape):
    """Tables, ids and upstream gradient for shape, from one fixed seed."""
    rng = np.random.default_rng(SEED)
    V, P, D = shape.vocab, shape.context, shape.dim
    # The book's init scale; the values only matter for the equality checks, not for the speed.
    token_table = rng.standard_normal((V, D), dtype=np.float32) * np.float32(0.08)
    position_table = rng.standard_normal((P, D), dtype=np.float32) * np.float32(0.08)
    size = (shape.batch, shape.seq)
    if shape.ids == "zipf":
        ids = zipf_ids(rng, 1.1, V, size)
    else:
        ids = rng.integers(0, V, size=size, dtype=np.int64)
    grad_hidden = rng.standard_normal(size + (D,), dtype=np.float32)
    positions = np.arange(shape.seq, dtype=np.int64)
    return Data(shape, token_table, position_table, ids, positions, grad_hidden)


# ---------------------------------------------------------------- the data in another dtype (--dtypes)

def numpy_dtype(dtype):
    """The numpy dtype of a table dtype's name, or None for bfloat16 without ml_dtypes."""
    if dtype != "bfloat16":
        return np.dtype(dtype)
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def itemsize(dtype):
    """Bytes per element of a table dtype."""
    return {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype]


def in_dtype(arrays, dtype, torch):
    """float32 arrays rounded to dtype (to nearest even), as numpy arrays (None for bfloat16 without ml_dtypes)
    and as torch tensors over the same memory (None without torch)."""
    np_dtype = numpy_dtype(dtype)
    converted = None if np_dtype is None else tuple(a.astype(np_dtype) for a in arrays)
    if torch is None:
        return converted, None
    t_dtype = getattr(torch, dtype)
    if converted is None:
        tensors = tuple(torch.from_numpy(a).to(t_dtype) for a in arrays)
    elif dtype == "bfloat16":  # torch reads ml_dtypes arrays through their bits
        tensors = tuple(torch.from_numpy(a.view(np.uint16)).view(t_dtype) for a in converted)
    else:
        tensors = tuple(torch.from_numpy(a) for a in converted)
    return converted, tensors


def widened(x):
    """A result (numpy array or torch tensor) as numpy, float16 and bfloat16 widened to float32: exact, so a
    bitwise check stays one (numpy has no bfloat16 of its own to take torch's)."""
    if hasattr(x, "detach"):
        x = x.detach()
        return (x.float() if x.dtype.itemsize == 2 else x).numpy()
    return x.astype(np.float32) if x.dtype.itemsize == 2 else x
