"""The run store's schema: every table's DDL, its version, and the check that a file is a run store.

The schema lives in this module only; each table is described in the module of its table group
(runs, metrics, codebooks, inspection_sample, benches). A file may be handed over: it is opened with
DuckDB's external access off (CONNECTION_CONFIG) and used only while its schema is this module's
(schema_problem finds None); anything else is one DmqnError (dmqn_core.runs.store.connection).
"""

from __future__ import annotations

import functools

import duckdb

# 2: benches, bench_runs; 3: inspect_*, codebook_vectors, item_vectors; 4: quantizer_stats, icim_stats
SCHEMA_VERSION = 4

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS schema_info (version INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id          VARCHAR PRIMARY KEY,
        model           VARCHAR NOT NULL,
        dataset         VARCHAR NOT NULL,
        dataset_path    VARCHAR NOT NULL,
        status          VARCHAR NOT NULL,      -- running | finished | failed | interrupted (see RunRecord)
        created_at      TIMESTAMPTZ NOT NULL,
        finished_at     TIMESTAMPTZ,
        seed            BIGINT,
        params          JSON NOT NULL,         -- every value the run actually used
        n_parameters    BIGINT,
        epochs_done     INTEGER DEFAULT 0,
        best_epoch      INTEGER,
        best_valid_auc  DOUBLE,
        test_auc        DOUBLE,
        test_gauc       DOUBLE,
        test_logloss    DOUBLE,
        train_seconds   DOUBLE DEFAULT 0,
        checkpoint      VARCHAR,
        error           VARCHAR
    )""",
    """CREATE TABLE IF NOT EXISTS metrics (
        run_id       VARCHAR NOT NULL,
        epoch        INTEGER,
        split        VARCHAR NOT NULL,         -- train | valid | test
        name         VARCHAR NOT NULL,
        value        DOUBLE,
        recorded_at  TIMESTAMPTZ NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS codebook_usage (
        run_id      VARCHAR NOT NULL,
        epoch       INTEGER NOT NULL,
        codebook    INTEGER NOT NULL,
        used        INTEGER NOT NULL,
        dead        INTEGER NOT NULL,
        perplexity  DOUBLE NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS benches (
        bench       VARCHAR PRIMARY KEY,
        dataset     VARCHAR NOT NULL,
        created_at  TIMESTAMPTZ NOT NULL,
        settings    JSON NOT NULL          -- models, seeds and the shared budget
    )""",
    """CREATE TABLE IF NOT EXISTS bench_runs (
        bench    VARCHAR NOT NULL,
        model    VARCHAR NOT NULL,
        seed     BIGINT NOT NULL,
        run_id   VARCHAR NOT NULL,
        PRIMARY KEY (bench, model, seed)
    )""",
    """CREATE TABLE IF NOT EXISTS codeword_counts (
        run_id    VARCHAR NOT NULL,
        epoch     INTEGER NOT NULL,
        codebook  INTEGER NOT NULL,
        codeword  INTEGER NOT NULL,
        count     BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS quantizer_stats (
        run_id     VARCHAR NOT NULL,
        epoch      INTEGER NOT NULL,
        codebook   INTEGER NOT NULL,
        agreement  DOUBLE NOT NULL,            -- share of behaviors, 0..1
        margin     DOUBLE NOT NULL             -- mean best minus second-best score
    )""",
    """CREATE TABLE IF NOT EXISTS icim_stats (
        run_id      VARCHAR NOT NULL,
        epoch       INTEGER NOT NULL,
        layer       INTEGER NOT NULL,          -- 0 = the first HSTU layer
        norm_ratio  DOUBLE                     -- NULL when the sample had no non-empty cluster
    )""",
    """CREATE TABLE IF NOT EXISTS inspect_users (
        run_id          VARCHAR NOT NULL,
        user_id         BIGINT NOT NULL,       -- raw user id of the log
        history_length  INTEGER NOT NULL,      -- L: behaviors in the encoded history
        candidates      INTEGER NOT NULL       -- C: test samples
    )""",
    """CREATE TABLE IF NOT EXISTS inspect_behaviors (
        run_id     VARCHAR NOT NULL,
        user_id    BIGINT NOT NULL,
        position   INTEGER NOT NULL,           -- 0 = oldest behavior of the history
        codebook   INTEGER NOT NULL,
        codeword   INTEGER NOT NULL,
        timestamp  BIGINT NOT NULL,            -- unix seconds
        item       BIGINT NOT NULL,            -- raw ids
        category   BIGINT NOT NULL,
        behavior   VARCHAR NOT NULL            -- behavior type name (pv, buy, ...)
    )""",
    """CREATE TABLE IF NOT EXISTS inspect_candidates (
        run_id     VARCHAR NOT NULL,
        user_id    BIGINT NOT NULL,
        candidate  INTEGER NOT NULL,           -- 0..C-1
        item       BIGINT NOT NULL,
        category   BIGINT NOT NULL,
        label      TINYINT NOT NULL,
        score      FLOAT NOT NULL              -- predicted click probability
    )""",
    """CREATE TABLE IF NOT EXISTS inspect_attention (
        run_id     VARCHAR NOT NULL,
        user_id    BIGINT NOT NULL,
        candidate  INTEGER NOT NULL,
        codebook   INTEGER NOT NULL,
        codeword   INTEGER NOT NULL,           -- non-empty clusters only
        weight     FLOAT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS codebook_vectors (
        run_id    VARCHAR NOT NULL,
        codebook  INTEGER NOT NULL,
        codeword  INTEGER NOT NULL,
        vector    FLOAT[] NOT NULL             -- D values, folded into the behavior-embedding space
    )""",
    """CREATE TABLE IF NOT EXISTS item_vectors (
        run_id      VARCHAR NOT NULL,
        item        BIGINT NOT NULL,           -- raw ids
        category    BIGINT NOT NULL,
        popularity  BIGINT NOT NULL,           -- behaviors on the item in the prepared set
        vector      FLOAT[] NOT NULL           -- D values: the candidate embedding item + category
    )""",
]

# Every connection to a store opens with this: a file handed over must not make DuckDB read or write anything
# else (a view over read_csv('/etc/passwd'), COPY TO, ATTACH, extension installs). The store needs nothing
# outside its own file: Arrow frames registered from Python are not external access.
CONNECTION_CONFIG: dict[str, str | bool | int | float | list[str]] = {"enable_external_access": False}

# The catalog of the connection's own database, read by qualified names that no macro of the file can shadow.
_CATALOG_QUERIES = {
    "objects": "SELECT function_name, function_type FROM system.main.duckdb_functions() "
    "WHERE database_name = ? AND NOT internal "
    "UNION ALL SELECT type_name, 'type' FROM system.main.duckdb_types() WHERE database_name = ? AND NOT internal "
    "UNION ALL SELECT index_name, 'index' FROM system.main.duckdb_indexes() WHERE database_name = ? "
    "UNION ALL SELECT view_name, 'view' FROM system.main.duckdb_views() "
    "WHERE database_name = ? AND schema_name = 'main' AND NOT internal",
    "tables": "SELECT table_name FROM system.main.duckdb_tables() WHERE database_name = ? AND schema_name = 'main'",
    "columns": "SELECT table_name, column_name, data_type, column_default, is_nullable "
    "FROM system.main.duckdb_columns() WHERE database_name = ? AND schema_name = 'main' "
    "ORDER BY table_name, column_index",
    "constraints": "SELECT table_name, constraint_type, constraint_column_names "
    "FROM system.main.duckdb_constraints() WHERE database_name = ? AND schema_name = 'main'",
}


def _table_signatures(con: duckdb.DuckDBPyConnection) -> dict[str, tuple]:
    """Each table of the connection's database: its columns (name, type, default, nullable) in order and
    its constraints (kind, columns)."""
    database = [con.execute("SELECT system.main.current_database()").fetchall()[0][0]]
    columns: dict[str, list] = {name: [] for (name,) in con.execute(_CATALOG_QUERIES["tables"], database).fetchall()}
    for table, *column in con.execute(_CATALOG_QUERIES["columns"], database).fetchall():
        if table in columns:  # the columns of views are listed too
            columns[table].append(tuple(column))
    constraints: dict[str, list] = {name: [] for name in columns}
    for table, kind, names in con.execute(_CATALOG_QUERIES["constraints"], database).fetchall():
        constraints[table].append((kind, tuple(names)))
    return {name: (tuple(columns[name]), tuple(sorted(constraints[name]))) for name in columns}


@functools.cache
def reference_signatures() -> dict[str, tuple]:
    """The signatures of SCHEMA's tables, as the DuckDB in use makes them."""
    with duckdb.connect(config=CONNECTION_CONFIG) as con:
        for sql in SCHEMA:
            con.execute(sql)
        return _table_signatures(con)


def schema_problem(con: duckdb.DuckDBPyConnection) -> tuple[str | None, frozenset[str]]:
    """What makes the connection's database something other than a run store this module describes (None:
    nothing), and the tables of SCHEMA it has."""
    database = con.execute("SELECT system.main.current_database()").fetchall()[0][0]
    foreign = con.execute(_CATALOG_QUERIES["objects"], [database] * 4).fetchall()
    reference = reference_signatures()
    for name, kind in foreign:
        if kind != "view":  # a macro, type or index could change what a statement does
            return f"it defines the {kind.replace('_', ' ')} {name!r}", frozenset()
        if name in reference:  # a view of another name is never read
            return f"{name} is a view, not a table", frozenset()
    signatures = _table_signatures(con)
    tables = frozenset(signatures) & set(reference)
    if not tables:
        if signatures or foreign:
            return "it holds tables of something else", tables
        return None, tables  # a new, empty file: the first write creates the schema
    for name in ("schema_info", "runs"):  # every version of the schema had both, made in one transaction
        if name not in tables:
            return f"it has no table {name}", tables
    for name in sorted(tables):
        if signatures[name] != reference[name]:
            return f"table {name} does not have the columns dmqn makes", tables
    versions = con.execute("SELECT version FROM schema_info").fetchall()
    if len(versions) != 1 or versions[0][0] < 1:
        return "schema_info does not hold one schema version", tables
    return None, tables
