"""Operator settings from the environment, with the `OPENCHECKER_OPERATOR_` prefix.

For example `OPENCHECKER_OPERATOR_RESYNC_INTERVAL_SECONDS=5`. Command-line
options of `python -m openchecker_operator` override the same fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class OperatorSettings(BaseSettings):
    """Settings of one operator process."""

    model_config = SettingsConfigDict(env_prefix="OPENCHECKER_OPERATOR_", frozen=True)

    # Seconds between two re-checks of one resource against the broker. A
    # queue deleted behind the operator's back is declared again at most
    # this long after. Each re-check costs four management API requests
    # (two queues, the policy, the vhost's live counts) and one status
    # write per resource.
    resync_interval_seconds: float = Field(default=60.0, gt=0)
    # Seconds after creation or a change before the first re-check, so the
    # re-check does not race the create or update handler.
    resync_initial_delay_seconds: float = Field(default=5.0, ge=0)
    # Namespaces to serve; empty serves all namespaces (with
    # `all_namespaces`) or fails at start.
    namespaces: tuple[str, ...] = ()
    all_namespaces: bool = False
    # Run without kopf's peering, which otherwise needs its peering CRDs.
    standalone: bool = False
    # URL of kopf's liveness endpoint, e.g. http://0.0.0.0:8080/healthz.
    liveness_endpoint: str | None = None
    # The AMQP client-provided connection name, shown by the management API.
    connection_name: str = Field(default="openchecker-operator", min_length=1)
    # Heartbeat interval of the operator's AMQP connections in seconds; 0 disables.
    amqp_heartbeat_seconds: int = Field(default=60, ge=0)
    log_level: LogLevel = "INFO"
