"""``python -m jobs.accounts``: the MLflow accounts of a server running MLflow's ``basic-auth`` app,
made with the admin's credentials: the runner's service account (it writes; what it creates it
manages) and the readers' accounts (``default_permission = READ``: they browse, they cannot
delete). Idempotent: an existing account gets the password it is given.

Environment: ``MLFLOW_TRACKING_URI``, ``ADMIN_USER`` (default ``admin``), ``ADMIN_PASSWORD``,
``RUNNER_USER``, ``RUNNER_PASSWORD``, ``READERS`` (``"name:password name:password"``)."""
from __future__ import annotations

import os
import sys


def ensure_accounts(tracking_uri: str, admin: tuple[str, str], accounts: dict[str, str]) -> list[str]:
    """Create or update ``accounts`` (name -> password); returns what was done, one line each."""
    from mlflow.server.auth.client import AuthServiceClient  # deferred: only this command needs it

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = admin
    done = []
    try:
        client = AuthServiceClient(tracking_uri)
        for name, password in accounts.items():
            try:
                client.get_user(name)
            except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST: a new account
                client.create_user(name, password)
                done.append(f"created {name}")
                continue
            client.update_user_password(name, password)
            done.append(f"updated {name}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return done


def main() -> int:
    env = os.environ
    missing = [k for k in ("MLFLOW_TRACKING_URI", "ADMIN_PASSWORD", "RUNNER_USER", "RUNNER_PASSWORD") if not env.get(k)]
    if missing:
        print(f"error: set {', '.join(missing)} (see cluster/mlflow-server.yaml)", file=sys.stderr)
        return 2
    accounts = {env["RUNNER_USER"]: env["RUNNER_PASSWORD"]}
    for item in env.get("READERS", "").split():
        name, _, password = item.partition(":")
        if not name or not password:
            print("error: READERS is 'name:password name:password ...'", file=sys.stderr)
            return 2
        accounts[name] = password
    for line in ensure_accounts(env["MLFLOW_TRACKING_URI"], (env.get("ADMIN_USER", "admin"), env["ADMIN_PASSWORD"]),
                                accounts):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
