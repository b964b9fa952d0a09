"""The README's variable table and quick start stay in step with the script."""
import dataclasses
import re

from conftest import ROOT
import train_gpt


def test_every_variable_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    table = "\n".join(line for line in readme.splitlines() if line.startswith("| "))
    documented = set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", table))
    missing = [f.name.upper() for f in dataclasses.fields(train_gpt.Hyperparameters)
               if f.name.upper() not in documented]
    assert not missing, f"README variable table lacks {missing}"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q tests" in readme
    assert ci.strip().splitlines()[-1] == "python -m pytest -q tests"
    for pkg in ("torch", "numpy", "sentencepiece", "zstandard", "matplotlib", "pytest"):
        assert pkg in (ROOT / "requirements.txt").read_text()
