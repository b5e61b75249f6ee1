"""Compare run directories: their settings, best validation score and test scores, and the arms
they form over seeds (README: The loop).

    python -m utils.runs runs/rc-*                  # a quoted "runs/rc-*" is expanded here
    python -m utils.runs runs/a-s0 runs/b-s0 --metric rand

A run directory holds `config.yaml`, `log.jsonl` and, after `python test.py --ckpt RUN/best.pth`,
`scores.json`. Printed:
1. one row per run: the method (the first line of config.yaml) and the config keys whose values
   differ between the runs (keys that do not shape results left out; a key of one script only
   compared among the runs that have it), the seed, the best validation score
   (`val_<select_metric>`) and its epoch, and from scores.json the test Dice and Rand index,
   predicted / true foreground and the counts of SINK and MISSING classes (`-` where a piece is
   missing); a note when the runs computed in different places (the `ran_on` of their logs:
   torch, device, threads, processes), where the same seed gives other numbers;
2. arms, the runs that differ only in their seed: n, mean, sample standard deviation (spread),
   min, max and every seed's value of the `--metric` score: the test score, or in an arm where no
   run has one (no scores.json) each run's validation score at its best epoch, marked `[val]`;
3. paired differences between every two arms with the same kind of score over the seeds both
   have: per seed B - A, their mean and how many seeds B is ahead.
A run that trained its own warm start (`warm_start`, no `init_ckpt`) started from
RUN/warm_start/best.pth, and is shown with that `init_ckpt`: a run given `--init_ckpt` of that file
starts where it started, which is no difference of settings. A setting that holds one path per
seed (each seed's own warm start as `init_ckpt`: the same path for every run of a seed, another
for each seed) belongs to the seed, not to an arm: it is shown in the rows and left out of the
arms, with a note.
"""
import argparse
import glob
import json
import math
from pathlib import Path

import numpy as np
import yaml

from utils.config import RUN_KEYS
from utils.errors import InputError, run_cli

METHOD_HEADER = "# method:"  # config.yaml's first line, written by the training scripts
IGNORED_KEYS = {*RUN_KEYS, "seed"}  # how a run executed, and the seed (arms pair on it)
TEST_SETTINGS = ("tta", "background_scale", "postprocess")  # test.py's, recorded in scores.json


def find_runs(patterns):
    """The run directories named by `patterns` (a pattern the shell left unexpanded is expanded
    here); files are skipped, a directory reached twice (runs/latest) is listed once."""
    found = {}
    for pattern in patterns:
        matches = (sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[")
                   and not Path(pattern).exists() else [pattern])
        for path in map(Path, matches):
            if not path.is_dir():
                continue
            if not (path / "config.yaml").is_file():
                raise InputError(f"{path}: not a run directory (no config.yaml)")
            key = path.resolve()
            if key not in found or (found[key].is_symlink() and not path.is_symlink()):
                found[key] = path
    if not found:
        raise InputError(f"{' '.join(patterns)}: no run directories found")
    return list(found.values())


def parse_object(text, where):
    """The JSON object in `text`; `where` names the file (and line) in the error line."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise InputError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise InputError(f"{where}: a JSON object was expected, got {type(value).__name__}")
    return value


def read_text(path):
    """The text of `path`, or the error line naming it."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: unreadable ({getattr(error, 'strerror', None) or error})") from None


def load_run(path):
    """One run: its name, config (dotted keys), log records and scores.json (or None)."""
    config_path, log_path, scores_path = (path / n for n in ("config.yaml", "log.jsonl", "scores.json"))
    config_text = read_text(config_path)
    try:
        config = yaml.safe_load(config_text)
    except yaml.YAMLError as error:
        raise InputError(f"{config_path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: the resolved config must be a YAML mapping")
    log = [parse_object(line, f"{log_path}: line {number}")
           for number, line in enumerate(read_text(log_path).splitlines(), 1)
           if line.strip()] if log_path.exists() else []
    scores = parse_object(read_text(scores_path), scores_path) if scores_path.exists() else None
    test = (scores or {}).get("test", {})
    if not isinstance(test, dict):
        raise InputError(f"{scores_path}: 'test' must be an object of scores")
    for key in ("dice", "rand", "fg_pred", "fg_true"):
        if not isinstance(test.get(key), (int, float, type(None))) or isinstance(test.get(key), bool):
            raise InputError(f"{scores_path}: test {key} must be a number or null, got {test[key]!r}")
    header = config_text.partition("\n")[0]
    if header.startswith(METHOD_HEADER) and "method" not in config:  # the script's method (engine)
        config["method"] = header[len(METHOD_HEADER):].strip()
    own_warm_start = path / "warm_start" / "best.pth"
    if config.get("warm_start") and config.get("init_ckpt") == "" and own_warm_start.is_file():
        # it started from the supervised run it trained first, as a run given that file would
        config["init_ckpt"] = str(own_warm_start)
    for key in ("data", "init_ckpt"):
        if isinstance(config.get(key), str) and config[key] and Path(config[key]).exists():
            # one file spelled two ways (relative, absolute) is one setting
            config[key] = str(Path(config[key]).resolve())
    return {"name": path.name or path.resolve().name, "config": flatten(config), "log": log,
            "scores": scores}


def flatten(config, prefix=""):
    """{'a': {'b': 1}} -> {'a.b': 1}: nested settings compared one by one."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_keys(runs):
    """The config keys (not ignored, not private) that tell the runs apart, `method` first. A key
    that only some runs have belongs to another script's method: it is compared among the runs
    that have it, and also counts when a run of the same method lacks it (a key added since); one
    that only repeats the method is left out."""
    keys = sorted({key for run in runs for key in run["config"]}, key=lambda k: (k != "method", k))
    shaping = [k for k in keys if k.split(".")[0] not in IGNORED_KEYS and not k.startswith("_")]

    def differs(key):
        having = [run["config"] for run in runs if key in run["config"]]
        if key != "method" and all(config[key] == config.get("method") for config in having):
            return False  # it repeats the method (train_teacher_student.py's `mode`)
        values = {json.dumps(config[key], sort_keys=True) for config in having}
        has_key = {(run["config"].get("method"), key in run["config"]) for run in runs}
        return len(values) > 1 or len(has_key) > len({method for method, _ in has_key})
    return [key for key in shaping if differs(key)]


def per_seed_paths(runs, keys):
    """The keys among `keys` whose value is a path (text) that every run of a seed shares and
    that differs between seeds, e.g. `init_ckpt: runs/sup-s<seed>/best.pth`: they pair runs by seed
    instead of telling arms apart. None with runs of one seed only."""
    def follows_seed(key):
        by_seed = {}
        for run in runs:
            value = run["config"].get(key)
            if not isinstance(value, str) or not value:
                return False
            by_seed.setdefault(json.dumps(run["config"].get("seed")), set()).add(value)
        paths = [path for values in by_seed.values() for path in values]
        return len(by_seed) > 1 and len(paths) == len(by_seed) == len(set(paths))
    return [key for key in keys if follows_seed(key)]


def setting(value):
    """A config value as text, as YAML spells it (`-`: the run has no such key)."""
    if value is None:
        return "-"
    return json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)


def number(value):
    """A score with 4 decimals, `-` when missing."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return "-"
    return f"{value:.4f}"


def best_validation(run, metric=None):
    """(best `val_<select_metric>` over the log, its epoch, `val_<metric>` at that epoch), or None."""
    name = f"val_{run['config'].get('select_metric', 'dice')}"
    best = None
    for record in run["log"]:
        value = record.get(name)
        if isinstance(value, (int, float)) and not math.isnan(value) and (best is None or value > best[0]):
            best = (float(value), record.get("epoch"), record.get(f"val_{metric}") if metric else None)
    return best


def scored_test(run):
    """The 'test' entry of the run's scores.json, or None."""
    return (run["scores"] or {}).get("test")


def validation_value(run, metric):
    """`val_<metric>` at the run's best epoch (the epoch of best.pth), or None."""
    best = best_validation(run, metric)
    value = best[2] if best else None
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def print_table(rows):
    """Rows of strings, columns aligned (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def print_runs(runs, keys):
    """Section 1: one row per run."""
    selected = {run["config"].get("select_metric", "dice") for run in runs}
    best_name = f"best val_{selected.pop()}" if len(selected) == 1 else "best val"
    rows = [["run"] + keys + ["seed", f"{best_name} (epoch)", "test dice", "test rand",
                              "fg pred/true", "SINK", "MISSING"]]
    for run in runs:
        best, test = best_validation(run), scored_test(run) or {}
        fg = (test["fg_pred"] / test["fg_true"] if isinstance(test.get("fg_pred"), (int, float))
              and test.get("fg_true") else None)
        counts = [str(len(test[k])) if isinstance(test.get(k), list) else "-"
                  for k in ("sink_classes", "missing_classes")]
        rows.append([run["name"]] + [setting(run["config"].get(k)) for k in keys]
                    + [setting(run["config"].get("seed")),
                       f"{best[0]:.4f} ({best[1]})" if best else "-",
                       number(test.get("dice")), number(test.get("rand")), number(fg)] + counts)
    print_table(rows)
    settings = {json.dumps([run["scores"].get(key) for key in TEST_SETTINGS])
                for run in runs if run["scores"]}
    if len(settings) > 1:
        print("note: the test scores were computed with different "
              f"{' / '.join('--' + key for key in TEST_SETTINGS)} settings")
    places = where_runs_ran(runs)
    if len(places) > 1:
        print("note: the runs computed in different places, where a seed gives other numbers "
              "(round-off grows over training; README, Same seed, same numbers):")
        for place, names in places.items():
            print(f"  {place}: {', '.join(names)}")
    for run in runs:
        scored = (run["scores"] or {}).get("checkpoints")
        if run["scores"] and (not isinstance(scored, list) or len(scored) != 1
                              or Path(str(scored[0])).name != "best.pth"):
            print(f"note: {run['name']}/scores.json scores {scored}, not the run's best.pth")


def where_runs_ran(runs):
    """{`ran_on` of the log records: [run names]}, in the order met; a run resumed elsewhere is
    under both, a log written before the engine recorded it under 'not recorded'."""
    places = {}
    for run in runs:
        for place in dict.fromkeys(str(record.get("ran_on", "not recorded")) for record in run["log"]) \
                or ["not recorded"]:
            places.setdefault(place, []).append(run["name"])
    return places


def group_arms(runs, keys):
    """{arm name: [runs]} in the order of the runs; an arm's name is its differing settings."""
    arms = {}
    for run in runs:
        name = " ".join(f"{k}={setting(run['config'].get(k))}" for k in keys) or "(common settings)"
        arms.setdefault(name, []).append(run)
    return arms


def arm_scores(arm, metric):
    """An arm's ({seed: score}, source, runs left out). The source is 'test' when a run of the
    arm has a test score (runs without one are left out: validation and test scores do not mix),
    else 'val': each run's validation score at its best epoch. Several runs of a seed: their mean."""
    source = "test" if any((scored_test(run) or {}).get(metric) is not None for run in arm) else "val"
    values, left_out = {}, []
    for run in arm:
        value = (scored_test(run) or {}).get(metric) if source == "test" else validation_value(run, metric)
        if value is None:
            left_out.append(run["name"])
        else:
            values.setdefault(run["config"].get("seed"), []).append(float(value))
    return {seed: float(np.mean(found)) for seed, found in values.items()}, source, left_out


def print_arms(arms, metric):
    """Section 2: per arm n, mean, sample std (spread), min, max and every seed's value."""
    print(f"\nArms (test {metric}; [val]: no run of the arm has a test score, so the validation "
          "score at the best epoch):")
    for name, arm in arms.items():
        values, source, left_out = arm_scores(arm, metric)
        scores = np.array(list(values.values()))
        missing = f"; left out, no {source} score: {', '.join(left_out)}" if left_out else ""
        label = f"{name}{' [val]' if source == 'val' else ''}"
        if not len(scores):
            print(f"  {label}: no score{missing}")
            continue
        spread = f"{scores.std(ddof=1):.4f}" if len(scores) > 1 else "-"
        seeds = ", ".join(f"s{seed} {value:.4f}" for seed, value in values.items())
        print(f"  {label}: n {len(scores)}, mean {scores.mean():.4f}, spread {spread}, "
              f"min {scores.min():.4f}, max {scores.max():.4f}: {seeds}{missing}")


def print_pairs(arms, metric):
    """Section 3: for every pair of arms, B - A per common seed, the mean and the seeds ahead."""
    names = list(arms)
    print(f"\nPaired differences (test {metric}, B - A over the seeds both arms have):")
    if len(names) < 2:
        print("  one arm: nothing to pair")
    for i, a_name in enumerate(names):
        for b_name in names[i + 1:]:
            (a, a_source, _), (b, b_source, _) = (arm_scores(arms[n], metric) for n in (a_name, b_name))
            common = [seed for seed in b if seed in a]
            print(f"  B {b_name}  vs  A {a_name}:")
            if a_source != b_source:
                print(f"    not paired: A has {a_source} scores, B {b_source} scores")
                continue
            unpaired = sorted(map(str, set(a) ^ set(b)))
            note = f" (unpaired: {', '.join('s' + s for s in unpaired)})" if unpaired else ""
            if not common:
                print(f"    no common seed{note}")
                continue
            diffs = [b[seed] - a[seed] for seed in common]
            ahead = sum(d > 0 for d in diffs)
            each = ", ".join(f"s{s} {d:+.4f}" for s, d in zip(common, diffs))
            print(f"    {np.mean(diffs):+.4f} mean over {len(common)} seeds ({ahead}/{len(common)} "
                  f"ahead){' [val]' if a_source == 'val' else ''}: {each}{note}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories or quoted glob patterns")
    parser.add_argument("--metric", choices=("dice", "rand"),
                        help="score of arms and pairs (default: dice when a run has a test Dice, else rand)")
    args = parser.parse_args(argv)
    runs = [load_run(path) for path in find_runs(args.runs)]
    metric = args.metric or ("dice" if any((scored_test(r) or {}).get("dice") is not None
                                           for r in runs) else "rand")
    keys = differing_keys(runs)
    print_runs(runs, keys)
    seed_keys = per_seed_paths(runs, keys)
    if seed_keys:
        print(f"note: {', '.join(seed_keys)}: one path per seed, paired with the seed rather than "
              "forming arms")
    arms = group_arms(runs, [key for key in keys if key not in seed_keys])
    print_arms(arms, metric)
    print_pairs(arms, metric)


if __name__ == "__main__":
    run_cli(main)
