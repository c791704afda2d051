"""The ``movielens`` format: a MovieLens folder (100K, 1M or latest/20M/25M), its ratings as behaviors
(``click`` for a rating >= 4) and each movie's first genre as its category (the package docstring gives the
rules)."""

from __future__ import annotations

from pathlib import Path

import duckdb

from dmqn_core.data.formats.reading import (
    SourceInfo,
    check_head,
    head_lines,
    integer_sql,
    read_lines_sql,
    source_compression,
)
from dmqn_core.errors import DmqnError

MOVIELENS_BEHAVIORS = ("click", "rate_low")


GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
    "IMAX",
    "(no genres listed)",
)
GENRE_ALIASES = {"Children": "Children's"}


def movielens_files(folder: Path) -> tuple[str, Path, Path]:
    """(variant, ratings file, item file) of a MovieLens folder."""
    if not folder.is_dir():
        raise DmqnError(f"{folder} is not a folder (--format movielens reads a MovieLens folder, e.g. ml-100k/)")
    variants = (
        ("ml-100k", "u.data", "u.item"),
        ("ml-1m", "ratings.dat", "movies.dat"),
        ("ml-latest", "ratings.csv", "movies.csv"),
    )
    for variant, ratings_name, items_name in variants:
        ratings, items = folder / ratings_name, folder / items_name
        if ratings.is_file() and items.is_file():
            return variant, ratings, items
    raise DmqnError(
        f"{folder} is not a MovieLens folder: expected u.data + u.item (100K), "
        "ratings.dat + movies.dat (1M) or ratings.csv + movies.csv (latest)"
    )


def load_movielens(con: duckdb.DuckDBPyConnection, folder: Path) -> SourceInfo:
    variant, ratings, items = movielens_files(folder)
    _load_genre_table(con)
    split, header = _create_movies(con, variant, ratings, items)
    _create_rating_events(con, ratings, split, header)
    return SourceInfo(variant, [ratings, items], MOVIELENS_BEHAVIORS, ("click",), header, "rejects_log", ratings)


def _create_movies(con: duckdb.DuckDBPyConnection, variant: str, ratings: Path, items: Path) -> tuple[str, int]:
    """``movies(item_id, category_id)`` from the variant's item file, once both files' first lines look right;
    returns how the variant's ratings file splits its fields and its header lines."""
    if variant == "ml-100k":
        check_head(ratings, "MovieLens u.data", 4, "\t", "tab")
        _check_items_nonempty(items)
        # u.item: id|title|release|video release|IMDb url|19 genre flags; the first flag set wins.
        con.execute(
            f"""
            CREATE TABLE movies AS
            SELECT item_id, coalesce(list_position(flags, '1') - 1, 0) AS category_id
            FROM (SELECT {integer_sql("p[1]")} AS item_id, list_slice(p, -19, -1) AS flags, len(p) AS n
                  FROM (SELECT string_split(rtrim(line, ' \t\r'), '|') AS p
                        FROM {read_lines_sql("latin-1", 0, None, source_compression(items))}
                        WHERE line IS NOT NULL))
            WHERE item_id IS NOT NULL AND n >= 20
            """,
            [str(items)],
        )
        split, header = "\t", 0
    elif variant == "ml-1m":
        check_head(ratings, "MovieLens ratings.dat", 4, "::", "'::'")
        _check_items_nonempty(items)
        _create_movies_from_genres(
            con,
            items,
            "latin-1",
            0,
            integer_sql("split_part(line, '::', 1)"),
            "split_part(regexp_extract(line, '[^:]*$'), '|', 1)",
        )
        split, header = "::", 0
    else:
        check_head(ratings, "MovieLens ratings.csv", 4, ",", "comma", skip_first=True)
        _check_items_nonempty(items)
        # Titles may be quoted and hold commas; the id is the first field and the genres the last.
        _create_movies_from_genres(
            con,
            items,
            "utf-8",
            1,
            integer_sql("split_part(line, ',', 1)"),
            "split_part(regexp_extract(line, '[^,]*$'), '|', 1)",
        )
        split, header = ",", 1
    return split, header


def _create_rating_events(con: duckdb.DuckDBPyConnection, ratings: Path, split: str, header: int) -> None:
    """``events`` from the ratings, each rating's category that of its movie; a rating of a movie the item
    file lacks is a ``bad_id`` row."""
    con.execute(
        f"""
        CREATE TABLE events AS
        SELECT reason, CASE WHEN reason IS NOT NULL THEN line END AS bad_line,
               u AS user_id, i AS item_id, CAST(NULL AS BIGINT) AS category_id,
               CASE WHEN r >= 4 THEN 'click' ELSE 'rate_low' END AS behavior, t AS ts
        FROM (
            SELECT line, u, i, r, t,
                   CASE WHEN line IS NULL OR trim(line) = '' THEN 'blank'
                        WHEN len(p) <> 4 THEN 'bad_columns'
                        WHEN u IS NULL OR i IS NULL THEN 'bad_id'
                        WHEN r IS NULL THEN 'bad_behavior'
                        WHEN t IS NULL THEN 'bad_timestamp'
                   END AS reason
            FROM (
                SELECT line, p, {integer_sql("p[1]")} AS u, {integer_sql("p[2]")} AS i,
                       TRY_CAST(trim(p[3]) AS DOUBLE) AS r, {integer_sql("p[4]")} AS t
                FROM (SELECT line, string_split(rtrim(line, ' \t\r'), ?) AS p
                      FROM {read_lines_sql("utf-8", header, "rejects_log", source_compression(ratings))})
            )
        )
        """,
        [split, str(ratings)],
    )
    # In place, so that the rowid (file order) stays as read.
    con.execute(
        """
        UPDATE events SET category_id = movies.category_id FROM movies
        WHERE events.reason IS NULL AND events.item_id = movies.item_id
        """
    )
    con.execute(
        "UPDATE events SET reason = 'bad_id', bad_line = concat_ws(' ', user_id, item_id, ts) "
        "WHERE reason IS NULL AND category_id IS NULL"
    )


def _check_items_nonempty(path: Path) -> None:
    if not head_lines(path, "latin-1"):
        raise DmqnError(f"{path} is empty (the movie file gives each item its genre)")


def _load_genre_table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        "CREATE TABLE genres AS SELECT unnest(?) AS name, unnest(?) AS id",
        [list(GENRES), list(range(len(GENRES)))],
    )
    con.execute(
        "INSERT INTO genres SELECT unnest(?) AS name, unnest(?) AS id",
        [list(GENRE_ALIASES), [GENRES.index(target) for target in GENRE_ALIASES.values()]],
    )


def _create_movies_from_genres(
    con: duckdb.DuckDBPyConnection, path: Path, encoding: str, skip: int, id_sql: str, genre_sql: str
) -> None:
    """``movies(item_id, category_id)`` from a file listing each movie's '|'-joined genres."""
    con.execute(
        f"""
        CREATE TABLE movie_genres AS
        SELECT {id_sql} AS item_id, {genre_sql} AS genre
        FROM (SELECT rtrim(line, ' \t\r') AS line
              FROM {read_lines_sql(encoding, skip, None, source_compression(path))}
              WHERE line IS NOT NULL)
        """,
        [str(path)],
    )
    con.execute(
        """
        CREATE TABLE movies AS
        WITH other AS (
            SELECT genre, ? + dense_rank() OVER (ORDER BY genre) - 1 AS id
            FROM (SELECT DISTINCT genre FROM movie_genres WHERE genre NOT IN (SELECT name FROM genres))
        )
        SELECT m.item_id, min(coalesce(g.id, o.id)) AS category_id
        FROM movie_genres m LEFT JOIN genres g ON g.name = m.genre LEFT JOIN other o ON o.genre = m.genre
        WHERE m.item_id IS NOT NULL
        GROUP BY m.item_id
        """,
        [len(GENRES)],
    )
