"""An LSTM classifier's FLOPs per image, before it is built, for the tuner's trial estimates
(``experiments/budget.py``) and the benchmarks' FLOP/s. Its parameter count is
``pipeline.model.count_parameters`` of the built model."""

from __future__ import annotations

from pipeline.data import NUM_CLASSES, SEQUENCE_SHAPES


def forward_flops(hidden_size: int, num_layers: int, bidirectional: bool = False, reading_order: str = "rows") -> int:
    """FLOPs (2 per multiply-add) of one image through the LSTM and the head, forward only.

    Every gate weight of nn.LSTM (4 gates x H x (layer input + H) per layer and direction) is one
    multiply-add per step (28 rows, or 784 pixels), and the head's once per image. Layer 0 reads a
    row (or pixel), a stacked layer the D * H outputs of the layer below (D = 2 directions when
    bidirectional). Biases and the elementwise gate math (O(H) a step) are left out. A training step
    costs about 3x this: the backward pass is about twice the forward.
    """
    seq_len, input_size = SEQUENCE_SHAPES[reading_order]
    directions = 2 if bidirectional else 1
    gates = sum(
        directions * 4 * hidden_size * ((input_size if layer == 0 else directions * hidden_size) + hidden_size)
        for layer in range(num_layers)
    )
    return 2 * (seq_len * gates + directions * hidden_size * NUM_CLASSES)
