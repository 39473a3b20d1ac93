"""Logging: the text line's time and tag, and LOG_FORMAT=json end to end: the daemon run as a
process through a publish/stop cycle, every line it prints a JSON object."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from processor.observe.logs import Tagged, TextFormatter, configure_logging, json_formatter
from tests.conftest import Processes
from tests.faults_support import CHANNEL, DEAD, client, start_daemon
from tests.helpers import wait_until

MESSAGES = 20
EXIT_WITHIN_S = 20.0
FIELDS = {"time", "level", "logger", "message", "pid", "process"}
TEXT_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d ")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = handlers
        root.setLevel(level)


def record(message: str, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("processor.test")
    rec = logger.makeRecord("processor.test", logging.INFO, __file__, 1, message, (), None)
    rec.__dict__.update(extra)
    return rec


def test_text_lines_carry_a_timezone_aware_time_and_a_consumers_tag():
    formatter = TextFormatter()
    tagged_line = formatter.format(record("consumer ready", tag="[c1 pid=7] "))
    assert TEXT_TIME.match(tagged_line), tagged_line
    assert tagged_line.endswith("processor.test: [c1 pid=7] consumer ready")
    assert formatter.format(record("plain")).endswith("processor.test: plain")


def test_a_tagged_logger_puts_the_consumer_in_fields_and_the_text_prefix_only_in_text():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    logger = logging.getLogger("tests.logs.tagged")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        tagged = Tagged(logger, lambda: "[c1 pid=7]", lambda: {"consumer_id": "c1", "slot": 0})
        tagged.on(logger).warning("held %d", 3, extra={"held": 3})
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["message"] == "held 3"
    assert (line["consumer_id"], line["slot"], line["held"]) == ("c1", 0, 3)
    assert line["level"] == "WARNING" and line["logger"] == "tests.logs.tagged"
    assert "tag" not in line
    moment = datetime.fromisoformat(line["time"])
    assert moment.utcoffset() == timedelta(0)


def test_json_lines_carry_a_traceback_as_one_field_and_warnings_as_objects(restore_logging, capsys):
    configure_logging("INFO", "json")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("processor.test").exception("handler failed")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)
        warnings.warn("careful", UserWarning, stacklevel=1)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 2, lines
    failed, warned = lines
    assert set(failed) >= FIELDS
    assert failed["traceback"].startswith("Traceback (most recent call last)")
    assert failed["traceback"].rstrip().endswith("ValueError: boom")
    assert warned["logger"] == "py.warnings" and "careful" in warned["message"]


def _daemon_lines(output: str) -> list[dict[str, object]]:
    lines = []
    for number, line in enumerate(output.splitlines(), 1):
        try:
            parsed = json.loads(line)
        except ValueError:
            pytest.fail(f"line {number} is not JSON: {line!r}\n{output[-3000:]}")
        assert isinstance(parsed, dict), line
        assert set(parsed) >= FIELDS, f"line {number} lacks {FIELDS - set(parsed)}: {line}"
        assert datetime.fromisoformat(str(parsed["time"])).utcoffset() == timedelta(0), line
        lines.append(parsed)
    return lines


def test_with_log_format_json_every_line_the_daemon_prints_is_a_json_object(
    procs: Processes, redis_url: str
):
    daemon = start_daemon(
        procs,
        redis_url,
        "partitioned",
        count=2,
        LOG_FORMAT="json",
        HANDLER="tests.handlers_for_tests:warns_and_raises",
    )
    redis_client = client(redis_url)
    try:
        for n in range(MESSAGES):
            assert redis_client.publish(CHANNEL, json.dumps({"message_id": f"m-{n}"})) == 2
        wait_until(lambda: redis_client.xlen(DEAD) >= MESSAGES, 30, message="dead letters missing")
        daemon.stop("json logs")
    finally:
        redis_client.close()
    lines = _daemon_lines(daemon.log())
    consumer_ids = set(daemon.listed()) | {
        str(line["consumer_id"]) for line in lines if line.get("consumer_id")
    }
    ready = [line for line in lines if str(line["message"]).startswith("consumer ready")]
    assert len(ready) == 2, lines
    assert all(line["consumer_id"] and line["process"] != "MainProcess" for line in ready)
    assert len(consumer_ids) >= 2
    failures = [line for line in lines if "traceback" in line]
    assert failures, "no line with a traceback field"
    for line in failures:
        assert "ValueError: boom for m-" in str(line["traceback"]), line
        assert line["level"] == "ERROR" and line["consumer_id"], line
    warned = [line for line in lines if line["logger"] == "py.warnings"]
    assert warned and all("this handler is deprecated" in str(line["message"]) for line in warned)
    assert {line["process"] for line in lines} >= {"MainProcess", "consumer-0", "consumer-1"}
    # An event's own fields: the throughput line's figures.
    final = [line for line in lines if str(line["message"]).startswith("final throughput")]
    assert len(final) == 1, lines
    group = final[0]["group"]
    assert isinstance(group, dict) and (group["dead"], group["written"]) == (MESSAGES, 0), final
    assert isinstance(final[0]["consumers"], dict) and len(final[0]["consumers"]) == 2, final


def test_a_start_up_error_with_log_format_json_is_one_json_object(procs: Processes, redis_url: str):
    proc = procs.start(
        ["demo/consume.py"],
        env={"REDIS_URL": redis_url, "LOG_FORMAT": "json", "HANDLER": "no_such_module:handle"},
    )
    assert proc.wait(timeout=EXIT_WITHIN_S) == 2
    (line,) = _daemon_lines(procs.output(proc))
    assert line["level"] == "ERROR" and line["exit_code"] == 2
    assert str(line["message"]).startswith("consume.py: error: ")
    assert "no_such_module" in str(line["message"])


def test_an_unknown_log_format_is_refused_in_one_text_line(procs: Processes, redis_url: str):
    # The settings are not known yet, LOG_FORMAT among them: this line is always text.
    proc = procs.start(["demo/consume.py", "--log-format", "xml"], env={"REDIS_URL": redis_url})
    assert proc.wait(timeout=EXIT_WITHIN_S) == 2
    output = procs.output(proc)
    assert "--log-format" in output and "xml" in output, output
    assert output.count("\n") <= 3 and not output.startswith("{"), output


def test_a_consumer_that_fails_outside_its_threads_logs_a_json_object_with_the_traceback(
    procs: Processes, redis_url: str
):
    # The module imports in the supervisor (which checks HANDLER) and raises in each consumer.
    env = {
        "REDIS_URL": redis_url,
        "LOG_FORMAT": "json",
        "CONSUMERS_COUNT": "1",
        "HANDLER": "tests.handler_failing_in_consumers:handle",
        "RESTART_BACKOFF_MAX": "0.2",
    }
    daemon = procs.start(["demo/consume.py"], env=env)
    wait_until(
        lambda: procs.output(daemon).count("refuses to load in a consumer process") >= 2,
        EXIT_WITHIN_S,
        message=lambda: f"no consumer failed twice:\n{procs.output(daemon)[-3000:]}",
    )
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=EXIT_WITHIN_S)
    lines = _daemon_lines(procs.output(daemon))
    failed = [line for line in lines if "refuses to load" in str(line.get("traceback", ""))]
    assert failed and all(line["process"] == "consumer-0" for line in failed), lines
