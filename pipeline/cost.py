"""What an LSTM classifier of ``pipeline/model.py`` costs to run: its FLOPs per image, before it is
built (its parameter count is ``pipeline.model.count_parameters`` of the built model).

One cost model, for the tuner's trial estimates (``experiments/studies.py``) and the benchmarks'
FLOP/s. Layer l of ``num_layers`` reads the image's row (or pixel) when l = 0 and the D * H
outputs of the layer below otherwise (D = 2 directions when bidirectional, else 1), so stacked
layers cost more than the first: counting every layer at the first layer's input undercounts them.
"""

from __future__ import annotations

from pipeline.data import NUM_CLASSES, SEQUENCE_SHAPES


def _gate_weights(hidden_size: int, num_layers: int, bidirectional: bool, input_size: int) -> int:
    """nn.LSTM's weight_ih and weight_hh entries: 4 gates x H x (input + H) per layer and direction."""
    directions = 2 if bidirectional else 1
    total = 0
    for layer in range(num_layers):
        layer_input = input_size if layer == 0 else directions * hidden_size
        total += directions * 4 * hidden_size * (layer_input + hidden_size)
    return total


def forward_flops(hidden_size: int, num_layers: int, bidirectional: bool = False, reading_order: str = "rows") -> int:
    """FLOPs (2 per multiply-add) of one image through the LSTM and the head, forward only.

    Every gate weight is one multiply-add per step (28 rows, or 784 pixels), and the head's once
    per image. Biases and the elementwise gate math (O(H) a step) are left out. A training step
    costs about 3x this: the backward pass is about twice the forward.
    """
    seq_len, input_size = SEQUENCE_SHAPES[reading_order]
    head = (2 if bidirectional else 1) * hidden_size * NUM_CLASSES
    return 2 * (seq_len * _gate_weights(hidden_size, num_layers, bidirectional, input_size) + head)
