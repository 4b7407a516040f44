"""``summary(model, input_shape)``: a Keras-like table of layers, output shapes and parameter counts.

Works for any ``nn.Module``: one zero batch goes through the model in eval mode and forward hooks
on the leaf modules (and on modules that own parameters directly) record each output shape::

    >>> import torch.nn as nn, imclass
    >>> n = imclass.summary(nn.Conv2d(1, 1, 3, stride=2), (1, 7, 7), print_fn=lambda line: None)
    >>> n  # 3*3 weights + 1 bias; the output is 3x3 = (7 - 3) / 2 + 1
    10
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from imclass.nn.shapes import to_channels_first

__all__ = ["LayerRow", "summary", "summary_rows"]


@dataclass
class LayerRow:
    """One line of the summary: a module call, its output shape (batch as ``None``) and own parameters."""

    name: str
    kind: str
    output_shape: tuple[int | None, ...] | None
    params: int
    arithmetic: str = ""


def _shape_of(output: Any) -> tuple[int | None, ...] | None:
    if isinstance(output, torch.Tensor):
        return (None, *output.shape[1:])
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return _shape_of(output[0])
    return None


def _arithmetic(module: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int]) -> str:
    # The course's (W - F + 2P) / S + 1 for the width of convolutions and pooling windows.
    if not isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) or len(in_shape) != 4:
        return ""

    def first(v: Any) -> int:
        return v[-1] if isinstance(v, (tuple, list)) else v

    k, s, p = first(module.kernel_size), first(module.stride), first(module.padding)
    if isinstance(p, str):  # padding="same" given to torch directly
        return f"'{p}' -> {out_shape[-1]}"
    return f"({in_shape[-1]} - {k} + 2*{p})/{s} + 1 = {out_shape[-1]}"


def summary_rows(model: nn.Module, input_shape: int | Sequence[int] | None = None) -> list[LayerRow]:
    """The rows of :func:`summary`, one per leaf-module call, in execution order."""
    shape = _input_shape(model, input_shape)
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    names = {module: name for name, module in model.named_modules()}
    seen: set[nn.Module] = set()
    rows: list[LayerRow] = []

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        own = 0 if module in seen else sum(p.numel() for p in module.parameters(recurse=False))
        seen.add(module)
        in_shape = inputs[0].shape if inputs and isinstance(inputs[0], torch.Tensor) else ()
        out = _shape_of(output)
        rows.append(LayerRow(names.get(module) or type(module).__name__, type(module).__name__, out, own,
                             _arithmetic(module, in_shape, out or ())))

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if next(m.children(), None) is None or next(m.parameters(recurse=False), None) is not None
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return rows


def _input_shape(model: nn.Module, input_shape: int | Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError("expected input_shape, e.g. summary(model, (3, 32, 32)), received None")
    return to_channels_first(input_shape)


def summary(model: nn.Module, input_shape: int | Sequence[int] | None = None, *, arithmetic: bool = False,
            print_fn: Callable[[str], Any] = print) -> int:
    """Print a table of layers, output shapes and parameter counts; return the total parameter count.

    ``input_shape`` is one example's shape without batch (``(3, 32, 32)``, or channels-last
    ``(32, 32, 3)``); a ``Sequential`` knows its own. ``arithmetic=True`` adds the course's
    ``(W - F + 2P)/S + 1`` for every convolution and pooling row.
    """
    rows = summary_rows(model, input_shape)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def fmt_shape(shape: tuple[int | None, ...] | None) -> str:
        if shape is None:
            return "multiple"
        return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"

    table = [(f"{r.name} ({r.kind})", fmt_shape(r.output_shape), f"{r.params:,}", r.arithmetic) for r in rows]
    header = ("Layer (type)", "Output Shape", "Param #", "(W - F + 2P)/S + 1" if arithmetic else "")
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(4)]

    def line(cells: tuple[str, ...]) -> str:
        text = f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]:>{widths[2]}}"
        return (text + f"  {cells[3]}" if arithmetic else text).rstrip()

    rule_width = len(line(header))
    print_fn(f'Model: "{type(model).__name__}"  input: {fmt_shape((None, *_input_shape(model, input_shape)))}')
    print_fn("=" * rule_width)
    print_fn(line(header))
    print_fn("-" * rule_width)
    for cells in table:
        print_fn(line(cells))
    print_fn("=" * rule_width)
    print_fn(f"Total params: {total:,}")
    print_fn(f"Trainable params: {trainable:,}")
    print_fn(f"Non-trainable params: {total - trainable:,}")
    final = getattr(model, "final_activation", None)
    if final:
        print_fn(f"Final activation: {final} (not applied in forward; the model returns logits)")
    return total
