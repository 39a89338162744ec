"""fastembed's benchmark suite: ``python -m bench`` (seed shapes) or ``python -m bench --all``.

Every case is one operation on one shape, done by fastembed, numpy idioms,
PyTorch (when installed), the pure-Python reference (seed shapes) and the memory
limit, checked equal before it is timed. A case that moves less than 1 MiB has no
memory limit: its add measures numpy's call overhead and is labelled so
(bench/memlimit.py). The threads column says what each method ran on
(bench/threads.py). The ops train and adapter (bench/train.py) time training steps
per optimizer and autograd round trips, each row against the torch row doing the
same thing. The op bag (bench/bag.py) times bags of 1, 8 and 64 ids reduced by sum,
mean or max, forward and backward, at the medium and wide shapes: it runs when asked
(``--ops bag``) or with ``--all``. ``--dtypes`` runs forward, train and bag once more per other
table dtype (float64, float16, bfloat16) as cases named by op and dtype (``train float16``):
bench/cases.py says what each has. See bench/run.py for the options.
"""
