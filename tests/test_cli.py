"""The `spin-ray` command line's own behaviour: bad global options as one-line errors, and the
help of every option stating its default."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spin_ray.cli import build_parser, main


def test_unknown_log_level_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--log-level", "bogus", "generate", "--prompt", "Hi"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --log-level: invalid choice: 'BOGUS'" in err
    assert "Traceback" not in err


def test_log_level_takes_any_case():
    assert (
        build_parser().parse_args(["--log-level", "debug", "generate", "--prompt", "x"]).log_level
        == "DEBUG"
    )


def test_log_level_from_the_shell_prints_no_traceback():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "spin_ray.cli",
            "--log-level",
            "bogus",
            "generate",
            "--prompt",
            "Hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "invalid choice" in done.stderr


@pytest.mark.parametrize(
    "option,default",
    [("--max-tokens", "64"), ("--temperature", "0.0"), ("--top-p", "1.0"), ("--top-k", "-1")],
)
def test_generate_help_explains_sampling_options_with_their_defaults(option, default):
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    help_text = " ".join(subparsers.choices["generate"].format_help().split())
    described = help_text.split(option, 2)[2]  # past the usage line, at the option's own entry
    entry = described.split(" --", 1)[0]
    assert f"(default {default}" in entry, entry


def test_bench_help_names_the_default_sparse_algorithm():
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    help_text = " ".join(subparsers.choices["bench"].format_help().split())
    entry = help_text.split("--sparse SPARSE", 2)[2].split(" --", 1)[0]
    assert "default quest" in entry, entry
