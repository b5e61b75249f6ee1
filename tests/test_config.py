"""Config: YAML < method YAML < --config < flags < --set; unknown keys and wrong types fail; a
resolved config is checked once (utils.runtime.check_config), completed and frozen."""
import copy
import pickle

import pytest
import yaml

from utils.config import CONFIG_DIR, Config, config_to_yaml, load_config, script_defaults
from utils.errors import InputError
from utils.runtime import check_config


def test_defaults_come_from_the_yaml_chain():
    cfg = load_config("unimatch", [])
    assert cfg.mix_source == "loader"       # unimatch.yaml
    assert cfg.stream_loss == "dice_ce"     # semi_supervised.yaml through `base:`
    assert cfg.lr == 0.001                  # default.yaml through semi_supervised.yaml's `base:`


def test_precedence_yaml_config_flag_set(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("lr: 0.5\nbatch_size: 3\nseed: 7\n")
    cfg = load_config("supervised", ["--config", str(extra), "--lr", "0.25",
                                     "--set", "seed=9", "--set", "model_kwargs.attunet.base=8"])
    assert cfg.batch_size == 3              # --config over the YAML default (8)
    assert cfg.lr == 0.25                   # flag over --config
    assert cfg.seed == 9                    # --set over --config
    assert cfg.model_kwargs["attunet"] == {"base": 8, "dropout": 0.0}   # nested merge keeps siblings


def test_values_are_parsed_as_yaml():
    cfg = load_config("supervised", ["--labeled_ratio", "0.8", "--aug_scale", "[0.9, 1.1]",
                                     "--partial_labels", "false"])
    assert cfg.labeled_ratio == 0.8 and isinstance(cfg.labeled_ratio, float)
    assert cfg.aug_scale == [0.9, 1.1]
    assert cfg.partial_labels is False


def test_a_bare_boolean_flag_means_true_and_no_flag_false():
    assert load_config("test", ["--postprocess"]).postprocess is True
    assert load_config("test", ["--postprocess", "--tta", "shift"]).postprocess is True
    assert load_config("test", ["--postprocess", "false"]).postprocess is False
    assert load_config("test", ["--no-postprocess"]).postprocess is False
    assert load_config("supervised", []).aug_flip is False  # a key whose default is false
    assert load_config("supervised", ["--aug_flip"]).aug_flip is True
    assert load_config("supervised", ["--aug_flip", "--seed", "3"]).aug_flip is True
    assert load_config("supervised", ["--no-partial_labels"]).partial_labels is False
    assert load_config("supervised", []).partial_labels is True  # not given: the YAML default
    assert load_config("supervised", ["--no-partial_labels"])._overrides == ["partial_labels"]


def test_help_and_errors_spell_values_as_yaml(capsys):
    with pytest.raises(SystemExit):
        load_config("test", ["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: true)" in text and "(default: '')" in text and "(default: shift)" in text
    assert "True" not in text and "False" not in text
    with pytest.raises(InputError, match=r"'postprocess' must be of type bool like its default "
                                         r"true, got \[1, 2\]"):
        load_config("test", ["--postprocess", "[1, 2]"])


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(InputError, match="unknown config key 'no_such_key'"):
        load_config("supervised", ["--set", "no_such_key=1"])
    extra = tmp_path / "bad.yaml"
    extra.write_text("learning_rate: 0.1\n")
    with pytest.raises(InputError, match="bad.yaml: unknown config key 'learning_rate'"):
        load_config("supervised", ["--config", str(extra)])


def test_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config("supervised", ["--learning_rate", "0.1"])
    assert exit_info.value.code == 2


def test_type_mismatch_is_an_error():
    with pytest.raises(InputError, match="'batch_size' must be of type int"):
        load_config("supervised", ["--batch_size", "big"])
    cfg = load_config("supervised", ["--lr", "1"])      # an int may stand for a float
    assert cfg.lr == 1


def test_presets_sit_in_order_above_the_yaml_and_below_a_resumed_run_and_the_user(tmp_path):
    first, second = tmp_path / "mode.yaml", tmp_path / "phantom.yaml"
    first.write_text("epochs: 3\nlr: 0.01\nseed: 5\n")
    second.write_text("lr: 0.02\n")
    cfg = load_config("supervised", ["--batch_size", "2"], presets=lambda c: [first, second])
    assert (cfg.epochs, cfg.lr, cfg.seed, cfg.batch_size) == (3, 0.02, 5, 2)   # the later preset wins
    assert cfg._presets == [str(first), str(second)]
    assert load_config("supervised", ["--lr", "0.2"], presets=lambda c: [first, second]).lr == 0.2
    resumed = load_config("supervised", ["--resume", "run/last.pth"], presets=lambda c: [first],
                          saved_settings=lambda path: ({"lr": 0.001, "epochs": 7}, []))
    assert (resumed.lr, resumed.epochs, resumed.seed) == (0.001, 7, 5)   # the run's own settings
    assert load_config("supervised", [])._presets == []


@pytest.mark.parametrize("mode, flags, scale", [
    ("bcp", [], 0.5),                                           # configs/teacher_student_bcp.yaml
    ("mean_teacher", [], 1.0), ("pseudo_label", [], 1.0),       # semi_supervised.yaml
    ("bcp", ["--pseudo_background_scale", "0.75"], 0.75)])      # a flag over the mode's file
def test_a_mode_takes_its_own_defaults_file(mode, flags, scale, tiny_phantom):
    from utils.runtime import setup
    cfg = setup("teacher_student", ["--data", str(tiny_phantom), "--gpu", "-1", "--mode", mode] + flags, None)
    assert cfg.pseudo_background_scale == scale
    assert cfg._presets[-1].endswith("phantom_teacher_student.yaml")
    assert cfg._presets[0].endswith("teacher_student_bcp.yaml") == (mode == "bcp")


def test_a_resumed_run_keeps_the_scale_it_was_started_with_over_its_mode_s_file(tmp_path):
    """A BCP run started before teacher_student_bcp.yaml existed (scale 1) resumes with 1."""
    from utils.runtime import mode_preset
    saved = {"mode": "bcp", "pseudo_background_scale": 1.0}
    cfg = load_config("teacher_student", ["--resume", "run/last.pth"],
                      presets=lambda c: [mode_preset("teacher_student", c)],
                      saved_settings=lambda path: (saved, None))
    assert cfg.mode == "bcp" and cfg.pseudo_background_scale == 1.0


def test_resume_takes_the_checkpoints_settings_beneath_the_command_line(tmp_path):
    saved = {"lr": 0.01, "seed": 4, "labeled_ratio": 0.6, "gpu": 3, "num_workers": 7,
             "out_dir": "elsewhere", "retired_option": 1}
    seen = []

    def saved_settings(path):
        seen.append(path)
        return saved, ["lr", "labeled_ratio"]
    cfg = load_config("supervised", ["--resume", "run/last.pth", "--labeled_ratio", "0.9"],
                      saved_settings=saved_settings)
    assert seen == ["run/last.pth"]
    assert cfg.lr == 0.01 and cfg.seed == 4           # the run's own settings
    assert cfg.labeled_ratio == 0.9                   # a flag given again wins
    assert cfg.gpu == 0 and cfg.num_workers == 2      # where it runs: the resuming command's
    assert cfg.out_dir == "" and "retired_option" not in cfg
    assert set(cfg._overrides) == {"lr", "labeled_ratio", "resume"}
    # a checkpoint that did not record its overrides: the keys that differ from the defaults
    older = load_config("supervised", ["--resume", "run/last.pth"],
                        saved_settings=lambda path: (saved, None))
    assert set(older._overrides) == {"lr", "seed", "labeled_ratio", "resume"}
    # without --resume the hook is not called
    assert load_config("supervised", [], saved_settings=saved_settings).lr == 0.001 and len(seen) == 1


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config("supervised", ["--seed", "5"])
    text = config_to_yaml(cfg)
    assert yaml.safe_load(text)["seed"] == 5
    assert "_overrides" not in text


def test_every_network_option_is_settable_and_checked_against_the_network():
    from utils.runtime import check_network_options
    cfg = load_config("supervised", ["--set", "model_kwargs.segformer.dropout=0"])
    assert cfg.model_kwargs["segformer"] == {"drop_path_rate": 0.1, "dropout": 0}
    check_network_options(cfg.model_kwargs)
    misspelt = load_config("supervised", ["--set", "model_kwargs.segformer.dropot=0"])
    with pytest.raises(InputError, match=r"model_kwargs.segformer: unknown option\(s\) dropot"):
        check_network_options(misspelt.model_kwargs)
    with pytest.raises(InputError, match="model_kwargs: unknown network family 'unet'"):
        check_network_options({"unet": {"base": 8}})
    with pytest.raises(InputError, match="'drop_path_rate' must be of type float"):
        load_config("supervised", ["--set", "model_kwargs.segformer.drop_path_rate=abc"])


def test_a_stray_local_rank_flag_is_ignored():
    assert "local_rank" not in load_config("supervised", ["--local-rank=1"])
    assert load_config("supervised", ["--local_rank", "0"])["_overrides"] == []


@pytest.mark.parametrize("script, preset", [("supervised", "phantom.yaml"),
                                            ("unimatch", "phantom_unimatch.yaml"),
                                            ("teacher_student", "phantom_teacher_student.yaml")])
def test_the_phantom_message_names_the_preset_in_use(script, preset, tiny_phantom, capsys):
    from utils.runtime import setup
    cfg = setup(script, ["--data", str(tiny_phantom), "--gpu", "-1"], None)
    assert cfg._presets == [str(CONFIG_DIR / preset)]
    assert f"the phantom preset (configs/{preset}) applies" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["train_supervised", "train_unimatch", "train_teacher_student",
                                    "test"])
def test_help_prints_the_docstring_commands_line_by_line(script, capsys):
    """Shell continuations in a docstring stay visible: no command is joined into one line
    with a run of spaces."""
    module = __import__(script)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = capsys.readouterr().out
    import re
    assert not re.search(r"\S {3,}--", text.split("options:")[0])
    assert module.__doc__.splitlines()[0] in text


def test_help_names_the_default_a_mode_s_file_sets(capsys):
    import train_teacher_student
    with pytest.raises(SystemExit):
        train_teacher_student.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())     # argparse wraps the help text
    assert "(default: 1.0; --mode bcp: 0.5)" in text       # configs/teacher_student_bcp.yaml
    assert "(default: 0.95)" in text                      # conf_thresh: no mode file sets it


# ==== checked once, then frozen ====
MODEL_NAMES = ("attunet, segformer_b0, segformer_b1, segformer_b2, segformer_b3, segformer_b4, segformer_b5, "
               "dinov2_s, dinov2_b, dinov2_l")


@pytest.mark.parametrize("script, flags, message", [
    ("supervised", ["--label_mode", "ids"], "label_mode: unknown 'ids' (choose class or instance)"),
    ("supervised", ["--model", "unet"], f"model: unknown model 'unet'; valid models: {MODEL_NAMES}"),
    ("supervised", ["--loss", "focal"], "loss: unknown loss 'focal' (choose from dice, tvmf_dice, ce, "
                                        "dice_ce, marginal_ce, marginal_dice, marginal_dice_ce)"),
    ("unimatch", ["--stream_loss", "tvmf_dice"],
     "loss: unknown stream loss 'tvmf_dice' (choose from dice, ce, dice_ce)"),
    ("teacher_student", ["--stream_loss", "focal"],
     "loss: unknown stream loss 'focal' (choose from dice, ce, dice_ce)"),
    ("supervised", ["--scheduler", "cosine"], "scheduler: unknown 'cosine' (choose plateau or poly)"),
    ("unimatch", ["--amp_dtype", "half"], "amp_dtype: unknown 'half' (choose float16 or bfloat16)"),
    ("supervised", ["--select_metric", "iou"], "select_metric: unknown 'iou' (choose dice or rand)"),
    ("unimatch", ["--mix_source", "both"], "mix_source: unknown 'both' (choose loader or batch)"),
    ("teacher_student", ["--mode", "co_training"],
     "mode: unknown 'co_training' (choose pseudo_label, mean_teacher, bcp)"),
    ("teacher_student", ["--schedule", "staged"], "schedule: unknown 'staged' (choose joint, pretrain_finetune)"),
    ("teacher_student", ["--consistency", "kl"], "consistency: unknown 'kl' (choose mse, hard)"),
    ("teacher_student", ["--tta", "spin"], "tta: unknown 'spin' (choose none, shift, flip, shift_flip)"),
    ("test", ["--tta", "spin"], "--tta: unknown 'spin' (choose none, shift, flip, shift_flip)"),
    ("test", ["--split", "all"], "--split: unknown 'all' (choose val, train, test, oof)"),
    ("test", ["--weights", "ema"], "--weights: unknown 'ema' (choose teacher or student)"),
    ("test", ["--baseline", "otsu"], "--baseline: unknown 'otsu' (the only one is watershed)"),
    ("test", ["--background_scale", "-0.5"], "--background_scale: must be >= 0 (1 = plain argmax), got -0.5"),
    # the combinations refused
    ("unimatch", ["--edge_guided"], "edge_guided: not supported by train_unimatch.py (its feature-perturbed "
                                    "stream decodes plain features); use train_supervised.py or "
                                    "train_teacher_student.py"),
    ("supervised", ["--labeled_ratio", "1"], "scheduler: plateau follows the validation score, and "
                                             "labeled_ratio 1 leaves no validation split; add --scheduler poly"),
    ("supervised", ["--label_mode", "instance", "--area_weight", "0.1"],
     "area_weight, pseudo_area_filter: class area bounds mean nothing for per-image structure ids "
     "(instance mode)"),
    ("supervised", ["--encoder_lr_scale", "0"], "encoder_lr_scale: must be > 0, got 0"),
    ("unimatch", ["--layer_decay", "1.5"], "layer_decay: must be in (0, 1], got 1.5"),
    ("supervised", ["--model", "segformer_b0", "--layer_decay", "0.75"],
     "layer_decay: needs a network with numbered encoder layers (dinov2_s, dinov2_b, dinov2_l), "
     "not segformer_b0"),
    ("teacher_student", ["--model", "dinov2_s", "--edge_guided"],
     "edge_guided: the edge branch reads stride-4 features, and every map of dinov2_s is at "
     "stride 14; use attunet or segformer_*"),
    ("supervised", ["--set", "model_kwargs.attunet.depth=3"],
     "model_kwargs.attunet: unknown option(s) depth (options: base, dropout)"),
    ("teacher_student", ["--mode", "bcp", "--static_every", "0"],
     "static_every: 0 is not a positive iteration count"),
    ("test", ["--baseline", "watershed"], "--baseline watershed needs --data (there is no checkpoint)"),
    ("test", ["--baseline", "watershed", "--data", "d", "--split", "oof"],
     "--split oof scores fold checkpoints; the baseline has none"),
    ("test", ["--baseline", "watershed", "--data", "d", "--images", "new"],
     "--images: predicts with --ckpt checkpoints, not the baseline"),
])
def test_every_check_of_a_config_is_in_one_place_with_its_one_line_error(script, flags, message):
    cfg = load_config(script, flags)
    with pytest.raises(InputError) as error:
        check_config(cfg, script)
    assert str(error.value) == message


@pytest.mark.parametrize("script", ["supervised", "unimatch", "teacher_student", "test"])
def test_the_default_configs_pass_the_checks(script):
    check_config(load_config(script, []), script)


def test_setup_derives_before_it_freezes(tiny_phantom, capsys):
    from utils.runtime import setup
    # num_classes is the data's (its classes.yaml), whatever the flag said, as load_data used to set
    cfg = setup("supervised", ["--data", str(tiny_phantom), "--gpu", "-1", "--num_classes", "40"], None)
    assert cfg.num_classes == 15
    derived = setup("teacher_student", ["--data", str(tiny_phantom), "--gpu", "-1"], None,
                    derive=lambda c: {"out_dir": f"runs/{c.mode}-now"})
    assert derived.out_dir == "runs/mean_teacher-now"
    assert "out_dir: runs/mean_teacher-now" in capsys.readouterr().out  # printed as frozen
    with pytest.raises(AttributeError, match="config is frozen: 'num_classes'"):
        cfg.num_classes = 55
    with pytest.raises(TypeError, match="config is frozen: 'data'"):
        cfg["data"] = "elsewhere"
    for change in (lambda: cfg.update(lr=1.0), lambda: cfg.setdefault("new", 1), lambda: cfg.pop("lr"),
                   lambda: cfg.clear(), lambda: cfg.popitem(), lambda: cfg.__delitem__("lr")):
        with pytest.raises(TypeError, match="config is frozen"):
            change()
    with pytest.raises(AttributeError, match="config is frozen"):
        del cfg.lr
    assert cfg.num_classes == 15 and cfg.lr == 0.002 and "new" not in cfg  # unchanged (lr: the phantom preset's)


def test_copies_of_a_frozen_config():
    cfg = Config({"lr": 0.1, "model_kwargs": {"attunet": {"base": 4}}}).freeze()
    for twin in (copy.copy(cfg), copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert isinstance(twin, Config) and twin == cfg
        with pytest.raises(AttributeError, match="frozen"):
            twin.lr = 0.2
    unfrozen = Config({**cfg, "lr": 0.2})  # a new config built from a frozen one
    unfrozen.seed = 1
    assert (unfrozen.lr, unfrozen.seed, cfg.lr) == (0.2, 1, 0.1)
    assert copy.deepcopy(cfg)["model_kwargs"] is not cfg["model_kwargs"]


def test_script_defaults_are_the_yaml_chain():
    supervised = script_defaults("supervised")
    assert dict(supervised) == {k: v for k, v in load_config("supervised", []).items() if not k.startswith("_")}
    assert set(script_defaults("default")) == set(supervised)  # supervised.yaml adds nothing
    assert {"mode", "stream_loss"} <= set(script_defaults("teacher_student")) - set(supervised)
    # the semi-supervised keys are written once, beneath both semi-supervised scripts only
    semi = set(script_defaults("semi_supervised")) - set(supervised)
    assert {"conf_thresh", "warm_start", "init_ckpt", "use_test_as_unlabeled", "pseudo_area_filter"} <= semi
    assert semi <= set(script_defaults("unimatch")) & set(script_defaults("teacher_student"))
    supervised.lr = 1.0  # a new, unfrozen copy each time
    assert script_defaults("supervised").lr != 1.0
