"""fastembed: the embedding layer of a tiny GPT, as Cython kernels.

    hidden = token_table[ids] + position_table[positions]

is a gather, and its backward a scatter-add into the rows that were looked up.
"""
from ._version import __version__

try:
    from . import _kernels
except ImportError as exc:  # the source tree, not an installed build
    import os as _os

    raise ImportError(
        f"fastembed's compiled kernels are missing ({exc}). You are importing the package from "
        f"{_os.path.dirname(__file__)}, which has not been built: run `python -m pip install .` and run "
        "Python from outside the source folder, or build in place with `python setup.py build_ext --inplace`."
    ) from exc

from . import optim, reference
from ._kernels import get_num_threads, openmp_enabled, set_num_threads
from .nn import Embedding, LookupGrad, SparseGrad, TokenPositionEmbedding
from .ops import coalesce, gather, gather_add, gather_add_backward, scatter_add


def _threads_from_environment():
    import os

    value = os.environ.get("FASTEMBED_NUM_THREADS", "").strip()
    if value:
        try:
            set_num_threads(int(value))
        except ValueError as exc:
            raise ValueError(f"FASTEMBED_NUM_THREADS must be a non-negative integer, got {value!r}") from exc


_threads_from_environment()


def _warn_if_qdrant_fastembed_installed():
    """Warn when Qdrant's unrelated `fastembed` distribution is installed too: both own `fastembed/`."""
    import os
    import sys

    # Importing importlib.metadata costs about 15 ms, a quarter of `import fastembed`: look for
    # a `fastembed-*.dist-info` (or egg-info) folder on sys.path first, and ask it only then.
    if "importlib.metadata" not in sys.modules:
        for entry in sys.path:
            try:
                with os.scandir(entry or ".") as folder:
                    names = [e.name.lower() for e in folder]
            except OSError:  # a zip file or a missing folder on sys.path
                continue
            if any(n.startswith(("fastembed-", "fastembed.")) and n.endswith("-info") for n in names):
                break
        else:
            return
    from importlib import metadata

    try:
        other = metadata.distribution("fastembed")
    except metadata.PackageNotFoundError:
        return
    import warnings

    warnings.warn(
        f"Two distributions provide the package `fastembed` in this environment: fastembed-kernels "
        f"{__version__} (this one) and Qdrant's unrelated `fastembed` {other.version}. Their files "
        "collide: whichever was installed last overwrote the other's, and uninstalling either one "
        "deletes files the other needs. Keep them in separate environments: here, run "
        "`pip uninstall fastembed fastembed-kernels`, then reinstall the one you need.",
        UserWarning,
        stacklevel=2,
    )


_warn_if_qdrant_fastembed_installed()

__all__ = [
    "__version__",
    "gather", "gather_add", "scatter_add", "gather_add_backward", "coalesce",
    "Embedding", "TokenPositionEmbedding", "SparseGrad", "LookupGrad",
    "optim", "reference", "get_num_threads", "set_num_threads", "openmp_enabled",
]

from .ops import renorm  # noqa: E402  (torch's max_norm for a lookup, in place)

__all__.append("renorm")


from ._kernels import BagArgumentError, BagIndexError, BagModeError, BagOffsetError
from .ops import embedding_bag, embedding_bag_backward, embedding_bag_grad_rows, embedding_bag_weights_grad

__all__ += [
    "embedding_bag", "embedding_bag_backward", "embedding_bag_grad_rows", "embedding_bag_weights_grad",
    "BagArgumentError", "BagIndexError", "BagModeError", "BagOffsetError",
]
from .nn import EmbeddingBag

__all__ += ["EmbeddingBag"]

from .ops import exchange_plan, row_bounds  # noqa: E402  (the id exchange of a table sharded by rows)

__all__ += ["exchange_plan", "row_bounds"]
