"""The one configuration object for every xrayq process (env prefix ``XRAYQ_``).

Two ways to run share one code path: with no service URLs set, everything lives under ``XRAYQ_HOME``
(SQLite file, local-disk object store, file-system Celery transport) -- the embedded mode; with
``XRAYQ_DATABASE_URL`` / ``XRAYQ_BROKER_URL`` / ``XRAYQ_S3_ENDPOINT_URL`` set, the same code talks to
Postgres, Redis and S3/MinIO -- the services mode.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# A guessable bootstrap key opens every organisation's data: shorter ones are refused at start-up.
MIN_ADMIN_KEY_LENGTH = 32


class Settings(BaseSettings):
    # An empty variable means "the default": docker-compose.yml passes every setting as `${XRAYQ_X:-}`,
    # so one left out of `.env` arrives empty and must not override a number or a default name.
    model_config = SettingsConfigDict(env_prefix="XRAYQ_", env_file=None, extra="ignore", env_ignore_empty=True)

    # Where the embedded mode keeps its state (database file, objects, broker spool).
    home: Path = Path(".xrayq")
    # Real data to train the starter model from (see ../shared/data/README.md).
    data_dir: Path = Path("../shared/data")

    # Services. Empty means "embedded default under `home`".
    database_url: str = ""
    broker_url: str = ""
    # Prefix for every Redis key Celery writes, so several deployments (or test runs) share one Redis.
    broker_key_prefix: str = ""
    s3_endpoint_url: str = ""
    s3_bucket: str = "xrayq"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_region: str = "us-east-1"
    # Local object store folder for the embedded mode (default: `home`/objects).
    storage_dir: Path | None = None

    # Authentication. "auto": API keys required unless embedded on a loopback address.
    auth: Literal["auto", "on", "off"] = "auto"
    # Bootstrap admin key (XRAYQ_ADMIN_KEY): create the real keys with it. Empty: `xrayq migrate` creates
    # an admin key in the database (stored hashed) and prints it once, when no active admin key exists.
    admin_key: str = ""
    # Seconds a gateway process remembers a checked API key; a key revoked through another gateway
    # process stops working within this time (0: every request queries the database).
    auth_cache_s: float = Field(default=5.0, ge=0)
    # How long the dashboard's session cookie (an API key exchanged at POST /v1/session) stays valid: a
    # working shift, after which the page asks for the key again.
    session_ttl_s: float = Field(default=8 * 3600, gt=0, le=7 * 24 * 3600)

    # Wrong API keys a client address may send per minute before it gets 429s (0: unlimited).
    auth_failures_per_minute: int = Field(default=30, ge=0)
    # Requests one API key may make per minute, and state-changing requests (submissions, uploads,
    # runs) per day; 0: unlimited. Counted in Redis in services mode, so every gateway shares them.
    rate_limit_per_key: int = Field(default=0, ge=0)
    daily_quota_per_key: int = Field(default=0, ge=0)

    # Browsers: origins allowed to call the API from a web page (comma-separated); none by default.
    cors_origins: str = ""
    # Host names the open mode answers besides `host`, the `public_url`'s host and loopback names
    # (comma-separated): a foreign Host header is a DNS-rebinding page reaching the unauthenticated API.
    allowed_hosts: str = ""
    # Inputs of finished jobs are deleted from storage after this many days (0: kept forever).
    input_retention_days: float = 30.0
    # An input object no job row refers to (a submission that failed after storing it) is deleted once
    # it is this old (0: never); the grace covers uploads whose transaction has not committed yet.
    orphaned_input_grace_s: float = Field(default=3600.0, ge=0)
    # Audit events are deleted after this many days (0: kept forever); 2190 days is six years.
    audit_retention_days: float = 2190.0

    # Gateway.
    host: str = "127.0.0.1"
    # Who may read the gateway's /metrics: anyone ("open", what a Prometheus on a private network
    # scrapes), only an admin key as a bearer token ("key"), or nobody ("off": 404).
    metrics_access: Literal["open", "key", "off"] = "open"
    # The interactive API documentation (/docs, /redoc) and the schema (/openapi.json): "off" hides all
    # three, so the gateway does not describe itself to whoever reaches it.
    api_docs: Literal["on", "off"] = "on"
    port: int = 8000
    public_url: str = ""  # how clients reach the gateway, for Location headers; default http://host:port
    # Processes `xrayq gateway` serves HTTP with, on one socket (1: the plain uvicorn process). With
    # more, /metrics sums every process's samples and one process at a time runs the housekeeping.
    gateway_processes: int = Field(default=1, ge=1, le=64)
    # Set by `xrayq gateway` for its processes, not by operators: prometheus_client's own variable
    # (read when it is imported), the folder where each process writes its samples.
    prometheus_multiproc_dir: Path | None = Field(default=None, validation_alias="PROMETHEUS_MULTIPROC_DIR")

    # Upload limits: a request body, a single file, decoded pixels, a ZIP's contents.
    max_request_bytes: int = 256 * 1024 * 1024
    max_file_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    min_image_side: int = 32
    max_batch_files: int = 1000
    max_zip_expanded_bytes: int = 512 * 1024 * 1024
    max_wait_seconds: float = 60.0
    # Threads: long-polls beyond `max_long_polls` per process answer at once; long-polls and housekeeping read
    # the database on pools of their own, so neither can take the threads a submission needs.
    max_long_polls: int = Field(default=256, ge=0)
    long_poll_threads: int = Field(default=8, ge=1)
    housekeeping_threads: int = Field(default=2, ge=1)
    # Dataset uploads (POST /v1/datasets): bigger than any batch, still bounded.
    max_dataset_upload_bytes: int = 4 * 1024 * 1024 * 1024
    max_dataset_files: int = 200_000
    max_dataset_expanded_bytes: int = 16 * 1024 * 1024 * 1024
    # Imported weights (POST /v1/models/{name}/import): a request body, held twice in memory while checked.
    max_weights_upload_bytes: int = 1024 * 1024 * 1024
    # Secret for the keyed UIDs and patient pseudonyms of DICOM training data (PS3.15 de-identification).
    # Set it to keep one patient's pseudonym stable across uploads; empty: a new random key per upload.
    deidentification_key: str = ""

    # Worker.
    predict_chunk_size: int = Field(default=32, ge=1, le=512)
    # A single job's message also takes other waiting single jobs, up to a chunk: dynamic batching.
    coalesce_singles: bool = True
    # The same input bytes from the same organisation, answered by the same version, get that version's
    # stored answer (marked `cached`) instead of another fetch, decode and forward pass.
    result_cache: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Torch threads per worker (and trainer) process; 0: a worker shares the cores out among its
    # processes, the trainer takes them all.
    torch_threads: int = 0
    # Inference processes per `xrayq worker`; 0: on a CPU two (one decodes while the other runs the
    # model: decoding holds the GIL, and two single-threaded forward passes beat one two-threaded pass
    # on a busy machine), on a GPU one per 4 cores, at most 4. Each holds its own copy of the model.
    worker_concurrency: int = Field(default=0, ge=0)
    # Where `xrayq worker`, `xrayq trainer` and `xrayq dicom` serve their Prometheus metrics, on all
    # interfaces (0: not at all); the gateway serves its own at /metrics.
    worker_metrics_port: int = 9101
    trainer_metrics_port: int = 9102
    dicom_metrics_port: int = 9103
    model_cache_size: int = 3
    max_attempts: int = 3

    # Reconciler (in one gateway process at a time, see shared/db/process_lock.py): republishes jobs
    # whose message was lost.
    reconcile_interval_s: float = 10.0  # 0: off
    # A queued job published this long before the oldest message still waiting on `predict` (or before
    # now, when it is empty) is lost: covers commit-to-publish, a prefetched message, and clock skew.
    requeue_after_s: float = 30.0
    stale_running_after_s: float = 300.0  # a claim this old lost its worker: another may take the job

    # Models.
    default_model: str = "chest-xray"

    # Trainer. A running training run whose trainer has not written a heartbeat for this long lost its
    # trainer (killed, machine gone): the reconciler queues it again, to continue from its last epoch's
    # checkpoint, at most `run_max_resumes` times; the next loss fails it with `trainer_lost`.
    run_heartbeat_s: float = 5.0
    run_stale_after_s: float = 120.0
    run_max_resumes: int = Field(default=3, ge=0)
    max_training_epochs: int = 500
    # DICOM receiver (`xrayq dicom`, a C-STORE SCP; its own process under `xrayq up`).
    dicom_port: int = 11112  # 0: no receiver
    dicom_host: str = ""  # where it listens; default: `host`
    dicom_ae_title: str = "XRAYQ"
    # Who may associate: comma-separated `TITLE@network:organisation` entries (`network` an address or a
    # CIDR block, IPv6 in brackets: `[fd00::]/8`; `:organisation` optional, default `dicom_organisation`).
    # A sender is known by its calling AE title *and* its source address; the same title from two
    # networks may file under two organisations. Required outside the embedded mode on loopback, where
    # `TITLE` alone (any address) and an empty list (any sender) are still accepted.
    dicom_allowed_ae_titles: str = ""
    dicom_organisation: str = "dicom"  # organisation of DIMSE senders whose entry names none
    dicom_model: str = ""  # model for DIMSE-received studies; default: `default_model`
    # Associations at once: in all, and from one source address (idle ones included).
    dicom_max_associations: int = Field(default=16, ge=1)
    dicom_max_associations_per_peer: int = Field(default=4, ge=1)
    # Where Structured Reports go back by C-STORE, as `AE_TITLE@host:port` (empty: not sent), for the
    # studies of `dicom_sr_organisation` only (default: `dicom_organisation`). Other organisations'
    # destinations are managed through `/v1/sr-destinations`.
    dicom_sr_destination: str = ""
    dicom_sr_organisation: str = ""
    # ACSE, DIMSE and idle-network timeout: an association silent for this long is aborted.
    dicom_network_timeout_s: float = Field(default=30.0, gt=0)

    # Study batches: a study is complete once no instance of it has arrived for this long (as Orthanc's
    # "stable study" and MONAI Deploy's grouping timeout). Checked every `study_check_interval_s`.
    study_stable_after_s: float = Field(default=30.0, ge=0)
    study_check_interval_s: float = Field(default=1.0, gt=0)

    # Results pushed out (SR by C-STORE, HMAC-signed callbacks): attempts, and the first retry pause
    # (doubling each time).
    # Server secret from which each organisation's callback signing secret is derived (HMAC with the
    # organisation's name), for callbacks whose request sent no `callback_secret` of its own.
    callback_secret: str = ""
    callback_timeout_s: float = Field(default=10.0, gt=0)  # each step: connect, send, each read
    # Callbacks go only to public addresses over https. Networks listed here (comma-separated CIDRs, e.g.
    # `127.0.0.0/8` for tests and local receivers, `10.20.0.0/16` for a hospital's own RIS) may be reached
    # too, over http as well: an admin's decision, never a client's.
    callback_allow_networks: str = ""
    # Per-organisation callback hosts, as JSON: {"radiology-1": ["ris.example.org", "*.hooks.example.org"]}.
    # A listed organisation may register only these hosts; "*" applies to every organisation not listed.
    callback_allowed_hosts: dict[str, list[str]] = Field(default_factory=dict)
    delivery_attempts: int = Field(default=6, ge=1)
    delivery_retry_after_s: float = Field(default=5.0, gt=0)
    # One attempt of one delivery (DNS, connect, TLS, request, answer; or the whole C-STORE association)
    # ends after this many seconds of wall clock, however slowly the other side trickles.
    delivery_deadline_s: float = Field(default=30.0, gt=0)
    # Deliveries run in a pool of this many threads per gateway, at most `delivery_per_destination` at
    # once to one host:port and `delivery_per_organisation` for one organisation: a slow receiver holds
    # only its own share.
    delivery_workers: int = Field(default=8, ge=1)
    delivery_per_destination: int = Field(default=2, ge=1)
    delivery_per_organisation: int = Field(default=4, ge=1)
    # Circuit breaker: after this many consecutive failures a destination is skipped for the cool-down
    # (recorded on the deliveries it holds back), then tried again with one delivery.
    delivery_breaker_failures: int = Field(default=5, ge=1)
    delivery_breaker_cooldown_s: float = Field(default=60.0, gt=0)

    # Worker and trainer liveness: their Celery event loop touches a file under `home`/liveness this often;
    # `xrayq healthcheck worker|trainer` calls a file older than three intervals a hung process.
    liveness_interval_s: float = Field(default=10.0, gt=0)

    # Logging: "json" for services, "text" for a person at a terminal.
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    # Celery task events, which Flower (`xrayq flower`) shows; "auto": on in services mode (a few
    # publishes per message on Redis, measured in the README), off in embedded mode.
    task_events: Literal["auto", "on", "off"] = "auto"
    # `xrayq flower`: its port, and `user:password` for its basic authentication (required off loopback).
    flower_port: int = 5555
    flower_basic_auth: str = ""
    # OpenTelemetry traces (gateway -> broker -> worker), sent by OTLP over HTTP to this collector
    # (e.g. http://otel-collector:4318); empty: no tracing. Needs the `otel` extra.
    otel_endpoint: str = ""

    @field_validator("admin_key")
    @classmethod
    def _admin_key_is_long(cls, key: str) -> str:
        if key and len(key) < MIN_ADMIN_KEY_LENGTH:
            raise ValueError(
                f"XRAYQ_ADMIN_KEY is {len(key)} characters long: set it to at least {MIN_ADMIN_KEY_LENGTH} random "
                "characters (e.g. the output of `openssl rand -hex 32`), or leave it empty to have `xrayq migrate` "
                "create an admin key and print it once"
            )
        return key

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        home = self.home.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{home / 'xrayq.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.storage_dir is None:
            self.storage_dir = home / "objects"
        if not self.public_url:
            self.public_url = f"http://{self.host}:{self.port}"
        return self

    @property
    def embedded(self) -> bool:
        """True when nothing points at external services (the laptop mode)."""
        return self.uses_sqlite and self.uses_filesystem_broker and not self.uses_s3

    @property
    def auth_enabled(self) -> bool:
        if self.auth != "auto":
            return self.auth == "on"
        return not (self.embedded and self.host in ("127.0.0.1", "localhost", "::1"))

    @property
    def sends_task_events(self) -> bool:
        return self.task_events == "on" or (self.task_events == "auto" and not self.uses_filesystem_broker)

    @property
    def dicom_bind_host(self) -> str:
        return self.dicom_host or self.host

    @property
    def dicom_sr_destination_organisation(self) -> str:
        return self.dicom_sr_organisation or self.dicom_organisation

    @property
    def uses_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.broker_url.startswith("filesystem")

    @property
    def uses_s3(self) -> bool:
        return bool(self.s3_endpoint_url)

    @property
    def broker_spool_dir(self) -> Path:
        return self.home.resolve() / "broker"


@lru_cache
def get_settings() -> Settings:
    return Settings()
