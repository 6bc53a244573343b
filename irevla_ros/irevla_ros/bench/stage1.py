"""Stage 1 compute: gradient updates per second with cached latents vs recomputing the backbone (the paper's claim
that RL in latent space makes the RL stage cheap enough for a local machine).

    python -m irevla_ros.bench.stage1 [--quick] [--json out.json]

Both paths run the same PPOLearner.update (the same loss, minibatch size, epochs, no early stop) on the same
batch of steps, in the same process, with the real pretrained compact VLAModel (default config, one camera,
128x128 frames). "recompute" passes `latent_fn=BackboneLatents(...)`: every minibatch (and the pre-pass that
computes values and log-probabilities) goes from the raw uint8 frames through preprocessing, the frozen backbone
and the token learner, as RL without the cache has to; "cached" reads the latents computed once. The one-time
cost of computing the cache, per step, is reported too, and SACfD's cached update rate for scale. Two timings:
gradient steps alone (the headline, the conservative one) and whole updates, whose pre-pass over the batch
also has to run the backbone without the cache.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np
import torch

from irevla_ros.bench.harness import log, machine
from irevla_ros.train.datasets import Transitions
from irevla_ros.train.latents import BackboneLatents, LatentEpisodes, from_transitions
from irevla_ros.train.ppo import PPOConfig, PPOLearner, ppo_loss
from irevla_ros.train.sacfd import SACfDConfig, SACfDLearner
from irevla_ros.vla.config import VLAConfig
from irevla_ros.vla.model import VLAModel

GOAL_RATIO = 20.0


def _transitions(steps: int, episode_len: int, size: int, seed: int) -> Transitions:
    rng = np.random.default_rng(seed)
    starts = np.arange(0, steps, episode_len, dtype=np.int64)
    dones = np.zeros(steps, bool)
    dones[np.append(starts[1:], steps) - 1] = True
    rewards = np.zeros(steps, np.float32)
    rewards[np.flatnonzero(dones)[::2]] = 1.0  # every other episode a success
    return Transitions(
        images=rng.integers(0, 256, (steps, 1, size, size, 3), dtype=np.uint8),
        proprio=rng.normal(size=(steps, 4)).astype(np.float32),
        actions=rng.uniform(-1, 1, (steps, 4)).astype(np.float32),
        log_probs=rng.normal(-3.0, 0.5, steps).astype(np.float32),
        rewards=rewards,
        dones=dones,
        instruction_ids=np.zeros(steps, np.int32),
        instructions=["press the button"],
        episode_ids=[f"bench-{i}" for i in range(len(starts))],
        episode_starts=starts,
    )


def _rate(
    learner: PPOLearner, batch: LatentEpisodes, min_seconds: float, latent_fn: BackboneLatents | None = None
) -> dict[str, float]:
    """Repeat whole PPO updates (pre-pass + epochs) until min_seconds have passed; gradient steps per second."""
    steps, started = 0, time.perf_counter()
    repeats = 0
    while True:
        stats = learner.update(batch, latent_fn=latent_fn)
        steps += int(stats["minibatch_steps"])
        repeats += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            break
    return {
        "updates_per_s": steps / elapsed,
        "gradient_steps": steps,
        "ppo_updates": repeats,
        "seconds": elapsed,
    }


def _step_rate(
    learner: PPOLearner, batch: LatentEpisodes, min_seconds: float, latent_fn: BackboneLatents | None = None
) -> dict[str, float]:
    """Gradient steps alone (latents of one minibatch, ppo_loss, backward, Adam), without the update's pre-pass
    over the whole batch: the lower bound of what the cache saves per step."""
    n, mb = len(batch), learner.config.minibatch_size
    g = torch.Generator().manual_seed(0)
    data = {
        "actions": torch.from_numpy(batch.actions),
        "behaviour_log_probs": torch.from_numpy(batch.log_probs),
        "start_log_probs": torch.from_numpy(batch.log_probs),
        "advantages": torch.randn(n, generator=g),
        "returns": torch.rand(n, generator=g),
        "start_values": torch.zeros(n),
    }
    steps, started = 0, time.perf_counter()
    while True:
        index = torch.randperm(n, generator=g)[:mb]
        latent = latent_fn(index) if latent_fn is not None else torch.from_numpy(batch.latents)[index]
        loss, _ = ppo_loss(learner.model, latent, {k: v[index] for k, v in data.items()}, learner.config)
        learner.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(learner.params, learner.config.max_grad_norm)
        learner.optimiser.step()
        steps += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and steps >= 3:
            return {"updates_per_s": steps / elapsed, "gradient_steps": steps, "seconds": elapsed}


def _measure(
    model: VLAModel, batch: LatentEpisodes, data: Transitions, cfg: PPOConfig, min_seconds: float
) -> dict[str, object]:
    heads = {k: v.clone() for k, v in model.state_dict().items()}
    recompute_fn = BackboneLatents(model, data)
    out: dict[str, object] = {}
    for name, rate in (("step", _step_rate), ("update", _rate)):
        cached = rate(PPOLearner(model, cfg), batch, min_seconds)
        model.load_state_dict(heads)
        recompute = rate(PPOLearner(model, cfg), batch, min_seconds, latent_fn=recompute_fn)
        model.load_state_dict(heads)
        out[name] = {
            "cached": cached,
            "recompute": recompute,
            "ratio": cached["updates_per_s"] / recompute["updates_per_s"],
        }
    return out


def run(quick: bool = False, threads: Sequence[int] = (1, 2), seed: int = 0) -> dict[str, object]:
    """One entry per torch thread count (the cached path's small ops suffer most from a busy host's second
    core, so both are reported); the headline `ratio` is the first entry's."""
    torch.manual_seed(seed)
    threads = list(threads)[:1] if quick else list(threads)
    steps, minibatch, epochs = (64, 32, 1) if quick else (256, 64, 2)
    min_seconds = 1.0 if quick else 5.0
    log(f"stage1 bench: loading the pretrained compact VLA ({'quick' if quick else 'full'})")
    model = VLAModel(VLAConfig())
    size = int(model.config.image_size)  # type: ignore[arg-type]
    data = _transitions(steps, episode_len=32, size=size, seed=seed)
    torch.set_num_threads(threads[0])
    started = time.perf_counter()
    batch = from_transitions(model, data, batch_size=minibatch)
    cache_s = time.perf_counter() - started
    log(f"latent cache: {steps} steps in {cache_s:.2f} s")

    cfg = PPOConfig(minibatch_size=minibatch, update_epochs=epochs, target_kl=0.0)
    entries = []
    for n in threads:
        torch.set_num_threads(n)
        entry = {"threads": n, **_measure(model, batch, data, cfg, min_seconds)}
        for kind in ("step", "update"):
            e = entry[kind]
            log(
                f"threads {n}, {kind}: cached {e['cached']['updates_per_s']:.1f}, recompute "
                f"{e['recompute']['updates_per_s']:.2f} gradient steps/s, ratio {e['ratio']:.1f}"
            )
        entries.append(entry)

    torch.set_num_threads(threads[0])
    sac = SACfDLearner(model, SACfDConfig(batch_size=minibatch, min_transitions=1), seed=seed)
    sac.add_episodes(batch, demo=True)
    sac.add_episodes(batch, demo=False)
    n_sac = 50 if quick else 300
    started = time.perf_counter()
    sac.update(n_sac)
    sac_rate = n_sac / (time.perf_counter() - started)

    headline = entries[0]["step"]
    ratio = headline["ratio"]
    return {
        "benchmark": "stage1_updates",
        "machine": machine(),
        "parameters": {
            "quick": quick,
            "threads": threads,
            "model": "compact VLAModel, pretrained, default VLAConfig",
            "cameras": list(model.config.cameras),
            "image_size": size,
            "latent_dim": model.config.latent_dim,
            "batch_steps": steps,
            "minibatch_size": minibatch,
            "update_epochs": epochs,
        },
        "measures": {
            "updates_per_s": "PPO gradient steps (one minibatch each) per wall second",
            "step": "gradient steps alone (minibatch latents + loss + backward + Adam): the headline",
            "update": "whole PPOLearner.update calls (with the pre-pass over the batch that PPO needs)",
            "ratio": "cached / recompute updates per second, same process, same batch, same threads",
            "cache_seconds_per_step": "one-time cost of computing a step's latent (preprocessing + backbone)",
            "sacfd_cached_updates_per_s": "SACfD gradient updates (critics + actor + temperature) per second",
        },
        "entries": entries,
        "cached_updates_per_s": headline["cached"]["updates_per_s"],
        "recompute_updates_per_s": headline["recompute"]["updates_per_s"],
        "ratio": ratio,
        "goal_ratio": GOAL_RATIO,
        "goal_met": bool(ratio >= GOAL_RATIO),
        "cache_seconds_per_step": cache_s / steps,
        "sacfd_cached_updates_per_s": sac_rate,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="seconds: checks the code path, not the numbers")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = run(quick=args.quick, threads=args.threads)
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    keys = ("cached_updates_per_s", "recompute_updates_per_s", "ratio", "goal_met")
    print(json.dumps({k: result[k] for k in keys}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
