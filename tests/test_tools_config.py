"""The one-shot commands given the daemon's own TOML file, against a real redis-server: each
takes the settings it reads (the group's key names) and passes over the daemon's others, so it
reads the keys the daemon writes; a key that is no setting at all is still refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from processor.config import GroupSettings
from processor.loading import load_publisher_settings
from processor.store.keys import Keys
from tests.helpers import list_live_consumer, processor_cli

# A daemon's file: its own settings (under their field, variable and former names) beside the
# group's key names the tools need.
DAEMON_FILE = """\
consumers_count = 4
strategy = "race"
handler = "processor.handlers:add_random_score"
HANDLER_CONCURRENCY = 8
lock_ttl_ms = 90000
input_channel = "custom:in"
output_stream = "custom:out"
dead_letter_stream = "custom:dead"
consumers_list = "custom:ids"
key_prefix = "tool"
"""


@pytest.fixture
def daemon_file(tmp_path: Path) -> str:
    path = tmp_path / "daemon.toml"
    path.write_text(DAEMON_FILE)
    return str(path)


@pytest.fixture
def custom_keys() -> Keys:
    return Keys.from_settings(
        GroupSettings(
            output_stream="custom:out",
            dead_letter_stream="custom:dead",
            consumers_list="custom:ids",
            key_prefix="tool",
            input_channel="custom:in",
        )
    )


def test_the_tools_read_the_daemons_file_and_its_key_names(
    redis_url: str, client: redis.Redis, custom_keys: Keys, daemon_file: str
) -> None:
    raw = json.dumps({"message_id": "m-1"})
    client.xadd(custom_keys.output, {"message_id": "m-0"})
    entry = client.xadd(
        custom_keys.dead, {"message_id": "m-1", "reason_code": "handler_error", "raw": raw}
    ).decode()
    list_live_consumer(client, custom_keys)

    status = processor_cli("status", "--config", daemon_file, "--redis-url", redis_url)
    assert status.returncode == 0, status.stderr
    assert "streams: custom:out 1 | custom:dead 1" in status.stdout.splitlines()
    assert "group: 1 live consumers" in status.stdout

    listed = processor_cli(
        "dead-letters", "--json", "--config", daemon_file, "--redis-url", redis_url
    )
    assert listed.returncode == 0, listed.stderr
    assert [letter["entry_id"] for letter in json.loads(listed.stdout)] == [entry]

    # Listed, with no subscriber on custom:in: published to the daemon's channel, kept.
    replay = processor_cli(
        "replay", "--all", "--json", "--config", daemon_file, "--redis-url", redis_url
    )
    assert replay.returncode == 6, replay.stderr
    (outcome,) = json.loads(replay.stdout)
    assert (outcome["entry_id"], outcome["outcome"]) == (entry, "not received")


@pytest.mark.parametrize("command", [("status",), ("dead-letters",), ("replay", "--all")])
def test_a_key_that_is_no_setting_is_still_refused(
    redis_url: str, daemon_file: str, command: tuple[str, ...]
) -> None:
    Path(daemon_file).write_text(DAEMON_FILE + "consumer_count = 3\n")
    result = processor_cli(*command, "--config", daemon_file, "--redis-url", redis_url)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.endswith(f"error: unknown key 'consumer_count' in config file {daemon_file}")


def test_the_publisher_reads_the_daemons_file_too(daemon_file: str) -> None:
    settings = load_publisher_settings(["--config", daemon_file], {})
    assert settings.input_channel == "custom:in"
