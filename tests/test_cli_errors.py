"""Every command-line error names the argument and its value, on stderr, with exit status 2 and no
traceback, before any data is loaded or result folder made (parse + validate only: nothing trains)."""

from __future__ import annotations

import pytest

from slimopt.cli import main


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """Run in an empty folder; loading any data or building any model fails the test."""
    import slimopt.bench.data as data
    import slimopt.bench.fetch as fetch
    import slimopt.bench.finetune_lm  # noqa: F401  imported before the patch, so it keeps the real load_text
    import slimopt.bench.model as model
    import slimopt.bench.pretrain as pretrain

    def refuse(*args, **kwargs):
        raise AssertionError("data loaded or model built before the arguments were checked")

    for module, name in ((data, "load_text"), (pretrain, "load_text"), (fetch, "fetch"), (model, "build_model"),
                         (pretrain, "build_model")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    out, err = capsys.readouterr()
    assert done.value.code == 2, (argv, out, err)
    assert "Traceback" not in err and err.strip(), argv
    return err


CASES = [
    # slimopt bench pretrain
    (["bench", "pretrain", "--quick", "--lr", "-1"], "--lr -1"),
    (["bench", "pretrain", "--quick", "--lr", "nan"], "--lr nan"),
    (["bench", "pretrain", "--quick", "--optimizers", "nope"], "--optimizers nope"),
    (["bench", "pretrain", "--optimizers", "adamw,,swan"], "--optimizers adamw,,swan"),
    (["bench", "pretrain", "--weight-decay", "-0.1"], "--weight-decay -0.1"),
    (["bench", "pretrain", "--steps", "0"], "--steps 0"),
    (["bench", "pretrain", "--batch-size", "0"], "--batch-size 0"),
    (["bench", "pretrain", "--seq-len", "1"], "--seq-len 1"),
    (["bench", "pretrain", "--eval-every", "0"], "--eval-every 0"),
    (["bench", "pretrain", "--seeds", "two"], "--seeds two"),
    (["bench", "pretrain", "--seeds", "0,0"], "--seeds 0,0"),
    (["bench", "pretrain", "--corpus", "bible"], "--corpus bible"),
    (["bench", "pretrain", "--text", "no-such-file.txt"], "--text no-such-file.txt"),
    (["bench", "pretrain", "--sweep-factors", "1,x"], "--sweep-factors 1,x"),
    (["bench", "pretrain", "--sweep", "--lr", "0.01"], "--lr 0.01"),
    (["bench", "pretrain", "--device", "tpu"], "--device tpu"),
    (["bench", "pretrain", "--threads", "0"], "--threads 0"),
    (["bench", "pretrain", "--nproc", "0"], "--nproc 0"),
    (["bench", "pretrain", "--nproc", "2", "--batch-size", "3"], "--batch-size 3"),
    (["bench", "pretrain", "--merge", "nowhere"], "--merge nowhere"),
    (["bench", "pretrain", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),  # argparse's
    (["bench", "pretrain", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    # slimopt bench finetune
    (["bench", "finetune", "--lr", "0"], "--lr 0"),
    (["bench", "finetune", "--optimizers", "adamw,nope"], "--optimizers adamw,nope"),
    (["bench", "finetune", "--epochs", "-1"], "--epochs -1"),
    (["bench", "finetune", "--batch-size", "0"], "--batch-size 0"),
    (["bench", "finetune", "--max-length", "4096"], "--max-length 4096"),
    (["bench", "finetune", "--train-examples", "-5"], "--train-examples -5"),
    (["bench", "finetune", "--task", "imdb"], "argument --task: invalid choice: 'imdb'"),
    # slimopt bench throughput
    (["bench", "throughput", "--preset", "huge"], "--preset huge"),
    (["bench", "throughput", "--optimizers", "nope"], "--optimizers nope"),
    (["bench", "throughput", "--rounds", "0"], "--rounds 0"),
    (["bench", "throughput", "--steps", "0"], "--steps 0"),
    (["bench", "throughput", "--warmup", "-1"], "--warmup -1"),
    (["bench", "throughput", "--device", "cuda:7x"], "--device cuda:7x"),
    # slimopt bench memory
    (["bench", "memory", "--presets", "tiny,huge"], "--presets tiny,huge"),
    (["bench", "memory", "--optimizers", "adamw,nope"], "--optimizers adamw,nope"),
    (["bench", "memory", "--threads", "-2"], "--threads -2"),
    # slimopt bench rosenbrock
    (["bench", "rosenbrock", "--start", "1"], "--start 1"),
    (["bench", "rosenbrock", "--start", "a,b"], "--start a,b"),
    (["bench", "rosenbrock", "--lr", "-0.5"], "--lr -0.5"),
    (["bench", "rosenbrock", "--steps", "0"], "--steps 0"),
    # slimopt memory, slimopt plan
    (["memory", "--model", "nonexistent"], "--model 'nonexistent'"),
    (["memory", "--model", "gpt2", "--optimizer", "lion"], "--optimizer 'lion'"),
    (["memory", "--model", "gpt2", "--set", "galore.r=3"], "--set 'galore.r=3'"),
    (["plan", "--model", "llama2-7b", "--gpu-mem", "-5"], "(--gpu-mem): -5.0"),
    (["plan", "--model", "llama2-7b", "--gpu-mem", "24", "--seq-len", "0"], "(--seq-len): 0"),
    (["plan", "--model", "llama2-7b", "--gpu-mem", "24", "--headroom", "1.5"], "(--headroom): 1.5"),
    (["plan", "--model", "nope", "--gpu-mem", "24"], "--model 'nope': unknown model"),
    (["plan", "--model", ".", "--gpu-mem", "24"], "--model '.': the folder has no config.json"),
    (["memory", "--model", "."], "--model '.': the folder has no config.json"),
    # slimopt bench finetune-lm: the user's model and text
    (["bench", "finetune-lm", "--model", "no-such-model"], "--model no-such-model: no such folder"),
    (["bench", "finetune-lm", "--model", "."], "--model .: has no config.json"),
    (["bench", "finetune-lm", "--text", "no-such.txt"], "--text no-such.txt: no such file"),
    (["bench", "finetune-lm", "--val-fraction", "0"], "--val-fraction 0: must be between 0 and 1"),
    (["bench", "finetune-lm", "--device", "tpu"], "--device tpu"),
    # slimopt bench finetune --text
    (["bench", "finetune", "--text", "no-such.tsv"], "--text no-such.tsv: no such file"),
    (["bench", "finetune", "--test-fraction", "1"], "--test-fraction 1: must be between 0 and 1"),
]


@pytest.mark.parametrize("argv, says", CASES, ids=[" ".join(argv) for argv, _ in CASES])
def test_error_names_the_argument_and_value_before_any_work(capsys, no_data, argv, says):
    err = _error(capsys, argv)
    assert says in err
    assert not list(no_data.iterdir()), "a failed run left a folder behind"


def test_a_run_that_fails_after_the_checks_leaves_no_folder(capsys, monkeypatch, tmp_path):
    """A text too short for --seq-len is found only once the data is loaded: still a usage error, and the
    result folder is made only when there are results to write."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "short.txt").write_text("to be or not to be " * 1000)
    err = _error(capsys, ["bench", "pretrain", "--text", "short.txt", "--seq-len", "4096", "--steps", "1"])
    assert "--seq-len 4096" in err and "validation split" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_bench_help_lists_the_chosen_tasks_arguments(capsys):
    """`slimopt bench rosenbrock --help` lists rosenbrock's arguments (the chosen task comes from argv)."""
    with pytest.raises(SystemExit) as done:
        main(["bench", "rosenbrock", "--help"])
    assert done.value.code == 0 and "--start" in capsys.readouterr().out
