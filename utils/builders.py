"""Data and network set-up shared by the training scripts: the data folder and its split, the
datasets and per-epoch loaders, the network with its pretrained or initial weights, and the data
facts a checkpoint records.
"""
import numpy as np
import torch

from dataloaders import sampling
from dataloaders.challenge import load_challenge, make_split, split_summary
from dataloaders.datasets import (LabeledSlices, UnlabeledSlices, geometric_augmentation,
                                  intensity_augmentation, normalization_stats)
from networks import build_model
from utils import distributed
from utils.checkpoint import load_checkpoint, model_from_checkpoint, require_network
from utils.errors import InputError
from utils.instances import instance_targets
from utils.losses import IGNORE_INDEX
from utils.priors import labeled_annotation_frequency, labeled_area_bounds


def load_data(cfg):
    """Data folder -> (ChallengeData, Split, normalisation). Prints the split once."""
    with distributed.main_first():  # rank 0 may write the decoded-image cache the others read
        data = load_challenge(cfg.data, num_classes=cfg.num_classes, label_mode=cfg.label_mode)
    if data.num_classes != cfg.num_classes:  # utils.runtime.setup derived it from the same files
        raise ValueError(f"{data.root} has {data.num_classes} classes, the config {cfg.num_classes}: "
                         "resolve the config with utils.runtime.setup")
    split = make_split(data, cfg.labeled_ratio, cfg.num_labeled, cfg.split_seed,
                       folds=cfg.folds, fold=cfg.fold)
    norm = normalization_stats(np.asarray(data.train_images)[split.train])
    print(f"Data: {data.root} — {len(data.train_names)} training images "
          f"{data.image_size[1]}x{data.image_size[0]}, {data.num_classes} classes; "
          f"{split_summary(split)}; {len(data.test_names)} test images")
    return data, split, norm


def supervised_targets(batch, cfg):
    """A labeled batch on the device with `mask` as what the network learns: the class ids in
    class mode (the batch unchanged); in instance mode the background / interior / boundary
    targets of its structure ids (`utils.instances.instance_targets`), built on the augmented,
    resized mask so the boundary is `boundary_width` pixels wide where the network predicts. With
    partial labels its uncertain 0-pixels (maybe an unsegmented structure) become IGNORE_INDEX,
    which every loss skips, so the training steps need no instance-specific line."""
    if cfg.label_mode != "instance":
        return batch
    target, ignore = instance_targets(batch["mask"], cfg.boundary_width,
                                      batch["certain_background"] if cfg.partial_labels else None)
    return {**batch, "mask": target if ignore is None else target.masked_fill(ignore, IGNORE_INDEX)}


def network_family(name):
    """The `model_kwargs` key of a registered network: 'segformer' for every segformer_b*,
    'dinov2' for every dinov2_*."""
    return next((family for family in ("segformer", "dinov2") if name.startswith(family)), name)


def model_config(cfg, data):
    """(name, kwargs) for `build_model`: the family's `model_kwargs` (checked with the config:
    utils.runtime.check_network_options) plus channels and classes."""
    extra = cfg.model_kwargs.get(network_family(cfg.model), {})
    if cfg.edge_guided:  # only when on, so plain checkpoints keep their kwargs
        extra = {**extra, "edge_guided": True}
    return cfg.model, {"in_channels": cfg.in_channels, "num_classes": data.num_classes, **extra}


def labeled_priors(cfg, data, split, device):
    """What the supervised loss learns from the labeled training slices before training: the
    per-class area bounds (`labeled_area_bounds`, on `device`) and annotation frequencies
    (`labeled_annotation_frequency`), each None when no option needs it."""
    masks, annotated = np.asarray(data.train_masks[split.train]), data.annotated[split.train]
    return (labeled_area_bounds(cfg, masks, annotated, device),
            labeled_annotation_frequency(cfg, masks, annotated))


def build_network(cfg, data, device):
    """(model on `device`, name, kwargs): the configured network, with `pretrained` encoder
    weights, `init_ckpt` weights (unless resuming), `channels_last` and `compile` applied."""
    model_name, model_kwargs = model_config(cfg, data)
    model = build_model(model_name, pretrained=cfg.pretrained or None, **model_kwargs)
    if cfg.get("init_ckpt") and not cfg.resume:
        load_init_weights(model, cfg.init_ckpt, model_name, model_kwargs)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        compile_network(model)
    return model, model_name, model_kwargs


def compile_network(model, backend="inductor"):
    """torch.compile each called part of `model` in place (`nn.Module.compile`): its children,
    and the members of its ModuleLists and ModuleDicts.

    In place, so the weights keep their names (checkpoints load without the `_orig_mod.` prefix
    that wrapping with torch.compile adds), and `encode`/`decode` — which methods such as
    UniMatch's feature perturbation call directly — run compiled parts too. The training step
    itself stays plain Python: with `compile: false` it runs eagerly, for debugging.
    """
    for part in model.children():
        if isinstance(part, (torch.nn.ModuleList, torch.nn.ModuleDict)):  # never called itself
            compile_network(part, backend)
        else:
            part.compile(backend=backend)
    return model


def unlabeled_pool(cfg, data, split):
    """(images (M,H,W) uint8, indices) of the unlabeled pool: the empty-mask training images,
    plus the labeled training images (not the validation ones) when `labeled_as_unlabeled` —
    the unlabeled losses then reach the structures their partial masks leave at 0 — plus the
    test images when `use_test_as_unlabeled`."""
    images, indices = data.train_images, [split.unlabeled]
    parts = [f"{len(split.unlabeled)} unlabeled training images"]
    if cfg.labeled_as_unlabeled:
        indices.append(np.asarray(split.train))
        parts.append(f"{len(split.train)} labeled training images (labeled_as_unlabeled)")
    if cfg.use_test_as_unlabeled and data.test_images is None:
        print(f"warning: use_test_as_unlabeled: {data.root} has no test images; they cannot join "
              "the unlabeled pool")
    elif cfg.use_test_as_unlabeled:
        images = np.concatenate([np.asarray(data.train_images), np.asarray(data.test_images)])
        indices.append(np.arange(len(data.train_images), len(images)))
        parts.append(f"{len(data.test_images)} test images (use_test_as_unlabeled)")
    indices = np.concatenate(indices).astype(np.int64)
    if len(parts) > 1:
        print(f"Unlabeled pool: {' + '.join(parts)} = {len(indices)}")
    return images, indices


def semi_supervised_sets(cfg, data, split, norm):
    """(labeled set, unlabeled set, unlabeled batch size) of a semi-supervised script.

    Labeled slices get the weak (geometric) augmentation; unlabeled ones, from `unlabeled_pool`,
    a weak view and two strong views of the same geometry.
    """
    geometry = geometric_augmentation(cfg)
    labeled_set = LabeledSlices(data, split.train, cfg.img_size, norm, augment=geometry,
                                air_threshold=cfg.air_threshold)
    pool_images, pool_indices = unlabeled_pool(cfg, data, split)
    if len(pool_indices) == 0:
        raise InputError(f"{data.root}: no unlabeled slices for a semi-supervised method")
    unlabeled_set = UnlabeledSlices(pool_images, pool_indices, cfg.img_size, norm, geometry,
                                    intensity_augmentation())
    return labeled_set, unlabeled_set, cfg.batch_size_unlabeled or cfg.batch_size


def load_init_weights(model, path, model_name, model_kwargs, weights="model"):
    """Copy the weights of checkpoint `path` (e.g. a train_supervised.py best.pth) into `model`."""
    state = load_checkpoint(path)
    require_network(state, path, model_name, model_kwargs)
    model.load_state_dict(model_from_checkpoint(state, weights, path).state_dict())
    print(f"Initialised the {weights} weights from {path} (epoch {state['epoch'] + 1}, "
          f"best {state['config']['select_metric']} {state['best_score']:.4f})")


def epoch_loader(dataset, cfg, epoch, num_batches, batch_size, stream=0):
    """This process's share of the epoch's `num_batches` global batches of `stream`.

    Which slices a global batch holds, and every random augmentation of each, depend only on
    (seed, epoch, stream, position) — not on `num_workers` nor on the number of processes — so
    an epoch is reproducible on its own (exact resume) and N processes of batch B see what one
    process of batch N·B sees (dataloaders/sampling.py).
    """
    return sampling.epoch_loader(dataset, seed=cfg.seed, epoch=epoch, stream=stream,
                                 num_batches=num_batches, batch_size=batch_size,
                                 num_workers=cfg.num_workers, rank=distributed.rank(),
                                 world_size=distributed.world_size(),
                                 pin_memory=torch.cuda.is_available())


def iterations_per_epoch(cfg, driving_size, batch_size):
    """`iters_per_epoch`, or one pass over the driving dataset when it is 0; a step takes
    `batch_size` samples in each process (torchrun), so a pass has fewer steps with more of them."""
    return cfg.iters_per_epoch or max(1, driving_size // (batch_size * distributed.world_size()))
