"""smi-pipeline: shared adapters (settings, job table, Kafka plumbing), the local
stack and the ``smi`` command line."""
