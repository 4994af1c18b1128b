"""``python -m jobs run [SPEC]`` / ``python -m jobs validate SPEC``.

Thin: parse, call an importable function, map errors to exit codes (2: bad input, 1: the sweep
ran but something failed). No traceback unless ``--debug``.
"""
from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs", description="Low-rank compression sweeps on Ray + MLflow")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a sweep (no SPEC: the embedded default on digits)")
    r.add_argument("spec", nargs="?", help="sweep spec YAML")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    v = sub.add_parser("validate", help="check a spec without computing anything")
    v.add_argument("spec", help="sweep spec YAML")
    v.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _ArgError(message)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    parser.__class__ = _Parser
    for action in parser._subparsers._group_actions[0].choices.values():
        action.__class__ = _Parser
    try:
        args = parser.parse_args(argv)
    except _ArgError as e:
        print(f"error: {e}; usage: python -m jobs run [SPEC] | python -m jobs validate SPEC", file=sys.stderr)
        return EXIT_BAD_INPUT
    from .data import DataError
    from .models import CheckpointError
    from .spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
        if args.command == "validate":
            print(f"ok: {args.spec} is a valid sweep spec ({len(spec.models)} model(s) x "
                  f"{len(spec.compression.methods)} method(s))")
            return EXIT_OK
        from .driver import format_summary, run_sweep

        result = run_sweep(spec)
        from .tracking import Tracker

        tracker = Tracker(spec.mlflow.tracking_uri, spec.mlflow.experiment)
        cands = {}
        for name in {r["registered_name"] for r in result.rows}:
            try:
                cands[name] = tracker.client.get_model_version_by_alias(name, "candidate").version
            except Exception:  # noqa: BLE001
                pass
        print()
        print(format_summary(result.rows, cands))
        print(f"\n{result.registered} version(s) registered now, {result.skipped} already registered"
              + (f", {len(result.failed)} failed" if result.failed else ""))
        for f in result.failed:
            print(f"  failed: {f}")
        uri = spec.mlflow.tracking_uri
        print(f"browse: mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"browse: {uri}")
        return EXIT_FAILED if result.failed else EXIT_OK
    except (SpecError, CheckpointError, DataError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: finished configurations are registered; run the same command again to resume",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (run with --debug for details)",
              file=sys.stderr)
        return EXIT_FAILED
