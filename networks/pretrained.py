"""Load pretrained encoder weights from a local file (never downloads): MiT weights into a
SegFormer, DINOv2 weights into a DINOv2-DPT (networks/dinov2.py).

Two key namings of each are understood, detected from the file. MiT:
- NVlabs (the official `mit_b0.pth` … `mit_b5.pth`, and `backbone.`-prefixed mmseg checkpoints):
  `patch_embed1.proj.weight`, `block1.0.attn.q.weight`, `block1.0.attn.kv.weight` (keys and
  values fused, keys first), `block1.0.attn.sr.weight`, `block1.0.mlp.dwconv.dwconv.weight`,
  `norm1.weight`;
- Hugging Face (`nvidia/mit-b0` … and the `segformer-bX-…` fine-tuned models): the same tensors
  as `segformer.encoder.patch_embeddings.0.proj.weight`, `segformer.encoder.block.0.0.attention.self
  .query.weight`, separate `…self.key` and `…self.value`, `…attention.output.dense`,
  `…mlp.dense1`, `segformer.encoder.layer_norm.0.weight` (the `segformer.` prefix is optional).
DINOv2:
- official (facebookresearch/dinov2: `dinov2_vits14_pretrain.pth`,
  `dinov2_vits14_reg4_pretrain.pth` …): `cls_token`, `pos_embed`, `register_tokens`, `mask_token`,
  `patch_embed.proj.weight`, `blocks.0.norm1.weight`, `blocks.0.attn.qkv.weight` (queries, keys
  and values fused), `blocks.0.attn.proj.weight`, `blocks.0.ls1.gamma`, `blocks.0.mlp.fc1.weight`,
  `blocks.0.ls2.gamma`, `norm.weight`; also training checkpoints with block chunks
  (`blocks.1.4.…`, where the inner index is the block's) and the wrapper prefixes `teacher.`,
  `backbone.` (UniMatch V2), `pretrained.` (Depth Anything);
- Hugging Face (`facebook/dinov2-small` …, `facebook/dinov2-with-registers-small` …):
  `embeddings.cls_token`, `embeddings.position_embeddings`, `embeddings.register_tokens`,
  `embeddings.mask_token`, `embeddings.patch_embeddings.projection.weight`,
  `encoder.layer.0.attention.attention.query.weight` with separate `…key` and `…value`,
  `…attention.output.dense`, `…layer_scale1.lambda1`, `…mlp.fc1`, `layernorm.weight` (the `dinov2.`
  or `dinov2_with_registers.` prefix is optional; transformers 5's in-memory names
  `…attention.q_proj` … `…attention.o_proj` are accepted too, though its save_pretrained writes the
  published ones).
Files: `.pth`/`.pt`/`.bin` (torch.load, weights_only) or `.safetensors` (parsed here).

Only the encoder is loaded; the decoder and classifier keep their random initialisation. Every
encoder tensor of the model must be found with the right shape, otherwise the file is for another
variant and loading stops with an InputError naming the file. Keys outside the encoder (the
ImageNet head, a decode head) are ignored and counted in the one summary line that is printed.

DINOv2 position embeddings: a file trained at another resolution (another patch grid than 37×37)
has its grid resampled to 37×37 on loading, bicubically as in the forward pass. The model keeps
its shape, so its own checkpoints load without the file; the price is a second resampling when
the input's grid is not 37×37 (the file's model would resample its grid once).

Input channels: the checkpoints were trained on RGB, so the stem convolution has 3 input channels.
For a gray model (in_channels = 1) its weights are summed over RGB: a gray image g fed to the RGB
stem as (g, g, g) gives Σ_c w_c * g = (Σ_c w_c) * g, so the 1-channel model computes exactly what
the pretrained model computes on the replicated gray image. For other channel counts the RGB
weights are cycled and scaled by 3 / in_channels (keeping the response to a flat image roughly).
"""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from networks.dinov2 import DINOv2DPT, resize_position_grid
from networks.segformer import SegFormer
from utils.errors import InputError

# MiT per-block modules: our name -> (NVlabs name, Hugging Face name(s) concatenated along dim 0)
MIT_BLOCK_MODULES = {
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
# DINOv2: our tensors and modules outside the blocks -> (official name, Hugging Face name)
DINOV2_TENSORS = {
    "cls_token": ("cls_token", "embeddings.cls_token"),
    "register_tokens": ("register_tokens", "embeddings.register_tokens"),
    "pos_embed": ("pos_embed", "embeddings.position_embeddings"),
    "mask_token": ("mask_token", "embeddings.mask_token"),
}
DINOV2_MODULES = {"patch_embed": ("patch_embed.proj", "embeddings.patch_embeddings.projection"),
                  "norm": ("norm", "layernorm")}
# DINOv2 per-block modules: our name -> (official name, Hugging Face name(s) concatenated on dim 0)
DINOV2_BLOCK_MODULES = {
    "norm1": ("norm1", ("norm1",)),
    "attn.qkv": ("attn.qkv", ("attention.attention.query", "attention.attention.key",
                              "attention.attention.value")),
    "attn.proj": ("attn.proj", ("attention.output.dense",)),
    "attn_scale": ("ls1", ("layer_scale1",)),
    "norm2": ("norm2", ("norm2",)),
    "mlp.fc1": ("mlp.fc1", ("mlp.fc1",)),
    "mlp.fc2": ("mlp.fc2", ("mlp.fc2",)),
    "mlp_scale": ("ls2", ("layer_scale2",)),
}
# transformers 5 renames the attention modules in memory; its files keep the published names
TRANSFORMERS5_NAMES = {".attention.q_proj.": ".attention.attention.query.",
                       ".attention.k_proj.": ".attention.attention.key.",
                       ".attention.v_proj.": ".attention.attention.value.",
                       ".attention.o_proj.": ".attention.output.dense."}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def mit_source_names(key: str, naming: str) -> tuple:
    """Our MiT key (e.g. 'stages.0.blocks.1.attn.kv.weight') -> the file's key(s)."""
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
    nvlabs_name, hugging_face_names = MIT_BLOCK_MODULES[block_module]
    if hugging_face:
        return tuple(f"encoder.block.{stage}.{block}.{name}.{parameter}"
                     for name in hugging_face_names)
    return (f"block{stage + 1}.{block}.{nvlabs_name}.{parameter}",)


def dinov2_source_names(key: str, naming: str) -> tuple:
    """Our DINOv2 key (e.g. 'blocks.1.attn.qkv.weight') -> the file's key(s)."""
    official = naming == "official"
    if key in DINOV2_TENSORS:
        return (DINOV2_TENSORS[key][0 if official else 1],)
    module, parameter = key.rsplit(".", 1)
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if block is None:
        return (f"{DINOV2_MODULES[module][0 if official else 1]}.{parameter}",)
    official_name, hugging_face_names = DINOV2_BLOCK_MODULES[block[2]]
    if official:
        return (f"blocks.{block[1]}.{official_name}.{parameter}",)
    parameter = "lambda1" if parameter == "gamma" else parameter  # LayerScale's factors
    return tuple(f"encoder.layer.{block[1]}.{name}.{parameter}" for name in hugging_face_names)


def dinov2_canonical_key(key: str) -> str:
    """A chunked official key (`blocks.1.4.…`) or a transformers 5 in-memory name -> the name
    `dinov2_source_names` gives."""
    key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
    for in_memory, published in TRANSFORMERS5_NAMES.items():
        key = key.replace(in_memory, published)
    return key


def resample_positions(value: torch.Tensor, shape) -> tuple:
    """DINOv2 position embeddings [1, 1 + n², D] from a file -> ([1, 1 + m², D] for the model's
    `shape`, a note for the summary), the n×n patch grid resampled to m×m. Other shapes come back
    unchanged, for the shape check to report."""
    if value.dim() != 3 or value.shape[-1] != shape[-1] or value.shape[1] < 2:
        return value, ""
    side, target_side = math.isqrt(value.shape[1] - 1), math.isqrt(shape[1] - 1)
    if value.shape[1] != 1 + side * side:
        return value, ""
    resized = resize_position_grid(value[:, 1:], (target_side, target_side))
    return (torch.cat([value[:, :1], resized.to(value.dtype)], dim=1),
            f"position embeddings resampled from {side}×{side} to {target_side}×{target_side} "
            f"patches")


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
    """A checkpoint file -> {name: tensor}, unwrapping {'state_dict': …}, {'model': …} and
    {'teacher': …} (DINOv2's teacher_checkpoint.pth)."""
    if not path.is_file():
        raise InputError(f"{path}: pretrained weights file not found")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a file it cannot read
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: cannot be read as a PyTorch checkpoint ({reason})") from None
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise InputError(f"{path}: holds a {type(state).__name__}, not a dict of weights")
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


@dataclass(frozen=True)
class EncoderWeights:
    """How the checkpoints of one encoder family are named."""
    family: str                 # in messages: 'MiT', 'DINOv2'
    model_class: type           # the networks that take these weights
    namings: dict               # naming -> pattern of an encoder key, after the wrapper prefixes
    prefixes: tuple             # wrapper prefixes, removed in this order
    example: str                # the keys quoted when a file has no encoder keys
    stem: str                   # our key of the stem convolution's weight
    source_names: Callable      # (our encoder key, naming) -> the file's key(s)
    describe: Callable          # model -> the checkpoint it needs, e.g. 'MiT-B0'
    canonical_key: Callable | None = None  # file key, prefixes removed -> source_names' name
    positions: str = ""         # our key of position embeddings to resample (DINOv2)


MIT_WEIGHTS = EncoderWeights(
    family="MiT", model_class=SegFormer,
    namings={"NVlabs": re.compile(r"(patch_embed\d|block\d|norm\d)\."),
             "Hugging Face": re.compile(r"encoder\.(patch_embeddings|block|layer_norm)\.")},
    prefixes=("module.", "backbone.", "segformer."),  # DataParallel, mmseg, Hugging Face
    example="NVlabs 'patch_embed1.proj.weight' or Hugging Face "
            "'segformer.encoder.patch_embeddings.0.proj.weight'",
    stem="stages.0.patch_embed.proj.weight", source_names=mit_source_names,
    describe=lambda model: f"MiT-{model.variant.upper()}")
DINOV2_WEIGHTS = EncoderWeights(
    family="DINOv2", model_class=DINOv2DPT,
    namings={"official": re.compile(r"(cls_token|pos_embed|register_tokens|mask_token)$"
                                    r"|(patch_embed|blocks|norm)\."),
             "Hugging Face": re.compile(r"embeddings\.|encoder\.layer\.|layernorm\.")},
    prefixes=("module.", "teacher.", "backbone.", "pretrained.", "dinov2.",
              "dinov2_with_registers."),
    example="official 'blocks.0.attn.qkv.weight' or Hugging Face "
            "'encoder.layer.0.attention.attention.query.weight'",
    stem="patch_embed.weight", source_names=dinov2_source_names,
    describe=lambda model: (f"DINOv2 ViT-{model.sizes.name}/14 "
                            + (f"with {model.encoder.registers} registers"
                               if model.encoder.registers else "without registers")),
    canonical_key=dinov2_canonical_key, positions="pos_embed")
ENCODER_WEIGHTS = (MIT_WEIGHTS, DINOV2_WEIGHTS)


def split_encoder_keys(state: dict, weights: EncoderWeights) -> tuple:
    """{key: tensor} -> (namings found, {encoder key without wrapper prefixes: tensor}, other keys)
    for the encoder family `weights`."""
    namings, encoder, ignored = set(), {}, []
    for key, value in state.items():
        bare = key
        for prefix in weights.prefixes:
            bare = bare.removeprefix(prefix)
        if weights.canonical_key:
            bare = weights.canonical_key(bare)
        naming = next((name for name, pattern in weights.namings.items() if pattern.match(bare)),
                      None)
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
    """Copy the encoder weights in `path` into `model.encoder` (MiT for a SegFormer, DINOv2 for a
    DINOv2DPT) and print one summary line. Raises InputError for a missing, unreadable or
    mismatched file."""
    path = Path(path)
    weights = next((family for family in ENCODER_WEIGHTS if isinstance(model, family.model_class)),
                   None)
    if weights is None:
        raise InputError(f"{path}: pretrained weights exist only for the SegFormer and DINOv2 "
                         f"encoders, not for {type(model).__name__}")
    state = read_checkpoint(path)
    namings, file_encoder, ignored = split_encoder_keys(state, weights)
    if len(namings) != 1:
        other = next((family.family for family in ENCODER_WEIGHTS
                      if family is not weights and split_encoder_keys(state, family)[0]), None)
        found = ("both namings mixed" if namings
                 else f"holds {other} encoder weights" if other else "no encoder keys")
        raise InputError(f"{path}: {found}; expected {weights.family} weights named like "
                         f"{weights.example}")
    naming = namings.pop()
    expected = weights.describe(model)
    target = model.encoder.state_dict()
    in_channels = file_channels = target[weights.stem].shape[1]
    loaded, missing, wrong_shape, used, notes = {}, [], [], set(), []
    for key, model_tensor in target.items():
        names = weights.source_names(key, naming)
        if any(name not in file_encoder for name in names):
            missing.extend(name for name in names if name not in file_encoder)
            continue
        used.update(names)
        value = torch.cat([file_encoder[name] for name in names])
        file_shape = list(value.shape)
        if key == weights.stem and value.dim() == 4:
            file_channels = value.shape[1]
            value = adapt_stem(value, in_channels)
        elif key == weights.positions and value.shape != model_tensor.shape:
            value, note = resample_positions(value, model_tensor.shape)
            notes.append(note)
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
    if file_channels != in_channels:
        notes.insert(0, f"stem adapted from {file_channels} to {in_channels} input channel(s)"
                        f"{' by summing the RGB weights' if in_channels == 1 else ''}")
    print(f"pretrained: {len(loaded)} {expected} encoder tensors from {path} ({naming} naming)"
          f"{''.join(f', {note}' for note in notes if note)}; {len(ignored)} non-encoder keys "
          f"ignored; decoder trained from scratch")
