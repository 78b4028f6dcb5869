"""Imports run one way: common/ -> data/ -> dataset/ -> models/ -> evaluation/ -> training/ -> serve/ and the
stage scripts.

Every import statement of every module (function-level ones included) is read with `ast` and checked
against the layer order written in docs/architecture.md ("Layers"): a package imports only the layers below
it, models/ nothing of the data side or the loop, and nothing in a package or a stage script imports a
stage script. bench/ and tests/ drive the stage scripts, so they may import them. Within tests/, no test
module imports another: shared fixtures are in tests/conftest.py, shared helpers in tests/helpers/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGE_SCRIPTS = {p.stem for p in REPO.glob("*.py")}
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "data": {"common"},
    "dataset": {"common", "data"},
    "models": {"common"},
    "evaluation": {"common", "data", "dataset", "models"},
    "training": {"common", "data", "dataset", "models", "evaluation"},
    "serve": {"common", "data", "dataset", "models", "evaluation", "training"},
}
PACKAGES = set(ALLOWED)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level name) of every import of a project package or stage script in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in PACKAGES or top in STAGE_SCRIPTS:
                found.append((node.lineno, top))
    return found


def layer_of(path: Path) -> str:
    relative = path.relative_to(REPO)
    return relative.parts[0] if len(relative.parts) > 1 else "script"


def modules() -> list[Path]:
    packages = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    return [*packages, *sorted(REPO.glob("*.py"))]


def violations(path: Path) -> list[str]:
    layer = layer_of(path)
    allowed = ALLOWED.get(layer, PACKAGES)  # a stage script may import every package
    bad = []
    for line, top in project_imports(path):
        if top == layer or (layer == "script" and top == path.stem):
            continue
        if top in STAGE_SCRIPTS or top not in allowed:
            bad.append(f"{path.relative_to(REPO)}:{line} ({layer}) imports {top}")
    return bad


def test_every_import_follows_the_layer_order():
    assert len(modules()) > 30
    problems = [v for path in modules() for v in violations(path)]
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("where", "source", "expected"),
    [
        ("models/x.py", "from training.loop import train\n", "(models) imports training"),
        ("dataset/x.py", "def f():\n    from training import config\n", "(dataset) imports training"),
        ("data/x.py", "import dataset.tokenizer\n", "(data) imports dataset"),
        ("training/x.py", "from pretrain_llama import PretrainConfig\n", "(training) imports pretrain_llama"),
        ("x_stage.py", "import pretrain_llama\n", "(script) imports pretrain_llama"),
    ],
)
def test_the_check_catches_an_import_against_the_order(tmp_path, monkeypatch, where, source, expected):
    fake = tmp_path / where
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text(source)
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert any(expected in v for v in violations(fake)), violations(fake)


def test_no_test_module_imports_another_test_module():
    tests = REPO / "tests"
    test_modules = {p.stem for p in tests.glob("test_*.py")} | {"conftest"}
    bad = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.removeprefix("tests.").split(".")[0] in test_modules:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
        # Scripts that tests run in a subprocess are strings in the test modules; they import by name too.
        for line_number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("from tests.test_", "import tests.test_", "from tests.conftest")):
                bad.append(f"{path.relative_to(REPO)}:{line_number} (a driver script) {stripped}")
    assert not bad, "import fixtures from tests/conftest.py and helpers from tests/helpers/:\n" + "\n".join(
        bad
    )


def module_imports(path: Path) -> set[str]:
    """The project modules (`package.module`) that `path` imports, function-level imports and those under
    `if TYPE_CHECKING:` included (a type-only import is a dependency a reader follows all the same)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle_within_a_package(package):
    """A newcomer can read a package's modules in an order in which each needs only the ones before it."""
    names = {f"{package}.{p.stem}": p for p in sorted((REPO / package).glob("*.py")) if p.stem != "__init__"}
    graph = {name: module_imports(path) & set(names) - {name} for name, path in names.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(name) :], name]))
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
