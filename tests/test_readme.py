"""Both READMEs stay honest: every command of theirs that runs one of the project's scripts,
in a code block or inline, names the script and only flags that its --help knows."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import ROOT, help_entries

READMES = ("README.md", "README.ja.md")
FENCED = re.compile(r"^ *```[^\n]*\n(.*?)^ *```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
SCRIPT_COMMAND = re.compile(r"\bpython3?\s+\S+\.py\b")
SHELL_SEPARATORS = {"&&", "||", "|", ";"}
NO_FLAGS = {"cvae_tensorflow.py"}  # the notebook as a script: it takes its settings from its cells


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
        pythons = [i for i, word in enumerate(words) if Path(word.lstrip("(")).name in ("python", "python3")]
        assert pythons, f"a command split over two lines of Markdown: {line!r}"
        start = pythons[0] + 1
        end = next((i for i, word in enumerate(words) if i > start and word in SHELL_SEPARATORS), len(words))
        flags = [word.split("=")[0] for word in words[start + 1:end] if re.match(r"--?[A-Za-z]", word)]
        commands.append((words[start], flags))
    return commands


COMMANDS = {name: script_commands((ROOT / name).read_text(encoding="utf-8")) for name in READMES}


@pytest.fixture(scope="module")
def help_flags(help_texts) -> dict[str, set[str]]:
    """Each script's flags, as its --help lists them."""
    return {script: set(help_entries(text)) for script, text in help_texts.items()}


@pytest.mark.parametrize("readme", READMES)
def test_every_command_in_the_readme_names_flags_that_its_script_knows(readme, help_flags):
    commands = COMMANDS[readme]
    assert len({script for script, _ in commands}) >= 3, commands  # it found the README's commands
    wrong = [f"python {script}: no such script" for script, _ in commands if not (ROOT / script).is_file()]
    wrong += [f"python {script} {flag}: it takes no flags" for script, flags in commands
              if script in NO_FLAGS for flag in flags]
    wrong += [f"python {script} {flag}: not in its --help" for script, flags in commands
              if script not in NO_FLAGS for flag in flags if flag not in help_flags[script]]
    assert not wrong, f"{readme}: {wrong}"


def test_the_japanese_readme_keeps_in_step():
    """README.ja.md has README.md's sections, in order, and its commands (the same flags)."""
    english, japanese = ((ROOT / name).read_text(encoding="utf-8") for name in READMES)
    assert [line.count("#") for line in english.splitlines() if line.startswith("#")] == \
        [line.count("#") for line in japanese.splitlines() if line.startswith("#")]
    assert sorted(COMMANDS["README.md"]) == sorted(COMMANDS["README.ja.md"])


def test_the_readme_stays_a_newcomers_page():
    """README.md is at most 320 lines: the depth goes to docs/."""
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 320
