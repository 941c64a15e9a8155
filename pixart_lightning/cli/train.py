"""Commands that train: ``run`` (here) and ``slurm`` (as chained Slurm jobs)."""

from __future__ import annotations

import argparse

from pixart_lightning.cli.parsing import add_command


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "run", "train the stages of a config folder, each from the previous one's weights",
                _run_options, cmd_run)
    add_command(subparsers, "slurm", "submit stages as chained Slurm jobs (each starts when the previous succeeded)",
                _slurm_options, cmd_slurm)


def _stages(args: argparse.Namespace) -> list[int] | None:
    return [int(s) for s in args.stages.split(",")] if args.stages else None


def _add_stages(p: argparse.ArgumentParser, examples: str) -> None:
    """The config folder, which of its stages, and key=value overrides (which may also follow other options)."""
    p.add_argument("config", help=f"config folder, e.g. {examples}")
    p.add_argument("--stages", help="comma-separated, e.g. 1,2,3 (default: all)")
    p.add_argument("overrides", nargs="*", help="key=value (all stages) or stageN.key=value (one stage)")


def _run_options(p: argparse.ArgumentParser) -> None:
    _add_stages(p, "configs/demo or configs/pixart-xl2")


def _slurm_options(p: argparse.ArgumentParser) -> None:
    _add_stages(p, "configs/pixart-xl2")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU processes")
    p.add_argument("--tasks-per-node", type=int, help="processes per node (default: one per GPU, 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, help="default: the cluster's")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit per job, e.g. 2-00:00:00; SIGUSR1 90 s before it checkpoints and "
                   "requeues")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="--OPTION=VALUE",
                   help="another #SBATCH option (repeatable), e.g. --sbatch-arg=--constraint=a100")
    p.add_argument("--dry-run", action="store_true", help="write the scripts under <run>/slurm and print the sbatch "
                   "commands; submit nothing")


def cmd_run(args: argparse.Namespace) -> None:
    from pixart_lightning.runner.chain import run

    run(args.config, _stages(args), args.overrides)


def cmd_slurm(args: argparse.Namespace) -> None:
    from pixart_lightning.runner.slurm import SlurmOptions, submit

    options = SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                           cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
                           account=args.account, qos=args.qos, sbatch_args=args.sbatch_arg)
    submit(args.config, _stages(args), args.overrides, options, dry_run=args.dry_run)
