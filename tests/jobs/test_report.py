"""The pure reporting parts: per-layer rows, Pareto flags, the printed summary."""
from jobs.report import format_summary, layer_rows, pareto_table


def test_layer_rows_list_built_layers_and_the_ones_left_dense_with_reasons():
    reports = [{"name": "a", "method": "tucker2", "rank": [2, 3], "rel_error": 0.1, "params_before": 100,
                "params_after": 40, "macs_before": 1000, "macs_after": 400, "seconds": 0.5,
                "diagnostics": {"als": {"degenerate": False}}}]
    statuses = [{"name": "a", "method": "tucker2", "status": "ok", "reason": "", "seconds": 0.7},
                {"name": "b", "method": "tucker2", "status": "failed", "reason": "LowRankError: NaN", "seconds": 0.0}]
    rows = layer_rows(reports, statuses)
    assert [(r["layer"], r["status"]) for r in rows] == [("a", "ok"), ("b", "failed")]
    assert rows[0]["rank"] == "[2, 3]" and rows[0]["seconds"] == 0.7 and rows[0]["diag.als.degenerate"] is False
    assert rows[1]["reason"] == "LowRankError: NaN"


def test_pareto_flags_mark_exactly_the_non_dominated_points():
    rows = [{"model": "m", "method": "x", "compression_ratio": 2.0, "acc_ft": 0.9, "acc_pre": 0.95, "speedup_b1": 1.5},
            {"model": "m", "method": "y", "compression_ratio": 3.0, "acc_ft": 0.8, "acc_pre": 0.95, "speedup_b1": 1.2},
            {"model": "m", "method": "z", "compression_ratio": 1.5, "acc_ft": 0.85, "acc_pre": 0.95,
             "speedup_b1": float("nan")}]
    table = {r["method"]: r for r in pareto_table(rows)}
    assert {k for k, r in table.items() if r["pareto_ratio"]} == {"dense", "x", "y"}  # z is dominated by x
    assert {k for k, r in table.items() if r["pareto_latency"]} == {"dense", "x"}  # y is slower and worse than x
    assert table["z"]["pareto_latency"] is None  # no measured speedup: not ranked


def test_summary_marks_the_candidate():
    row = {"model": "m", "method": "x", "compression_ratio": 2.0, "mac_ratio": 1.8, "acc_pre": 0.9, "acc_post": 0.5,
           "acc_ft": 0.88, "degenerate_layers": 1, "registered_name": "lowrank-m", "version": "3"}
    text = format_summary([row], {"lowrank-m": "3"})
    assert "lowrank-m v3 *candidate" in text and "2.00" in text
    row.update(speedup_b1=1.37, timed_on="onnxruntime 3x32x32")
    text = format_summary([row])
    assert "   1.37 " in text and text.endswith("batch 1, one thread, on onnxruntime 3x32x32)")


def test_summary_has_a_column_per_size_a_version_was_also_timed_at(tmp_path):
    from jobs.report import summary_row

    tags = {"compression_ratio": "2.0", "mac_ratio": "1.8", "speedup_b1": "1.1", "acc_pre": "0.9", "acc_post": "0.5",
            "acc_ft": "0.88", "degenerate_layers": "0", "latency_runtime": "onnxruntime", "latency_input": "3x32x32"}
    big = summary_row("resnet18", "tucker2", "lowrank-resnet18", "2", {**tags, "speedup_b1_224px": "1.2345"}, "h1")
    small = summary_row("smallcnn", "tucker2", "lowrank-smallcnn", "1", tags, "h2")
    assert big["speedup_b1_224px"] == 1.2345 and not any(k.endswith("px") for k in small)
    head, _, first, second, note = format_summary([big, small]).splitlines()
    assert "speedup  @224px acc_pre" in head and "   1.10    1.23   0.900" in first and "   1.10       -   0.900" in second
    assert note.endswith("; @Npx: the same at N x N px (latency.also_at))")
    assert "@" not in format_summary([small])  # no column where nothing was timed at another size
    import pyarrow.parquet as pq

    from jobs.report import write_parquet

    write_parquet([big, small], tmp_path / "summary.parquet")  # the sweep's summary table, as the driver writes it
    assert pq.read_table(tmp_path / "summary.parquet").column("speedup_b1_224px").to_pylist() == [1.2345, None]


def test_a_model_trained_here_no_better_than_chance_is_named_in_the_progress_line():
    from jobs.report import chance_note

    assert "no better than chance, 1/10" in chance_note({"top1": 0.087}, 10, "trained")
    assert "pre-training did not learn" in chance_note({"top1": 0.119}, 10, "cache")
    assert chance_note({"top1": 0.13}, 10, "trained") == ""  # above 1.2x chance
    assert chance_note({"top1": 0.05}, 10, "weights") == ""  # given weights: not ours to judge by labels
    assert chance_note({"top1": 0.05, "kl": 2.0}, 10, "trained") == ""  # agreement, not accuracy


def test_fine_tuning_that_made_the_model_worse_is_said():
    from jobs.report import finetune_note

    post, bn = {"top1": 0.568}, {"top1": 0.602}
    note = finetune_note(post, bn, {"top1": 0.486}, epochs=1)
    assert note == ("fine-tuning lowered acc from 0.602 to 0.486 (the registered model is the fine-tuned one): "
                    "check finetune.lr and epochs")  # against the better of post and BN-recalibrated
    assert finetune_note(post, None, {"top1": 0.560}, epochs=1) == ""  # within 0.01: noise of a small val set
    assert finetune_note(post, None, {"top1": 0.70}, epochs=1) == ""
    assert finetune_note(post, None, {"top1": 0.40}, epochs=0) == ""  # nothing was fine-tuned
    assert finetune_note({"top1": 0.9, "kl": 0.1}, None, {"top1": 0.5, "kl": 0.9}, epochs=2).startswith(
        "fine-tuning lowered agree from 0.900 to 0.500")
