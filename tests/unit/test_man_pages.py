"""The man pages stay true: every command in cli.COMMANDS and each of its options is in
amigafuse(1); both pages render without warnings."""

from __future__ import annotations

import argparse
import shutil
import subprocess

import pytest

from amigafuse import cli
from tests.conftest import REPO

MAN1 = REPO / "man" / "amigafuse.1"
MAN8 = REPO / "man" / "mount.amigafuse.8"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def _plain(text: str) -> str:
    return text.replace("\\-", "-").replace("\\e", "\\")


def test_every_command_and_option_is_documented() -> None:
    page = _plain(MAN1.read_text())
    subs = _subparsers()
    assert len(subs) >= len(cli.COMMANDS)
    for name, sub in subs.items():
        assert f'.SS "{name}' in page, f"amigafuse(1) lacks a section for '{name}'"
        section = page.split(f'.SS "{name}', 1)[1].split(".SS ", 1)[0]
        for action in sub._actions:
            for opt in action.option_strings:
                if opt in ("-h", "--help"):
                    continue
                assert opt in section, f"amigafuse(1): '{name}' section lacks {opt}"


@pytest.mark.parametrize("page", [MAN1, MAN8])
def test_man_pages_render_cleanly(page) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("groff") is None and shutil.which("nroff") is None:
        pytest.fail("man-db/groff missing (bootstrap installs man-db)")
    proc = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                          env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "MAN_KEEP_STDERR": "1"},
                          check=False)
    assert proc.returncode == 0
    assert proc.stderr.strip() == "", proc.stderr
    assert "SYNOPSIS" in proc.stdout
