"""The ``pipesparse`` command: ``demo``, ``fit``, ``preprocess`` and ``inspect``.

Bad input, config or state ends the command with exit status 1 and a one-line message (no
traceback); an interrupted run says how to resume. ``python -m pipesparse.cli`` is the same.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipesparse.errors import UnknownDataError
from pipesparse.shards.config import SPARSIFIERS, parse_config
from pipesparse.shards.engines import ENGINES
from pipesparse.shards.job import FORMATS

__all__ = ["build_parser", "main"]

EPILOG = "Run `pipesparse COMMAND --help` for a command's options."


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _add_rule(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--sparsifier",
        choices=sorted(SPARSIFIERS),
        default=default,
        help="mask rule: norm (DataNormSparsifier), threshold, nm (N:M)"
        + (f"; default {default}" if default else ""),
    )
    parser.add_argument(
        "--config",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="sparsifier options as Python literals, e.g. sparsity_level=0.7 "
        "sparse_block_shape=1,4 norm=L2",
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="Parquet files, folders, or save_to_disk folders"
    )
    parser.add_argument("--columns", required=True, help="columns to sparsify: COL[,COL]")
    parser.add_argument(
        "--batch-rows", type=_positive, default=8192, help="rows per batch (bounds memory)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar, summary only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipesparse", description="Sparsify data in training shards.", epilog=EPILOG
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="the whole job on scikit-learn's bundled digits")
    demo.add_argument(
        "--out", default="demo_out", help="output folder (replaced); default demo_out"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    fit = commands.add_parser("fit", help="fit per-feature masks on data -> a state file")
    _add_common(fit)
    fit.add_argument(
        "--out", required=True, metavar="STATE", help="state file to write (not an input shard)"
    )
    _add_rule(fit, default="norm")

    pre = commands.add_parser("preprocess", help="sparsify shards into a folder, resumably")
    _add_common(pre)
    pre.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add_rule(pre, default=None)
    pre.add_argument(
        "--state",
        help="mask state (from `pipesparse fit`, or a saved state_dict): the same frozen masks for "
        "every row; a SparsifyTransform or sparsifier state_dict also needs --sparsifier, the rule "
        "it was made with (a fit file records its own); without --state every row gets its own "
        "mask",
    )
    pre.add_argument("--format", choices=FORMATS, default="dense", help="output format")
    pre.add_argument("--engine", choices=ENGINES, default="local", help="where to run")
    pre.add_argument("--workers", type=_positive, default=1, help="processes (hf) / actors (ray)")
    pre.add_argument(
        "--overwrite", action="store_true", help="replace the output of a different job"
    )

    inspect = commands.add_parser("inspect", help="what a state file holds")
    inspect.add_argument(
        "state", metavar="STATE", help="a fit file, or a saved transform or sparsifier state_dict"
    )
    inspect.add_argument(
        "--plot",
        metavar="PNG",
        help="also draw the masks into this PNG (.png is added to a name without an extension)",
    )
    return parser


def _demo(args: argparse.Namespace) -> None:
    from pipesparse.demo import run_demo

    run_demo(args.out, quiet=args.quiet)


def _fit(args: argparse.Namespace) -> None:
    from pipesparse.shards.fit import fit, fit_report

    state = fit(
        args.inputs,
        args.columns,
        args.out,
        args.sparsifier,
        parse_config(args.config),
        batch_rows=args.batch_rows,
        quiet=args.quiet,
    )
    print(fit_report(state, args.out))


def _preprocess(args: argparse.Namespace) -> None:
    from pipesparse.shards.preprocess import preprocess

    summary = preprocess(
        args.inputs,
        args.out,
        args.columns,
        sparsifier=args.sparsifier,
        config=parse_config(args.config),
        state=args.state,
        out_format=args.format,
        engine=args.engine,
        workers=args.workers,
        batch_rows=args.batch_rows,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    print(summary)


def _inspect(args: argparse.Namespace) -> None:
    from pipesparse.shards.state import describe_state, load_state_file

    described = describe_state(load_state_file(args.state), args.state)
    header = described["header"]
    print(f"{args.state}: {header['kind']} state")
    for key, value in header.items():
        if key != "kind":
            print(f"  {key}: {value}")
    for name, entry in described["masks"].items():
        column = f" (column {entry['column']!r})" if entry["column"] else ""
        print(
            f"  mask {name!r}{column}: shape {entry['shape']}, kept {entry['kept']}, "
            f"sparsity {entry['sparsity']:.1%}, config {entry['config']}"
        )
    if args.plot:
        from pipesparse.plot import plot_masks

        masks = {m["column"] or n: m["mask"] for n, m in described["masks"].items()}
        print(f"plot: {plot_masks(masks, args.plot, title=str(args.state))}")


_COMMANDS = {"demo": _demo, "fit": _fit, "preprocess": _preprocess, "inspect": _inspect}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(
            "pipesparse: interrupted; rerun the same command to resume where it stopped",
            file=sys.stderr,
        )
        return 130
    except (ValueError, OSError, UnknownDataError) as err:  # bad input, config or state
        print(f"pipesparse {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
