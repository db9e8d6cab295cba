"""Output folders: a folder ctrlab did not make is never touched, a run of another recipe is replaced only with
--overwrite, bad locations are refused before any work, and leftovers of killed runs are cleaned up by the next run.

Each refusal is checked through the CLI: exit status 2, one stderr line naming the key and the folder, the folder's
contents byte for byte unchanged, nothing created beside it, and no data work done (the cache stays empty)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ctrlab.cli import main
from ctrlab.utils.io import atomic_directory, remove_stale, writer_stamp
from ctrlab.utils.output_dir import MARKER_FILE
from tiny import tiny_recipe, write_tiny_splits

ANSI = re.compile(r"\x1b\[[0-9;]*m")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return write_tiny_splits(tmp_path / "data")


def _recipe(tmp_path: Path, data_dir: Path, output: Path | str, **sections: Any) -> Path:
    recipe = tiny_recipe(tmp_path, data_dir, tracking={"enabled": False}, **sections)
    recipe["output_dir"] = str(output)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, ANSI.sub("", capsys.readouterr().err)


def _refused(code: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert code == 2 and lines[0].startswith("error: "), (code, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (and beside it) with a digest of its bytes."""
    out = {}
    for path in sorted(folder.parent.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(folder.parent))] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[str(path.relative_to(folder.parent))] = "dir"
    return out


def test_a_folder_ctrlab_did_not_make_is_never_touched(capsys, tmp_path, data_dir, cache_dir) -> None:
    mine = tmp_path / "work" / "thesis"
    (mine / "chapters").mkdir(parents=True)
    (mine / "notes.txt").write_text("three years of work", encoding="utf-8")
    (mine / "chapters" / "one.tex").write_text("\\chapter{One}", encoding="utf-8")
    before = _snapshot(mine)
    recipe = _recipe(tmp_path, data_dir, mine)
    for extra in ([], ["--overwrite"]):  # --overwrite replaces runs, never a folder ctrlab did not make
        line = _refused(*_cli(capsys, "train", recipe, *extra), "output_dir", str(mine), "not made by ctrlab",
                        "notes.txt")
        assert "choose another location" in line
    assert _snapshot(mine) == before
    assert not cache_dir.exists(), "the refusal came after data work"


@pytest.mark.parametrize("where", ["cwd", "dotdot_name", "parent", "file", "under_a_file"])
def test_bad_locations_are_refused_before_any_work(capsys, tmp_path, data_dir, cache_dir, monkeypatch, where) -> None:
    work = tmp_path / "project"
    (work / "sub").mkdir(parents=True)
    (work / "recipe-notes.md").write_text("keep me", encoding="utf-8")
    monkeypatch.chdir(work / "sub")
    overrides: list[str] = []
    output: Path | str = "runs/x"
    if where == "cwd":
        output = "."
    elif where == "dotdot_name":
        output = "runs/.."  # what name=.. made of runs/${name} before names had to start with a letter or digit
    elif where == "parent":
        output = ".."
    elif where == "file":
        output = work / "recipe-notes.md"
    else:
        output = work / "recipe-notes.md" / "run"
    recipe = _recipe(tmp_path, data_dir, output)
    before = _snapshot(work)
    code, err = _cli(capsys, "train", recipe, *overrides)
    needle = {"cwd": "working directory", "dotdot_name": "working directory", "parent": "working directory",
              "file": "not a folder", "under_a_file": "is a file"}[where]
    _refused(code, err, "output_dir", needle)
    assert _snapshot(work) == before
    assert not cache_dir.exists()


def test_rerun_of_the_same_recipe_replaces_its_run_and_keeps_what_others_wrote(capsys, tmp_path, data_dir,
                                                                               cache_dir) -> None:
    out = tmp_path / "runs" / "t"
    recipe = _recipe(tmp_path, data_dir, out)
    assert _cli(capsys, "train", recipe)[0] == 0
    first = json.loads((out / "metrics.json").read_text())
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["entries"]["train"]["recipe"] == "t"
    # A ranking written into the run's folder by `ctrlab rank` (its own marked folder) must survive reruns.
    ranking = out / "ranking"
    ranking.mkdir()
    (ranking / MARKER_FILE).write_text(json.dumps({"entries": {"rank": {}}}), encoding="utf-8")
    (ranking / "ranking.csv").write_text("feature,rank\na,1\n", encoding="utf-8")
    (out / "attention.png").write_bytes(b"\x89PNG\r\n\x1a\nold model")  # a picture of the old model: replaced

    code, err = _cli(capsys, "train", recipe)
    assert code == 0, err
    assert (ranking / "ranking.csv").read_text() == "feature,rank\na,1\n"
    assert not (out / "attention.png").exists()
    assert json.loads((out / "metrics.json").read_text())["test"] == first["test"]

    line = _refused(*_cli(capsys, "train", recipe, "train.epochs=2"), "output_dir", "another recipe", "--overwrite")
    assert str(out) in line
    code, err = _cli(capsys, "train", recipe, "train.epochs=2", "--overwrite")
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 2
    assert (ranking / "ranking.csv").exists()
    assert [p.name for p in out.parent.iterdir()] == ["t"], "leftovers beside the run"


def test_a_users_folder_that_looks_like_a_run_is_not_replaced_even_with_overwrite(capsys, tmp_path, data_dir,
                                                                                  cache_dir) -> None:
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "recipe.yaml").write_text("mine", encoding="utf-8")
    (mine / "metrics.json").write_text('{"mine": 1}', encoding="utf-8")
    (mine / "keep.txt").write_text("keep", encoding="utf-8")
    before = _snapshot(mine)
    recipe = _recipe(tmp_path, data_dir, mine)
    before = _snapshot(mine)
    _refused(*_cli(capsys, "train", recipe, "--overwrite"), "not made by ctrlab", "keep.txt")
    assert _snapshot(mine) == before


def test_an_unmarked_earlier_run_needs_overwrite_and_a_folder_of_runs_is_refused(capsys, tmp_path, data_dir,
                                                                                 cache_dir) -> None:
    out = tmp_path / "runs" / "t"
    recipe = _recipe(tmp_path, data_dir, out)
    assert _cli(capsys, "train", recipe)[0] == 0
    (out / MARKER_FILE).unlink()  # as written by ctrlab before folders were marked
    _refused(*_cli(capsys, "train", recipe), "holds an earlier ctrlab run", "--overwrite")
    assert _cli(capsys, "train", recipe, "--overwrite")[0] == 0
    _refused(*_cli(capsys, "train", recipe, f"output_dir={out.parent}"), "holds other ctrlab runs", "'t'")


def test_rank_sweep_and_explain_refuse_what_ctrlab_did_not_make(capsys, tmp_path, data_dir, cache_dir) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("precious", encoding="utf-8")
    space = {"embedding.dim": {"type": "int", "low": 2, "high": 4}}
    sweep = _recipe(tmp_path, data_dir, mine, sweep={"n_trials": 1, "space": space})
    before = _snapshot(mine)
    _refused(*_cli(capsys, "rank", data_dir / "train.csv", "--output", mine, "--no-track"), "--output",
             "not made by ctrlab")
    _refused(*_cli(capsys, "sweep", sweep), "output_dir", "not made by ctrlab")
    _refused(*_cli(capsys, "explain", tmp_path / "no-run", "--output", mine / "data.csv"), "--output", ".png")
    picture = mine / "data.png"
    picture.write_text("not a picture", encoding="utf-8")
    _refused(*_cli(capsys, "explain", tmp_path / "no-run", "--output", picture), "not a PNG")
    picture.unlink()
    assert _snapshot(mine) == before


def test_a_folder_being_written_by_a_live_process_is_refused(capsys, tmp_path, data_dir, cache_dir) -> None:
    out = tmp_path / "runs" / "t"
    out.parent.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = int(Path(f"/proc/{other.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19]) \
            if Path(f"/proc/{other.pid}/stat").exists() else 0
        busy = out.parent / f".t.p{other.pid}-{start}.abcd1234.partial"
        busy.mkdir()
        _refused(*_cli(capsys, "train", _recipe(tmp_path, data_dir, out)), "another ctrlab process")
        assert busy.exists()
    finally:
        other.kill()
        other.wait()
    # Once its writer is gone the same folder is a leftover, removed by the next run.
    assert _cli(capsys, "train", _recipe(tmp_path, data_dir, out))[0] == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["t"]


def test_kill_9_leftovers_are_removed_by_the_next_run(tmp_path, data_dir, cache_dir) -> None:
    """A real ``kill -9`` in the middle of training leaves ``.t.*.partial`` beside the output; the next run of the
    same output removes it (and completes), and never touches a leftover of another output name."""
    out = tmp_path / "runs" / "t"
    recipe = _recipe(tmp_path, data_dir, out, train={"epochs": 200, "batch_size": 8, "progress": False,
                                                     "device": "cpu", "early_stopping": None})
    env = {**os.environ, "CTRLAB_CACHE_DIR": str(cache_dir)}
    process = subprocess.Popen([sys.executable, "-m", "ctrlab", "train", str(recipe)], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(".t.*.partial")):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.stderr else ""
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    left = list(out.parent.glob(".t.*.partial"))
    assert left and not out.exists()
    unrelated = out.parent / ".t2.p1-1.zzzz1111.partial"  # another output's leftover (pid 1 is alive anyway)
    unrelated.mkdir()
    done = subprocess.run([sys.executable, "-m", "ctrlab", "train", str(recipe), "train.epochs=1"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == [".t2.p1-1.zzzz1111.partial", "t"]


def test_a_swap_cut_short_is_finished_by_the_next_writer(tmp_path) -> None:
    """Crash points of the directory swap: after the old folder was moved aside but before the new one arrived
    (the old one is restored), and after the new one arrived but before carried entries moved (they are moved)."""
    target = tmp_path / "run"
    target.mkdir()
    (target / "metrics.json").write_text("old", encoding="utf-8")
    (target / "ranking").mkdir()
    (target / "ranking" / "ranking.csv").write_text("kept", encoding="utf-8")
    dead = "p999999999-1"  # no such process
    old = tmp_path / f".run.{dead}.abcd1234.old"
    old.mkdir()
    (old / "carry.json").write_text(json.dumps(["ranking"]), encoding="utf-8")
    os.replace(target, old / "previous")
    remove_stale(tmp_path, "run")  # crash point 1: the target is missing
    assert (target / "metrics.json").read_text() == "old" and (target / "ranking" / "ranking.csv").exists()
    assert not old.exists()

    old.mkdir()
    (old / "carry.json").write_text(json.dumps(["ranking"]), encoding="utf-8")
    os.replace(target, old / "previous")
    target.mkdir()
    (target / "metrics.json").write_text("new", encoding="utf-8")
    remove_stale(tmp_path, "run")  # crash point 2: the new run is in place, the ranking is not yet
    assert (target / "metrics.json").read_text() == "new"
    assert (target / "ranking" / "ranking.csv").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failed_build_removes_the_parents_it_created(tmp_path) -> None:
    target = tmp_path / "a" / "b" / "run"
    with pytest.raises(RuntimeError), atomic_directory(target):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    assert writer_stamp().startswith(f"p{os.getpid()}-")


def test_a_full_output_disk_is_one_line_and_leaves_nothing(tmp_path, data_dir, cache_dir) -> None:
    """A real full disk (a 192 KiB tmpfs) under the output: exit 1, one line naming the file and the reason, and
    nothing left on the small disk."""
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); needs root")
    try:
        recipe = _recipe(tmp_path, data_dir, disk / "run", embedding={"dim": 64},
                         model={"block": "deepfm", "mlp": {"hidden": [512, 512]}})
        done = subprocess.run([sys.executable, "-m", "ctrlab", "train", str(recipe)], cwd=tmp_path,
                              env={**os.environ, "CTRLAB_CACHE_DIR": str(cache_dir)}, capture_output=True, text=True,
                              timeout=300)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr and lines[-1].startswith("error: "), done.stderr
        assert "No space left on device" in lines[-1] and str(disk) in lines[-1], lines[-1]
        assert sum(1 for line in lines if line.startswith("error")) == 1
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)
