"""Multi-stage configurations (``compression.stages``): per model one baseline task, then one
task per configuration (its stages depend on each other), all in flight at once."""
from __future__ import annotations

from ..tasks.staged import multistage_task
from .. import report
from .common import queue_baselines


def run_staged(session, configs: list) -> None:
    say, spec = session.say, session.spec
    by_model = queue_baselines(session, configs)
    bases = {}
    for (kind, key), out in session.completed():
        if isinstance(out, Exception):
            session.fail(key if kind == "base" else key.label, out)
        elif kind == "base":
            bases[key] = out
            say(f"{key}: baseline ready ({out.source}) "
                f"{report.quality(out.acc)}_pre {out.acc['top1']:.3f}"
                + report.chance_note(out.acc, by_model[key][0].model.spec.num_classes, out.source))
            base_ref = session.put(out.state_dict)
            for cfg in by_model[key]:
                session.submit(multistage_task, session.env(cfg), base_ref, spec.finetune, cfg.stages,
                               cfg.stage_epochs, key=("stage", cfg))
                say(f"{cfg.label}: {len(cfg.stages)} stages queued")
        else:
            for h in out.stages:
                say(f"{key.label}: stage {h['stage']}: {h['compression_ratio']:.2f}x params, "
                    f"post {h['acc_post']:.3f} ft {h['acc_ft']:.3f}")
            session.log(key, bases[key.model.name], out)
