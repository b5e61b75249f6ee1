"""The one atomic-write helper: the target is replaced whole or not at all."""
import os

import pytest

from utils.files import atomic_path


def test_success_replaces_the_target_and_keeps_the_extension(tmp_path):
    target = tmp_path / "sub" / "plot.png"
    with atomic_path(target) as temporary:
        assert temporary.endswith(".png") and os.path.dirname(temporary) == str(target.parent)
        assert not os.path.lexists(temporary)  # the body creates it (file or symlink)
        with open(temporary, "w") as file:
            file.write("new")
    assert target.read_text() == "new"
    assert os.listdir(target.parent) == ["plot.png"]


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "best.pth"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            with open(temporary, "w") as file:
                file.write("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["best.pth"]


def test_a_symlink_replaces_a_symlink(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    latest = tmp_path / "latest"
    for name in ("a", "b"):
        with atomic_path(latest) as temporary:
            os.symlink(name, temporary, target_is_directory=True)
    assert os.readlink(latest) == "b"
