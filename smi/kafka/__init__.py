"""Kafka plumbing shared by every stage: the Faust app factory (app), the typed,
acknowledged producer (producer), dead letters (dead_letter) and the agent body
that never loses or silently acks a message (handling). Topics are created by
smi.stack.topics, not here."""
