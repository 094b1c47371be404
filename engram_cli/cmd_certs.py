"""`engram certs --out DIR`: a throwaway CA and one certificate per identity (shard, admin, train, read).

    engram certs --out /certs --host shard-0 --host shard-1 --host worker     # compose's one-shot `certs`

For a laptop or compose; in k8s cert-manager issues them (k8s/components/tls). Every certificate
names localhost, 127.0.0.1, `engram-shard` and the given hosts, and carries its role as a SAN
URI `engram-role:<role>`. An existing CA in DIR is kept unless --force (certificates stay valid
across restarts of the one-shot service).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for ca.pem, <identity>.pem and <identity>-key.pem")
    parser.add_argument("--host", action="append", default=[], help="a DNS name or IP the servers are dialed at")
    parser.add_argument("--days", type=float, default=30.0, help="validity of the CA and the certificates")
    parser.add_argument("--force", action="store_true", help="replace certificates that are already there")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.security.certs import IDENTITIES, write_bundle

    out = Path(args.out)
    if (out / "ca.pem").is_file() and not args.force:
        print(f"engram certs: {out}/ca.pem exists; keeping it (--force replaces it)")
        return 0
    if args.days <= 0:
        print("engram certs: --days must be positive", file=sys.stderr)
        return 2
    issued = write_bundle(out, hosts=args.host, days=args.days)
    for ident, role in IDENTITIES.items():
        print(f"{ident:<6} role {role:<5} {issued[ident].cert} (key {issued[ident].key})")
    print(f"CA {out / 'ca.pem'}")
    return 0
