"""The one Settings object.

Built once in an entrypoint (the CLI, a worker's ``main``) and passed down; nothing else reads the
environment. Precedence, highest first: keyword arguments, ``NEXTTURN_*`` environment variables, the TOML
file given to :meth:`Settings.load`, defaults. The defaults are the embedded setup: a SQLite event log and a
SQLite store in one data directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from nextturn.errors import ConfigError

_ENV_PREFIX = "NEXTTURN_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=_ENV_PREFIX, extra="forbid", toml_file=None)

    data_dir: Path = Path(".nextturn")
    # Derived from data_dir when not given: sqlite:///<data dir>/nextturn.db.
    database_url: str | None = None
    # Postgres connections each process keeps (SQLAlchemy's pool): db_pool_size open, up to db_max_overflow more
    # under load, each replaced after db_pool_recycle_s (a managed Postgres or a pooler in front closes idle
    # ones); a caller waits at most db_pool_timeout_s for a free one, then gets a 503 (the store is busy).
    db_pool_size: int = Field(default=5, ge=1, le=1000)
    db_max_overflow: int = Field(default=10, ge=0, le=1000)
    db_pool_recycle_s: float = Field(default=1800.0, gt=0)
    db_pool_timeout_s: float = Field(default=30.0, gt=0)
    bus: Literal["sqlite", "kafka"] = "sqlite"
    kafka_bootstrap_servers: str | None = None
    # The Kafka topics, created at first use with these (an existing topic keeps its own; docs/operations.md):
    # every topic has the same partitions (the most consumers of one group that get work), this many replicas,
    # and producers' writes (acks=all) are refused while fewer than kafka_min_insync_replicas are in sync.
    kafka_partitions: int = Field(default=8, ge=1, le=10_000)
    kafka_replication_factor: int = Field(default=3, ge=1, le=32)
    kafka_min_insync_replicas: int = Field(default=2, ge=1, le=32)
    # A managed Kafka: TLS (SSL, SASL_SSL) checks the brokers against kafka_ssl_cafile (else the system's CAs)
    # and presents kafka_ssl_certfile/keyfile where the brokers ask for a client certificate (PEM files);
    # SASL (SASL_PLAINTEXT, SASL_SSL) signs in with the mechanism, user name and password.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    engine: Literal["embedded", "vllm", "openai"] = "embedded"
    model: str | None = None  # a local model directory (embedded, vllm) or the upstream's model name
    upstream_url: str | None = None  # engine=openai: the upstream's base URL, e.g. https://host/v1
    upstream_api_key: str | None = None
    # engine=vllm: the vLLM server's base URL (what `nextturn vllm serve` starts), and how it is started.
    vllm_url: str = "http://127.0.0.1:8001"
    vllm_api_key: str | None = None
    vllm_python: str | None = None  # the Python of vLLM's environment; default: the one running nextturn
    vllm_max_loras: int = Field(default=4, ge=1)  # adapters served at once: stable, canary, draining ones
    vllm_max_lora_rank: int = Field(default=16, ge=1)  # must be at least trainer_lora_rank
    # Adapters vLLM keeps in CPU memory (its own LRU cache: every scope's versions are registered, and vLLM
    # loads one on use and drops the least recently used); at least vllm_max_loras.
    vllm_max_cpu_loras: int = Field(default=64, ge=1)
    # engine=embedded: adapters kept in memory at once (least recently used ones are dropped past it, and
    # loaded again from disk by the next request for them).
    engine_max_adapters: int = Field(default=16, ge=1)
    # How long the gateway waits on a model server: for a connection, and for each piece of its answer.
    engine_connect_timeout_s: float = Field(default=10.0, gt=0)
    engine_read_timeout_s: float = Field(default=120.0, gt=0)
    # How the model writes tool calls in its text (nextturn.tool_formats), for the embedded and vllm engines:
    # auto reads it off the model's chat template; none leaves calls in the content.
    tool_call_format: Literal["auto", "nextturn", "hermes", "llama3", "mistral", "none"] = "auto"
    host: str = "127.0.0.1"
    # uvicorn's access log, one line per request; off by default: it cost about 8% of the gateway's
    # CPU time per streamed request (bench/gateway_overhead.py), and /metrics counts requests anyway.
    access_log: bool = False
    port: int = Field(default=8000, ge=1, le=65535)
    # "key:tenant,key2:tenant2" for the embedded default; production keys live in the store.
    api_keys: str = ""
    admin_key: str | None = None
    # The largest request body the gateway reads (413 above). A turn event must stay under the event
    # log's 16 MiB per event, and it carries the request's messages plus the response.
    max_request_bytes: int = Field(default=8 * 2**20, ge=1024, le=12 * 2**20)
    # A streamed answer whose client stops reading (the connection's buffers full) for this long is ended:
    # its generation stops and the model server's connection is freed; the turn is recorded as the client's.
    stream_stall_timeout_s: float = Field(default=30.0, gt=0)
    # Each gateway runs a recorder (event log → store) in a child process. Off: recorders run on their own
    # (`nextturn record`), scaled apart from the gateways; their consumer group shares the work either way.
    gateway_recorder: bool = True
    # GET /metrics (Prometheus; version-level counts, no tenant's data), and FastAPI's /docs, /redoc and
    # /openapi.json (the admin routes' shapes: off unless asked for).
    metrics: bool = True
    api_docs: bool = False
    # Each tenant's share of a gateway replica (0: no limit); over it, a 429 with Retry-After.
    tenant_requests_per_minute: int = Field(default=0, ge=0)
    tenant_tokens_per_minute: int = Field(default=0, ge=0)  # prompt and completion tokens
    tenant_concurrent_requests: int = Field(default=0, ge=0)
    # Directories besides <data dir>/adapters from which POST /v1/admin/adapters may load an adapter; a JSON
    # list in the environment. Anything else is refused: the route would load any path the gateway can read.
    adapter_load_dirs: list[Path] = []

    # Workers (record, signals run, trainer run, rollout run) touch this file at each round of their loop, and
    # `nextturn alive --within S` checks its age: a health check that tells a stuck loop from a live process.
    heartbeat_file: Path | None = None

    # The signals worker: a turn whose session stays quiet this long is resolved with no next state; at most
    # this many turns wait open (the oldest are resolved early beyond it); a worker's record of a turn is
    # kept this long after its last change (late feedback still gets a revision after that, from the store).
    signals_idle_timeout_s: float = Field(default=300.0, gt=0)
    signals_max_open_cases: int = Field(default=1_000_000, ge=1)
    signals_retention_s: float = Field(default=7 * 86400.0, gt=0)
    # The model judge: any OpenAI-compatible endpoint (its /v1 URL) and the model to ask there. Unset: no
    # judge. Point it at a different, stronger model than the one being trained.
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key: str | None = None
    judge_votes: int = Field(default=3, ge=1, le=15)

    # Which adapter lineage a request learns into and is served from (DESIGN, Scopes; nextturn/scopes.py):
    # deployment (one shared), tenant (each API key's tenant) or user (each end user of a tenant: the request's
    # `user` field or the X-Nextturn-User header). A scope without a version is served by its parent's.
    # Tenants teach only what they are served by default; trainers share any number of scopes (trainer/scopes.py).
    scope_by: Literal["deployment", "tenant", "user"] = "tenant"
    # Tenants whose signals also train the shared lineage (the `default` scope), besides their own scope: a
    # JSON list in the environment, ["*"] for every tenant. Off by default: a tenant's corrections teach
    # only what that tenant is served.
    shared_learning: list[str] = []

    # The trainer (DESIGN, Trainer). rl: rewards only; opd: hints only; combined: both; none: no training.
    train_method: Literal["combined", "rl", "opd", "none"] = "combined"
    # How a hint teaches: "sampled" reweights the tokens the model sampled (the per-token advantage of the
    # DESIGN formula); "distribution" distils the hinted teacher's whole next-token distribution.
    trainer_opd_form: Literal["distribution", "sampled"] = "distribution"
    # Which KL the distribution form takes: forward KL(teacher ‖ student) lifts tokens the model never
    # samples; reverse KL(student ‖ teacher) is mode seeking (trainer/distillation.py says why forward).
    trainer_opd_divergence: Literal["forward", "reverse"] = "forward"
    # Where the distribution form teaches: every response position, or only up to the first token the
    # teacher would not have picked (past it the teacher reads a response it would not write).
    trainer_opd_span: Literal["response", "to_divergence"] = "to_divergence"
    trainer_teacher: Literal["base", "policy"] = "base"  # the hinted teacher: the frozen base, or the policy
    trainer_batch_size: int = Field(default=16, ge=1)  # samples (with a reward or a hint) per update
    trainer_steps_per_batch: int = Field(default=4, ge=1)  # optimizer steps on each batch
    trainer_learning_rate: float = Field(default=3e-3, gt=0, le=1.0)
    trainer_lora_rank: int = Field(default=8, ge=1, le=256)
    trainer_kl_to_base: float = Field(default=0.0, ge=0)  # weight of the KL-to-base anchor; 0: none
    # A sample whose served logprobs are further than this (mean nats per token) from the trainer's policy
    # keeps its hint but loses its reward: RL on answers the policy no longer gives undid learning; 0: off.
    trainer_max_drift: float = Field(default=0.3, ge=0)
    # Samples from a version more than this many versions behind the newest one are refused (counted).
    trainer_max_version_lag: int = Field(default=4, ge=0)
    # Versions published past the stable one before the trainer waits for the rollout to promote one (and
    # rebases on the stable version when the rollout refused them all); 0: no limit. Off without a rollout.
    trainer_max_ahead: int = Field(default=2, ge=0)
    # A tenant's latest accepted hints teach its later samples that carry no hint of their own; 0: off.
    trainer_standing_hints: int = Field(default=3, ge=0)
    # One turn in this many (by a hash of its id) is held out of training for the collapse guards; 0: none.
    trainer_holdout_every: int = Field(default=16, ge=0)
    trainer_keep_versions: int = Field(default=10, ge=1)  # versions kept on disk, besides those deployed
    trainer_device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA (bf16) when available
    # Where a scope has signals from several tenants, the most of a batch one tenant's samples may fill (the
    # rest wait for the others'): no tenant alone teaches an adapter others are served. 1: no cap.
    trainer_max_tenant_share: float = Field(default=0.5, gt=0.0, le=1.0)
    # `trainer run` without --scope trains every scope whose partition it holds, on one copy of the base
    # model; this many scopes keep their adapter and optimizer state in memory, the rest wait in their
    # checkpoints (loaded again when they train).
    trainer_max_resident_scopes: int = Field(default=8, ge=1)
    # Where a scope's lineage begins: its parent's stable version (what serves it until it has its own), or the
    # base model.
    trainer_scope_init: Literal["parent", "base"] = "parent"
    # A quiet scope trains a partial batch (at least trainer_min_batch samples) once its oldest ready sample
    # has waited this long; 0: only full batches. A scope with a few dozen interactions a day then gets
    # several updates instead of one.
    trainer_partial_after_s: float = Field(default=600.0, ge=0)
    trainer_min_batch: int = Field(default=4, ge=1)

    # The rollout (DESIGN, Rollout controller; docs/rollouts.md). A new version serves this share of new
    # sessions, then the next, and is promoted after the last; a JSON list in the environment: [0.1, 0.5].
    rollout_schedule: list[float] = Field(default=[0.1, 0.5], min_length=1)
    # Resolved turns (turns with a reward) each arm needs before the canary may step up or be promoted.
    rollout_min_resolved: int = Field(default=30, ge=1)
    # Step up when P(canary reward > stable reward - margin) reaches this; roll back when
    # P(canary reward < stable reward - margin) does.
    rollout_confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    rollout_reward_margin: float = Field(default=0.05, ge=0.0, le=2.0)
    # Canary turns before the fast guardrails judge it, and turns each weight must serve before the next.
    rollout_guard_min_turns: int = Field(default=10, ge=1)
    # A version whose distinct-1 or distinct-2 is below this share of the base model's is rejected before it
    # serves (a collapse guard). Measured on the words of answers to fixed unrelated prompts (trainer.guards),
    # so that a learnt format (brackets, numbering in every answer) does not read as collapse.
    rollout_min_distinct: float = Field(default=0.9, gt=0.0, le=1.0)
    # Where several tenants' rewards are in, the most of an arm's rewards one tenant's may make (its latest
    # count; the rest are left out): one tenant cannot vote a canary in or out for the others. 1: no cap.
    rollout_max_tenant_share: float = Field(default=0.5, gt=0.0, le=1.0)
    # A canary without enough evidence to decide is rolled back after this long (paused: never).
    rollout_canary_timeout_s: float = Field(default=3600.0, gt=0)
    # When a version's offline evidence may promote it (rollout.gates): auto (where the scope is too quiet for
    # the reward gate), offline (always), reward (never).
    rollout_gate: Literal["auto", "reward", "offline"] = "auto"
    rollout_offline_timeout_s: float = Field(default=86_400.0, gt=0)  # a quiet scope's canary, and the watch
    # How often the controller checks, and gateways re-read the deployment (besides DeploymentChanged).
    rollout_check_interval_s: float = Field(default=2.0, gt=0)
    # A replaced stable version keeps serving the sessions that began on it until none of them has had a
    # turn for this long (on that gateway replica); a rolled-back one stops at once.
    rollout_drain_s: float = Field(default=600.0, ge=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Build Settings from the environment and an optional TOML file; errors become ConfigError."""
        source: type[Settings] = cls
        if config_file is not None:
            if not config_file.is_file():
                raise ConfigError(f"config file {config_file} does not exist; pass an existing TOML file")
            # A subclass that names the file: pydantic-settings reads toml_file from the class config,
            # and this keeps the file's layer below the environment without any global state.
            source = type(cls.__name__, (cls,), {"model_config": {**cls.model_config, "toml_file": config_file}})
        try:
            return source(**overrides)
        except ValidationError as exc:
            raise ConfigError(_explain(exc)) from exc
        except ValueError as exc:  # a TOML syntax error surfaces as tomllib's ValueError subclass
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("sqlite://", "postgresql")):
            raise ValueError(
                "must be a SQLAlchemy URL for SQLite (sqlite:///path/nextturn.db) "
                "or Postgres (postgresql+psycopg://user@host:5432/db)"
            )
        return url

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if self.bus == "kafka" and not self.kafka_bootstrap_servers:
            raise ValueError(
                "NEXTTURN_BUS=kafka needs NEXTTURN_KAFKA_BOOTSTRAP_SERVERS (host:port[,host:port]); "
                "or set NEXTTURN_BUS=sqlite for the embedded event log"
            )
        self._coherent_kafka()
        if self.engine == "openai" and not (self.upstream_url and self.model):
            raise ValueError(
                "NEXTTURN_ENGINE=openai needs NEXTTURN_UPSTREAM_URL (the upstream's /v1 URL) and NEXTTURN_MODEL "
                "(the model name to ask it for)"
            )
        if self.engine == "vllm" and self.vllm_max_lora_rank < self.trainer_lora_rank:
            raise ValueError(f"NEXTTURN_VLLM_MAX_LORA_RANK ({self.vllm_max_lora_rank}) is below the rank the trainer "
                             f"writes (NEXTTURN_TRAINER_LORA_RANK={self.trainer_lora_rank}): vLLM would refuse them")
        if self.judge_url and not self.judge_model:
            raise ValueError("NEXTTURN_JUDGE_URL needs NEXTTURN_JUDGE_MODEL (the model to ask at that endpoint)")
        _ = self.tenant_keys  # parses NEXTTURN_API_KEYS, so that a malformed value fails at start
        weights = self.rollout_schedule
        if any(not 0 < weight < 1 for weight in weights) or weights != sorted(set(weights)):
            raise ValueError(f"NEXTTURN_ROLLOUT_SCHEDULE is rising weights between 0 and 1 (exclusive), "
                             f"like [0.1, 0.5], not {weights}")
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'nextturn.db'}"
        return self

    def _coherent_kafka(self) -> None:
        if self.kafka_min_insync_replicas > self.kafka_replication_factor:
            raise ValueError(f"NEXTTURN_KAFKA_MIN_INSYNC_REPLICAS ({self.kafka_min_insync_replicas}) is above "
                             f"NEXTTURN_KAFKA_REPLICATION_FACTOR ({self.kafka_replication_factor}): every write "
                             "would be refused")
        for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"NEXTTURN_{name.upper()}: {path} is not a file (a PEM file)")
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            raise ValueError("a client certificate needs both NEXTTURN_KAFKA_SSL_CERTFILE and "
                             "NEXTTURN_KAFKA_SSL_KEYFILE")
        uses_sasl = self.kafka_security_protocol.startswith("SASL")
        if uses_sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(f"NEXTTURN_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                             "NEXTTURN_KAFKA_SASL_USERNAME and NEXTTURN_KAFKA_SASL_PASSWORD")

    def environment(self) -> dict[str, str]:
        """These settings as ``NEXTTURN_*`` variables: a child process that builds its Settings from them
        (and from nothing else: see :func:`child_environment`) gets exactly these settings."""
        variables = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            text = json.dumps(value) if isinstance(value, list | dict) else \
                str(value).lower() if isinstance(value, bool) else str(value)
            variables[f"{_ENV_PREFIX}{name.upper()}"] = text
        return variables

    @property
    def tenant_keys(self) -> dict[str, str]:
        """API key -> tenant, from ``api_keys``."""
        keys: dict[str, str] = {}
        for entry in filter(None, (part.strip() for part in self.api_keys.split(","))):
            key, sep, tenant = entry.rpartition(":")
            if not sep or not key or not tenant:
                raise ValueError(f"NEXTTURN_API_KEYS entries look like key:tenant, not {entry!r}")
            keys[key] = tenant
        return keys

    @property
    def model_path(self) -> Path:
        """The local model directory (embedded, vllm): NEXTTURN_MODEL, else ``<data dir>/model``."""
        return Path(self.model) if self.model else self.data_dir / "model"

    @property
    def spool_dir(self) -> Path:
        """Where gateways spool events while the event log is unavailable, one file each."""
        return self.data_dir / "spool"

    @property
    def event_log_path(self) -> Path:
        """The SQLite event log file (bus=sqlite)."""
        return self.data_dir / "events.db"

    @property
    def adapters_path(self) -> Path:
        """Published adapter versions: ``<data dir>/adapters/<scope>/<version>``."""
        return self.data_dir / "adapters"

    @property
    def trainer_path(self) -> Path:
        """The trainer's checkpoints: ``<data dir>/trainer/<scope>``."""
        return self.data_dir / "trainer"

    @property
    def store_url(self) -> str:
        assert self.database_url is not None  # filled in by _coherent
        return self.database_url


def child_environment(settings: Settings, base: dict[str, str]) -> dict[str, str]:
    """``base`` (a process environment) with its ``NEXTTURN_*`` variables replaced by ``settings``'s: a child
    started with it builds the same Settings, whatever the parent's environment or config file said."""
    kept = {key: value for key, value in base.items() if not key.startswith(_ENV_PREFIX)}
    return {**kept, **settings.environment()}


def _explain(exc: ValidationError) -> str:
    """One sentence per problem, naming the environment variable a user would set."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if field:
            problems.append(f"{_ENV_PREFIX}{field.upper()}: {message}")
        else:
            problems.append(message)
    return "invalid settings: " + "; ".join(problems)
