"""Run config: TOML, LIONCUB_* environment and --set overrides, validated with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lioncub.peer.cli import main
from lioncub.peer.config import ConfigError, RunConfig, env_overrides, from_dict, load_run_config, to_dict


def test_defaults_round_trip_through_json() -> None:
    cfg = RunConfig()
    doc = json.loads(json.dumps(to_dict(cfg)))
    assert from_dict(RunConfig, doc) == cfg


def test_precedence_toml_then_env_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[run]\nrun_id = "exp1"\n[run.strategy]\nouter_lr = 0.002\nlocal_steps = 4\n[run.task]\nname = "tiny"\n'
    )
    env = {
        "LIONCUB_STRATEGY__OUTER_LR": "0.004",
        "LIONCUB_ROUNDS__GROUP_SIZE": "2",
        "LIONCUB_CACHE_DIR": "/x",
    }
    cfg = load_run_config(toml, environ=env, overrides={"rounds.group_size": "4"})
    assert cfg.run_id == "exp1"
    assert cfg.strategy.local_steps == 4
    assert cfg.strategy.outer_lr == 0.004  # env beats the file
    assert cfg.rounds.group_size == 4  # flags beat env
    assert env_overrides(env) == {"strategy.outer_lr": "0.004", "rounds.group_size": "2"}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"strategy.outer_lr": "-1"}, "outer_lr"),
        ({"strategy.outer_lr": "fast"}, "strategy.outer_lr"),
        ({"nope.x": "1"}, "unknown setting"),
        ({"rounds.group_size": "1"}, "group_size"),
        ({"rounds.overlap": "maybe"}, "true or false"),
        ({"run_id": "has space"}, "run_id"),
        ({"inner.optimizer": "sgd"}, "inner.optimizer"),
        ({"strategy.name": "gossip"}, "unknown strategy"),
        ({"Bad-Key": "1"}, "bad setting name"),
    ],
)
def test_bad_values_name_the_setting(overrides: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_run_config(None, overrides=overrides, environ={})


def test_malformed_documents_are_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nx=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(bad, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.toml", environ={})
    with pytest.raises(ConfigError):
        from_dict(RunConfig, {"strategy": "not a table"})
    with pytest.raises(ConfigError):
        from_dict(RunConfig, {"seed": True})
    with pytest.raises(ConfigError):
        from_dict(RunConfig, {"strategy": {"outer_lr": float("nan")}})


def test_join_check_config_validates_without_starting(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["join", "--task", "tiny", "--set", "strategy.local_steps=3", "--check-config"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["run"]["strategy"]["local_steps"] == 3
    assert main(["join", "--set", "strategy.outer_lr=-1", "--check-config"]) == 2
    assert "outer_lr" in capsys.readouterr().out
    assert main(["join", "--port", "70000", "--check-config"]) == 2
