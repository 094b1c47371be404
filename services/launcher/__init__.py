"""A local cluster without Docker: Redis and shard processes on this machine (see cluster.py)."""

from services.launcher.cluster import LocalCluster
from services.launcher.processes import LauncherError, RedisProcess, free_port, stop_process
from services.launcher.shard_process import ShardProcess

__all__ = ["LauncherError", "LocalCluster", "RedisProcess", "ShardProcess", "free_port", "stop_process"]
