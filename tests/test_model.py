"""LSTMClassifier: shapes for every option, the head's reading of h_n, the initial state, and its cost."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.cost import forward_flops
from pipeline.model import LSTMClassifier, build_model, count_parameters


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("input_size, seq_len", [(28, 28), (1, 784)])
def test_logits_shape_for_every_option(num_layers, bidirectional, input_size, seq_len):
    model = LSTMClassifier(
        input_size=input_size,
        hidden_size=8,
        num_layers=num_layers,
        bidirectional=bidirectional,
        dropout=0.1 if num_layers > 1 else 0.0,
    )
    assert model(torch.rand(3, seq_len, input_size)).shape == (3, 10)


def test_bias_false_has_no_bias_parameters():
    model = LSTMClassifier(hidden_size=8, bias=False)
    assert not [name for name, _ in model.lstm.named_parameters() if "bias" in name]
    assert model(torch.rand(2, 28, 28)).shape == (2, 10)


def test_bidirectional_head_reads_forward_last_step_and_backward_first_step():
    torch.manual_seed(0)
    model = LSTMClassifier(hidden_size=6, num_layers=2, bidirectional=True).eval()
    x = torch.rand(4, 28, 28)
    output, _ = model.lstm((x - model.input_mean) / model.input_std)  # (B, T, 2H)
    expected = model.head(torch.cat([output[:, -1, :6], output[:, 0, 6:]], dim=1))
    torch.testing.assert_close(model(x), expected)
    wrong = model.head(output[:, -1])  # the tutorial's reading
    assert not torch.allclose(model(x), wrong)


def test_unidirectional_head_reads_the_last_step():
    torch.manual_seed(0)
    model = LSTMClassifier(hidden_size=6, num_layers=2).eval()
    x = torch.rand(4, 28, 28)
    output, _ = model.lstm((x - model.input_mean) / model.input_std)
    torch.testing.assert_close(model(x), model.head(output[:, -1]))


class FinalStatesWithASingletonDimension(torch.nn.Module):
    """nn.LSTM as torch 2.11's export traces it: h_n and c_n come out (num_layers * D, 1, B, H)."""

    def __init__(self, lstm: torch.nn.LSTM):
        super().__init__()
        self.inner, self.num_layers, self.hidden_size = lstm, lstm.num_layers, lstm.hidden_size

    def forward(self, x, state):
        output, (h_n, c_n) = self.inner(x, state)
        return output, (h_n.unsqueeze(1), c_n.unsqueeze(1))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_head_reads_the_same_final_states_as_torch_2_11s_export_traces_them(bidirectional):
    """The GPU machine logs models with torch 2.11: a head that read h_n's traced shape as it
    comes made a bidirectional model's exported graph accept only its example's batch size."""
    torch.manual_seed(0)
    model = LSTMClassifier(hidden_size=6, num_layers=2, bidirectional=bidirectional).eval()
    x = torch.rand(3, 28, 28)  # an odd batch: a reshape across the batch dimension mixes its images
    expected = model(x)
    model.lstm = FinalStatesWithASingletonDimension(model.lstm)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_missing_state_means_zeros_of_the_documented_shape(bidirectional):
    torch.manual_seed(0)
    model = LSTMClassifier(hidden_size=5, num_layers=2, bidirectional=bidirectional).eval()
    x = torch.rand(3, 28, 28)
    zeros = torch.zeros(2 * (2 if bidirectional else 1), 3, 5)  # (num_layers * num_directions, B, H)
    torch.testing.assert_close(model(x), model(x, (zeros, zeros)))
    assert not torch.allclose(model(x), model(x, (zeros + 0.5, zeros)))
    with pytest.raises(RuntimeError):
        model(x, (zeros[:1], zeros[:1]))


def test_initial_state_follows_the_input_dtype():
    model = LSTMClassifier(hidden_size=4, num_layers=1).double()
    assert model(torch.rand(2, 28, 28, dtype=torch.float64)).dtype == torch.float64


def test_dropout_with_one_layer_is_rejected_clearly():
    with pytest.raises(ValueError, match="num_layers >= 2"):
        LSTMClassifier(hidden_size=4, num_layers=1, dropout=0.5)


def test_forget_gate_starts_open():
    model = LSTMClassifier(hidden_size=4, num_layers=2)
    for layer in range(2):
        bias = model.lstm.get_parameter(f"bias_ih_l{layer}") + model.lstm.get_parameter(f"bias_hh_l{layer}")
        assert torch.all(bias[4:8] == 1.0)


def test_build_model_follows_the_config():
    model = build_model(TrainConfig(hidden_size=12, num_layers=3, bidirectional=True, reading_order="pixels", dropout=0.1))
    assert (model.lstm.input_size, model.lstm.hidden_size, model.lstm.num_layers) == (1, 12, 3)
    assert model.lstm.bidirectional and model.lstm.batch_first and model.lstm.dropout == 0.1
    assert model.head.in_features == 24


def test_the_cost_counts_stacked_layers_at_their_own_input():
    # Layer 0 reads a row of 28 pixels, layer 1 the 256 outputs of layer 0: 4 gates x H x (input + H).
    gates = 4 * 256 * (28 + 256) + 4 * 256 * (256 + 256)
    assert forward_flops(256, 2) == 2 * (28 * gates + 256 * 10)  # 28 steps, then the head once
    model = build_model(TrainConfig(hidden_size=256, num_layers=2))  # the same gates, + biases and the head's
    assert count_parameters(model) == gates + 2 * 8 * 256 + 256 * 10 + 10


@pytest.mark.parametrize(
    "hidden_size, num_layers, bidirectional, reading_order", [(256, 2, False, "rows"), (8, 3, True, "pixels")]
)
def test_the_flops_count_each_weight_of_the_built_model(hidden_size, num_layers, bidirectional, reading_order):
    """One multiply-add per gate weight and step, and per head weight once; biases left out."""
    config = TrainConfig(hidden_size=hidden_size, num_layers=num_layers, bidirectional=bidirectional, reading_order=reading_order)
    model = build_model(config)
    biases = sum(p.numel() for name, p in model.lstm.named_parameters() if name.startswith("bias_"))
    gates, head = count_parameters(model.lstm) - biases, model.head.weight.numel()
    steps = 784 if reading_order == "pixels" else 28
    assert forward_flops(hidden_size, num_layers, bidirectional, reading_order) == 2 * (steps * gates + head)
