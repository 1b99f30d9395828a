"""The daemon's configuration: one TOML file, one Struct, every default here.

CLI flags override the file. README documents every key (keep them in step).
"""

from __future__ import annotations

import importlib.util
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from genvisor.daemon.logs import LogFormat
from genvisor.daemon.metrics import MetricsAddressError, parse_metrics_address
from genvisor.daemon.service_dirs import state_directory
from genvisor.daemon.sqlite_store import SqliteStore
from genvisor.daemon.store import MemoryStore, Store
from genvisor.modes.llm import DEFAULT_APPROVALS, Approval, BackendConfig, RunDefaults
from genvisor.modes.tools import SPECS


class Backend(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: str
    provider: str | None = None
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    timeout_ms: int | None = None
    stream: bool | None = None


class Defaults(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    backend: str = "scripted"
    timeout_ms: int = 60_000
    stream: bool = False
    coalesce_ms: int = 5  # a run's consecutive text deltas within this window travel as one event; 0: each alone


class Workers(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    spares: int = 4  # fresh pre-forked workers kept waiting for a run
    cancel_grace_ms: int = 2_000  # after a Stop frame, before SIGTERM to the group
    term_grace_ms: int = 1_000  # after SIGTERM, before SIGKILL
    deadline_grace_ms: int = 5_000  # a run is killed at timeout_ms + this


class Executor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: Literal["local", "ray"] = "local"  # local: workers on this machine; ray: on a Ray cluster's nodes
    # ray: "auto" (RAY_ADDRESS, or the cluster this machine is part of), "ray://host:10001",
    # "host:6379", or "local" (a Ray started for this daemon alone, to try it out)
    address: str = "auto"
    # node: a conversation's runs go to the node that holds its workspace (its first run's);
    # shared: workspaces are on storage every node mounts at the same path, any node will do
    workspaces: Literal["node", "shared"] = "node"


class Generations(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    outcome_retention_s: float = 600.0  # refs stay awaitable this long after the run ends


class Admission(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_active: int = 64  # runs (worker processes) at once
    max_queued: int = 256  # admitted runs waiting for one of those; beyond: Overloaded


class Clients(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Bytes of answers one connection may leave unread before its progress events are
    # shed and its requests refused (Overloaded); replies are never dropped.
    max_unread_bytes: int = 64 * 1024 * 1024


class Journal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    backend: Literal["sqlite", "memory"] = "sqlite"  # memory: nothing survives a restart
    synchronous: Literal["normal", "full"] = "normal"  # full: an fsync per commit batch


class Security(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Both or neither; a tcp endpoint needs both (see ipc.curve and README, Security).
    server_secret_key_file: str | None = None  # the daemon's CURVE secret certificate (`genvisor keygen`)
    authorized_clients_dir: str | None = None  # public certificates (*.key) of the clients let in


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    endpoint: str | None = None  # default: ipc://{$RUNTIME_DIRECTORY | $XDG_RUNTIME_DIR/genvisor}/genvisor.sock
    state_dir: str | None = None  # default: $STATE_DIRECTORY, $XDG_STATE_HOME/genvisor or ~/.local/state/genvisor
    ipc_group_access: bool = False  # the daemon's group may connect too (socket 0660 in a 0750 directory)
    metrics: str | None = None  # HOST:PORT on loopback for Prometheus; off when unset
    log_format: LogFormat = "auto"  # text | json | journal; auto: journal under systemd, else text
    scripted_backend: bool = True  # offer the offline `scripted` backend
    defaults: Defaults = Defaults()
    backends: dict[str, Backend] = {}
    workers: Workers = Workers()
    executor: Executor = Executor()
    generations: Generations = Generations()
    admission: Admission = Admission()
    clients: Clients = Clients()
    journal: Journal = Journal()
    security: Security = Security()
    # Each tool's approval policy unless a conversation's mode state says otherwise
    # (allow, ask or deny); run_command is "ask" unless set here.
    approvals: dict[str, Approval] = {}

    def worker_preload(self) -> list[str]:
        """Modules the zygote imports up front: a backend's SDK costs ≈1 s to import,
        and ≈28 MB that every fork copies page tables for, so only when configured."""
        if any(b.kind == "openai" for b in self.backends.values()):
            return ["genvisor.modes.openai_backend"]
        return []

    def open_store(self) -> Store:
        """The journal this config names (blocking: SQLite opens its file)."""
        if self.journal.backend == "memory":
            return MemoryStore()
        return SqliteStore(self.state_path() / "journal.sqlite3", synchronous=self.journal.synchronous.upper())

    def state_path(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        if systemd_state := state_directory():
            return systemd_state
        return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "genvisor"

    def run_defaults(self) -> RunDefaults:
        """The config's part in a run's precedence (call > conversation > backend > this)."""
        return RunDefaults(
            backend=self.defaults.backend,
            timeout_ms=self.defaults.timeout_ms,
            stream=self.defaults.stream,
            backends=self.backend_table(),
            coalesce_ms=self.defaults.coalesce_ms,
            approvals={**DEFAULT_APPROVALS, **self.approvals},
        )

    def backend_table(self) -> dict[str, BackendConfig]:
        tables = {
            name: BackendConfig(name=name, kind=b.kind, provider=b.provider, model=b.model, settings=_settings(b))
            for name, b in self.backends.items()
        }
        if self.scripted_backend:
            tables.setdefault("scripted", BackendConfig(name="scripted", kind="scripted", provider="genvisor", model="scripted"))
        return tables


def _settings(backend: Backend) -> dict[str, Any]:
    return {k: v for k, v in msgspec.structs.asdict(backend).items() if v is not None and k not in ("kind", "provider", "model")}


class ConfigError(Exception):
    pass


def load_config(path: str | Path | None, **overrides: Any) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    if not 0 <= config.defaults.coalesce_ms <= 1_000:
        raise ConfigError("defaults.coalesce_ms must be within 0..1000 (0: deltas are not coalesced)")
    if config.defaults.backend not in config.backend_table():
        raise ConfigError(f"defaults.backend {config.defaults.backend!r} is not a configured backend")
    for name, backend in config.backends.items():
        if backend.kind not in ("scripted", "openai"):
            raise ConfigError(f"backends.{name}.kind must be 'scripted' or 'openai', not {backend.kind!r}")
    if (config.security.server_secret_key_file is None) != (config.security.authorized_clients_dir is None):
        raise ConfigError("security.server_secret_key_file and security.authorized_clients_dir go together: set both for CURVE, or neither")
    if config.executor.kind == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("executor.kind = \"ray\" needs Ray on this machine and on every node: pip install 'genvisor[ray]'")
    if config.workers.spares < 0:
        raise ConfigError("workers.spares must be >= 0")
    if config.metrics is not None:
        try:
            parse_metrics_address(config.metrics)
        except MetricsAddressError as exc:
            raise ConfigError(str(exc)) from None
    if config.clients.max_unread_bytes < 1024 * 1024:
        raise ConfigError("clients.max_unread_bytes must be at least 1 MiB (1048576)")
    if unknown := sorted(set(config.approvals) - set(SPECS)):
        raise ConfigError(f"approvals: no tool {unknown[0]!r} (tools: {', '.join(SPECS)})")
    if config.admission.max_active < 1 or config.admission.max_queued < 0:
        raise ConfigError("admission.max_active must be >= 1 and admission.max_queued >= 0")
    return config
