"""The reference in docs/ says what the code does: every option that ``--help`` shows is
documented in docs/cli.md, under its command; the README stays a front door."""

from __future__ import annotations

import re

import pytest
import typer
from conftest import ROOT

from autotune.cli import app

CLI_DOC = ROOT / "docs" / "cli.md"


def _sections() -> dict[str, str]:
    """docs/cli.md's sections by heading: "## `autotune run`" -> "run"; others by their text."""
    parts = re.split(r"^## (.+)$", CLI_DOC.read_text(), flags=re.M)
    return {re.sub(r"^autotune ", "", title.replace("`", "").strip()): body
            for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def _options(command: object) -> list[str]:
    return [opt for p in command.params for opt in (*p.opts, *p.secondary_opts)
            if opt.startswith("--") and opt != "--help"]


def _commands() -> dict[str, object]:
    group = typer.main.get_command(app)
    return {"autotune": group, **group.commands}


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_option_in_help_is_documented(name: str) -> None:
    sections = _sections()
    assert name in sections, f"docs/cli.md has no section for {name}"
    missing = [opt for opt in _options(_commands()[name]) if f"`{opt}" not in sections[name]]
    assert not missing, f"docs/cli.md, {name}: undocumented options {missing}"


def test_readme_is_a_front_door() -> None:
    """Under 250 lines, opening with the two commands, and every docs/ page it links exists."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 250
    commands = [line.strip() for line in lines[:12] if line.startswith("    ")]
    assert commands[0].endswith("autotune run") and "pytest" in commands[1], commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci, "the README's test command and .ci/run's differ"
    for link in re.findall(r"\]\((docs/[^)#]+)", "\n".join(lines)):
        assert (ROOT / link).is_file(), link
