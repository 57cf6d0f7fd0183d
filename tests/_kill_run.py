"""Run `seqedit <args>` and SIGKILL this process at a chosen point: the kill/resume tests' subject.

    python tests/_kill_run.py POINT:N seqedit-args...

POINT is where the N-th occurrence (1-based) gets the kill:
    compute   inside the N-th editor call, before anything of it is committed
    commit    right after the N-th ledger record is durable, before its telemetry
    snapshot  inside the N-th snapshot write: files written, manifest being written, not yet renamed into place
    probe     inside the N-th probe call
    final     in the final phase, after the final scores, before summary.json
Nothing is cleaned up: the kill is what a preempted node or an OOM killer does.
"""
from __future__ import annotations

import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, n: int) -> None:
    count = {"n": 0}

    def hit() -> None:
        count["n"] += 1
        if count["n"] == n:
            die()

    if point == "compute":
        from seqedit.editors.base import EDITORS, list_editors

        patched = set()
        for name in list_editors():
            # patch the class that defines compute (perhaps an unregistered base such as SpreadEditor), once
            owner = next(c for c in EDITORS.get(name).__mro__ if "compute" in c.__dict__)
            if owner in patched:
                continue
            patched.add(owner)
            real = owner.compute

            def compute(self, *a, _real=real, **k):
                hit()
                return _real(self, *a, **k)

            owner.compute = compute
    elif point == "commit":
        from seqedit.ledger import Ledger

        real_append = Ledger.append

        def append(self, *a, **k):
            rec = real_append(self, *a, **k)
            hit()
            return rec

        Ledger.append = append
    elif point == "snapshot":
        import seqedit.checkpoint as ck

        real_write = ck.atomic_write_json

        def write(path, obj):
            if ".tmp-" in str(path):
                hit()
            return real_write(path, obj)

        ck.atomic_write_json = write
    elif point == "probe":
        from seqedit.probe_api import PROBES, list_probes

        list_probes()  # discovery registers the built-in probes
        for name in ("retention", "unedited", "perplexity"):
            cls = PROBES.get(name)
            real_call = cls.__call__

            def call(self, ctx, _real=real_call):
                hit()
                return _real(self, ctx)

            cls.__call__ = call
    elif point == "final":
        import seqedit.driver as drv

        real_matrix = drv.write_retention_matrix

        def matrix(run_dir):
            hit()
            return real_matrix(run_dir)

        drv.write_retention_matrix = matrix
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    spec, *args = sys.argv[1:]
    point, n = spec.split(":")
    arm(point, int(n))
    import torch

    torch.set_num_threads(1)
    from seqedit.cli import main

    sys.exit(main(args))
