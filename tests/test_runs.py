"""Comparing runs: scores.json written by test.py, and `python -m utils.runs` on hand-made run
directories (settings that differ, best validation score, arms over seeds, paired differences)."""
import json
import math
import re

import numpy as np
import pytest
import yaml

from conftest import one_line_error
from utils import runs as runs_module
from utils.errors import run_cli

BASE = {"data": "data/phantom", "model": "attunet", "model_kwargs": {"attunet": {"base": 32}},
        "loss": "dice", "zero_ce_weight": 0.3, "lr": 0.001, "select_metric": "dice", "seed": 0,
        "out_dir": "", "gpu": 0, "num_workers": 2}


def make_run(root, name, seed, test_dice=None, val_dice=(0.2, 0.3), test_rand=0.5, method=None,
             ran_on=(), **settings):
    """A run folder: config.yaml (with `method`, the header line the scripts write), log.jsonl
    (one record per val_dice value, epochs 1, 2, …, with `ran_on[i]` where given) and, with
    `test_dice`, a scores.json as test.py writes it."""
    folder = root / name
    folder.mkdir()
    config = {**BASE, **settings, "seed": seed, "out_dir": str(folder), "gpu": seed % 2}
    header = f"# method: {method}\n" if method else ""
    (folder / "config.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
    records = [{"epoch": epoch, "val_dice": value, "val_rand": value / 2}
               for epoch, value in enumerate(val_dice, 1)]
    for record, place in zip(records, ran_on):
        record["ran_on"] = place
    (folder / "log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    if test_dice is not None or test_rand is not None:
        test = {"slices": 6, "dice": test_dice, "rand": test_rand, "fg_pred": 0.3, "fg_true": 0.2,
                "per_class_dice": {}, "area": {}, "worst_area_ratio": 4.0,
                "sink_classes": ["liver"], "missing_classes": ["spleen", "aorta"]}
        scores = {"checkpoints": [f"{folder}/best.pth"], "weights": ["student"], "tta": "none",
                  "postprocess": False, "config": config, "test": test}
        (folder / "scores.json").write_text(json.dumps(scores))
    return folder


@pytest.fixture
def three_arms(tmp_path):
    """Arm A (loss dice): seeds 0-2 with test Dice 0.30, 0.34, 0.38, and seed 4 without
    scores.json. Arm B (loss dice_ce, zero_ce_weight 0): seeds 0-3, test Dice 0.32, 0.39, 0.40,
    0.45. Arm C (loss ce): seeds 0-1 without scores.json, best validation Dice 0.50 and 0.36."""
    for seed, dice in enumerate((0.30, 0.34, 0.38)):
        make_run(tmp_path, f"a-s{seed}", seed, dice, val_dice=(0.2, 0.35, 0.33))
    make_run(tmp_path, "a-s4", 4, None, test_rand=None)
    for seed, dice in enumerate((0.32, 0.39, 0.40, 0.45)):
        make_run(tmp_path, f"b-s{seed}", seed, dice, loss="dice_ce", zero_ce_weight=0)
    make_run(tmp_path, "c-s0", 0, None, val_dice=(0.4, 0.5, 0.45), test_rand=None, loss="ce")
    make_run(tmp_path, "c-s1", 1, None, val_dice=(0.3, 0.36), test_rand=None, loss="ce")
    (tmp_path / "notes.txt").write_text("not a run")
    return tmp_path


def run_main(capsys, argv):
    runs_module.main(argv)
    return capsys.readouterr().out


def sample_std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_rows_show_only_the_settings_that_differ(three_arms, capsys):
    out = run_main(capsys, [str(three_arms / "*")])            # a quoted pattern, expanded here
    lines = out.splitlines()
    header = lines[0].split()
    assert header[:4] == ["run", "loss", "zero_ce_weight", "seed"]
    for ignored in ("out_dir", "gpu", "num_workers", "lr", "model_kwargs.attunet.base", "notes.txt"):
        assert ignored not in out
    rows = {line.split()[0]: line.split() for line in lines[1:11]}
    assert sorted(rows) == ["a-s0", "a-s1", "a-s2", "a-s4", "b-s0", "b-s1", "b-s2", "b-s3",
                            "c-s0", "c-s1"]
    # run, loss, zero_ce_weight, seed, best val, (epoch), test dice, test rand, fg, SINK, MISSING
    assert rows["a-s1"] == ["a-s1", "dice", "0.3", "1", "0.3500", "(2)", "0.3400", "0.5000",
                            "1.5000", "1", "2"]
    assert rows["c-s0"] == ["c-s0", "ce", "0.3", "0", "0.5000", "(2)", "-", "-", "-", "-", "-"]


def test_arms_mean_spread_and_every_seed(three_arms, capsys):
    out = run_main(capsys, [str(p) for p in sorted(three_arms.iterdir())])
    arm_a = next(line for line in out.splitlines() if line.startswith("  loss=dice zero_ce_weight=0.3:"))
    values_a = [0.30, 0.34, 0.38]                  # mean 0.34, std sqrt((0.04² + 0 + 0.04²) / 2)
    assert sample_std(values_a) == pytest.approx(0.04)
    # seed 4 has no scores.json: left out of a test-scored arm, not mixed in with its validation
    assert arm_a.endswith(": n 3, mean 0.3400, spread 0.0400, min 0.3000, max 0.3800: "
                          "s0 0.3000, s1 0.3400, s2 0.3800; left out, no test score: a-s4")
    arm_b = next(line for line in out.splitlines() if line.startswith("  loss=dice_ce zero_ce_weight=0:"))
    values_b = [0.32, 0.39, 0.40, 0.45]
    assert (f": n 4, mean {sum(values_b) / 4:.4f}, spread {sample_std(values_b):.4f}, min 0.3200, "
            "max 0.4500: s0 0.3200, s1 0.3900, s2 0.4000, s3 0.4500") in arm_b
    assert f"{sum(values_b) / 4:.4f}" == "0.3900" and f"{sample_std(values_b):.4f}" == "0.0535"


def test_an_arm_without_scores_json_falls_back_to_validation(three_arms, capsys):
    out = run_main(capsys, [str(three_arms / "*")])
    arm_c = next(line for line in out.splitlines() if line.startswith("  loss=ce zero_ce_weight=0.3"))
    values_c = [0.50, 0.36]                         # val_dice at each run's best epoch
    assert arm_c == (f"  loss=ce zero_ce_weight=0.3 [val]: n 2, mean {sum(values_c) / 2:.4f}, spread "
                     f"{sample_std(values_c):.4f}, min 0.3600, max 0.5000: s0 0.5000, s1 0.3600")
    lines = out.splitlines()
    at = lines.index("  B loss=ce zero_ce_weight=0.3  vs  A loss=dice zero_ce_weight=0.3:")
    assert lines[at + 1] == "    not paired: A has test scores, B val scores"


def test_paired_differences_use_the_common_seeds(three_arms, capsys):
    out = run_main(capsys, [str(three_arms / "*")])
    lines = out.splitlines()
    at = lines.index("  B loss=dice_ce zero_ce_weight=0  vs  A loss=dice zero_ce_weight=0.3:")
    # B - A: s0 0.32 - 0.30, s1 0.39 - 0.34, s2 0.40 - 0.38; seed 3 only in B (A's seed 4 has no score)
    differences = [0.02, 0.05, 0.02]
    assert lines[at + 1] == (f"    +{sum(differences) / 3:.4f} mean over 3 seeds (3/3 ahead): "
                             "s0 +0.0200, s1 +0.0500, s2 +0.0200 (unpaired: s3)")


def test_one_arm_and_the_rand_index_of_instance_runs(tmp_path, capsys):
    for seed, rand in enumerate((0.6, 0.7)):
        make_run(tmp_path, f"i-s{seed}", seed, None, test_rand=rand, label_mode="instance")
    out = run_main(capsys, [str(tmp_path / "i-s0"), str(tmp_path / "i-s1")])
    assert "Arms (test rand" in out
    assert ("  (common settings): n 2, mean 0.6500, spread 0.0707, min 0.6000, max 0.7000: "
            "s0 0.6000, s1 0.7000") in out
    assert "one arm: nothing to pair" in out
    out = run_main(capsys, [str(tmp_path / "i-s0"), "--metric", "dice"])  # no test Dice: validation
    assert "Arms (test dice" in out and "(common settings) [val]: n 1, mean 0.3000, spread -" in out


def test_keys_of_one_script_are_compared_among_its_runs(tmp_path, capsys):
    """Supervised runs lack UniMatch's keys: a key every UniMatch run sets alike tells nothing
    apart, the method column does; a key that runs of one method differ in (conf_thresh), or
    that one of its runs lacks (mix_source, added since), is shown."""
    for seed in (0, 1):
        make_run(tmp_path, f"sup-s{seed}", seed, 0.40 + seed / 100, method="supervised")
        make_run(tmp_path, f"um-s{seed}", seed, 0.45 + seed / 100, method="unimatch", conf_thresh=0.95,
                 mu_img=0.5, mix_source="loader")
        make_run(tmp_path, f"um08-s{seed}", seed, 0.47 + seed / 100, method="unimatch", conf_thresh=0.8,
                 mu_img=0.5)
    out = run_main(capsys, [str(tmp_path / "*")])
    header = out.splitlines()[0].split()
    assert header[:5] == ["run", "method", "conf_thresh", "mix_source", "seed"]  # not mu_img
    rows = {line.split()[0]: line.split()[:5] for line in out.splitlines()[1:7]}
    assert rows["sup-s1"] == ["sup-s1", "supervised", "-", "-", "1"]
    assert rows["um08-s0"] == ["um08-s0", "unimatch", "0.8", "-", "0"]
    lines = out.splitlines()
    at = lines.index("  B method=unimatch conf_thresh=0.95 mix_source=loader  vs  "
                     "A method=supervised conf_thresh=- mix_source=-:")
    assert lines[at + 1] == "    +0.0500 mean over 2 seeds (2/2 ahead): s0 +0.0500, s1 +0.0500"
    out = run_main(capsys, [str(tmp_path / "um-s*"), str(tmp_path / "sup-s*")])
    assert out.splitlines()[0].split()[:3] == ["run", "method", "seed"]
    for mode in ("bcp", "mean_teacher"):  # train_teacher_student.py's mode names the method
        make_run(tmp_path, f"{mode}-s0", 0, 0.4, method=mode, mode=mode)
    out = run_main(capsys, [str(tmp_path / "bcp-s0"), str(tmp_path / "mean_teacher-s0")])
    assert out.splitlines()[0].split()[:3] == ["run", "method", "seed"]


def test_errors_exit_2_with_one_line(tmp_path, capsys):
    main = runs_module.main
    assert "no run directories found" in one_line_error(capsys, [str(tmp_path / "none-*")], main)
    (tmp_path / "plain").mkdir()
    assert one_line_error(capsys, [str(tmp_path / "plain")], main).endswith(
        "plain: not a run directory (no config.yaml)")
    run = make_run(tmp_path, "broken", 0, 0.3)
    with open(run / "log.jsonl", "a") as log:
        log.write('{"epoch": 3, "val_dice": \n')
    error = one_line_error(capsys, [str(run)], main)
    assert re.search(r"broken/log\.jsonl: line 3: not valid JSON", error), error
    (run / "log.jsonl").write_text('{"epoch": 1, "val_dice": 0.2}\n')
    (run / "scores.json").write_text("[1, 2]")
    assert "broken/scores.json: a JSON object was expected" in one_line_error(capsys, [str(run)], main)
    (run / "scores.json").write_text('{"test": {"dice": "high"}}')
    assert "broken/scores.json: test dice must be a number or null, got 'high'" in one_line_error(
        capsys, [str(run)], main)
    (run / "config.yaml").write_text("loss: [dice\n")
    assert "broken/config.yaml: not valid YAML" in one_line_error(capsys, [str(run)], main)
    with pytest.raises(SystemExit) as exit_info:                # argparse: a bad --metric
        run_cli(main, [str(run), "--metric", "iou"])
    assert exit_info.value.code == 2


def test_test_py_writes_scores_json(workdir, tiny_phantom, capsys):
    """One tiny supervised epoch, test.py on its best.pth: scores.json holds the printed scores,
    the scores of the written submission, and utils.runs reads the run."""
    import test as test_script
    import train_supervised
    from dataloaders.label_csv import read_label_csv
    from utils.metrics import score_predictions
    train_supervised.main(["--config", "configs/tiny.yaml", "--data", str(tiny_phantom),
                           "--out_dir", "run", "--epochs", "1"])
    capsys.readouterr()
    test_script.main(["--ckpt", "run/best.pth", "--gpu", "-1", "--tta", "none",
                      "--background_scale", "0.7"])
    out = capsys.readouterr().out
    scores = json.loads((workdir / "run" / "scores.json").read_text())
    assert f"scores {workdir / 'run' / 'scores.json'}" in out.splitlines()[-1]
    assert {"checkpoints", "weights", "tta", "postprocess", "config", "val", "test"} <= set(scores)
    assert scores["checkpoints"] == ["run/best.pth"] and scores["weights"] == ["student"]
    assert scores["config"]["epochs"] == 1 and scores["tta"] == "none" and "member_configs" not in scores
    assert scores["background_scale"] == 0.7
    printed = re.search(r"^test \(6 slices, full labels\): per-class Dice (\d\.\d{4})", out, re.MULTILINE)
    test = scores["test"]
    assert test["slices"] == 6 and f"{test['dice']:.4f}" == printed.group(1)
    truth, truth_names, _ = read_label_csv(tiny_phantom / "y_test.csv")
    predicted, names, _ = read_label_csv(workdir / "run" / "submission.csv")
    predicted = predicted[[names.index(name) for name in truth_names]]
    expected = score_predictions(truth, predicted, scores["config"]["num_classes"])
    assert test["dice"] == pytest.approx(expected["dice"], abs=1e-12)
    assert test["rand"] == pytest.approx(expected["rand"], abs=1e-12)
    assert all(v is None or 0 <= v <= 1 for v in test["per_class_dice"].values())
    assert len(test["per_class_dice"]) == len(expected["per_class_dice"]) - 1   # background left out
    assert sum(v is not None for v in test["per_class_dice"].values()) == np.sum(~np.isnan(
        expected["per_class_dice"]))
    for name, area in test["area"].items():
        assert (area["flag"] == "SINK") == (area["ratio"] > 3), name
        assert area["flag"] in ("", "SINK", "MISSING") and area["ratio"] is not None
    assert test["sink_classes"] == [n for n, a in test["area"].items() if a["flag"] == "SINK"]
    assert test["worst_area_ratio"] == max(a["ratio"] for a in test["area"].values())
    out = run_main(capsys, [str(workdir / "run")])
    row = out.splitlines()[1].split()
    assert row[0] == "run" and f"{test['dice']:.4f}" in row and f"{test['rand']:.4f}" in row


def test_one_data_folder_spelled_two_ways_is_one_setting(tmp_path, monkeypatch, capsys):
    (tmp_path / "ct").mkdir()
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path, "a-s0", 0, test_dice=0.30, data="ct")
    make_run(tmp_path, "a-s1", 1, test_dice=0.40, data=str(tmp_path / "ct"))
    make_run(tmp_path, "b-s0", 0, test_dice=0.50, data="ct", loss="dice_ce")
    runs_module.main([str(tmp_path / "a-s0"), str(tmp_path / "a-s1"), str(tmp_path / "b-s0")])
    out = capsys.readouterr().out
    assert "  loss=dice: n 2, mean 0.3500" in out and "data=" not in out


def test_test_scores_from_different_test_py_settings_are_noted(tmp_path, capsys):
    for seed in (0, 1):
        make_run(tmp_path, f"a-s{seed}", seed, test_dice=0.3)
    out = run_main(capsys, [str(tmp_path / "*")])
    assert "different --tta" not in out
    scores_path = tmp_path / "a-s1" / "scores.json"
    scores_path.write_text(json.dumps({**json.loads(scores_path.read_text()), "background_scale": 0.5}))
    out = run_main(capsys, [str(tmp_path / "*")])
    assert ("note: the test scores were computed with different --tta / --background_scale / "
            "--postprocess settings") in out


def test_a_path_per_seed_pairs_runs_instead_of_forming_arms(tmp_path, capsys):
    """Each seed's own warm start (init_ckpt sup-s<seed>) is the seed's, not an arm's: two arms
    (conf_thresh 0.95 / 0.8), each seed from its own checkpoint, pair seed by seed; against runs
    from scratch (init_ckpt '') the path is an arm difference again."""
    for seed, (a, b) in enumerate(((0.40, 0.43), (0.50, 0.49))):
        warm = f"runs/sup-s{seed}/best.pth"
        make_run(tmp_path, f"a-s{seed}", seed, a, init_ckpt=warm, conf_thresh=0.95)
        make_run(tmp_path, f"b-s{seed}", seed, b, init_ckpt=warm, conf_thresh=0.8)
    out = run_main(capsys, [str(tmp_path / "*")])
    assert out.splitlines()[0].split()[:4] == ["run", "conf_thresh", "init_ckpt", "seed"]
    assert "note: init_ckpt: one path per seed, paired with the seed rather than forming arms" in out
    lines = out.splitlines()
    at = lines.index("  B conf_thresh=0.8  vs  A conf_thresh=0.95:")
    assert lines[at + 1] == "    +0.0100 mean over 2 seeds (1/2 ahead): s0 +0.0300, s1 -0.0100"
    make_run(tmp_path, "scratch-s0", 0, 0.3, init_ckpt="", conf_thresh=0.95)
    out = run_main(capsys, [str(tmp_path / "*")])
    assert "one path per seed" not in out
    assert "  conf_thresh=0.95 init_ckpt=runs/sup-s0/best.pth: n 1" in out
    out = run_main(capsys, [str(tmp_path / "a-s0"), str(tmp_path / "b-s0")])  # one seed: no pairing by path
    assert "one path per seed" not in out and "init_ckpt" not in out.splitlines()[0]


def test_a_run_from_another_runs_warm_start_starts_where_that_run_started(tmp_path, capsys, monkeypatch):
    """The default command (warm start trained inside: `warm_start` true, no `init_ckpt`) against
    a flag given with `--init_ckpt` of that run's warm_start/best.pth, spelled relative: the same
    start, so the flag alone forms the arms, with one seed as with two; a run whose warm start
    folder is gone is told apart by its `init_ckpt` again."""
    monkeypatch.chdir(tmp_path)
    for seed, (default, flag) in enumerate(((0.48, 0.50), (0.52, 0.51))):
        make_run(tmp_path, f"def-s{seed}", seed, default, warm_start=True, init_ckpt="", scale=0.5)
        (tmp_path / f"def-s{seed}" / "warm_start").mkdir()
        (tmp_path / f"def-s{seed}" / "warm_start" / "best.pth").write_bytes(b"")
        make_run(tmp_path, f"flag-s{seed}", seed, flag, warm_start=True,
                 init_ckpt=f"def-s{seed}/warm_start/best.pth", scale=1)
    out = run_main(capsys, ["def-s0", "flag-s0"])
    assert out.splitlines()[0].split()[:3] == ["run", "scale", "seed"]
    assert "  B scale=1  vs  A scale=0.5:\n    +0.0200 mean over 1 seeds (1/1 ahead): s0 +0.0200" in out
    out = run_main(capsys, ["def-s*", "flag-s*"])
    assert "note: init_ckpt: one path per seed, paired with the seed rather than forming arms" in out
    assert f"def-s1   {tmp_path / 'def-s1/warm_start/best.pth'}  0.5" in out
    assert "    +0.0050 mean over 2 seeds (1/2 ahead): s0 +0.0200, s1 -0.0100" in out
    (tmp_path / "def-s0" / "warm_start" / "best.pth").unlink()
    out = run_main(capsys, ["def-s0", "flag-s0"])
    assert out.splitlines()[0].split()[:4] == ["run", "init_ckpt", "scale", "seed"]
    assert "  init_ckpt= scale=0.5: n 1" in out


def test_runs_computed_in_different_places_are_noted(tmp_path, capsys):
    """Seed 1 of arm B ran with two threads, seed 0 of arm A was resumed on another machine
    after its first evaluation, seed 1 of arm A predates the record."""
    one, two, other = ("torch 2.1, cpu (X, 1 thread), 1 process", "torch 2.1, cpu (X, 2 threads), 1 process",
                       "torch 2.1, cuda (Y), 1 process")
    make_run(tmp_path, "a-s0", 0, 0.3, ran_on=(one, other))
    make_run(tmp_path, "a-s1", 1, 0.3)
    make_run(tmp_path, "b-s0", 0, 0.4, loss="ce", ran_on=(one, one))
    make_run(tmp_path, "b-s1", 1, 0.4, loss="ce", ran_on=(two, two))
    out = run_main(capsys, [str(tmp_path / "*")])
    assert "note: the runs computed in different places" in out
    assert f"  {one}: a-s0, b-s0\n" in out and f"  {other}: a-s0\n" in out
    assert f"  {two}: b-s1\n" in out and "  not recorded: a-s1\n" in out
    for folder in ("a-s1", "b-s1"):
        (tmp_path / folder / "log.jsonl").write_text("".join(
            json.dumps({"epoch": e, "val_dice": 0.3, "ran_on": one}) + "\n" for e in (1, 2)))
    (tmp_path / "a-s0" / "log.jsonl").write_text(json.dumps({"epoch": 1, "val_dice": 0.3, "ran_on": one}) + "\n")
    assert "computed in different places" not in run_main(capsys, [str(tmp_path / "*")])
