"""Measurement tools: benchmarks (``bench``: inference, ``bench_train``: training steps and peak FLOP/s)
and the parity check against the official implementation (``golden``)."""
