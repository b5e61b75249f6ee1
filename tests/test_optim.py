"""The optimiser's parameter groups, mixed-precision options and torch.compile of a network,
checked on the CPU."""
import pytest
import torch

from networks import build_model
from utils.builders import compile_network
from utils.config import Config
from utils.errors import InputError
from utils.optim import AMP_DTYPES, autocast, build_optimizer, make_scaler
from utils.runtime import check_choices


def amp_config(**overrides):
    values = {"amp": True, "amp_dtype": "float16", "lr": 1e-3, "weight_decay": 0.0,
              "scheduler": "poly", "poly_power": 0.9, "plateau_factor": 0.5, "plateau_patience": 1,
              "encoder_lr_scale": 1.0, "layer_decay": 1.0}
    return Config({**values, **overrides})


class NumberedEncoder(torch.nn.Module):
    """Embeddings, `depth` blocks and a final norm, numbered 0 .. depth + 1 like the DINOv2 ViT."""

    def __init__(self, depth=3):
        super().__init__()
        self.depth = depth
        self.embed = torch.nn.Linear(2, 2)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(2)

    def layer_of(self, name):
        if name.startswith("embed."):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1


class Network(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = NumberedEncoder()
        self.decoder = torch.nn.Linear(2, 3)


def learning_rates(optimizer):
    """{id(parameter): its learning rate} over every parameter group."""
    return {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}


def test_one_learning_rate_by_default_in_the_parameters_order():
    model = build_model("segformer_b0", num_classes=3)
    optimizer = build_optimizer(amp_config(), model)
    assert len(optimizer.param_groups) == 1  # checkpoints of earlier runs resume unchanged
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in model.parameters()]


def test_the_encoder_learning_rate_and_its_layer_wise_decay():
    model = Network()
    optimizer = build_optimizer(amp_config(lr=0.1, encoder_lr_scale=0.5, layer_decay=0.8), model)
    rates = learning_rates(optimizer)
    # encoder layer l of L = 3 at 0.1 * 0.5 * 0.8 ** (4 - l); the decoder at 0.1
    expected = {0: 0.05 * 0.4096, 1: 0.05 * 0.512, 2: 0.05 * 0.64, 3: 0.05 * 0.8, 4: 0.05}
    encoder = model.encoder
    for name, parameter in encoder.named_parameters():
        assert rates[id(parameter)] == pytest.approx(expected[encoder.layer_of(name)])
    assert all(rates[id(p)] == pytest.approx(0.1) for p in model.decoder.parameters())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # the group the logs report
    assert len(optimizer.param_groups) == 6


def test_frozen_parameters_are_left_out_and_the_encoder_scale_needs_no_numbering():
    model = build_model("segformer_b0", num_classes=3)
    model.encoder.stages[0].requires_grad_(False)
    optimizer = build_optimizer(amp_config(lr=0.01, encoder_lr_scale=0.1), model)
    rates = learning_rates(optimizer)
    assert set(rates) == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(rates[id(p)] == pytest.approx(0.001) for p in model.encoder.stages[1].parameters())
    assert all(rates[id(p)] == pytest.approx(0.01) for p in model.decoder.parameters())


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
def test_the_scaler_runs_only_for_float16_on_cuda():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert make_scaler(cuda, amp_config()).is_enabled() == torch.cuda.is_available()
    assert not make_scaler(cuda, amp_config(amp_dtype="bfloat16")).is_enabled()
    assert not make_scaler(cuda, amp_config(amp=False)).is_enabled()
    assert not make_scaler(cpu, amp_config()).is_enabled()


def test_autocast_is_off_on_the_cpu():
    with autocast(torch.device("cpu"), amp_config(amp_dtype="bfloat16")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert set(AMP_DTYPES) == {"float16", "bfloat16"}


def test_an_unknown_amp_dtype_is_a_one_line_error():  # refused with the config, before building
    with pytest.raises(InputError, match="amp_dtype: unknown 'half'"):
        check_choices(amp_config(amp_dtype="half"))


@pytest.mark.parametrize("name, kwargs", [("attunet", {"base": 4}), ("segformer_b0", {})])
def test_compile_keeps_weight_names_and_outputs(name, kwargs):
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=3, **kwargs).eval()
    images = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        eager = model(images)
    names = list(model.state_dict())
    compile_network(model, backend="eager")  # the dynamo path without inductor's compile time
    compiled_parts = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None)]
    assert compiled_parts, "nothing was compiled"
    assert list(model.state_dict()) == names  # no _orig_mod. prefix: checkpoints stay loadable
    with torch.no_grad():
        torch.testing.assert_close(model(images), eager)
