"""Networks: shapes at any size, parameter counts against the papers, gradients, encode/decode,
the UniMatch feature-perturbation helper, pretrained MiT loading in both key namings, errors."""
import json
import re
import struct

import pytest
import torch

from networks import MODELS, build_model, forward_with_feature_perturbation
from networks.pretrained import read_safetensors
from utils.errors import InputError

SMALL_MODELS = {"attunet": {"base": 4}, "segformer_b0": {}}  # tiny enough for CPU passes


def small_model(name, in_channels=1, num_classes=3, **kwargs):
    torch.manual_seed(0)
    return build_model(name, in_channels=in_channels, num_classes=num_classes,
                       **SMALL_MODELS[name], **kwargs)


def parameter_count(model):
    return sum(parameter.numel() for parameter in model.parameters())


# ---------------------------------------------------------------- shapes and sizes
@pytest.mark.parametrize("name", SMALL_MODELS)
@pytest.mark.parametrize("size", [(64, 64), (96, 96), (250, 250), (70, 100)])
def test_logits_come_out_at_the_input_resolution(name, size):
    model = small_model(name, num_classes=5).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 1, *size))
    assert logits.shape == (1, 5, *size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_odd_sizes_are_padded_bottom_right_by_replication_and_cropped(name):
    model = small_model(name).eval()
    images = torch.randn(1, 1, 50, 60)
    padded = torch.cat([images, images[..., -1:].expand(-1, -1, -1, 4)], dim=-1)  # width 64
    padded = torch.cat([padded, padded[..., -1:, :].expand(-1, -1, 14, -1)], dim=-2)  # height 64
    with torch.no_grad():
        assert torch.allclose(model(images), model(padded)[..., :50, :60], atol=1e-5)


def test_encoder_feature_shapes():
    images = torch.randn(2, 1, 250, 250)  # padded to 256 (SegFormer: multiple of 32)
    with torch.no_grad():
        segformer = small_model("segformer_b0").eval().encode(images)
        attunet = small_model("attunet").eval().encode(images)
    assert [tuple(f.shape) for f in segformer] == [(2, 32, 64, 64), (2, 64, 32, 32),
                                                   (2, 160, 16, 16), (2, 256, 8, 8)]
    assert [tuple(f.shape) for f in attunet] == [(2, 4 * 2 ** i, 256 // 2 ** i, 256 // 2 ** i)
                                                 for i in range(5)]


# ---------------------------------------------------------------- parameter counts
def attunet_parameter_count(in_channels, num_classes, base, conv_bias):
    """Counted by hand from the architecture: 3×3 convs, BatchNorm (2 per channel), gates."""
    def conv(cin, cout, kernel):
        return kernel * kernel * cin * cout + (cout if conv_bias else 0)

    def conv_bn(cin, cout, kernel):
        return conv(cin, cout, kernel) + 2 * cout

    def double_conv(cin, cout):
        return conv_bn(cin, cout, 3) + conv_bn(cout, cout, 3)

    widths = [base * 2 ** level for level in range(5)]
    total = double_conv(in_channels, widths[0])
    total += sum(double_conv(widths[i], widths[i + 1]) for i in range(4))
    for channels in widths[:-1]:
        inner = channels // 2
        total += conv_bn(2 * channels, channels, 3)                  # upsampling conv
        total += 2 * conv_bn(channels, inner, 1) + conv_bn(inner, 1, 1)  # attention gate
        total += double_conv(2 * channels, channels)
    return total + widths[0] * num_classes + num_classes            # classifier (with bias)


def test_attunet_parameter_count():
    for in_channels, num_classes, base in [(1, 55, 4), (1, 1, 16), (3, 2, 8)]:
        model = build_model("attunet", in_channels, num_classes, base=base)
        assert parameter_count(model) == attunet_parameter_count(in_channels, num_classes, base,
                                                                 conv_bias=False)
    with torch.device("meta"):
        usual = parameter_count(build_model("attunet", 1, 1, base=64))
    # the widely used implementation (3 inputs, 1 class, biases on every conv) has 34,878,573;
    # ours drops the biases that BatchNorm makes redundant
    assert attunet_parameter_count(3, 1, 64, conv_bias=True) == 34_878_573
    assert usual == attunet_parameter_count(1, 1, 64, conv_bias=False)
    assert abs(usual / 34.9e6 - 1) < 0.002


PAPER_MILLIONS = {"b0": 3.8, "b1": 13.7, "b2": 27.5, "b3": 47.3, "b4": 64.1, "b5": 84.7}


@pytest.mark.parametrize("variant", PAPER_MILLIONS)
def test_segformer_parameter_count_matches_the_paper(variant):
    """Table 1 of the paper, at 150 classes (ADE20K) and RGB input, given to 0.1M."""
    with torch.device("meta"):
        count = parameter_count(build_model(f"segformer_{variant}", 3, 150))
    paper = PAPER_MILLIONS[variant] * 1e6
    assert round(count / 1e6, 1) == PAPER_MILLIONS[variant]
    # B0 has 3,752,694 (Hugging Face lists 3.75M for the same model): 1.2 % under the rounded 3.8
    assert abs(count / paper - 1) < (0.013 if variant == "b0" else 0.01)


# ---------------------------------------------------------------- training behaviour
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_gradients_reach_every_parameter(name):
    options = {"drop_path_rate": 0.0, "dropout": 0.0} if name.startswith("segformer") else {}
    model = small_model(name, **options).train()
    logits = model(torch.randn(2, 1, 64, 64))
    (logits * torch.randn_like(logits)).sum().backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_encode_decode_round_trip_equals_forward(name):
    model = small_model(name).eval()
    images = torch.randn(2, 1, 70, 100)
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(images), images.shape[-2:]), model(images))


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_eval_mode_is_deterministic_and_layouts_agree(name):
    model = small_model(name).eval()
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        first, second = model(images), model(images)
        channels_last = model.to(memory_format=torch.channels_last)(
            images.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(images)
    assert torch.equal(first, second)
    assert torch.allclose(first, channels_last, atol=1e-4)
    assert mixed.shape == first.shape and torch.isfinite(mixed).all()


# ---------------------------------------------------------------- UniMatch FP helper
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_feature_perturbation_helper(name):
    model = small_model(name, num_classes=4)
    images = torch.randn(4, 1, 64, 64)
    torch.manual_seed(1)
    logits, logits_fp = forward_with_feature_perturbation(model.train(), images, num_perturbed=2)
    assert logits.shape == (4, 4, 64, 64) and logits_fp.shape == (2, 4, 64, 64)
    assert (logits_fp - logits[2:]).abs().max() > 1e-3  # dropout changed the perturbed copies

    model.eval()
    with torch.no_grad():
        logits, logits_fp = forward_with_feature_perturbation(model, images, num_perturbed=2)
        plain = model(images)
        # p = 1 zeroes every feature map: the same as decoding all-zero features by hand
        _, logits_zeroed = forward_with_feature_perturbation(model, images, 2, p=1.0)
        zeros = [torch.zeros_like(feature[:2]) for feature in model.encode(images)]
        by_hand = model.decode(zeros, images.shape[-2:])
        logits_none, logits_fp_none = forward_with_feature_perturbation(model, images, 0)
    assert torch.allclose(logits, plain, atol=1e-5)  # clean part = a plain forward in eval mode
    assert (logits_fp - logits[2:]).abs().max() > 1e-3  # perturbed even in eval mode
    assert torch.allclose(logits_zeroed, by_hand, atol=1e-5)
    assert torch.allclose(logits_none, plain, atol=1e-4) and logits_fp_none.shape[0] == 0


# ---------------------------------------------------------------- registry and errors
def test_registry_names_and_errors():
    assert set(MODELS) == ({"attunet"} | {f"segformer_b{i}" for i in range(6)}
                           | {f"dinov2_{size}" for size in "sbl"})
    with pytest.raises(InputError, match="attunet, segformer_b0.*segformer_b5"):
        build_model("unet")
    with pytest.raises(InputError, match="unknown option.*depth.*valid options: base, dropout"):
        build_model("attunet", depth=3)
    with pytest.raises(InputError, match="base must be a positive integer"):
        build_model("attunet", base=0)
    with pytest.raises(InputError, match="only for the SegFormer"):
        build_model("attunet", base=4, pretrained="mit_b0.pth")


# ---------------------------------------------------------------- pretrained checkpoints
# Our encoder names -> official NVlabs names, written from the two repositories' module names.
OURS_TO_NVLABS = [
    (r"^stages\.(\d)\.patch_embed\.", lambda match: f"patch_embed{int(match[1]) + 1}."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.", lambda match: f"block{int(match[1]) + 1}.{match[2]}."),
    (r"^stages\.(\d)\.norm\.", lambda match: f"norm{int(match[1]) + 1}."),
    (r"attn\.reduce_norm\.", "attn.norm."),
    (r"attn\.reduce\.", "attn.sr."),
    (r"mlp\.dwconv\.", "mlp.dwconv.dwconv."),
]
# NVlabs -> Hugging Face, the renaming rules of transformers' convert_segformer_original_to_pytorch
NVLABS_TO_HUGGING_FACE = [
    (r"^", "segformer.encoder."),
    (r"patch_embed(\d)", lambda match: f"patch_embeddings.{int(match[1]) - 1}"),
    (r"norm", "layer_norm"),
    (r"encoder\.layer_norm(\d)", lambda match: f"encoder.layer_norm.{int(match[1]) - 1}"),
    (r"layer_norm([12])", r"layer_norm_\1"),
    (r"block(\d)", lambda match: f"block.{int(match[1]) - 1}"),
    (r"attn\.q", "attention.self.query"),
    (r"attn\.proj", "attention.output.dense"),
    (r"attn", "attention.self"),
    (r"fc1", "dense1"),
    (r"fc2", "dense2"),
]


def rename(key, rules):
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def nvlabs_state_dict(segformer):
    state = {rename(key, OURS_TO_NVLABS): value.clone()
             for key, value in segformer.encoder.state_dict().items()}
    state["head.weight"] = torch.randn(1000, state["norm4.weight"].shape[0])  # ImageNet head
    state["head.bias"] = torch.randn(1000)
    return state


def hugging_face_state_dict(segformer):
    state = {}
    for key, value in nvlabs_state_dict(segformer).items():
        if key.startswith("head."):
            continue
        key = rename(key, NVLABS_TO_HUGGING_FACE)
        if ".kv." in key:  # HF splits the fused projection into key and value (keys first)
            half = value.shape[0] // 2
            state[key.replace(".kv.", ".key.")] = value[:half]
            state[key.replace(".kv.", ".value.")] = value[half:]
        else:
            state[key] = value
    state["decode_head.classifier.weight"] = torch.randn(150, 256, 1, 1)
    return state


SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64"}


def write_safetensors(path, tensors):
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in tensors.items():
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))


@pytest.fixture(scope="module")
def reference_b0():
    torch.manual_seed(123)
    model = build_model("segformer_b0", in_channels=3, num_classes=7).eval()
    with torch.no_grad():  # non-zero biases and norms: a LayerNorm would hide a rescaled stem
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def write_checkpoint(directory, layout, reference):
    if layout == "nvlabs.pth":
        path, state = directory / "mit_b0.pth", nvlabs_state_dict(reference)
    elif layout == "mmseg.pth":  # a full mmseg SegFormer checkpoint: wrapped, backbone-prefixed
        path = directory / "segformer_b0_ade.pth"
        state = {"meta": {"epoch": 1}, "state_dict": {
            f"backbone.{key}": value for key, value in nvlabs_state_dict(reference).items()}}
    elif layout == "hf.bin":
        path, state = directory / "pytorch_model.bin", hugging_face_state_dict(reference)
    else:
        path = directory / "model.safetensors"
        write_safetensors(path, hugging_face_state_dict(reference))
        return path
    torch.save(state, path)
    return path


def assert_encoders_reproduce(rgb_model, gray_model, reference, size):
    """The loaded RGB model's encoder features equal the reference's; the gray model on g computes
    what the reference computes on (g, g, g). size = (H, W) of the random test images."""
    rgb_images, gray_images = torch.randn(2, 3, *size), torch.randn(2, 1, *size)
    with torch.no_grad():
        for ours, expected in zip(rgb_model.encode(rgb_images), reference.encode(rgb_images)):
            assert torch.equal(ours, expected)
        for ours, expected in zip(gray_model.encode(gray_images),
                                  reference.encode(gray_images.expand(-1, 3, -1, -1))):
            assert torch.allclose(ours, expected, atol=1e-4)


@pytest.mark.parametrize("layout", ["nvlabs.pth", "mmseg.pth", "hf.bin", "hf.safetensors"])
def test_pretrained_loading_reproduces_the_encoder(layout, reference_b0, tmp_path, capsys):
    path = write_checkpoint(tmp_path, layout, reference_b0)
    rgb_model = build_model("segformer_b0", in_channels=3, num_classes=5, pretrained=path).eval()
    assert "pretrained: 176 MiT-B0 encoder tensors" in capsys.readouterr().out
    gray_model = build_model("segformer_b0", in_channels=1, num_classes=5, pretrained=path).eval()
    assert "summing the RGB weights" in capsys.readouterr().out
    assert_encoders_reproduce(rgb_model, gray_model, reference_b0, (32, 32))


def test_mismatched_or_broken_checkpoints_raise_input_errors(reference_b0, tmp_path):
    with torch.device("meta"):  # only the shapes matter: skip the slow initialisation
        b1 = build_model("segformer_b1", in_channels=3).to_empty(device="cpu")
    torch.save(nvlabs_state_dict(b1), tmp_path / "mit_b1.pth")
    with pytest.raises(InputError, match=r"mit_b1\.pth: .*wrong shape.*MiT-B0 checkpoint"):
        build_model("segformer_b0", pretrained=tmp_path / "mit_b1.pth")

    deeper = nvlabs_state_dict(reference_b0)
    deeper["block1.2.norm1.weight"] = torch.ones(32)
    torch.save(deeper, tmp_path / "deeper.pth")
    with pytest.raises(InputError, match=r"deeper\.pth: .*1 unexpected.*block1\.2\.norm1"):
        build_model("segformer_b0", pretrained=tmp_path / "deeper.pth")

    partial = nvlabs_state_dict(reference_b0)
    del partial["block4.1.mlp.fc2.bias"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(InputError, match=r"partial\.pth: .*1 encoder tensors missing"):
        build_model("segformer_b0", pretrained=tmp_path / "partial.pth")

    torch.save({"fc.weight": torch.ones(2, 2)}, tmp_path / "resnet.pth")
    with pytest.raises(InputError, match=r"resnet\.pth: no encoder keys"):
        build_model("segformer_b0", pretrained=tmp_path / "resnet.pth")

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match=r"garbage\.pth: cannot be read"):
        build_model("segformer_b0", pretrained=tmp_path / "garbage.pth")

    write_safetensors(tmp_path / "cut.safetensors", hugging_face_state_dict(reference_b0))
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.safetensors: not a valid safetensors file"):
        build_model("segformer_b0", pretrained=tmp_path / "cut.safetensors")

    with pytest.raises(InputError, match=r"missing\.pth: pretrained weights file not found"):
        build_model("segformer_b0", pretrained=tmp_path / "missing.pth")


def test_safetensors_reader_round_trips_every_dtype(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(),
               "bf16": torch.randn(2, 2).bfloat16(), "i64": torch.arange(6).reshape(2, 3),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    write_safetensors(tmp_path / "all.safetensors", tensors)
    read = read_safetensors(tmp_path / "all.safetensors")
    assert set(read) == set(tensors)
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
