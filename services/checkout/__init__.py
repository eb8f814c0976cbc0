"""The checkout stage."""
