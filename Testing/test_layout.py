"""The engine's layout: wings that each import only those below them, no import circle, short modules and
functions. Read from the source with ``ast``, lazy imports inside functions included."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "SynomalyEngine" / "synomaly"
# From the ground up; a module may import its own wing and those below it. errors is shared by all.
WINGS = ("errors", "method", "files", "inference", "training", "evaluation", "commands")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 120


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_imports(path: Path):
    """The synomaly modules ``path`` imports (``from synomaly.x import y``: ``synomaly.x.y`` when that is a
    module, else ``synomaly.x``), with the line of each."""
    known = {module_name(p) for p in modules()}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}:{node.lineno}: relative import; the engine imports absolutely"
            if node.module and node.module.split(".")[0] == "synomaly":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    yield (sub if sub in known else node.module), node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "synomaly":
                    yield alias.name, node.lineno


def wing(name: str) -> int:
    parts = name.split(".")
    return WINGS.index(parts[1]) if len(parts) > 1 and parts[1] in WINGS else -1


def test_every_module_lies_in_a_wing():
    loose = [module_name(p) for p in modules() if wing(module_name(p)) < 0
             and module_name(p) not in ("synomaly", "synomaly.__main__")]
    assert not loose, f"modules outside the wings {WINGS}: {loose}"


def test_no_wing_imports_a_higher_one():
    upward = []
    for path in modules():
        here = module_name(path)
        if here in ("synomaly", "synomaly.__main__"):
            continue  # the package's face and entry point stand above every wing
        for target, line in engine_imports(path):
            if target != "synomaly" and wing(target) > wing(here):
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert not upward, "a lower wing imports a higher one:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = {module_name(p): {t for t, _ in engine_imports(p) if t != "synomaly"} for p in modules()}
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                pytest.fail("import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_modules_and_functions_are_short():
    long = []
    for path in modules():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(PACKAGE)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines")
    assert not long, f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function:\n" + "\n".join(long)


def test_the_package_face_is_light_and_complete():
    import subprocess
    import sys

    code = ("import sys, synomaly\nassert 'torch' not in sys.modules, 'import synomaly loaded torch'\n"
            "names = ('detect', 'DetectionSettings', 'train', 'TrainingSettings', 'load_model', 'read_volume', "
            "'write_volume')\nprint([callable(getattr(synomaly, n)) for n in names])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([True] * 7)
