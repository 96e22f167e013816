"""agent.reload.diff: every branch of a reload, pure (two configs in, actions out)."""

from __future__ import annotations

from agent.config import Config, parse_config
from agent.reload import (
    AddProfile,
    ChangeProfile,
    NeedsRestart,
    RemoveProfile,
    Retrigger,
    SetLogFormat,
    SetLogLevel,
    changed_keys,
    diff,
)


def _config(
    profiles: dict[str, str],
    *,
    log_level: str = "info",
    state_dir: str = "/var/lib/dvs-agent",
    listen: str = "127.0.0.1:8787",
    log_format: str = "json",
) -> Config:
    """``profiles``: name → extra lines of its table; each has one file sink named after it."""
    parts = [
        f'[agent]\nlog_level = "{log_level}"\nlog_format = "{log_format}"\n'
        f'state_dir = "{state_dir}"\n',
        f'[health]\nlisten = "{listen}"\n',
    ]
    for name, extra in profiles.items():
        parts.append(
            f'[profiles.{name}]\n{extra}\n[[profiles.{name}.sinks]]\npath = "/run/dvs/{name}"\n'
        )
    return parse_config("\n".join(parts))


RUNNING = _config({"a": "", "b": 'scope = "read"'})


def test_the_same_config_retriggers_every_profile_and_nothing_else() -> None:
    assert diff(RUNNING, _config({"a": "", "b": 'scope = "read"'})) == [
        Retrigger("a"),
        Retrigger("b"),
    ]


def test_a_profile_added_is_built_and_the_others_retriggered() -> None:
    new = _config({"a": "", "b": 'scope = "read"', "c": ""})
    assert diff(RUNNING, new) == [
        Retrigger("a"),
        Retrigger("b"),
        AddProfile("c", new.profiles["c"]),
    ]


def test_a_profile_removed_comes_first() -> None:
    assert diff(RUNNING, _config({"b": 'scope = "read"'})) == [
        RemoveProfile("a"),
        Retrigger("b"),
    ]


def test_a_changed_setting_rebuilds_the_profile_naming_the_key() -> None:
    new = _config({"a": "", "b": 'scope = "write"'})
    assert diff(RUNNING, new) == [
        Retrigger("a"),
        ChangeProfile("b", new.profiles["b"], ("scope",)),
    ]


def test_a_changed_sink_rebuilds_the_profile() -> None:
    text = (
        '[profiles.a]\n[[profiles.a.sinks]]\npath = "/run/dvs/elsewhere"\n'
        '[profiles.b]\nscope = "read"\n[[profiles.b.sinks]]\npath = "/run/dvs/b"\n'
    )
    new = parse_config(text)
    assert diff(RUNNING, new) == [
        ChangeProfile("a", new.profiles["a"], ("sinks",)),
        Retrigger("b"),
    ]


def test_several_changed_keys_are_all_named_in_the_order_of_the_table() -> None:
    new = _config({"a": 'scope = "x"\nrequest_timeout = "3s"', "b": 'scope = "read"'})
    [change, _] = diff(RUNNING, new)
    assert isinstance(change, ChangeProfile)
    assert set(change.changed) == {"scope", "request_timeout"}
    assert changed_keys(RUNNING.profiles["a"], new.profiles["a"]) == change.changed


def test_a_new_log_level_applies_live_before_the_profiles() -> None:
    new = _config({"a": "", "b": 'scope = "read"'}, log_level="debug")
    assert diff(RUNNING, new) == [SetLogLevel("debug"), Retrigger("a"), Retrigger("b")]


def test_state_dir_and_listen_changes_are_warnings_naming_the_key() -> None:
    new = _config({"a": "", "b": 'scope = "read"'}, state_dir="/srv/state", listen="")
    assert diff(RUNNING, new) == [
        NeedsRestart("agent.state_dir"),
        NeedsRestart("health.listen"),
        Retrigger("a"),
        Retrigger("b"),
    ]


def test_a_new_log_format_applies_live_before_the_profiles() -> None:
    new = _config({"a": "", "b": 'scope = "read"'}, log_format="text")
    assert new != RUNNING
    assert diff(RUNNING, new) == [SetLogFormat("text"), Retrigger("a"), Retrigger("b")]


def test_everything_at_once_keeps_the_order_of_application() -> None:
    new = _config({"c": "", "b": 'scope = "other"'}, log_level="warning", listen="127.0.0.1:9999")
    assert diff(RUNNING, new) == [
        NeedsRestart("health.listen"),
        SetLogLevel("warning"),
        RemoveProfile("a"),
        AddProfile("c", new.profiles["c"]),
        ChangeProfile("b", new.profiles["b"], ("scope",)),
    ]


def test_diff_does_not_touch_its_inputs() -> None:
    before = _config({"a": "", "b": 'scope = "read"'})
    new = _config({"c": ""})
    diff(before, new)
    assert before == RUNNING
    assert set(new.profiles) == {"c"}
