"""processor: turn a Redis Pub/Sub channel into an exactly-once Redis Stream."""

__version__ = "0.1.0"
