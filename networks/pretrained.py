"""Load pretrained MiT encoder weights into a SegFormer from a local file (never downloads).

Two key namings are understood, detected from the file:
- NVlabs (the official `mit_b0.pth` … `mit_b5.pth`, and `backbone.`-prefixed mmseg checkpoints):
  `patch_embed1.proj.weight`, `block1.0.attn.q.weight`, `block1.0.attn.kv.weight` (keys and
  values fused, keys first), `block1.0.attn.sr.weight`, `block1.0.mlp.dwconv.dwconv.weight`,
  `norm1.weight`;
- Hugging Face (`nvidia/mit-b0` … and the `segformer-bX-…` fine-tuned models): the same tensors
  as `segformer.encoder.patch_embeddings.0.proj.weight`, `segformer.encoder.block.0.0.attention.self
  .query.weight`, separate `…self.key` and `…self.value`, `…attention.output.dense`,
  `…mlp.dense1`, `segformer.encoder.layer_norm.0.weight` (the `segformer.` prefix is optional).
Files: `.pth`/`.pt`/`.bin` (torch.load, weights_only) or `.safetensors` (parsed here).

Only the encoder is loaded; the decoder and classifier keep their random initialisation. Every
encoder tensor of the model must be found with the right shape, otherwise the file is for another
variant and loading stops with an InputError naming the file. Keys outside the encoder (the
ImageNet head, a decode head) are ignored and counted in the one summary line that is printed.

Input channels: the checkpoints were trained on RGB, so the stem convolution has 3 input channels.
For a gray model (in_channels = 1) its weights are summed over RGB: a gray image g fed to the RGB
stem as (g, g, g) gives Σ_c w_c * g = (Σ_c w_c) * g, so the 1-channel model computes exactly what
the pretrained model computes on the replicated gray image. For other channel counts the RGB
weights are cycled and scaled by 3 / in_channels (keeping the response to a flat image roughly).
"""
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn

from networks.segformer import SegFormer
from utils.errors import InputError

STEM_WEIGHT = "stages.0.patch_embed.proj.weight"  # key of the first convolution in the encoder

# per-block modules: our name -> (NVlabs name, Hugging Face name(s) concatenated along dim 0)
BLOCK_MODULES = {
    "norm1": ("norm1", ("layer_norm_1",)),
    "attn.q": ("attn.q", ("attention.self.query",)),
    "attn.kv": ("attn.kv", ("attention.self.key", "attention.self.value")),
    "attn.proj": ("attn.proj", ("attention.output.dense",)),
    "attn.reduce": ("attn.sr", ("attention.self.sr",)),
    "attn.reduce_norm": ("attn.norm", ("attention.self.layer_norm",)),
    "norm2": ("norm2", ("layer_norm_2",)),
    "mlp.fc1": ("mlp.fc1", ("mlp.dense1",)),
    "mlp.dwconv": ("mlp.dwconv.dwconv", ("mlp.dwconv.dwconv",)),
    "mlp.fc2": ("mlp.fc2", ("mlp.dense2",)),
}
# what an encoder key looks like in each naming, after prefixes such as `backbone.` are removed
ENCODER_KEY = {"NVlabs": re.compile(r"(patch_embed\d|block\d|norm\d)\."),
               "Hugging Face": re.compile(r"encoder\.(patch_embeddings|block|layer_norm)\.")}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def source_names(key: str, naming: str) -> tuple:
    """Our encoder key (e.g. 'stages.0.blocks.1.attn.kv.weight') -> the file's key(s)."""
    stage, rest = re.fullmatch(r"stages\.(\d+)\.(.+)", key).groups()
    stage = int(stage)
    module, parameter = rest.rsplit(".", 1)
    hugging_face = naming == "Hugging Face"
    if module.startswith("patch_embed."):
        part = module.split(".", 1)[1]
        if hugging_face:
            return (f"encoder.patch_embeddings.{stage}.{'layer_norm' if part == 'norm' else part}"
                    f".{parameter}",)
        return (f"patch_embed{stage + 1}.{part}.{parameter}",)
    if module == "norm":
        return ((f"encoder.layer_norm.{stage}.{parameter}",) if hugging_face
                else (f"norm{stage + 1}.{parameter}",))
    block, block_module = re.fullmatch(r"blocks\.(\d+)\.(.+)", module).groups()
    nvlabs_name, hugging_face_names = BLOCK_MODULES[block_module]
    if hugging_face:
        return tuple(f"encoder.block.{stage}.{block}.{name}.{parameter}"
                     for name in hugging_face_names)
    return (f"block{stage + 1}.{block}.{nvlabs_name}.{parameter}",)


def read_safetensors(path: Path) -> dict:
    """A .safetensors file -> {name: tensor}. Format: u64 little-endian header length, a JSON
    header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": …}, raw buffers."""
    data = bytearray(path.read_bytes())
    try:
        if len(data) < 8:
            raise ValueError("shorter than its 8-byte header length")
        header_length = int.from_bytes(data[:8], "little")
        body = 8 + header_length
        if body > len(data):
            raise ValueError(f"header length {header_length} exceeds the file size {len(data)}")
        header = json.loads(data[8:body].decode("utf-8"))
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name}: unsupported dtype {entry['dtype']}")
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = [int(size) for size in entry["shape"]]
            begin, end = (int(offset) for offset in entry["data_offsets"])
            count = math.prod(shape)
            if end - begin != count * dtype.itemsize or body + end > len(data) or begin < 0:
                raise ValueError(f"tensor {name}: data_offsets {[begin, end]} do not fit "
                                 f"shape {shape} of {entry['dtype']} in the file")
            tensors[name] = (torch.frombuffer(data, dtype=dtype, count=count, offset=body + begin)
                             .reshape(shape) if count else torch.empty(shape, dtype=dtype))
        return tensors
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"{path}: not a valid safetensors file ({error})") from None


def read_checkpoint(path: Path) -> dict:
    """A checkpoint file -> {name: tensor}, unwrapping {'state_dict': …} and {'model': …}."""
    if not path.is_file():
        raise InputError(f"{path}: pretrained weights file not found")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a file it cannot read
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: cannot be read as a PyTorch checkpoint ({reason})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise InputError(f"{path}: holds a {type(state).__name__}, not a dict of weights")
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def split_encoder_keys(state: dict) -> tuple:
    """{key: tensor} -> (namings found, {encoder key without wrapper prefixes: tensor}, other keys).

    Wrapper prefixes: `module.` (DataParallel), `backbone.` (mmseg), `segformer.` (Hugging Face).
    """
    namings, encoder, ignored = set(), {}, []
    for key, value in state.items():
        bare = key.removeprefix("module.").removeprefix("backbone.").removeprefix("segformer.")
        naming = next((name for name, pattern in ENCODER_KEY.items() if pattern.match(bare)), None)
        if naming is None:
            ignored.append(key)
        else:
            namings.add(naming)
            encoder[bare] = value
    return namings, encoder, ignored


def adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Stem weights [C, file_channels, k, k] -> [C, in_channels, k, k] (see the module doc)."""
    file_channels = weight.shape[1]
    if file_channels == in_channels:
        return weight
    weight = weight.float()
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_channels / file_channels)
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (file_channels / in_channels)


def load_pretrained_encoder(model: nn.Module, path) -> None:
    """Copy the MiT encoder weights in `path` into `model.encoder` (a SegFormer) and print one
    summary line. Raises InputError for a missing, unreadable or mismatched file."""
    path = Path(path)
    if not isinstance(model, SegFormer):
        raise InputError(f"{path}: pretrained weights exist only for the SegFormer encoders, "
                         f"not for {type(model).__name__}")
    namings, file_encoder, ignored = split_encoder_keys(read_checkpoint(path))
    if len(namings) != 1:
        found = "both namings mixed" if namings else "no encoder keys"
        raise InputError(f"{path}: {found}; expected MiT weights named like NVlabs "
                         f"'patch_embed1.proj.weight' or Hugging Face "
                         f"'segformer.encoder.patch_embeddings.0.proj.weight'")
    naming = namings.pop()
    expected = f"MiT-{model.variant.upper()}"
    target = model.encoder.state_dict()
    in_channels = file_channels = target[STEM_WEIGHT].shape[1]
    loaded, missing, wrong_shape, used = {}, [], [], set()
    for key, model_tensor in target.items():
        names = source_names(key, naming)
        if any(name not in file_encoder for name in names):
            missing.extend(name for name in names if name not in file_encoder)
            continue
        used.update(names)
        value = torch.cat([file_encoder[name] for name in names])
        file_shape = list(value.shape)
        if key == STEM_WEIGHT and value.dim() == 4:
            file_channels = value.shape[1]
            value = adapt_stem(value, in_channels)
        if value.shape != model_tensor.shape:
            wrong_shape.append(f"{'+'.join(names)} is {file_shape}, "
                               f"{expected} needs {list(model_tensor.shape)}")
            continue
        loaded[key] = value
    unexpected = sorted(set(file_encoder) - used)
    problems = [f"{len(items)} {kind} (first: {items[0]})"
                for kind, items in (("encoder tensors missing", missing),
                                    ("of the wrong shape", wrong_shape),
                                    ("unexpected encoder tensors", unexpected)) if items]
    if problems:
        raise InputError(f"{path}: does not fit the {expected} encoder of this model: "
                         f"{'; '.join(problems)}; is it a {expected} checkpoint?")
    model.encoder.load_state_dict(loaded)
    stem_note = ("" if file_channels == in_channels
                 else f", stem adapted from {file_channels} to {in_channels} input channel(s)"
                      f"{' by summing the RGB weights' if in_channels == 1 else ''}")
    print(f"pretrained: {len(loaded)} {expected} encoder tensors from {path} ({naming} naming)"
          f"{stem_note}; {len(ignored)} non-encoder keys ignored; decoder trained from scratch")
