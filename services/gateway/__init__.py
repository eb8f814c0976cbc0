"""The gateway stage."""
