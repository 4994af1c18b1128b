"""What the executors that start from trained weights share: grouping by model, baselines."""
from __future__ import annotations

from ..tasks.compress import baseline_task


def queue_baselines(session, configs: list) -> dict[str, list]:
    """Queue one baseline task per model (key ``("base", model)``); returns model -> configs."""
    by_model: dict[str, list] = {}
    for c in configs:
        by_model.setdefault(c.model.name, []).append(c)
    for name, cfgs in by_model.items():
        mp = cfgs[0].model
        session.submit(baseline_task, session.env(cfgs[0]), session.spec.pretrain, mp.key, key=("base", name))
        session.say(f"{name}: baseline queued ({'checkpoint' if mp.spec.checkpoint else 'pre-train or cache'})")
    return by_model
