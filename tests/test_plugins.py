"""Plug-ins (DESIGN §11): the registry, and a third-party distribution used with no edit to agent/.

The distribution is built from a pyproject in a temp dir and installed by pip (``--target``, a
site dir that only the agent processes of these tests see through ``PYTHONPATH``: the rest of the
suite keeps seeing the built-ins only). It registers a source and a sink through the entry-point
groups; an agent process reads credentials from the one and writes the token through the other.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import msgspec
import pytest

from agent.config import parse_config
from agent.devserver import TokenServer
from agent.errors import ConfigError
from agent.kinds import build_sinks
from agent.plugin import API_VERSION, BuildContext, SinkKind, SourceKind
from agent.registry import BUILTIN_SINKS, BUILTIN_SOURCES, PluginError, Registry
from tests.conftest import CLIENT_ID, CLIENT_SECRET, agent_env, run_cli
from tests.servers import Bao

PLUGIN_MODULE = '''
"""A tiny third-party plug-in: a source reading a file, a sink appending JSON lines."""

from __future__ import annotations

import json
import os

import msgspec

from agent.errors import ConfigError, SinkError, SourceEmpty
from agent.plugin import (
    BuildContext,
    Credentials,
    Login,
    LoginContext,
    LoginKind,
    Secret,
    SinkKind,
    SourceKind,
    Target,
    Token,
    Where,
)


class KeyfileConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    client_id: str
    secret_file: str


class KeyfileSource:
    name = "keyfile"

    def __init__(self, config: KeyfileConfig) -> None:
        self._config = config

    def read(self) -> Credentials:
        try:
            with open(self._config.secret_file) as handle:
                secret = handle.read().strip()
        except FileNotFoundError:
            raise SourceEmpty(f"{self._config.secret_file} does not exist") from None
        return Credentials(
            client_id=self._config.client_id,
            client_secret=Secret(secret),
            source=self.name,
            version=str(os.stat(self._config.secret_file).st_mtime_ns),
        )

    def version(self) -> str:
        return self.read().version

    def can_change(self) -> bool:
        return True

    def close(self) -> None:
        pass


class KeyfileKind(SourceKind[KeyfileConfig]):
    name = "keyfile"
    config_type = KeyfileConfig

    def check_table(self, config, where: Where):
        if where.listed and config is None:
            yield f"{where.key}: required when \\"keyfile\\" is in sources"
        if config is not None:
            yield from self.check(config, where)

    def check(self, config: KeyfileConfig, where: Where):
        if not config.secret_file.startswith("/"):
            yield f"{where.at('secret_file')}: must be an absolute path"

    def describe(self, config: KeyfileConfig, where: Where) -> str:
        return f"keyfile {config.secret_file}"

    def build(self, config, context: BuildContext) -> KeyfileSource:
        return KeyfileSource(config)


class JsonlConfig(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    kw_only=True,
    tag="jsonl",
    tag_field="type",
):
    path: str


class JsonlSink:
    readiness = False

    def __init__(self, config: JsonlConfig) -> None:
        self._path = config.path
        self.name = f"jsonl:{config.path}"

    def check(self) -> None:
        if not os.path.isdir(os.path.dirname(self._path)):
            raise SinkError(f"{self._path}: no such directory")

    def write(self, token: Token) -> None:
        with open(self._path, "a") as handle:
            handle.write(json.dumps(token.document()) + "\\n")

    def settle(self, timeout=None) -> bool:
        return True

    def close(self) -> None:
        pass


class JsonlKind(SinkKind[JsonlConfig]):
    name = "jsonl"
    config_type = JsonlConfig

    def describe(self, config: JsonlConfig, where: Where) -> str:
        return f"jsonl {config.path}"

    def targets(self, config: JsonlConfig, where: Where):
        yield Target(store="file", identity=(config.path,), what=repr(config.path),
                     key=where.at("path"), noun="file")

    def build(self, config: JsonlConfig, context: BuildContext) -> JsonlSink:
        return JsonlSink(config)


SOURCE = KeyfileKind()
SINK = JsonlKind()


class UserpassLogin(LoginKind):
    """A Vault login method: userpass, the user in ``role``, its password in ``secret_id_file``."""

    name = "userpass"
    holder = "userpass user"

    def check(self, config, where: Where):
        if not config.role:
            yield f'{where.at("role")}: required with auth_method = "userpass" (the user name)'

    def describe(self, config) -> str:
        return f"userpass login as {config.role}"

    def login(self, config, ctx: LoginContext) -> Login:
        password = ctx.read_file(config.secret_id_file, "secret_id_file")
        answer = ctx.client.auth.userpass.login(
            config.role, password, mount_point=self.mount(config), use_token=False
        )
        auth = answer["auth"]
        return Login(auth["client_token"], auth["lease_duration"], auth["renewable"])


LOGIN = UserpassLogin()


class NotAKind:
    pass


class ShadowKind(SinkKind[JsonlConfig]):
    name = "file"
    config_type = JsonlConfig
'''

PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "dvs-agent-example-plugins"
version = "1.2.3"

[tool.setuptools]
py-modules = ["dvs_example_plugins", "dvs_broken_plugin"]

[project.entry-points."dvs_agent.sources"]
keyfile = "dvs_example_plugins:SOURCE"

[project.entry-points."dvs_agent.vault_logins"]
userpass = "dvs_example_plugins:LOGIN"
approle = "dvs_example_plugins:LOGIN"

[project.entry-points."dvs_agent.sinks"]
jsonl = "dvs_example_plugins:SINK"
broken = "dvs_broken_plugin:KIND"
odd = "dvs_example_plugins:NotAKind"
file = "dvs_example_plugins:ShadowKind"
"""


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site dir holding the example distribution, installed by pip from its source."""
    source = tmp_path_factory.mktemp("plugin-src")
    (source / "pyproject.toml").write_text(PYPROJECT)
    (source / "dvs_example_plugins.py").write_text(PLUGIN_MODULE)
    (source / "dvs_broken_plugin.py").write_text('raise RuntimeError("this plug-in is broken")\n')
    site = tmp_path_factory.mktemp("plugin-site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert list(site.glob("dvs_agent_example_plugins-1.2.3.dist-info"))
    return site


def registry_of(site: Path) -> Registry:
    """A registry that discovers the entry points of ``site`` (as the agent process would)."""

    def discover(group: str) -> Iterable[importlib.metadata.EntryPoint]:
        for dist in importlib.metadata.distributions(path=[str(site)]):
            yield from (ep for ep in dist.entry_points if ep.group == group)

    sys.path.insert(0, str(site))
    return Registry(discover=discover)


@pytest.fixture
def registry(plugin_site: Path) -> Iterable[Registry]:
    yield registry_of(plugin_site)
    sys.path.remove(str(plugin_site))
    for name in ("dvs_example_plugins", "dvs_broken_plugin"):
        sys.modules.pop(name, None)


def plugin_env(site: Path, **extra: str) -> dict[str, str]:
    env = agent_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


def plugin_config(directory: Path, url: str, *, sinks: str | None = None) -> Path:
    secret = directory / "secret"
    secret.write_text(CLIENT_SECRET + "\n")
    if sinks is None:
        sinks = f'[[profiles.dvs.sinks]]\ntype = "jsonl"\npath = "{directory}/tokens.jsonl"\n'
    path = directory / "agent.toml"
    path.write_text(
        f"""
[agent]
state_dir = "{directory}/state"
log_format = "text"

[health]
listen = ""

[profiles.dvs]
token_url = "{url}"
sources = ["keyfile"]

[profiles.dvs.keyfile]
client_id = "{CLIENT_ID}"
secret_file = "{secret}"

{sinks}
"""
    )
    return path


# ---------------------------------------------------------------- a third-party distribution


def test_an_agent_uses_a_third_party_source_and_sink(
    plugin_site: Path, server: TokenServer, tmp_path: Path
) -> None:
    config = plugin_config(tmp_path, server.url)
    result = run_cli("once", "-c", str(config), env=plugin_env(plugin_site))
    assert result.returncode == 0, result.stderr
    (request,) = server.token_requests()
    assert (request.client_id, request.client_secret) == (CLIENT_ID, CLIENT_SECRET)
    (line,) = (tmp_path / "tokens.jsonl").read_text().splitlines()
    assert json.loads(line)["access_token"] in server.issued()


def test_check_lists_the_plug_ins_in_use_with_distribution_and_version(
    plugin_site: Path, server: TokenServer, tmp_path: Path
) -> None:
    config = plugin_config(tmp_path, server.url)
    result = run_cli("check", "-c", str(config), env=plugin_env(plugin_site))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "  source keyfile " in out and "  sink jsonl " in out
    assert "source keyfile: dvs-agent-example-plugins 1.2.3 (dvs_example_plugins:SOURCE)" in out
    assert "sink jsonl: dvs-agent-example-plugins 1.2.3 (dvs_example_plugins:SINK)" in out
    # the entry point that takes a built-in's name is ignored, and said so
    assert "file is a built-in sink, and a plug-in never replaces a built-in" in out


def test_a_broken_plug_in_fails_only_the_configs_that_use_it(
    plugin_site: Path, server: TokenServer, tmp_path: Path
) -> None:
    env = plugin_env(plugin_site)
    broken = plugin_config(tmp_path, server.url, sinks='[[profiles.dvs.sinks]]\ntype = "broken"\n')
    result = run_cli("check", "-c", str(broken), env=env)
    assert result.returncode == 78
    assert 'profiles.dvs.sinks[0].type: the sink plug-in "broken"' in result.stderr
    assert "dvs-agent-example-plugins 1.2.3" in result.stderr
    assert "RuntimeError: this plug-in is broken" in result.stderr
    # the same installation, a config that does not use it: fine
    assert run_cli("check", "-c", str(plugin_config(tmp_path, server.url)), env=env).returncode == 0


def test_the_built_in_file_sink_is_not_replaced(plugin_site: Path, tmp_path: Path) -> None:
    sinks = f'[[profiles.dvs.sinks]]\npath = "{tmp_path}/token"\n'
    config = plugin_config(tmp_path, "http://127.0.0.1:9/t", sinks=sinks)
    result = run_cli("check", "-c", str(config), env=plugin_env(plugin_site))
    assert result.returncode == 0, result.stderr
    assert f"  sink file {tmp_path}/token (raw, 0640)" in result.stdout


def test_an_agent_logs_in_to_vault_with_a_third_party_login_method(
    plugin_site: Path, server: TokenServer, bao: Bao, tmp_path: Path
) -> None:
    root = bao.client()
    try:
        root.sys.enable_auth_method("userpass", path="userpass-plugin")
    except hvac.exceptions.InvalidRequest as exc:
        assert "already in use" in str(exc)
    root.sys.create_or_update_policy(
        "dvs-plugin-read", 'path "secret/data/dvs-plugin/*" { capabilities = ["read"] }\n'
    )
    password = "pl4gin-pa55word-value"
    root.auth.userpass.create_or_update_user(
        "dvs-agent", password, policies=["dvs-plugin-read"], mount_point="userpass-plugin"
    )
    root.secrets.kv.v2.create_or_update_secret(
        path="dvs-plugin/osigu", secret={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    )
    (tmp_path / "password").write_text(password + "\n")
    vault = (
        f'[profiles.dvs.vault]\naddress = "{bao.address}"\npath = "dvs-plugin/osigu"\n'
        'auth_method = "userpass"\nauth_mount = "userpass-plugin"\nrole = "dvs-agent"\n'
        f'secret_id_file = "{tmp_path}/password"\n'
    )
    config = plugin_config(tmp_path, server.url)
    text = config.read_text().replace('sources = ["keyfile"]', 'sources = ["vault"]')
    config.write_text(text + vault)
    env = plugin_env(plugin_site)
    check = run_cli("check", "-c", str(config), env=env)
    assert check.returncode == 0, check.stderr
    assert "userpass login as dvs-agent" in check.stdout
    assert "login userpass: dvs-agent-example-plugins 1.2.3 (dvs_example_plugins:LOGIN)" in (
        check.stdout
    )
    # the entry point that takes a built-in method's name is ignored, and said so
    assert "approle is a built-in login, and a plug-in never replaces a built-in" in check.stdout
    result = run_cli("once", "-c", str(config), env=env)
    assert result.returncode == 0, result.stderr
    (request,) = server.token_requests()
    assert (request.client_id, request.client_secret) == (CLIENT_ID, CLIENT_SECRET)
    assert password not in result.stderr + check.stdout + check.stderr
    # a check the plug-in owns, as a config error naming the key
    config.write_text(text + vault.replace('role = "dvs-agent"\n', ""))
    failed = run_cli("check", "-c", str(config), env=env)
    assert failed.returncode == 78
    assert 'profiles.dvs.vault.role: required with auth_method = "userpass"' in failed.stderr


# ---------------------------------------------------------------- the registry, in-process


def test_plug_in_kinds_are_listed_as_available(registry: Registry) -> None:
    assert registry.names("source") == ["env", "vault", "aws", "keyfile"]
    assert registry.names("sink") == ["file", "vault", "aws", "redis", "broken", "jsonl", "odd"]
    with pytest.raises(ConfigError) as caught:
        parse_config('[[profiles.dvs.sinks]]\ntype = "s3"\n', registry=registry)
    assert str(caught.value).endswith(
        'unknown sink type "s3"; supported: "file", "vault", "aws", "redis", "broken", "jsonl", '
        '"odd"'
    )


def test_a_plug_in_table_is_admitted_and_its_keys_checked(
    registry: Registry, tmp_path: Path
) -> None:
    text = plugin_config(tmp_path, "http://127.0.0.1:9/t").read_text()
    config = parse_config(text, registry=registry)
    table = config.profiles["dvs"].table("keyfile")
    assert table is not None and type(table).__name__ == "KeyfileConfig"
    with pytest.raises(ConfigError, match=r"profiles\.dvs\.keyfile\.secret_fil: unknown key"):
        parse_config(text.replace("secret_file =", "secret_fil ="), registry=registry)
    with pytest.raises(ConfigError, match=r"profiles\.dvs\.keyfile\.secret_file: must be an abs"):
        parse_config(text.replace(f'"{tmp_path}/secret"', '"secret"'), registry=registry)
    # without the plug-in the table is an unknown key, and the source an unknown name
    with pytest.raises(ConfigError) as caught:
        parse_config(text, registry=Registry(discover=lambda group: ()))
    assert 'profiles.dvs.sources[0]: invalid value "keyfile"; expected one of: "env"' in str(
        caught.value
    )


def test_a_plug_in_that_is_not_a_kind_is_refused_naming_it(registry: Registry) -> None:
    with pytest.raises(PluginError) as caught:
        registry.sink("odd")
    message = str(caught.value)
    assert 'the sink plug-in "odd" (dvs_example_plugins:NotAKind' in message
    assert "dvs-agent-example-plugins 1.2.3" in message
    assert "not a agent.plugin.SinkKind" in message


def test_kinds_are_refused_for_a_wrong_api_version_name_or_struct() -> None:
    class Untagged(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
        path: str

    class Loose(msgspec.Struct, frozen=True, kw_only=True, tag="loose", tag_field="type"):
        path: str

    class OldKind(SourceKind[Untagged]):
        name = "old"
        config_type = Untagged
        api_version = API_VERSION + 1

    class UntaggedKind(SinkKind[Untagged]):
        name = "untagged"
        config_type = Untagged

    class LooseKind(SinkKind[Loose]):
        name = "loose"
        config_type = Loose

    class Misnamed(SinkKind[Loose]):
        name = "other"
        config_type = Loose

    kinds = {"old": OldKind, "untagged": UntaggedKind, "loose": LooseKind, "misnamed": Misnamed}
    module = type(sys)("dvs_test_kinds")
    for name, cls in kinds.items():
        setattr(module, name, cls)
    sys.modules["dvs_test_kinds"] = module
    try:
        registry = Registry(
            sources={**BUILTIN_SOURCES, "old": "dvs_test_kinds:old"},
            sinks={
                **BUILTIN_SINKS,
                **{name: f"dvs_test_kinds:{name}" for name in ("untagged", "loose", "misnamed")},
            },
            discover=lambda group: (),
        )
        expected = {
            ("source", "old"): f"plug-in API version {API_VERSION + 1}",
            ("sink", "untagged"): "tag='untagged', tag_field='type'",
            ("sink", "loose"): "forbid_unknown_fields=True",
            ("sink", "misnamed"): "its name is 'other', not 'misnamed'",
        }
        for (role, name), problem in expected.items():
            with pytest.raises(PluginError, match=problem):
                registry.kind(role, name)  # type: ignore[arg-type]
    finally:
        del sys.modules["dvs_test_kinds"]


def test_no_entry_point_lookup_for_a_config_of_built_ins() -> None:
    looked_up: list[str] = []

    def discover(group: str) -> Iterable[importlib.metadata.EntryPoint]:
        looked_up.append(group)
        return ()

    text = '[[profiles.dvs.sinks]]\npath = "/run/t"\n[[profiles.dvs.sinks]]\ntype = "redis"\n'
    parse_config(text, registry=Registry(discover=discover))
    assert looked_up == []
    with pytest.raises(ConfigError):
        parse_config('[[profiles.dvs.sinks]]\ntype = "s3"\n', registry=Registry(discover=discover))
    assert looked_up == [
        "dvs_agent.sources",
        "dvs_agent.sinks",
        "dvs_agent.vault_logins",
        "dvs_agent.fleet_stores",
    ]


def test_configs_of_the_same_kinds_decode_into_the_same_classes() -> None:
    """A reload compares profiles: two loads of one file must be equal."""
    text = '[[profiles.dvs.sinks]]\npath = "/run/t"\n'
    assert parse_config(text, registry=Registry()) == parse_config(text, registry=Registry())


def test_a_reload_that_adds_a_plug_in_kind_keeps_unchanged_profiles(registry: Registry) -> None:
    """Another kind in the new config gives other profile classes: a profile whose keys did
    not change must still count as unchanged (re-triggered, not rebuilt)."""
    from agent.reload import Retrigger, diff

    base = '[profiles.a]\n[[profiles.a.sinks]]\npath = "/run/a"\non_change_timeout = "10s"\n'
    running = parse_config(base, registry=Registry(discover=lambda group: ()))
    new = parse_config(
        base + '[profiles.b]\n[[profiles.b.sinks]]\ntype = "jsonl"\npath = "/run/b"\n',
        registry=registry,
    )
    assert type(new.profiles["a"]) is not type(running.profiles["a"])
    actions = diff(running, new)
    assert Retrigger("a") in actions
    assert [type(action).__name__ for action in actions] == ["Retrigger", "AddProfile"]


def test_sinks_built_before_one_that_fails_are_closed() -> None:
    closed: list[str] = []

    class Entry(
        msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="rec", tag_field="type"
    ):
        name: str

    class Built:
        def __init__(self, name: str) -> None:
            self.name = name

        def close(self) -> None:
            closed.append(self.name)

    class RecKind(SinkKind[Entry]):
        name = "rec"
        config_type = Entry

        def build(self, config: Entry, context: BuildContext) -> Any:
            if config.name == "bad":
                raise ConfigError(f"{context.where.key}: cannot build")
            return Built(config.name)

    module = type(sys)("dvs_test_closing")
    module.KIND = RecKind()  # type: ignore[attr-defined]
    sys.modules["dvs_test_closing"] = module
    try:
        registry = Registry(
            sinks={**BUILTIN_SINKS, "rec": "dvs_test_closing:KIND"}, discover=lambda group: ()
        )
        text = "".join(
            f'[[profiles.dvs.sinks]]\ntype = "rec"\nname = "{name}"\n' for name in ("a", "b", "bad")
        )
        pc = parse_config(text, registry=registry).profiles["dvs"]
        with pytest.raises(ConfigError, match=r"profiles\.dvs\.sinks\[2\]: cannot build"):
            build_sinks("dvs", pc, environ={}, logger=logging.getLogger("t"), registry=registry)
        assert closed == ["a", "b"]
    finally:
        del sys.modules["dvs_test_closing"]
