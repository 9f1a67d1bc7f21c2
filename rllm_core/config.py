"""Config: pydantic models are the schema; omegaconf loads, merges, interpolates and overrides.

``load_config("a.yaml", "b.yaml", overrides=["trainer.mode=async"])`` merges the files in order,
applies dotlist overrides, resolves ``${...}`` interpolations and validates. Errors name the
field path (``algorithm.adv_estimator: ...``). Sections owned by plugins (the chosen backend's
section, each enabled hook's and logger's settings) are validated against the model the plugin
registered, through the registry.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from rllm_core.types import TerminationReason

__all__ = [
    "AlgorithmConfig",
    "AsyncConfig",
    "ConfigError",
    "DataConfig",
    "FilterConfig",
    "LossConfig",
    "OptimConfig",
    "RLLMConfig",
    "RewardConfig",
    "RolloutConfig",
    "TrainerConfig",
    "WorkflowConfig",
    "format_validation_error",
    "load_config",
    "validate_plugin_sections",
]


class ConfigError(ValueError):
    """Invalid config; the message lists each bad field by its dotted path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True)


class WorkflowConfig(_Section):
    name: str | None = None
    """Registered workflow name or ``module:attr``."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for a ``Workflow`` class (or passed to a workflow function as ``args``)."""
    max_concurrency: int = Field(64, ge=1)
    """Episodes running at once."""
    timeout: float | None = Field(None, gt=0)
    """Seconds per episode before it ends with termination reason ``timeout``."""
    retries: int = Field(0, ge=0)
    """Extra attempts for an episode that ends in error."""
    raise_on_error: bool = False
    """Re-raise workflow exceptions instead of recording error episodes (debugging)."""


class RewardConfig(_Section):
    name: str | None = None
    """Registered reward function or ``module:attr``, applied where the workflow left no reward."""
    args: dict[str, Any] = Field(default_factory=dict)
    timeout: float = Field(30.0, gt=0)
    """Seconds per reward call; a timeout scores 0 and is counted."""


class DataConfig(_Section):
    train: str | list[dict[str, Any]] | None = None
    """A ``.jsonl``/``.json``/``.parquet`` path, a ``module:attr`` list or callable returning tasks, or inline tasks."""
    val: str | list[dict[str, Any]] | None = None
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Hold out this fraction of ``train`` for validation when ``val`` is not given."""
    train_batch_size: int = Field(8, ge=1)
    """Tasks per training step (each gets ``rollout.n`` rollouts)."""
    val_batch_size: int | None = Field(None, ge=1)
    shuffle: bool = True
    id_key: str = "id"
    """Task field used as ``task_id`` (falls back to the row index)."""
    data_source_key: str = "data_source"
    """Task field that splits validation metrics per data source."""


class RolloutConfig(_Section):
    n: int = Field(8, ge=1)
    """Rollouts per task in training (the group size)."""
    n_val: int = Field(1, ge=1)
    """Rollouts per task in validation (pass@k uses k <= n_val)."""
    train_sampling: dict[str, Any] = Field(default_factory=dict)
    """Sampling arguments bound into the engine workflows get in training (a per-call argument wins)."""
    val_sampling: dict[str, Any] = Field(default_factory=lambda: {"temperature": 0.0})
    """Sampling arguments for validation rollouts."""


class FilterConfig(_Section):
    drop_uniform_rewards: bool = False
    """Drop groups whose rewards are all equal (they carry no GRPO signal)."""
    min_group_size: int = Field(1, ge=1)
    """Drop groups with fewer trajectories than this."""
    mask_termination_reasons: list[TerminationReason] = Field(default_factory=list)
    """Zero the advantages of episodes that ended for these reasons (e.g. ``max_response_length``)."""


class LossConfig(_Section):
    name: str = "importance_sampling"
    """Policy loss: ``importance_sampling``, ``ppo`` (clip) or backend specific."""
    agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """How token losses become one number; ``seq-mean-token-sum-norm`` is Dr.GRPO's."""
    clip_low: float = Field(0.2, ge=0)
    """Lower PPO clip: the ratio is kept above ``1 - clip_low``."""
    clip_high: float = Field(0.28, ge=0)
    """Upper PPO clip (clip-higher, DAPO)."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the reference policy (0 disables the reference)."""


class OptimConfig(_Section):
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warm-up (how the backend decays ``lr`` over the run)."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warm-up from 0 to ``lr``."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Max global grad norm; None disables clipping."""


class AlgorithmConfig(_Section):
    adv_estimator: str = "grpo"
    """Registered advantage estimator for roles without an entry in ``estimator_map``."""
    estimator_map: dict[str, str] = Field(default_factory=dict)
    """Per-role estimator, e.g. ``{judge: reinforce}``."""
    norm_adv_by_std: bool = True
    """GRPO: divide by the group's reward std."""
    use_precomputed_advantage: bool = False
    """Steps carry their own per-token advantages (OPSD, distillation); estimators skip them."""
    stepwise_mode: Literal["broadcast"] = "broadcast"
    """How a trajectory advantage reaches its steps: on every step."""
    filter: FilterConfig = Field(default_factory=FilterConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)

    @field_validator("stepwise_mode", mode="before")
    @classmethod
    def _map_deprecated_stepwise(cls, value: Any) -> Any:
        if value == "per_step":
            warnings.warn(
                "algorithm.stepwise_mode 'per_step' is deprecated; it is mapped to 'broadcast'",
                DeprecationWarning,
                stacklevel=2,
            )
            return "broadcast"
        return value


class TrainerConfig(_Section):
    mode: Literal["sync", "async"] = "sync"
    project: str = "rllm"
    name: str = "run"
    run_dir: str | None = None
    """Where checkpoints, metrics and plots go; default ``runs/<project>/<name>``."""
    epochs: int = Field(1, ge=1)
    total_steps: int | None = Field(None, ge=1)
    """Stop after this many training steps (overrides ``epochs`` when reached first)."""
    val_every: int = Field(0, ge=0)
    """Validate every k steps (0: never during training)."""
    val_before_train: bool = False
    val_at_end: bool = False
    save_every: int = Field(0, ge=0)
    """Checkpoint every k steps (0: only at the end and on interruption)."""
    keep_checkpoints: int = Field(2, ge=1)
    resume: str = "auto"
    """``auto`` (latest checkpoint in run_dir, if any), ``off``, or a checkpoint path (false: off, true: auto)."""
    seed: int = 0
    log_episodes: int = Field(4, ge=0)
    """Episodes per step handed to loggers' ``log_episodes``."""

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_from_bool(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted ``off``/``no`` (``trainer.resume=off`` on the command line) as false.
        if value is False:
            return "off"
        if value is True:
            return "auto"
        return value

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.project / self.name


class AsyncConfig(_Section):
    max_staleness: int = Field(1, ge=0)
    """No trained sample is older than this many policy versions."""
    sync_every: int = Field(1, ge=1)
    """Push weights to the sampler every k optimiser updates."""
    partial_rollout: bool = False
    """Keep generating across a weight sync instead of pausing and draining."""


class RLLMConfig(BaseModel):
    """The whole run. Unknown top-level keys are plugin sections (e.g. ``torch:``)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, use_attribute_docstrings=True)

    backend: str = "auto"
    """Registered backend name; ``auto`` picks the installed one with the highest priority."""
    workflow: WorkflowConfig = Field(default_factory=WorkflowConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    async_: AsyncConfig = Field(default_factory=AsyncConfig, alias="async")
    loggers: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"console": {}, "jsonl": {}})
    """Logger name -> settings. A list of names is accepted."""
    hooks: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Trainer-hook plugin name (or ``module:attr``) -> settings; only listed hooks run."""

    _plugin_configs: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("loggers", "hooks", mode="before")
    @classmethod
    def _names_to_dict(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, str):
            value = [value]
        if isinstance(value, Sequence) and not isinstance(value, str):
            return {name: {} for name in value}
        if isinstance(value, Mapping):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    def section(self, name: str) -> dict[str, Any]:
        """A plugin's raw section (``{}`` when absent)."""
        return dict((self.model_extra or {}).get(name) or {})

    def plugin_config(self, name: str) -> Any:
        """A plugin section validated by :func:`validate_plugin_sections` (else the raw dict)."""
        return self._plugin_configs.get(name, self.section(name))

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-able dict (aliases used, e.g. ``async``)."""
        return self.model_dump(mode="json", by_alias=True)


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        full = f"{prefix}.{path}" if prefix and path else (prefix or path or "(root)")
        lines.append(f"  {full}: {err['msg']}")
    return "invalid config:\n" + "\n".join(lines)


def _validate_section(model: Any, raw: Any, path: str) -> Any:
    try:
        return model.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path)) from None


def validate_plugin_sections(config: RLLMConfig, registry: Any | None = None) -> RLLMConfig:
    """Validate the sections that plugins own, and resolve ``backend: auto``.

    Validated models are kept on the config (``config.plugin_config(name)``).
    """
    from rllm_core.plugins import UnknownPluginError, get_registry

    registry = registry or get_registry()
    validated: dict[str, Any] = {}
    try:
        if config.backend == "auto":
            config.backend = registry.default_backend()
        reg = registry.get("backend", config.backend)
    except UnknownPluginError as exc:
        raise ConfigError(f"backend: {exc}") from None
    if reg.config_model is not None:
        validated[config.backend] = _validate_section(reg.config_model, config.section(config.backend), config.backend)
    for kind, section in (("hook", "hooks"), ("logger", "loggers")):
        for name, settings in getattr(config, section).items():
            try:
                reg = registry.get(kind, name)
            except UnknownPluginError as exc:
                raise ConfigError(f"{section}.{name}: {exc}") from None
            if reg.config_model is not None:
                getattr(config, section)[name] = _validate_section(
                    reg.config_model, settings, f"{section}.{name}"
                ).model_dump()
    for role, est in {"": config.algorithm.adv_estimator, **config.algorithm.estimator_map}.items():
        try:
            registry.get("estimator", est)
        except UnknownPluginError as exc:
            where = f"algorithm.estimator_map.{role}" if role else "algorithm.adv_estimator"
            raise ConfigError(f"{where}: {exc}") from None
    config._plugin_configs = validated
    return config


_FREE_FORM_DICTS = (
    ("workflow", "args"),
    ("reward", "args"),
    ("rollout", "train_sampling"),
    ("rollout", "val_sampling"),
    ("algorithm", "estimator_map"),
)


def load_config(
    *sources: str | Path | Mapping[str, Any] | RLLMConfig,
    overrides: Sequence[str] = (),
    validate_plugins: bool = False,
) -> RLLMConfig:
    """Load, merge and validate config files or dicts; ``overrides`` are ``a.b=c`` strings.

    With ``validate_plugins`` the plugin-owned sections are validated too (the trainer does this).
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    # The schema's defaults go first, so interpolations can see them. Free-form dicts are left out
    # (a dict you set replaces the default one, so ``{}`` stays ``{}``), and so are ``loggers`` and
    # ``hooks``, which a file may give as a list.
    defaults = RLLMConfig().to_dict()
    for key in ("loggers", "hooks"):
        defaults.pop(key)
    for section, key in _FREE_FORM_DICTS:
        defaults[section].pop(key)
    parts = [OmegaConf.create(defaults)]
    for src in sources:
        if isinstance(src, RLLMConfig):
            parts.append(OmegaConf.create(src.to_dict()))
        elif isinstance(src, Mapping):
            parts.append(OmegaConf.create(dict(src)))
        else:
            path = Path(src)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            try:
                parts.append(OmegaConf.load(path))
            except (OmegaConfBaseException, ValueError, yaml.YAMLError) as exc:
                raise ConfigError(f"{path}: {exc}") from None
    try:
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got: {', '.join(bad)}")
            parts.append(OmegaConf.from_dotlist(list(overrides)))
        merged = parts[0]
        for part in parts[1:]:
            # A list of names means "exactly these": it replaces the loggers/hooks set so far
            # (omegaconf cannot merge a list into a mapping); a mapping merges as usual.
            for key in ("loggers", "hooks"):
                if key in part and OmegaConf.is_list(part[key]) and key in merged:
                    merged[key] = None
            merged = OmegaConf.merge(merged, part)
        raw = OmegaConf.to_container(merged, resolve=True)
    except (OmegaConfBaseException, TypeError) as exc:
        # omegaconf raises a bare TypeError when a mapping meets a list at the same key.
        raise ConfigError(f"config: {exc}") from None
    try:
        config = RLLMConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    if validate_plugins:
        validate_plugin_sections(config)
    return config
