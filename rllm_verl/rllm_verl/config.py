"""verl's own config (its Hydra ``ppo_trainer`` defaults), with the core's algorithm settings applied.

:class:`VerlConfig` holds what rllm-verl adds (model, placement, micro-batches, raw overrides).
:func:`compose_verl_config` composes verl's defaults and applies, in order: the engine settings
(FSDP2, fp32 mixed precision, no gradient checkpointing, no torch.compile, packed sequences), the
core's algorithm (:func:`algorithm_overrides`), then ``VerlConfig.overrides`` verbatim, so a
user can reach any verl key.

KL to the reference (``algorithm.loss.kl_coef > 0``) is verl's KL loss (``use_kl_loss``: the
estimator aggregated like the policy loss, times ``kl_coef``), with the reference model in the
same workers (role ``actor_rollout_ref``).

Both of the core's policy losses are verl's ``vanilla`` PPO loss, exactly (ratio = exp(clamp(logp - old, ±20))):

* ``ppo``: ``clip_ratio_low = clip_low``, ``clip_ratio_high = clip_high``; dual clip at
  ``clip_ratio_c`` when set, else at :data:`NO_CLIP` (never reached: the ratio is at most e^20).
* ``importance_sampling`` (``-ratio * A``, no clip): the same loss with ``clip_ratio_low = 1``
  (the ratio's floor becomes 0, which a ratio never is below) and the upper and dual clips at
  :data:`NO_CLIP`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from rllm_torch.config import TinyModelSettings

from rllm_core.config import AlgorithmConfig, LossConfig
from rllm_verl.dataproto import loss_agg_settings

if TYPE_CHECKING:  # pragma: no cover
    from omegaconf import DictConfig

__all__ = [
    "NO_CLIP",
    "VerlConfig",
    "VllmHttpSettings",
    "actor_config",
    "actor_loss_settings",
    "algorithm_overrides",
    "compose_verl_config",
    "rollout_overrides",
]

NO_CLIP = 1.0e9
"""A clip bound no ratio reaches: verl clamps the log-ratio to 20, so the ratio is below 4.9e8."""

VERL_KL_TYPES = {"k1": "kl", "k2": "mse", "k3": "low_var_kl"}
"""The core's KL estimators by verl's ``kl_loss_type`` names (the same formulas)."""

VERL_K3_CLAMP = 10.0
"""verl clamps its low-var (k3) KL estimate to ``[-10, 10]`` (not configurable)."""

VERL_LOG_RATIO_CLAMP = 20.0
"""verl's vanilla loss clamps ``logp - old`` to ``[-20, 20]`` (not configurable)."""


class VllmHttpSettings(BaseModel):
    """vLLM servers outside verl's control (``verl.rollout: vllm_http``), fed weights through Ray's object store."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    servers: list[str] = Field(default_factory=list)
    """Base URLs of servers you run (``http://host:8000``), started with ``VLLM_SERVER_DEV_MODE=1``
    and ``--logprobs-mode processed_logprobs`` on the model the actor trains. Empty: start ``launch``
    servers on this machine."""
    launch: int = Field(1, ge=1)
    """Servers started here (from ``venv``) when ``servers`` is empty, each on a free port."""
    venv: str | None = None
    """The venv with vLLM installed (``bash scripts/vllm_cpu_venv.sh``); None: ``$RLLM_VLLM_VENV``,
    else ``./.vllm-venv``."""
    dtype: str = "float32"
    """``--dtype`` of launched servers (``float32`` on CPU: parity with the trainer within 1e-5)."""
    kv_cache_bytes: str | None = "256M"
    """``--kv-cache-memory-bytes`` of launched servers (vLLM reserves several GiB by default on CPU)."""
    startup_timeout_s: float = Field(300.0, gt=0)
    parity_tolerance: float | None = Field(None, gt=0)
    """Largest |log-prob difference| between the servers and the actor accepted after a sync
    (checked on a row of the step just trained); None: by ``dtype`` (1e-3 for float32)."""
    bucket_mb: int = Field(256, ge=1)
    """Size of one object-store object of the weight sync."""
    pause_mode: Literal["wait", "keep", "abort"] = "wait"
    """vLLM's ``/pause`` during a reload: ``wait`` lets requests in flight finish on the old weights."""


class VerlConfig(BaseModel):
    """rllm-verl's settings (section ``verl:``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model_path: str | None = None
    """A local Hugging Face model directory (weights, tokenizer with a chat template); verl loads it in
    every worker. None: the torch backend's tiny random model built from ``tiny`` (and the run's seed),
    written to a temporary directory at start-up (CPU runs, tests)."""
    tiny: TinyModelSettings = Field(default_factory=TinyModelSettings)
    """The tiny model used when ``model_path`` is not set (as ``torch.tiny``)."""
    device: Literal["cpu", "cuda"] = "cuda"
    """``cpu``: verl's engines on CPU through rllm-verl's CPU platform (gloo, fp32), as in CI."""
    world_size: int = Field(2, ge=1)
    """Training ranks in all (one process and, on GPU, one GPU each; FSDP over all of them)."""
    nnodes: int = Field(1, ge=1)
    """Machines the ranks are spread over, ``world_size / nnodes`` on each (one Ray placement group
    per node); more than one needs ``ray_address`` (a cluster started with ``ray start``)."""
    strategy: Literal["fsdp2", "fsdp"] = "fsdp2"
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP mixed-precision compute dtype (reductions and buffers stay fp32)."""
    attn_implementation: str = "sdpa"
    max_tokens_per_micro_batch: int = Field(16384, ge=1)
    """Token budget of one forward/backward on one rank, for updates and log-probs (verl's dynamic
    batch size: rows are packed into micro-batches up to this many tokens; a longer row runs alone)."""
    gradient_checkpointing: bool = False
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus (verl's ``entropy_coeff``): ``entropy_coef * entropy`` aggregated like the loss is
    subtracted from it, as ``torch.entropy_coef``; keeps a small model exploring."""
    reference: bool | None = None
    """A reference model in the workers (the initial policy, until the engine's ``refresh_reference``);
    None: when ``algorithm.loss.kl_coef > 0``. Set it for hooks that score with the reference without a
    KL loss (OPSD's ``postprocess_opsd``: ``engine.compute_logprobs(..., model="reference")``)."""
    seed: int = 42
    ray_address: str | None = None
    """Join an existing Ray cluster; None: start a local one (and stop it on shutdown)."""
    ray_num_cpus: int | None = None
    """CPUs of a local Ray cluster; None: Ray's default."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment variables for every Ray worker."""
    rollout: Literal["torch", "vllm_http"] = "torch"
    """Who samples. ``torch``: a transformers copy of the policy in each engine worker (verl's rollout
    slot, :class:`rllm_verl.rollout.TorchRollout`), synced by verl's ``naive`` checkpoint engine after
    each update; requests are spread over the workers. ``vllm_http``: vLLM servers over HTTP, token
    in, token out (``vllm``); after each update rank 0 pushes the weights through Ray's object store
    to an agent on each server's host, which reloads them, and parity is checked."""
    vllm: VllmHttpSettings = Field(default_factory=VllmHttpSettings)
    """The servers of ``rollout: vllm_http``."""
    max_new_tokens: int = Field(256, ge=1)
    """Default ``max_tokens`` when a request does not set one."""
    gen_batch_window_ms: float = Field(5.0, ge=0)
    """How long the engine waits to gather concurrent requests into one generation batch."""
    gen_max_batch: int = Field(256, ge=1)
    """Most sequences in one generation batch (split over the workers)."""
    multiturn_cache_size: int = Field(4096, ge=0)
    """Conversations whose sampled tokens the engine remembers, to continue them token-exactly."""
    overrides: list[str] = Field(default_factory=list)
    """Hydra overrides of verl's ``ppo_trainer`` config, applied last (``actor_rollout_ref.actor.x=y``)."""

    @model_validator(mode="after")
    def _ranks_per_node(self) -> VerlConfig:
        if self.world_size % self.nnodes:
            raise ValueError(f"world_size {self.world_size} is not a multiple of nnodes {self.nnodes}")
        return self


def _hydra(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_hydra(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra(v)}" for k, v in value.items()) + "}"
    return str(value)


def actor_loss_settings(loss: LossConfig, loss_scale_factor: float | None = None) -> dict[str, Any]:
    """verl actor keys for ``loss`` (see the module docstring); ``loss_scale_factor`` is the core's
    resolved one (``RLLMConfig.loss_scale_factor()``), used by ``seq-mean-token-sum-norm`` only."""
    unsupported = []
    kl: dict[str, Any] = {"use_kl_loss": False}
    if loss.kl_coef > 0:
        # verl's low_var_kl (k3) is clamped to +-10, its k1 and k2 are not clamped at all
        clamp = VERL_K3_CLAMP if loss.kl_estimator == "k3" else None
        if loss.kl_clamp != clamp:
            unsupported.append(
                f"kl_clamp {loss.kl_clamp} with kl_estimator {loss.kl_estimator} (verl clamps {loss.kl_estimator} "
                f"at {clamp}: set algorithm.loss.kl_clamp: {'null' if clamp is None else clamp})"
            )
        kl = {"use_kl_loss": True, "kl_loss_coef": loss.kl_coef, "kl_loss_type": VERL_KL_TYPES[loss.kl_estimator]}
    if loss.forward_kl_coef > 0:
        unsupported.append("forward_kl_coef (verl's KL loss sees sampled tokens only)")
    if loss.max_log_ratio != VERL_LOG_RATIO_CLAMP:
        unsupported.append(f"max_log_ratio != {VERL_LOG_RATIO_CLAMP:g} (verl clamps the log-ratio at 20)")
    if loss.loss_fn_config:
        unsupported.append("loss_fn_config")
    if unsupported:
        raise NotImplementedError(f"algorithm.loss: not supported by rllm-verl yet: {'; '.join(unsupported)}")
    if loss.name == "ppo":
        clips = {
            "clip_ratio_low": loss.clip_low,
            "clip_ratio_high": loss.clip_high,
            "clip_ratio_c": loss.clip_ratio_c if loss.clip_ratio_c is not None else NO_CLIP,
        }
    elif loss.name == "importance_sampling":
        clips = {"clip_ratio_low": 1.0, "clip_ratio_high": NO_CLIP, "clip_ratio_c": NO_CLIP}
    else:
        raise ValueError(f"algorithm.loss.name: {loss.name!r} is not a verl loss; one of importance_sampling, ppo")
    return {
        **clips,
        "clip_ratio": clips["clip_ratio_low"],
        "policy_loss": {"loss_mode": "vanilla"},
        **loss_agg_settings(loss.agg_mode, loss_scale_factor),
        **kl,
    }


def algorithm_overrides(algorithm: AlgorithmConfig, loss_scale_factor: float | None = None) -> list[str]:
    """Hydra overrides of ``actor_rollout_ref.actor`` for the core's loss and optimiser."""
    if algorithm.loss_by_role:
        raise NotImplementedError("algorithm.loss_by_role: rllm-verl applies one loss to every role (for now)")
    optim = algorithm.optim
    out = []
    for key, value in actor_loss_settings(algorithm.loss, loss_scale_factor).items():
        if isinstance(value, dict):
            out.extend(f"actor_rollout_ref.actor.{key}.{k}={_hydra(v)}" for k, v in value.items())
        else:
            out.append(f"actor_rollout_ref.actor.{key}={_hydra(value)}")
    prefix = "actor_rollout_ref.actor.optim"
    out += [
        f"{prefix}.lr={optim.lr}",
        f"{prefix}.weight_decay={optim.weight_decay}",
        f"{prefix}.betas={_hydra(list(optim.betas))}",
        f"{prefix}.clip_grad={optim.grad_clip if optim.grad_clip is not None else NO_CLIP}",
        # verl's scheduler stays constant: the driver sets each step's lr from the core's schedule
        # (OptimConfig.lr_factor), as the torch backend does, whatever the number of mini-batches
        f"{prefix}.lr_scheduler_type=constant",
        f"{prefix}.lr_warmup_steps=0",
    ]
    return out


def rollout_overrides(cfg: VerlConfig) -> list[str]:
    """verl's rollout settings for ``cfg.rollout``: the torch rollout, one replica per rank, weights
    kept in memory and synced in-process (verl's ``naive`` checkpoint engine)."""
    from rllm_verl.compat import TORCH_ROLLOUT

    arr = "actor_rollout_ref.rollout"
    return [
        f"{arr}.name={TORCH_ROLLOUT}",
        f"{arr}.tensor_model_parallel_size=1",
        f"{arr}.free_cache_engine=false",
        f"{arr}.load_format=auto",
        f"{arr}.checkpoint_engine.backend=naive",
    ]


def engine_overrides(cfg: VerlConfig) -> list[str]:
    """verl's engine settings for ``cfg``: FSDP on every rank, packed sequences, fixed micro-batches."""
    mp = _hydra({"param_dtype": cfg.param_dtype, "reduce_dtype": "fp32", "buffer_dtype": "fp32"})
    arr = "actor_rollout_ref"
    out = [
        f"{arr}.model.path={cfg.model_path}",
        f"{arr}.model.use_remove_padding=true",
        f"{arr}.model.enable_gradient_checkpointing={_hydra(cfg.gradient_checkpointing)}",
        f"+{arr}.model.override_config.attn_implementation={cfg.attn_implementation}",
        f"{arr}.actor.strategy={cfg.strategy}",
        f"{arr}.actor.use_torch_compile=false",
        f"{arr}.actor.entropy_coeff={cfg.entropy_coef}",
        f"{arr}.actor.use_dynamic_bsz=true",
        f"{arr}.actor.ppo_max_token_len_per_gpu={cfg.max_tokens_per_micro_batch}",
        f"{arr}.rollout.log_prob_max_token_len_per_gpu={cfg.max_tokens_per_micro_batch}",
        f"{arr}.ref.log_prob_max_token_len_per_gpu={cfg.max_tokens_per_micro_batch}",
        f"trainer.n_gpus_per_node={cfg.world_size // cfg.nnodes}",
        f"trainer.nnodes={cfg.nnodes}",
        f"trainer.device={cfg.device}",
    ]
    for role in ("actor", "ref"):
        out += [
            f"{arr}.{role}.fsdp_config.strategy={cfg.strategy}",
            f"{arr}.{role}.fsdp_config.model_dtype=fp32",
            f"{arr}.{role}.fsdp_config.use_torch_compile=false",
            f"{arr}.{role}.fsdp_config.seed={cfg.seed}",
            f"+{arr}.{role}.fsdp_config.mixed_precision={mp}",
        ]
    return out


def compose_verl_config(
    cfg: VerlConfig, algorithm: AlgorithmConfig, loss_scale_factor: float | None = None, *, rollout: bool = False
) -> DictConfig:
    """verl's ``ppo_trainer`` config with :func:`engine_overrides`, :func:`algorithm_overrides`,
    :func:`rollout_overrides` (``rollout``), then ``cfg.overrides``. Raises with verl's own message
    when an override names no verl key."""
    import verl
    from hydra import compose, initialize_config_dir

    if cfg.model_path is None:
        raise ValueError("verl.model_path: not resolved (the backend writes the tiny model first)")
    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    overrides = [
        *engine_overrides(cfg),
        *algorithm_overrides(algorithm, loss_scale_factor),
        *(rollout_overrides(cfg) if rollout else []),
        *cfg.overrides,
    ]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def actor_config(verl_config: DictConfig, loss: LossConfig, loss_scale_factor: float | None = None) -> Any:
    """verl's actor config dataclass (what its ``ppo_loss`` reads) from a composed config, with
    ``loss`` applied (:func:`actor_loss_settings`)."""
    from omegaconf import OmegaConf, open_dict
    from verl.utils.config import omega_conf_to_dataclass

    actor = OmegaConf.create(OmegaConf.to_container(verl_config.actor_rollout_ref.actor, resolve=True))
    with open_dict(actor):
        for key, value in actor_loss_settings(loss, loss_scale_factor).items():
            if isinstance(value, dict):
                for k, v in value.items():
                    actor[key][k] = v
            else:
                actor[key] = value
    return omega_conf_to_dataclass(actor)
