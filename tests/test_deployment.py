"""Deployment: the files in deploy/, and one real round over flower-superlink + two
flower-supernode processes on 127.0.0.1 with TLS and SuperNode authentication."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from roundkit import fake_generate, make_coordinator, make_site

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
ROUND_LIMIT_S = 240


def _tool(name: str) -> str | None:
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"port {port} never opened:\n{log.read_text()[-3000:]}")


def test_systemd_units_are_sandboxed_to_their_home() -> None:
    for unit, home in (("synthfed-node.service", "/var/lib/synthfed-node"),
                       ("synthfed-superlink.service", "/var/lib/synthfed-coordinator")):
        text = (DEPLOY / "systemd" / unit).read_text()
        settings = [line.strip() for line in text.splitlines() if "=" in line
                    and not line.lstrip().startswith("#")]
        for required in ("User=synthfed", "ProtectSystem=strict", f"ReadWritePaths={home}",
                         "NoNewPrivileges=true", "PrivateTmp=true", "ProtectHome=true",
                         "CapabilityBoundingSet="):
            assert required in settings, (unit, required)
        assert [s for s in settings if s.startswith("ReadWritePaths=")] == [
            f"ReadWritePaths={home}"]
        assert "--insecure" not in text


def test_superlink_unit_requires_tls_and_node_authentication() -> None:
    text = (DEPLOY / "systemd" / "synthfed-superlink.service").read_text()
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile",
                 "--enable-supernode-auth", "--disable-runtime-dependency-installation"):
        assert flag in text


def test_example_node_yaml_and_policy_load_with_the_real_loaders() -> None:
    from node.config import NodeConfig
    from protocols.policy import load_policy
    from protocols.typed import load_yaml_config

    config = load_yaml_config(NodeConfig, str(DEPLOY / "examples" / "node.yaml"))
    assert config.policy.reviewer_signatures_required == 1
    assert len(config.policy.coordinator_key) == 64
    policy = load_policy(DEPLOY / "examples" / "policy.json")
    assert policy.required_reviewer_signatures == 1 and not policy.allow_demo_auto_approved


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    for tool in ("openssl", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed; make-certs.sh needs it")
    out = tmp_path / "tls"
    subprocess.run([str(DEPLOY / "make-certs.sh"), str(out), "127.0.0.1", "site-a", "site-b"],
                   check=True, capture_output=True, timeout=60)
    return out


def test_make_certs_makes_a_verifying_chain_and_private_keys_0600(certs: Path) -> None:
    proc = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"),
                           str(certs / "superlink.crt")], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(": OK")
    for key in ("ca.key", "superlink.key", "nodes/site-a", "nodes/site-b"):
        assert (certs / key).stat().st_mode & 0o777 == 0o600, key
    assert (certs / "nodes" / "site-a.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    again = subprocess.run([str(DEPLOY / "make-certs.sh"), str(certs), "127.0.0.1", "site-a"],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "keeping existing CA" in again.stderr


def test_one_round_over_tls_with_supernode_authentication(tmp_path: Path, certs: Path) -> None:
    tools = {n: _tool(n) for n in ("flower-superlink", "flower-supernode", "flwr",
                                   "flower-superexec")}
    missing = [n for n, p in tools.items() if p is None]
    if missing:
        pytest.skip(f"Flower binaries missing: {', '.join(missing)}")
    from coordinator.pool import build_pool, load_pool
    from coordinator.rounds import load_round, open_round
    from node.config import load_node_config
    from node.export import approve_bundle

    coord = make_coordinator(tmp_path)
    sites = [make_site(tmp_path, name, coord) for name in ("site-a", "site-b")]
    handle = open_round(coord, "CT", 64, 3)
    state = handle.state()
    # Each site generated ahead for this round and its reviewer approved: the daemon adopts
    # the approved export (the transport under test here, not the generator).
    for site in sites:
        pending = fake_generate(site.paths, load_node_config(site.paths), 3, 7,
                                state["round_id"], state["nonce"])
        approve_bundle(site.paths, pending, site.reviewer)

    port = _free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(tmp_path / "flwr"), "PYTHONPATH": str(REPO)}
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], log: Path, extra_env: dict | None = None) -> subprocess.Popen:
        handle_out = open(log, "wb")
        proc = subprocess.Popen(cmd, stdout=handle_out, stderr=subprocess.STDOUT,
                                env={**env, **(extra_env or {})}, cwd=tmp_path,
                                start_new_session=True)
        procs.append(proc)
        return proc

    try:
        link_log = tmp_path / "superlink.log"
        link = start([tools["flower-superlink"], "--ssl-ca-certfile", str(certs / "ca.crt"),
                      "--ssl-certfile", str(certs / "superlink.crt"),
                      "--ssl-keyfile", str(certs / "superlink.key"),
                      "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                      "--host", "127.0.0.1", "--port", str(port)], link_log)
        _wait_for_port(port, link, link_log)
        (tmp_path / "flwr").mkdir(exist_ok=True)
        (tmp_path / "flwr" / "config.toml").write_text(
            '[superlink]\ndefault = "synthfed"\n\n[superlink.synthfed]\n'
            f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n')
        for name in ("site-a", "site-b"):
            reg = subprocess.run([tools["flwr"], "supernode", "register",
                                  str(certs / "nodes" / f"{name}.pub"), "synthfed"],
                                 env=env, capture_output=True, text=True, timeout=60)
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout
        for i, site in enumerate(sites):
            start([tools["flower-supernode"], "--superlink", f"127.0.0.1:{port}",
                   "--root-certificates", str(certs / "ca.crt"),
                   "--auth-supernode-private-key", str(certs / "nodes" / site.name),
                   "--node-config", f'home="{site.paths.root}"', "--port", str(_free_port())],
                  tmp_path / f"supernode-{i}.log",
                  {"FLWR_HOME": str(tmp_path / f"flwr-node-{i}")})
        started = time.monotonic()
        run = subprocess.run(
            [tools["flwr"], "run", str(DEPLOY / "flwr-app"), "synthfed", "--stream",
             "--run-config", f'coordinator-home="{coord.root}" round-id="{handle.round_id}" '
             'node-wait-s=60.0'],
            env=env, capture_output=True, text=True, timeout=ROUND_LIMIT_S, cwd=tmp_path)
        elapsed = time.monotonic() - started
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    sites_state = load_round(coord, handle.round_id).state()["sites"]
    assert {s: e["state"] for s, e in sites_state.items()} == {
        "site-a": "verified", "site-b": "verified"}, json.dumps(sites_state)[:2000]
    assert [e["via"] for e in sites_state.values()] == ["flower", "flower"]
    images, index, manifest = load_pool(build_pool(coord, handle.round_id))
    assert images.shape == (6, 64, 64) and len(manifest["bundles"]) == 2
    assert elapsed < ROUND_LIMIT_S
