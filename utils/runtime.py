"""What every script settles before training: the resolved config (with a mode's own defaults,
`configs/<script>_<mode>.yaml`, and the phantom preset when there is no challenge data), checked
once and frozen, the device, and the random seeds.

`check_config` is the one place a config is checked: the value of every choice key (`CHOICES`)
and the combinations a script refuses, each a one-line InputError. `setup` resolves a training
script's config, checks it, completes it and freezes it (`utils.config.Config.freeze`); test.py
checks and freezes its own the same way. The values derived from a config are computed in
`setup`, before the freeze, and stored under the config's own keys — nowhere else:
- `select_metric`: `rand` in instance mode (`selection_metric`);
- `zero_ce_weight`: 0 in instance mode unless given (`zero_pixel_weight`);
- `pseudo_background_scale`: 1 in instance mode (`teacher_background_scale`);
- `data`: the built-in phantom's folder when `data/` holds no challenge files;
- `num_classes`: the data's (the ids of its `classes.yaml`; instance mode's 3 targets);
- what the script's `derive` returns (train_teacher_student.py: `out_dir`, the run directory
  that its teacher and pseudo-labels go in).

Exact resume rests on `epoch_seed`: a training loop re-seeds every generator from (seed, epoch)
at the start of each epoch, so a run resumed after epoch e repeats epoch e+1 exactly.
"""
import functools
import math
import random
from pathlib import Path

import numpy as np
import torch

from dataloaders.challenge import LABEL_MODES, data_classes, has_challenge_files
from dataloaders.phantom import COMPLETE_MARKER, ensure_phantom
from networks import MODELS, model_options
from utils import distributed
from utils.builders import network_family
from utils.checkpoint import saved_settings
from utils.config import CONFIG_DIR, config_to_yaml, load_config, read_yaml_chain, yaml_text
from utils.errors import InputError
from utils.inference import TTA_MODES
from utils.losses import LOSS_NAMES, STREAM_LOSS_NAMES
from utils.optim import AMP_DTYPES, SCHEDULERS
from utils.teachers import pretrain_epoch_count

# the built-in phantom of each label mode: #165 class ids, #150 structure ids (same images)
PHANTOM_DIRS = {"class": Path("data/phantom"), "instance": Path("data/phantom_instance")}


def mode_files(script):
    """{mode: `configs/<script>_<mode>.yaml`}: the files holding the keys whose default differs in
    one mode of a script with several (`train_teacher_student.py --mode bcp`)."""
    return {path.stem[len(script) + 1:]: path for path in sorted(CONFIG_DIR.glob(f"{script}_*.yaml"))}


def mode_preset(script, cfg):
    """The mode file of `cfg.mode` (`mode_files`), or None: no such file, or no `mode` key."""
    return mode_files(script).get(cfg.mode) if "mode" in cfg else None


def mode_defaults_text(script):
    """{key: '--mode bcp: 0.5'}: the defaults that the script's mode files set, for --help."""
    texts = {}
    for mode, path in mode_files(script).items():
        for key, value in read_yaml_chain(path)[0].items():
            texts.setdefault(key, []).append(f"--mode {mode}: {yaml_text(value)}")
    return {key: "; ".join(text) for key, text in texts.items()}


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


def setup(script, argv, description, derive=None):
    """Resolve the config of `script` (its presets included), check it (`check_config`),
    complete it with the values derived from it (module docstring), freeze it, print it once and
    return it. `derive(cfg) -> {key: value}`: values the script derives from the checked config.

    With no challenge files in `data/`, the phantom of the label mode is generated into
    `PHANTOM_DIRS[label_mode]` (once). Under torchrun this also joins the process group
    (utils/distributed.py).
    """
    def presets(cfg):
        return [path for path in (mode_preset(script, cfg), phantom_preset(script, cfg)) if path]
    cfg = load_config(script, argv, description, presets=presets, saved_settings=saved_settings,
                      other_defaults=mode_defaults_text(script))
    distributed.print_from_main_only()
    check_config(cfg, script)
    cfg.select_metric = selection_metric(cfg)
    cfg.zero_ce_weight = zero_pixel_weight(cfg)
    if "pseudo_background_scale" in cfg:  # the semi-supervised scripts'
        cfg.pseudo_background_scale = teacher_background_scale(cfg)
    preset = phantom_preset(script, cfg)
    distributed.start(pick_device(cfg.gpu), cfg.timeout_minutes)
    if not has_challenge_files(cfg.data):
        if Path(cfg.data) != Path("data"):
            raise InputError(f"{cfg.data}: no train-images/ folder or train-images.zip")
        phantom = PHANTOM_DIRS[cfg.label_mode]
        print(f"No challenge files in '{cfg.data}/': using the built-in CT phantom in "
              f"{phantom}/ with the phantom preset ({preset_name(preset)}).")
        with distributed.main_first():
            ensure_phantom(phantom, label_format=cfg.label_mode)
        cfg.data = str(phantom)
    elif preset is not None:
        print(f"'{cfg.data}' is a phantom folder: the phantom preset ({preset_name(preset)}) applies.")
    cfg.num_classes = data_classes(cfg.data, cfg.num_classes, cfg.label_mode)[1]
    if derive is not None:
        cfg.update(derive(cfg))
    cfg.freeze()
    print("Config:\n  " + config_to_yaml(cfg).rstrip().replace("\n", "\n  "))
    return cfg


def zero_pixel_weight(cfg):
    """`zero_ce_weight`, but 0 in instance mode unless given explicitly, with a note: there the
    Rand index reads only the true structures' pixels, and pushing uncertain 0-pixels toward
    background cost 0.04–0.07 of it on real CT (docs/experiments.md, "Instance mode on real CT")."""
    if cfg.label_mode != "instance" or "zero_ce_weight" in cfg.get("_overrides", ()) \
            or cfg.zero_ce_weight == 0:
        return cfg.zero_ce_weight
    print(f"note: instance mode: no zero-pixel term (zero_ce_weight 0, not {cfg.zero_ce_weight}; "
          f"set it to use one)")
    return 0.0


def teacher_background_scale(cfg):
    """The `pseudo_background_scale` a run's teachers use: the config's in class mode, 1 in
    instance mode (its background / interior / boundary classes are not organs; as test.py's
    `--background_scale`, which the watershed of instance maps ignores). An explicit value in
    instance mode was refused (`check_label_mode_options`)."""
    return cfg.pseudo_background_scale if cfg.label_mode == "class" else 1.0


def preset_name(path):
    """A preset's path as `configs/<file>`."""
    return f"{CONFIG_DIR.name}/{Path(path).name}"


def selection_metric(cfg):
    """The validation score that selects best.pth: `select_metric`, but in instance mode the Rand
    index (its three classes are not organs; `check_label_mode_options` refused a class score
    given explicitly), with a note."""
    if cfg.label_mode != "instance" or cfg.select_metric == "rand":
        return cfg.select_metric
    print(f"note: instance mode: best.pth is selected by the validation Rand index "
          f"(select_metric rand, not {cfg.select_metric})")
    return "rand"


# ==== the checks of a resolved config ====
def _one_of(values, joiner=", "):
    """A choice key's values and the usual error of another: `key: unknown 'x' (choose a, b)`."""
    return tuple(values), f"{{key}}: unknown '{{value}}' (choose {joiner.join(values)})"


# Every key whose value is one of a fixed set, checked when the script's config has it: the
# values, and the one-line error of another value (`{key}`: the key, or test.py's flag).
CHOICES = {
    "label_mode": _one_of(LABEL_MODES, " or "),
    "model": (tuple(MODELS), f"{{key}}: unknown model {{value!r}}; valid models: {', '.join(MODELS)}"),
    "loss": (LOSS_NAMES, f"{{key}}: unknown loss '{{value}}' (choose from {', '.join(LOSS_NAMES)})"),
    "stream_loss": (STREAM_LOSS_NAMES,
                    f"loss: unknown stream loss '{{value}}' (choose from {', '.join(STREAM_LOSS_NAMES)})"),
    "scheduler": _one_of(SCHEDULERS, " or "),
    "amp_dtype": _one_of(AMP_DTYPES, " or "),
    "select_metric": _one_of(("dice", "rand"), " or "),
    "mix_source": _one_of(("loader", "batch"), " or "),           # train_unimatch.py
    "mode": _one_of(("pseudo_label", "mean_teacher", "bcp")),      # train_teacher_student.py
    "schedule": _one_of(("joint", "pretrain_finetune")),
    "consistency": _one_of(("mse", "hard")),
    "eval_weights": _one_of(("student", "teacher"), " or "),
    "tta": _one_of(TTA_MODES),                                     # and test.py
    "split": _one_of(("val", "train", "test", "oof")),             # test.py
    "weights": (("", "teacher", "student"), "{key}: unknown '{value}' (choose teacher or student)"),
    "baseline": (("", "watershed"), "{key}: unknown '{value}' (the only one is watershed)"),
}


def check_config(cfg, script):
    """Refuse, with a one-line InputError, a resolved config that `script` (`supervised`,
    `unimatch`, `teacher_student` or `test`) cannot run: a choice key with another value
    (`CHOICES`), and the combinations refused — instance mode's (`check_label_mode_options`),
    labeled_ratio 1's (`check_validation_options`), unknown network options, and the script's
    own. Changes nothing."""
    check_choices(cfg, flags=script == "test")
    if script == "test":
        check_test_options(cfg)
        return
    check_label_mode_options(cfg)
    check_validation_options(cfg)
    check_network_options(cfg.model_kwargs)
    check_network_combinations(cfg)
    if "pseudo_background_scale" in cfg:  # the semi-supervised scripts'
        check_background_scale("pseudo_background_scale", cfg.pseudo_background_scale, "the plain softmax")
    if script == "unimatch":
        check_unimatch_options(cfg)
    elif script == "teacher_student":
        check_teacher_student_options(cfg)


def check_choices(cfg, flags=False):
    """Every key of `cfg` in `CHOICES` must hold one of its values; `flags`: the error names the
    key as a flag (`--tta: unknown …`), as test.py's errors do."""
    for key, (values, message) in CHOICES.items():
        if key in cfg and cfg[key] not in values:
            raise InputError(message.format(key=f"--{key}" if flags else key, value=cfg[key]))


def check_network_combinations(cfg):
    """`encoder_lr_scale` > 0; `layer_decay` in (0, 1], below 1 only for a network that numbers
    its encoder layers (`encoder.layer_of`: the DINOv2 ViTs); `edge_guided` only for networks with
    stride-4 features (networks/edge.py)."""
    if not cfg.encoder_lr_scale > 0:
        raise InputError(f"encoder_lr_scale: must be > 0, got {cfg.encoder_lr_scale}")
    if not 0 < cfg.layer_decay <= 1:
        raise InputError(f"layer_decay: must be in (0, 1], got {cfg.layer_decay}")
    numbered = [name for name in MODELS if network_family(name) == "dinov2"]
    if cfg.layer_decay != 1 and cfg.model not in numbered:
        raise InputError(f"layer_decay: needs a network with numbered encoder layers "
                         f"({', '.join(numbered)}), not {cfg.model}")
    if cfg.edge_guided and cfg.model in numbered:
        raise InputError(f"edge_guided: the edge branch reads stride-4 features, and every map of "
                         f"{cfg.model} is at stride 14; use attunet or segformer_*")


def check_label_mode_options(cfg):
    """Instance mode (README, "#150 instance mode") trains 3 classes whose ids are not organs:
    refuse the options that read organ classes (best.pth is selected by the Rand index:
    `selection_metric`)."""
    if cfg.label_mode != "instance":
        return
    if cfg.edge_guided:  # the boundary class is the edge supervision here; the edge branch's
        # targets (changes of the target class) would not even mark where two structures touch
        raise InputError("edge_guided: not in instance mode (the boundary class already learns "
                         "the structure boundaries)")
    if cfg.loss == "tvmf_dice":
        raise InputError("loss: tvmf_dice sets its per-class κ from validation Dice, and instance "
                         "mode validates by the Rand index; choose dice, ce or dice_ce")
    if cfg.area_weight > 0 or cfg.get("pseudo_area_filter"):  # the latter: semi-supervised scripts
        raise InputError("area_weight, pseudo_area_filter: class area bounds mean nothing for "
                         "per-image structure ids (instance mode)")
    if cfg.zero_ce_presence:
        raise InputError("zero_ce_presence: weighs organ classes by how often they are annotated; "
                         "instance mode has no organ classes")
    if "pseudo_background_scale" in cfg.get("_overrides", ()):
        raise InputError("pseudo_background_scale: shifts the background against organ classes; "
                         "instance mode's teachers label background / interior / boundary (scale 1)")
    if cfg.select_metric != "rand" and "select_metric" in cfg.get("_overrides", ()):
        raise InputError(f"select_metric: instance mode selects by the Rand index of the "
                         f"structures ('{cfg.select_metric}' is a class score)")


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


def check_network_options(model_kwargs):
    """Every `model_kwargs.<family>.<option>` must be an option of that family's constructor
    (config.py lets any nested key through here so that every option is settable)."""
    families = {network_family(name): name for name in MODELS}
    for family, options in model_kwargs.items():
        if family not in families:
            raise InputError(f"model_kwargs: unknown network family '{family}' "
                             f"(known: {', '.join(families)})")
        known = model_options(families[family])
        unknown = sorted(set(options or {}) - set(known))
        if unknown:
            raise InputError(f"model_kwargs.{family}: unknown option(s) {', '.join(unknown)} "
                             f"(options: {', '.join(known)})")


def check_unimatch_options(cfg):
    if cfg.edge_guided:
        raise InputError("edge_guided: not supported by train_unimatch.py (its feature-perturbed "
                         "stream decodes plain features); use train_supervised.py or "
                         "train_teacher_student.py")


def check_teacher_student_options(cfg):
    """The shares, counts and decays of train_teacher_student.py, and BCP's batch pairing."""
    two_phases = cfg.mode == "bcp" or (cfg.mode == "pseudo_label"
                                       and cfg.schedule == "pretrain_finetune")
    if not 0 <= cfg.pretrain_share < 1:
        raise InputError(f"pretrain_share: {cfg.pretrain_share} is not a share in [0, 1)")
    if two_phases and pretrain_epoch_count(cfg) >= cfg.epochs:
        raise InputError(f"pretrain_share: {cfg.pretrain_share} of {cfg.epochs} epochs leaves no "
                         "epoch for the second phase")
    if not 0 < cfg.pseudo_share <= 1:
        raise InputError(f"pseudo_share: {cfg.pseudo_share} is not a share in (0, 1]")
    if cfg.n_pseudo < 0:
        raise InputError(f"n_pseudo: {cfg.n_pseudo} is negative")
    if not 0 <= cfg.ema_alpha < 1:
        raise InputError(f"ema_alpha: {cfg.ema_alpha} is not a decay in [0, 1) (0 = sized to the run)")
    if cfg.mode == "bcp":
        if cfg.batch_size_unlabeled not in (0, cfg.batch_size):
            raise InputError(f"batch_size_unlabeled: BCP pairs each unlabeled slice with a labeled "
                             f"one, so it must be 0 or batch_size ({cfg.batch_size}), not "
                             f"{cfg.batch_size_unlabeled}")
        if len(cfg.mask_ratio_schedule) != 2 or not all(0 < r < 1 for r in cfg.mask_ratio_schedule):
            raise InputError(f"mask_ratio_schedule: {cfg.mask_ratio_schedule} is not [start, end] "
                             "with both between 0 and 1")
        if cfg.static_every < 1:
            raise InputError(f"static_every: {cfg.static_every} is not a positive iteration count")


def check_background_scale(name, value, plain):
    """A multiplier of the background probability (test.py's decision, the teachers' pseudo-labels)
    must be >= 0 and finite; `plain` names what 1 means."""
    if not 0 <= value < math.inf:
        raise InputError(f"{name}: must be >= 0 (1 = {plain}), got {value}")


def check_test_options(cfg):
    """test.py's refusals that its config alone decides: a `--background_scale` below 0 or not
    finite, and `--baseline` with what needs a model."""
    check_background_scale("--background_scale", cfg.background_scale, "plain argmax")
    if not cfg.baseline:
        return
    if not cfg.data:
        raise InputError("--baseline watershed needs --data (there is no checkpoint)")
    if cfg.split == "oof":
        raise InputError("--split oof scores fold checkpoints; the baseline has none")
    if cfg.images:
        raise InputError("--images: predicts with --ckpt checkpoints, not the baseline")


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
