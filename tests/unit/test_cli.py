import subprocess
import sys

import pytest

from pmmrec.cli import main

COMMANDS = ["data", "config", "pretrain", "transfer", "train", "evaluate", "recommend", "export-embeddings",
            "serve", "bench", "demo", "import-checkpoint"]
DATA_COMMANDS = ["synth", "prepare", "build-images", "stats", "sample", "import-reference", "import-atomic",
                 "export-atomic"]


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    out = _help([], capsys)
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("argv", [[c] for c in COMMANDS if c not in ("data", "config")]
                         + [["data", c] for c in DATA_COMMANDS] + [["config", "show"]])
def test_each_command_has_an_example(argv, capsys):
    out = _help(argv, capsys)
    assert "example:" in out and "pmmrec " + " ".join(argv) in out


def test_user_error_is_one_line_and_nonzero(capsys, tmp_path):
    code = main(["config", "show", "-c", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("pmmrec: error: config file not found")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="config file not found"):
        main(["config", "show", "--debug", "-c", str(tmp_path / "missing.yaml")])


def test_bench_dispatches_to_its_module(tmp_path):
    out = tmp_path / "eval.json"
    assert main(["bench", "eval", "--quick", "--out", str(out)]) in (0, None)
    assert "ratio_to_floor" in out.read_text()


@pytest.mark.parametrize("command", ["serve", "recommend", "export-embeddings"])
def test_serving_commands_need_a_checkpoint(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command])
    assert e.value.code == 2 and "--checkpoint" in capsys.readouterr().err


def test_recommend_names_a_missing_checkpoint(capsys, tmp_path):
    assert main(["recommend", "--checkpoint", str(tmp_path / "none.pt"), "--history", "a b"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_pretrain_and_transfer_say_what_is_missing(capsys):
    assert main(["pretrain"]) == 2
    assert "set data.sources=" in capsys.readouterr().err
    assert main(["transfer"]) == 2
    assert "needs --from CHECKPOINT" in capsys.readouterr().err


def test_train_without_domain_says_what_to_set(capsys):
    assert main(["train", "model.item_tower=id"]) == 2
    assert "set data.domain=FOLDER" in capsys.readouterr().err


def test_config_typo_is_reported_before_not_implemented(capsys):
    assert main(["train", "model.fusoin=sum"]) == 2
    assert "did you mean 'model.fusion'" in capsys.readouterr().err


def test_config_show_prints_resolved_config(capsys, repo):
    assert main(["config", "show", "-c", str(repo / "configs/tiny.yaml"), "model.fusion=sum"]) == 0
    out = capsys.readouterr().out
    assert "fusion: sum" in out and "max_seq_len: 10" in out and "weight_decay: 0.1" in out


def test_overrides_may_follow_options(capsys, repo):
    """key=value words after an option are overrides too, applied in the order written; other leftovers, or
    key=value for a command that takes no overrides, are still errors."""
    tiny = str(repo / "configs/tiny.yaml")
    assert main(["config", "show", "model.fusion=concat", "-c", tiny, "train.epochs=3", "--debug",
                 "model.fusion=sum"]) == 0
    out = capsys.readouterr().out
    assert "fusion: sum" in out and "epochs: 3" in out
    for argv in (["config", "show", "-c", tiny, "model.fusion=sum", "--bogus"],
                 ["config", "show", "-c", tiny, "model.fusion=sum", "--debug", "stray"],
                 ["bench", "serve", "--quick", "train.epochs=3"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "unrecognized arguments: " + argv[-1] in capsys.readouterr().err


def test_bad_group_spec(capsys, tmp_path):
    assert main(["data", "prepare", "a.csv", "b.csv", "--out", str(tmp_path / "o"), "--split-by", "genres",
                 "--group", "kids"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err


def test_console_entry_point_runs_as_module():
    done = subprocess.run([sys.executable, "-m", "pmmrec", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("pmmrec ")


def test_parser_builds_without_heavy_imports():
    code = "import sys; from pmmrec.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False"


def test_command_group_modules_import_only_the_shared_helpers_of_the_cli():
    """``pmmrec.cli`` imports its group modules; a group module importing ``pmmrec.cli`` (or a sibling) back
    would be a cycle, so they share only ``pmmrec.cli.common``."""
    import ast
    from pathlib import Path

    import pmmrec.cli

    package = Path(pmmrec.cli.__file__).parent
    groups = [p for p in package.glob("*.py") if p.stem != "__init__"]
    assert {p.stem for p in groups} >= {"common", "data", "training", "inference", "tools"}
    for path in groups:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                module = f"pmmrec.cli.{node.module or ''}".rstrip(".") if node.level else node.module or ""
                if module == "pmmrec.cli" or module.startswith("pmmrec.cli."):
                    assert path.stem != "common" and module == "pmmrec.cli.common", f"{path.name}: {module}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("pmmrec.cli") for a in node.names), path.name
