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


def cell(v) -> str:
    """A value as the variable table writes it."""
    if isinstance(v, bool):
        return "1" if v else "0"
    return format(v, "g") if isinstance(v, float) else str(v) if v != "" else "empty"


def test_the_preset_columns_show_what_each_preset_changes():
    """The 'default stack', 'seed162' and 'baseline' columns hold each field the preset changes, blank otherwise."""
    base = train_gpt.Hyperparameters()
    presets = {2: "default", 3: "seed162", 4: "baseline"}
    args = {c: train_gpt.Hyperparameters.from_env({"PRESET": p}) for c, p in presets.items()}
    fields = {f.name.upper(): f.name for f in dataclasses.fields(base) if f.name != "preset"}
    seen, wrong = set(), []
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 6 and cells[0] in fields:
            seen.add(cells[0])
            for c, p in presets.items():
                v = getattr(args[c], fields[cells[0]])
                want = cell(v) if v != getattr(base, fields[cells[0]]) else ""
                if cells[c] != want:
                    wrong.append(f"{cells[0]} {p}: {cells[c]!r}, should be {want!r}")
    assert not wrong, wrong
    assert len(seen) > 150
