"""Checkpoints: plain dicts that `torch.load(weights_only=True)` reads.

    {"format": "fewctseg-checkpoint", "version": 1,
     "model_name": "attunet", "model_kwargs": {...},        # enough for build_model()
     "model": state_dict, "teacher": state_dict or None,    # + any other named state dicts
     "optimizer", "scheduler", "scaler", "loss": state dicts (resume),
     "epoch": last finished epoch, "iteration": int, "best_score": float, "history": [...],
     "config": resolved config, "overrides": the keys the run was given explicitly,
     "data": {num_classes, img_size, ...}}

No RNG state is stored: each epoch re-seeds every generator from (seed, epoch), which is what
makes `--resume` exact.

Writes go to a temporary file in the same folder and are renamed over the target, so a crash
never leaves a truncated checkpoint.
"""
from pathlib import Path

import torch

from networks import build_model
from utils.errors import InputError
from utils.files import atomic_path

FORMAT = "fewctseg-checkpoint"


def save_checkpoint(state, path):
    """Atomically write `state` (a plain dict of tensors and Python values) to `path`."""
    with atomic_path(path) as temporary:
        torch.save({"format": FORMAT, "version": 1, **state}, temporary)


def load_checkpoint(path, map_location="cpu"):
    """Read one of our checkpoints; anything else is an InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many kinds on a foreign or truncated file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: not a readable checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path}: not a FewCTSeg checkpoint (no '{FORMAT}' marker); "
                         "pass a best.pth or last.pth written by a train_*.py script")
    return state


def require_network(state, path, model_name, model_kwargs):
    """An InputError naming `path` unless its checkpoint `state` holds the network this run builds."""
    if (state["model_name"], state["model_kwargs"]) != (model_name, model_kwargs):
        raise InputError(f"{path}: the checkpoint's network is {state['model_name']} {state['model_kwargs']}, "
                         f"this run builds {model_name} {model_kwargs}")


def saved_settings(path):
    """The config a checkpoint's run was trained with and the keys given to it explicitly (None
    when the checkpoint predates that record): what `--resume` continues with."""
    state = load_checkpoint(path)
    return state["config"], state.get("overrides")


def evaluated_weights(config, has_teacher):
    """The weights a run is validated and a checkpoint scored with: "teacher" or "model" (the
    student). A teacher–student run names them (`eval_weights`); a checkpoint written before that
    setting is scored by its teacher when it has one."""
    if not has_teacher:
        return "model"
    return "model" if config.get("eval_weights", "teacher") == "student" else "teacher"


def model_from_checkpoint(state, weights="model", path="checkpoint"):
    """Build the network a checkpoint describes and load `state[weights]` into it."""
    if state.get(weights) is None:
        available = [k for k in ("model", "teacher") if state.get(k) is not None]
        raise InputError(f"{path}: has no '{weights}' weights (it has: {', '.join(available)})")
    model = build_model(state["model_name"], **state["model_kwargs"])
    try:
        model.load_state_dict(state[weights])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(f"{path}: weights do not match the {state['model_name']} network "
                         f"({first[:200]})") from None
    return model

