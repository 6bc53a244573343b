"""The simulation benchmark runner at its tiny scale: every method runs, the JSON and the Markdown table come out
with the episode counts. Success values are not asserted (a tiny run checks code paths, not learning)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from irevla_ros.bench.ire_vla_sim import METHODS, SCALES, BenchConfig, BenchConfigError, load_config, main


def _rate_ok(group: dict) -> None:
    assert 0 <= group["successes"] <= group["episodes"]
    assert group["success_rate"] == pytest.approx(group["successes"] / group["episodes"], abs=1e-4)
    lo, hi = group["ci95"]
    assert 0.0 <= lo <= group["success_rate"] <= hi <= 1.0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_benchmark_two_seeds_in_workers_writes_json_table_curves_and_gate(tmp_path: Path, capfd):
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["--scale", "tiny", "--seeds", "0,1", "--jobs", "2", "--out", str(out), "--work", str(work)]
    assert main(argv) == 0
    cfg = BenchConfig.from_dict(SCALES["tiny"])
    doc = json.loads((out / "ire_vla_sim.json").read_text())
    assert doc["benchmark"] == "ire_vla_sim" and doc["scale"] == "tiny" and doc["format"] == 2
    assert doc["parameters"]["expert_tasks"] == cfg.expert_tasks
    assert [s["seed"] for s in doc["seeds"]] == [0, 1] and set(doc["methods"]) == set(METHODS)
    eval_episodes = cfg.eval_episodes_per_task * (
        len(cfg.expert_tasks) + len(cfg.rl_tasks) + len(cfg.unseen_tasks)
    )
    per = cfg.rl_episodes_per_task // cfg.iterations_per_task
    for seed in doc["seeds"]:
        wanted = cfg.demos_per_task * len(cfg.expert_tasks)
        demos = seed["demonstrations"]
        assert (
            demos["kept"] == wanted and wanted <= demos["episodes_run"] <= wanted * cfg.demo_attempts_per_demo
        )
        assert math.isfinite(seed["stage0"]["final_loss"])
        timing = seed["timing"]
        assert timing["environment_steps"] == sum(timing["steps"].values()) > 0
        assert timing["vla_steps_per_second"] > 0 and timing["render_floor_steps_per_second"] > 0
        assert set(timing["steps"]) == {"demonstrations", "final_eval", "gate", "curve_eval",
                                        "rl_episodes:iRe-VLA", "rl_episodes:PPO-Replay"}  # fmt: skip
        assert {"demonstrations", "stage0", "final_eval", "stage2", "gate", "curve_eval"} <= set(
            timing["phases"]
        )
        for name, m in seed["methods"].items():
            _rate_ok(m["expert"])
            _rate_ok(m["unseen"])
            assert m["eval_episodes"] == eval_episodes
            e = m["environment_episodes"]
            assert e["demos"] == demos["episodes_run"] and e["train"] == e["demos"] + e["rl"]
            assert e["rl"] == (0 if name == "SFT" else cfg.rl_episodes_per_task * len(cfg.rl_tasks))
            for task in m["per_task"].values():
                assert all(1 <= n <= cfg.max_steps for n in task["lengths"])  # type: ignore[operator]
            if name == "SFT":
                continue
            for task in cfg.rl_tasks:
                # the curve starts at the SFT policy's success on the same scenes, then one point per iteration
                curve = m["curves"][task]
                assert [p["rl_episodes"] for p in curve] == [
                    per * k for k in range(cfg.iterations_per_task + 1)
                ]
                assert curve[0]["success"] == seed["methods"]["SFT"]["rl"][task]["success_rate"]
                assert all(0.0 <= p["success"] <= 1.0 for p in curve)
                level = min(1.0, curve[0]["success"] + cfg.level_delta)
                reached = [p["rl_episodes"] for p in curve if p["success"] >= level]
                assert m["episodes_to_level"][task] == (reached[0] if reached else None)
        ire = seed["methods"]["iRe-VLA"]
        assert len(ire["gate"]) == cfg.iterations_per_task * len(cfg.rl_tasks)
        for verdict, point in zip(ire["gate"], ire["curves"][cfg.rl_tasks[0]][1:], strict=True):
            assert verdict["promoted"] == point["promoted"]
            assert verdict["why"].startswith("promoted" if verdict["promoted"] else "refused")
        for task in cfg.rl_tasks:
            iterations = ire["stages"][task]["iterations"]
            assert len(iterations) == cfg.iterations_per_task
            assert all(math.isfinite(it["stage2"]["final_loss"]) for it in iterations)
            assert sum(it["stage1"]["episodes"] for it in iterations) == cfg.rl_episodes_per_task
    # aggregated over the seeds: the mean of the per-seed rates, an interval around it, every seed listed
    for name, m in doc["methods"].items():
        rates = [s["methods"][name]["expert"]["success_rate"] for s in doc["seeds"]]
        assert m["expert"]["per_seed"] == rates and m["expert"]["mean"] == pytest.approx(
            sum(rates) / 2, abs=1e-4
        )
        assert m["expert"]["ci95"][0] <= m["expert"]["mean"] <= m["expert"]["ci95"][1]
    assert doc["methods"]["iRe-VLA"]["gate"]["candidates"] == 2 * cfg.iterations_per_task * len(cfg.rl_tasks)
    for image in ("ire_vla_sim.png", "ire_vla_sim_curves.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "ire_vla_sim.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| Method"))
    assert (
        all(task in header for task in cfg.rl_tasks) and "Expert (1 tasks)" in header and "Unseen" in header
    )
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| Method")]
    assert [r.split("|")[1].strip() for r in rows[: len(METHODS)]] == list(METHODS)
    assert any(line.startswith("| iRe-VLA - SFT, expert tasks |") for line in table)  # the paired targets
    assert doc["against_targets"][0]["seeds"] == [0, 1]
    assert any("seed 0 | seed 1" in line for line in table)  # the per-seed table: no seed hidden in a mean
    # The same work folder again: both seeds are kept, nothing runs, the same table comes out.
    capfd.readouterr()
    assert main(argv) == 0
    assert capfd.readouterr().err.count("kept from") == 2
    assert json.loads((out / "ire_vla_sim.json").read_text())["methods"] == doc["methods"]
    # A run of other seeds keeps those it shares: seed 1 alone is not run again.
    assert main([*argv[:2], "--seeds", "1", *argv[4:]]) == 0
    assert capfd.readouterr().err.count("seed 1: kept from") == 1
    assert json.loads((out / "ire_vla_sim.json").read_text())["seeds"] == [doc["seeds"][1]]


def test_a_kept_seed_counts_a_setting_added_after_it_at_its_default():
    from irevla_ros.bench.ire_vla_sim import BenchConfig, _one_seeds_settings

    current = dataclasses.asdict(BenchConfig(seeds=[0, 1, 2]))
    older = {k: v for k, v in current.items() if k != "sacfd_residual_scale"}  # written before the setting
    older["seeds"] = [0, 1]
    assert _one_seeds_settings(older) == _one_seeds_settings(current)
    assert _one_seeds_settings({**older, "sacfd_residual_scale": 0.5}) != _one_seeds_settings(current)
    assert _one_seeds_settings({**older, "stage0_steps": 7}) != _one_seeds_settings(current)


def test_over_seeds_intervals_levels_and_the_gate_rule():
    from irevla_ros.bench.ire_vla_sim import best_after_promotion, episodes_to_level, gate, mean_ci
    from irevla_ros.train.evaluation import EvalReport, TaskEval

    assert mean_ci([0.5]) == (0.5, 0.5, 0.5)
    mean, lo, hi = mean_ci([0.4, 0.5, 0.6])  # std 0.1, t(0.975, 2) = 4.303
    assert (mean, lo, hi) == pytest.approx(
        (0.5, 0.5 - 4.303 * 0.1 / math.sqrt(3), 0.5 + 4.303 * 0.1 / math.sqrt(3))
    )
    assert mean_ci([1.0, 1.0, 0.9])[2] == 1.0  # clipped to [0, 1]
    curve = [{"rl_episodes": 0, "success": 0.2}, {"rl_episodes": 10, "success": 0.4},
             {"rl_episodes": 20, "success": 0.5}, {"rl_episodes": 30, "success": 0.9}]  # fmt: skip
    assert episodes_to_level(curve, 0.5) == 20 and episodes_to_level(curve, 0.95) is None

    def report(rates: dict[str, int]) -> EvalReport:
        tasks = {t: TaskEval(t, 10, k, [1] * 10, list(range(10))) for t, k in rates.items()}
        return EvalReport("v", tasks, 0, True, 100)

    running = report({"a": 8, "b": 6, "new": 2})
    ok, why = gate(report({"a": 8, "b": 5, "new": 6}), running, ["a", "b"], "new", 0.1)
    assert ok and why.startswith("promoted")
    # better on the new task, but the known tasks fell from 0.70 to 0.50: forgetting is refused
    ok, why = gate(report({"a": 5, "b": 5, "new": 9}), running, ["a", "b"], "new", 0.1)
    assert not ok and "known tasks 0.50 vs 0.70 (worse)" in why
    ok, _ = gate(report({"a": 8, "b": 6, "new": 0}), running, ["a", "b"], "new", 0.1)
    assert not ok  # worse on the new task

    # Drift: each candidate within the margin of the running version, 0.90 -> 0.80 -> 0.70 on the known tasks.
    # Against the running version alone the third passes; held to the best version so far it does not.
    first, second, third = (report({"a": k, "b": k, "new": 5}) for k in (9, 8, 7))
    assert gate(second, first, ["a", "b"], "new", 0.1)[0]
    assert best_after_promotion(second, first, None, ["a", "b"]) == "replaced"  # first stays the reference
    assert gate(third, second, ["a", "b"], "new", 0.1)[0]  # the old rule's blind spot
    ok, why = gate(third, second, ["a", "b"], "new", 0.1, best=first)
    assert not ok and "known tasks 0.70 vs 0.80 (best 0.90) (worse)" in why
    assert gate(report({"a": 9, "b": 7, "new": 5}), second, ["a", "b"], "new", 0.1, best=first)[0]
    # the reference moves on to a candidate at least as good, and to the running version when it beats the best
    assert best_after_promotion(report({"a": 9, "b": 9, "new": 5}), second, first, ["a", "b"]) == "candidate"
    assert best_after_promotion(third, first, second, ["a", "b"]) == "replaced"
    assert best_after_promotion(third, second, first, ["a", "b"]) == "best"


def test_settings_are_validated_with_the_key_named(tmp_path: Path):
    with pytest.raises(BenchConfigError, match="unknown benchmark setting"):
        load_config("tiny", None, {"demos_per_tsk": 3})
    with pytest.raises(BenchConfigError, match="also trained on"):
        load_config("tiny", None, {"unseen_tasks": ["handle-press-v3"]})
    with pytest.raises(BenchConfigError, match="demos_per_task must be a positive integer"):
        load_config("tiny", None, {"demos_per_task": 0})
    with pytest.raises(BenchConfigError, match="unknown scale"):
        load_config("huge", None, {})
    path = tmp_path / "b.yaml"
    path.write_text("demos_per_task: 3\nrl_tasks: [drawer-close-v3]\n")
    cfg = load_config("tiny", path, {"seed": 5})
    assert cfg.seed_list == [5] and load_config("tiny", None, {"seeds": [3, 4]}).seed_list == [3, 4]
    with pytest.raises(BenchConfigError, match="multiple of iterations_per_task"):
        load_config("tiny", None, {"rl_episodes_per_task": 3, "iterations_per_task": 2})
    with pytest.raises(BenchConfigError, match="stage1_algorithm"):
        load_config("tiny", None, {"stage1_algorithm": "ddpg"})
    assert (cfg.demos_per_task, cfg.rl_tasks, cfg.seed, cfg.max_steps) == (3, ["drawer-close-v3"], 5, 40)
    for scale, values in SCALES.items():
        BenchConfig.from_dict(values)  # every preset is valid
        assert scale in ("tiny", "small", "small_b", "default", "paper")
    assert main(["--scale", "tiny", "--demos-per-task", "0"]) == 2


def test_against_targets_pairs_each_seeds_methods_and_counts_only_seeds_where_sft_solves_the_task_sometimes():
    from irevla_ros.bench.ire_vla_sim import BenchConfig, against_targets, t_interval

    cfg = BenchConfig(expert_tasks=["e"], rl_tasks=["r"], unseen_tasks=[], level_delta=0.3)

    def seed(n: int, rates: dict[str, tuple[float, float]]) -> dict[str, Any]:
        def group(rate: float) -> dict[str, float]:
            return {"success_rate": rate}

        return {
            "seed": n,
            "methods": {m: {"expert": group(e), "rl": {"r": group(r)}} for m, (e, r) in rates.items()},
        }

    seeds = [
        seed(0, {"SFT": (0.9, 0.6), "iRe-VLA": (0.88, 0.9), "PPO-Replay": (0.6, 0.5)}),
        seed(1, {"SFT": (0.8, 0.3), "iRe-VLA": (0.8, 0.7), "PPO-Replay": (0.5, 0.0)}),
        seed(
            2, {"SFT": (0.9, 0.9), "iRe-VLA": (0.8, 0.8), "PPO-Replay": (0.7, 0.5)}
        ),  # SFT already solves it
        seed(3, {"SFT": (0.9, 0.0), "iRe-VLA": (0.9, 0.0), "PPO-Replay": (0.7, 0.0)}),  # SFT never solves it
    ]
    expert = against_targets(cfg, seeds)[0]
    assert expert["comparison"] == "iRe-VLA - SFT, expert tasks"
    assert expert["per_seed"] == [-0.02, 0.0, -0.1, 0.0] and expert["met"] is False  # mean -0.03
    sometimes = next(r for r in against_targets(cfg, seeds) if "sometimes" in r["comparison"])
    assert sometimes["seeds"] == [0, 1] and sometimes["per_seed"] == [0.3, 0.4] and sometimes["met"] is True
    mean, lo, hi = t_interval([0.3, 0.4])
    assert sometimes["mean"] == pytest.approx(mean) and sometimes["ci95"] == pytest.approx([lo, hi], abs=1e-4)
    assert lo < 0.3 < hi  # unclipped: a difference's interval may leave [0, 1]
    every = next(r for r in against_targets(cfg, seeds) if "every seed" in r["comparison"])
    assert every["seeds"] == [0, 1, 2, 3] and every["met"] is None
    ppo = [r for r in against_targets(cfg, seeds) if "PPO-Replay" in r["comparison"]]
    assert [r["met"] for r in ppo] == [True, True]
    # One seed below the target on the RL task turns the verdict.
    seeds[1]["methods"]["iRe-VLA"]["rl"]["r"]["success_rate"] = 0.4
    sometimes = next(r for r in against_targets(cfg, seeds) if "sometimes" in r["comparison"])
    assert sometimes["met"] is False and sometimes["mean"] == pytest.approx(0.2)
    assert t_interval([-0.5, 0.1])[1] < 0.0  # no clipping for differences
