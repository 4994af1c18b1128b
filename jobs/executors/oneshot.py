"""One-shot configurations (one per model x method): per model one baseline task, then one task
per planned layer (decompositions of all methods at once), then one evaluation/fine-tuning task
per configuration that starts when its layers are done. Every model is in flight at once."""
from __future__ import annotations

import copy

from ..tasks.compress import decompose_task, evaluate_task
from .. import report
from .common import queue_baselines


def run_oneshot(session, configs: list) -> None:
    say, spec = session.say, session.spec
    by_model = queue_baselines(session, configs)
    bases, total, done = {}, {}, {}
    for (kind, key), out in session.completed():
        if kind == "dec":
            done[key] = done.get(key, 0) + 1
            if done[key] == total[key] or done[key] % 5 == 0:
                say(f"{key}: decomposed {done[key]}/{total[key]} layer tasks")
        elif isinstance(out, Exception):
            session.fail(key if kind == "base" else key.label, out)
        elif kind == "base":
            bases[key] = out
            cfgs = by_model[key]
            say(f"{key}: baseline ready ({out.source}, {out.train_seconds:.1f}s) "
                f"{report.quality(out.acc)}_pre {out.acc['top1']:.3f}, "
                f"{out.params / 1e6:.2f}M params, {out.macs / 1e6:.1f}M MACs"
                + report.chance_note(out.acc, cfgs[0].model.spec.num_classes, out.source))
            env = session.env(cfgs[0])
            model = env.build(out.state_dict)
            base_ref = session.put(out.state_dict)
            total[key] = sum(len(c.layers) for c in cfgs)
            for cfg in cfgs:
                refs = [session.start(decompose_task, lp, copy.deepcopy(model.get_submodule(lp.name)), session.gpu,
                                      key=("dec", key), fetch=False) for lp in cfg.layers]
                session.submit(evaluate_task, env, base_ref, spec.finetune, *refs, key=("eval", cfg))
            say(f"{key}: {total[key]} layer decompositions for {len(cfgs)} method(s) in flight")
        else:
            session.log(key, bases[key.model.name], out)
