"""How a build is executed: `local` (asyncio in this process, the default) or `ray` (worker actors
over deterministic sha256 shards of the images; see rmskit.executors.ray).

Executor settings are not part of BuildConfig on purpose: they change where the work runs, never
what is built, so a run started locally can be resumed on Ray (and back) without a config change."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ExecutorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # None: start a local Ray; "auto" or "host:port": join one (run on a node)
    workers: int = Field(default=2, ge=1)
    # GPUs per worker actor. None: 1 when a stage runs an in-process model (hf:, vllm:, a path) and
    # the cluster has GPUs, else 0 (openai: workers only need the endpoint).
    num_gpus: float | None = Field(default=None, ge=0)
    cpus_per_worker: float = Field(default=1.0, ge=0)
    num_cpus: int | None = Field(default=None, ge=1)  # CPUs of a local Ray started by the driver
    shards: int = Field(default=256, ge=1)  # sha256 shards; shard s is served by worker s % workers
    max_restarts: int = Field(default=3, ge=0)  # per worker actor
    flush_s: float = Field(default=0.5, gt=0)  # how often workers stream finished rows to the driver
    chunk: int = Field(default=8, ge=1)  # images per shipment to a worker


def shard_of(sha256: str, shards: int) -> int:
    """Deterministic shard of an image: the same photos land in the same shards on every run."""
    return int(hashlib.sha256(sha256.encode()).hexdigest()[:12], 16) % shards
