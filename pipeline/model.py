"""The classifier: an nn.LSTM reads a sequence, a Linear layer reads its final hidden state."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.data import NUM_CLASSES, SEQUENCE_SHAPES


class LSTMClassifier(nn.Module):
    """Classify a (batch, seq_len, input_size) sequence by the last LSTM layer's final state.

    The constructor takes nn.LSTM's own parameters; ``batch_first`` is always True here. For a bidirectional
    LSTM the head reads the forward state after the last step and the backward state after the *first* step
    (which is where the backward pass ends): ``output[:, -1]`` would give the backward direction one step of input.
    """

    def __init__(
        self,
        input_size: int = 28,
        hidden_size: int = 256,
        num_layers: int = 2,
        num_classes: int = NUM_CLASSES,
        bias: bool = True,
        dropout: float = 0.0,
        bidirectional: bool = False,
        input_mean: float = 0.0,
        input_std: float = 1.0,
    ):
        super().__init__()
        if dropout > 0 and num_layers == 1:
            raise ValueError(f"dropout={dropout} needs num_layers >= 2: nn.LSTM applies it between stacked layers")
        self.num_directions = 2 if bidirectional else 1
        self.lstm = nn.LSTM(
            input_size,
            hidden_size,
            num_layers,
            bias=bias,
            batch_first=True,
            dropout=dropout,
            bidirectional=bidirectional,
        )
        self.head = nn.Linear(self.num_directions * hidden_size, num_classes)
        # Standardising inside the model keeps the logged model's contract simple: pixels in [0, 1].
        self.register_buffer("input_mean", torch.tensor(float(input_mean)))
        self.register_buffer("input_std", torch.tensor(float(input_std)))
        if bias:
            # A forget-gate bias of 1 lets gradients reach early steps from the start
            # (Jozefowicz et al., 2015); nn.LSTM's gate order is input, forget, cell, output.
            with torch.no_grad():
                for name, value in self.lstm.named_parameters():
                    if name.startswith("bias_"):  # the sum bias_ih + bias_hh is what counts
                        value[hidden_size : 2 * hidden_size] = 1.0 if name.startswith("bias_ih") else 0.0

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        # x: (B, T, input_size); state = (h_0, c_0), each (num_layers * D, B, H): zeros when None.
        x = (x - self.input_mean) / self.input_std  # pixels in [0, 1] -> about zero mean, unit variance
        if state is None:
            # Built from x, not left to nn.LSTM: torch.export would bake nn.LSTM's own zeros in as
            # CPU constants, and the logged model would then fail on any other device.
            zeros = x.new_zeros((self.lstm.num_layers * self.num_directions, x.shape[0], self.lstm.hidden_size))
            state = (zeros, zeros)  # (num_layers * D, B, H) each
        _, (h_n, _) = self.lstm(x, state)  # h_n: (num_layers * D, B, H), layer-major, forward first
        # Reshaped to that shape: torch 2.11's export traces h_n as (num_layers * D, 1, B, H), and a logged
        # bidirectional model would then accept only the example's batch size.
        h_n = h_n.reshape(-1, x.shape[0], self.lstm.hidden_size)
        last_layer = h_n[-self.num_directions :]  # (D, B, H)
        features = last_layer.transpose(0, 1).reshape(x.shape[0], -1)  # (B, D * H)
        return self.head(features)  # (B, num_classes)


def build_model(config: TrainConfig, input_mean: float = 0.0, input_std: float = 1.0) -> LSTMClassifier:
    """The model ``config`` describes; ``input_mean``/``input_std`` of the training pixels in [0, 1]."""
    _, input_size = SEQUENCE_SHAPES[config.reading_order]
    return LSTMClassifier(
        input_size=input_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        dropout=config.dropout,
        bidirectional=config.bidirectional,
        input_mean=input_mean,
        input_std=input_std,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
