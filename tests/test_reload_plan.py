"""What a SIGHUP applies live and what it leaves for a restart (a pure function)."""

from __future__ import annotations

from processor.config import Settings
from processor.group.signals import plan_reload


def test_live_fields_are_applied_and_the_rest_reported():
    current = Settings(processing_batch_size=100, consumers_count=2, loglevel="INFO")
    reloaded = Settings(processing_batch_size=7, consumers_count=5, loglevel="DEBUG")
    plan = plan_reload(current, reloaded)
    assert plan.settings.processing_batch_size == 7
    assert plan.settings.loglevel == "DEBUG"
    assert plan.settings.consumers_count == 2  # needs a restart: kept
    assert plan.applied == ["loglevel 'INFO' -> 'DEBUG'", "processing_batch_size 100 -> 7"]
    assert plan.not_applied == ["consumers_count 2 -> 5"]
    assert plan.replace_consumers


def test_a_log_level_alone_needs_no_consumer_replaced():
    plan = plan_reload(Settings(), Settings(loglevel="WARNING"))
    assert plan.applied == ["loglevel 'INFO' -> 'WARNING'"]
    assert not plan.replace_consumers


def test_a_changed_password_is_reported_without_its_value():
    plan = plan_reload(
        Settings(redis_url="redis://:old-secret@h:1/0"),
        Settings(redis_url="redis://:new-secret@h:1/0"),
    )
    assert plan.not_applied == ["redis_url (secret)"]
    assert "secret@" not in " ".join(plan.not_applied)


def test_nothing_changed_applies_nothing():
    plan = plan_reload(Settings(), Settings())
    assert (plan.applied, plan.not_applied, plan.settings) == ([], [], Settings())
