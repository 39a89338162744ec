"""fastembed's benchmark suite: ``python -m bench`` (seed shapes) or ``python -m bench --all``.

Every case is one operation on one shape, done by fastembed, numpy idioms,
PyTorch (when installed), the pure-Python reference (seed shapes) and the memory
limit, checked equal before it is timed. See bench/run.py for the options.
"""
