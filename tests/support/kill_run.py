"""Run a ``vitreg-jax`` command that kills itself at a chosen point: how the tests interrupt runs.

    python -m tests.support.kill_run pretrain-step 7 -- pretrain --data DIR --out RUN ...
    python -m tests.support.kill_run embed-parts 1:INT -- embed --checkpoint CKPT IMAGES --out DIR ...

``pretrain-step N``: SIGKILL when the training loop asks for step N's batch (between two checkpoints).
``embed-parts N[:INT]``: SIGKILL (or SIGINT, as Ctrl-C sends) once N parts have been written.
The hooks wrap library functions from here, so the shipped commands carry no test hooks of their own.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def kill_pretrain_at_step(at: int) -> None:
    from vitreg_jax.pretraining.data_stream import TrainData

    iterate = TrainData.iterate

    def killing_iterate(self: TrainData, start: int, stop: int) -> Any:
        for step, batch in iterate(self, start, stop):
            if step == at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield step, batch

    TrainData.iterate = killing_iterate


def kill_embed_after_parts(spec: str) -> None:
    from vitreg_jax.embedding import _lockstep as embed_steps

    count, _, sig = spec.partition(":")
    signum = signal.SIGINT if sig.upper() == "INT" else signal.SIGKILL
    write_part = embed_steps.write_part
    written = 0

    def killing_write_part(*args: Any, **kwargs: Any) -> Any:
        nonlocal written
        record = write_part(*args, **kwargs)
        written += 1
        if written >= int(count):
            os.kill(os.getpid(), signum)
        return record

    embed_steps.write_part = killing_write_part


HOOKS = {"pretrain-step": lambda v: kill_pretrain_at_step(int(v)), "embed-parts": kill_embed_after_parts}


def main(argv: list[str]) -> int:
    hook, value, sep, *command = argv
    if sep != "--" or hook not in HOOKS:
        raise SystemExit(__doc__)
    HOOKS[hook](value)
    from vitreg_jax.cli.main import main as cli_main

    return cli_main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
