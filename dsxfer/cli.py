"""The `dsxfer` command line (fire).

Every command is a function with a docstring; its first line is what `dsxfer --help` lists.
Heavy imports happen inside the commands so `dsxfer --help` stays instant.
A `DsxferError` (bad config, file or record) is printed as one line and exits with code 2.
"""

from __future__ import annotations

import sys

from dsxfer.errors import DsxferError


class ConfigCommands:
    """Inspect configurations."""

    def show(self, *overrides: str, config: str | None = None) -> None:
        """Print the resolved config: the file (if any) plus dotted overrides such as train.lr=1e-3."""
        from dsxfer.config import load_config

        print(load_config(config, overrides).to_yaml(), end="")

    def help(self) -> None:
        """List every config key with its default and what it does."""
        from dsxfer.config import field_help

        rows = field_help()
        width = max(len(k) for k, _, _ in rows)
        for key, default, text in rows:
            print(f"{key:<{width}}  {text} (default {default})")


class Commands:
    """dsxfer: teach a pretrained multilingual model a new language or task from little data.

    Commands:
      config          inspect configurations (show, help)
    """

    def __init__(self) -> None:
        self.config = ConfigCommands()


def main(argv: list[str] | None = None) -> int:
    import os

    import fire

    os.environ.setdefault("PAGER", "cat")  # fire pages --help through less on a terminal
    try:
        fire.Fire(Commands(), command=argv, name="dsxfer")
    except DsxferError as e:
        print(f"dsxfer: error: {e}", file=sys.stderr)
        return 2
    except fire.core.FireExit as e:  # --help, or a usage error fire already printed
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
