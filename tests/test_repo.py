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
