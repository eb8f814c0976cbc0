"""The local stack: a Kafka broker, Redis, stripe-mock and a mail sink, started as
plain processes under ``var/`` (``smi stack up|down|status``), and topic creation."""
