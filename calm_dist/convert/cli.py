"""`calm-convert`: convert, inspect and compare checkpoints from the command line.

    calm-convert convert runs/quickstart/calm exports/calm              # latest, float32, verified
    calm-convert convert runs/x/checkpoints exports/x --tag global_step500 --dtype bfloat16
    calm-convert convert runs/x exports/x --autoencoder reference      # autoencoder in exports/x/autoencoder/
    calm-convert inspect runs/quickstart/calm                           # or a converted directory
    calm-convert diff runs/x/checkpoints/global_step500 exports/x
    calm-convert verify runs/x --all                                    # every file against its checksum
    calm-convert import-reference ref/calm_m exports/calm_m             # the reference's format -> ours
    calm-convert export-reference exports/calm ref_out/calm             # ours -> what the reference loads
    calm-convert convert runs/x ref_out/x --format reference            # a checkpoint straight to the reference format

Bad input (a path that is not a checkpoint, a missing tag or file, a damaged shard) exits with
status 2 and one line on stderr; a converted model that fails its verification against the
checkpoint exits with 1 and writes nothing; `verify` exits 2 when anything is damaged.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from calm_dist.checkpoint.reading import ConversionError
from calm_dist.convert.export import DTYPES, convert_checkpoint
from calm_dist.convert.integrity import verify_path
from calm_dist.convert.reference import export_reference, import_reference
from calm_dist.convert.summary import diff_checkpoints, format_diff, format_inspection, inspect_checkpoint
from calm_dist.convert.verify import VerificationError

PROG = "calm-convert"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Convert, inspect and compare calm_dist checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="a ZeRO checkpoint -> config.json + safetensors + tokenizer")
    convert.add_argument("src", help="a training run directory, its checkpoints/ directory, or a global_stepN directory")
    convert.add_argument("out", help="the output directory (written atomically)")
    convert.add_argument("--tag", help="the checkpoint to convert, e.g. global_step500 (default: the one `latest` names)")
    convert.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (default float32)")
    convert.add_argument("--autoencoder", choices=("embed", "reference"), default="embed",
                         help="CALM only: keep the frozen autoencoder inside model.safetensors (embed), or write "
                              "it to OUT/autoencoder/ and reference it from config.json (reference)")
    convert.add_argument("--no-verify", action="store_true", help="skip the output check against the checkpoint")
    convert.add_argument("--tokenizer", help="tokenizer to ship instead of the run's data.tokenizer")
    convert.add_argument("--allow-missing-tokenizer", action="store_true",
                         help="convert without tokenizer.json when the run's tokenizer cannot be found")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    convert.add_argument("--format", choices=("calm-dist", "reference"), default="calm-dist",
                         help="reference: write what the reference implementation loads (see export-reference)")

    imp = commands.add_parser("import-reference", help="a reference implementation directory (autoencoder or "
                                                       "CALM) -> a converted directory")
    imp.add_argument("src", help="the reference directory: config.json + pytorch_model.bin or model.safetensors")
    imp.add_argument("out", help="the output directory (written atomically)")
    imp.add_argument("--autoencoder", help="CALM: the reference autoencoder's directory (default: its ae_path)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    exp = commands.add_parser("export-reference", help="a converted directory -> the reference implementation's "
                                                       "format (CALM: with its autoencoder in OUT/autoencoder)")
    exp.add_argument("src", help="a converted directory (calm-convert convert or import-reference)")
    exp.add_argument("out", help="the output directory (written atomically)")
    exp.add_argument("--weights", choices=("bin", "safetensors"), default="bin",
                     help="pytorch_model.bin (default; what the reference writes) or model.safetensors "
                          "(autoencoder only)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    inspect = commands.add_parser("inspect", help="step, config, parameter counts and tensor shapes")
    inspect.add_argument("path", help="a checkpoint (run, checkpoints/ or global_stepN directory) or a converted directory")
    inspect.add_argument("--tag", help="the checkpoint to inspect (default: the one `latest` names)")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument("--max-tensors", type=int, default=200, help="tensors listed in the text output")

    verify = commands.add_parser("verify", help="check a checkpoint's files against its manifest (or a "
                                                "converted directory's weights): names a damaged file")
    verify.add_argument("path", help="a run, checkpoints/ or global_stepN directory, or a converted directory")
    verify.add_argument("--tag", help="the checkpoint to verify (default: the one `latest` names)")
    verify.add_argument("--all", action="store_true", help="every complete checkpoint of the run")

    diff = commands.add_parser("diff", help="config fields, tensor names, shapes and values that differ")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def convert_to_reference(args: argparse.Namespace) -> None:
    """convert --format reference: the verified calm-dist conversion, then the export, into OUT."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConversionError(f"{out} already exists: choose another output or pass --overwrite")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent if out.parent.is_dir() else None) as tmp:
        converted = Path(tmp) / "converted"
        convert_checkpoint(args.src, converted, tag=args.tag, dtype=args.dtype, embed_autoencoder=True,
                           verify=not args.no_verify, tokenizer=args.tokenizer,
                           allow_missing_tokenizer=args.allow_missing_tokenizer)
        export_reference(converted, out, overwrite=args.overwrite, progress=_say)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "convert" and args.format == "reference":
            convert_to_reference(args)
            print(args.out)
        elif args.command == "convert":
            convert_checkpoint(args.src, args.out, tag=args.tag, dtype=args.dtype,
                               embed_autoencoder=args.autoencoder == "embed", verify=not args.no_verify,
                               tokenizer=args.tokenizer, allow_missing_tokenizer=args.allow_missing_tokenizer,
                               overwrite=args.overwrite)
            print(args.out)
        elif args.command == "import-reference":
            import_reference(args.src, args.out, autoencoder=args.autoencoder, overwrite=args.overwrite, progress=_say)
            print(args.out)
        elif args.command == "export-reference":
            export_reference(args.src, args.out, weights_format=args.weights, overwrite=args.overwrite, progress=_say)
            print(args.out)
        elif args.command == "verify":
            ok = True
            for line, good in verify_path(args.path, tag=args.tag, every=args.all):
                print(line)
                ok = ok and good
            return 0 if ok else 2
        elif args.command == "inspect":
            info = inspect_checkpoint(args.path, tag=args.tag)
            print(json.dumps(info, indent=2) if args.json else format_inspection(info, args.max_tensors))
        else:
            result = diff_checkpoints(args.a, args.b)
            print(json.dumps(result, indent=2) if args.json else format_diff(result))
    except VerificationError as err:
        print(f"{PROG}: verification failed, nothing written: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:  # ConversionError and ConfigError are ValueErrors
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
