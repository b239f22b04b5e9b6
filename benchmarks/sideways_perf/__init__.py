"""Measurement and models of depth-parallel Sideways' throughput, for ``benchmarks/``: analysis
tools beside the training package, which never imports them."""
