"""Repository invariants that CI depends on."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start(readme: str) -> list[str]:
    """The command lines of the README's Quick start block."""
    block = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[-1].strip()
    assert command.endswith("python -m pytest -q"), f".ci/run must end with the test command, ends with {command!r}"
    assert f"\n{command}\n" in readme, f"README does not show the test command {command!r} on its own line"
    assert quick_start(readme)[1] == command, "README Quick start command 2 differs from what CI runs"


def test_no_torch_import_in_jaxgpt():
    for path in (ROOT / "jaxgpt").rglob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, f"{path} imports torch"


HOUSE = ("jaxgpt", "formats", "torchref", "parity", "benchmarks", "scripts")  # the project's packages and CLIs


def _house() -> list[Path]:
    return sorted(p for d in HOUSE for p in (ROOT / d).rglob("*.py"))


def test_the_house_rules_files_functions_and_private_names():
    """No file over 400 lines, no function over 60, and no module reaching into another module's private
    names (`from x import _y`, `x._y`): a name without an underscore is the module's promise to the others."""
    import ast

    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in _house()}
    broken = []
    for path in _house():
        text, rel = path.read_text(), path.relative_to(ROOT)
        if len(text.splitlines()) > 400:
            broken.append(f"{rel}: {len(text.splitlines())} lines")
        tree = ast.parse(text)
        aliases = {a.asname or a.name: a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                broken.append(f"{rel}:{node.lineno} {node.name}() is {node.end_lineno - node.lineno + 1} lines")
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                broken += [f"{rel}:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                           if a.name.startswith("_") and not a.name.startswith("__")]
            if isinstance(node, ast.ImportFrom) and node.module in {m.rsplit(".", 1)[0] for m in modules}:
                aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and aliases.get(node.value.id) in modules):
                broken.append(f"{rel}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not broken, "\n".join(broken)
