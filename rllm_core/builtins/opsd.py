"""Built-in hook plugin ``opsd``: on-policy self-distillation as per-token advantages.

Switched on from config alone::

    hooks: {opsd: {coef: 1.0, teacher_key: teacher_messages}}
    algorithm: {use_precomputed_advantage: true}

What it reduces to. A workflow puts a teacher context on a step, ``step.info["teacher_messages"]``
(e.g. the prompt plus the reference solution). The teacher is the same model seeing that context.
For the step's response tokens ``y_1..y_T`` (sampled by the student, who saw only the prompt)::

    r_t = coef * (log p_teacher(y_t | teacher prompt, y_<t) - log p_student(y_t | prompt, y_<t))
    A_t = sum_{k >= t} gamma^(k - t) * r_k          (gamma = 0: A_t = r_t)
    A_t = clip(A_t, -clip, clip)                    (when clip is set)

and ``step.advantage = [A_1, ..., A_T]``. Maximising ``sum_t A_t log p(y_t)`` pushes the student's
token distribution towards the teacher's: ``-r_t / coef`` is the per-token sample of the reverse KL
``KL(student || teacher)``. Student logprobs are the sampling logprobs on the step (else computed
under ``model="policy"``); teacher logprobs come from ``engine.compute_logprobs(teacher_prompt_ids,
response_ids, model=...)``, where the teacher is

* ``initial``: the initial policy, frozen (``model="reference"``; the reference is set to the
  policy at the start of a fresh run),
* ``refresh``: the reference, refreshed to the current policy every ``refresh_every`` versions,
* ``current``: the current policy itself (``model="policy"``).

Only trajectories whose role is in ``roles`` (all when unset) are touched, so one role can train
with OPSD while another uses an estimator: with ``use_precomputed_advantage`` a group whose steps
all carry lists keeps them, the other groups get the estimator. Scoring calls for all steps of an
episode run concurrently. Works on every backend whose engine implements ``encode_messages``,
``compute_logprobs`` and (for ``initial``/``refresh``) ``refresh_reference``.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rllm_core.hookspecs import hookimpl
from rllm_core.types import Episode, Step

__all__ = ["OPSDConfig", "OPSDHook", "opsd_advantages"]


class OPSDConfig(BaseModel):
    """Settings under ``hooks.opsd``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    coef: float = 1.0
    """Scale of the per-token reward ``teacher_lp - student_lp``."""
    teacher_key: str = "teacher_messages"
    """Key of ``step.info`` holding the teacher's messages; steps without it are left alone."""
    gamma: float = Field(0.0, ge=0.0, le=1.0)
    """Discount of future per-token rewards; 0 keeps each token's own reward."""
    clip: float | None = Field(None, gt=0)
    """Bound on ``|advantage|`` per token; None: no clipping."""
    teacher: Literal["initial", "refresh", "current"] = "initial"
    """Which weights score the teacher context (see the module docstring)."""
    refresh_every: int = Field(1, ge=1)
    """With ``teacher: refresh``: refresh the teacher every this many policy versions."""
    roles: list[str] | None = None
    """Trajectory roles (``Trajectory.name``) to process; None: every role."""
    missing_teacher: Literal["skip", "zero"] = "skip"
    """A processed role's step without a teacher context: ``skip`` leaves it alone (its group then
    goes to the estimator), ``zero`` gives it zero advantages (its group stays precomputed)."""


def opsd_advantages(
    teacher_logprobs: Sequence[float],
    student_logprobs: Sequence[float],
    coef: float = 1.0,
    gamma: float = 0.0,
    clip: float | None = None,
) -> list[float]:
    """Per-token advantages from teacher and student logprobs of the same response tokens."""
    if len(teacher_logprobs) != len(student_logprobs):
        raise ValueError(
            f"teacher scored {len(teacher_logprobs)} tokens but the student has {len(student_logprobs)} logprobs"
        )
    rewards = [coef * (t - s) for t, s in zip(teacher_logprobs, student_logprobs, strict=True)]
    if gamma:
        running = 0.0
        for i in range(len(rewards) - 1, -1, -1):
            running = rewards[i] + gamma * running
            rewards[i] = running
    if clip is not None:
        rewards = [min(clip, max(-clip, r)) for r in rewards]
    return rewards


def _teacher_messages(value: Any, where: str) -> list[Mapping[str, Any]]:
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        if all(isinstance(m, Mapping) and "content" in m for m in value):
            return list(value)
    raise ValueError(f"opsd: {where} must be a non-empty list of chat messages ({{'role', 'content'}} dicts)")


class OPSDHook:
    """The ``opsd`` hook plugin: built by the trainer as ``OPSDHook(settings)``."""

    config_model = OPSDConfig

    def __init__(self, settings: Mapping[str, Any] | OPSDConfig | None = None) -> None:
        if isinstance(settings, OPSDConfig):
            self.config = settings
        else:
            self.config = OPSDConfig.model_validate(dict(settings or {}))
        self.teacher_model = "policy" if self.config.teacher == "current" else "reference"
        self.teacher_version = 0
        """Policy version the teacher was last refreshed to."""
        self.refreshes = 0
        self.steps_scored = 0
        self._engine: Any = None

    # -- scoring --------------------------------------------------------------------------

    async def score_step(self, step: Step, engine: Any, where: str) -> list[float]:
        """Per-token OPSD advantages of one step (does not write them)."""
        cfg = self.config
        messages = _teacher_messages(step.info[cfg.teacher_key], f"{where} info[{cfg.teacher_key!r}]")
        response = list(step.response_ids)
        teacher_prompt = await engine.encode_messages(messages)
        teacher_call = engine.compute_logprobs(teacher_prompt, response, model=self.teacher_model)
        if step.logprobs and len(step.logprobs) == len(response):
            teacher_lp = await teacher_call
            student_lp = list(step.logprobs)
        else:
            prompt = step.prompt_ids or await engine.encode_messages(step.chat_completions.to_list())
            teacher_lp, student_lp = await asyncio.gather(
                teacher_call, engine.compute_logprobs(prompt, response, model="policy")
            )
        return opsd_advantages(teacher_lp, student_lp, cfg.coef, cfg.gamma, cfg.clip)

    async def process(self, episode: Episode, engine: Any) -> int:
        """Write per-token advantages on every eligible step of ``episode``; return how many."""
        cfg = self.config
        todo: list[tuple[Step, str]] = []
        for trajectory in episode.trajectories:
            if cfg.roles is not None and trajectory.name not in cfg.roles:
                continue
            for i, step in enumerate(trajectory.steps):
                if cfg.teacher_key in step.info:
                    where = (
                        f"episode (task_id={episode.task_id!r}, rollout_idx={episode.rollout_idx}) "
                        f"role {trajectory.name!r} step {i}"
                    )
                    todo.append((step, where))
                elif cfg.missing_teacher == "zero":
                    step.advantage = [0.0] * len(step.response_ids)
        results = await asyncio.gather(*(self.score_step(step, engine, where) for step, where in todo))
        n_tokens = 0
        total = 0.0
        for (step, _), advantages in zip(todo, results, strict=True):
            step.advantage = advantages
            n_tokens += len(advantages)
            total += sum(advantages)
        if todo:
            episode.metrics["opsd/steps"] = float(len(todo))
            episode.metrics["opsd/advantage_mean"] = total / n_tokens if n_tokens else 0.0
        self.steps_scored += len(todo)
        return len(todo)

    # -- trainer hooks --------------------------------------------------------------------

    @hookimpl
    async def postprocess_opsd(self, episode: Episode, engine: Any, config: Any) -> None:
        self._engine = engine
        await self.process(episode, engine)

    @hookimpl
    async def on_train_start(self, trainer: Any) -> None:
        engine = self._trainer_engine(trainer)
        self.teacher_version = int(getattr(trainer, "served_version", 0) or 0)
        fresh = getattr(trainer, "resumed_from", None) is None and not getattr(trainer, "step", 0)
        # "The initial policy" must exist as a reference model; on resume the backend's checkpoint
        # restores the reference it had, so only a fresh run snapshots the policy.
        if self.teacher_model == "reference" and fresh and engine is not None:
            try:
                await engine.refresh_reference()
            except NotImplementedError as exc:
                warnings.warn(f"opsd: teacher {self.config.teacher!r} needs a reference model: {exc}", stacklevel=2)

    @hookimpl
    async def on_policy_updated(self, trainer: Any, version: int) -> None:
        if self.config.teacher != "refresh" or version - self.teacher_version < self.config.refresh_every:
            return
        engine = self._trainer_engine(trainer)
        if engine is None:
            raise RuntimeError("opsd: cannot refresh the teacher: the trainer exposes no rollout engine")
        await engine.refresh_reference()
        self.teacher_version = version
        self.refreshes += 1

    def _trainer_engine(self, trainer: Any) -> Any:
        for name in ("engine", "rollout_engine"):
            engine = getattr(trainer, name, None)
            if engine is not None:
                return engine
        backend = getattr(trainer, "backend", None)
        return getattr(backend, "rollout_engine", None) or self._engine


@hookimpl
def register_hooks(register: Any) -> None:
    register("opsd", OPSDHook, config_model=OPSDConfig)
