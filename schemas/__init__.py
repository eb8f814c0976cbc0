"""The contract of design.md as typed, I/O-free code: statuses and transitions,
money, message models and the topic registry."""
