"""The `lofa` command documents itself: every option has help text with its default, choices are listed, usage
errors are one line with exit code 2, and the CPU benchmark pins its threads and says so."""
import argparse
import re
import shlex
from pathlib import Path

import pytest
import torch

from lofa.cli import SETTINGS, TASKS, build_parser, main
from lofa.config import SCALES

README = Path(__file__).resolve().parents[1] / "README.md"


def subparsers(parser, path=("lofa",)):
    """(command path, parser) of every parser below `parser`, itself included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from subparsers(child, (*path, name))


def options(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_every_option_has_help_with_its_default_and_choices():
    parsers = dict(subparsers(build_parser()))
    assert {("lofa", c) for c in ("reproduce", "pretrain", "response-map", "train", "predict")} <= set(parsers)
    benches = ("latency", "train", "activate", "throughput", "sweep", "replicates", "zoo-size", "tau")
    assert {("lofa", "bench", b) for b in benches} <= set(parsers)
    for path, parser in parsers.items():
        text = " ".join(parser.format_help().split())
        for action in options(parser):
            flag = action.option_strings[-1]
            assert action.help and len(action.help) > 10, (path, flag)
            flag_only = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if action.default is not None and not flag_only:
                assert f"(default: {action.default})" in text, (path, flag)
            if action.choices:
                assert "{" + ",".join(map(str, action.choices)) + "}" in text, (path, flag)
            assert "(default: None)" not in text and "(default: False)" not in text, path


def test_specific_options_say_what_the_issue_asked():
    parsers = dict(subparsers(build_parser()))

    def help_of(path, flag):
        return next(a for a in options(parsers[path]) if flag in a.option_strings)

    latency = ("lofa", "bench", "latency")
    assert list(help_of(latency, "--preset").choices) == list(SCALES)
    assert "(default: 0.02)" in " ".join(parsers[("lofa", "response-map")].format_help().split())
    for command in ("pretrain", "train"):
        assert "YAML file" in help_of(("lofa", command), "--overrides").help
    predict = " ".join(parsers[("lofa", "predict")].format_help().split())
    assert "runs/<scale>/hypernet/<setting>/lofa/" in predict
    for words in ("--prompt (actions-text)", "--pose (actions-pose)", "--image (styles, identities)"):
        assert words in predict


def test_settings_and_tasks_listed_by_the_cli_are_the_pipelines():
    from lofa.run import SETTINGS as PIPELINE_SETTINGS, TASKS as PIPELINE_TASKS

    assert SETTINGS == [s[0] for s in PIPELINE_SETTINGS] and TASKS == list(PIPELINE_TASKS)


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND"),
    (["fly"], "invalid choice: 'fly'"),
    (["predict", "--prompt", "a kick"], "required: --checkpoint, --out"),
    (["predict", "--checkpoint", "c", "--prompt", "a", "--image", "b", "--out", "o.safetensors"], "not allowed with"),
    (["bench", "latency", "--preset", "huge"], "invalid choice: 'huge'"),
    (["bench", "sweep", "--out", "s.csv"], "required: --run-dir"),
    (["response-map", "--base", "b", "--lora", "l", "--tau", "two"], "invalid float value: 'two'"),
])
def test_usage_errors_are_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and message in err and "--help)" in err and not err.startswith("usage")


def test_help_exits_0(capsys):
    for argv in (["--help"], ["predict", "--help"], ["bench", "latency", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0 and "usage: lofa" in capsys.readouterr().out


def test_python_m_lofa_is_the_lofa_command():
    """`python -m lofa` (what a wrapper script without the console script types) runs lofa.cli."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lofa", "reproduce", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "usage: lofa reproduce" in done.stdout, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "lofa", "reproduce", "--tasks", "nope"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr


def test_python_m_of_a_bench_module_is_its_lofa_bench_command(capsys, monkeypatch):
    """`python -m lofa.bench.lora_sweep ARGS` runs `lofa bench sweep ARGS` (lofa.cli.bench_main)."""
    from lofa.cli import bench_main

    monkeypatch.setattr("sys.argv", ["lora_sweep.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        bench_main("sweep")
    assert exit_info.value.code == 0 and "usage: lofa bench sweep" in capsys.readouterr().out


def test_cpu_benchmark_pins_its_threads_and_says_so(capsys, tmp_path):
    threads = torch.get_num_threads()
    assert main(["bench", "latency", "--preset", "smoke", "--device", "cpu", "--threads", "1",
                 "--json-out", str(tmp_path / "b.json")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("CPU benchmark: torch pinned to 1 intra-op thread(s)")
    assert torch.get_num_threads() == threads  # restored after the run
    assert main(["bench", "latency", "--preset", "smoke", "--device", "cpu", "--threads", "0"]) == 2
    assert "--threads 0" in capsys.readouterr().err


def readme_commands():
    """Every `lofa ...` command line of the README's bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("  #")[0], comments=True)
            starts = [i for i, w in enumerate(words) if w == "lofa" or w.endswith("/lofa")]
            if starts:
                words = words[starts[0] + 1:]
                commands.append(words[: words.index(">")] if ">" in words else words)
    return commands


def test_readme_commands_parse():
    commands = readme_commands()
    assert any(c[0] == "predict" for c in commands)
    parser = build_parser()
    for words in commands:
        parser.parse_args(words)  # SystemExit (a usage error) fails the test
