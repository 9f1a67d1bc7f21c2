"""Config: pydantic models are the schema; omegaconf loads, merges, interpolates and overrides.

``load_config("a.yaml", "b.yaml", overrides=["trainer.mode=async"])`` merges the files in order,
applies dotlist overrides, resolves ``${...}`` interpolations and validates. Errors name the
field path (``algorithm.adv_estimator: ...``). Sections owned by plugins (the chosen backend's
section, each enabled hook's and logger's settings) are validated against the model the plugin
registered, through the registry.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from rllm_core.types import TerminationReason

__all__ = [
    "AlgorithmConfig",
    "AsyncConfig",
    "ConfigError",
    "DataConfig",
    "ExploreConfig",
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
    """Registered workflow name or ``module:attr`` (the module must be importable)."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments: ``wf(task, engine, **args)`` for a function, ``Cls(**args)`` for a ``Workflow`` class."""
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
    """Keyword arguments for the reward function: ``fn(task, action, **args)``."""
    timeout: float = Field(30.0, gt=0)
    """Seconds per reward call; a timeout scores 0 and is counted in ``reward/timeouts``."""


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


class ExploreConfig(_Section):
    """Exploration for tasks the policy cannot solve at all (``rollout.explore``)."""

    temperature: float | None = Field(None, gt=0)
    """A task none of whose rollouts was correct in its latest group is sampled at this temperature
    until one is, and those rollouts are trained at it (their old logprobs are the tempered ones, so
    the ratio stays exact). A token that every other task pushes down (the one answer digit only a
    few facts need) can sink so low that no group at temperature 1 ever finds it; tempered rollouts
    do, and dynamic sampling trains only the groups that succeed. None: off. Needs a backend that
    trains each row at its own temperature (the torch backend)."""
    after_correct: float = Field(0.5, ge=0, le=1)
    """Tasks join only once a step's rollouts are at least this fraction correct: early on nearly
    every task fails, and tempering them all slows the first successes."""


class RolloutConfig(_Section):
    n: int = Field(8, ge=1)
    """Rollouts per task in training (the group size)."""
    n_val: int = Field(1, ge=1)
    """Rollouts per task in validation (pass@k uses k <= n_val)."""
    train_sampling: dict[str, Any] = Field(default_factory=dict)
    """Sampling arguments bound into the engine workflows get in training (a per-call argument wins)."""
    val_sampling: dict[str, Any] = Field(default_factory=lambda: {"temperature": 0.0})
    """Sampling arguments for validation rollouts."""
    tool_parser: str | None = None
    """Registered tool-call parser (``hermes``, ``llama3_json``, ``tiny``, or a plugin's) that splits each
    completion into content and OpenAI-format ``tool_calls``; None: no parsing (``get_model_response``
    with ``tools`` then refuses). See docs/agents.md."""
    reasoning_parser: str | None = None
    """Registered reasoning parser (``think``: ``<think>...</think>``) that moves reasoning out of the
    content into ``ModelOutput.reasoning``; None: no parsing."""
    explore: ExploreConfig = Field(default_factory=ExploreConfig)
    """Tempered sampling of the tasks no rollout solves (see :class:`ExploreConfig`)."""


class FilterConfig(_Section):
    drop_uniform_rewards: bool = False
    """Drop groups whose rewards are all equal (they carry no GRPO signal)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: tasks whose groups all have equal rewards are dropped *and replaced*:
    generation goes on with more tasks until the step holds ``data.train_batch_size`` informative
    tasks, or ``max_sample_rounds`` batches' worth were generated (sync and async). Implies
    ``drop_uniform_rewards``; train metrics stay over everything generated."""
    max_sample_rounds: int = Field(3, ge=1)
    """Dynamic sampling: at most this many batches' worth of tasks generated for one step; past it
    the step trains on the informative tasks it has."""
    anchor_collapsed: int = Field(0, ge=0)
    """Dynamic sampling: keep up to this many *collapsed* tasks a step beside the informative ones,
    from everything the step generated (sync: its rounds; async: the tasks it took or discarded).
    Collapsed: every rollout failed alike and at least ``collapse_share`` of them gave the same
    answer (a policy sure of a wrong answer, not one that has not found the right one yet). GRPO
    gives them advantage 0, so only the KL terms and the entropy bonus act on them; with
    ``loss.forward_kl_rows: no_signal`` the forward KL pulls exactly them back toward the
    reference. 0: off."""
    collapse_share: float = Field(0.5, gt=0, le=1)
    """``anchor_collapsed``: the share of a task's rollouts that must give the same wrong answer."""
    min_group_size: int = Field(1, ge=1)
    """Drop groups with fewer trajectories than this."""
    mask_termination_reasons: list[TerminationReason] = Field(default_factory=list)
    """Leave out of the loss (and of every denominator, the KL and the entropy terms) the episodes that
    ended for these reasons; they still count in their group's baseline. ``max_response_length`` also
    masks every row with a step cut by the length limit (overlong masking, DAPO)."""


class ReplayConfig(_Section):
    """Replay of earlier successes into groups that came back all wrong (``algorithm.replay``)."""

    successes: int = Field(0, ge=0)
    """Per task whose fresh group has no correct rollout, this many of its latest earlier successes
    replace its last rollouts (at most all but one), trained as samples of the current policy (old
    logprobs recomputed, the run's temperature): self-imitation, as in ExGRPO and RLEP. The group
    then teaches again what the policy had found and lost, instead of being dropped as uniform.
    Replayed copies count in no ``train/`` metric. 0: off. Needs a backend that recomputes the old
    logprobs a row lacks (torch, verl)."""
    max_tasks: int = Field(100_000, ge=1)
    """Tasks whose successes are kept (the least recently successful are forgotten first)."""


class LossConfig(_Section):
    name: str = "importance_sampling"
    """Policy loss: ``importance_sampling``, ``ppo`` (clip) or backend specific."""
    agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    """How token losses of the batch's rows become one number (docs/rows.md has the exact weights):
    ``token-mean`` (DAPO), ``seq-mean-token-mean`` (GRPO paper), ``seq-mean-token-sum``,
    ``seq-mean-token-sum-norm`` (Dr.GRPO: token sums over a constant, ``loss_scale_factor``)."""
    loss_scale_factor: float | None = Field(None, gt=0)
    """The constant divisor of ``seq-mean-token-sum-norm`` (verl's name); None: the training
    ``max_tokens`` (``rollout.train_sampling.max_tokens``). Never the batch's longest response."""
    clip_low: float = Field(0.2, ge=0)
    """Lower PPO clip: the ratio is kept above ``1 - clip_low``."""
    clip_high: float = Field(0.28, ge=0)
    """Upper PPO clip (clip-higher, DAPO)."""
    clip_ratio_c: float | None = Field(None, gt=1)
    """Dual-clip PPO: for negative advantages the token loss is capped at ``-clip_ratio_c * A``
    (verl uses 3.0); None: off."""
    max_log_ratio: float = Field(20.0, gt=0)
    """The log importance ratio is clamped to ``[-max_log_ratio, max_log_ratio]`` before ``exp``, so a
    very stale or mismatched token cannot overflow to inf (and ``inf * 0`` to NaN)."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the reference policy (0 disables the reference)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL(policy || reference) estimate, ``d = logp - ref_logp``: ``k1 = d``,
    ``k2 = d^2 / 2``, ``k3 = exp(-d) + d - 1`` (non-negative, low variance)."""
    kl_clamp: float | None = Field(10.0, gt=0)
    """The per-token KL estimate is clamped to ``[-kl_clamp, kl_clamp]`` (verl's low-var-KL bound)."""
    forward_kl_coef: float = Field(0.0, ge=0)
    """Weight of the exact forward KL(reference || policy) over the whole vocabulary at each action
    token (0: off). Mass-covering where ``kl_estimator``'s reverse KL is mode-seeking: a token the
    reference gives probability keeps some, so an answer the policy has not found yet stays
    reachable instead of collapsing to another prompt's answer (benchmarks/learning measures it).
    Needs the reference's full distribution: backends that see only sampled tokens reject it."""
    forward_kl_rows: Literal["all", "no_signal"] = "all"
    """Where ``forward_kl_coef`` acts: on every action token, or only on tokens whose advantage is 0
    (``no_signal``: the collapsed groups ``filter.anchor_collapsed`` keeps, where nothing else pulls)."""
    old_logprobs: Literal["sampler", "recompute"] = "sampler"
    """What the importance ratio divides by. ``sampler``: the logprobs recorded when sampling, so the
    ratio corrects both staleness (async) and any sampler/trainer mismatch. ``recompute``: the trainer
    recomputes them with its current weights before the update (a proximal policy); then the ratio
    is 1 at the first update and staleness is corrected only through ``tis_cap``."""
    tis_cap: float | None = Field(None, gt=0)
    """Truncated importance sampling for ``old_logprobs: recompute``: each token's loss is weighted by
    ``min(exp(recomputed - sampler logprob), tis_cap)`` (verl's rollout correction), which corrects
    stale samples and engines whose sampler logprobs differ from the trainer's (vLLM, Tinker).
    None: no correction (async mode then warns)."""
    loss_fn_config: dict[str, Any] = Field(default_factory=dict)
    """Backend-specific settings of the named loss, passed as they are (e.g. Tinker's ``dro``: ``{beta: 0.05}``)."""

    @property
    def uses_reference(self) -> bool:
        """Whether a KL term needs a reference model (``kl_coef`` or ``forward_kl_coef`` above 0)."""
        return self.kl_coef > 0 or self.forward_kl_coef > 0


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
    mini_batch_size: int | None = Field(None, ge=1)
    """Rows per optimiser step (verl's ``ppo_mini_batch_size`` times ``rollout.n``): each pass shuffles
    the step's rows into mini-batches of this size (the last may be smaller), one step each with its
    own loss aggregation; None: one step on all rows. A fixed size, not a fixed count, so a step
    with little data (dynamic sampling found few informative tasks) takes few steps (``mini_batches``
    fixes the count instead). After the first step the updates are off-policy: the ratio and the PPO
    clip act."""
    mini_batches: int | None = Field(None, ge=1)
    """Optimiser steps per pass, whatever the step's row count (tinker-cookbook's ``num_substeps``):
    the rows are cut into this many near-equal mini-batches, so a step with little data (early on,
    or once most tasks are solved and dynamic sampling finds few informative ones) still takes as
    many steps as a full one. Instead of ``mini_batch_size``; None: that rule."""
    shuffle: Literal["rows", "groups"] = "rows"
    """What each pass shuffles into mini-batches: single ``rows``, or whole ``groups`` (a group's rows
    stay together, as in verl's mini-batches of prompts: cheaper where a backend runs a shared prompt
    once per mini-batch, but each optimiser step then sees fewer tasks)."""
    epochs: int = Field(1, ge=1)
    """Passes over a training step's rows (verl's ``ppo_epochs``, TRL's ``num_iterations``). The
    learning-rate schedule advances once per training step, whatever the number of optimiser steps."""

    @model_validator(mode="after")
    def _one_split(self) -> OptimConfig:
        if self.mini_batch_size is not None and self.mini_batches is not None:
            raise ValueError("set mini_batch_size (rows per optimiser step) or mini_batches (steps per pass), not both")
        return self

    def lr_factor(self, step: int, total_steps: int | None) -> float:
        """The schedule's multiplier of ``lr`` at training step ``step`` (0-based): linear warm-up,
        then constant, linear or cosine decay to 0 at ``total_steps``."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        total = total_steps or 1
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        if self.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class AlgorithmConfig(_Section):
    adv_estimator: str = "grpo"
    """Registered advantage estimator for roles without an entry in ``estimator_map``."""
    estimator_map: dict[str, str] = Field(default_factory=dict)
    """Per-role estimator, e.g. ``{judge: reinforce}``."""
    norm_adv_by_std: bool = True
    """GRPO: divide by the group's reward std."""
    std_unbiased: bool = True
    """Standard deviations with Bessel's correction (``ddof = 1``, as verl and TRL); false: the
    population std, which makes GRPO advantages ``sqrt(n / (n - 1))`` larger for groups of ``n``."""
    use_precomputed_advantage: bool = False
    """Steps carry their own per-token advantages (OPSD, distillation); estimators skip them."""
    stepwise_mode: Literal["broadcast"] = "broadcast"
    """How a trajectory advantage reaches its steps: on every step."""
    filter: FilterConfig = Field(default_factory=FilterConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    loss_by_role: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-role changes to ``loss``, e.g. ``{judge: {name: importance_sampling}}``: each entry is merged
    over ``loss`` (fields it does not name keep ``loss``'s values). See :meth:`loss_for`."""
    optim: OptimConfig = Field(default_factory=OptimConfig)

    _role_losses: dict[str, LossConfig] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _build_role_losses(self) -> AlgorithmConfig:
        self._role_losses = {}
        for role, changes in self.loss_by_role.items():
            try:
                self._role_losses[role] = LossConfig.model_validate({**self.loss.model_dump(), **changes})
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise ValueError(f"loss_by_role.{role}.{where}: {err['msg']}") from None
        return self

    def loss_for(self, role: str) -> LossConfig:
        """The loss settings of ``role``: ``loss`` with that role's ``loss_by_role`` entry merged over it."""
        return self._role_losses.get(role, self.loss)

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
    gc_every: int = Field(10, ge=0)
    """Python's automatic garbage collection is off while training, and a full collection runs after
    every k steps (torchtitan's ``gc_freq``, Megatron's manual GC): each automatic full pass re-walks
    every live episode of the step, 8% of the main job's step. 0: Python's automatic collection."""
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
    max_requeues: int = Field(2, ge=0)
    """Times a task is generated again after its result was dropped as stale or its generation
    failed; after that it is given up (``async/given_up``)."""


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

    @model_validator(mode="after")
    def _check_anchor(self) -> RLLMConfig:
        flt = self.algorithm.filter
        if flt.anchor_collapsed and not flt.dynamic_sampling:
            raise ValueError("algorithm.filter.anchor_collapsed needs filter.dynamic_sampling")
        return self

    @model_validator(mode="after")
    def _check_loss_scale(self) -> RLLMConfig:
        if self.algorithm.loss.agg_mode == "seq-mean-token-sum-norm" and self.loss_scale_factor() is None:
            raise ValueError(
                "algorithm.loss.loss_scale_factor: seq-mean-token-sum-norm divides by a constant; set it "
                "(e.g. the max response length) or set rollout.train_sampling.max_tokens"
            )
        return self

    def loss_scale_factor(self) -> float | None:
        """``algorithm.loss.loss_scale_factor``, else the training ``max_tokens`` (None when neither is set)."""
        factor = self.algorithm.loss.loss_scale_factor
        if factor is None:
            max_tokens = self.rollout.train_sampling.get("max_tokens")
            factor = float(max_tokens) if isinstance(max_tokens, int | float) and max_tokens > 0 else None
        return factor

    def section(self, name: str) -> dict[str, Any]:
        """A plugin's raw section (``{}`` when absent)."""
        return dict((self.model_extra or {}).get(name) or {})

    def plugin_config(self, name: str) -> Any:
        """A plugin section validated by :func:`validate_plugin_sections` (else the raw dict)."""
        return self._plugin_configs.get(name, self.section(name))

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-able dict (aliases used, e.g. ``async``)."""
        return self.model_dump(mode="json", by_alias=True)


_HEADER = "invalid config:\n"


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        full = f"{prefix}.{path}" if prefix and path else (prefix or path or "(root)")
        lines.append(f"  {full}: {err['msg']}")
    return _HEADER + "\n".join(lines)


def _validate_section(model: Any, raw: Any, path: str) -> Any:
    try:
        return model.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path)) from None


def validate_plugin_sections(config: RLLMConfig, registry: Any | None = None) -> RLLMConfig:
    """Resolve every name the config gives and validate the sections plugins own.

    What the trainer calls first, so that a bad name fails before a model is built:
    ``backend: auto`` becomes the installed backend with the highest priority (never one
    registered with ``auto=False``, such as the simulated test backend); the backend, hooks,
    loggers and estimators must be registered (hooks and loggers may be ``module:attr``);
    ``workflow.name`` and ``reward.name`` must resolve to a workflow / a callable that accepts
    ``workflow.args`` / ``reward.args``; ``rollout.tool_parser`` and ``rollout.reasoning_parser`` must
    name registered parsers that build; the backend's section and each hook's and logger's
    settings are validated with the pydantic model the plugin registered (defaults filled in).
    Every problem is reported at once, in one ``ConfigError``, by its field. A top-level key
    that is neither a core section nor a plugin's name (a misspelt ``trainr:`` would otherwise
    pass as a plugin section) gets a ``UserWarning`` naming the closest known name.

    Validated models are kept on the config (``config.plugin_config(name)``), also those that
    validated when another part did not.
    """
    from rllm_core.parsers import build_parser
    from rllm_core.plugins import UnknownPluginError, get_registry
    from rllm_core.workflows import resolve_reward, resolve_workflow

    registry = registry or get_registry()
    _warn_unknown_sections(config, registry)
    problems: list[str] = []
    listed = False  # a pydantic error: problems are shown as a list under "invalid config:"

    def check(where: str, fn: Any, *args: Any) -> Any:
        nonlocal listed
        try:
            return fn(*args)
        except UnknownPluginError as exc:
            problems.append(f"{where}: {exc}")
        except ConfigError as exc:
            text = str(exc)
            if text.startswith(_HEADER):
                listed = True
                problems.extend(line.strip() for line in text[len(_HEADER) :].splitlines())
            else:
                problems.append(text)
        return None

    config._plugin_configs = {}
    backend = config.backend if config.backend != "auto" else check("backend", registry.default_backend)
    reg = check("backend", registry.get, "backend", backend) if backend is not None else None
    if reg is not None:
        config.backend = backend
        if reg.config_model is not None:
            section = check(backend, _validate_section, reg.config_model, config.section(backend), backend)
            if section is not None:
                config._plugin_configs[backend] = section
    for kind, field in (("hook", "hooks"), ("logger", "loggers")):
        settings_by_name = getattr(config, field)
        for name, settings in settings_by_name.items():
            reg = check(f"{field}.{name}", registry.get, kind, name)
            if reg is not None and reg.config_model is not None:
                section = check(name, _validate_section, reg.config_model, settings, f"{field}.{name}")
                if section is not None:
                    settings_by_name[name] = section.model_dump()
    for role, est in {"": config.algorithm.adv_estimator, **config.algorithm.estimator_map}.items():
        check(f"algorithm.estimator_map.{role}" if role else "algorithm.adv_estimator", registry.get, "estimator", est)
    if config.workflow.name is not None:
        check("workflow.name", resolve_workflow, config.workflow.name, config.workflow.args)
    if config.reward.name is not None:
        check("reward.name", resolve_reward, config.reward.name, config.reward.args)
    for kind in ("tool_parser", "reasoning_parser"):
        name = getattr(config.rollout, kind)
        if name is not None:
            check(f"rollout.{kind}", build_parser, kind, name, registry)
    if problems:
        if listed or len(problems) > 1:
            raise ConfigError(_HEADER + "\n".join(f"  {p}" for p in problems))
        raise ConfigError(problems[0])
    return config


def _warn_unknown_sections(config: RLLMConfig, registry: Any) -> None:
    """Warn about top-level keys that no core section and no plugin owns (typos, usually)."""
    from rllm_core.plugins import KNOWN_PROVIDERS

    extra = config.model_extra or {}
    if not extra:
        return
    core = {field.alias or name for name, field in RLLMConfig.model_fields.items()}
    plugins = {name for kind in registry.KINDS for name in registry.names(kind)}
    plugins |= {name for _, name in KNOWN_PROVIDERS}  # e.g. a tinker: section in a file shared with other setups
    for key in extra:
        if key in plugins:
            continue
        close = difflib.get_close_matches(key, sorted(core | plugins), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        warnings.warn(
            f"config section {key!r} is neither a core section nor the name of an installed plugin; "
            f"it is kept as a plugin section{hint}",
            UserWarning,
            stacklevel=3,
        )


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
        # A mapping meeting a list at the same key: omegaconf 2.3.0 raises a bare TypeError, 2.3.1
        # a ConfigTypeError ("Cannot merge DictConfig with ListConfig"); say it in our words too.
        text = str(exc)
        if "DictConfig with ListConfig" in text or "ListConfig with DictConfig" in text or isinstance(exc, TypeError):
            text = f"incompatible values for one key: a mapping in one source, a list in another ({text.strip()})"
        raise ConfigError(f"config: {text}") from None
    try:
        config = RLLMConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    if validate_plugins:
        validate_plugin_sections(config)
    return config
