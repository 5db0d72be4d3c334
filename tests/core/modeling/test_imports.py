"""Import hygiene: the data side never loads torch/RecBole, importing recflow patches nothing in
RecBole, and ``core`` has no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
CORE = REPO / "core"


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_data_modules_and_config_import_neither_torch_nor_recbole() -> None:
    proc = _run(
        "import sys\n"
        "import core.config, core.data.sources, core.data.extract, core.data.validation, core.data.privacy\n"
        "import core.data.snapshot_store\n"
        "from core.data.sources.movielens import ml100k_inter_path\n"
        "assert ml100k_inter_path().is_file()\n"
        "loaded = sorted(m for m in ('torch', 'recbole') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_importing_recflow_replaces_no_recbole_attribute() -> None:
    proc = _run(
        "import recbole.trainer.trainer as rt, recbole.utils.utils as ru\n"
        "import core.modeling.training, core.modeling.dataset, core.modeling.evaluation, core.modeling.export\n"
        "import core.modeling.champion_rescore, core.modeling.batch_finder, core.modeling.trainer_mixin\n"
        "import core.modeling.recbole_adapter, core.modeling.window_loader, core.modeling.seq_objectives\n"
        "import tasks.build, tasks.train, tasks.evaluate, tasks.export\n"
        "from core.modeling import recbole_fast_paths as fp\n"
        "assert rt.get_tensorboard is ru.get_tensorboard, rt.get_tensorboard\n"
        "assert not fp.installed()\n"
        "for cls, attr in fp.replaced_methods():\n"
        "    f = cls.__dict__[attr]\n"
        "    assert f.__module__.startswith('recbole.'), (cls, attr, f.__module__)\n"
        "fp.install_fast_paths()\n"
        "assert all(cls.__dict__[a].__module__ == fp.__name__ for cls, a in fp.replaced_methods())\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_tensorboard_redirect_is_scoped_to_its_block(tmp_path: Path) -> None:
    import recbole.trainer.trainer as rt

    from core.modeling import recbole_adapter as rb

    original = rt.get_tensorboard
    with rb.tensorboard_dir(tmp_path / "tb"):
        assert rt.get_tensorboard is not original
        rt.get_tensorboard(None).close()
    assert rt.get_tensorboard is original
    assert (tmp_path / "tb").is_dir()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _core_imports(path: Path, modules: set[str]) -> set[str]:
    """Every ``core`` module ``path`` imports, at any depth (function-level imports too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from core.modeling import training" imports the module core.modeling.training.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("core"):
                found.add(target)
    return found


def test_core_import_graph_has_no_cycle() -> None:
    paths = sorted(CORE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _core_imports(p, modules) for p in paths}
    # A package imports its __init__ on the way to any submodule: that edge is not a cycle.
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    assert "core.modeling.runtime" in graph["core.modeling.batch_finder"]
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
