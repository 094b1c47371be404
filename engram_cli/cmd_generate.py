"""`engram generate "prompt" --address host:port`: stream tokens from a running model worker.

engram generate "def main(" --address 127.0.0.1:50061 --max-new-tokens 64 --temperature 0
engram generate --score "some text" --address 127.0.0.1:50061     # log-probs instead
"""

from __future__ import annotations

import argparse
import sys

from engram_cli.main import add_config_args


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt (or, with --score, the text to score)")
    parser.add_argument("--address", default="127.0.0.1:50061", help="host:port of `engram serve`")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--truncate", action="store_true", help="keep the prompt's last tokens if it is too long")
    parser.add_argument("--score", action="store_true", help="print the text's token log-probs instead")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="deadline of the call in seconds")
    parser.add_argument("--timeout", dest="timeout_s", type=float, help=argparse.SUPPRESS)  # old spelling
    add_config_args(parser, default_preset="tiny")  # only the security section is used (TLS, token)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import grpc

    from engram.config import load_config
    from proto.worker.v1 import worker_pb2, worker_pb2_grpc
    from services.security.tls import sync_channel

    cfg = load_config(args.preset, args.config, args.overrides)
    with sync_channel(args.address, cfg.security) as channel:
        stub = worker_pb2_grpc.ModelWorkerStub(channel)
        try:
            if args.score:
                reply = stub.Score(
                    worker_pb2.ScoreRequest(text=args.prompt, truncate=args.truncate), timeout=args.timeout_s
                )
                print(
                    f"{reply.num_tokens} tokens, total log-prob {reply.total_logprob:.4f}, "
                    f"mean {reply.total_logprob / max(1, len(reply.logprobs)):.4f}"
                )
                return 0
            fields = {
                "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "top_k": args.top_k,
                "top_p": args.top_p,
                "seed": args.seed,
            }
            req = worker_pb2.GenerateRequest(
                prompt=args.prompt, truncate=args.truncate, **{k: v for k, v in fields.items() if v is not None}
            )
            for i, msg in enumerate(stub.Generate(req, timeout=args.timeout_s)):
                sys.stdout.write(args.prompt + msg.text if i == 0 else msg.text)  # the prompt once it is accepted
                sys.stdout.flush()
            sys.stdout.write("\n")
        except grpc.RpcError as exc:
            print(f"\nengram generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0
