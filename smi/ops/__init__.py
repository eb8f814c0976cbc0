"""Operations on the running system, shared by the `smi` command line and the admin
API: list and show jobs, send operator commands, revenue, consumer lag. Each module
is plain async functions over the job table or Kafka; render.py draws them for people."""
