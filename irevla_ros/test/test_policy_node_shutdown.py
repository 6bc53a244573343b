"""The policy node stops cleanly with the VLA loaded: SIGINT after hot swaps (heads-only and full versions, as in
the demo's iteration) exits 0 every time, and a SIGINT while a version is being validated stops the validator
child with the node instead of leaving it running on its own."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
from test_policy_hot_swap import _Cell, _wait
from test_vla_store import _new_heads, _perturb

from irevla_interfaces.msg import EpisodeEvent, PolicyVersion
from irevla_ros import topics
from irevla_ros.nodes.common import LATCHED_QOS
from irevla_ros.vla.config import VLAConfig
from irevla_ros.vla.model import VLAModel
from irevla_ros.vla.model_store import ModelStore
from irevla_ros.vla.tiny_models import make_tiny_blip2


def _store(tmp_path: Path) -> tuple[ModelStore, dict[str, str]]:
    """v1 full, h1 heads on v1 (a Stage 1 push), v2 and v3 full (Stage 2 candidates)."""
    base = make_tiny_blip2(tmp_path / "blip2")
    cfg = VLAConfig(backbone="hf", hf_model_dir=str(base), latent_dim=64, head_hidden=(64,), lora_rank=4)
    store = ModelStore(tmp_path / "models")
    torch.manual_seed(1)
    m1 = _perturb(VLAModel(cfg), 1)
    v = {"v1": store.save(m1, parent=None, stage="stage0_sft").version_id}
    v["h1"] = store.save_heads(_new_heads(m1, 2), v["v1"]).version_id
    for name, seed in (("v2", 3), ("v3", 4)):
        torch.manual_seed(seed)
        v[name] = store.save(_perturb(VLAModel(cfg), seed), parent=v["v1"], stage="stage2_sft").version_id
    return store, v


def _policy_command(store: ModelStore, version: str) -> list[str]:
    return [
        shutil.which("policy_node") or "policy_node",
        "--ros-args",
        "-p",
        "policy:=vla",
        "-p",
        f"model_store:={store.root}",
        "-p",
        f"version:={version}",
        "-p",
        "max_image_age:=0.5",
    ]


def _announcer(cell: _Cell) -> object:
    """A fresh latched publisher: a node started later must not receive the previous run's last announcement."""
    cell.node.destroy_publisher(cell.version_pub)
    cell.version_pub = cell.node.create_publisher(PolicyVersion, topics.POLICY_VERSION, LATCHED_QOS)
    return cell.version_pub


def _start_acting(cell: _Cell, policy: object, episode: str, version: str) -> None:
    assert _wait(lambda: cell.node.count_subscribers(topics.EPISODE_EVENTS) > 0, 60), policy.output()  # type: ignore[attr-defined]
    with cell.lock:
        cell.records.clear()
    cell.event_pub.publish(
        EpisodeEvent(type=EpisodeEvent.START, episode_id=episode, instruction="press the button")
    )
    assert _wait(lambda: cell.acted().count(version) >= 5, 60), policy.output()  # type: ignore[attr-defined]


def _swap(cell: _Cell, policy: object, version: str, heads_only: bool) -> None:
    stage = "stage1_rl" if heads_only else "stage2_sft"
    cell.version_pub.publish(PolicyVersion(version_id=version, stage=stage, heads_only=heads_only))
    assert _wait(lambda: cell.acted().count(version) >= 5, 120), policy.output()  # type: ignore[attr-defined]


def test_sigint_after_hot_swaps_exits_0_every_time(ros_context, child, tmp_path):
    store, v = _store(tmp_path)
    cell = _Cell(ros_context)
    codes: list[int] = []
    logs: list[str] = []
    # run 0: a heads-only swap; runs 1 and 2: a heads-only swap then a full version, the demo's sequence
    for run in range(3):
        _announcer(cell)
        policy = child(_policy_command(store, v["v1"]), name=f"policy-run{run}")
        _start_acting(cell, policy, f"ep-{run}", v["v1"])
        _swap(cell, policy, v["h1"], heads_only=True)
        if run:
            _swap(cell, policy, v["v2"], heads_only=False)
        codes.append(policy.stop())
        logs.append(policy.output()[-3000:])
    cell.close()
    assert codes == [0, 0, 0], (codes, logs)


def _children(pid: int) -> dict[int, bytes]:
    """Live child processes of `pid` -> command line."""
    found: dict[int, bytes] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry.name)] = cmdline
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigint_during_validation_stops_the_validator(ros_context, child, tmp_path):
    store, v = _store(tmp_path)
    cell = _Cell(ros_context)
    policy = child(_policy_command(store, v["v1"]), name="policy")
    _start_acting(cell, policy, "ep-validating", v["v1"])
    cell.version_pub.publish(PolicyVersion(version_id=v["v3"], stage="stage2_sft"))
    pid = policy.popen.pid
    validators: list[int] = []

    def validating() -> bool:
        validators[:] = [p for p, cmd in _children(pid).items() if b"ModelStore(sys.argv[1])" in cmd]
        return bool(validators)

    assert _wait(validating, 30), policy.output()
    try:
        code = policy.stop()
        stopped_at = time.monotonic()
        # the node reaps what it stopped: nothing of it is left running once it has exited
        left = [p for p in validators if _alive(p)]
        assert code == 0, policy.output()[-3000:]
        assert not left, (
            f"validator {left} still running {time.monotonic() - stopped_at:.2f} s after the node exited"
        )
        assert f"{v['v3']}: swapped in" not in policy.output()
    finally:
        for p in validators:
            if _alive(p):
                os.kill(p, 9)
        cell.close()
