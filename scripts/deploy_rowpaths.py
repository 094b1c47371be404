"""The row data paths in the deployments (scripts/deploy_refs_k8s.py and deploy_refs_compose.py use these).

A shard registers its data plane as the host of its `--advertise` address and `cluster.data_port`;
clients on the shard's `cluster.host_id` read its table files under `cluster.shm_dir`. So a
deployment must fix the data port (a random one cannot be exposed or admitted), mount one shared
volume at `shm_dir` in exactly the containers that claim a shared host id, and expose the port.
"""

from __future__ import annotations

import tomllib

from deploy_common import compose_ports, volume_source


def argv_text(value: object) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]  # type: ignore[union-attr, attr-defined]


def compose_configs(data: dict, svc: dict) -> list[str]:
    """The contents of the configs a compose service mounts."""
    out = []
    for ref in svc.get("configs") or []:
        source = ref if isinstance(ref, str) else ref.get("source")
        out.append(str(((data.get("configs") or {}).get(source) or {}).get("content", "")))
    return out


def engram_sets(argv: list[str]) -> dict[str, str]:
    """`--set a.b=v` pairs of an engram argv -> {"a.b": "v"} (the last one wins, as in load_config)."""
    out: dict[str, str] = {}
    for flag, value in zip(argv, argv[1:]):
        if flag == "--set":
            key, _, val = str(value).partition("=")
            out[key.strip()] = val.strip()
    return out


def cluster_field(argv: list[str], configs: list[str], field: str) -> str | None:
    """cluster.<field> as `--set` or a TOML config the container mounts sets it; None: left at the default."""
    sets = engram_sets(argv)
    if f"cluster.{field}" in sets:
        return sets[f"cluster.{field}"]
    for text in configs:
        try:
            value = (tomllib.loads(text).get("cluster") or {}).get(field)
        except tomllib.TOMLDecodeError:
            continue
        if value is not None:
            return str(value)
    return None


def flag(argv: list[str], name: str) -> str | None:
    return next((str(v) for f, v in zip(argv, argv[1:]) if f == name), None)


def data_address(advertise: str, data_port: str | None) -> tuple[str | None, str]:
    """-> (the data plane's registered host:port or None, why none)."""
    if data_port is None or data_port.strip() in ("", "0"):
        return None, (
            f"the shard advertises {advertise} but its data plane listens on a random port "
            "(cluster.data_port unset or 0): no Service or NetworkPolicy can name it; set a fixed "
            "cluster.data_port"
        )
    if not data_port.isdigit():
        return None, f"cluster.data_port={data_port!r} is not a port number"
    return f"{advertise.rsplit(':', 1)[0]}:{int(data_port)}", ""


def compose_row_paths(data: dict, where: str) -> list[str]:
    """Each shard exposes its data plane; the shm volume's users agree on shm_dir and host_id."""
    problems: list[str] = []
    services = data.get("services") or {}
    sharing: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (volume, path) -> [(service, host_id)]
    claims: dict[str, str] = {}  # service -> the host_id it sets
    for name, svc in services.items():
        sw = f"{where} services.{name}"
        argv = argv_text(svc.get("command"))
        configs = compose_configs(data, svc)
        advertise = flag(argv, "--advertise")
        if advertise is not None:
            address, why = data_address(advertise, cluster_field(argv, configs, "data_port"))
            if address is None:
                problems.append(f"{sw}: {why}")
            else:
                host, port = address.rsplit(":", 1)
                if host not in services:
                    problems.append(f"{sw}: registers its data plane as {address}: no service {host}")
                elif int(port) not in compose_ports(services[host]):
                    problems.append(
                        f"{sw}: registers its data plane as {address}: service {host} exposes "
                        f"{sorted(compose_ports(services[host]))} (expose/ports), not {port}"
                    )
        sets = engram_sets(argv)
        if "cluster.host_id" in sets:
            claims[name] = sets["cluster.host_id"]
        if "cluster.shm_dir" not in sets and "cluster.host_id" not in sets:
            continue
        shm_dir = (sets.get("cluster.shm_dir") or cluster_field(argv, configs, "shm_dir") or "/dev/shm").rstrip("/")
        mounts = {}
        for v in svc.get("volumes") or []:
            kind, source = volume_source(v)
            target = str(v.get("target", "")) if isinstance(v, dict) else str(v).split(":")[1]
            mounts[target.rstrip("/")] = (kind, source)
        kind, source = mounts.get(shm_dir, ("", ""))
        if kind != "volume":
            problems.append(
                f"{sw}: cluster.shm_dir {shm_dir} (co-located row path) is not a named volume this "
                "service mounts: it shares no files there with the other services"
            )
            continue
        sharing.setdefault((source, shm_dir), []).append((name, sets.get("cluster.host_id", "")))
    for (volume, path), users in sorted(sharing.items()):
        ids = {h for _n, h in users}
        if len(ids) != 1 or "" in ids:
            problems.append(
                f"{where}: services {', '.join(n for n, _h in users)} share volume {volume} at {path} "
                f"but set cluster.host_id {sorted(ids)}: they must name the one host they share"
            )
            continue
        members = {n for n, _h in users}
        for name, host_id in claims.items():
            if host_id in ids and name not in members:
                problems.append(
                    f"{where} services.{name}: cluster.host_id={host_id} claims the host of volume "
                    f"{volume} but does not mount it at {path}: its shared-memory reads would fail"
                )
    return problems
