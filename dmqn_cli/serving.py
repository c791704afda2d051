"""``dmqn export-cache`` and ``dmqn score``: DMQN's cached user states (section 2.5)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from dmqn_cli.common import (
    ComputeDeviceOption,
    JsonOption,
    WorkspaceOption,
    console,
    err_console,
    handle_errors,
    int64_ids,
    open_workspace,
    parse_id,
    plain,
    print_json,
)
from dmqn_cli.progress import RichProgress
from dmqn_core.serving.cache import CachedScorer, export_states
from dmqn_core.serving.state_store import MAX_TTL, check_ttl


def _read_users(text: str) -> list[int] | None:
    if text == "all":
        return None
    path = Path(text)
    if not path.is_file():
        raise typer.BadParameter(f"--users takes 'all' or a file of user ids, one per line; {text} is neither")
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                ids.append(parse_id(line, "a user id", "--users"))
            except typer.BadParameter as exc:
                raise typer.BadParameter(f"{path}:{number}: {exc.message}", param_hint="--users") from None
    return ids


def _read_items(text: str) -> list[int]:
    item_ids = [parse_id(x, "an item id", "--items") for x in text.split(",") if x.strip()]
    if not item_ids:
        raise typer.BadParameter("--items names no item")
    return item_ids


@handle_errors
def export_cache(
    run_id: Optional[str] = typer.Argument(None, help="A dmqn or dmqn-simple run \\[default: the latest run]."),
    users: str = typer.Option("all", "--users", help="'all', or a file with one raw user id per line."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 (exact) or float16 (half the bytes)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Users encoded per batch."),
    resume: bool = typer.Option(False, "--resume", help="Skip users already stored for this model version."),
    to: Optional[str] = typer.Option(
        None,
        "--to",
        help="redis://\\[:PASSWORD@]host:port/db, or a SQLite file "
        "\\[default: WORKSPACE/cache/states.sqlite]; a password is never printed.",
    ),
    ttl: Optional[int] = typer.Option(
        None,
        "--ttl",
        help=f"Seconds before Redis expires the states, 1 to {MAX_TTL:,} (Redis only) \\[default: never].",
    ),
    device: str = ComputeDeviceOption,
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """Encode each user's whole history once (MCQM + ICIM) and store the state for cached scoring.

    States are keyed by model version (run id + checkpoint hash) and user id (Redis keys
    dmqn:<version>:<user_id>); every user's value is written atomically, so an interrupted export
    leaves no half-written user and `--resume` continues it.
    """
    check_ttl(ttl, to)  # before the workspace is made: a refused --ttl leaves nothing behind
    ws = open_workspace(workspace)
    user_ids = _read_users(users)
    with RichProgress() as progress:
        result = export_states(ws, run_id, user_ids, dtype, batch_size, resume, progress, to=to, ttl=ttl, device=device)
    per_user = result.bytes / max(result.total_users, 1)
    console.print(
        plain(
            f"{result.store}, version {result.version}: {result.users:,} users written in "
            f"{result.seconds:.1f} s ({result.users_per_s:,.0f} users/s); {result.total_users:,} users "
            f"stored, {result.bytes:,} bytes ({per_user:,.0f} bytes per user, {dtype})"
        ),
        soft_wrap=True,
    )


@handle_errors
def score(
    run_id: Optional[str] = typer.Argument(None, help="A dmqn or dmqn-simple run \\[default: the latest run]."),
    user: int = typer.Option(..., "--user", callback=int64_ids, help="Raw user id."),
    items: str = typer.Option(..., "--items", help="Comma-separated raw item ids."),
    source: Optional[str] = typer.Option(
        None,
        "--from",
        help="redis://\\[:PASSWORD@]host:port/db, or a SQLite file "
        "\\[default: WORKSPACE/cache/states.sqlite]; a password is never printed.",
    ),
    device: str = ComputeDeviceOption,
    as_json: bool = JsonOption,
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """Score candidate items for a user from the exported state (CTAM + MLP only).

    Prints one "item<TAB>probability" line per item, or with --json
    {"run_id", "version", "user_id", "scores": [{"item_id", "probability"}]}.
    """
    item_ids = _read_items(items)
    with (
        CachedScorer(open_workspace(workspace), run_id, source, device) as scorer,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        probabilities = scorer.score(user, item_ids)
    for warning in caught:
        err_console.print(Text.assemble(("warning:", "yellow"), " ", plain(warning.message)), soft_wrap=True)
    if as_json:
        print_json(
            {
                "run_id": scorer.run.run_id,
                "version": scorer.version,
                "user_id": user,
                "scores": [
                    {"item_id": item, "probability": float(probability)}
                    for item, probability in zip(item_ids, probabilities)
                ],
            }
        )
        return
    for item, probability in zip(item_ids, probabilities):  # plain "item<TAB>probability" lines for scripts
        typer.echo(f"{item}\t{probability:.6f}")


@handle_errors
def serve(
    run_id: Optional[str] = typer.Argument(
        None, help="A dmqn or dmqn-simple run with exported states \\[default: the latest run]."
    ),
    source: Optional[str] = typer.Option(
        None,
        "--from",
        help="redis://\\[:PASSWORD@]host:port/db, or a SQLite file "
        "\\[default: WORKSPACE/cache/states.sqlite]; a password is never printed or logged.",
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free one)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes, each loading the run once."),
    max_items: int = typer.Option(1000, "--max-items", min=1, help="Candidates per user in one request."),
    max_users: int = typer.Option(64, "--max-users", min=1, help="Users in one /v1/score:batch request."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", min=1, help="Larger request bodies get 413."),
    store_timeout: float = typer.Option(
        1.0, "--store-timeout", min=0.01, help="Seconds per Redis connect or reply; a request waits at most twice this."
    ),
    watch: Optional[float] = typer.Option(
        None,
        "--watch",
        min=0.1,
        help="Check every SECONDS for a newer checkpoint of the run whose export has finished, and switch to it "
        "\\[default: only on POST /admin/reload].",
    ),
    token_file: Optional[Path] = typer.Option(
        None, "--token-file", help="File holding a bearer token that /v1 and /admin requests must send."
    ),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch threads per worker."),
    device: str = ComputeDeviceOption,
    access_log: bool = typer.Option(False, "--access-log", help="Log one line per request (never its headers)."),
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """Serve click probabilities over HTTP from the exported user states (CTAM + MLP per request).

    POST /v1/score {"user_id": U, "items": [I, ...]} and /v1/score:batch; GET /healthz, /readyz,
    /metrics (Prometheus); POST /admin/reload. API docs at http://HOST:PORT/docs; see docs/serving.md.
    SIGTERM or Ctrl-C lets requests in flight finish and refuses new ones.
    """
    # Imported here: FastAPI, uvicorn and prometheus-client are needed by this command only.
    from dmqn_core.serving.http_service import ServeSettings, run_server

    settings = ServeSettings(
        workspace=str(open_workspace(workspace).root),
        run_id=run_id,
        source=source,
        max_items=max_items,
        max_users=max_users,
        max_body_bytes=max_body_bytes,
        store_timeout=store_timeout,
        watch=watch,
        token_file=str(token_file) if token_file else None,
        threads=threads,
        device=device,
    )
    run_server(settings, host, port, workers, access_log)
    err_console.print("stopped", highlight=False)
