"""The ops: one module per op, named as the op is in every layer (``kernels/<op>.py``, ``csrc/cpu/<op>.cpp``,
``csrc/cuda/<op>.cu``, ``csrc/include/streamkern/ops/<op>.h``, ``tests/test_<op>.py``, ``bench/bench_<op>.py``),
each holding the public function, its argument checks and its backend table; ``reference/<op>.py`` holds the
eager ``"torch"`` backend and the seed code it reproduces. The public names are re-exported by ``streamkern``.
"""
