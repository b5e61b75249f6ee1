"""Writing files so that a crash never leaves a half-written one.

Checkpoints, label CSVs, caches, plots, the phantom's marker and `runs/latest` are all written
to a temporary name in the target's folder and renamed over the target (`os.replace` is atomic
on one file system): readers see the old file or the new one, never a part.

    with atomic_path("best.pth") as temporary:
        torch.save(state, temporary)
"""
import contextlib
import os
import secrets


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success rename it over `path`.

    The temporary name is not created beforehand (the body may make a file, a symlink …) and
    keeps `path`'s extension (matplotlib and OpenCV choose the format from it). If the body
    raises, the temporary is removed and an existing `path` is left untouched.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, extension = os.path.splitext(name)
    temporary = os.path.join(folder, f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{extension}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise
