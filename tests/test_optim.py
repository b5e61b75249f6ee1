"""Mixed-precision options and torch.compile of a network, checked on the CPU."""
import pytest
import torch

from networks import build_model
from utils.builders import compile_network
from utils.config import Config
from utils.errors import InputError
from utils.optim import AMP_DTYPES, autocast, make_scaler
from utils.runtime import check_choices


def amp_config(**overrides):
    values = {"amp": True, "amp_dtype": "float16", "lr": 1e-3, "weight_decay": 0.0,
              "scheduler": "poly", "poly_power": 0.9, "plateau_factor": 0.5, "plateau_patience": 1}
    return Config({**values, **overrides})


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
