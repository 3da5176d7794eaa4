"""The README's two set-up commands: CI runs exactly the test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0].startswith("# "), "the README starts with its title"
    start = lines.index("```bash")
    end = lines.index("```", start + 1)
    return lines[start + 1 : end]


def test_readme_opens_with_the_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    train, test = commands
    assert "pip install -e ." in train  # the package with its declared dependencies
    assert "python -m lambdanet.main --config=demo" in train  # a config shipped in the package
    assert "pip install -e '.[test]'" in test and "pytest" in test
    assert (ROOT / "lambdanet" / "configs" / "demo.py").exists()


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci_lines
