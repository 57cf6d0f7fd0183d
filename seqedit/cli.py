"""`seqedit` command line: run, sweep, resume, status, export, report, world build|info, trace, push-wandb,
list-editors, list-probes."""
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


def _print_summary(summary) -> None:
    print(f"run {summary.run_id}: {summary.status}, {summary.n_edits} edits in {summary.seconds:.1f} s")
    for key, value in summary.metrics.items():
        print(f"  {key:28s} {value:.4f}" if isinstance(value, float) else f"  {key:28s} {value}")
    print(f"outputs: {summary.run_dir}")


def cmd_run(args: argparse.Namespace) -> int:
    from seqedit.config import load_config
    from seqedit.driver import run
    from seqedit.runs import find_resumable

    config = args.config
    overrides = list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `seqedit run editor.name=rome` with no config file
        config = None
    cfg = load_config(config or default_config_path(), overrides)
    run_dir = find_resumable(cfg) if args.resume else None  # a Slurm requeue runs the same command again
    if run_dir is not None:
        _say(f"--resume: continuing {run_dir}")
    summary = run(cfg, progress=_say, run_dir=run_dir)
    _print_summary(summary)
    if not args.no_report:
        _report_of(summary.run_dir)
    return 0


def _report_of(run_dir: Path) -> None:
    """The run's report and its three-line conclusion (a failure here never undoes a finished run)."""
    from seqedit.analysis.report import write_report

    try:
        out = write_report([run_dir])
    except Exception as e:  # noqa: BLE001 - the run is done; say why there is no report
        print(f"report: not written ({type(e).__name__}: {e}); retry with `seqedit report {run_dir}`")
        return
    for line in json.loads((out / "summary.json").read_text())["runs"][0]["conclusion"]:
        print(f"  {line}")
    print(f"report: {out / 'index.html'}")


def cmd_report(args: argparse.Namespace) -> int:
    from seqedit.analysis.detect import SpikeConfig
    from seqedit.analysis.report import write_report

    spike = SpikeConfig(window=args.window, z=args.z, min_ratio=args.min_ratio)
    out = write_report([Path(d) for d in args.run_dirs], args.out, causal=args.causal, spike=spike, progress=_say)
    for run in json.loads((out / "summary.json").read_text())["runs"]:
        print(run["run"])
        for line in run["conclusion"]:
            print(f"  {line}")
    print(f"report: {out / 'index.html'}")
    return 0


EXECUTOR_FLAGS = {  # --flag -> sweep.executor key (only the flags given override the file's executor section)
    "executor": "kind", "workers": "workers", "partition": "partition", "time": "time_min", "gpus": "gpus",
    "cpus": "cpus", "mem_gb": "mem_gb", "account": "account", "constraint": "constraint", "qos": "qos",
    "signal_delay_s": "signal_delay_s", "max_requeues": "max_requeues", "setup": "setup",
}


def cmd_sweep(args: argparse.Namespace) -> int:
    from seqedit import sweep as sw

    executor = {key: getattr(args, flag) for flag, key in EXECUTOR_FLAGS.items() if getattr(args, flag) is not None}
    if args.status or args.report:
        target = args.status or args.report
        if args.config is not None or args.overrides or args.grid:
            raise ValueError("--status/--report take a sweep directory only (no config, overrides or --grid)")
        if args.report:
            out = sw.sweep_report(target, progress=_say)
            print(f"report: {out / 'index.html'}" if out else "report: no finished run yet")
            return 0
        if args.resubmit_failed:
            plan = sw.plan_from_manifest(target, executor)
            sw.check_can_submit(plan.executor)
            todo = sw.failed_points(target)
            if not todo:
                print("nothing to resubmit")
            else:
                print(f"resubmitting {len(todo)} point(s): {', '.join(todo)}")
                sw.launch(plan, todo, wait=not args.no_wait if plan.executor.kind != "slurm" else args.wait,
                          progress=_say)
        print(sw.format_sweep_status(sw.sweep_status(target)))
        return 0
    if args.resubmit_failed:
        raise ValueError("--resubmit-failed goes with --status SWEEP_DIR")
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    plan = sw.plan_sweep(config or default_config_path(), overrides, args.grid, executor, args.sweep_dir, args.name)
    print(f"sweep {plan.sweep_id}: {len(plan.points)} runs over {', '.join(a.key for a in plan.axes)} "
          f"({plan.executor.kind}); wandb group {plan.wandb_group}; {plan.sweep_dir}")
    for p in plan.points:
        print(f"  {p.point_id}  {p.label():40s}  {p.run_id}")
    if args.dry_run:
        if plan.executor.kind == "slurm":
            print(sw.sbatch_script(plan))
        return 0
    sw.check_can_submit(plan.executor)
    sw.write_sweep(plan)
    wait = args.wait if plan.executor.kind == "slurm" else not args.no_wait
    done = sw.launch(plan, wait=wait, progress=_say)
    rows = sw.sweep_status(plan.sweep_dir)
    print(sw.format_sweep_status(rows))
    print(f"sweep wall time {done.seconds:.1f} s; status: seqedit sweep --status {plan.sweep_dir}")
    if wait and not args.no_report:
        out = sw.sweep_report(plan.sweep_dir, progress=_say)
        if out:
            print(f"report: {out / 'index.html'}")
    failed = [pid for pid, r in done.results.items() if r.get("status") != "finished"]
    if failed and wait:
        print(f"{len(failed)} run(s) did not finish: {', '.join(failed)}; see the table, then "
              f"`seqedit sweep --status {plan.sweep_dir} --resubmit-failed`")
        return 1
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from seqedit.driver import run
    from seqedit.runs import resume_config

    cfg = resume_config(Path(args.run_dir), list(args.overrides))
    _print_summary(run(cfg, progress=_say, run_dir=Path(args.run_dir)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from seqedit.runs import format_status, run_status

    rows, bad = [], 0
    for d in args.run_dirs:
        try:
            rows.append(run_status(Path(d)))
        except (RuntimeError, OSError, ValueError) as e:
            print(f"seqedit: {d}: {e}", file=sys.stderr)
            bad += 1
    if rows:
        print(format_status(rows))
    return 2 if bad else 0


def cmd_export(args: argparse.Namespace) -> int:
    from seqedit.runs import export

    info = export(Path(args.run_dir), Path(args.out), at_edit=args.at_edit, progress=_say)
    print(f"exported {info['run_id']} at edit {info['at_edit']} ({info['calls_applied']} editor calls applied) "
          f"to {args.out}; touched weights sha256 {info['weights_sha256'][:16]}")
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from seqedit.world import build_world, compare_reports, shipped_dir, world_info
    from seqedit.world.build import LOCAL_SUFFIX, split_local

    name, local = split_local(args.preset)
    shipped = shipped_dir(name)
    if args.action == "build":
        if shipped is not None and not (args.rebuild or local):
            info = world_info(name, cache_dir=args.cache_dir)  # checks the shipped files
            _say(f"world:{name} ships with seqedit (build {info['build_id']}): nothing to build. "
                 f"`seqedit world build {name} --rebuild` builds it on this machine (world:{name}{LOCAL_SUFFIX})")
        else:
            build_world(name if shipped is None else f"{name}{LOCAL_SUFFIX}", cache_dir=args.cache_dir,
                        force=args.rebuild, progress=_say)
            if shipped is not None:  # how this machine's build compares with the one everyone else uses
                ship = world_info(name)
                mine = world_info(f"{name}{LOCAL_SUFFIX}", cache_dir=args.cache_dir)
                print(f"{'figure':28s} {'shipped ' + str(ship['build_id']):>22s} {'local ' + str(mine['build_id']):>22s}")
                for key, a, b in compare_reports(ship["report"] or {}, mine["report"] or {}):
                    print(f"{key:28s} {str(a):>22s} {str(b):>22s}")
                print(f"use it with model.name=world:{name}{LOCAL_SUFFIX}; world:{name} stays the shipped build")
                return 0
    info = world_info(args.preset, cache_dir=args.cache_dir)
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_push_wandb(args: argparse.Namespace) -> int:
    from seqedit.wandb_sink import push_wandb

    n = push_wandb(args.run_dir, mode=args.mode, project=args.project, entity=args.entity)
    print(f"pushed {n} records from {args.run_dir}")
    return 0


SKIPS_SHOWN = 10  # skipped records listed on the terminal; all of them go to the output file


def cmd_trace(args: argparse.Namespace) -> int:
    import dataclasses
    import re
    import time

    from seqedit.config import ModelConfig
    from seqedit.data import DataError, load_requests, order_requests
    from seqedit.io import atomic_write_json
    from seqedit.model_io import load_model
    from seqedit.paths import expand_source, expand_user
    from seqedit.trace import KINDS, save_heatmaps, trace

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"--kinds {args.kinds!r}: allowed kinds are {', '.join(KINDS)} (comma-separated)")
    if args.n_facts < 1:
        raise ValueError(f"--n-facts must be >= 1, got {args.n_facts}")
    t0 = time.perf_counter()
    lm = load_model(ModelConfig(name=args.model, device=args.device, dtype=args.dtype), progress=_say)
    data = expand_source(args.data) if args.data is not None else None
    if data is None:
        if lm.world is None:
            raise ValueError(f"--data is required for {args.model!r} (only world:<preset> models bring their own "
                             "facts); give a CounterFact-style JSON or another format seqedit.data reads")
        data = str(lm.world.counterfact_path)
    try:
        loaded = load_requests(data, on_error=args.on_error)
    except DataError as e:
        raise DataError(f"{e} (--on-error skip leaves malformed records out and reports them)") from None
    if loaded.skipped:
        _say(f"skipped {len(loaded.skipped)} malformed record(s) of {len(loaded.skipped) + len(loaded.requests)} in "
             f"{data} (--on-error skip; listed in trace.json 'skipped_records'):")
        for s in loaded.skipped[:SKIPS_SHOWN]:
            _say(f"  record {s.index}: field {s.field!r} {s.reason}")
        if len(loaded.skipped) > SKIPS_SHOWN:
            _say(f"  ... and {len(loaded.skipped) - SKIPS_SHOWN} more")
    requests = order_requests(loaded.requests, seed=args.seed, stop=args.n_facts)
    _say(f"tracing {len(requests)} facts from {data} on {args.model} ...")
    result = trace(lm.model, lm.tokenizer, requests, samples=args.samples, noise=args.noise, kinds=kinds,
                   window=args.window, batch_size=args.batch_size, measure=args.measure,
                   known_only=not args.include_unknown, seed=args.seed)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", args.model).strip("-.") or "model"
    out = Path(expand_user(args.out)) if args.out else Path("runs") / f"trace-{slug}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "trace.json", {"model": args.model, "data": data, **result.to_dict(),
                                           "skipped_records": [dataclasses.asdict(s) for s in loaded.skipped]})
    print(result.format_tables())
    if result.n_used == 0:
        print("no fact was traced (the model knows none of them?): see 'skipped' in trace.json")
    else:
        try:
            title = Path(args.model).name if Path(args.model).expanduser().is_dir() else args.model
            paths = save_heatmaps(result, out, title=title)
            print("heatmaps: " + ", ".join(str(p) for p in paths))
        except ImportError as e:
            print(f"note: no heatmaps ({e})")
    print(f"outputs: {out} (total {time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_list_editors(args: argparse.Namespace) -> int:
    from seqedit.editors.base import list_editors

    if args.options or args.names:
        from seqedit.options import editor_docs, options_text

        print(options_text(editor_docs(args.names)), end="")
    else:
        print("\n".join(list_editors()))
    return 0


def cmd_list_probes(args: argparse.Namespace) -> int:
    from seqedit.probe_api import list_probes

    if args.options or args.names:
        from seqedit.options import options_text, probe_docs

        print(options_text(probe_docs(args.names)), end="")
    else:
        print("\n".join(list_probes()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqedit", description="Sequential model-editing stress tests")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="apply a stream of edits sequentially")
    r.add_argument("config", nargs="?", help="YAML config (default: runs/configs/default.yaml)")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. editor.name=random n_edits=50")
    r.add_argument("--resume", action="store_true", help="continue the newest run directory of this config if one "
                   "exists (what a requeued cluster job does); a finished one just prints its summary")
    r.add_argument("--no-report", action="store_true", help="do not write RUN_DIR/report at the end")
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser("report", help="forgetting curves, disabling edits and phases of one or more runs (HTML)")
    rp.add_argument("run_dirs", nargs="+")
    rp.add_argument("--out", default=None, help="report folder (default RUN_DIR/report for one run, ./report)")
    rp.add_argument("--causal", action="store_true", help="confirm flagged edits by removing them (ledger; "
                    "loads the model)")
    rp.add_argument("--window", type=int, default=100, help="disabling-edit detector: running window")
    rp.add_argument("--z", type=float, default=6.0, help="disabling-edit detector: robust z-score threshold")
    rp.add_argument("--min-ratio", type=float, default=5.0, help="disabling-edit detector: x window median")
    rp.set_defaults(func=cmd_report)

    sw = sub.add_parser("sweep", help="a grid of runs (stable ids, one wandb group) locally or on Slurm (submitit)")
    sw.add_argument("config", nargs="?", help="YAML config, may hold a sweep: section (default: "
                    "runs/configs/default.yaml)")
    sw.add_argument("overrides", nargs="*", help="dotted overrides shared by all runs")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="an axis; repeat for a cartesian product (values are YAML: editor={name: rome},{name: ft})")
    sw.add_argument("--sweep-dir", default=None, help="default <runs_dir>/sweeps/<name>-<hash8>")
    sw.add_argument("--name", default=None, help="sweep name (default: sweep.name, else the config's name)")
    sw.add_argument("--dry-run", action="store_true", help="validate and list the runs (and the sbatch script "
                    "for --executor slurm); create nothing")
    sw.add_argument("--status", metavar="SWEEP_DIR", default=None, help="table of the sweep's runs")
    sw.add_argument("--resubmit-failed", action="store_true", help="with --status: run failed, preempted and "
                    "killed points again (they resume)")
    sw.add_argument("--report", metavar="SWEEP_DIR", default=None, help="write SWEEP_DIR/report over its "
                    "finished runs")
    sw.add_argument("--no-wait", action="store_true", help="local executors: return once submitted")
    sw.add_argument("--wait", action="store_true", help="slurm: wait for the jobs (default: return once submitted)")
    sw.add_argument("--no-report", action="store_true", help="no sweep report at the end")
    g = sw.add_argument_group("executor (override the file's sweep.executor)")
    g.add_argument("--executor", default=None, help="serial | pool | submitit-local | slurm")
    g.add_argument("--workers", type=int, default=None, help="pool: processes at once")
    g.add_argument("--partition", default=None)
    g.add_argument("--time", type=float, default=None, help="minutes per job (sbatch --time)")
    g.add_argument("--gpus", type=int, default=None, help="GPUs per job (--gpus-per-node)")
    g.add_argument("--cpus", type=int, default=None, help="CPUs per job (--cpus-per-task)")
    g.add_argument("--mem-gb", type=float, default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--signal-delay-s", type=int, default=None, help="USR2 this long before the time limit "
                   "(--signal=USR2@N): the run stops at a safe point and the job is requeued")
    g.add_argument("--max-requeues", type=int, default=None)
    g.add_argument("--setup", action="append", default=None, help="shell line run before each job (repeatable)")
    sw.set_defaults(func=cmd_sweep)

    rs = sub.add_parser("resume", help="continue an interrupted run from its snapshot + ledger, bit-exactly")
    rs.add_argument("run_dir")
    rs.add_argument("overrides", nargs="*", help="resume-safe overrides only, e.g. threads=4 wandb.mode=offline")
    rs.set_defaults(func=cmd_resume)

    st = sub.add_parser("status", help="state, edits done / total, heartbeat age, last snapshot, alerts, ETA")
    st.add_argument("run_dirs", nargs="+")
    st.set_defaults(func=cmd_status)

    ex = sub.add_parser("export", help="write the edited model at a committed edit (base model + ledger)")
    ex.add_argument("run_dir")
    ex.add_argument("--out", required=True, help="new directory for save_pretrained output")
    ex.add_argument("--at-edit", type=int, default=None, help="edit index (default: the last committed edit)")
    ex.set_defaults(func=cmd_export)

    w = sub.add_parser("world", help="build or describe the embedded synthetic world")
    w.add_argument("action", choices=["build", "info"])
    w.add_argument("preset", nargs="?", default="standard",
                   help="preset (default: standard, the shipped default world); <preset>@local = this machine's build")
    w.add_argument("--cache-dir", default=None)
    w.add_argument("--rebuild", "--force", dest="rebuild", action="store_true",
                   help="build on this machine even if cached or shipped (a shipped preset: compare with the shipped "
                        "build; use the result as world:<preset>@local)")
    w.set_defaults(func=cmd_world)

    pw = sub.add_parser("push-wandb", help="replay a run's JSONL telemetry into wandb (offline clusters)")
    pw.add_argument("run_dir")
    pw.add_argument("--mode", default="online", choices=["online", "offline"])
    pw.add_argument("--project", default=None)
    pw.add_argument("--entity", default=None)
    pw.set_defaults(func=cmd_push_wandb)

    t = sub.add_parser("trace", help="causal tracing (ROME): where the model stores facts, to choose edit layers")
    t.add_argument("model", help="world:<preset>, a local model folder or an HF id")
    t.add_argument("--data", default=None, help="edit records (default: the world's counterfact.json)")
    t.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                   help="malformed records in --data: raise (default) or skip and report them (as data.on_error)")
    t.add_argument("--n-facts", type=int, default=50, help="facts sampled from the data (seeded)")
    t.add_argument("--samples", type=int, default=3, help="noise samples per fact")
    t.add_argument("--noise", type=float, default=None, help="noise std (default 3 x subject embedding std)")
    t.add_argument("--kinds", default="hidden,mlp,attn", help="comma-separated: hidden, mlp, attn")
    t.add_argument("--window", type=int, default=None, help="layers restored together for mlp/attn "
                   "(default max(1, n_layers // 4))")
    t.add_argument("--measure", default="first_token", choices=["first_token", "object"])
    t.add_argument("--include-unknown", action="store_true", help="also trace facts the model gets wrong")
    t.add_argument("--batch-size", type=int, default=64, help="rows per forward pass")
    t.add_argument("--device", default="auto")
    t.add_argument("--dtype", default="float32")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="output folder (default runs/trace-<model>)")
    t.set_defaults(func=cmd_trace)

    e = sub.add_parser("list-editors", help="list registered editors (--options: every option, its type, default "
                       "and meaning)")
    e.add_argument("names", nargs="*", help="only these editors (implies --options)")
    e.add_argument("--options", action="store_true", help="list each editor's options (editor.<key>)")
    e.set_defaults(func=cmd_list_editors)
    lp = sub.add_parser("list-probes", help="list registered probes (--options: every option, its type, default "
                        "and meaning)")
    lp.add_argument("names", nargs="*", help="only these probes (implies --options)")
    lp.add_argument("--options", action="store_true", help="list each probe's options (keys of its probes: entry)")
    lp.set_defaults(func=cmd_list_probes)
    return p


def _quiet_libraries() -> None:
    """Library progress bars and advisory warnings (weight loading, dataset splits, attention-mask hints) drown the
    run's own progress lines in cluster logs; -v brings them back."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        _quiet_libraries()
    from seqedit.signals import StopRequested

    try:
        return args.func(args)
    except StopRequested as e:
        print(f"seqedit: {e}; run state saved (status 'preempted'); continue with `seqedit resume RUN_DIR` or "
              "the same command with --resume", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("seqedit: interrupted (second Ctrl-C); run state saved (status 'preempted')", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        if args.verbose:
            raise
        # Bad input and run failures get one clear line; -v shows the traceback.
        print(f"seqedit: error: {e}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
