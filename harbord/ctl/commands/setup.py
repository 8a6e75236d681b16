"""harborctl setup: install and enable harbord's systemd user units.

The work is harbord.setup_units'; this is its place among the subcommands. It does not
talk to harbord, which may not be running yet.
"""

from __future__ import annotations

import argparse

from harbord import setup_units
from harbord.ctl.http import Daemon

HELP = "install and enable harbord's systemd user units (--dry-run: only say what it would do)"
TIMEOUT = None  # unused: setup does not call harbord


def configure(parser: argparse.ArgumentParser) -> None:
    setup_units.add_arguments(parser)


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    return setup_units.run_setup(args)
