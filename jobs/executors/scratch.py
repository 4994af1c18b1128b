"""Low-rank training from scratch (``from_scratch``): per configuration the dense and the low-rank
(Tai et al.) model train side by side with one schedule; logged when both are done."""
from __future__ import annotations

from ..tasks.staged import scratch_result, scratch_task


def run_scratch(session, configs: list) -> None:
    for cfg in configs:
        for low in (False, True):
            session.submit(scratch_task, session.env(cfg), cfg.scratch, low, key=(cfg, "lowrank" if low else "dense"))
        session.say(f"{cfg.model.name}: dense and low-rank (Tai et al.) models training from scratch, "
                    f"{cfg.scratch.epochs} epoch(s) each")
    pairs: dict[str, dict] = {}
    for (cfg, which), out in session.completed():
        if isinstance(out, Exception):
            session.fail(cfg.label, out)
            continue
        pair = pairs.setdefault(cfg.config_hash, {})
        pair[which] = out
        if len(pair) == 2:
            session.log(cfg, *scratch_result(pair["dense"], pair["lowrank"]), dense_state=pair["dense"]["state_dict"])
