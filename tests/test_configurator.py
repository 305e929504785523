"""configurator.py: nanoGPT's exec idiom from any cwd, typed overrides, config files, one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configurator import apply_overrides  # noqa: E402

# A tiny training-script stand-in: config globals, config_keys, exec configurator, print the config.
SCRIPT = f"""
import json
learning_rate = 6e-4
max_iters = 5000
compile = True
init_from = 'scratch'
wandb_run_name = None
betas = (0.9, 0.95)
config_keys = [k for k, v in globals().items() if not k.startswith('_')
               and isinstance(v, (int, float, bool, str, tuple, list, type(None)))]
exec(open({str(REPO / "configurator.py")!r}).read())
print(json.dumps({{k: globals()[k] for k in config_keys}}))
"""


def run(tmp_path, *args):
    """Run the stand-in script from tmp_path (not the repo root) with `args`."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)


def config_of(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def one_line_error(result):
    assert result.returncode == 2
    assert result.stdout == ""  # the script did not go on
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    return result.stderr


def test_defaults_without_arguments(tmp_path):
    assert config_of(run(tmp_path)) == {"learning_rate": 0.0006, "max_iters": 5000, "compile": True,
                                        "init_from": "scratch", "wandb_run_name": None, "betas": [0.9, 0.95]}


def test_typed_overrides(tmp_path):
    config = config_of(run(tmp_path, "--learning_rate=1e-4", "--max_iters=10", "--init_from=resume",
                           "--betas=(0.8,0.99)", "--wandb_run_name=run7"))
    assert config["learning_rate"] == 0.0001 and config["max_iters"] == 10
    assert config["init_from"] == "resume" and config["betas"] == [0.8, 0.99]
    assert config["wandb_run_name"] == "run7"


def test_float_accepts_int_and_none_default_takes_literals(tmp_path):
    config = config_of(run(tmp_path, "--learning_rate=3", "--wandb_run_name=12"))
    assert config["learning_rate"] == 3.0 and isinstance(config["learning_rate"], float)
    assert config["wandb_run_name"] == 12


@pytest.mark.parametrize("text,expected", [("True", True), ("true", True), ("1", True),
                                           ("False", False), ("false", False), ("0", False)])
def test_bool_parsing(text, expected):
    assert apply_overrides({"compile": not expected}, [f"--compile={text}"])["compile"] is expected


def test_bad_bool(tmp_path):
    err = one_line_error(run(tmp_path, "--compile=yes"))
    assert "compile" in err and "bool" in err and "'yes'" in err


def test_bad_int(tmp_path):
    err = one_line_error(run(tmp_path, "--max_iters=1.5"))
    assert "max_iters" in err and "int" in err and "'1.5'" in err


def test_unknown_key_suggests_close_match(tmp_path):
    err = one_line_error(run(tmp_path, "--lerning_rate=1e-3"))
    assert err == "error: unknown config key 'lerning_rate' (did you mean: learning_rate?)\n"


def test_missing_value(tmp_path):
    err = one_line_error(run(tmp_path, "--compile"))
    assert "--compile=" in err


def test_config_file_then_override(tmp_path):
    (tmp_path / "cfg.py").write_text("max_iters = 7\nlearning_rate = 2e-3\n")
    config = config_of(run(tmp_path, "cfg.py", "--max_iters=9"))
    assert config["max_iters"] == 9 and config["learning_rate"] == 0.002


def test_config_file_unknown_name_warns(tmp_path):
    (tmp_path / "cfg.py").write_text("max_itres = 7\n")
    result = run(tmp_path, "cfg.py")
    assert config_of(result)["max_iters"] == 5000
    assert "warning" in result.stderr and "'max_itres'" in result.stderr and "max_iters" in result.stderr


def test_missing_config_file(tmp_path):
    err = one_line_error(run(tmp_path, "nope.py"))
    assert "nope.py" in err


def test_broken_config_file(tmp_path):
    (tmp_path / "cfg.py").write_text("max_iters = = 7\n")
    err = one_line_error(run(tmp_path, "cfg.py"))
    assert "cfg.py" in err and "SyntaxError" in err


def test_help_lists_keys_with_defaults(tmp_path):
    result = run(tmp_path, "--help")
    assert result.returncode == 0
    assert "max_iters = 5000" in result.stdout and "init_from = 'scratch'" in result.stdout
    assert "{" not in result.stdout  # the script itself did not run


def test_importable_without_touching_argv():
    defaults = {"batch_size": 12, "dropout": 0.0, "name": "x", "_private": 1}
    config = apply_overrides(defaults, ["--batch_size=32", "--dropout=0.1"])
    assert config == {"batch_size": 32, "dropout": 0.1, "name": "x"}
    assert defaults["batch_size"] == 32


def test_import_api_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        apply_overrides({"batch_size": 12}, ["--batch_sise=1"], allowed_keys=["batch_size"])
    assert exit_info.value.code == 2
    assert "did you mean: batch_size?" in capsys.readouterr().err
