"""The example Grafana dashboard and Prometheus alert rules in docs/deploy/: well formed, every
expression parses as PromQL, and every metric they name is exported by a running daemon from its
start, before any fault (so no panel is empty and no alert silently never fires)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from demo.redis_server import free_port
from tests.conftest import Processes
from tests.faults_support import CHANNEL, OUTPUT, client, start_daemon
from tests.helpers import wait_until
from tests.test_metrics import get, scrape

DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
ALERTS = DEPLOY / "prometheus-alerts.yml"
METRIC = re.compile(r"\bprocessor_[a-z0-9_]+\b")
# Grafana's variables, as Prometheus would see them once Grafana has substituted them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expression = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expression = expression.replace(variable, value)
            expressions.append(expression)
    return expressions


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_the_alert_rules_are_yaml_each_with_a_parsing_expr_a_severity_and_a_summary():
    rules = alert_rules()
    assert len(rules) >= 10
    names = [rule["alert"] for rule in rules]
    assert len(set(names)) == len(names), names
    for rule in rules:
        assert isinstance(rule["expr"], str) and METRIC.search(rule["expr"]), rule
        promql_parser.parse(rule["expr"])
        assert rule["labels"]["severity"] in ("warning", "critical"), rule
        assert rule["annotations"]["summary"], rule


def test_the_dashboard_is_json_whose_panels_query_parsing_promql():
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    for expression in expressions:
        assert METRIC.search(expression), expression
        promql_parser.parse(expression)


def test_a_bad_expression_is_refused_by_the_parser_the_tests_use():
    with pytest.raises(ValueError):
        promql_parser.parse("sum by (le (rate(processor_messages_written_total[5m]))")


def test_every_metric_the_dashboard_and_the_alerts_use_is_exported_from_the_start(
    procs: Processes, redis_url: str
):
    used = {
        name
        for expression in [*dashboard_expressions(), *(rule["expr"] for rule in alert_rules())]
        for name in METRIC.findall(expression)
    }
    port = free_port()
    start_daemon(procs, redis_url, "partitioned", count=2, METRICS_PORT=port)
    redis_client = client(redis_url)
    try:
        wait_until(lambda: get(port, "/readyz")[0] == 200, 20, message="never ready")
        assert redis_client.publish(CHANNEL, json.dumps({"message_id": "m-1"})) == 2
        wait_until(lambda: redis_client.xlen(OUTPUT) == 1, 20, message="not written")
        exported = {sample.partition("{")[0] for sample in scrape(port)}
    finally:
        redis_client.close()
    missing = used - exported
    assert not missing, f"used but not exported: {sorted(missing)}"
