"""The `engram` command: thin argument parsing over the packages that do the work."""
