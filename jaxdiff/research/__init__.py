"""Paper methods: one module per method (e.g. ``jaxdiff.research.<method>``), each built from the library
below it (train_lib, extractors, nn, solvers, timesteps, ...).

This package sits just below the entry points in the layer order (``.importlinter``, docs/ARCHITECTURE.md):
it may import anything in ``jaxdiff`` except the entry points (the CLI modules and their helpers), and nothing else in ``jaxdiff`` imports it, so
a method's code stays out of the library until it is promoted into a layer below.
"""
