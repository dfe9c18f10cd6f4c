"""What a user meets when something goes wrong: bad input (one line, non-zero exit, before any work),
stopping, locking, checkpoint cadence, resuming, recovery advice, and interrupted evaluations."""
import json
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import bench
import cli
import eval as eval_script
import methods
import models
import plots
import suite
import train_cifar
import train_imagenet
import training
from conftest import ROOT, crash_at, hooked, make_image_folder, nan_from, read_log, signal_at

TINY = ["--arch", "wrn-10-1", "--batch-size", "8", "--log-every", "1", "--val-n", "6", "--eval-steps", "2",
        "--gamma-n", "4"]  # 30 images: 6 held out, 3 steps of 8 per epoch

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("cifar")), classes=3, per_class=10, size=16)


def _one_line_error(fn, argv, script):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    message = str(e.value.code)
    assert message.startswith(f"{script}: error:") and "\n" not in message, message
    return message


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--batch-size", "-5"], "--batch-size must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--lr-decay-at", "abc"], "--lr-decay-at: cannot read 'abc'"),
    (["--lr-decay-at", "0.9,0.5"], "must increase"),
    (["--llr-steps", "-1"], "--llr-steps must be at least 0"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--momentum", "1"], "--momentum must lie in [0, 1)"),
    (["--val-n", "-1"], "--val-n must be at least 0"),
    (["--train-n", "7"], "multiple of the 3 classes"),
    (["--adv-random-start", "maybe"], "not true or false"),
    (["--epochs", "x"], "invalid int value"),
])
def test_train_cifar_bad_input(flags, message, data_dir, tmp_path):
    out = str(tmp_path / "run")
    text = _one_line_error(train_cifar.main, ["--data-dir", data_dir, "--out", out, *TINY, *flags], "train_cifar.py")
    assert message in text
    if "multiple of" not in message:  # checked once the data is read; everything else before any work
        assert not os.path.exists(out)


@pytest.mark.parametrize("flags, message", [
    (["--per-device-batch", "0"], "--per-device-batch must be at least 1"),
    (["--workers", "-1"], "--workers must not be negative"),
    (["--eps", "4/255/2"], "cannot read eps"),
])
def test_train_imagenet_bad_input(flags, message, tmp_path):
    text = _one_line_error(train_imagenet.main, ["--data-dir", str(tmp_path), "--out", str(tmp_path / "run"),
                                                 "--batch-size", "8", *flags], "train_imagenet.py")
    assert message in text


def test_eval_bad_input(trained_run, tmp_path):
    ckpt, data_dir = trained_run["checkpoint"], trained_run["data_dir"]
    common = [ckpt, "--eps", "8/255", "--data-dir", data_dir]
    for flags, message in ((["--n", "0"], "--n must be at least 1"), (["--n", "-5"], "--n must be at least 1"),
                           (["--batch-size", "0"], "--batch-size must be at least 1"),
                           (["--out", str(tmp_path / "missing" / "e.json")], "e.json: No such file or directory")):
        assert message in _one_line_error(eval_script.main, [*common, *flags], "eval.py")
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _one_line_error(eval_script.main, [*common, "--device", "cuda"], "eval.py")
    nan = str(tmp_path / "nan.safetensors")
    model = models.load_checkpoint(ckpt)
    with torch.no_grad():
        model.net.fc.weight[0, 0] = float("nan")
    models.save_checkpoint(model, nan)
    assert "NaN or inf weights" in _one_line_error(eval_script.main, [nan, *common[1:]], "eval.py")
    # a test folder that lacks a class would shift every label
    broken = make_image_folder(str(tmp_path / "broken"), classes=3, per_class=2, size=16)
    os.rename(os.path.join(broken, "test", "class1"), os.path.join(tmp_path, "class1-moved"))
    text = _one_line_error(eval_script.main, [ckpt, "--eps", "8/255", "--data-dir", broken], "eval.py")
    assert "different class folders" in text


def test_every_flag_with_a_default_shows_it_in_help():
    parsers = {"train_cifar": train_cifar.get_args, "eval": eval_script.get_args, "bench": bench.get_args}
    for name, get_args in parsers.items():
        captured = {}

        def grab(self, args=None, namespace=None, captured=captured):
            captured["parser"] = self
            raise SystemExit(0)

        with pytest.MonkeyPatch.context() as m:
            m.setattr("argparse.ArgumentParser.parse_args", grab)
            with pytest.raises(SystemExit):
                get_args(["x", "--eps", "1"] if name == "eval" else [])
        text = captured["parser"].format_help()
        for action in captured["parser"]._actions:
            if action.option_strings and action.default not in (None, False) and action.dest != "help":
                assert action.help, f"{name}: {action.option_strings[0]} has no help"
        assert "(default: " in text and "(default: None)" not in text


def test_help_says_how_the_flags_read(capsys):
    """ε's help covers ℓ2 radii; ImageNet's --llr-steps default (the paper's, by ε) is visible; the
    ImageNet script's header says what a stop does; --resume's help and the README's Train
    section say the same about changes on resume."""
    helps = {}
    for script in (train_cifar, train_imagenet):
        with pytest.raises(SystemExit):
            script.get_args(["--help"])
        helps[script] = " ".join(capsys.readouterr().out.split())
    assert "with --norm l2 every number is in pixel units: 0.5, or 36/255" in helps[train_cifar]
    assert "--llr-steps N steps of llr_loss (unset: 2 at --eps 4/255 or less, 10 above: the paper's)" in \
        helps[train_imagenet]
    assert "next log step" not in train_imagenet.__doc__ and "stops after the current step" in train_imagenet.__doc__
    resume = "each change is printed and recorded in config.json"
    assert all(resume in text for text in helps.values())
    readme = open(os.path.join(ROOT, "README.md")).read()
    train_section = " ".join(readme.split("## Train", 1)[1].split("\n## ", 1)[0].split())
    assert resume in train_section


# --------------------------------------------------------------------------- stopping and the run directory
def test_a_stop_is_acknowledged_and_honoured_after_the_current_step(data_dir, tmp_path, monkeypatch, capsys):
    """--log-every 50 no longer delays a stop: SIGTERM during step 2 stops after step 2, with exit
    status 143 (128 + SIGTERM: `train && eval` must not go on to a half-trained model)."""
    run = str(tmp_path / "run")
    monkeypatch.setitem(methods.METHODS, "plain", hooked(methods.METHODS["plain"], signal_at(2)))
    status = train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--epochs", "3", "--out", run, *TINY,
                               "--log-every", "50"])
    captured = capsys.readouterr()
    assert "SIGTERM: stopping after step 2, saving a checkpoint" in captured.err
    assert f"stopped at step 2 with a checkpoint; continue with --resume {run}" in captured.out + captured.err
    assert torch.load(os.path.join(run, "state.pt"), weights_only=True)["step"] == 2
    assert status == 143


def test_a_stop_during_an_evaluation_announces_the_step_it_stops_after(data_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the evaluation after step 3 (the end of epoch 1): step 4 still runs, and the
    acknowledgement says so; exit status 130. During the last evaluation: the run finishes (0)."""
    import training

    original = training.evaluate

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", interrupted)
    run = str(tmp_path / "run")
    status = train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--epochs", "3", "--out", run, *TINY])
    captured = capsys.readouterr()
    assert "SIGINT: stopping after step 4, saving a checkpoint" in captured.err
    assert "stopped at step 4 with a checkpoint" in captured.out and status == 130
    assert torch.load(os.path.join(run, "state.pt"), weights_only=True)["step"] == 4
    last = str(tmp_path / "last")
    status = train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--epochs", "1", "--out", last, *TINY])
    captured = capsys.readouterr()
    assert "SIGINT: the run has trained its last step and is finishing" in captured.err
    assert "done:" in captured.out and "stopped" not in captured.out and status == 0


def test_the_lock_leaves_with_the_process_that_held_it(data_dir, tmp_path):
    """A finished run, a resume of it, and a start that fails once the directory is taken leave no
    lock behind; the failed start leaves no directory either."""
    run = str(tmp_path / "run")
    common = ["--method", "plain", "--data-dir", data_dir, "--epochs", "1", *TINY]
    train_cifar.main([*common, "--out", run])
    assert "lock" not in os.listdir(run)
    train_cifar.main(["--resume", run])  # finished: nothing to do
    assert "lock" not in os.listdir(run)
    failed = str(tmp_path / "failed")
    assert "fewer than one batch" in _one_line_error(train_cifar.main, [*common, "--out", failed, "--batch-size", "64"],
                                                     "train_cifar.py")
    assert not os.path.exists(failed)


def test_a_second_signal_stops_at_once(data_dir, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    monkeypatch.setitem(methods.METHODS, "plain", hooked(methods.METHODS["plain"], signal_at(5, signal.SIGINT, signal.SIGINT)))
    with pytest.raises(SystemExit, match="stopped at once by a second SIGINT"):
        train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--epochs", "3", "--out", run, *TINY])
    assert torch.load(os.path.join(run, "state.pt"), weights_only=True)["step"] == 3  # the epoch's, intact


def test_a_second_process_on_the_same_run_directory_is_refused(data_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"f = open({str(run / 'lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "f.write(str(os.getpid())); f.flush(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        text = _one_line_error(train_cifar.main, ["--data-dir", data_dir, "--out", str(run), *TINY], "train_cifar.py")
        assert f"another training process (PID {holder.pid})" in text
    finally:
        holder.kill()
        holder.wait()


def test_checkpoints_by_the_clock(data_dir, tmp_path, monkeypatch):
    """With --save-minutes a crash in the first epoch still leaves a checkpoint to resume."""
    run = str(tmp_path / "run")
    monkeypatch.setitem(methods.METHODS, "plain", hooked(methods.METHODS["plain"], crash_at(3)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--epochs", "2", "--out", run, *TINY,
                          "--save-minutes", "1e-6"])
    assert torch.load(os.path.join(run, "state.pt"), weights_only=True)["step"] == 2


def test_a_crash_between_checkpoints_leaves_no_step_twice_in_the_log(data_dir, tmp_path, monkeypatch):
    """Killed after logging steps 4 and 5 but with the checkpoint of step 3: the resumed run logs
    steps 4 and 5 again, so the log keeps each step once; the resume is recorded in config.json with
    the flags it changed (not those repeated with their recorded values)."""
    run = str(tmp_path / "run")
    common = ["--method", "plain", "--data-dir", data_dir, "--epochs", "3", *TINY]
    with monkeypatch.context() as m:
        m.setitem(methods.METHODS, "plain", hooked(methods.METHODS["plain"], crash_at(6)))
        with pytest.raises(RuntimeError):
            train_cifar.main([*common, "--out", run])
    assert [e["step"] for e in read_log(run) if e["kind"] == "train"] == [1, 2, 3, 4, 5]
    train_cifar.main(["--resume", run, "--log-every", "2", "--data-dir", data_dir])  # --data-dir as recorded
    steps = [e["step"] for e in read_log(run) if e["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[:3] == [1, 2, 3] and steps[-1] == 9
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["resumes"] == [{"step": 3, "command": config["resumes"][0]["command"],
                                  "changed": {"log_every": 2}}]


def test_a_fresh_start_into_a_used_directory_needs_overwrite(data_dir, tmp_path):
    run = str(tmp_path / "run")
    common = ["--method", "plain", "--data-dir", data_dir, "--epochs", "1", "--out", run, *TINY]
    train_cifar.main(common)
    assert "--overwrite" in _one_line_error(train_cifar.main, common, "train_cifar.py")
    train_cifar.main([*common, "--overwrite"])
    assert [e["step"] for e in read_log(run) if e["kind"] == "train"] == [1, 2, 3]


def test_validation_shows_its_progress_and_pauses_the_training_bar(data_dir, tmp_path, monkeypatch):
    """The per-epoch validation reports its own progress image by image (a second bar), and the training
    bar's clock is paused over it (tqdm.unpause), so that its rate and time left count training only."""
    from tqdm import tqdm

    paused, counted = [], []
    monkeypatch.setattr(tqdm, "unpause", lambda bar: paused.append(bar.total))
    original = training.evaluate

    def spy(*args, progress, **kwargs):
        return original(*args, progress=lambda k: counted.append(k) or progress(k), **kwargs)

    monkeypatch.setattr(training, "evaluate", spy)
    train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--epochs", "1", *TINY, "--out", str(tmp_path / "r")])
    assert sum(counted) == 6 and paused == [3]  # the 6 held-out images; the bar of 3 steps, once


def test_overwrite_deletes_the_earlier_run_and_its_evaluations_and_nothing_else(data_dir, tmp_path):
    """eval.py's reports of the earlier run's checkpoints (and an interrupted evaluation's leftovers)
    go with it, or they would describe the new model; a directory holding only such a report is
    not empty; a file of anything else is refused by name, and nothing is deleted."""
    import autoattack_check
    import probe

    run, base = str(tmp_path / "run"), ["--method", "plain", "--data-dir", data_dir, "--epochs", "1", *TINY]
    common = [*base, "--out", run]
    train_cifar.main(common)
    reports = {os.path.basename(eval_script.output_path(out, os.path.join(run, "best.safetensors"), mode))
               for mode in ("eval", *probe.MODES.values()) for out in (None, run + os.sep)}
    reports |= {"last.eval.json", "best.eval.json.partial.json", "eval.json" + autoattack_check.STATE_SUFFIX}
    for name in reports:
        with open(os.path.join(run, name), "w") as f:
            f.write("{}")
    train_cifar.main([*common, "--overwrite"])
    assert set(os.listdir(run)) == {"config.json", "log.jsonl", "last.safetensors", "best.safetensors", "state.pt"}
    for name, text in (("best.eval.json", "{}"), ("notes.txt", "mine")):
        with open(os.path.join(run, name), "w") as f:
            f.write(text)
    message = _one_line_error(train_cifar.main, [*common, "--overwrite"], "train_cifar.py")
    assert "holds files that are not a training run's (notes.txt)" in message
    assert {"best.eval.json", "notes.txt", "state.pt"} <= set(os.listdir(run))  # nothing deleted

    reported = tmp_path / "reported"
    reported.mkdir()
    (reported / "best.eval.json").write_text("{}")
    message = _one_line_error(train_cifar.main, [*base, "--out", str(reported)], "train_cifar.py")
    assert "holds eval.py's reports of an earlier run (best.eval.json)" in message and "--overwrite" in message


def test_overwrite_removes_an_evaluation_eval_wrote_under_any_name_and_lists_what_it_removed(data_dir, tmp_path,
                                                                                              capsys):
    """`eval.py --out RUN/my-eval.json` (and its leftovers) is eval.py's output like best.eval.json:
    --overwrite deletes it with the run and prints each file it deleted; a JSON file of the user's
    own is still refused."""
    run = str(tmp_path / "run")
    common = ["--method", "plain", "--data-dir", data_dir, "--epochs", "1", *TINY, "--out", run]
    train_cifar.main(common)
    eval_script.main([run, "--eps", "8/255", "--data-dir", data_dir, "--n", "2", "--attacks", "fgsm20",
                      "--fgsm-steps", "1", "--no-sanity", "--out", os.path.join(run, "my-eval.json")])
    with open(os.path.join(run, "mine.partial.json"), "w") as f:  # an interrupted evaluation's leftover
        json.dump({"written_by": "eval.py", "settings": {}, "columns": {}}, f)
    capsys.readouterr()
    train_cifar.main([*common, "--overwrite"])
    printed = capsys.readouterr().out
    assert "--overwrite: removed" in printed and "my-eval.json" in printed and "mine.partial.json" in printed
    assert "last.safetensors" in printed.split("--overwrite: removed")[1].splitlines()[0]
    assert not {"my-eval.json", "mine.partial.json"} & set(os.listdir(run))
    with open(os.path.join(run, "notes.json"), "w") as f:
        json.dump({"mode": "mine"}, f)
    message = _one_line_error(train_cifar.main, [*common, "--overwrite"], "train_cifar.py")
    assert "holds files that are not a training run's (notes.json)" in message


def test_paths_inside_the_repository_are_recorded_relative_to_it(tmp_path, monkeypatch):
    """config.json records the data and the run directory relative to the repository when they lie
    inside it (a clone elsewhere finds them), absolute otherwise; --resume reads both forms, from
    any working directory, and a repeated --data-dir naming the same directory is no change."""
    inside = os.path.join(ROOT, "data", "cifar10-jpeg")
    assert cli.record_path(inside) == os.path.join("data", "cifar10-jpeg") and cli.recorded_path("data/x") == \
        os.path.join(ROOT, "data", "x")
    assert cli.record_path(str(tmp_path)) == cli.recorded_path(str(tmp_path)) == str(tmp_path)
    args = train_cifar.get_args(["--data-dir", inside, "--out", os.path.join(ROOT, "runs", "x")])
    config = training.provenance(args, SimpleNamespace(num_processes=1, mixed_precision="no"))
    assert (config["args"]["data_dir"], config["args"]["out"]) == (os.path.join("data", "cifar10-jpeg"),
                                                                    os.path.join("runs", "x"))
    assert args.data_dir == inside  # the run itself goes on with the path as given
    run = tmp_path / "run"
    run.mkdir()
    saved = {**vars(train_cifar.get_args(["--data-dir", str(tmp_path / "data")])), "data_dir": os.path.relpath(
        tmp_path / "data", ROOT)}  # a relative record of a directory outside the repository, as a test can make
    (run / "config.json").write_text(json.dumps({"args": saved}))
    monkeypatch.chdir(tmp_path / "run")
    resumed = train_cifar.get_args(["--resume", str(run)])
    assert os.path.samefile(os.path.dirname(resumed.data_dir), tmp_path) and resumed.resume_changes == {}
    again = train_cifar.get_args(["--resume", str(run), "--data-dir", os.path.join("..", "data")])
    assert again.resume_changes == {}


def test_resume_of_what_is_not_a_run_says_so(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    for path, message in (("folder", "it is not a run: a run directory holds config.json and state.pt"),
                          ("file", "it is a file; give the run's directory"), ("missing", "no such directory")):
        text = _one_line_error(train_cifar.main, ["--resume", str(tmp_path / path)], "train_cifar.py")
        assert f"cannot resume from {tmp_path / path}: {message}" in text


def test_a_resume_prints_the_flags_it_changes(data_dir, tmp_path, monkeypatch, capsys):
    """--lr (one of the flags a resume may change) is printed with the recorded value; repeated
    with its value, a flag is not a change; a finished run says that the change is not applied."""
    run = str(tmp_path / "run")
    with monkeypatch.context() as m:
        m.setitem(methods.METHODS, "plain", hooked(methods.METHODS["plain"], signal_at(2)))
        train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--epochs", "1", "--out", run, *TINY])
    capsys.readouterr()
    train_cifar.main(["--resume", run, "--lr", "0.05", "--log-every", "1"])
    out = capsys.readouterr().out
    assert "resuming at step 2 with --lr 0.05 (recorded: 0.2) ->" in out and "--log-every" not in out
    assert [e["lr"] for e in read_log(run) if e["kind"] == "train"] == [0.2, 0.2, 0.05]
    train_cifar.main(["--resume", run, "--lr", "0.01"])
    assert "is finished (1 of 1 epochs): nothing to resume (so --lr 0.01 (recorded: 0.2) is not applied)" in \
        capsys.readouterr().out


@pytest.mark.parametrize("damage, message", [
    ("state", "cannot resume from"), ("config", "its config.json is not a run's configuration"),
    ("flag", "--epochs cannot change when a run is resumed"), ("nothing", "nothing to resume"),
])
def test_resume_errors(damage, message, trained_run, tmp_path, capsys):
    run = str(shutil.copytree(trained_run["run"], tmp_path / "run"))  # a finished run, each test its own copy
    argv = ["--resume", run]
    if damage == "state":
        with open(os.path.join(run, "state.pt"), "r+b") as f:
            f.truncate(100)
        os.remove(os.path.join(run, "last.safetensors"))  # unfinished as far as the disk tells (else: "finished")
    elif damage == "config":
        with open(os.path.join(run, "config.json"), "w") as f:
            f.write("{not json")
    elif damage == "flag":
        argv += ["--epochs", "5"]
    else:
        os.remove(os.path.join(run, "state.pt"))
    with pytest.raises(SystemExit) as e:
        train_cifar.main(argv)
    text = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err.strip()
    assert message in text and "\n" not in text.strip()


@pytest.mark.parametrize("nan_from_call, advice", [(2, "No checkpoint was saved yet: start again with --overwrite"),
                                                   (5, "(step 3): continue from it with --resume")])
def test_nan_advice_matches_what_is_on_disk(nan_from_call, advice, data_dir, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    monkeypatch.setitem(methods.METHODS, "plain", hooked(methods.METHODS["plain"], nan_from(nan_from_call)))
    with pytest.raises(SystemExit) as e:
        train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--epochs", "3", "--out", run, *TINY,
                          "--save-minutes", "0"])
    assert advice in str(e.value.code)


def test_evaluation_uses_the_data_directory_the_run_recorded(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/cifar10 does not exist here
    report = eval_script.main([trained_run["run"], "--eps", "8/255", "--n", "4", "--attacks", "fgsm20", "--no-sanity",
                               "--out", str(tmp_path / "e.json")])
    assert report["data_dir"] == os.path.abspath(trained_run["data_dir"])


def test_an_interrupted_evaluation_continues_with_the_next_column(trained_run, tmp_path, monkeypatch):
    out = str(tmp_path / "e.json")
    argv = [trained_run["run"], "--eps", "8/255", "--data-dir", trained_run["data_dir"], "--n", "6", "--attacks", "fgsm20,untargeted",
            "--steps", "2", "--restarts", "1", "--no-sanity", "--out", out]
    original, attacked = suite.run_attack, []

    def interrupted(*args, **kwargs):
        attacked.append(args[4])
        if args[4] == "untargeted":
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(suite, "run_attack", interrupted)
        with pytest.raises(KeyboardInterrupt):
            eval_script.main(argv)
    assert json.load(open(out + ".partial.json"))["columns"].keys() == {"fgsm20"}
    attacked.clear()
    monkeypatch.setattr(suite, "run_attack", lambda *a, **k: attacked.append(a[4]) or original(*a, **k))
    report = eval_script.main(argv)
    assert set(attacked) == {"untargeted"} and set(report["results"]) >= {"fgsm20", "untargeted"}
    assert not os.path.exists(out + ".partial.json")


# --------------------------------------------------------------------------- the other scripts
def test_plots_input_errors(trained_run, tmp_path):
    run = trained_run["run"]
    report = str(tmp_path / "e.json")
    eval_script.main([run, "--eps", "8/255", "--data-dir", trained_run["data_dir"], "--n", "4", "--attacks", "fgsm20", "--no-sanity",
                      "--out", report])
    assert "is not a training log" in _one_line_error(plots.main, ["curves", report, "--out", str(tmp_path / "c.png")],
                                                      "plots.py")
    assert "does not exist" in _one_line_error(
        plots.main, ["curves", os.path.join(run, "log.jsonl"), "--out", str(tmp_path / "no" / "c.png")], "plots.py")


def test_bench_reports_minima_and_writes_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = bench.run(bench.get_args(["--arch", "wrn-10-1", "--batch-size", "2", "--image-size", "8", "--rounds", "2",
                                       "--warmup", "1", "--methods", "plain,adv-1", "--device", "cpu"]))
    assert os.path.exists(tmp_path / "runs" / "bench.json")
    r = report["results"]["adv-1"]
    assert r["ms_min"] == min(r["ms_all"]) and r["spread"] >= 1 and "busy_machine" in report


def test_make_runs_one_process_without_the_launcher():
    """So that Ctrl-C reaches the trainer (accelerate launch orphaned it)."""
    dry = subprocess.run(["make", "-n", "cifar", "GPUS=1"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "train_cifar.py" in dry and "accelerate launch" not in dry
    dry = subprocess.run(["make", "-n", "cifar", "GPUS=2"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "accelerate launch --num_processes 2" in dry


def test_a_subset_of_training_images_is_class_balanced(data_dir, tmp_path, monkeypatch):
    import data

    labels = torch.tensor([0, 1, 2] * 10)
    subset = data.balanced_subset(labels, torch.arange(30), 9)
    assert torch.bincount(labels[subset]).tolist() == [3, 3, 3]
    seen = []
    monkeypatch.setitem(methods.METHODS, "plain", hooked(methods.METHODS["plain"],
                                                         lambda n, loss, info: seen.append(info["logits"].shape[0])))
    run = str(tmp_path / "run")
    train_cifar.main(["--method", "plain", "--data-dir", data_dir, "--epochs", "1", "--out", run, *TINY,
                      "--train-n", "18", "--batch-size", "6"])
    assert seen == [6, 6, 6]  # 18 images in batches of 6
    assert json.load(open(os.path.join(run, "config.json")))["args"]["train_n"] == 18


def test_cyclic_learning_rate_schedule():
    """--lr-schedule cyclic: 0 at the first step, --lr at half of training, back towards 0 at the end
    (torch's CyclicLR with base 0 and half the steps up, as train_fgsm.py); step is unchanged."""
    import argparse

    import training

    args = argparse.Namespace(lr=0.2, lr_schedule="cyclic", lr_warmup=0, lr_decay_at="0.5")
    rates = [training.learning_rate(args, s, 10, 100) for s in range(100)]
    assert rates[0] == 0 and rates[50] == pytest.approx(0.2) and rates[99] == pytest.approx(0.2 * 2 / 100)
    assert rates[25] == pytest.approx(0.1) and rates[75] == pytest.approx(0.1)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    cyclic = torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=0, max_lr=0.2, step_size_up=50, step_size_down=50)
    for s in range(100):  # the same values as torch's CyclicLR, stepped per batch
        assert optimizer.param_groups[0]["lr"] == pytest.approx(rates[s])
        optimizer.step()
        cyclic.step()
    args.lr_schedule = "step"
    assert training.learning_rate(args, 49, 10, 100) == 0.2 and training.learning_rate(args, 50, 10, 100) == \
        pytest.approx(0.02)


def test_the_contrast_configurations_train_end_to_end(data_dir, tmp_path):
    run = str(tmp_path / "run")
    train_cifar.main(["--method", "adv", "--adv-steps", "2", "--adv-bn", "train", "--adv-optimizer", "adam",
                      "--adv-loss", "margin", "--lr-schedule", "cyclic", "--activation", "relu", "--data-dir",
                      data_dir, "--epochs", "1", "--out", run, *TINY])
    config = json.load(open(os.path.join(run, "config.json")))["args"]
    assert (config["adv_bn"], config["adv_optimizer"], config["adv_loss"], config["lr_schedule"]) == (
        "train", "adam", "margin", "cyclic")
    assert [e["lr"] for e in read_log(run) if e["kind"] == "train"][0] == 0.0
    message = _one_line_error(train_cifar.main, ["--adv-bn", "sometimes", "--data-dir", data_dir], "train_cifar.py")
    assert "--adv-bn" in message and "invalid choice" in message
