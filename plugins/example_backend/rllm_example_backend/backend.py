"""A tabular softmax policy over a small answer set: the smallest complete rllm backend.

It is a template for third-party backends: every piece a real backend has is here, in pure
Python, small enough to read in one sitting.

What the model reduces to: the prompt (the chat rendered as text, byte-tokenised) selects a row of
logits ``theta[prompt]``, one logit per answer in ``example.answers``; a response is one token, the
index of an answer, sampled from ``softmax(theta[prompt] / temperature)``. Reported logprobs are
those of the untempered policy (what the loss differentiates). Unseen prompts start uniform.

What training reduces to, per step (``update_policy``), over every action token ``a`` of the core's
token rows (``state.rows``), with its advantage ``A`` and aggregation weight ``w``
(``rows.loss_weights(agg_mode)``: ``1 / tokens`` for ``token-mean``)::

    ratio = pi(a) / pi_old(a)                       # pi_old: the sampling logprob in the row
    theta[prompt] += lr * sum_tokens( w * ratio * A * (onehot(a) - softmax(theta[prompt])) )

which is one gradient-ascent step on the importance-sampled policy-gradient objective
(``algorithm.loss.name: importance_sampling``); with ``ppo`` a token whose ratio left the clip
range in the direction its advantage pushes contributes nothing.

The sampler keeps its own copy of the weights and receives the trainer's only in
``on_policy_updated``, like a real backend whose sampler runs apart from its trainer; so async
runs see genuinely stale samples. ``compute_logprobs(model="reference")`` scores under the
initial weights until ``refresh_reference`` (OPSD's teacher).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rllm_core.config import ConfigError, RLLMConfig
from rllm_core.engine import RolloutEngine
from rllm_core.protocol import Backend, TrainerState
from rllm_core.types import ModelOutput, TokenInput

__all__ = ["CHECKPOINT_FILE", "ExampleBackend", "ExampleBackendConfig", "TabularEngine"]

CHECKPOINT_FILE = "example_policy.json"
Table = dict[str, list[float]]


class ExampleBackendConfig(BaseModel):
    """The ``example:`` config section."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    answers: list[str] = Field(default_factory=lambda: [str(i) for i in range(10)], min_length=2)
    """The vocabulary of responses: token id ``i`` decodes to ``answers[i]``."""
    lr: float = Field(2.0, gt=0)
    """Step size on the logits (tabular policies like large steps)."""
    seed: int = 0
    """Seed of the sampler's random generator."""

    @field_validator("answers")
    @classmethod
    def _distinct(cls, answers: list[str]) -> list[str]:
        if len(set(answers)) != len(answers):
            raise ValueError("answers must be distinct")
        return answers


def _softmax(logits: Sequence[float], temperature: float = 1.0) -> list[float]:
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def render(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """The chat template: ``role: content`` lines, then ``assistant:`` when a reply is wanted."""
    text = "".join(f"{m.get('role', 'user')}: {m.get('content', '')}\n" for m in messages)
    return text + "assistant:" if add_generation_prompt else text


class TabularEngine(RolloutEngine):
    """The sampler: byte-level prompts in, one answer token (with its logprob) out."""

    supports_token_in_token_out = True
    supports_logprobs = True

    def __init__(self, answers: Sequence[str], seed: int = 0, default_sampling: Mapping[str, Any] | None = None):
        super().__init__(default_sampling)
        self.answers = list(answers)
        self.policy: Table = {}
        """The weights the sampler serves (replaced by :meth:`load_weights`)."""
        self.reference: Table = {}
        """The teacher / reference weights (the initial policy until :meth:`refresh_reference`)."""
        self.rng = random.Random(seed)

    # -- weights --------------------------------------------------------------------------

    def load_weights(self, table: Table) -> None:
        self.policy = {k: list(v) for k, v in table.items()}

    def logprobs_row(self, prompt_ids: Sequence[int], model: str = "policy") -> list[float]:
        if model not in ("policy", "reference"):
            raise ValueError(f"model must be 'policy' or 'reference', got {model!r}")
        table = self.policy if model == "policy" else self.reference
        logits = table.get(prompt_key(prompt_ids)) or [0.0] * len(self.answers)
        return [math.log(p) for p in _softmax(logits)]

    # -- RolloutEngine --------------------------------------------------------------------

    async def encode_messages(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True):
        return list(render(messages, add_generation_prompt).encode("utf-8"))

    async def _generate(self, messages: list[Mapping[str, Any]], **sampling: Any) -> ModelOutput:
        return self._sample(await self.encode_messages(messages), **sampling)

    async def _generate_tokens(self, token_input: TokenInput, **sampling: Any) -> ModelOutput:
        return self._sample(list(token_input.prompt_ids), **sampling)

    def _sample(self, prompt_ids: list[int], temperature: float = 1.0, **_other: Any) -> ModelOutput:
        # Responses are one token, so length limits and stop strings have nothing to act on.
        logprobs = self.logprobs_row(prompt_ids)
        if temperature <= 0:
            token = max(range(len(logprobs)), key=logprobs.__getitem__)
        else:
            probs = _softmax(logprobs, temperature)
            token = self.rng.choices(range(len(probs)), weights=probs)[0]
        text = self.answers[token]
        return ModelOutput(
            text=text,
            content=text,
            prompt_ids=prompt_ids,
            completion_ids=[token],
            logprobs=[logprobs[token]],
            finish_reason="stop",
        )

    async def compute_logprobs(
        self, prompt_ids: Sequence[int], response_ids: Sequence[int], *, model: str = "policy"
    ) -> list[float]:
        # Every response position is scored under the prompt's row: exact for one-token responses.
        row = self.logprobs_row(prompt_ids, model)
        return [row[t] for t in response_ids]

    async def refresh_reference(self) -> None:
        self.reference = {k: list(v) for k, v in self.policy.items()}


def _rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def prompt_key(prompt_ids: Sequence[int]) -> str:
    """The table row of a byte-tokenised prompt."""
    try:
        return bytes(prompt_ids).decode("utf-8", errors="replace")
    except (TypeError, ValueError):
        raise ValueError("the example backend's prompt ids are bytes (ints in 0..255)") from None


class ExampleBackend(Backend):
    """Trainer side: owns the trainable logits, the optimiser step and checkpoints."""

    name = "example"
    config_model = ExampleBackendConfig

    def __init__(self, config: RLLMConfig) -> None:
        super().__init__(config)
        settings = self.backend_config
        if not isinstance(settings, ExampleBackendConfig):  # config not validated through the registry
            settings = ExampleBackendConfig.model_validate(settings or {})
        self.settings: ExampleBackendConfig = settings
        self.logits: Table = {}
        """The trainable weights; the sampler gets a copy in :meth:`on_policy_updated`."""
        self.updates = 0
        self.rollout_engine: TabularEngine | None = None

    def init_rollout_engine(self, **kwargs: Any) -> TabularEngine:
        if self.rollout_engine is None:
            self.rollout_engine = TabularEngine(self.settings.answers, seed=self.settings.seed)
            self.rollout_engine.load_weights(self.logits)
            self.rollout_engine.reference = {k: list(v) for k, v in self.logits.items()}
        return self.rollout_engine

    def validate_config(self, config: RLLMConfig) -> None:
        loss = config.algorithm.loss.name
        if loss not in ("importance_sampling", "ppo"):
            raise ConfigError(
                f"algorithm.loss.name: the example backend supports 'importance_sampling' and 'ppo', got {loss!r}"
            )
        temperature = config.rollout.train_sampling.get("temperature", 1.0)
        if not isinstance(temperature, int | float) or temperature < 0:
            raise ConfigError(f"rollout.train_sampling.temperature: must be a number >= 0, got {temperature!r}")

    async def update_policy(self, state: TrainerState) -> None:
        # Train on the core's token rows (state.rows): never on the steps directly, so masks,
        # multi-turn merging and the aggregation mode mean what they mean on every backend.
        rows = state.rows
        loss_cfg = self.config.algorithm.loss
        clip = (1 - loss_cfg.clip_low, 1 + loss_cfg.clip_high) if loss_cfg.name == "ppo" else None
        weights = rows.loss_weights(loss_cfg.agg_mode, self.config.loss_scale_factor())
        n = len(self.settings.answers)
        grads: Table = {}
        tokens = clipped = 0
        objective = 0.0
        for k in range(len(rows.steps)):
            prompt, response, sampled = rows.step_tokens(k)
            base = int(rows.offsets[rows.step_row[k]] + rows.step_start[k])
            key = prompt_key(prompt)
            probs = _softmax(self.logits.get(key) or [0.0] * n)
            grad = grads.setdefault(key, [0.0] * n)
            for i, token in enumerate(response):
                adv, w, old_lp = float(rows.advantages[base + i]), float(weights[base + i]), float(sampled[i])
                if math.isnan(old_lp):  # the engine gave no logprob: the current policy's
                    old_lp = math.log(probs[token])
                tokens += 1
                ratio = probs[token] / math.exp(old_lp)
                objective += w * ratio * adv
                if clip is not None and ((adv > 0 and ratio > clip[1]) or (adv < 0 and ratio < clip[0])):
                    clipped += 1
                    continue
                for j in range(n):
                    grad[j] += w * ratio * adv * ((j == token) - probs[j])
        for key, grad in grads.items():
            row = self.logits.setdefault(key, [0.0] * n)
            for j in range(n):
                row[j] += self.settings.lr * grad[j]
        self.updates += 1
        norm = math.sqrt(sum(g * g for grad in grads.values() for g in grad))
        state.metrics.update(
            {
                "example/tokens": float(tokens),
                "example/objective": objective,
                "example/grad_norm": norm,
                "example/clip_fraction": clipped / max(tokens, 1),
            }
        )

    async def on_policy_updated(self, state: TrainerState, version: int) -> None:
        # Push the new weights to the sampler, then let it stamp outputs with the new version.
        if self.rollout_engine is not None:
            self.rollout_engine.load_weights(self.logits)
        await super().on_policy_updated(state, version)

    def save_checkpoint(self, path: Path) -> None:
        engine = self.rollout_engine
        payload = {
            "answers": self.settings.answers,
            "updates": self.updates,
            "logits": self.logits,
            "sampler": engine.policy if engine is not None else self.logits,
            "reference": engine.reference if engine is not None else {},
            "weight_version": engine.weight_version if engine is not None else 0,
            "rng_state": _rng_state(engine.rng) if engine is not None else None,
        }
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CHECKPOINT_FILE).write_text(json.dumps(payload))

    def load_checkpoint(self, path: Path) -> None:
        file = Path(path) / CHECKPOINT_FILE
        if not file.is_file():
            raise FileNotFoundError(f"example backend: no {CHECKPOINT_FILE} in checkpoint {path}")
        payload = json.loads(file.read_text())
        if payload["answers"] != self.settings.answers:
            raise ValueError(
                f"example backend: checkpoint {path} was trained with answers {payload['answers']}, "
                f"but example.answers is {self.settings.answers}"
            )
        self.logits = {k: list(v) for k, v in payload["logits"].items()}
        self.updates = int(payload["updates"])
        engine = self.init_rollout_engine()
        engine.load_weights(payload["sampler"])
        engine.reference = {k: list(v) for k, v in payload["reference"].items()}
        engine.set_weight_version(int(payload["weight_version"]))
        if payload.get("rng_state") is not None:
            version, internal, gauss = payload["rng_state"]
            engine.rng.setstate((version, tuple(internal), gauss))
