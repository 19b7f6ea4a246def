"""The CLI generated from ServerConfig: every flag documented with its default and env variable."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from server.config import ServerConfig, build_parser, env_name, load_config

REPO = Path(__file__).resolve().parents[1]


def _flags() -> dict[str, str]:
    """option string -> help text of every flag but --help."""
    return {a.option_strings[0]: a.help or "" for a in build_parser()._actions if a.dest != "help"}


def test_every_flag_has_help_with_default_and_env_variable() -> None:
    for flag, text in _flags().items():
        assert "[default: " in text and "; env COSYSERVE_" in text, flag
        assert len(text.split("[default:")[0].strip()) > 10, f"{flag} has no help of its own"


def test_every_setting_but_the_secrets_has_a_flag() -> None:
    flags = _flags()
    for f in fields(ServerConfig):
        flag = "--" + (f.metadata.get("flag") or f.name).replace("_", "-")
        if f.metadata.get("env_only"):
            assert flag not in flags, f"secret {f.name} must not be a flag (visible in ps)"
        else:
            assert flag in flags and env_name(f) in flags[flag], f.name


def test_help_shows_defaults_of_the_dataclass() -> None:
    flags = _flags()
    assert "[default: 32; env COSYSERVE_MAX_BATCH]" in flags["--max-batch"]
    assert "[default: auto; env COSYSERVE_OVERLAP_STAGES]" in flags["--overlap-stages"]
    assert "[default: ./data; env COSYSERVE_DATA_DIR]" in flags["--data-dir"]
    assert "[default: unset; env COSYSERVE_TOKENS]" in flags["--token"]


def test_help_runs_from_the_command_line() -> None:
    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert "--overlap-stages {auto,0,1}" in out and "COSYSERVE_S3_SECRET_KEY" in out  # secrets: epilog


def test_env_then_flag_for_each_type() -> None:
    env = {"COSYSERVE_OVERLAP_STAGES": "0", "COSYSERVE_IDLE_TIMEOUT_S": "2.5", "COSYSERVE_WARMUP": "0",
           "COSYSERVE_MODEL_DIR": "/m", "COSYSERVE_TOKENS": "a,b"}
    cfg = load_config([], env)
    assert (cfg.overlap_stages, cfg.idle_timeout_s, cfg.warmup, cfg.model_dir, cfg.tokens) == \
        ("0", 2.5, 0, Path("/m"), ("a", "b"))
    assert load_config(["--overlap-stages", "1", "--token", "t"], env).overlap_stages == "1"


def test_choices_are_checked_for_env_values_too() -> None:
    with pytest.raises(ValueError, match="overlap_stages"):
        load_config(["--token", "t"], {"COSYSERVE_OVERLAP_STAGES": "yes"})
    with pytest.raises(SystemExit):
        load_config(["--token", "t", "--warmup", "2"], {})


def test_roles_and_their_internal_settings() -> None:
    assert load_config(["--token", "t"], {}).role == "all"  # the default: today's single process
    cfg = load_config(["--role", "frontend", "--token", "t", "--internal-token", "i", "--backend", "http://a:1",
                       "--backend", "http://b:2"], {})
    assert (cfg.role, cfg.internal_token, cfg.backends) == ("frontend", "i", ("http://a:1", "http://b:2"))
    env = {"COSYSERVE_ROLE": "frontend", "COSYSERVE_TOKENS": "t", "COSYSERVE_INTERNAL_TOKEN": "i",
           "COSYSERVE_BACKENDS": "http://a:1,http://b:2"}
    assert load_config([], env).backends == ("http://a:1", "http://b:2")
    backend = load_config(["--role", "backend", "--internal-token", "s3cr3t-internal"], {})  # no public token
    assert backend.role == "backend" and backend.tokens == ()
    assert "s3cr3t-internal" not in repr(backend)  # the internal token stays out of logs
    with pytest.raises(ValueError, match="internal-token"):
        load_config(["--role", "backend"], {})
    with pytest.raises(ValueError, match="--backend"):
        load_config(["--role", "frontend", "--token", "t", "--internal-token", "i"], {})


def test_frontend_routing_settings_and_their_env_twins() -> None:
    base = ["--role", "frontend", "--token", "t", "--internal-token", "i"]
    cfg = load_config([*base, "--backend-dns", "backends.ns.svc:8001", "--backend-check-s", "0.5",
                       "--backend-eject-after", "5"], {})
    assert (cfg.backends, cfg.backend_dns, cfg.backend_check_s, cfg.backend_eject_after) == \
        ((), "backends.ns.svc:8001", 0.5, 5)  # DNS alone is enough
    env = {"COSYSERVE_BACKEND_DNS": "b:1", "COSYSERVE_BACKEND_CHECK_S": "3", "COSYSERVE_BACKEND_EJECT_AFTER": "2"}
    cfg = load_config(base, env)
    assert (cfg.backend_dns, cfg.backend_check_s, cfg.backend_eject_after) == ("b:1", 3.0, 2)
    assert load_config([*base, "--backend", "http://a:1"], {}).backend_check_s == 2.0
    for bad in (["--backend-dns", "nohost"], ["--backend-dns", "b:1", "--backend-check-s", "0"],
                ["--backend-dns", "b:1", "--backend-eject-after", "0"]):
        with pytest.raises(ValueError):
            load_config([*base, *bad], {})


def test_tokens_never_show_in_the_configs_repr() -> None:
    # the tokens were in repr(ServerConfig): any log line or traceback showing the config showed them
    cfg = ServerConfig(tokens=("tok-secret-1", "tok-secret-2"), internal_token="int-secret")
    assert "secret" not in repr(cfg) and "secret" not in str(cfg)


def test_flow_steps_flag_and_its_bounds() -> None:
    assert load_config(["--token", "x", "--flow-steps", "5"], {}).flow_steps == 5
    assert ServerConfig().flow_steps == 0  # upstream's 10 unless asked
    with pytest.raises(ValueError, match="flow_steps"):
        ServerConfig(flow_steps=-1)


def test_llm_int8_is_opt_in() -> None:
    assert ServerConfig().llm_int8 == 0
    assert load_config(["--token", "x", "--llm-int8", "1"], {}).llm_int8 == 1
    with pytest.raises(SystemExit):
        load_config(["--token", "x", "--llm-int8", "2"], {})
