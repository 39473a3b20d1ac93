"""processor: turn a Redis Pub/Sub channel into an exactly-once Redis Stream."""
