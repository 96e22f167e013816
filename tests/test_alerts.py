"""config/prometheus-alerts.yaml: valid PromQL, over series and label values the agent exports.

Prometheus is not here to load the file, so each expression is parsed with promql-parser (the
Rust parser's Python binding), and every ``dvs_agent_*`` selector in it is checked against what
a real :class:`Metrics` registry renders: the metric's name, its label names, and for the
labels with a fixed set of values (state, outcome), that the value is one of them.
"""

from __future__ import annotations

import functools
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import generate_latest

from agent.metrics import STATES, Metrics
from tests.conftest import REPO, metric_samples

RULES = REPO / "config" / "prometheus-alerts.yaml"

#: DESIGN §8's values of the labels whose values are a fixed set
LABEL_VALUES = {
    ("dvs_agent_profile_state", "state"): set(STATES),
    ("dvs_agent_token_requests_total", "outcome"): {
        "ok",
        "reused",
        "rejected",
        "misconfigured",
        "unavailable",
        "rate_limited",
        "protocol_error",
    },
    ("dvs_agent_sink_writes_total", "outcome"): {"ok", "error"},
    ("dvs_agent_rotations_total", "trigger"): {
        "poll",
        "sighup",
        "event",
        "refresh",
        "401",
        "schedule",
    },
    ("dvs_agent_triggers_total", "trigger"): {"poll", "sighup", "event", "refresh", "401"},
}


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    (group,) = doc["groups"]
    rules: list[dict[str, Any]] = group["rules"]
    return rules


@functools.cache
def _exported() -> dict[str, set[str]]:
    """Sample name → label names, from a registry in which every metric has a series (built
    once: every rule's test reads it)."""
    metrics = Metrics()
    metrics.token_request("dvs", "ok")
    metrics.rotation("dvs", "poll")
    metrics.trigger("dvs", "poll")
    metrics.sink_write("dvs", "file:/run/dvs-agent/token", "ok")
    metrics.source_error("dvs", "vault")
    metrics.refresh_duration("dvs", 0.1)
    metrics.state("dvs", "ok")
    metrics.token("dvs", "osigu", 1.8e9)
    metrics.last_success("dvs", 1.7e9)
    metrics.source_in_use("dvs", "vault", ["vault", "env"])
    metrics.fleet_store_up("dvs", True)
    metrics.fleet_lease("dvs", "won")
    metrics.fleet_adoption("dvs")
    metrics.proxy_request("dvs", 200)
    metrics.proxy_added("dvs", 0.0003)
    metrics.proxy_replay("dvs")
    text = generate_latest(metrics.registry).decode()
    found: dict[str, set[str]] = {}
    for name, labels in metric_samples(text):
        found.setdefault(name, set()).update(label for label, _ in labels)
    return found


def _selectors(expr: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(expr, visit)
    return found


def test_every_rule_is_complete_and_named_once() -> None:
    rules = _rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)) >= 6
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if "for" in rule:
            assert promql_parser.parse_duration(rule["for"]).total_seconds() > 0


@pytest.mark.parametrize("rule", _rules(), ids=lambda rule: rule["alert"])
def test_each_expression_parses_and_selects_what_the_agent_exports(rule: dict[str, Any]) -> None:
    expr = promql_parser.parse(rule["expr"])
    exported = _exported()
    selectors = _selectors(expr)
    assert selectors, rule["expr"]
    for selector in selectors:
        if selector.name == "up":
            continue  # Prometheus's own series of the scrape
        assert selector.name in exported, f"{rule['alert']}: the agent exports no {selector.name}"
        for matcher in selector.matchers.matchers:
            assert matcher.name in exported[selector.name], (rule["alert"], matcher.name)
            allowed = LABEL_VALUES.get((selector.name, matcher.name))
            if allowed is not None:
                assert matcher.value in allowed, (rule["alert"], matcher.value)


def test_a_typo_in_a_metric_or_a_label_value_is_caught() -> None:
    """The two checks above can fail: what they say of a broken expression."""
    exported = _exported()
    (typo,) = _selectors(promql_parser.parse('dvs_agent_profile_stat{state="ok"} == 1'))
    assert typo.name not in exported
    (value,) = _selectors(promql_parser.parse('dvs_agent_profile_state{state="expird"} == 1'))
    (matcher,) = value.matchers.matchers
    assert matcher.value not in LABEL_VALUES[(value.name, matcher.name)]
    with pytest.raises(ValueError):
        promql_parser.parse("increase(dvs_agent_source_errors_total[15m) > 0")


def test_the_readme_points_to_the_rules() -> None:
    readme = (REPO / "README.md").read_text()
    assert "config/prometheus-alerts.yaml" in readme
