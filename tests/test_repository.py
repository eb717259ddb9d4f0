"""Repository hygiene: CI runs the README's test command, and no absolute path of a machine is committed."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```\n(.*?)```", section, re.S)]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    commands = _quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "cellgap demo" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_no_absolute_paths_of_this_machine_are_committed():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"/(work|root|home/[a-z]+|tmp/pytest)/[\w.-]")
    offenders = []
    for name in files:
        path = ROOT / name
        if path.suffix in (".png", ".tif", ".npy") or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        if pattern.search(text):
            offenders.append(name)
    assert not offenders, f"absolute machine paths in {offenders}"
