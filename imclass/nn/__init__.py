"""The layer machinery, one floor above the ground (data, activations, losses, optimizers) and below
``imclass.models``: the symbolic graph (``symbolic``: ``KerasTensor``, ``Node``, ``Input``,
``call_layer``) below ``Layer`` (``layer``: the base class, ``layer_from_config``, the unique-naming
rule), the shape rules (``shapes``) and the course's layers (``core``, ``conv``, ``merge``,
``model_layer``). It never imports ``imclass.models``; ``Sequential`` and ``Model`` register
themselves with ``ModelLayer`` when they are defined. The public face is ``imclass.layers``.
"""
