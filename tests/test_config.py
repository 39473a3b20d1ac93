"""Settings: defaults, precedence, validation, secrets; and the entry points' one-line errors."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from processor.config import (
    DAEMON_OPTIONS,
    MAX_CONSUMERS_PER_HOST,
    PUBLISHER_OPTIONS,
    PublisherSettings,
    Settings,
)
from processor.errors import ConfigError
from processor.group.startup import warn_if_one_reader
from processor.loading import check_daemon, load_daemon_settings, load_publisher_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
CLI_TIMEOUT_S = 30.0
SECRET_URL = "redis://user:secret@host:1/0"


def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "settings.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


# -- defaults -------------------------------------------------------------------------------


def test_defaults_match_the_documented_table() -> None:
    settings = load_daemon_settings([], {})
    assert settings == Settings()
    assert settings.url == "redis://localhost:6379/0"
    assert settings.consumers_count == 2
    assert settings.processing_batch_size == 100
    assert settings.batch_window_ms == 50
    assert settings.input_channel == "messages:published"
    assert settings.output_stream == "messages:processed"
    assert settings.dead_letter_stream == "messages:dead"
    assert settings.consumers_list == "consumer:ids"
    assert settings.monitor_interval_s == 3.0
    assert settings.loglevel == "INFO"
    assert settings.heartbeat_interval_ms == 500
    assert settings.heartbeat_ttl_ms == 2000
    assert settings.strategy == "partitioned"
    assert settings.handler == "processor.handlers:add_random_score"
    check_daemon(settings)


def test_publisher_defaults() -> None:
    settings = load_publisher_settings([], {})
    assert settings == PublisherSettings()
    assert settings.target_duration_s == 60.0
    assert settings.batch_size == 100
    assert (settings.pause_min_ms, settings.pause_max_ms) == (100, 500)
    assert settings.retry_unreceived is False


def test_every_option_names_a_settings_field() -> None:
    daemon_fields = set(Settings.__dataclass_fields__)
    publisher_fields = set(PublisherSettings.__dataclass_fields__)
    assert {option.name for option in DAEMON_OPTIONS} <= daemon_fields
    assert {option.name for option in PUBLISHER_OPTIONS} <= publisher_fields
    assert len({option.env for option in DAEMON_OPTIONS}) == len(DAEMON_OPTIONS)


# -- precedence: flag > env > file > default ------------------------------------------------


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        "consumers_count = 3\nprocessing_batch_size = 30\nbatch_window_ms = 30\n",
    )
    environ = {"CONSUMERS_COUNT": "4", "PROCESSING_BATCH_SIZE": "40"}
    settings = load_daemon_settings(["--config", path, "--consumers-count", "5"], environ)
    assert settings.consumers_count == 5  # flag beats env and file
    assert settings.processing_batch_size == 40  # env beats file
    assert settings.batch_window_ms == 30  # file beats default
    assert settings.output_stream == "messages:processed"  # default

    assert load_daemon_settings(["--config", path], environ).consumers_count == 4
    assert load_daemon_settings(["--config", path], {}).consumers_count == 3
    assert load_daemon_settings([], {}).consumers_count == 2


def test_env_names_map_to_fields() -> None:
    settings = load_daemon_settings(
        [],
        {
            "MONITORING_INTERVAL": "0.5",
            "HANDLER_TIMEOUT": "1.5",
            "SHUTDOWN_GRACE": "2",
            "STRATEGY": "race",
            "LOGLEVEL": "debug",
            "REDIS_HOST": "example",
            "REDIS_PORT": "7000",
        },
    )
    assert settings.monitor_interval_s == 0.5
    assert settings.handler_timeout_s == 1.5
    assert settings.shutdown_grace_s == 2.0
    assert settings.strategy == "race"
    assert settings.loglevel == "DEBUG"
    assert settings.url == "redis://example:7000/0"


def test_redis_url_overrides_host_and_port() -> None:
    settings = load_daemon_settings(
        ["--redis-url", "redis://other:1234/2"], {"REDIS_HOST": "example", "REDIS_PORT": "7000"}
    )
    assert settings.url == "redis://other:1234/2"


def test_toml_accepts_env_names_as_keys(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'CONSUMERS_COUNT = 7\nstrategy = "race"\n')
    settings = load_daemon_settings(["--config", path], {})
    assert settings.consumers_count == 7
    assert settings.strategy == "race"


def test_settings_survive_pickling_to_a_consumer_process() -> None:
    settings = load_daemon_settings(["--consumers-count", "3", "--redis-url", SECRET_URL], {})
    assert pickle.loads(pickle.dumps(settings)) == settings


# -- errors name the setting ----------------------------------------------------------------


def test_non_integer_consumers_count_names_the_env_var() -> None:
    with pytest.raises(ConfigError, match="CONSUMERS_COUNT") as caught:
        load_daemon_settings([], {"CONSUMERS_COUNT": "abc"})
    assert "'abc'" in str(caught.value)
    assert "environment" in str(caught.value)


def test_float_consumers_count_is_rejected() -> None:
    with pytest.raises(ConfigError, match="CONSUMERS_COUNT"):
        load_daemon_settings(["--consumers-count", "2.5"], {})


def test_negative_batch_size_names_the_env_var() -> None:
    with pytest.raises(ConfigError, match="PROCESSING_BATCH_SIZE"):
        load_daemon_settings(["--processing-batch-size", "-1"], {})
    with pytest.raises(ConfigError, match="PROCESSING_BATCH_SIZE"):
        load_daemon_settings([], {"PROCESSING_BATCH_SIZE": "0"})


def test_dead_letters_need_a_stream_of_their_own() -> None:
    environ = {"OUTPUT_STREAM": "out", "DEAD_LETTER_STREAM": "out"}
    with pytest.raises(ConfigError, match="invalid DEAD_LETTER_STREAM: 'out' is OUTPUT_STREAM"):
        load_daemon_settings([], environ)
    assert load_daemon_settings([], {"DEAD_LETTER_STREAM": "out"}).dead_letter_stream == "out"


def test_batch_size_above_what_one_script_call_takes_is_refused() -> None:
    assert load_daemon_settings([], {"PROCESSING_BATCH_SIZE": "5000"}).processing_batch_size == 5000
    with pytest.raises(ConfigError, match="PROCESSING_BATCH_SIZE: 5001 is more than 5000"):
        load_daemon_settings([], {"PROCESSING_BATCH_SIZE": "5001"})


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = _toml(tmp_path, "consumers_count = 2\nconsumer_count = 3\n")
    with pytest.raises(ConfigError, match="consumer_count") as caught:
        load_daemon_settings(["--config", path], {})
    assert path in str(caught.value)


def test_bad_toml_is_a_config_error(tmp_path: Path) -> None:
    path = _toml(tmp_path, "consumers_count = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_daemon_settings(["--config", path], {})


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """The same read serves a SIGHUP, which keeps the running configuration on a ConfigError;
    the UnicodeDecodeError it raised before ended the supervisor's loop."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"\xff\xfe output_stream = 'x'\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_daemon_settings(["--config", str(path)], {})


@pytest.mark.parametrize(
    "name", ["INPUT_CHANNEL", "OUTPUT_STREAM", "DEAD_LETTER_STREAM", "CONSUMERS_LIST", "KEY_PREFIX"]
)
def test_an_empty_key_or_channel_name_is_refused(name: str) -> None:
    """An env file's ``OUTPUT_STREAM=`` wrote every message to the key "" (and an empty
    channel subscribed to "", where nothing is published), with the daemon ready."""
    with pytest.raises(ConfigError, match=f"{name}.*is no name"):
        load_daemon_settings([], {name: ""})
    with pytest.raises(ConfigError, match=f"{name}.*is no name"):
        load_daemon_settings([], {name: "  "})


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_daemon_settings(["--config", str(tmp_path / "absent.toml")], {})


def test_wrong_type_in_file_names_the_setting(tmp_path: Path) -> None:
    path = _toml(tmp_path, "consumers_count = true\n")
    with pytest.raises(ConfigError, match="CONSUMERS_COUNT"):
        load_daemon_settings(["--config", path], {})
    path = _toml(tmp_path, "output_stream = 5\n")
    with pytest.raises(ConfigError, match="OUTPUT_STREAM"):
        load_daemon_settings(["--config", path], {})


def test_bad_strategy_names_the_env_var() -> None:
    with pytest.raises(ConfigError, match="STRATEGY") as caught:
        load_daemon_settings([], {"STRATEGY": "fastest"})
    assert "partitioned" in str(caught.value)


def test_bad_loglevel_names_the_env_var() -> None:
    with pytest.raises(ConfigError, match="LOGLEVEL"):
        load_daemon_settings(["--loglevel", "chatty"], {})


@pytest.mark.parametrize("raw", ["nan", "inf", "soon"])
def test_non_finite_or_non_numeric_float_is_rejected(raw: str) -> None:
    with pytest.raises(ConfigError, match="HANDLER_TIMEOUT"):
        load_daemon_settings([], {"HANDLER_TIMEOUT": raw})


def test_booleans() -> None:
    assert load_publisher_settings([], {"RETRY_UNRECEIVED": "yes"}).retry_unreceived is True
    assert load_publisher_settings([], {"RETRY_UNRECEIVED": "0"}).retry_unreceived is False
    flagged = load_publisher_settings(["--no-retry-unreceived"], {"RETRY_UNRECEIVED": "true"})
    assert flagged.retry_unreceived is False
    assert load_publisher_settings(["--retry-unreceived"], {}).retry_unreceived is True


def test_bad_boolean_names_the_env_var() -> None:
    with pytest.raises(ConfigError, match="RETRY_UNRECEIVED") as caught:
        load_publisher_settings([], {"RETRY_UNRECEIVED": "maybe"})
    assert "boolean" in str(caught.value)


def test_publisher_pause_range_is_checked() -> None:
    with pytest.raises(ConfigError, match="PAUSE_MAX_MS"):
        load_publisher_settings(["--pause-min-ms", "300", "--pause-max-ms", "200"], {})


# -- cross-field checks ---------------------------------------------------------------------


def test_heartbeat_ttl_must_exceed_interval() -> None:
    with pytest.raises(ConfigError, match="HEARTBEAT_TTL_MS"):
        load_daemon_settings([], {"HEARTBEAT_INTERVAL_MS": "500", "HEARTBEAT_TTL_MS": "500"})
    load_daemon_settings([], {"HEARTBEAT_INTERVAL_MS": "500", "HEARTBEAT_TTL_MS": "501"})


def test_takeover_buffer_must_outlive_dead_consumer_detection() -> None:
    # Detection takes HEARTBEAT_TTL_MS + 2 x HEARTBEAT_INTERVAL_MS = 2000 + 1000 by default.
    with pytest.raises(ConfigError, match="TAKEOVER_BUFFER_MS"):
        load_daemon_settings([], {"TAKEOVER_BUFFER_MS": "3000"})
    load_daemon_settings([], {"TAKEOVER_BUFFER_MS": "3001"})


def test_dedup_window_must_exceed_twice_the_takeover_buffer() -> None:
    with pytest.raises(ConfigError, match="DEDUP_WINDOW_MS"):
        load_daemon_settings([], {"TAKEOVER_BUFFER_MS": "10000", "DEDUP_WINDOW_MS": "20000"})
    load_daemon_settings([], {"TAKEOVER_BUFFER_MS": "10000", "DEDUP_WINDOW_MS": "20001"})


# -- addresses and bounds: checked as read, named with their source ------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("garbage", "'garbage' is not a redis://, rediss:// or unix:// URL"),
        ("http://host:1/0", "is not a redis://, rediss:// or unix:// URL"),
        ("redis://host:notaport/0", "Port could not be cast to integer value as 'notaport'"),
        ("redis://[::1", "Invalid IPv6 URL"),
        ("redis://host:99999/0", "Port out of range"),
        ("redis://host:0/0", "port 0"),
        ("redis://host/abc", "the path '/abc' is not a database number"),
        ("redis://host/1/2", "the path '/1/2' is not a database number"),
        ("redis://host/-1", "the path '/-1' is not a database number"),
        ("redis://host:1/0?db=x", "Invalid value for 'db' in connection URL"),
        ("unix://", "give the socket's absolute path"),
        ("unix://relative/redis.sock", "give the socket's absolute path"),
    ],
)
def test_a_malformed_redis_url_is_refused_as_read(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_daemon_settings([], {"REDIS_URL": url})
    assert str(caught.value).startswith("invalid REDIS_URL (from environment): "), caught.value
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://host",
        "redis://host/",
        "redis://host:6380/15",
        "rediss://user:pw@host:6380/0?ssl_cert_reqs=none",
        "redis://[::1]:6379/0",
        "unix:///run/redis.sock?db=2",
        "unix://user:pw@/run/redis.sock",
    ],
)
def test_well_formed_redis_urls_pass(url: str) -> None:
    assert load_daemon_settings(["--redis-url", url], {}).url == url


def test_a_url_error_names_where_the_value_came_from(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'redis_url = "redis://host/abc"\n')
    with pytest.raises(ConfigError, match=f"invalid REDIS_URL \\(from config file {path}\\)"):
        load_daemon_settings(["--config", path], {})
    with pytest.raises(ConfigError, match=r"invalid REDIS_URL \(from flag --redis-url\)"):
        load_publisher_settings(["--redis-url", "redis://host/abc"], {})


def test_a_malformed_url_error_never_shows_its_password() -> None:
    for url in (
        "redis://user:secret@[::1",
        "redis://user:secret@host/abc",
        "user:secret@host:6379",
        "http://u:secret@h",
    ):
        with pytest.raises(ConfigError) as caught:
            load_daemon_settings([], {"REDIS_URL": url})
        assert "secret" not in str(caught.value), caught.value


def test_ports_have_an_upper_bound() -> None:
    with pytest.raises(ConfigError, match=r"REDIS_PORT \(from flag --redis-port\): '99999'"):
        load_daemon_settings(["--redis-port", "99999"], {})
    with pytest.raises(ConfigError, match=r"METRICS_PORT \(from environment\): '70000' must be"):
        load_daemon_settings([], {"METRICS_PORT": "70000"})
    assert load_daemon_settings([], {"REDIS_PORT": "65535"}).redis_port == 65535


def test_a_host_that_cannot_go_into_a_url_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"REDIS_HOST \(from environment\): '::1' is not a host"):
        load_daemon_settings([], {"REDIS_HOST": "::1"})
    assert load_daemon_settings([], {"REDIS_HOST": "[::1]"}).url == "redis://[::1]:6379/0"


def test_a_cluster_url_selects_database_0_only() -> None:
    environ = {"REDIS_URL": "redis://node:7000/3", "REDIS_CLUSTER": "true"}
    with pytest.raises(ConfigError, match="selects database 3; a Redis Cluster has database 0"):
        load_daemon_settings([], environ)


def test_consumer_counts_have_a_per_host_bound() -> None:
    assert load_daemon_settings([], {"CONSUMERS_COUNT": "16"}).consumers_count == 16
    limit = MAX_CONSUMERS_PER_HOST
    assert load_daemon_settings([], {"CONSUMERS_COUNT": str(limit)}).consumers_count == limit
    for name in ("CONSUMERS_COUNT", "MAX_CONSUMERS"):
        with pytest.raises(ConfigError, match=f"invalid {name} \\(from environment\\): 100000"):
            load_daemon_settings([], {name: "100000"})
    assert Settings().max_consumers <= limit  # the default (the CPU count) is capped too


def test_readers_per_host_is_bounded_and_defaults_to_two() -> None:
    assert Settings().readers_per_host == 2
    assert load_daemon_settings([], {"READERS_PER_HOST": "3"}).readers_per_host == 3
    for raw, why in (("0", "must be >= 1"), ("1000", "must be <= 256"), ("two", "not an integer")):
        with pytest.raises(ConfigError, match=f"invalid READERS_PER_HOST .*{why}"):
            load_daemon_settings([], {"READERS_PER_HOST": raw})


def test_check_daemon_rejects_direct_construction() -> None:
    with pytest.raises(ConfigError, match="HEARTBEAT_TTL_MS"):
        check_daemon(Settings(heartbeat_interval_ms=1000, heartbeat_ttl_ms=900))


# -- secrets --------------------------------------------------------------------------------


def test_repr_and_describe_never_show_the_password() -> None:
    settings = load_daemon_settings([], {"REDIS_URL": SECRET_URL})
    assert settings.url == SECRET_URL  # the client still gets the real URL
    for text in (repr(settings), str(settings), settings.describe(), settings.safe_url):
        assert "secret" not in text
    assert "redis_url=redis://user:***@host:1/0" in settings.describe()
    assert "consumers_count=2" in settings.describe()
    publisher = PublisherSettings(redis_url=SECRET_URL)
    assert "secret" not in repr(publisher)
    assert "secret" not in publisher.safe_url


@pytest.mark.parametrize(
    "url",
    [
        "redis://:secret@host:1/0",
        "rediss://user:secret@host:6380/0",
        "unix://user:secret@/tmp/redis.sock?db=0",
    ],
)
def test_password_masked_in_every_url_form(url: str) -> None:
    settings = Settings(redis_url=url)
    assert "secret" not in settings.describe()
    assert "secret" not in repr(settings)


def test_password_in_query_string_is_masked() -> None:
    # redis-py's from_url takes ?password=... as the password, so it is one too.
    settings = Settings(redis_url="redis://host:1/0?password=secret")
    assert "secret" not in settings.describe()
    assert "secret" not in settings.safe_url


# -- the entry points -----------------------------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    names = {option.env for option in (*DAEMON_OPTIONS, *PUBLISHER_OPTIONS)}
    env = {key: value for key, value in os.environ.items() if key not in names}
    # Unreachable on purpose: a test that wrongly passes validation must not find a server.
    env["REDIS_URL"] = "redis://127.0.0.1:1/0"
    env.update(extra)
    return env


def _run(script: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        [sys.executable, script, *args],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        # Its own session, so a process that wrongly started consumers takes them along.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "error" in lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        ([], {"CONSUMERS_COUNT": "abc"}, ("CONSUMERS_COUNT", "abc")),
        (["--processing-batch-size", "-1"], {}, ("PROCESSING_BATCH_SIZE", "-1")),
        (["--strategy", "fastest"], {}, ("STRATEGY",)),
        (["--handler", "nosuch.module:fn"], {}, ("HANDLER", "nosuch.module:fn")),
        (["--handler", "processor.handlers:nosuch"], {}, ("HANDLER",)),
    ],
    ids=["env-not-int", "flag-negative", "strategy", "handler-module", "handler-attribute"],
)
def test_consume_exits_2_with_one_line(
    args: list[str], env: dict[str, str], words: tuple[str, ...]
) -> None:
    _assert_one_line_error(_run("demo/consume.py", args, _clean_env(**env)), *words)


def test_consume_rejects_unknown_key_in_config_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "consumers_count = 2\nbogus_setting = 1\n")
    result = _run("demo/consume.py", ["--config", path], _clean_env())
    _assert_one_line_error(result, "bogus_setting")


def test_consume_help_lists_every_flag() -> None:
    result = _run("demo/consume.py", ["--help"], _clean_env(COLUMNS="200"))
    assert result.returncode == 0, result.stderr
    for option in DAEMON_OPTIONS:
        assert option.flag in result.stdout
    assert "--config" in result.stdout


def test_publish_exits_2_with_one_line() -> None:
    result = _run("demo/publish.py", [], _clean_env(BATCH_SIZE="-5"))
    _assert_one_line_error(result, "BATCH_SIZE", "-5")


def test_publish_help_exits_0() -> None:
    result = _run("demo/publish.py", ["--help"], _clean_env(COLUMNS="200"))
    assert result.returncode == 0, result.stderr
    for option in PUBLISHER_OPTIONS:
        assert option.flag in result.stdout


# -- a renamed setting keeps its old name as an alias ------------------------------------------


def test_the_dedup_window_is_read_under_its_old_name_too(tmp_path: Path) -> None:
    assert load_daemon_settings([], {"DEDUP_WINDOW_MS": "90000"}).dedup_window_ms == 90_000
    assert load_daemon_settings([], {"LOCK_TTL_MS": "90000"}).dedup_window_ms == 90_000
    assert load_daemon_settings(["--lock-ttl-ms", "90000"], {}).dedup_window_ms == 90_000
    assert load_daemon_settings(["--dedup-window-ms", "90000"], {}).dedup_window_ms == 90_000
    both = {"DEDUP_WINDOW_MS": "90000", "LOCK_TTL_MS": "80000"}
    assert load_daemon_settings([], both).dedup_window_ms == 90_000  # the new name wins
    config = tmp_path / "processor.toml"
    config.write_text("lock_ttl_ms = 70000\n")
    assert load_daemon_settings(["--config", str(config)], {}).dedup_window_ms == 70_000
    config.write_text("lock_ttl_ms = 70000\ndedup_window_ms = 75000\n")
    assert load_daemon_settings(["--config", str(config)], {}).dedup_window_ms == 75_000
    with pytest.raises(ConfigError, match=r"invalid DEDUP_WINDOW_MS \(from environment, as LOCK"):
        load_daemon_settings([], {"LOCK_TTL_MS": "soon"})


@pytest.mark.parametrize(
    ("name", "value", "limit"),
    [
        ("SHUTDOWN_GRACE", "1e308", "604800"),  # overflowed a selector's timeout at shutdown
        ("MONITORING_INTERVAL", "1e300", "604800"),
        ("DEDUP_WINDOW_MS", "99999999999999", "604800000"),
        ("HEARTBEAT_TTL_MS", "604800001", "604800000"),
    ],
)
def test_a_duration_longer_than_a_week_is_refused(name: str, value: str, limit: str) -> None:
    with pytest.raises(ConfigError, match=rf"invalid {name} \(from environment\): .* <= {limit}$"):
        load_daemon_settings([], {name: value})


@pytest.mark.parametrize(
    ("readers", "count", "strategy", "warned"),
    [
        (1, 3, "partitioned", True),
        (2, 3, "partitioned", False),
        (1, 1, "partitioned", False),
        (1, 3, "race", False),
    ],
)
def test_a_single_reader_is_warned_about(caplog, readers, count, strategy, warned) -> None:
    settings = Settings(readers_per_host=readers, consumers_count=count, strategy=strategy)
    with caplog.at_level(logging.WARNING, logger="processor.group.startup"):
        warn_if_one_reader(settings)
    assert ("READERS_PER_HOST=1: one copy" in caplog.text) is warned
