"""Dataset cards: every card validates, errors are actionable, and with the real data each card loads with the
documented row and label counts. Fake files used here are made up in ``tmp_path``; no real rows are copied."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import polars as pl
import pytest
from rich.console import Console

import ctrlab_datasets
from ctrlab.datasets.cards import (
    DatasetCard,
    datasets_table,
    file_sha256,
    list_cards,
    load_card,
    resolve_data_dir,
)
from ctrlab.errors import CtrlabError, DataError

CARD_NAMES = ["avazu_sample", "criteo_sample", "frappe_x1", "ml100k", "ml100k_seq", "ml1m", "ml1m_seq"]

# Documented rows and positives per loaded frame (shared datasets README / manifest.json).
EXPECTED = {
    "frappe_x1": {"train": (202_027, 67_604), "valid": (57_722, 19_063), "test": (28_860, 9_536)},
    "criteo_sample": {"all": (10_000, 2_182)},
    "avazu_sample": {"train": (8_087, 1_397), "valid": (480, 86), "test": (432, 80)},
    # MovieLens positives = ratings 4 + 5 from the documented rating counts.
    "ml1m": {"all": (487_650, 170_579 + 108_545)},
    "ml100k": {"all": (100_000, 34_174 + 21_201)},
}
# The behaviour-sequence cards read the same ratings and add a history column.
EXPECTED["ml1m_seq"], EXPECTED["ml100k_seq"] = EXPECTED["ml1m"], EXPECTED["ml100k"]
ML_COLUMNS = ["label", "user_id", "movie_id", "timestamp", "gender", "age", "occupation", "zip", "genres", "year"]


def _render(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def _write_gz(path: Path, text: str, encoding: str = "utf-8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as handle:
        handle.write(text.encode(encoding))


# ---------------------------------------------------------------------------------------------- cards themselves


def test_every_card_validates() -> None:
    cards = list_cards()
    assert [c.name for c in cards] == CARD_NAMES
    for card in cards:
        assert card.title and card.description and card.terms
        assert card.source_url.startswith("https://github.com/")
        assert not card.features.is_empty
        assert card.label not in card.features.columns()
        for role, spec in card.files.items():
            assert spec.sha256 is not None and len(spec.sha256) == 64, (card.name, role)
            assert spec.rows is not None and spec.rows > 0, (card.name, role)
            assert not Path(spec.path).is_absolute()
        if card.loader:
            module, function = card.loader.split(":")
            assert callable(getattr(__import__(f"ctrlab_datasets.{module}", fromlist=[function]), function))


def test_card_files_live_in_the_package_folder() -> None:
    yamls = sorted(p.stem for p in Path(ctrlab_datasets.CARDS_DIR).glob("*.yaml"))
    assert yamls == CARD_NAMES
    # No data files in the package: only cards, loaders and the README.
    allowed = {".yaml", ".py", ".md", ".pyc"}
    stray = [p for p in Path(ctrlab_datasets.CARDS_DIR).rglob("*") if p.is_file() and p.suffix not in allowed]
    assert stray == []


def test_card_descriptions_mention_caveats() -> None:
    assert "PARTIAL" in load_card("ml1m").description.upper()
    assert "re-sampled" in load_card("frappe_x1").description


def test_unknown_card_names_it_lists_known_and_suggests() -> None:
    with pytest.raises(CtrlabError) as info:
        load_card("frape_x1")
    message = info.value.message
    assert message.startswith("unknown dataset card 'frape_x1'; known: avazu_sample, criteo_sample, frappe_x1")
    assert message.endswith("did you mean 'frappe_x1'?")
    assert "\n" not in message
    with pytest.raises(CtrlabError) as info:
        load_card("zzzzzz")
    assert "did you mean" not in info.value.message


def test_invalid_card_is_rejected() -> None:
    base = load_card("frappe_x1").model_dump()
    with pytest.raises(ValueError, match="train, valid and test"):
        DatasetCard.model_validate({**base, "files": {"train": base["files"]["train"]}})
    with pytest.raises(ValueError, match="extra"):
        DatasetCard.model_validate({**base, "colour": "red"})
    with pytest.raises(ValueError, match="no header"):
        DatasetCard.model_validate({**base, "files": {**base["files"], "test": {"path": "x.csv", "header": False}}})
    with pytest.raises(ValueError, match="sha256"):
        DatasetCard.model_validate({**base, "files": {**base["files"], "test": {"path": "x.csv", "sha256": "abc"}}})


def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CTRLAB_DATA_DIR", raising=False)
    assert resolve_data_dir(None) is None
    monkeypatch.setenv("CTRLAB_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_dir(str(tmp_path)) == tmp_path


def test_file_sha256_memoised_and_refreshed(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 3_000_000)  # > 2 chunks
    assert file_sha256(path) == hashlib.sha256(b"a" * 3_000_000).hexdigest()
    path.write_bytes(b"b" * 10)
    assert file_sha256(path) == hashlib.sha256(b"b" * 10).hexdigest()


# ---------------------------------------------------------------------------------------------- errors without data


def test_missing_data_dir_names_the_file(tmp_path: Path) -> None:
    card = load_card("frappe_x1")
    with pytest.raises(DataError) as info:
        card.load(tmp_path / "nowhere")
    message = info.value.message
    assert message == (
        f"{tmp_path / 'nowhere' / 'frappe/x1/train.csv.gz'}: data file not found "
        "(dataset card 'frappe_x1'; set CTRLAB_DATA_DIR or --data-dir)"
    )
    with pytest.raises(DataError, match="needs a data directory; set CTRLAB_DATA_DIR or --data-dir"):
        card.load(None)


def test_status_and_table_without_data(tmp_path: Path) -> None:
    card = load_card("avazu_sample")
    status = card.status(None)
    assert not status.available and len(status.missing) == 3
    assert status.rows == {"train": 8087, "valid": 480, "test": 432}
    status = card.status(tmp_path)
    assert not status.available and status.missing == [f.path for f in card.files.values()]
    text = _render(datasets_table(None))
    for name in CARD_NAMES:
        assert name in text
    assert "no (no data dir)" in text and "202,027" in text and "random 0.8/0.1/0.1 (seed 2021)" in text


def test_tampered_file_fails_verification(tmp_path: Path) -> None:
    """A made-up file at the criteo card's path: wrong sha256 is an error naming it; verify=False reads it."""
    card = load_card("criteo_sample")
    path = tmp_path / card.files["all"].path
    rows = []
    for i in range(20):
        ints = [str(i * k) if (i + k) % 5 else "" for k in range(13)]
        cats = [f"{(i * 7919 + k) % 97:08x}" if (i + k) % 7 else "" for k in range(26)]
        rows.append("\t".join([str(i % 2), *ints, *cats]))
    _write_gz(path, "\n".join(rows) + "\n")
    with pytest.raises(DataError) as info:
        card.load(tmp_path)
    assert info.value.message.startswith(f"{path}: sha256 mismatch (dataset card 'criteo_sample'")
    frames = card.load(tmp_path, verify=False)
    assert list(frames) == ["all"]
    assert frames["all"].height == 20 and frames["all"].width == 40
    assert sorted(frames["all"]["label"].unique().to_list()) == ["0", "1"]
    status = card.status(tmp_path)
    assert status.available and status.missing == []
    assert "yes" in _render(datasets_table(tmp_path))


def test_label_map_and_bad_labels(tmp_path: Path) -> None:
    card = DatasetCard.model_validate(
        {
            "name": "toy",
            "title": "toy",
            "description": "made up",
            "source_url": "https://github.com/example/toy",
            "terms": "none",
            "label": "y",
            "label_map": {"-1": "0"},
            "files": {"all": {"path": "toy.csv"}},
            "features": {"categorical": ["a"]},
            "split": {"kind": "random", "seed": 1},
        }
    )
    (tmp_path / "toy.csv").write_text("y,a\n1,x\n-1,y\n-1,z\n")
    frame = card.load(tmp_path)["all"]
    assert frame["y"].to_list() == ["1", "0", "0"]
    (tmp_path / "toy.csv").write_text("y,a\n1,x\n2,y\n-1,z\n")
    with pytest.raises(DataError, match=r"1 rows have a label outside 0/1 in column 'y' \(e.g. '2'\)"):
        card.load(tmp_path)
    (tmp_path / "toy.csv").write_text("y,b\n1,x\n")
    with pytest.raises(DataError, match="columns a named by dataset card 'toy' are not in the data"):
        card.load(tmp_path)


def test_movielens_loaders_on_made_up_files(tmp_path: Path) -> None:
    """Joins, latin-1 titles, labels from ratings and no rating column, on tiny invented files."""
    ml1m = load_card("ml1m")
    files = {role: tmp_path / spec.path for role, spec in ml1m.files.items()}
    _write_gz(files["ratings"], "1::10::5::978300760\n1::11::3::978300761\n2::10::4::1000000000\n")
    _write_gz(files["users"], "1::F::1::10::48067\n2::M::56::16::70072\n")
    _write_gz(files["movies"], "10::Caf\xe9 Test (1999)::Comedy|Drama\n11::Another::Horror\n", encoding="latin-1")
    frame = ml1m.load(tmp_path, verify=False)["all"]
    assert frame.columns == ML_COLUMNS
    assert frame["label"].to_list() == ["1", "0", "1"]
    assert frame["genres"].to_list() == ["Comedy|Drama", "Horror", "Comedy|Drama"]
    assert frame["year"].to_list() == ["1999", None, "1999"]
    assert frame["gender"].to_list() == ["F", "F", "M"]
    assert all(dtype == pl.String for dtype in frame.dtypes)
    _write_gz(files["ratings"], "1::10::5::978300760\n3::10::4::978300761\n")
    with pytest.raises(DataError, match="1 ratings name a user_id missing from"):
        ml1m.load(tmp_path, verify=False)

    ml100k = load_card("ml100k")
    files = {role: tmp_path / spec.path for role, spec in ml100k.files.items()}
    genres = ml100k.files["movies"].columns[5:]
    _write_gz(files["genres"], "".join(f"{g}|{i}\n" for i, g in enumerate(genres)) + "\n")
    _write_gz(files["ratings"], "1\t7\t2\t881250949\n1\t8\t4\t881250950\n")
    _write_gz(files["users"], "1|24|M|technician|85711\n")
    flags7 = ["0"] * 19
    flags7[1] = flags7[16] = "1"
    flags8 = ["0"] * 19
    items = f"7|Fake Film (1995)|01-Jan-1995||http://x|{'|'.join(flags7)}\n"
    items += f"8|Caf\xe9|01-Jan-1990||http://y|{'|'.join(flags8)}\n"
    _write_gz(files["movies"], items, encoding="latin-1")
    frame = ml100k.load(tmp_path, verify=False)["all"]
    assert frame.columns == ML_COLUMNS
    assert frame["label"].to_list() == ["0", "1"]
    assert frame["genres"].to_list() == ["Action|Thriller", ""]
    assert frame["year"].to_list() == ["1995", "1990"]


# ---------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def manifest(shared_data_dir: Path) -> dict[str, dict]:
    data = json.loads((shared_data_dir / "manifest.json").read_text())
    return {entry["path"].removeprefix("datasets/"): entry for entry in data["files"]}


@pytest.mark.parametrize("name", CARD_NAMES)
def test_card_matches_manifest(name: str, manifest: dict[str, dict]) -> None:
    for spec in load_card(name).files.values():
        entry = manifest[spec.path]
        assert spec.sha256 == entry["stored_sha256"], spec.path
        assert spec.rows == entry["rows"], spec.path


@pytest.mark.parametrize("name", CARD_NAMES)
def test_card_loads_real_data(name: str, shared_data_dir: Path) -> None:
    card = load_card(name)
    status = card.status(shared_data_dir)
    assert status.available, status.missing
    card.verify(shared_data_dir)
    frames = card.load(shared_data_dir)
    assert list(frames) == list(EXPECTED[name])
    for role, (rows, positives) in EXPECTED[name].items():
        frame = frames[role]
        assert frame.height == rows, role
        labels = frame[card.label].value_counts()
        assert set(labels[card.label].to_list()) <= {"0", "1"}
        assert int((frame[card.label] == "1").sum()) == positives, role
        for column in card.features.columns():
            assert column in frame.columns
        if card.group_by:
            assert frame[card.group_by].null_count() == 0
    if card.loader is None and card.split.kind == "given":
        for role, frame in frames.items():
            assert frame.height == card.files[role].rows
    for column in card.drop_columns:
        assert all(column not in frame.columns for frame in frames.values())


def test_movielens_frames_have_no_rating(shared_data_dir: Path) -> None:
    for name in ("ml1m", "ml100k"):
        frame = load_card(name).load(shared_data_dir)["all"]
        assert frame.columns == ML_COLUMNS
        assert "rating" not in frame.columns
        assert frame.null_count().drop("year").sum_horizontal()[0] == 0
        assert frame["genres"].str.split("|").list.len().max() <= 6
        assert frame["timestamp"].cast(pl.Int64).min() > 800_000_000


def test_table_with_real_data(shared_data_dir: Path) -> None:
    text = _render(datasets_table(shared_data_dir))
    assert text.count(" yes ") == len(CARD_NAMES)
