"""Both READMEs stay honest: every command of theirs that runs one of the project's scripts,
in a code block or inline, names the script and only flags that its --help knows."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import ROOT, run_script

READMES = ("README.md", "README.ja.md")
FENCED = re.compile(r"^ *```[^\n]*\n(.*?)^ *```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
SCRIPT_COMMAND = re.compile(r"\bpython3?\s+\S+\.py\b")
SHELL_SEPARATORS = {"&&", "||", "|", ";"}


def script_commands(markdown: str) -> list[tuple[str, list[str]]]:
    """(script, its flags) for each `python SCRIPT.py ...` in the code of a Markdown text:
    the fenced blocks, their lines joined where they end in a backslash, and `inline` code."""
    lines = [line for block in FENCED.findall(markdown) for line in block.replace("\\\n", " ").splitlines()]
    lines += INLINE.findall(FENCED.sub("", markdown))
    commands = []
    for line in lines:
        if not SCRIPT_COMMAND.search(line):
            continue
        words = shlex.split(line.lstrip("!"), comments=True)  # ! runs a shell command in a notebook
        start = next(i for i, word in enumerate(words) if Path(word).name in ("python", "python3")) + 1
        end = next((i for i, word in enumerate(words) if i > start and word in SHELL_SEPARATORS), len(words))
        flags = [word.split("=")[0] for word in words[start + 1:end] if re.match(r"--?[A-Za-z]", word)]
        commands.append((words[start], flags))
    return commands


COMMANDS = {name: script_commands((ROOT / name).read_text(encoding="utf-8")) for name in READMES}


@pytest.fixture(scope="module")
def help_flags() -> dict[str, set[str]]:
    """Each script's flags, as its --help lists them."""
    scripts = sorted({script for commands in COMMANDS.values() for script, _ in commands
                      if (ROOT / script).is_file()})
    result = run_script("tests/help_texts.py", *scripts)
    assert result.returncode == 0, result.stderr[-3000:]
    texts = json.loads(result.stdout.splitlines()[-1])
    assert all("usage:" in texts[script] for script in scripts), texts
    return {script: set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", text)) for script, text in texts.items()}


@pytest.mark.parametrize("readme", READMES)
def test_every_command_in_the_readme_names_flags_that_its_script_knows(readme, help_flags):
    commands = COMMANDS[readme]
    assert len({script for script, _ in commands}) >= 3, commands  # it found the README's commands
    wrong = [f"python {script}: no such script" for script, _ in commands if script not in help_flags]
    wrong += [f"python {script} {flag}: not in its --help" for script, flags in commands
              if script in help_flags for flag in flags if flag not in help_flags[script]]
    assert not wrong, f"{readme}: {wrong}"
