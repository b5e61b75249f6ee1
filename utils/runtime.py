"""What every script settles before training: the resolved config (with the phantom preset when
there is no challenge data), the device, and the random seeds.

Exact resume rests on `epoch_seed`: a training loop re-seeds every generator from (seed, epoch)
at the start of each epoch, so a run resumed after epoch e repeats epoch e+1 exactly.
"""
import functools
import random
from pathlib import Path

import numpy as np
import torch

from dataloaders.challenge import LABEL_MODES, has_challenge_files
from dataloaders.phantom import COMPLETE_MARKER, ensure_phantom
from utils import distributed
from utils.config import CONFIG_DIR, config_to_yaml, load_config
from utils.errors import InputError

# the built-in phantom of each label mode: #165 class ids, #150 structure ids (same images)
PHANTOM_DIRS = {"class": Path("data/phantom"), "instance": Path("data/phantom_instance")}


def phantom_preset(script, cfg):
    """`configs/phantom_<script>.yaml` (or `phantom.yaml`) when the data folder is a phantom or
    `data/` holds no challenge data; None otherwise."""
    data = Path(cfg.data)
    if has_challenge_files(data) and not (data / COMPLETE_MARKER).is_file():
        return None
    if not has_challenge_files(data) and data != Path("data"):
        return None
    specific = CONFIG_DIR / f"phantom_{script}.yaml"
    return specific if specific.is_file() else CONFIG_DIR / "phantom.yaml"


def setup(script, argv, description):
    """Resolve the config (phantom preset included), print it once, return it.

    With no challenge files in `data/`, the phantom of the label mode is generated into
    `PHANTOM_DIRS[label_mode]` (once). Under torchrun this also joins the process group
    (utils/distributed.py).
    """
    cfg = load_config(script, argv, description, preset=lambda c: phantom_preset(script, c))
    distributed.print_from_main_only()
    check_label_mode_options(cfg)
    check_validation_options(cfg)
    distributed.start(pick_device(cfg.gpu), cfg.timeout_minutes)
    if not has_challenge_files(cfg.data):
        if Path(cfg.data) != Path("data"):
            raise InputError(f"{cfg.data}: no train-images/ folder or train-images.zip")
        phantom = PHANTOM_DIRS[cfg.label_mode]
        print(f"No challenge files in '{cfg.data}/': using the built-in CT phantom in "
              f"{phantom}/ with the phantom preset ({preset_name(cfg)}).")
        with distributed.main_first():
            ensure_phantom(phantom, label_format=cfg.label_mode)
        cfg.data = str(phantom)
    elif "_preset" in cfg:
        print(f"'{cfg.data}' is a phantom folder: the phantom preset ({preset_name(cfg)}) applies.")
    print("Config:\n  " + config_to_yaml(cfg).rstrip().replace("\n", "\n  "))
    return cfg


def preset_name(cfg):
    """The phantom preset applied to `cfg`, as `configs/<file>`."""
    return f"{CONFIG_DIR.name}/{Path(cfg['_preset']).name}"


def check_label_mode_options(cfg):
    """Instance mode (README, "#150 instance mode") trains 3 classes whose ids are not organs:
    refuse the options that read organ classes, and select best.pth by the Rand index."""
    if cfg.label_mode not in LABEL_MODES:
        raise InputError(f"label_mode: unknown '{cfg.label_mode}' (choose "
                         f"{' or '.join(LABEL_MODES)})")
    if cfg.label_mode != "instance":
        return
    if cfg.edge_guided:  # the boundary class is the edge supervision here; the edge branch's
        # targets (changes of the target class) would not even mark where two structures touch
        raise InputError("edge_guided: not in instance mode (the boundary class already learns "
                         "the structure boundaries)")
    if cfg.loss == "tvmf_dice":
        raise InputError("loss: tvmf_dice sets its per-class κ from validation Dice, and instance "
                         "mode validates by the Rand index; choose dice, ce or dice_ce")
    if cfg.area_weight > 0 or cfg.pseudo_area_filter:
        raise InputError("area_weight, pseudo_area_filter: class area bounds mean nothing for "
                         "per-image structure ids (instance mode)")
    if cfg.select_metric != "rand":
        if "select_metric" in cfg.get("_overrides", ()):
            raise InputError(f"select_metric: instance mode selects by the Rand index of the "
                             f"structures ('{cfg.select_metric}' is a class score)")
        print(f"note: instance mode: best.pth is selected by the validation Rand index "
              f"(select_metric rand, not {cfg.select_metric})")
        cfg.select_metric = "rand"


def check_validation_options(cfg):
    """`labeled_ratio: 1` (every labeled image trains, the final model) leaves no validation
    split: refuse what follows the validation score."""
    if cfg.labeled_ratio != 1 or cfg.folds:
        return
    if cfg.scheduler == "plateau":
        raise InputError("scheduler: plateau follows the validation score, and labeled_ratio 1 "
                         "leaves no validation split; add --scheduler poly")
    if cfg.loss == "tvmf_dice":
        raise InputError("loss: tvmf_dice sets its per-class κ from validation Dice, and "
                         "labeled_ratio 1 leaves no validation split; choose dice, ce or dice_ce")


@functools.cache  # one answer, and one warning, per process
def pick_device(gpu):
    """`gpu` = CUDA index, -1 = CPU. A missing CUDA device warns once and falls back to the CPU.

    Under torchrun a `gpu` >= 0 means CUDA, and each process takes `cuda:LOCAL_RANK` (choose
    the GPUs with CUDA_VISIBLE_DEVICES); more processes per node than devices is an error."""
    if gpu is None or gpu < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print(f"warning: --gpu {gpu} asked for, but CUDA is not available; running on the CPU")
        return torch.device("cpu")
    if distributed.is_distributed():
        if distributed.local_world_size() > torch.cuda.device_count():
            raise InputError(f"--nproc_per_node: {distributed.local_world_size()} processes on "
                             f"this node but {torch.cuda.device_count()} CUDA device(s); start "
                             "at most one process per GPU, or CPU processes with --gpu -1")
        return torch.device("cuda", distributed.local_rank())
    if gpu >= torch.cuda.device_count():
        print(f"warning: --gpu {gpu} does not exist ({torch.cuda.device_count()} CUDA "
              "device(s)); running on the CPU")
        return torch.device("cpu")
    return torch.device("cuda", gpu)


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def epoch_seed(seed, epoch, stream=0):
    """A 32-bit seed that depends only on (seed, epoch, stream)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


EPOCH_STREAM = 1000  # the global generators' stream, apart from the loaders' streams 0, 1, 2 …


def seed_epoch(seed, epoch):
    """Re-seed random, NumPy and torch from (seed, epoch) at the start of an epoch: what makes a
    run resumed after epoch e repeat epoch e+1 exactly as the uninterrupted run did. Under
    torchrun rank r takes stream EPOCH_STREAM + r, so the draws of a training step (dropout,
    CutMix boxes) differ between processes as between the samples of one batch; rank 0 draws
    what one process does."""
    seed_everything(epoch_seed(seed, epoch, stream=EPOCH_STREAM + distributed.rank()))
