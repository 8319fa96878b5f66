"""The pre-training benchmark end to end on a small text, plus its data split and schedule."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from slimopt.bench.baselines import BASELINES, Baseline, OptimizerUnavailable, default_lr
from slimopt.bench.comparison import summarize
from slimopt.bench.data import encode, make_token_data
from slimopt.bench.pretrain import main
from slimopt.bench.report import write_json
from slimopt.bench.train import lr_factor


def _synthetic_text(n_words: int = 12_000) -> str:
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "house", "red", "blue"]
    return " ".join(rng.choice(words) for _ in range(n_words)) + "\n"


def test_byte_encoding_round_trips():
    text = "naïve café — ok"
    assert bytes(encode(text).tolist()).decode("utf-8") == text


def test_split_is_fixed_disjoint_and_complete():
    ids = torch.arange(100_000) % 128  # ASCII: one byte per character
    text = bytes(ids.tolist()).decode("ascii")
    data = make_token_data(text, chunk_tokens=1000, val_every=20)
    again = make_token_data(text, chunk_tokens=1000, val_every=20)
    assert torch.equal(data.val, again.val) and torch.equal(data.train, again.train)
    n_tokens = len(encode(text))
    assert len(data.train) + len(data.val) == n_tokens
    assert len(data.val) == 5 * 1000  # chunks 10, 30, 50, 70, 90 of 100
    val_batches = data.val_batches(4, 32, 3)
    assert len(val_batches) == 3 and val_batches[0][0].shape == (4, 32)
    assert torch.equal(val_batches[0][1][:, :-1], val_batches[0][0][:, 1:])  # targets are inputs shifted by one


def test_warmup_then_cosine():
    factors = [lr_factor(s, 100, 0.1, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # monotone decay after warm-up
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))


def _unavailable(*args, **kwargs):
    raise OptimizerUnavailable("needs `pip install not-installed`")


def test_tiny_pretrain_run_writes_results_report_and_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(BASELINES, "missing", Baseline("missing", 1e-3, "not here", _unavailable))
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(_synthetic_text())
    out = tmp_path / "run"
    code = main(["--text", str(text_file), "--preset", "tiny", "--steps", "12", "--batch-size", "4",
                 "--seq-len", "32", "--eval-every", "6", "--eval-batches", "2", "--threads", "1",
                 "--optimizers", "adamw,adafactor,missing", "--out", str(out), "--no-progress"])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["meta"]["git_commit"] is None or len(result["meta"]["git_commit"]) == 40
    assert result["skipped"]["missing"].startswith("needs")
    assert [r["optimizer"] for r in result["runs"]] == ["adamw", "adafactor"]
    adamw = result["runs"][0]
    assert [v[0] for v in adamw["val_curve"]] == [0, 6, 12]
    assert adamw["val_curve"][-1][3] < adamw["val_curve"][0][3] - 1.0  # 13 words: learnt well below ln(256)
    assert adamw["tokens_seen"] == 12 * 4 * 32
    # AdamW's exact state: two float32 moments per parameter plus a 4-byte step per tensor.
    n_tensors = 4 * 9 + 3  # tiny: 4 layers of 9 tensors, embedding, final norm, head
    assert adamw["state_bytes"] == 8 * adamw["n_params"] + 4 * n_tensors
    rows = {r["optimizer"]: r for r in result["summary"]}
    assert rows["adamw"]["tokens_to_reference_loss"] <= adamw["tokens_seen"]
    assert rows["adamw"]["optimizer_step_ratio"] == 1.0
    report = (out / "report.md").read_text()
    assert "| adamw |" in report and "Skipped" in report
    for png in ("loss_vs_step.png", "loss_vs_time.png", "memory.png"):
        assert (out / png).stat().st_size > 5_000
    # the end of the run: a table for a 100-column terminal (not the wide Markdown) and where it all went
    printed = capsys.readouterr().out
    table, _, where = printed[printed.index("tiny on file corpus.txt"):].partition("results: ")
    assert max(len(line) for line in table.splitlines()) <= 100 and "| adamw |" not in table
    assert where.startswith(f"{out.resolve()}/\n  report.md, results.json, loss_vs_step.png")


def test_tokens_to_reference_loss():
    def fake(name, curve, seed=0):
        return {"optimizer": name, "seed": seed, "lr": 1.0, "final_val_loss": curve[-1][1], "diverged": False,
                "interrupted": False, "val_curve": [(s, s * 10, 0.0, loss) for s, loss in curve],
                "state_bytes": 8, "n_params": 1, "peak_memory_bytes": None, "optimizer_step_median_s": 1.0,
                "tokens_per_s": 1.0}

    runs = [fake("adamw", [(0, 5.0), (10, 3.0), (20, 2.0)]),
            fake("fast", [(0, 5.0), (10, 1.9), (20, 1.5)]),
            fake("slow", [(0, 5.0), (10, 4.0), (20, 2.5)])]
    rows = {r["optimizer"]: r for r in summarize(runs, "adamw")}
    assert rows["adamw"]["tokens_to_reference_loss"] == 200
    assert rows["fast"]["tokens_to_reference_loss"] == 100
    assert rows["slow"]["tokens_to_reference_loss"] is None and rows["slow"]["reached_reference"] == "0/1"

    # Two AdamW seeds: the target is their mean final loss (2.0), which only seed 0 reaches.
    runs = [fake("adamw", [(0, 5.0), (10, 1.9)], seed=0), fake("adamw", [(0, 5.0), (10, 2.1)], seed=1)]
    (row,) = summarize(runs, "adamw")
    assert row["reference_loss"] == pytest.approx(2.0)
    assert row["tokens_to_reference_loss"] == 100 and row["reached_reference"] == "1/2"


def test_gpt2_tokenizer_gives_gpt2_ids():
    from slimopt.bench.fetch import is_cached

    if not is_cached("gpt2-tokenizer"):
        pytest.skip("needs `slimopt data fetch gpt2-tokenizer`")
    # Reference ids from GPT-2's published vocabulary: "Hello" 15496, " world" 995, "," 11, "\n" 198.
    assert encode("Hello world,\n", "gpt2").tolist() == [15496, 995, 11, 198]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_pretrain_run_on_cuda_with_bf16_autocast(tmp_path):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(_synthetic_text())
    out = tmp_path / "run"
    assert main(["--text", str(text_file), "--preset", "tiny", "--steps", "6", "--batch-size", "4",
                 "--seq-len", "32", "--eval-every", "3", "--eval-batches", "2", "--device", "cuda",
                 "--optimizers", "adamw,adamw-fused", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["memory_kind"] == "CUDA max allocated"
    assert all(r["peak_memory_bytes"] > 0 and not r["diverged"] for r in result["runs"])


def test_ctrl_c_keeps_the_finished_runs(tmp_path, monkeypatch):
    import slimopt.bench.pretrain as pretrain

    real = pretrain.make_optimizer

    def interrupt_second(model, name, **kwargs):
        if name == "adafactor":
            raise KeyboardInterrupt
        return real(model, name, **kwargs)

    monkeypatch.setattr(pretrain, "make_optimizer", interrupt_second)
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(_synthetic_text(4000))
    out = tmp_path / "run"
    code = main(["--text", str(text_file), "--preset", "tiny", "--steps", "3", "--batch-size", "2",
                 "--seq-len", "16", "--eval-batches", "1", "--threads", "1", "--optimizers",
                 "adamw,adafactor,adamw-forloop", "--out", str(out), "--no-progress"])
    assert code == 130
    result = json.loads((out / "results.json").read_text())
    assert result["interrupted"] and [r["optimizer"] for r in result["runs"]] == ["adamw"]
    assert "Interrupted" in (out / "report.md").read_text()


def _tiny_args(text_file, out, *extra):
    return ["--text", str(text_file), "--preset", "tiny", "--steps", "8", "--batch-size", "2", "--seq-len", "16",
            "--eval-every", "4", "--eval-batches", "1", "--threads", "1", "--out", str(out), "--no-progress", *extra]


def test_sweep_uses_the_given_factors_and_merge_combines_parallel_runs(tmp_path):
    """Optimizers run in separate processes (as for the committed CPU reference) merge into one comparison
    with the same summary a single run would give; runs of other settings are refused."""
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(_synthetic_text(3000))
    assert main(_tiny_args(text_file, tmp_path / "a", "--optimizers", "adamw", "--sweep",
                           "--sweep-factors", "0.5,2")) == 0
    assert main(_tiny_args(text_file, tmp_path / "b", "--optimizers", "sinkgd", "--seeds", "2")) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    trials = a["sweeps"]["adamw"]
    lrs = [t["lr"] for t in trials]
    base = default_lr("adamw")
    assert lrs == sorted(lrs) and {round(0.5 * base, 9), round(2 * base, 9)} <= {round(lr, 9) for lr in lrs}
    best = min(trials, key=lambda t: t["final_val_loss"])
    assert a["runs"][0]["lr"] == best["lr"]
    # the grid grows past an edge that wins (x2 per extension, at most two), so the best is inside
    # the grid unless the extensions ran out
    assert len(trials) <= 4
    if best["lr"] in (lrs[0], lrs[-1]):
        assert len(trials) == 4

    merged_dir = tmp_path / "merged"
    assert main(["--merge", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--out", str(merged_dir)]) == 0
    merged = json.loads((merged_dir / "results.json").read_text())
    assert [r["optimizer"] for r in merged["runs"]] == ["adamw", "sinkgd", "sinkgd"]
    assert merged["reference"] == "adamw" and merged["settings"]["seeds"] == [0, 1]
    assert merged["summary"] == summarize(a["runs"] + json.loads((tmp_path / "b" / "results.json").read_text())["runs"])
    sinkgd = next(r for r in merged["summary"] if r["optimizer"] == "sinkgd")
    adamw_loss = a["runs"][0]["final_val_loss"]
    assert sinkgd["val_loss_ratio"] == pytest.approx(sinkgd["final_val_loss"] / adamw_loss)
    assert "| sinkgd |" in (merged_dir / "report.md").read_text() and "sweep" in (merged_dir / "report.md").read_text()
    assert [m["folder"] for m in merged["meta"]["merged_from"]] == [str(tmp_path / "a"), str(tmp_path / "b")]

    assert main(_tiny_args(text_file, tmp_path / "c", "--optimizers", "adamw", "--steps", "6")) == 0
    assert main(["--merge", f"{tmp_path / 'a'},{tmp_path / 'c'}", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad" / "results.json").exists()


@pytest.mark.parametrize("factors", ["1,x", "0,1", "-1", "nan"])
def test_bad_sweep_factors_are_refused(factors, capsys):
    assert main(["--sweep-factors", factors, "--steps", "1"]) == 2
    assert f"--sweep-factors {factors}" in capsys.readouterr().err


def test_sweep_grows_past_a_winning_edge(monkeypatch):
    """Validation loss as a bowl around a tenth of adamw's default lr: from the default grid (1/4 ... 4 x the
    default) the sweep must walk down past its lower edge and pick the lr nearest the bottom it reached."""
    from types import SimpleNamespace

    from slimopt.bench import pretrain

    base = default_lr("adamw")

    def fake_run(name, lr, seed, data, config, *args):
        return SimpleNamespace(final_val_loss=math.log2(lr / (base / 10)) ** 2, diverged=False, interrupted=False,
                               steps_done=config.steps)

    monkeypatch.setattr(pretrain, "_one_run", fake_run)
    progress = SimpleNamespace(log=lambda message: None, expect=lambda steps: None)
    config = pretrain.TrainConfig(steps=100)
    lr, trials, interrupted = pretrain._sweep("adamw", None, config, "tiny", torch.device("cpu"), 0.0, progress)
    assert not interrupted
    assert [t["lr"] for t in trials] == pytest.approx([base * f for f in (0.0625, 0.125, 0.25, 0.5, 1, 2, 4)])
    assert lr == pytest.approx(base / 8) and all(t["steps"] == 25 for t in trials)
    # a bowl around the default, inside the grid: no extension
    monkeypatch.setattr(pretrain, "_one_run", lambda name, lr, *a, **k: fake_run(name, lr / 10, *a, **k))
    lr, trials, _ = pretrain._sweep("adamw", None, config, "tiny", torch.device("cpu"), 0.0, progress)
    assert len(trials) == 5 and lr == pytest.approx(base)


def _fake_result(n_optimizers: int = 14) -> dict:
    from slimopt.bench.report import run_metadata

    names = ["adamw", "microadam", "adammini", "sinkgd", "swan", "adamw-foreach", "adamw-forloop", "adamw-fused",
             "muon", "adamw8bit", "galore", "came", "adafactor", "adam-mini-official"][:n_optimizers]
    runs = []
    for i, name in enumerate(names):
        curve = [(0, 0, 0.0, 5.5), (50, 10_000, 1.0, 3.0 - 0.01 * i), (100, 20_000, 2.0, 2.0 + 0.05 * i)]
        runs.append({"optimizer": name, "seed": 0, "lr": 0.001 * (i + 1), "final_val_loss": curve[-1][3],
                     "diverged": False, "interrupted": i == 3, "val_curve": curve,
                     "train_curve": [(s, s / 50, 5.0 - s / 40) for s in range(1, 101)],
                     "state_bytes": (8 - i / 2) * 2**20 * 100, "n_params": 100 * 2**20,
                     "peak_memory_bytes": 2**30 * 3, "optimizer_step_median_s": 0.0123 * (i + 1),
                     "tokens_per_s": 1234.5, "memory_kind": "CUDA max allocated"})
    meta = run_metadata()
    settings = {"preset": "350m", "data": "shakespeare+moby-dick+sotu+news", "tokenizer": "gpt2", "n_params": 368e6,
                "steps": 100, "batch_size": 8, "seq_len": 1024, "warmup_fraction": 0.1, "min_lr_fraction": 0.1,
                "grad_clip": 1.0, "train_tokens": 10**7, "val_tokens": 10**5, "seeds": [0]}
    return {"meta": meta, "settings": settings, "reference": "adamw", "memory_kind": "CUDA max allocated",
            "summary": summarize(runs, "adamw"), "runs": runs, "skipped": {}, "sweeps": {}, "interrupted": False}


def test_end_of_run_table_fits_100_columns_with_every_optimizer(tmp_path, capsys, monkeypatch):
    from slimopt.bench.comparison import write_result

    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal still gets at most 100 columns
    write_result(_fake_result(), tmp_path / "r")
    out = capsys.readouterr().out
    table, _, where = out.partition("results: ")
    assert max(len(line) for line in table.splitlines()) <= 100
    assert "adam-mini-official" in table and "sinkgd (interrupted)" in table
    assert where.startswith(f"{(tmp_path / 'r').resolve()}/\n")
    assert "| optimizer |" in (tmp_path / "r" / "report.md").read_text()  # the Markdown keeps every column
    for png in ("loss_vs_step.png", "loss_vs_time.png", "memory.png"):
        assert (tmp_path / "r" / png).stat().st_size > 5_000


def test_results_are_written_one_record_per_line_and_merge_reads_old_indented_ones(tmp_path, capsys):
    """results.json: one run's curve on one line, not one number per line; ``--merge`` reads a part written
    before that (indented, as the 0.1 harness wrote it) beside a new one."""
    from slimopt.bench.comparison import merge_results

    result = _fake_result(4)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps({**result, "runs": result["runs"][:2]}, indent=2))
    write_json(tmp_path / "new" / "results.json", {**result, "runs": result["runs"][2:]})
    text = (tmp_path / "new" / "results.json").read_text()
    assert json.loads(text)["runs"] == json.loads(json.dumps(result["runs"][2:]))
    assert len(text.splitlines()) < 60 and '"val_curve": [[0, 0, 0.0, 5.5], [50, 10000, 1.0, 2.98]' in text
    merged = merge_results([tmp_path / "old", tmp_path / "new"], tmp_path / "merged")
    capsys.readouterr()
    assert [r["optimizer"] for r in merged["runs"]] == ["adamw", "microadam", "adammini", "sinkgd"]
    assert json.loads((tmp_path / "merged" / "results.json").read_text())["summary"] == json.loads(
        json.dumps(summarize(json.loads(json.dumps(result["runs"])), "adamw")))


def test_plots_label_plainly_and_keep_small_state_visible(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    from slimopt.bench import plots

    figures = []
    monkeypatch_close = plt.close
    plt.close = lambda fig=None: figures.append(fig)  # keep the figures to inspect them
    try:
        plots.loss_curves(_fake_result(3)["runs"], tmp_path / "loss.png")
        plots.memory_bars([("adamw", 2700.0, 9200.0), ("sinkgd", 12.5, 6800.0), ("swan", 12.5, None)],
                          tmp_path / "memory.png", peak_label="CUDA max allocated")
    finally:
        plt.close = monkeypatch_close
    loss_fig, memory_fig = figures
    (ax,) = loss_fig.axes
    assert ax.get_ylabel() == "loss (nats per token)"
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()][-2:] == ["validation", "training (smoothed)"]
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # outside the axes, not over the curves
    state_ax, peak_ax = memory_fig.axes  # state on its own axis: 12.5 MiB is not flattened by GiB of peak
    assert state_ax.get_ylim()[1] < 4000 and peak_ax.get_ylim()[1] > 9200
    assert "12.5" in [t.get_text() for t in state_ax.texts] and "n/a" in [t.get_text() for t in peak_ax.texts]
    for fig in figures:
        plt.close(fig)


def test_two_lr_optimizers_get_their_second_lr_swept(tmp_path):
    """SinkGD, SWAN and adamw-split tune adamw_lr (embeddings, head, 1-D tensors) after their main lr, so
    every method gets as many tuned lrs as it has; the runs say which adamw_lr they used."""
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(_synthetic_text(3000))
    assert main(_tiny_args(text_file, tmp_path / "r", "--optimizers", "adamw,adamw-split,sinkgd", "--sweep",
                           "--sweep-factors", "0.5,2")) == 0
    result = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(result["sweeps"]) == {"adamw", "adamw-split", "adamw-split adamw_lr", "sinkgd", "sinkgd adamw_lr"}
    names = {r["optimizer"] for r in result["runs"]}
    assert "adamw" in names
    for name in ("adamw-split", "sinkgd"):
        (run_name,) = [n for n in names if n.startswith(name + "@adamw_lr=")]
        trials = result["sweeps"][f"{name} adamw_lr"]
        best = min(trials, key=lambda t: t["final_val_loss"])
        assert float(run_name.split("=")[1]) == pytest.approx(best["lr"], rel=1e-3)
    split_center = default_lr("sinkgd")  # adamw-split's second lr starts from the hybrids' default
    assert {round(t["lr"] / split_center, 6) for t in result["sweeps"]["adamw-split adamw_lr"][:2]} == {0.5, 2.0}


def test_summary_calls_a_win_or_loss_only_beyond_the_seed_spread():
    def run(name, seed, loss):
        return {"optimizer": name, "seed": seed, "lr": 1e-3, "final_val_loss": loss, "diverged": False,
                "interrupted": False, "val_curve": [(0, 0, 0.0, 5.0), (10, 100, 1.0, loss)], "state_bytes": 8,
                "n_params": 1, "peak_memory_bytes": None, "optimizer_step_median_s": 0.01, "tokens_per_s": 1.0}

    runs = [run("adamw", s, loss) for s, loss in enumerate([2.00, 2.02, 1.98])]
    runs += [run("better", s, loss) for s, loss in enumerate([1.80, 1.81, 1.79])]
    runs += [run("same", s, loss) for s, loss in enumerate([2.01, 1.97, 2.03])]
    runs += [run("worse", s, loss) for s, loss in enumerate([2.20, 2.22, 2.18])]
    runs += [run("once", 0, 1.5)]
    verdicts = {r["optimizer"]: r["verdict"] for r in summarize(runs, "adamw")}
    assert verdicts == {"adamw": "reference", "better": "win", "same": "within spread", "worse": "loss",
                        "once": "one seed"}


def test_summary_also_judges_each_optimizer_against_adamw_split():
    def run(name, seed, loss):
        return {"optimizer": name, "seed": seed, "lr": 1e-3, "final_val_loss": loss, "diverged": False,
                "interrupted": False, "val_curve": [(0, 0, 0.0, 5.0), (10, 100, 1.0, loss)], "state_bytes": 8,
                "n_params": 1, "peak_memory_bytes": None, "optimizer_step_median_s": 0.01, "tokens_per_s": 1.0}

    split = "adamw-split@adamw_lr=0.02"
    runs = [run("adamw", s, loss) for s, loss in enumerate([2.00, 2.02, 1.98])]
    runs += [run(split, s, loss) for s, loss in enumerate([1.90, 1.91, 1.89])]
    # beats plain AdamW beyond the spread, loses to the split beyond it
    runs += [run("sinkgd@adamw_lr=0.02", s, loss) for s, loss in enumerate([1.95, 1.96, 1.94])]
    rows = {r["optimizer"]: r for r in summarize(runs, "adamw")}
    assert rows["sinkgd@adamw_lr=0.02"]["verdict"] == "win"
    assert rows["sinkgd@adamw_lr=0.02"]["verdict_vs_split"] == "loss"
    assert rows["sinkgd@adamw_lr=0.02"]["val_loss_ratio_vs_split"] == pytest.approx(1.95 / 1.90)
    assert rows[split]["verdict_vs_split"] == "reference" and rows["adamw"]["verdict_vs_split"] == "loss"
    assert all(r["split_reference"] == split for r in rows.values())
    # without a split baseline there is nothing to judge against
    plain = summarize([r for r in runs if r["optimizer"] != split], "adamw")
    assert all(r["split_reference"] is None and r["verdict_vs_split"] is None for r in plain)


@pytest.mark.parametrize("name, second", [("sinkgd", 0.005), ("microadam@k_init=0.05", 0.02),
                                          ("adamw-split", 0.04)])
def test_split_second_lr_inverts_with_second_lr(name, second):
    from slimopt.bench.baselines import split_second_lr, with_second_lr

    assert split_second_lr(with_second_lr(name, second)) == (name, f"{second:.4g}")
    assert split_second_lr(name) == (name, None)
    assert split_second_lr("swan@adamw_lr=0.08,scale=0.1") == ("swan@scale=0.1", "0.08")
