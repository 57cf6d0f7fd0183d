"""Make a local world build the shipped build of its preset (package data under seqedit/world/shipped/<preset>/).

    .venv/bin/seqedit world build standard --rebuild          # or build_world(..., cache_dir=...) on another machine
    .venv/bin/python bench/ship_world.py standard [--from DIR]  # DIR: a built world folder (default: this cache's)

The folder is checked (checksums, config hash = the preset's) and copied file by file; the copy is checked again and
its build id printed. Every committed build stays in the repository's history, so ship a design once it is final.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from seqedit.world import build_id, get_preset, world_dir
from seqedit.world.build import SHIPPED_ROOT, build_problem, check_shipped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset")
    ap.add_argument("--from", dest="src", default=None, help="built world folder (default: the cache's build)")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()

    src = Path(args.src) if args.src else world_dir(get_preset(args.preset), args.cache_dir)
    problem = build_problem(args.preset, src)  # before the old shipped build is removed
    if problem is not None:
        sys.exit(f"{src}: not a build of world:{args.preset} to ship ({problem})")
    dst = SHIPPED_ROOT / args.preset
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    check_shipped(args.preset, dst)
    size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"shipped world:{args.preset} build {build_id(dst)} ({size / 1e6:.1f} MB) at {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
