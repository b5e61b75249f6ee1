"""The code map of the README, checked on the imports: each module imports only from its own layer
or the layers below, and `networks/` and `dataloaders/` stay independent of each other."""
import ast

from conftest import ROOT

# lowest first; a module not listed here fails the test, so the map stays complete
LAYERS = [
    ["utils.errors", "utils.files", "utils.config"],
    ["networks", "dataloaders"],
    ["utils.losses", "utils.priors", "utils.metrics", "utils.inference", "utils.postprocess", "utils.mixing",
     "utils.plots", "utils.checkpoint", "utils.instances"],
    ["utils.distributed", "utils.runtime", "utils.builders", "utils.optim", "utils.teachers",
     "utils.engine", "utils.runs"],
    ["train_supervised", "train_unimatch", "train_teacher_student", "test", "bench"],
]
INDEPENDENT = [("networks", "dataloaders")]


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group_of(module):
    """The entry of LAYERS that `module` belongs to: (layer index, group name) or None."""
    for index, groups in enumerate(LAYERS):
        for group in groups:
            if module == group or module.startswith(group + "."):
                return index, group
    return None


def project_imports(path):
    """The project modules imported by the file at `path` (third-party ones left out)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                 if isinstance(node, ast.ImportFrom) and node.module else [])
        found.update(name for name in names if group_of(name) is not None)
    return found


def source_files():
    for folder in ("utils", "networks", "dataloaders"):
        yield from sorted((ROOT / folder).glob("*.py"))
    yield from sorted(ROOT.glob("*.py"))


def test_every_module_is_on_the_map():
    unmapped = [module_name(path) for path in source_files()
                if module_name(path) not in ("utils",) and group_of(module_name(path)) is None]
    assert not unmapped, f"add these modules to the README's code map and to LAYERS: {unmapped}"


def test_imports_only_point_down_or_sideways():
    upward = []
    for path in source_files():
        own = group_of(module_name(path))
        if own is None:
            continue
        for imported in project_imports(path):
            other = group_of(imported)
            if other[0] > own[0]:
                upward.append(f"{module_name(path)} -> {imported}")
            if (own[1], other[1]) in INDEPENDENT or (other[1], own[1]) in INDEPENDENT:
                upward.append(f"{module_name(path)} -> {imported} (must stay independent)")
    assert not upward, upward


def test_the_checker_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom utils.engine import TrainingRun\nfrom utils import engine\n")
    assert project_imports(bad) == {"utils.engine", "utils.engine.TrainingRun"}
    assert group_of("utils.engine")[0] > group_of("networks.edge")[0]
