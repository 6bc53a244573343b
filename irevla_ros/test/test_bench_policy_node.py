"""The policy-node benchmark's code path at minimal scale: a tiny BLIP-2 VLA instead of the compact one, one
heads-only push; the real node process and real DDS. Checks the JSON and that the swaps it reports happened."""

from __future__ import annotations

import json
import math
from pathlib import Path

from irevla_ros.bench import policy_node
from irevla_ros.vla.config import VLAConfig
from irevla_ros.vla.tiny_models import make_tiny_blip2


def test_policy_node_bench_writes_json(tmp_path: Path) -> None:
    base = make_tiny_blip2(tmp_path / "blip2")
    cfg = VLAConfig(backbone="hf", hf_model_dir=str(base), latent_dim=64, head_hidden=(64,), lora_rank=4)
    path = policy_node.run(
        tmp_path / "out",
        tmp_path / "work",
        heads_pushes=1,
        settle_s=0.5,
        config=cfg,
        warmup_actions=5,
        full_swap=False,  # the full swap's validator child is the slow part; test_policy_hot_swap covers it
    )
    doc = json.loads(path.read_text())
    for key in ("benchmark", "machine", "parameters", "measures", "rss_mb", "announce_to_swap_s", "swaps"):
        assert key in doc, key
    # v1 runs first; then heads on v1 and heads on those, in that order, each seen in the step records
    assert [s["version"] for s in doc["swaps"]] == ["v0002-stage1_rl", "v0003-stage1_rl"]
    assert all(s["heads_only"] for s in doc["swaps"]) and doc["announce_to_swap_s"]["heads_only"]["n"] == 2
    assert doc["announce_to_swap_s"]["full"]["n"] == 0
    assert all(0 < s["announce_to_swap_s"] < 240 for s in doc["swaps"])
    indices = [s["swap_step_index"] for s in doc["swaps"]]
    assert indices == sorted(indices) and indices[0] >= 5
    assert doc["step_indices_consecutive"] is True
    assert doc["rss_mb"]["running"]["n"] > 0 and doc["peak_rss_mb"] >= doc["rss_mb"]["running"]["p50"] > 50
    heads = [s for s in doc["saves"] if s["kind"] == "heads_only"]
    full = [s for s in doc["saves"] if s["kind"] == "full"]
    assert len(heads) == 2 and len(full) == 1
    assert max(s["bytes"] for s in heads) < min(s["bytes"] for s in full)
    # heads swaps reuse the running encoder: no validator child, well under the full validation's seconds
    assert all(s["announce_to_swap_s"] < 10 for s in doc["swaps"])
    assert all(math.isfinite(s["seconds"]) for s in doc["saves"])
