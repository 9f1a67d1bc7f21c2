"""The ``tinker:`` config section (no tinker import here: ``rllm config show`` stays fast)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["TinkerBackendConfig"]


class TinkerBackendConfig(BaseModel):
    """Settings of the ``tinker`` backend. The API key is read from the environment only."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = "Qwen/Qwen3-4B-Instruct-2507"
    """The service's base model the LoRA adapter trains on."""
    base_url: str | None = None
    """Service URL; None: ``$TINKER_BASE_URL``, then the SDK's default."""
    api_key_env: str = "TINKER_API_KEY"
    """Name of the environment variable that holds the API key (never put the key in a config)."""
    service_factory: str | None = None
    """``module:attr`` of a callable ``(TinkerBackendConfig) -> tinker.ServiceClient`` used instead of
    the SDK's client (e.g. ``rllm_tinker.testing:local_service_client``, the in-process stand-in)."""
    rest_factory: str | None = None
    """``module:attr`` of a callable ``(TinkerBackendConfig) -> tinker.RestClient`` (deletes expired
    checkpoints); None: ``tinker.RestClient`` with the same URL and key."""
    lora_rank: int = Field(32, ge=1)
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    seed: int | None = None
    """LoRA init seed; None: ``trainer.seed``."""
    renderer_name: str | None = None
    """tinker-cookbook renderer (``qwen3_instruct``, ``llama3``...); None: the one the cookbook
    recommends for ``base_model``."""
    context_window: int = Field(32768, ge=16)
    """Prompt plus completion tokens the sampler accepts: ``max_tokens`` is clamped to what is left
    after the prompt; a prompt with no room left ends its episode (``max_prompt_length``)."""
    max_train_length: int = Field(32768, ge=1)
    """Longest row ``forward_backward`` accepts; longer rows are dropped (``tinker/dropped_rows``),
    never sent (a rejected request makes the training client unusable)."""
    multiturn_cache_size: int = Field(4096, ge=0)
    """Sampled turns the engine remembers to continue conversations token-exactly (0: re-render
    every turn)."""
    adam_eps: float = Field(1e-8, gt=0)
    """Adam epsilon sent with every ``optim_step`` (the SDK's own default is 1e-12)."""
    resume_from: str | None = None
    """Start from a ``tinker://<run>/weights/<name>`` state (weights and, with ``resume_optimizer``,
    Adam moments) instead of fresh LoRA weights; ``trainer.resume`` from a run directory wins."""
    resume_optimizer: bool = True
    checkpoint_ttl_seconds: int | None = Field(None, ge=3600)
    """TTL of remote checkpoints (None: kept until deleted; the run deletes those beyond
    ``trainer.keep_checkpoints``)."""
    connect_timeout_s: float = Field(10.0, gt=0)
    """A service that does not accept a connection within this fails the run at start-up."""
    create_timeout_s: float = Field(300.0, gt=0)
    """Creating the training client (the service allocates resources) may take this long."""

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_config(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError(
                "api_key: the Tinker API key is never read from a config file (configs are logged and "
                "saved with every checkpoint); export it as $TINKER_API_KEY (or the variable api_key_env names)"
            )
        return data
