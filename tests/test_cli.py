"""The ``hnseg`` entry point: help texts show defaults, and the version is the installed one."""

from __future__ import annotations

import pytest

from hnseg_keras import cli


def test_help_shows_defaults_once(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "parallel worker processes (cases) (default: 1)" in text
    assert text.count("(default: 1)") == 1 and "(default: None)" not in text and "(default: False)" not in text


def test_version(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("hnseg-keras ")
