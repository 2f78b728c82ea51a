"""What users trip on in `train` and `inspect` (issue 14): time budgets across a resume, log lines, model-shape
flags, threads, a closed output, progress from the first second, inspect without a prompt, help and names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_train import TINY, runner, write_corpus

from tformer.cli import app
from tformer.cli.train_view import EtaColumn
from tformer.training.config import TrainConfig

PLAIN = [a for a in TINY if a != "--quiet"]


def run_train(*args: str):
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    return result


def test_time_budget_counts_this_command_not_the_runs_before(tmp_path):
    corpus, out = write_corpus(tmp_path / "c.txt"), tmp_path / "run"
    run_train(str(corpus), "--out", str(out), "--steps", "2", *TINY)
    state_file = out / "latest" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["elapsed"] = 1e6  # a long history before this resume
    state_file.write_text(json.dumps(state))
    run_train("--out", str(out), "--resume", "auto", "--steps", "5", "--time-budget", "600", *TINY)
    assert json.loads(state_file.read_text())["step"] == 5  # not stopped after one step


def test_plain_log_lines_show_a_validation_loss_only_when_evaluated(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    result = run_train(str(corpus), "--out", str(tmp_path / "run"), "--steps", "4", "--log-every", "1",
                       "--eval-every", "2", *PLAIN)
    lines = {int(line.split()[1].split("/")[0]): line for line in result.stdout.splitlines() if line.startswith("step ")}
    assert set(lines) == {1, 2, 3, 4}
    assert "val " not in lines[1] and "val " not in lines[3]
    assert "val " in lines[2] and "val " in lines[4]


def test_model_shape_flags_and_threads(tmp_path):
    corpus, out = write_corpus(tmp_path / "c.txt"), tmp_path / "run"
    result = run_train(str(corpus), "--out", str(out), "--steps", "1", "--norm", "rmsnorm", "--norm-placement",
                       "post", "--pos-encoding", "sinusoidal", "--activation", "gelu", "--kv-heads", "1",
                       "--no-bias", "--no-tie-embeddings", "--threads", "1", *PLAIN)
    model = json.loads((out / "latest" / "config.json").read_text())["model"]
    assert (model["norm"], model["norm_placement"], model["pos_encoding"], model["activation"]) == (
        "rmsnorm", "post", "sinusoidal", "gelu")
    assert model["n_kv_heads"] == 1 and model["bias"] is False and model["tie_embeddings"] is False
    assert "1 thread)" in result.stdout or "1 thread," in result.stdout
    bad = runner.invoke(app, ["train", str(corpus), "--out", str(tmp_path / "x"), "--norm", "batchnorm", *TINY])
    assert bad.exit_code == 1 and "layernorm" in bad.stderr and not (tmp_path / "x").exists()


def test_a_closed_output_never_stops_the_save(tmp_path):
    """`tformer train | head -1`: the reader goes away, the run still trains to the end and saves."""
    corpus, out = write_corpus(tmp_path / "c.txt"), tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tformer", "train", str(corpus), "--out", str(out), "--steps",
                             "6", "--log-every", "1", *PLAIN], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tmp_path)
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, stderr
    assert first and "Traceback" not in stderr
    assert json.loads((out / "latest" / "trainer_state.json").read_text())["step"] == 6


def test_progress_shows_from_the_first_second(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    result = run_train(str(corpus), "--out", str(tmp_path / "run"), "--steps", "1", *PLAIN)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("preparing the run")  # before the tokenizer is trained or the model is built
    assert any(line.startswith("training the tokenizer on") for line in lines[:3])


def test_eta_comes_from_the_runs_own_average_when_the_recent_window_is_empty():
    from rich.progress import Progress

    progress = Progress(EtaColumn())
    task_id = progress.add_task("train", total=100, first=0)
    task = progress.tasks[task_id]
    task.completed, task.start_time = 10, task.get_time() - 20.0  # 10 steps in 20 s, no recent speed samples
    assert task.time_remaining is None
    assert str(EtaColumn().render(task)) == "eta 0:03:00"


def test_inspect_without_a_prompt_shows_attention_on_the_validation_text_with_a_legend(tmp_path):
    corpus, out = write_corpus(tmp_path / "c.txt"), tmp_path / "run"
    run_train(str(corpus), "--out", str(out), "--steps", "1", *TINY)
    result = runner.invoke(app, ["inspect", "-c", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "validation text" in result.stdout and "decoder attention" in result.stdout
    assert "entropy: spread" in result.stdout and "prev: weight on the previous token" in result.stdout
    doc = json.loads(runner.invoke(app, ["inspect", "-c", str(out), "--json"]).stdout)
    assert doc["attention"]["prompt"]  # drawn from the run's val split


def test_inspect_says_when_the_greedy_target_is_cut(tmp_path):
    from test_inspect import make_checkpoint

    make_checkpoint(tmp_path, "encoder-decoder", max_seq_len=12)
    result = runner.invoke(app, ["inspect", "-c", str(tmp_path), "-p", "abc", "--json"])
    assert result.exit_code == 0, result.output
    attention = json.loads(result.stdout)["attention"]
    produced = attention["ids"]["produced"]
    if attention["target_note"] is None:  # it stopped at <eos>
        assert produced[-1] == 2
    else:  # decoded to the context, not to 2 x source + 8
        assert len(produced) == 11 and "context" in attention["target_note"]


def test_help_panels_defaults_and_names():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "160"})
    for panel in ("Data", "Model", "Optimisation", "Schedule", "Evaluation", "Checkpoints", "Device"):
        assert f"─ {panel} " in result.stdout
    assert "[default: (0.002)]" in result.stdout and "--kv-heads" in result.stdout
    assert TrainConfig(dtype="bfloat16").dtype == "bf16" and TrainConfig(dtype="float32").dtype == "fp32"
    inspect_help = runner.invoke(app, ["inspect", "--help"], env={"COLUMNS": "160"}).stdout
    assert "-c" in inspect_help and "-p" in inspect_help
    generate_help = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "160"}).stdout
    assert "--fill-top" in generate_help and "--threads" in generate_help


def test_readme_quick_start_installs_the_cpu_torch_first_and_trains_without_the_test_extra():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    start = readme[readme.index("## Quick start"):readme.index("## Using the models from Python")]
    block = start[start.index("```bash"):start.index("```", start.index("```bash") + 7)]
    lines = [line.split("#")[0].strip() for line in block.splitlines()[1:]]
    install = next(i for i, line in enumerate(lines) if line.startswith("pip install -e"))
    assert any("torch" in line for line in lines[:install])
    assert lines[install].startswith('pip install -e .') and "[test]" not in lines[install]
    assert any(line.startswith("tformer train") for line in lines)
