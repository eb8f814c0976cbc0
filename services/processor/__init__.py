"""The processor stage."""
