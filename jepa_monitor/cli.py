"""The ``jepa-monitor`` console script."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jepa-monitor",
        description="Watch the data a self-supervised model trains on through its own density estimate.",
    )
    parser.add_argument("--version", action="version", version=f"jepa-monitor {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
