"""Data preparation at Taobao scale: `dmqn synth --scale taobao`, then `dmqn prep` on its log.

Each phase runs in its own child process, so that its peak resident memory is its own (from
wait4's rusage; DuckDB works inside the prep process). The script reports per phase the wall
time, the CPU time (user + system; less sensitive than wall time to other load on a shared
machine), rows/s, peak RSS and disk sizes: the log, the prepared set, and the peak of DuckDB's
working directory (``--temp-dir``: its database file and spill files, sampled every second),
then prep's own stage times from the set's meta.json, and the load average before and after.

    python benchmarks/prep_scale.py                    # the full shape: ~988k users, ~100M rows
    python benchmarks/prep_scale.py --users 100000     # a tenth, to try it quickly
    python benchmarks/prep_scale.py --log big.csv      # prep an existing Taobao-format log only

The synth phase calls what `dmqn synth --scale taobao` calls (write_log on the taobao scale,
here with --users overriding its user count); the prep phase is the `dmqn prep` command itself.
Everything goes to a fresh directory under --dir (default: the system's temporary directory),
deleted at the end unless --keep. Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from dmqn_core.data.synth import SCALES

SET_NAME = "taobao-synth"
BYTES_PER_ROW = 37  # of the synthetic Taobao CSV, measured
# Disk needed besides the log, in log sizes: DuckDB's working files plus the prepared set.
DISK_FACTOR = 3.0


def synth_worker(out: str, users: int | None, seed: int) -> None:
    """The synth phase, inside its child process."""
    from dmqn_cli.progress import RichProgress
    from dmqn_core.data.synth import write_log

    scale = SCALES["taobao"] if users is None else dataclasses.replace(SCALES["taobao"], n_users=users)
    with RichProgress() as progress:
        summary = write_log(out, scale, seed, progress=progress)
    print(
        json.dumps(
            {
                "rows": summary.rows,
                "users": summary.users,
                "items": summary.items,
                "categories": summary.categories,
                "malformed": summary.malformed,
                "out_of_range": summary.out_of_range,
            }
        )
    )


def run_child(command: list[str], watch: Path | None = None) -> dict:
    """Run a command; its wall and CPU seconds, peak RSS (bytes), stdout, peak size of ``watch``."""
    peak_disk = 0
    done = threading.Event()

    def sample_disk() -> None:
        nonlocal peak_disk
        while not done.wait(1.0):
            peak_disk = max(peak_disk, tree_bytes(watch))

    sampler = threading.Thread(target=sample_disk, daemon=True) if watch else None
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    if sampler:
        sampler.start()
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    done.set()
    if sampler:
        sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.exit(f"{' '.join(command[:4])} ... failed with exit code {child.returncode}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss": usage.ru_maxrss * 1024,
        "stdout": stdout,
        "peak_disk": peak_disk,
    }


def tree_bytes(path: Path | None) -> int:
    total = 0
    if path is None or not path.exists():
        return 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # DuckDB removes spill files as it goes
                pass
    return total


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--users",
        type=int,
        default=None,
        help=f"users to generate (default: the taobao scale's {SCALES['taobao'].n_users:,})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, default=None, help="prep this existing log instead of generating one")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the run's directory is made (default: %(default)s)",
    )
    parser.add_argument("--memory-limit", default=None, help="dmqn prep --memory-limit (default: prep's own)")
    parser.add_argument("--threads", type=int, default=None, help="dmqn prep --threads (default: all cores)")
    parser.add_argument("--keep", action="store_true", help="keep the log and the prepared set")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()

    users = args.users or SCALES["taobao"].n_users
    expected_log = args.log.stat().st_size if args.log else users * SCALES["taobao"].mean_length * BYTES_PER_ROW
    free = shutil.disk_usage(args.dir).free
    needed = expected_log * (DISK_FACTOR + (0 if args.log else 1))
    if free < needed:
        sys.exit(f"{args.dir} has {gb(free)} free; this run needs about {gb(needed)}")
    run_dir = Path(tempfile.mkdtemp(prefix="dmqn-prep-scale-", dir=args.dir))
    log = args.log.resolve() if args.log else run_dir / "taobao-synth.csv"
    workspace, scratch = run_dir / "ws", run_dir / "scratch"
    scratch.mkdir()
    load_before = os.getloadavg()
    results: dict = {"machine": machine(), "load_before": load_before, "users_asked": users}
    try:
        if args.log is None:
            print(f"synth: {users:,} users -> {log}", file=sys.stderr)
            synth = run_child([sys.executable, __file__, "--synth-worker", str(log), str(users), str(args.seed)])
            results["synth"] = {**synth, **json.loads(synth.pop("stdout").strip().splitlines()[-1])}
        results["log_bytes"] = log.stat().st_size

        prep_command = [
            sys.executable,
            "-m",
            "dmqn_cli",
            "prep",
            str(log),
            "--format",
            "taobao",
            "--out",
            SET_NAME,
            "--workspace",
            str(workspace),
            "--temp-dir",
            str(scratch),
        ]
        if args.memory_limit:
            prep_command += ["--memory-limit", args.memory_limit]
        if args.threads:
            prep_command += ["--threads", str(args.threads)]
        print(f"prep: {' '.join(prep_command[3:])}", file=sys.stderr)
        prep = run_child(prep_command, watch=scratch)
        prep.pop("stdout")
        meta = json.loads((workspace / "data" / SET_NAME / "meta.json").read_text())
        results["prep"] = {
            **prep,
            "counts": meta["counts"],
            "stage_seconds": meta["stage_seconds"],
            "rows": meta["counts"]["rows_read"],
        }
        results["set_bytes"] = tree_bytes(workspace / "data" / SET_NAME)
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    report(results)
    if args.keep:
        print(f"kept in {run_dir}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{os.cpu_count()} cores ({cpu}), {memory / 2**30:.0f} GiB RAM"


def report(results: dict) -> None:
    lines = [
        f"machine: {results['machine']}",
        "load average (1/5/15 min) before: {:.2f} {:.2f} {:.2f}".format(*results["load_before"]),
        "                          after:  {:.2f} {:.2f} {:.2f}".format(*results["load_after"]),
        "",
        f"{'phase':6} {'rows':>13} {'wall':>9} {'cpu':>9} {'rows/s':>10} {'peak RSS':>10}  disk",
    ]
    for phase in ("synth", "prep"):
        if phase not in results:
            continue
        r = results[phase]
        if phase == "synth":
            disk = f"log {gb(results['log_bytes'])}"
        else:
            disk = f"set {gb(results['set_bytes'])}, DuckDB working dir peak {gb(r['peak_disk'])}"
        lines.append(
            f"{phase:6} {r['rows']:>13,} {r['wall_s']:>8.0f}s {r['cpu_s']:>8.0f}s "
            f"{r['rows'] / r['wall_s']:>10,.0f} {r['peak_rss'] / 1e9:>7.2f} GB  {disk}"
        )
    if "synth" in results:
        s = results["synth"]
        lines.append(
            f"\nlog: {s['users']:,} users, {s['items']:,} items, {s['categories']:,} categories, "
            f"{s['malformed']:,} malformed rows, {s['out_of_range']:,} out-of-range timestamps"
        )
    if "prep" in results:
        p = results["prep"]
        c = p["counts"]
        bad = ", ".join(f"{k} {v:,}" for k, v in c["rows_bad"].items() if v)
        lines.append(
            f"prep: skipped {bad or 'nothing'}; {c['users']:,} users kept, {c['behaviors']:,} behaviors, "
            f"samples train/valid/test {c['samples']['train']:,}/{c['samples']['valid']:,}/"
            f"{c['samples']['test']:,}"
        )
        lines.append("prep stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in p["stage_seconds"].items()))
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--synth-worker":
        synth_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
