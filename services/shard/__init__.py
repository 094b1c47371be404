"""The memory-shard gRPC server: Engram table rows in host RAM, served and trained in place.

store.py       rows of the owned slots, validation, gathers and optimizer updates (sync)
gather.py      the lookup hot path (gather + wire-dtype conversion)
aggregate.py   sync-mode aggregation of a step's parts
checkpoint.py  per-slot files, atomic writes, verified restores
migrate.py     slot chunks out, staging in
engine.py      the event-loop side: worker pool, locks, admin operations, stats
servicer.py    gRPC translation only
server.py      boot, health, heartbeat, graceful shutdown
__main__.py    `python -m services.shard`
"""
