"""What the entry scripts share: the config overrides a command line makes."""

from __future__ import annotations

import argparse


def cli_overrides(args: argparse.Namespace, fields: dict[str, object]) -> list[str]:
    """The config overrides a command line makes: --set first, then the flags that stand for a
    field (`fields`: field -> the flag's value, None when not given), --output and --overwrite."""
    overrides = list(args.overrides) + [f"{field}={value}" for field, value in fields.items() if value is not None]
    if args.output:
        overrides.append(f"output.path={args.output}")
    if args.overwrite:
        overrides.append("output.overwrite=true")
    return overrides
