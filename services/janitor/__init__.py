"""The janitor stage."""
