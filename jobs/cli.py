"""``python -m jobs run [SPEC]`` / ``validate SPEC`` / ``submit SPEC --address URL`` / ``status``.

Thin: parse, call an importable function, map errors to exit codes (2: bad input, 1: the sweep
ran but something failed). No traceback unless ``--debug``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from lowrank.allocator import tune_allocator

from .data import DataError
from .errors import SchedulingTimeoutError
from .models import CheckpointError, ModelError
from .preflight import check_models, preflight
from .report import format_summary
from .spec import SpecError, check_local_paths, load_spec
from .store import TrackingAuthError, TrackingUnavailableError
from .submit import RayAuthError, SubmitError, status, submit
from .tracking import SweepRunningError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_BUSY = 0, 1, 2, 3


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Raises instead of exiting, so usage errors get the one-line form and exit code 2."""

    def error(self, message):
        raise _ArgError(message)


def _parser() -> _Parser:
    p = _Parser(prog="python -m jobs", description="Low-rank compression sweeps on Ray + MLflow")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run a sweep (no SPEC: the embedded default on digits)")
    r.add_argument("spec", nargs="?", help="sweep spec YAML")
    r.add_argument("--tracking-uri", help="MLflow tracking URI, overriding the spec's")
    v = sub.add_parser("validate", help="check a spec without computing anything")
    v.add_argument("spec", help="sweep spec YAML")
    v.add_argument("--schema-only", action="store_true", help="do not check that local files and folders exist")
    s = sub.add_parser("submit", help="submit a sweep to a Ray cluster as a Ray job")
    s.add_argument("spec", help="sweep spec YAML (inside the working dir)")
    s.add_argument("--address", required=True, help="Ray dashboard URL, e.g. http://127.0.0.1:8265")
    s.add_argument("--working-dir", default=".", help="uploaded with the job (default: .)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI for the job, overriding the spec's")
    s.add_argument("--wait", action="store_true", help="block until the job ends and print its log tail")
    st = sub.add_parser("status", help="list Ray jobs (or one) on a cluster")
    st.add_argument("submission_id", nargs="?")
    st.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                    help="Ray dashboard URL")
    for sp in (r, v, s, st):
        sp.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


@contextlib.contextmanager
def _quiet(debug: bool):
    """Warnings (torch's, pydantic's, ...) hidden while the input is checked, unless ``--debug``."""
    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore")
        yield


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tune_allocator()  # the driver's own work (pre-flight, surgery checks); the workers get it from init_ray
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _ArgError as e:
        print(f"error: {e}; usage: python -m jobs run [SPEC] | validate SPEC | submit SPEC --address URL | "
              f"status [ID]", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.command == "status":
            status(args.address, args.submission_id)
            return EXIT_OK
        if args.command == "submit":
            _, st = submit(args.spec, args.address, working_dir=args.working_dir, tracking_uri=args.tracking_uri,
                           wait=args.wait)
            return EXIT_OK if st in ("SUCCEEDED", "PENDING") else EXIT_FAILED
        with _quiet(args.debug):  # third-party warnings never sit above the one-line answer
            spec = load_spec(args.spec)
            if args.command == "validate" and not args.schema_only:
                check_local_paths(spec, args.spec)
                check_models(spec, args.spec or "default spec")
        if args.command == "validate":
            n_methods = len(spec.compression.methods) if spec.compression else 0
            print(f"ok: {args.spec or 'the default spec'} is a valid sweep spec ({len(spec.models)} model(s) x "
                  f"{n_methods} method(s){' + from_scratch' if spec.from_scratch else ''})")
            return EXIT_OK
        if args.tracking_uri:
            spec = spec.model_copy(update={"mlflow": spec.mlflow.model_copy(update={"tracking_uri": args.tracking_uri})})
        with _quiet(args.debug):
            configs = preflight(spec, args.spec or "default spec")
        from .driver import run_sweep  # deferred on purpose: it loads Ray and MLflow, which `validate` never needs

        result = run_sweep(spec, configs=configs)
        print()
        print(format_summary(result.rows, result.candidates))
        print(f"\n{result.registered} version(s) registered now, {result.skipped} already registered"
              + (f", {len(result.failed)} failed" if result.failed else ""))
        for f in result.failed:
            print(f"  failed: {f}")
        uri = spec.mlflow.tracking_uri
        print(f"browse: mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"browse: {uri}")
        return EXIT_FAILED if result.failed else EXIT_OK
    except (SpecError, CheckpointError, ModelError, DataError, TrackingAuthError, RayAuthError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SweepRunningError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BUSY
    except (TrackingUnavailableError, SchedulingTimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except SubmitError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
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
