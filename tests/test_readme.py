"""The README's commands, as written: every flag of every command a user copies exists and takes
the value shown (the configs and argument parsers read them; nothing trains), and the quick start
runs end to end at a tiny budget."""
import functools
import re
import shlex
from pathlib import Path

import pytest

import bench
import test as test_script
import train_unimatch
from conftest import ROOT
from dataloaders import phantom
from utils import metrics, runs
from utils.config import load_config

SCRIPTS = {"train_supervised.py": "supervised", "train_unimatch.py": "unimatch",
           "train_teacher_student.py": "teacher_student", "test.py": "test"}


def readme_commands():
    """Every `python …` / `torchrun …` command of the README (code blocks and inline code), one
    per loop body, with shell comments dropped and loop variables set to 0."""
    text = (ROOT / "README.md").read_text()
    lines = re.findall(r"^ {4,}((?:python|torchrun|for) .+)$", text, flags=re.MULTILINE)
    lines += re.findall(r"`((?:python|torchrun) [^`]+)`", text)
    commands = []
    for line in lines:
        line = re.sub(r"\s+#.*$", "", " ".join(line.split())).strip()
        if "<script>" in line:  # a pattern, not a command
            continue
        loop = re.match(r"for \w+ in .+?; do (.+?); done$", line)
        if loop:
            line = loop.group(1).replace("$k", "0")
        commands.append(line)
    return commands


# `python -m` modules of the README: the module and the first function that does work once the
# arguments are parsed
MODULES = {"dataloaders.phantom": (phantom, "generate_phantom"),
           "utils.metrics": (metrics, "read_label_csv"), "utils.runs": (runs, "find_runs")}


class Parsed(Exception):
    """Raised by a stand-in for the work a command would do once its arguments are parsed."""


def stopped(function):
    """A stand-in for `function` (same signature) that raises `Parsed`."""
    @functools.wraps(function)
    def stand_in(*args, **kwargs):
        raise Parsed
    return stand_in


def parse(command, monkeypatch):
    """Parse `command`'s arguments the way its script does, stopping before any work."""
    words = shlex.split(command)
    if words[0] == "torchrun":  # the launcher's own options come before the script
        words = ["python"] + words[next(i for i, w in enumerate(words) if w.endswith(".py")):]
    if words[1:3] == ["-m", "pytest"]:
        return
    if words[1] == "-m":
        module, first_work = MODULES[words[2]]
        monkeypatch.setattr(module, first_work, stopped(getattr(module, first_work)))
        with pytest.raises(Parsed):
            module.main(words[3:])
        return
    if words[1] == "bench.py":
        bench.parse_arguments(words[2:])
        return
    script = SCRIPTS[Path(words[1]).name]
    arguments = words[2:]
    if script == "test":
        _, arguments = test_script.checkpoint_arguments(arguments)
    load_config(script, arguments)


def test_the_readme_has_commands_to_check():
    commands = readme_commands()
    assert len(commands) > 20
    assert any(command.startswith("torchrun") for command in commands)
    assert any("--fold 0 --out_dir runs/cv/fold0" in command for command in commands)


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses(command, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_experiment.yaml").write_text("{}\n")  # the README's example of --config
    parse(command, monkeypatch)


def test_a_flag_that_does_not_exist_would_fail(monkeypatch):
    with pytest.raises(SystemExit):
        parse("python train_unimatch.py --labeled_ratio 0.8 --conf_threshold 0.9", monkeypatch)


def test_the_quick_start_runs_at_a_tiny_budget(workdir, tiny_phantom, capsys):
    """`python train_unimatch.py --labeled_ratio 0.8 --gpu 0` then `python test.py --ckpt
    best.pth` (which finds runs/latest/best.pth), with the tiny config and the tiny phantom."""
    train_unimatch.main(["--labeled_ratio", "0.8", "--gpu", "0", "--config", "configs/tiny.yaml",
                         "--data", str(tiny_phantom)])
    test_script.main(["--ckpt", "best.pth"])
    out = capsys.readouterr().out
    assert "best.pth not found; using runs/latest/best.pth" in out
    assert "Done: submission" in out
