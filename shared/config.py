"""One settings model for every vison process, read from ``VISON_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Runtime configuration. Every field maps to ``VISON_<FIELD>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="VISON_", extra="ignore")

    amqp_url: str = Field(
        "amqp://guest:guest@localhost:5672/%2F",
        description="AMQP broker URL (credentials come from the environment, never from code).",
    )
    amqp_ca_file: Path | None = Field(None, description="CA bundle (PEM) checking the broker's certificate (amqps://).")
    amqp_cert_file: Path | None = Field(None, description="Client certificate (PEM) for amqps:// (optional).")
    amqp_key_file: Path | None = Field(None, description="Private key (PEM) of the client certificate (optional).")
    exchange: str = Field("vison", description="Durable topic exchange carrying every event.")
    queue_prefix: str = Field("vison", description="Prefix of every queue a service declares.")
    data_root: Path = Field(Path("data"), description="Acquisition folder (day folders of ELVIS).")
    products_root: Path = Field(Path("products"), description="Where analysis products are written.")
    state_dir: Path = Field(Path("state"), description="Persistent service state (ledgers, stores).")
    metrics_port: int = Field(0, description="Prometheus /metrics port; 0 disables the endpoint.")
    metrics_bind: str = Field("127.0.0.1", description="Address of the /metrics endpoint (0.0.0.0 only inside a private network).")
    block: str = Field("UNKNOWN", description="Default block name (ROE) when files do not say.")
    chamber: str = Field("CHAMBER_A_JUN18", description="Chamber (OGSE) profile name.")
    prefetch: int = Field(4, description="AMQP prefetch count per consumer.")
    max_redeliveries: int = Field(3, description="Deliveries of one message before dead-lettering.")
    log_level: str = Field("INFO", description="Python logging level.")
    calib_wait_s: float = Field(1800.0, description="Analyzer: seconds a solve waits for a 'wait' calibration before running without it (flagged).")
    analyzer_plugins: str = Field("", description="Analyzer: extra family modules (dotted names or .py paths, comma separated) beside services/analyzer/families.")
    catalogue_url: str = Field("", description="Results catalogue (SQLAlchemy URL); empty: sqlite:///<state_dir>/catalogue.sqlite.")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached: the environment is read once)."""
    return Settings()
