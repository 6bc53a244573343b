"""Durable writes: the order of the system calls that makes a write survive a power cut, checked on the real
calls (recording wrappers around os.fsync / os.replace / os.rename that call through), for the durable module and
the places that write state the project acknowledges; and a writer SIGKILLed between rename and directory fsync."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from iteration_helpers import TINY

from irevla_ros import durable
from irevla_ros.train.checkpoint import Checkpointer
from irevla_ros.train.iteration import IterationRecord


@dataclass(frozen=True)
class Call:
    op: str  # "fsync", "replace", "rename"
    path: str  # fsync: the fd's path; rename/replace: the destination
    source: str = ""  # rename/replace: the source
    is_dir: bool = False
    size: int = 0  # fsync of a file: its size at that moment (so the write came before it)


class Recorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[Call] = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            path = os.readlink(f"/proc/self/fd/{fd}")
            self.calls.append(Call("fsync", path, is_dir=stat.S_ISDIR(st.st_mode), size=st.st_size))
            real_fsync(fd)

        def replace(src: object, dst: object, *args: object, **kwargs: object) -> None:
            self.calls.append(Call("replace", os.path.abspath(dst), os.path.abspath(src)))  # type: ignore[arg-type]
            real_replace(src, dst, *args, **kwargs)  # type: ignore[arg-type]

        def rename(src: object, dst: object, *args: object, **kwargs: object) -> None:
            self.calls.append(Call("rename", os.path.abspath(dst), os.path.abspath(src)))  # type: ignore[arg-type]
            real_rename(src, dst, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)

    def check_file(self, final: Path) -> None:
        """write -> fsync(temp, at its final size) -> rename(temp, final) -> fsync(final's directory)."""
        final = final.resolve()
        renames = [
            i for i, c in enumerate(self.calls) if c.op in ("replace", "rename") and c.path == str(final)
        ]
        assert renames, f"{final} was never renamed into place: {self.calls}"
        at = renames[-1]
        temp = self.calls[at].source
        assert Path(temp).parent == final.parent, "the temp file must be in the final directory"
        synced = [c for c in self.calls[:at] if c.op == "fsync" and c.path == temp]
        assert synced, f"temp file {temp} was not fsync'd before its rename: {self.calls}"
        assert synced[-1].size == final.stat().st_size, "fsync came before the whole content was written"
        after = [c for c in self.calls[at + 1 :] if c.op == "fsync" and c.is_dir]
        assert any(c.path == str(final.parent) for c in after), (
            f"directory {final.parent} not fsync'd after the rename of {final.name}: {self.calls[at:]}"
        )

    def check_dir(self, final: Path) -> None:
        """Every file and folder of a published folder fsync'd before its rename, the parent after it."""
        final = final.resolve()
        at = next(i for i, c in enumerate(self.calls) if c.op == "rename" and c.path == str(final))
        temp = Path(self.calls[at].source)
        synced = {c.path for c in self.calls[:at] if c.op == "fsync"}
        for path in final.rglob("*"):
            assert str(temp / path.relative_to(final)) in synced, f"{path} was not fsync'd before the rename"
        assert str(temp) in synced
        assert any(c.op == "fsync" and c.path == str(final.parent) for c in self.calls[at + 1 :])


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    return Recorder(monkeypatch)


def test_write_bytes_text_json_order(tmp_path, calls):
    durable.write_bytes(tmp_path / "a.bin", b"x" * 1000)
    calls.check_file(tmp_path / "a.bin")
    durable.write_text(tmp_path / "a.txt", "hello")
    calls.check_file(tmp_path / "a.txt")
    durable.write_json(tmp_path / "a.json", {"k": [1, 2]}, indent=1)
    calls.check_file(tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.json", "a.txt"]  # no temp files left


def test_atomic_path_and_file_order_and_failure(tmp_path, calls):
    final = tmp_path / "weights.safetensors"
    with durable.atomic_path(final) as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".")
        temp.write_bytes(b"new")  # a library that writes without fsync
    calls.check_file(final)
    with pytest.raises(RuntimeError), durable.atomic_path(final) as temp:
        temp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    with pytest.raises(RuntimeError), durable.atomic_file(final) as f:
        f.write(b"half")
        raise RuntimeError("writer failed")
    assert final.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_publish_dir_syncs_every_file_before_the_rename(tmp_path, calls):
    with durable.building_dir(tmp_path) as temp:
        (temp / "sub").mkdir()
        (temp / "sub" / "b.txt").write_text("b")
        (temp / "a.txt").write_text("a")
        durable.publish_dir(temp, tmp_path / "folder")
    calls.check_dir(tmp_path / "folder")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(OSError), durable.building_dir(tmp_path) as temp:
        durable.publish_dir(temp, tmp_path / "other")  # a folder is never replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "other"]  # the failed temp folder is gone


def test_iteration_record_save_fsyncs_the_directory(tmp_path, calls):
    # iteration.json is the phase a SIGKILLed trainer resumes in; it used to be renamed without a directory fsync.
    path = tmp_path / "iteration.json"
    IterationRecord(iteration=2, phase="validating", candidate="v0002-x").save(path)
    calls.check_file(path)
    assert IterationRecord.load(path).candidate == "v0002-x"


def test_checkpoint_files_order(tmp_path, calls):
    pt = Checkpointer(tmp_path, keep=2).save(3, {"w": torch.ones(4)})
    calls.check_file(pt)
    calls.check_file(pt.with_suffix(".json"))


def test_model_store_version_folder_synced_before_rename(tmp_path, calls):
    from irevla_ros.vla.model import VLAModel
    from irevla_ros.vla.model_store import ModelStore

    torch.manual_seed(0)
    info = ModelStore(tmp_path / "models").save(
        VLAModel(TINY), parent=None, stage="stage0_sft", export_onnx=False
    )
    calls.check_dir(info.path)  # weights and tokenizer files too, which their libraries write without fsync


def test_episode_store_write_order(tmp_path, calls):
    from iteration_helpers import write_episode

    from irevla_ros.store.episode_store import EpisodeStore

    with EpisodeStore(tmp_path / "store") as store:
        write_episode(store, "ep-1", "expert", "success", "")
        calls.check_file(store.absolute_path(store.get("ep-1")))


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from irevla_ros import durable

    final, stage = sys.argv[1], sys.argv[2]
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst):
        if stage == "before_rename":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
        if stage == "after_rename":  # renamed, directory not yet fsync'd
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    durable.write_bytes(final, b"N" * 1_000_000)
    """
)


@pytest.mark.parametrize(("stage", "expected"), [("before_rename", b"O"), ("after_rename", b"N")])
def test_writer_killed_around_the_rename_leaves_old_or_new(tmp_path, stage, expected):
    final = tmp_path / "state.bin"
    final.write_bytes(b"O" * 500_000)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(final), stage], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    data = final.read_bytes()
    assert data == expected * (1_000_000 if expected == b"N" else 500_000)  # complete old or complete new
    leftovers = [p.name for p in tmp_path.iterdir() if p != final]
    if stage == "after_rename":
        assert leftovers == []
    else:
        assert len(leftovers) == 1 and leftovers[0].endswith(durable.TEMP_SUFFIX)  # a hidden, fsync'd temp
