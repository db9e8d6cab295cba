"""Loaders for the MovieLens cards (``ml1m``, ``ml100k``): ratings joined with users and movies into one CTR table.

Both return ``{"all": frame}`` with string columns ``label, user_id, movie_id, timestamp, gender, age,
occupation, zip, genres, year``: ``label`` is ``"1"`` for a rating of 4 or 5 and ``"0"`` otherwise, ``genres`` is
the movie's genres joined with ``"|"`` (a sequence feature), ``year`` is the release year from the title (ML-100K:
else from the release date; null where neither has one). The rating itself is not in the frame: it would leak the
label. Rows keep the order of the ratings file; every rating must find its user and movie (a dangling id is an
error, never a dropped row). Timestamps are unix seconds as decimal strings (ML-1M mixes 9- and 10-digit values:
compare them as integers).

``load_ml1m_seq`` / ``load_ml100k_seq`` add, for DIN-style models, the movie's first genre ``genre`` and the
behaviour history as two aligned columns: ``hist_genres`` and ``hist_movies`` (see :func:`add_histories`).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from ctrlab.errors import DataError

if TYPE_CHECKING:
    from ctrlab.datasets.cards import DatasetCard

OUTPUT_COLUMNS = ["label", "user_id", "movie_id", "timestamp", "gender", "age", "occupation", "zip", "genres", "year"]

# The 19 genre flag columns of ML-100K ``u.item``, in file order (also listed in ``u.genre``, which is checked).
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip


def _path(card: "DatasetCard", data_dir: Path, role: str) -> Path:
    spec = card.files.get(role)
    if spec is None:
        raise DataError(f"dataset card '{card.name}' has no file with role '{role}' (its loader needs one)")
    path = Path(data_dir) / spec.path
    if not path.is_file():
        raise DataError(f"{path}: data file not found (dataset card '{card.name}'; set CTRLAB_DATA_DIR or --data-dir)")
    return path


def read_delimited(path: Path, separator: str, names: list[str], encoding: str = "utf-8") -> pl.DataFrame:
    """Read a header-less delimited text file (plain or ``.gz``) decoded with ``encoding``; every column a string.

    Multi-character separators (``'::'``) are supported; quotes have no special meaning (MovieLens titles may
    contain ``"``). Blank lines are ignored. The column count must equal ``len(names)`` on every line.
    """
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid {encoding} text at byte {exc.start}") from None
    if len(separator) > 1:
        text = text.replace(separator, "\x1f")
        separator = "\x1f"
    try:
        frame = pl.read_csv(
            text.encode("utf-8"),
            separator=separator,
            has_header=False,
            infer_schema=False,
            quote_char=None,
            truncate_ragged_lines=False,
        )
    except pl.exceptions.NoDataError:
        raise DataError(f"{path}: file has no data rows") from None
    except Exception as exc:  # polars raises several error types for malformed rows
        raise DataError(f"{path}: cannot parse as {separator!r}-separated text ({str(exc).splitlines()[0]})") from None
    if frame.width != len(names):
        raise DataError(f"{path}: rows have {frame.width} fields, expected {len(names)} ({', '.join(names)})")
    frame.columns = list(names)
    # A blank line reads as one row of nulls; it is not a data row.
    return frame.filter(~pl.all_horizontal(pl.all().is_null()))


def _read(
    card: "DatasetCard", data_dir: Path, role: str, separator: str, names: list[str], encoding: str = "utf-8"
) -> tuple[Path, pl.DataFrame]:
    """Read the card's file ``role`` with the card's separator and column names (falling back to the defaults)."""
    path = _path(card, data_dir, role)
    spec = card.files[role]
    columns = spec.columns or names
    frame = read_delimited(path, spec.separator or separator, columns, encoding)
    missing = [c for c in names if c not in frame.columns]
    if missing:
        raise DataError(f"dataset card '{card.name}': file role '{role}' must name columns {', '.join(missing)}")
    return path, frame


def _label_from_rating(ratings: pl.DataFrame, path: Path) -> pl.DataFrame:
    rating = pl.col("rating").str.strip_chars().cast(pl.Int64, strict=False)
    ratings = ratings.with_columns(rating.alias("_rating"))
    bad = ratings.filter(pl.col("_rating").is_null() | ~pl.col("_rating").is_between(1, 5))
    if bad.height:
        raise DataError(f"{path}: {bad.height} ratings are not integers 1-5 (e.g. {bad.get_column('rating')[0]!r})")
    return ratings.with_columns(
        pl.when(pl.col("_rating") >= 4).then(pl.lit("1")).otherwise(pl.lit("0")).alias("label")
    ).drop("rating", "_rating")


def _year_from_title(title: pl.Expr) -> pl.Expr:
    return title.str.strip_chars().str.extract(r"\((\d{4})\)$", 1).alias("year")


def _join(ratings: pl.DataFrame, users: pl.DataFrame, movies: pl.DataFrame, paths: dict[str, Path]) -> pl.DataFrame:
    for what, table, key in (("users", users, "user_id"), ("movies", movies, "movie_id")):
        duplicated = table.get_column(key).is_duplicated().sum()
        if duplicated:
            raise DataError(f"{paths[what]}: {duplicated} rows repeat a {key}")
    users = users.with_columns(pl.lit(True).alias("_user_found"))
    movies = movies.with_columns(pl.lit(True).alias("_movie_found"))
    joined = ratings.join(users, on="user_id", how="left", maintain_order="left").join(
        movies, on="movie_id", how="left", maintain_order="left"
    )
    for what, flag, key in (("users", "_user_found", "user_id"), ("movies", "_movie_found", "movie_id")):
        dangling = joined.filter(pl.col(flag).is_null())
        if dangling.height:
            raise DataError(
                f"{paths['ratings']}: {dangling.height} ratings name a {key} missing from {paths[what]} "
                f"(e.g. {dangling.get_column(key)[0]})"
            )
    if joined.height != ratings.height:  # pragma: no cover - guarded by the duplicate checks above
        raise DataError(f"{paths['ratings']}: joining users and movies changed the row count")
    return joined.select(OUTPUT_COLUMNS)


def load_ml1m(card: "DatasetCard", data_dir: Path) -> dict[str, pl.DataFrame]:
    """MovieLens 1M: ``ratings.dat`` joined with ``users.dat`` and ``movies.dat`` (``'::'``-separated; movies latin-1).

    Card file roles: ``ratings``, ``users``, ``movies``. Age and occupation stay as the ML-1M codes.
    """
    paths: dict[str, Path] = {}
    paths["ratings"], ratings = _read(card, data_dir, "ratings", "::", ["user_id", "movie_id", "rating", "timestamp"])
    paths["users"], users = _read(card, data_dir, "users", "::", ["user_id", "gender", "age", "occupation", "zip"])
    paths["movies"], movies = _read(card, data_dir, "movies", "::", ["movie_id", "title", "genres"], "latin-1")
    ratings = _label_from_rating(ratings, paths["ratings"])
    movies = movies.select("movie_id", pl.col("genres").fill_null(""), _year_from_title(pl.col("title")))
    return {"all": _join(ratings, users, movies, paths)}


def load_ml100k(card: "DatasetCard", data_dir: Path) -> dict[str, pl.DataFrame]:
    """MovieLens 100K: ``u.data`` (tab) joined with ``u.user`` and ``u.item`` (``'|'``, latin-1).

    Card file roles: ``ratings``, ``users``, ``movies``, ``genres``. The 19 genre flag columns of ``u.item`` (the
    columns after ``imdb_url``) must match ``u.genre``; they become one ``"|"``-joined ``genres`` string.
    """
    paths: dict[str, Path] = {}
    paths["genres"], genre_table = _read(card, data_dir, "genres", "|", ["genre", "genre_id"], "latin-1")
    names = genre_table.sort(pl.col("genre_id").cast(pl.Int64, strict=False)).get_column("genre").to_list()
    if names != ML100K_GENRES:
        raise DataError(f"{paths['genres']}: genres differ from the 19 ML-100K genres ({', '.join(ML100K_GENRES)})")
    item_columns = ["movie_id", "title", "release_date", "video_release_date", "imdb_url", *names]
    paths["ratings"], ratings = _read(card, data_dir, "ratings", "\t", ["user_id", "movie_id", "rating", "timestamp"])
    paths["users"], users = _read(card, data_dir, "users", "|", ["user_id", "age", "gender", "occupation", "zip"])
    paths["movies"], movies = _read(card, data_dir, "movies", "|", item_columns, "latin-1")
    flags = movies.columns[movies.columns.index("imdb_url") + 1 :]
    if flags != names:
        raise DataError(f"dataset card '{card.name}': the movies columns after imdb_url must be the genres of u.genre")
    bad = movies.filter(pl.any_horizontal(~pl.col(flags).is_in(["0", "1"]) | pl.col(flags).is_null()))
    if bad.height:
        raise DataError(f"{paths['movies']}: {bad.height} movies have genre flags other than 0/1")
    genres = (
        pl.concat_list([pl.when(pl.col(flag) == "1").then(pl.lit(flag)) for flag in flags])
        .list.drop_nulls()
        .list.join("|")
        .alias("genres")
    )
    ratings = _label_from_rating(ratings, paths["ratings"])
    release_year = pl.col("release_date").str.extract(r"(\d{4})$", 1)
    year = pl.coalesce(_year_from_title(pl.col("title")), release_year).alias("year")
    movies = movies.select("movie_id", genres, year)
    return {"all": _join(ratings, users, movies, paths)}


# ---------------------------------------------------------------------------------------------- behaviour histories

HISTORY_COLUMN = "hist_movies"
GENRE_HISTORY_COLUMN = "hist_genres"
GENRE_COLUMN = "genre"
MAX_HISTORY = 50
NO_GENRE = "(no genres listed)"  # MovieLens' own token for a movie without genres (later releases use it)


def add_first_genre(frame: pl.DataFrame) -> pl.DataFrame:
    """Add ``genre``: the movie's first listed genre (the first ``"|"``-separated entry of ``genres``; ML-100K lists
    them in ``u.genre`` order). A movie without genres gets :data:`NO_GENRE`, never ``""``: an empty token would be
    dropped from ``hist_genres`` and shift it against ``hist_movies``."""
    first = pl.col("genres").str.extract(r"^([^|]+)", 1).fill_null(NO_GENRE)
    return frame.with_columns(first.alias(GENRE_COLUMN))


def add_history(
    frame: pl.DataFrame, max_len: int = MAX_HISTORY, items: dict[str, str] | None = None
) -> pl.DataFrame:
    """Add ``hist_movies``: per row, the ``"|"``-joined movie ids the same user rated positively (label ``"1"``)
    strictly before the row's timestamp, oldest first and most recent last, at most ``max_len`` (the most
    recent). Ratings at the same second as the row are not history (their order is unknown). ``""`` when empty.

    ``items`` maps each history column to add to the column whose value it lists (default
    ``{"hist_movies": "movie_id"}``). Every history column takes the same behaviours in the same order, so they are
    aligned position by position: with ``{"hist_genres": "genre", "hist_movies": "movie_id"}``, the j-th entry of
    ``hist_genres`` is the ``genre`` of the j-th movie of ``hist_movies``. Their values must not be ``""`` (nor hold
    ``"|"``), or the joined strings would lose the alignment. Columns are added in the order of ``items``.

    Vectorised: the positives are sorted by (user, time) once; each row's history is the slice of that array that
    ends at ``searchsorted((user, timestamp))`` (left side, so equal timestamps are excluded).
    """
    items = {HISTORY_COLUMN: "movie_id"} if items is None else items
    user = frame.get_column("user_id").rank("dense").cast(pl.Int64).to_numpy() - 1
    time = frame.get_column("timestamp").str.strip_chars().cast(pl.Int64).to_numpy()
    if time.min(initial=0) < 0 or time.max(initial=0) >= 2**32:
        raise DataError("timestamps must be unix seconds in [0, 2^32) to build behaviour histories")
    key = (user << 32) | time
    positive = (frame.get_column("label") == "1").to_numpy()
    pos_index = np.flatnonzero(positive)
    order = pos_index[np.argsort(key[pos_index], kind="stable")]
    pos_key = key[order]
    end = np.searchsorted(pos_key, key, side="left")  # positives of earlier users, or this user strictly earlier
    user_start = np.searchsorted(pos_key, user << 32, side="left")
    start = np.maximum(user_start, end - max_len)
    lengths = end - start
    offsets = np.zeros(len(frame) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = pa.array(np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1]), type=pa.int64())
    list_offsets = pa.array(offsets, type=pa.int32())
    histories = []
    for name, source in items.items():
        column = frame.get_column(source)
        bad = column.is_null() | (column == "") | column.str.contains("|", literal=True)
        if bad.any():
            raise DataError(f"{bad.sum()} rows have an empty, null or '|'-holding {source}: cannot list it in {name}")
        values = pa.compute.take(column.gather(order).to_arrow(), flat)
        lists = pa.ListArray.from_arrays(list_offsets, values)
        histories.append(pl.Series(name, lists).list.join("|"))
    return frame.with_columns(histories)


def add_histories(frame: pl.DataFrame) -> pl.DataFrame:
    """The columns the ``*_seq`` cards add: ``genre`` (:func:`add_first_genre`), then ``hist_genres`` and
    ``hist_movies`` (:func:`add_history`), aligned: ``hist_genres[j]`` is the first genre of ``hist_movies[j]``
    (DIN represents each behaviour by several features, Zhou et al. 2018 §4)."""
    return add_history(add_first_genre(frame), items={GENRE_HISTORY_COLUMN: GENRE_COLUMN, HISTORY_COLUMN: "movie_id"})


def load_ml1m_seq(card: "DatasetCard", data_dir: Path) -> dict[str, pl.DataFrame]:
    """:func:`load_ml1m` plus ``genre``, ``hist_genres`` and ``hist_movies`` (see :func:`add_histories`)."""
    return {"all": add_histories(load_ml1m(card, data_dir)["all"])}


def load_ml100k_seq(card: "DatasetCard", data_dir: Path) -> dict[str, pl.DataFrame]:
    """:func:`load_ml100k` plus ``genre``, ``hist_genres`` and ``hist_movies`` (see :func:`add_histories`)."""
    return {"all": add_histories(load_ml100k(card, data_dir)["all"])}
