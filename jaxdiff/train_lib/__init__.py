"""Training pieces: config schema, model wiring, optimizer, train state and step, orbax checkpoints,
metric writing, sampling from trained parameters. ``train.py`` strings them together."""
