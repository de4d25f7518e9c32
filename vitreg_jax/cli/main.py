"""The ``vitreg-jax`` command: one sub-command per module, each imported only when it runs.

Every user mistake surfaces as :class:`vitreg_jax.errors.UserError` and becomes one line on stderr with exit
status 2. Each sub-command module defines ``register(subparsers)``, which adds its parser and sets ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from vitreg_jax.errors import UserError

# sub-command -> module that registers it (imported lazily: `vitreg-jax --help` stays fast and torch-free)
COMMANDS: dict[str, str] = {
    "convert": "vitreg_jax.cli.convert",
    "export": "vitreg_jax.cli.convert",
    "info": "vitreg_jax.cli.convert",
    "embed": "vitreg_jax.cli.embed",
    "knn": "vitreg_jax.cli.knn",
    "eval": "vitreg_jax.cli.eval",
    "pretrain": "vitreg_jax.cli.pretrain",
    "demo": "vitreg_jax.cli.demo",
}

# what Ctrl-C leaves, said in the one line it prints; other commands just say "interrupted"
ON_INTERRUPT: dict[str, str] = {
    "convert": "nothing was written",  # the checkpoint is built in a hidden folder, renamed when whole
    "export": "nothing was written",
    "embed": "run the same command again to resume",
    "pretrain": "run it again with --resume to continue from its last checkpoint",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one line (its default prints the whole usage block first), exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="vitreg-jax",
        description="birder's ViTReg encoders (vit_reg4_b16_mim and friends) in JAX: convert weights, embed "
        "images, pre-train with MAE.",
        epilog="Run `vitreg-jax COMMAND --help` for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    done: set[str] = set()
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            continue
        if module in done:
            continue
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as e:  # a command whose module is not present in this build
            if e.name != module:
                raise
            sub.add_parser(name, help="(not available in this build)")
        done.add(module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in COMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"vitreg-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ON_INTERRUPT.get(args.command)
        print(f"vitreg-jax {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
