"""The configuration file (DESIGN §3): :func:`load_config` → a frozen, checked :class:`Config`.

``values`` (durations, modes, ``HOST:PORT``), ``schema`` (the core tables and the profile built
from the kinds in use), ``load`` (file → kinds → Structs → checks), ``explain`` (msgspec's
errors as key paths), ``checks`` (what several kinds check alike), ``targets`` (two sinks on one
target). Each source's and sink's own keys are its plug-in's (:mod:`agent.plugin`).
"""

from agent.config.load import (
    CONFIG_PATH_ENV,
    DEFAULT_CONFIG_PATH,
    MAX_PROFILE_NAME,
    config_file_warnings,
    fleet_store_name,
    load_config,
    parse_config,
    resolve_config_path,
    sink_kind_name,
)
from agent.config.schema import (
    ENVIRONMENT_TOKEN_URLS,
    AgentSection,
    Config,
    HealthSection,
    ProfileConfig,
    RotationConfig,
)
from agent.config.values import Duration, FileMode, Size, parse_duration, parse_size

__all__ = [
    "CONFIG_PATH_ENV",
    "DEFAULT_CONFIG_PATH",
    "ENVIRONMENT_TOKEN_URLS",
    "MAX_PROFILE_NAME",
    "AgentSection",
    "Config",
    "Duration",
    "FileMode",
    "HealthSection",
    "ProfileConfig",
    "RotationConfig",
    "Size",
    "config_file_warnings",
    "fleet_store_name",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "resolve_config_path",
    "sink_kind_name",
]
