"""VLAModel: the paper's VLA. backbone hidden states (m x d) -> token learner -> latent -> action / critic heads.

- `encode_instruction(texts)`: text features, computed once per episode and reused.
- `encode(images, text_features, proprio)`: backbone + token learner -> latent (B, latent_dim). This is what the
  RL stage caches: with the backbone and the token learner frozen (stage "heads"), RL runs in latent space.
- `action_mean(latent)`: tanh-bounded action (B, A); `value(latent)`: critic (B,) with the same MLP structure.
- `action_residual`: a bounded correction added to the action head's output before the tanh (residual RL: PLD,
  EXPO-FT). Its `scale` is 0 in every version Stage 0 or 2 writes, so it changes nothing there; Stage 1 may set a
  scale and train it instead of the action head (SACfDConfig.residual_scale), and the next supervised stage
  distils what it did into the action head (from D_RL) and resets it.
- `distribution(latent)` / `act(...)`: Gaussian exploration (see distribution.py); deterministic in evaluation.

Training stages (`set_trainable(stage)`):
- "heads" (stage 1, online RL): action head, action residual, critic head and log_std. Backbone, LoRA and token
  learner frozen.
- "lora_and_action_head" (stages 0 and 2, supervised): LoRA parameters, the backbone's new (not pretrained)
  layers, the token learner and the action head. Pretrained backbone weights stay frozen; the critic and
  log_std are not touched by the MSE loss.

Pretrained backbone modules always run in eval mode (BatchNorm statistics frozen, dropout off) so the latent of
an observation does not depend on the training mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from irevla_ros.vla.backbones import Backbone, build_backbone
from irevla_ros.vla.config import VLAConfig, VLAConfigError
from irevla_ros.vla.distribution import ClippedNormal
from irevla_ros.vla.preprocess import VLAInputError

STAGES = ("heads", "lora_and_action_head")
# What Stage 1 trains, what a heads-only version stores and what a push replaces (state-dict prefixes).
HEAD_GROUPS = ("action_head", "action_residual", "critic_head", "log_std")


class TokenLearner(nn.Module):
    """Learned attention pooling (TokenLearner, Ryoo et al. 2021) of m tokens into k, then to the latent."""

    def __init__(self, dim: int, hidden: int, tokens: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, tokens))
        self.out = nn.Identity() if tokens == 1 and dim == out_dim else nn.Linear(dim * tokens, out_dim)
        self.out_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(x)
        logits = self.score(x)  # (B, m, k)
        if mask is not None:
            logits = logits.masked_fill(~mask.unsqueeze(-1), -1e4)
        weights = torch.softmax(logits, dim=1)
        pooled = torch.einsum("bmk,bmd->bkd", weights, x).flatten(1)
        return self.out_norm(self.out(pooled))


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, final_std: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.GELU()]
        in_dim = h
    last = nn.Linear(in_dim, out_dim)
    nn.init.normal_(last.weight, std=final_std)  # near-zero outputs at the start: actions ~0, values ~0
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class ActionResidual(nn.Module):
    """scale * tanh(net([latent, tanh(head output)])): a correction of at most `scale` per action dimension to the
    action head's pre-tanh output, hence (tanh being 1-Lipschitz) to the action. `scale` is a buffer, stored with
    the weights, so a deployed version (ONNX heads included) acts exactly as the learner did."""

    def __init__(self, latent_dim: int, action_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.net = mlp(latent_dim + action_dim, hidden, action_dim, final_std=0.0)
        self.register_buffer("scale", torch.zeros(()))

    def forward(self, latent: torch.Tensor, head_output: torch.Tensor) -> torch.Tensor:
        x = torch.cat([latent, torch.tanh(head_output).detach()], dim=-1)
        return self.scale * torch.tanh(self.net(x))

    @torch.no_grad()
    def reset(self, scale: float = 0.0) -> None:
        """No correction (the output layer zeroed), and `scale` as the bound for what training adds."""
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        last.weight.zero_()
        last.bias.zero_()
        self.scale.fill_(float(scale))


def with_residual_defaults(tensors: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`tensors` (a state dict, whole or heads only) completed with a zero action residual when it has none:
    versions and checkpoints written before the residual existed act as they did."""
    out = dict(tensors)
    if any(k.startswith("action_residual.") for k in out):
        return out
    for k, v in model.state_dict().items():
        if k.startswith("action_residual."):
            out[k] = torch.zeros_like(v)  # zero weights and scale 0: no correction at all
    return out


class ActOutput(NamedTuple):
    action: torch.Tensor  # (B, A) in [-1, 1]: what is executed and stored
    log_prob: torch.Tensor  # (B,) log-probability of `action` under the exploration distribution
    value: torch.Tensor  # (B,)


def is_lora_parameter(name: str) -> bool:
    return "lora_" in name


class VLAModel(nn.Module):
    def __init__(
        self, config: VLAConfig, *, load_pretrained: bool = True, tokenizer_dir: str | Path | None = None
    ) -> None:
        super().__init__()
        cfg = config.resolved()
        self.config = cfg
        self.backbone: Backbone = build_backbone(
            cfg, load_pretrained=load_pretrained, tokenizer_dir=tokenizer_dir
        )
        if cfg.lora_rank > 0:
            _apply_lora(self.backbone, cfg)
        self.token_learner = TokenLearner(
            self.backbone.out_dim, cfg.token_learner_hidden, cfg.token_learner_tokens, cfg.latent_dim
        )
        self.action_head = mlp(cfg.latent_dim, cfg.head_hidden, cfg.action_dim, final_std=0.01)
        with torch.random.fork_rng(devices=[]):  # the global RNG stream (every later init) as without it
            torch.manual_seed(0)
            self.action_residual = ActionResidual(cfg.latent_dim, cfg.action_dim, cfg.head_hidden)
        self.critic_head = mlp(cfg.latent_dim, cfg.head_hidden, 1, final_std=0.01)
        self.log_std = nn.Parameter(torch.full((cfg.action_dim,), float(cfg.init_log_std)))
        self.set_trainable("lora_and_action_head")
        self.eval()

    # ---- modes and trainable sets ----
    def train(self, mode: bool = True) -> VLAModel:
        super().train(mode)
        for module in self.backbone.pretrained_modules().values():
            module.eval()
            for name, sub in module.named_modules():
                if name.endswith("lora_dropout"):  # LoRA's own regularisation follows the training mode
                    sub.train(mode)
        return self

    def _pretrained_names(self) -> set[str]:
        names = set()
        for prefix, module in self.backbone.pretrained_modules().items():
            names |= {f"backbone.{prefix}.{n}" for n, _ in module.named_parameters()}
        return names

    def named_parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Every parameter in exactly one group: pretrained, lora, backbone_new, token_learner, action_head,
        action_residual, critic_head, log_std."""
        pretrained = self._pretrained_names()
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            k: []
            for k in (
                "pretrained",
                "lora",
                "backbone_new",
                "token_learner",
                "action_head",
                "action_residual",
                "critic_head",
                "log_std",
            )
        }
        for name, p in self.named_parameters():
            if is_lora_parameter(name):
                group = "lora"
            elif name in pretrained:
                group = "pretrained"
            elif name.startswith("backbone."):
                group = "backbone_new"
            else:
                group = name.split(".")[0]
            groups[group].append((name, p))
        return groups

    def trainable_parameters(self, stage: str) -> list[nn.Parameter]:
        if stage not in STAGES:
            raise VLAConfigError(f"unknown training stage {stage!r} (known: {', '.join(STAGES)})")
        groups = self.named_parameter_groups()
        wanted = HEAD_GROUPS if stage == "heads" else ("lora", "backbone_new", "token_learner", "action_head")
        return [p for g in wanted for _, p in groups[g]]

    def set_trainable(self, stage: str) -> list[nn.Parameter]:
        """requires_grad on exactly `trainable_parameters(stage)`; returns them (for the optimiser)."""
        params = self.trainable_parameters(stage)
        keep = {id(p) for p in params}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)
        return params

    def fresh_critic(self) -> None:
        """A new critic head for the next RL stage (the paper starts each iteration with a fresh critic)."""
        cfg = self.config
        self.critic_head = mlp(cfg.latent_dim, cfg.head_hidden, 1, final_std=0.01).to(self.log_std.device)

    # ---- forward pieces ----
    @property
    def tokenizer(self) -> object:
        return self.backbone.tokenizer

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone.tokenize(texts, self.config.max_instruction_tokens)

    def encode_instruction(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, T, D) text features for B instructions; compute once per episode and pass to `encode`."""
        ids, mask = self.tokenize(texts)
        device = self.log_std.device
        return self.backbone.text_features(ids.to(device), mask.to(device))

    def _check_inputs(
        self, images: torch.Tensor, text_features: torch.Tensor, proprio: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.config
        s = int(cfg.image_size)  # type: ignore[arg-type]
        if images.ndim != 5 or tuple(images.shape[1:]) != (cfg.n_cameras, 3, s, s):
            raise VLAInputError(
                f"images must have shape (B, {cfg.n_cameras}, 3, {s}, {s}) (cameras {list(cfg.cameras)}), "
                f"got {tuple(images.shape)}"
            )
        b = images.shape[0]
        if text_features.ndim != 3 or text_features.shape[-1] != self.backbone.text_dim:
            raise VLAInputError(
                f"text_features must have shape (B, T, {self.backbone.text_dim}) from encode_instruction, "
                f"got {tuple(text_features.shape)}"
            )
        if text_features.shape[0] == 1 and b > 1:  # one instruction for a batch of steps of one episode
            text_features = text_features.expand(b, -1, -1)
        elif text_features.shape[0] != b:
            raise VLAInputError(
                f"text_features batch {text_features.shape[0]} does not match images batch {b}"
            )
        if cfg.proprio_dim:
            if proprio is None or tuple(proprio.shape) != (b, cfg.proprio_dim):
                got = None if proprio is None else tuple(proprio.shape)
                raise VLAInputError(f"proprio must have shape ({b}, {cfg.proprio_dim}), got {got}")
        else:
            proprio = None
        return text_features, proprio

    def encode(
        self, images: torch.Tensor, text_features: torch.Tensor, proprio: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, n_cam, 3, S, S) preprocessed images, (B|1, T, D) text features, (B, P) proprio -> (B, latent_dim)."""
        text_features, proprio = self._check_inputs(images, text_features, proprio)
        hidden, mask = self.backbone.hidden_states(images, text_features, proprio)
        return self.token_learner(hidden, mask)

    def action_mean(self, latent: torch.Tensor) -> torch.Tensor:
        head = self.action_head(latent)
        return torch.tanh(head + self.action_residual(latent, head))

    def value(self, latent: torch.Tensor) -> torch.Tensor:
        return self.critic_head(latent).squeeze(-1)

    def distribution(self, latent: torch.Tensor) -> ClippedNormal:
        return ClippedNormal(self.action_mean(latent), self.log_std)

    def forward(
        self, images: torch.Tensor, text_features: torch.Tensor, proprio: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.encode(images, text_features, proprio)
        return self.action_mean(latent), self.value(latent)

    def act(
        self,
        images: torch.Tensor,
        text_features: torch.Tensor,
        proprio: torch.Tensor | None = None,
        *,
        deterministic: bool,
        generator: torch.Generator | None = None,
        latent: torch.Tensor | None = None,
    ) -> ActOutput:
        """Sample (or, deterministic, take the mean of) the exploration distribution; pass `latent` to skip the
        backbone when it is cached."""
        with torch.no_grad():
            if latent is None:
                latent = self.encode(images, text_features, proprio)
            dist = self.distribution(latent)
            action = dist.mean.clamp(-1.0, 1.0) if deterministic else dist.sample(generator)
            return ActOutput(action, dist.log_prob(action), self.value(latent))

    def finite_check(self) -> Iterator[str]:
        """Names of parameters and buffers holding NaN or inf."""
        for name, t in self.state_dict().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                yield name


def _apply_lora(backbone: Backbone, cfg: VLAConfig) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(cfg.lora_targets or ())
    lora = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets
    )
    # Only the pretrained modules get adapters (the new layers train fully); peft edits them in place.
    holder = nn.ModuleDict(backbone.pretrained_modules())
    try:
        inject_adapter_in_model(lora, holder)
    except ValueError as exc:
        raise VLAConfigError(
            f"lora_targets {targets}: no such modules in the {cfg.backbone} backbone ({exc})"
        ) from exc
    # Adapters of a bf16/fp16 base train in float32 (peft casts the activations to the adapter's dtype).
    for name, param in holder.named_parameters():
        if is_lora_parameter(name) and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def merge_lora_(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight in place (for export: the graph then has no LoRA branch)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and not module.merged:
            module.merge()
    return model
