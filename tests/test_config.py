"""Config: YAML < method YAML < --config < flags < --set; unknown keys and wrong types fail."""
import pytest
import yaml

from utils.config import config_to_yaml, load_config
from utils.errors import InputError


def test_defaults_come_from_the_yaml_chain():
    cfg = load_config("unimatch", [])
    assert cfg.conf_thresh == 0.95          # unimatch.yaml
    assert cfg.lr == 0.001                  # default.yaml through `base:`
    assert cfg.stream_loss == "dice"        # unimatch.yaml


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
    assert load_config("supervised", ["--no-partial_labels"]).partial_labels is False
    assert load_config("supervised", []).partial_labels is True  # not given: the YAML default
    assert load_config("supervised", ["--no-partial_labels"])._overrides == ["partial_labels"]


def test_help_and_errors_spell_values_as_yaml(capsys):
    with pytest.raises(SystemExit):
        load_config("test", ["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: false)" in text and "(default: '')" in text and "(default: none)" in text
    assert "True" not in text and "False" not in text
    with pytest.raises(InputError, match=r"'postprocess' must be of type bool like its default "
                                         r"false, got \[1, 2\]"):
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


def test_preset_sits_below_user_overrides(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("epochs: 3\nlr: 0.01\n")
    cfg = load_config("supervised", ["--lr", "0.2"], preset=lambda c: preset)
    assert cfg.epochs == 3 and cfg.lr == 0.2


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config("supervised", ["--seed", "5"])
    text = config_to_yaml(cfg)
    assert yaml.safe_load(text)["seed"] == 5
    assert "_overrides" not in text


def test_every_network_option_is_settable_and_checked_against_the_network():
    from utils.builders import check_network_options
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
    assert cfg._preset.endswith(preset)
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
