"""Repository invariants that CI depends on."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[-1].strip()
    assert command.startswith("python -m pytest"), f".ci/run must end with the test command, ends with {command!r}"
    assert f"\n{command}\n" in readme, f"README does not show the test command {command!r} on its own line"


def test_no_torch_import_in_jaxgpt():
    for path in (ROOT / "jaxgpt").rglob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, f"{path} imports torch"
