"""What the entry scripts share: the config overrides a command line makes."""

from __future__ import annotations

import argparse


def cli_overrides(args: argparse.Namespace, fields: dict[str, object]) -> list[str | tuple[str, object]]:
    """The config overrides a command line makes: --set first (YAML values), then the flags that
    stand for a field (`fields`: field -> the flag's value, None when not given), --output and
    --overwrite, each set literally as a (field, value) pair: a path is a string whatever it holds
    (` #`, `,`, `:`, `[`, spaces)."""
    overrides: list[str | tuple[str, object]] = list(args.overrides)
    overrides += [(field, value) for field, value in fields.items() if value is not None]
    if args.output:
        overrides.append(("output.path", args.output))
    if args.overwrite:
        overrides.append(("output.overwrite", True))
    return overrides
