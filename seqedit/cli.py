"""`seqedit` command line: run, world build|info, list-editors."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import resources
from pathlib import Path


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_config_path() -> Path:
    """runs/configs/default.yaml from the working tree if present, else the copy shipped in the package."""
    local = Path("runs/configs/default.yaml")
    if local.is_file():
        return local
    return Path(str(resources.files("seqedit").joinpath("configs/default.yaml")))


def cmd_run(args: argparse.Namespace) -> int:
    from seqedit.config import load_config
    from seqedit.driver import run

    config = args.config
    overrides = list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `seqedit run editor.name=rome` with no config file
        config = None
    cfg = load_config(config or default_config_path(), overrides)
    summary = run(cfg, progress=_say)
    print(f"run {summary.run_id}: {summary.status}, {summary.n_edits} edits in {summary.seconds:.1f} s")
    for key, value in summary.metrics.items():
        print(f"  {key:28s} {value:.4f}" if isinstance(value, float) else f"  {key:28s} {value}")
    print(f"outputs: {summary.run_dir}")
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from seqedit.world import build_world, world_info

    if args.action == "build":
        build_world(args.preset, cache_dir=args.cache_dir, force=args.force, progress=_say)
    info = world_info(args.preset, cache_dir=args.cache_dir)
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_push_wandb(args: argparse.Namespace) -> int:
    from seqedit.wandb_sink import push_wandb

    n = push_wandb(args.run_dir, mode=args.mode, project=args.project, entity=args.entity)
    print(f"pushed {n} records from {args.run_dir}")
    return 0


def cmd_list_editors(args: argparse.Namespace) -> int:
    from seqedit.editors.base import list_editors

    print("\n".join(list_editors()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqedit", description="Sequential model-editing stress tests")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="apply a stream of edits sequentially")
    r.add_argument("config", nargs="?", help="YAML config (default: runs/configs/default.yaml)")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. editor.name=random n_edits=50")
    r.set_defaults(func=cmd_run)

    w = sub.add_parser("world", help="build or describe the embedded synthetic world")
    w.add_argument("action", choices=["build", "info"])
    w.add_argument("preset", nargs="?", default="small")
    w.add_argument("--cache-dir", default=None)
    w.add_argument("--force", action="store_true", help="rebuild even if cached")
    w.set_defaults(func=cmd_world)

    pw = sub.add_parser("push-wandb", help="replay a run's JSONL telemetry into wandb (offline clusters)")
    pw.add_argument("run_dir")
    pw.add_argument("--mode", default="online", choices=["online", "offline"])
    pw.add_argument("--project", default=None)
    pw.add_argument("--entity", default=None)
    pw.set_defaults(func=cmd_push_wandb)

    e = sub.add_parser("list-editors", help="list registered editors")
    e.set_defaults(func=cmd_list_editors)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        if args.verbose:
            raise
        # Bad input and run failures get one clear line; -v shows the traceback.
        print(f"seqedit: error: {e}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
