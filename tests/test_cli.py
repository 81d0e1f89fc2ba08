"""Options: flags, FEDBLOCK_* variables and YAML; one-line errors with exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from fedblock.common.cli import main, make_parser, parse_configs
from fedblock.common.config import ConfigError, parse_bytes, parse_rate

ROOT = Path(__file__).resolve().parent.parent


def configs(argv, env=None):
    args = make_parser().parse_args(argv)
    return parse_configs(args.command, args, env or {})


def test_flags_beat_env_beat_yaml_beat_defaults(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("rounds: 7\nlocal-steps: 3\nlr: 0.5\nstate_dir: /tmp/s\n")
    (c,) = configs(["coordinator", "--model", "m", "--config", str(yaml_file), "--lr", "0.25", "--insecure"],
                   {"FEDBLOCK_LOCAL_STEPS": "9"})
    assert (c.rounds, c.local_steps, c.lr, str(c.state_dir)) == (7, 9, 0.25, "/tmp/s")
    assert c.algorithm == "parablock" and c.depth == 1 and c.chunk_size == 1 << 20


def test_units_and_derived_values():
    (c,) = configs(["coordinator", "--model", "m", "--state-dir", "s", "--chunk-size", "256KiB", "--algorithm", "fedbcd",
                    "--insecure"])
    assert c.chunk_size == 256 * 1024 and c.depth == 0
    assert parse_bytes("20MB") == 20_000_000 and parse_bytes("1MiB") == 1 << 20
    assert parse_rate("20MB/s") == 20_000_000 and parse_rate("100Mbit/s") == 12_500_000


@pytest.mark.parametrize(
    "argv,message",
    [
        (["coordinator", "--state-dir", "s"], "--model is required"),
        (["coordinator", "--model", "m", "--state-dir", "s", "--rounds", "0"], "--rounds must be >= 1"),
        (["coordinator", "--model", "m", "--state-dir", "s", "--rounds", "many"], "--rounds: invalid literal"),
        (["coordinator", "--model", "m", "--state-dir", "s", "--codec", "gzip"], "--codec: unknown codec stage"),
        (["coordinator", "--model", "m", "--state-dir", "s", "--listen", "nowhere"], "--listen: expected HOST:PORT"),
        (["coordinator", "--model", "m", "--state-dir", "s", "--min-updates", "3", "--clients-per-round", "2"], "exceeds"),
        (["worker", "--coordinator", "h:1", "--name", "bad name", "--data", "d"], "--name must be"),
        (["worker", "--coordinator", "h:1", "--name", "a", "--data", "d", "--device", "tpu"], "unknown device"),
        (["simulate", "--data", "d", "--split", "zipf"], "--split must be iid or dirichlet:ALPHA"),
    ],
)
def test_invalid_values_are_one_clear_error(argv, message):
    with pytest.raises(ConfigError, match=message):
        configs(argv)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        configs(["coordinator", "--config", str(bad)])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("rondus: 3\n")
    with pytest.raises(ConfigError, match="unknown option 'rondus'"):
        configs(["coordinator", "--model", "m", "--state-dir", "s", "--config", str(unknown)])


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["worker", "--coordinator", "localhost:1", "--name", "a", "--data", "/no/such.jsonl"], "no such"),
        (["coordinator", "--model", "/no/such/model", "--state-dir", "/tmp/x", "--insecure"], "does not exist"),
        (["coordinator", "--model", "m", "--state-dir", "/tmp/x"], "plaintext grpc needs --insecure"),
        (["coordinator", "--model", "m", "--state-dir", "/tmp/x", "--tls-cert", "/no/cert.pem", "--tls-key", "/no/k"],
         "--tls-cert: no such file"),
        (["worker", "--coordinator", "h:1", "--name", "a", "--data", "d", "--insecure", "--tls-ca", "/x"], "contradicts"),
        (["coordinator", "--model", "m", "--state-dir", "s", "--rounds", "-1"], "--rounds must be >= 1"),
        (["worker", "--frobnicate"], "unrecognized arguments"),
        (["export", "--state-dir", "/no/such/dir", "--out", "/tmp/x"], "not a fedblock state dir"),
    ],
)
def test_cli_prints_one_line_and_exits_2(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_:
        code = main(argv)
        raise SystemExit(code)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0].lower(), err
    assert err[0].startswith("fedblock")


def test_console_script_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fedblock.common.cli", "worker", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--coordinator" in out.stdout and "FEDBLOCK" not in out.stderr


def test_packages_install_under_fedblock_only(tmp_path):
    code = "import importlib.util as u; print([u.find_spec(n) is not None for n in ('fedblock.server', 'fedblock.client', 'fedblock.common', 'server', 'client', 'common')])"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[True, True, True, False, False, False]", out.stderr


def test_generated_stubs_are_current():
    out = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_a_worker_that_fails_does_not_linger(tmp_path, data_file):
    """--linger serves /metrics only after a run that finished: a worker that cannot join exits 1 at
    once, so that a restart policy brings it back (here well before its minute of lingering)."""
    import os

    from fedblock.common.simulate import free_port

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "fedblock.common.cli", "worker", "--coordinator", f"127.0.0.1:{free_port()}",
         "--name", "w", "--data", str(data_file), "--insecure", "--connect-timeout", "1",
         "--metrics-port", str(free_port()), "--linger", "60"],
        capture_output=True, text=True, timeout=50, env=env)
    assert done.returncode == 1 and "serving /metrics" not in done.stderr, done.stderr
