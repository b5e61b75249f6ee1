"""YAML defaults with command-line overrides.

Every script has one YAML file in `configs/` holding all of its defaults; a file may name a
`base:` file that is loaded first. `load_config` merges, later layers winning:

    base YAML < script YAML < presets (the mode's own defaults; the phantom preset)
              < the resumed checkpoint's config (with --resume) < --config FILE
              < --key value flags < --set key.sub=value

`--resume PATH` thus continues the run with the settings it was started with (a run started with
`--lr 0.01` resumes with it), except `RUN_KEYS`, which describe where and how a run executes and
come from the resuming command; any flag given again changes its key (`--epochs 40` extends a run).

Each top-level key is also a flag (`--labeled_ratio 0.8`); values are parsed with
`yaml.safe_load`, so `0.8` is a float and `[96, 96]` a list. A key that no YAML declares is an
error, and so is an override whose type differs from its default (an int may stand for a float)
— except below `OPEN_KEYS`, whose nested keys `utils.runtime.check_config` checks (network
options against the network's constructor). The help text of a flag is the comment on its line in the YAML file.

A resolved config is checked and completed once, then frozen (`Config.freeze`): the training
scripts get theirs from `utils.runtime.setup`, test.py from its `resolve_config`. After that no
code sets a key: a value derived from the config (the data's class count, the phantom folder,
instance mode's `select_metric`, the teacher–student run directory) is computed in `setup`
before the freeze and stored under the config's own key. Code handed a config reads `cfg.key`;
a missing key is a bug, not a default (`script_defaults` gives the defaults of a script).
"""
import argparse
import copy
import re
from pathlib import Path

import yaml

from utils.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Mappings that take keys their YAML does not list: every option of every network family, checked
# against the network's constructor with the rest of the config (utils.runtime.check_config).
OPEN_KEYS = ("model_kwargs",)
# Where and how a run executes, not what it learns: on --resume these come from the resuming
# command (another machine, another worker count), every other key from the checkpoint.
RUN_KEYS = ("out_dir", "resume", "gpu", "num_workers", "print_every", "plot_every_seconds",
            "timeout_minutes", "eval_batch_size", "num_examples")


class Config(dict):
    """A plain dict whose keys are also attributes (`cfg.lr`); nested dicts stay plain dicts.

    `freeze()` makes it read-only: setting an attribute then raises AttributeError, setting,
    deleting or updating a key TypeError. Nested values (`model_kwargs`, lists) are not frozen,
    and no code changes them. A copy (`Config(cfg)`, `{**cfg, …}`) is a new, unfrozen config."""

    _frozen = False

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def freeze(self):
        """Make this config read-only (for good); returns it."""
        object.__setattr__(self, "_frozen", True)
        return self

    def _refuse(self, key, error=TypeError):
        if self._frozen:
            raise error(f"config is frozen: '{key}' cannot be changed once the config is resolved "
                        "(compute derived values before the freeze, in utils.runtime.setup)")

    def __setattr__(self, key, value):
        self._refuse(key, AttributeError)
        self[key] = value

    def __delattr__(self, key):
        self._refuse(key, AttributeError)
        try:
            del self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setitem__(self, key, value):
        self._refuse(key)
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._refuse(key)
        super().__delitem__(key)

    def update(self, *args, **kwargs):
        self._refuse(", ".join(map(str, dict(*args, **kwargs))))
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        self._refuse(key)
        return super().setdefault(key, default)

    def pop(self, key, *default):
        self._refuse(key)
        return super().pop(key, *default)

    def popitem(self):
        self._refuse("popitem")
        return super().popitem()

    def clear(self):
        self._refuse("clear")
        super().clear()

    def __ior__(self, other):
        self.update(other)
        return self

    def __reduce__(self):  # copy, deepcopy, pickle: the items first, then the freeze
        return _rebuild_config, (dict(self), self._frozen)


def _rebuild_config(values, frozen):
    cfg = Config(values)
    return cfg.freeze() if frozen else cfg


def read_yaml_chain(path):
    """Load `path` and the chain of `base:` files under it; returns (merged dict, help texts)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    text = path.read_text()
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise InputError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: a config file must be a mapping of keys to values")
    helps = dict(re.findall(r"^(\w+):[^#\n]*#\s*(.+)$", text, flags=re.MULTILINE))
    base = values.pop("base", None)
    if base is None:
        return values, helps
    base_values, base_helps = read_yaml_chain(path.parent / base)
    return merge(base_values, values, source=path, allow_new=True), {**base_helps, **helps}


def script_defaults(script="default"):
    """The defaults of `configs/<script>.yaml` with its `base:` chain, as a new (unfrozen)
    `Config`: `default` holds the training keys every training script shares (test.py's
    baseline split), `supervised` those of train_supervised.py (the pseudo_label teacher's)."""
    return Config(read_yaml_chain(CONFIG_DIR / f"{script}.yaml")[0])


def _same_type(default, value):
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float) and isinstance(value, int):
        return True
    return isinstance(value, type(default))


def merge(base, override, source, allow_new=False, open_mapping=False):
    """Recursively merge `override` into a copy of `base`. New keys are errors unless
    `allow_new` (a `base:` chain, which may also change types) or `open_mapping` (below one of
    OPEN_KEYS: new keys welcome, known ones keep their type)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if key not in merged:
            if not (allow_new or open_mapping):
                known = ", ".join(sorted(merged))
                raise InputError(f"{source}: unknown config key '{key}' (known keys: {known})")
            merged[key] = copy.deepcopy(value)
        elif isinstance(merged[key], dict) and isinstance(value, dict) and merged[key]:
            merged[key] = merge(merged[key], value, f"{source} [{key}]", allow_new,
                                open_mapping or key in OPEN_KEYS)
        elif allow_new or _same_type(merged[key], value):
            merged[key] = copy.deepcopy(value)
        else:
            raise InputError(f"{source}: '{key}' must be of type {type(merged[key]).__name__} "
                             f"like its default {yaml_text(merged[key])}, got {yaml_text(value)}")
    return merged


def yaml_text(value):
    """`value` as it is written in YAML and on the command line (`true`, `''`, `[0.8, 1.2]`)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()


def parse_value(text):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_set(assignments):
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}."""
    nested = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise InputError(f"--set {assignment}: expected key=value")
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = parse_value(text)
    return nested


def load_config(script, argv=None, description=None, presets=None, saved_settings=None, other_defaults=None):
    """Resolve the config of `script` (the name of `configs/<script>.yaml`) from YAML and flags.

    `presets(cfg) -> [path, ...]` may name YAML files to insert, in that order, below the user's
    overrides once the merged config is known (a mode's own defaults, the phantom preset); their
    paths are kept as `cfg._presets`. A preset sits below a resumed checkpoint's config, so a run
    resumes with the settings it was started with; `other_defaults` {key: text} adds to a flag's
    help where a preset may change its default (`--mode bcp: 0.5`). `saved_settings(path) ->
    (config, overrides)` reads a checkpoint's config and the keys its run was given explicitly
    (None when the checkpoint does not say); with it a config whose `resume` names a checkpoint
    takes that checkpoint's settings beneath the user's overrides. Returns a `Config`.
    """
    defaults, helps = read_yaml_chain(CONFIG_DIR / f"{script}.yaml")
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every key of the YAML defaults is a flag; nested keys: --set key.sub=value. "
               "A boolean flag alone means true (--postprocess), --no-KEY false.")
    parser.add_argument("--config", help="an extra YAML file applied on top of the defaults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any key, nested ones with dots (repeatable)")
    # What torch.distributed.launch passes (PyTorch 2 spells it --local-rank): accepted and
    # ignored, the rank comes from the environment (utils/distributed.py).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    for key, default in defaults.items():
        if key in ("config", "set"):
            continue
        other = f"; {other_defaults[key]}" if other_defaults and key in other_defaults else ""
        help_text = f"{helps.get(key, '')} (default: {yaml_text(default)}{other})".strip()
        if isinstance(default, bool):  # --flag alone means true; --no-flag false
            parser.add_argument(f"--{key}", type=parse_value, nargs="?", const=True, default=None,
                                metavar="true|false", help=help_text)
            parser.add_argument(f"--no-{key}", dest=key, action="store_const", const=False,
                                help=argparse.SUPPRESS)
        else:
            parser.add_argument(f"--{key}", type=parse_value, default=None, metavar="VALUE",
                                help=help_text)
    args = parser.parse_args(argv)

    flag_values = {key: value for key, value in vars(args).items()
                   if key not in ("config", "set", "local_rank") and value is not None}
    user_layers = []
    if args.config:
        extra, _ = read_yaml_chain(args.config)
        user_layers.append((extra, args.config))
    user_layers.append((flag_values, "command line"))
    user_layers.append((parse_set(args.set), "--set"))

    def resolve(layers):
        merged = defaults
        for values, source in layers:
            merged = merge(merged, values, source)
        return merged

    resolved = resolve(user_layers)
    overrides = sorted(flag_values) + sorted(parse_set(args.set))
    if resolved.get("resume") and saved_settings is not None:
        saved, saved_overrides = saved_settings(resolved["resume"])
        # keys a newer version no longer has are left out; the engine names them on resume
        kept = {key: value for key, value in saved.items() if key in defaults and key not in RUN_KEYS}
        user_layers.insert(0, (kept, f"{resolved['resume']} (the config it was trained with)"))
        if saved_overrides is None:  # an older checkpoint: what differs from today's defaults
            saved_overrides = [key for key, value in kept.items() if value != defaults[key]]
        overrides = sorted(set(overrides) | (set(saved_overrides) - set(RUN_KEYS)))
        resolved = resolve(user_layers)
    preset_paths = [str(path) for path in presets(Config(resolved))] if presets else []
    if preset_paths:
        resolved = resolve([(read_yaml_chain(path)[0], path) for path in preset_paths] + user_layers)
    cfg = Config(resolved)
    cfg["_overrides"] = overrides
    cfg["_presets"] = preset_paths
    return cfg


def config_to_yaml(cfg):
    """The resolved config as YAML text (private `_` keys left out)."""
    public = {key: value for key, value in dict(cfg).items() if not key.startswith("_")}
    return yaml.safe_dump(public, sort_keys=False, default_flow_style=None)
