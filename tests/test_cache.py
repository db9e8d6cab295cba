"""The encoded-split cache through ``ctrlab train``: entries are verified against their manifest, a damaged one is
rebuilt with a one-line warning naming it, and a cache that cannot be written (or read) never fails the run.

Most cases run ``ctrlab.cli.main`` in-process; the file-size-limit case runs a real ``python -m ctrlab`` process.
The data is tiny and made up in ``tmp_path``; each run trains one small epoch.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ctrlab.cli import main
from ctrlab.data import cache as cache_module
from ctrlab.data.cache import MANIFEST, verify_entry
from tiny import tiny_recipe, tiny_rows, write_csv, write_tiny_splits

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LEFTOVER_SUFFIXES = (".partial", ".tmp", ".old")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return write_tiny_splits(tmp_path / "data")


def _recipe_file(tmp_path: Path, data_dir: Path, name: str = "recipe.yaml", **sections: Any) -> Path:
    recipe = tiny_recipe(tmp_path, data_dir, tracking={"enabled": False}, **sections)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def _train(capsys: pytest.CaptureFixture[str], recipe: Path, output_dir: Path, *overrides: str) -> tuple[dict, str]:
    """One in-process ``ctrlab train``; asserts exit 0 and no traceback, returns (stdout JSON, stderr)."""
    code = main(["train", str(recipe), f"output_dir={output_dir}", *overrides])
    captured = capsys.readouterr()
    err = ANSI.sub("", captured.err)
    assert code == 0, err
    assert "Traceback" not in err, err
    assert (output_dir / "metrics.json").exists()
    return json.loads(ANSI.sub("", captured.out)), err


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning")]


def _entries(root: Path) -> list[Path]:
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _assert_no_leftovers(root: Path) -> None:
    """No temporary file or folder anywhere in the cache, and every entry finished (has its manifest)."""
    if not root.exists():
        return
    partial = [str(p) for p in root.rglob("*") if p.name.endswith(LEFTOVER_SUFFIXES)]
    assert not partial, f"half-written cache files: {partial}"
    for entry in _entries(root):
        assert (entry / MANIFEST).exists(), f"cache entry {entry} is unfinished"


def _verifies(entry: Path, manifest: dict[str, Any]) -> None:
    """The entry passes the same verification a cache hit does."""
    verify_entry(entry, entry.name, manifest["payload"])


# ------------------------------------------------------------------------------------------------ hit and miss
def test_first_run_fills_the_cache_and_the_second_is_served_from_it(capsys, tmp_path, data_dir, cache_dir) -> None:
    recipe = _recipe_file(tmp_path, data_dir)
    first, err = _train(capsys, recipe, tmp_path / "run1")
    assert "from cache" not in err and not _warnings(err), err
    [entry] = _entries(cache_dir)
    manifest = json.loads((entry / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["processor.json", "test.parquet", "train.parquet", "valid.parquet"]
    for name, record in manifest["files"].items():
        assert (entry / name).stat().st_size == record["bytes"]
    assert manifest["rows"] == {"train": 200, "valid": 60, "test": 60}
    _verifies(entry, manifest)

    second, err = _train(capsys, recipe, tmp_path / "run2")
    assert f"data: encoded splits from cache {entry}" in err.splitlines(), err
    assert not _warnings(err), err
    assert second["test"] == first["test"]
    _assert_no_leftovers(cache_dir)


# ------------------------------------------------------------------------------------------------ damaged entries
def _truncate(entry: Path) -> str:
    path = entry / "train.parquet"
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    return rf"\(train\.parquet: {size // 2:,} bytes, manifest says {size:,}\)"


def _flip_bytes(entry: Path) -> str:
    path = entry / "train.parquet"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))  # same size: only the checksum can tell
    return r"\(train\.parquet: checksum differs from the manifest's"


def _delete(entry: Path) -> str:
    (entry / "valid.parquet").unlink()
    return r"\(valid\.parquet is missing\)"


def _corrupt_manifest(entry: Path) -> str:
    path = entry / MANIFEST
    path.write_text(path.read_text()[:40], encoding="utf-8")
    return r"\(manifest\.json is not valid JSON: "


def _drop_manifest(entry: Path) -> str:
    (entry / MANIFEST).unlink()
    return r"\(manifest\.json is missing\)"


def _replace_processor(entry: Path) -> str:
    # Size kept and manifest left alone: what a stray overwrite by another tool would look like.
    path = entry / "processor.json"
    path.write_bytes(b" " * path.stat().st_size)
    return r"\(processor\.json: checksum differs"


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes, _delete, _corrupt_manifest, _drop_manifest,
                                    _replace_processor])
def test_a_damaged_entry_is_named_in_one_warning_and_rebuilt(capsys, tmp_path, data_dir, cache_dir, damage) -> None:
    recipe = _recipe_file(tmp_path, data_dir)
    first, _ = _train(capsys, recipe, tmp_path / "run1")
    [entry] = _entries(cache_dir)
    manifest = json.loads((entry / MANIFEST).read_text())
    reason = damage(entry)

    second, err = _train(capsys, recipe, tmp_path / "run2")
    warnings = _warnings(err)
    assert len(warnings) == 1, err
    assert re.fullmatch(rf"warning: cache entry {re.escape(str(entry))} is damaged {reason}.*; rebuilding it",
                        warnings[0]), warnings[0]
    assert "from cache" not in err
    assert second["test"] == first["test"]
    assert _entries(cache_dir) == [entry]
    assert json.loads((entry / MANIFEST).read_text())["files"] == manifest["files"]  # rebuilt byte for byte
    _verifies(entry, manifest)
    _assert_no_leftovers(cache_dir)

    third, err = _train(capsys, recipe, tmp_path / "run3")
    assert "from cache" in err and not _warnings(err), err


def test_an_entry_of_other_features_under_this_key_is_never_served(capsys, tmp_path, data_dir, cache_dir) -> None:
    """Keys differ when features differ (tests/test_pipeline.py); here an entry of recipe A sits under recipe B's key
    (copied or renamed by hand): its manifest's key inputs give it away."""
    recipe_a = _recipe_file(tmp_path, data_dir, "a.yaml")
    recipe_b = _recipe_file(tmp_path, data_dir, "b.yaml", features={"categorical": ["a"], "numeric": ["x"]})
    _train(capsys, recipe_a, tmp_path / "a1")
    [entry_a] = _entries(cache_dir)
    first_b, _ = _train(capsys, recipe_b, tmp_path / "b1")
    [entry_b] = [e for e in _entries(cache_dir) if e != entry_a]
    manifest_b = json.loads((entry_b / MANIFEST).read_text())
    shutil.rmtree(entry_b)
    shutil.copytree(entry_a, entry_b)

    second_b, err = _train(capsys, recipe_b, tmp_path / "b2")
    [warning] = _warnings(err)
    assert warning.startswith(f"warning: cache entry {entry_b} is damaged (manifest.json describes other data or "
                              "features"), warning
    assert warning.endswith("; rebuilding it")
    assert second_b["test"] == first_b["test"]
    _verifies(entry_b, manifest_b)
    categorical = json.loads((entry_b / MANIFEST).read_text())["payload"]["features"]["categorical"]
    assert [c["name"] for c in categorical] == ["a"]


# ---------------------------------------------------------------------------------------- cache cannot be used
def _run_is_complete(output: dict, output_dir: Path, reference: dict | None = None) -> None:
    assert Path(output["output_dir"]) == output_dir
    assert {"metrics.json", "recipe.yaml"} <= {p.name for p in output_dir.iterdir()}
    if reference is not None:
        assert output["test"] == reference["test"]


@pytest.mark.parametrize("below", [True, False], ids=["under-a-file", "is-a-file"])
def test_cache_dir_through_a_regular_file_warns_and_the_run_goes_on(capsys, tmp_path, data_dir, cache_dir,
                                                                    below) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file, not a directory\n")
    where = blocker / "cache" if below else blocker
    recipe = _recipe_file(tmp_path, data_dir)
    reference, _ = _train(capsys, recipe, tmp_path / "reference", "dataset.cache=false")

    output, err = _train(capsys, recipe, tmp_path / "run", f"dataset.cache_dir={where}")
    [warning] = _warnings(err)
    assert warning.startswith(f"warning: cache: cannot write {where}/"), warning
    assert warning.endswith(f": {blocker} is a file, not a directory; continuing without the cache"), warning
    _run_is_complete(output, tmp_path / "run", reference)
    assert blocker.read_text() == "a file, not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "not_a_dir", "recipe.yaml", "reference", "run"]
    assert not cache_dir.exists()


def _bigger_splits(path: Path) -> Path:
    """Splits whose encoded train parquet is well over 64 KiB (a small model still fits anywhere)."""
    for name, n, seed in (("train", 20000, 1), ("valid", 200, 2), ("test", 200, 3)):
        write_csv(path / f"{name}.csv", tiny_rows(n, seed))
    return path


@pytest.fixture()
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a real file system that runs out of space. Skips where mounting is not permitted (not root,
    no CAP_SYS_ADMIN); the file-size-limit test below covers the same path everywhere."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("tmpfs needs Linux and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_a_full_cache_disk_warns_and_leaves_nothing_behind(capsys, tmp_path, cache_dir, full_disk) -> None:
    data_dir = _bigger_splits(tmp_path / "data")
    recipe = _recipe_file(tmp_path, data_dir)
    reference, _ = _train(capsys, recipe, tmp_path / "reference", "dataset.cache=false")

    output, err = _train(capsys, recipe, tmp_path / "run", f"dataset.cache_dir={full_disk}")
    [warning] = _warnings(err)
    assert warning.startswith(f"warning: cache: cannot write {full_disk}/"), warning
    assert warning.endswith(": No space left on device; continuing without the cache"), warning
    _run_is_complete(output, tmp_path / "run", reference)
    assert list(full_disk.iterdir()) == []  # not even an unfinished entry


def test_a_file_size_limit_in_a_real_process_warns_and_the_run_goes_on(tmp_path, cache_dir) -> None:
    """``python -m ctrlab train`` under RLIMIT_FSIZE: the cache's train parquet cannot be written (EFBIG; Python
    ignores SIGXFSZ) while the run's own small files still fit."""
    data_dir = _bigger_splits(tmp_path / "data")
    recipe = _recipe_file(tmp_path, data_dir)
    limit = 48 * 1024

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "CTRLAB_CACHE_DIR": str(cache_dir), "NO_COLOR": "1", "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", "ctrlab", "train", str(recipe)], env=env, cwd=REPO, text=True,
                          capture_output=True, preexec_fn=limit_file_size, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    [warning] = _warnings(done.stderr)
    assert warning.startswith(f"warning: cache: cannot write {cache_dir}/"), warning
    assert warning.endswith(": File too large; continuing without the cache"), warning
    output_dir = tmp_path / "out"
    _run_is_complete(json.loads(done.stdout), output_dir)
    assert all(p.stat().st_size < limit for p in output_dir.rglob("*"))  # the limit did not cut an output short
    _assert_no_leftovers(cache_dir)
    assert _entries(cache_dir) == []


def test_an_unreadable_entry_warns_and_is_encoded_again(capsys, tmp_path, data_dir, cache_dir,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A read refused by the file system (permissions; simulated, as root reads everything) is not damage: the
    warning says it could not read, and the run encodes the data itself."""
    recipe = _recipe_file(tmp_path, data_dir)
    first, _ = _train(capsys, recipe, tmp_path / "run1")
    [entry] = _entries(cache_dir)

    def refuse(path: Path) -> str:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    with monkeypatch.context() as patch:
        patch.setattr(cache_module, "file_checksum", refuse)
        patch.setattr(cache_module, "write_entry", lambda *args: refuse(entry / "processor.json"))
        second, err = _train(capsys, recipe, tmp_path / "run2")
    lines = _warnings(err)
    assert lines == [f"warning: cache: cannot read {entry}/processor.json: Permission denied; encoding the data again",
                     f"warning: cache: cannot write {entry}: Permission denied; continuing without the cache"], err
    assert second["test"] == first["test"]
    assert (entry / MANIFEST).exists()  # not damaged, so kept

    _, err = _train(capsys, recipe, tmp_path / "run3")
    assert "from cache" in err and not _warnings(err), err
