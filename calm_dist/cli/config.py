"""`calm-config`: print the validated, resolved configuration (derived values included) as YAML.

    calm-config --config calm_m --config site.yaml training.micro_batch_size=2 --world-size 64
    calm-config --config calm_xl --world-size 64 --memory     # per-GPU memory of that layout
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import yaml

from calm_dist.config.errors import ConfigError
from calm_dist.config.loader import config_to_dict, list_presets, load_config
from calm_dist.config.validate import validate
from calm_dist.parallel.memory import describe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calm-config",
        description="Load layered configs and overrides, validate them, print the result as YAML.",
        epilog=f"presets: {', '.join(list_presets())}",
    )
    parser.add_argument("--config", "-c", action="append", default=[], metavar="FILE_OR_PRESET",
                        help="a YAML file or preset name; repeat to layer (later wins)")
    parser.add_argument("--world-size", type=int, default=1, help="ranks to validate for (default 1)")
    parser.add_argument("--memory", action="store_true",
                        help="print the per-GPU memory estimate of the layout instead of the config")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides applied after all files, e.g. model.hidden_size=512")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        cfg = validate(load_config(args.config, args.overrides), world_size=args.world_size)
    except ConfigError as e:
        print(f"calm-config: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.memory:
        sys.stdout.write(describe(cfg))
        return 0
    sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
