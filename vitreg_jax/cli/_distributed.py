"""The "several processes" options that ``embed`` and ``pretrain`` share, and ``jax.distributed`` start-up.

Either ``--distributed`` (``jax.distributed.initialize()`` detects the cluster: TPU pods, SLURM, ...) or the
explicit trio ``--coordinator HOST:PORT --num-processes N --process-id I`` (any machines that can reach
process 0's port, e.g. several processes on one host for a test).
"""

from __future__ import annotations

import argparse

from vitreg_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("several processes (jax.distributed)")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM, ...)",
    )
    g.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="process 0's address; with --num-processes and --process-id",
    )
    g.add_argument(
        "--num-processes", type=int, default=None, metavar="N", help="how many processes form the run"
    )
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0..N-1")


def check(args: argparse.Namespace) -> None:
    """UserError for an incomplete or impossible trio (before anything starts)."""
    explicit = [args.coordinator, args.num_processes, args.process_id]
    if all(v is None for v in explicit):
        return
    if any(v is None for v in explicit):
        raise UserError("--coordinator, --num-processes and --process-id go together")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise UserError(
            f"--process-id must be in 0..{args.num_processes - 1} and --num-processes >= 1, got "
            f"{args.process_id} of {args.num_processes}"
        )


def initialize(args: argparse.Namespace) -> None:
    """Start ``jax.distributed`` if asked to; call before anything touches a JAX device."""
    if args.coordinator is None and not args.distributed:
        return
    import jax

    # (CPU processes exchange gradients through jax's default CPU collectives, gloo over TCP)
    if args.coordinator is not None:
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )
    else:
        jax.distributed.initialize()
