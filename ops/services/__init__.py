"""`make up | down | status`: RabbitMQ, Redis and the aggregator on one machine (lifecycle.py says how)."""
