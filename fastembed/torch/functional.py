"""``torch.nn.functional``'s embedding lookup on fastembed's kernels: ``embedding`` takes
``F.embedding``'s arguments and gives its results and errors.

A float32, float64, float16 or bfloat16, dense, contiguous CPU table with int32/int64 ids
runs on fastembed's kernels (the gather, the scatter-add backward, and the renorm of
``max_norm``); any other table torch accepts (integer, strided, on the meta device) and
``scale_grad_by_freq=True`` are torch's own ``F.embedding`` for now, so they give torch's
result. `fastembed.torch.Embedding` calls the same path.
"""
import torch
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _embedding

__all__ = ["embedding"]


def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
              sparse=False):
    """``torch.nn.functional.embedding``: ``weight[input]``, with the same arguments.

    ``padding_idx`` (negative counts from the end; out of range is torch's
    AssertionError) gets no gradient; ``max_norm`` renormalises the looked-up rows
    of ``weight`` in place, to p-norm ``max_norm`` (p = ``norm_type``), before the
    lookup; ``sparse=True`` gives torch's sparse gradient (one uncoalesced entry per
    lookup). A bad id changes no row on the kernel path (torch's renorm may already
    have scaled some before it raises).
    """
    if has_torch_function_variadic(input, weight):
        return handle_torch_function(embedding, (input, weight), input, weight, padding_idx=padding_idx,
                                     max_norm=max_norm, norm_type=norm_type,
                                     scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)
    return _embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)


from ._bag import embedding_bag  # noqa: E402  (F.embedding_bag on the bag kernels)

__all__.append("embedding_bag")
