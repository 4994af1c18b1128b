"""Run by test_reliability: a sweep on a ray.cluster_utils.Cluster (head + 2 worker nodes), one
worker node removed while configurations are being fine-tuned. Prints RESULT <json>."""
import json
import os
import sys
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from jobs.driver import run_sweep  # noqa: E402
from jobs.spec import load_spec  # noqa: E402


def main(spec_path: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    doomed = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    removed = []

    def remove_when_busy():
        # wait until the doomed node runs something (its raylet has busy workers), then kill it
        end = time.time() + 120
        while time.time() < end:
            used = ray.available_resources().get("CPU", 0)
            if used < 2 and time.time() > start + 8:
                cluster.remove_node(doomed, allow_graceful=False)
                removed.append(time.time() - start)
                return
            time.sleep(0.5)

    start = time.time()
    th = threading.Thread(target=remove_when_busy, daemon=True)
    th.start()
    result = run_sweep(load_spec(spec_path), out=lambda *a, **k: print(*a, file=sys.stderr))
    th.join(timeout=5)
    print("RESULT " + json.dumps({"registered": result.registered, "failed": result.failed, "removed_at": removed,
                                  "nodes": sorted(result.nodes)}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
