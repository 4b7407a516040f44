"""Workflows above the engine and the models: ``training`` (``imclass train`` from a config: data,
model by name, callbacks, run folder) and ``recipes`` (the fast CIFAR-10 recipe)."""
