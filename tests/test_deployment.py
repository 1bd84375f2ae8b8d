"""Deployment: certificates and node keys, compose file structure, and (marked e2e) a real loopback stack."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # deployment/ is not an installed package: run from the checkout
    sys.path.insert(0, str(ROOT))

from deployment import certs  # noqa: E402

DOMAINS = ["garden", "kitchen", "outdoor"]


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> certs.Material:
    return certs.make_certs(tmp_path_factory.mktemp("secrets"), DOMAINS,
                            ["127.0.0.1", "localhost", "superlink", "::1"])


# ---------------------------------------------------------------------------------------------- certificates


def test_chain_and_sans(material):
    ca = x509.load_pem_x509_certificate(material.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(material.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink"}
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_server_key_matches_certificate(material):
    server = x509.load_pem_x509_certificate(material.server_cert.read_bytes())
    key = serialization.load_pem_private_key(material.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_private_keys_are_owner_only(material):
    for path in [material.ca_key, material.server_key, *(k for k, _ in material.node_keys.values())]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in [material.ca_cert, material.server_cert, *(p for _, p in material.node_keys.values())]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_node_keys_load_the_way_flower_loads_them(material):
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` runs

    for domain, (priv, pub) in material.node_keys.items():
        key = serialization.load_ssh_private_key(priv.read_bytes(), None)  # what flower-supernode runs
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert pub.read_text().strip().endswith(f"mergerec-{domain}")
        assert key.public_key().public_numbers() == certs.load_node_public_key(pub).public_numbers()
        assert try_load_public_key(pub)
    pubs = {p.read_text().split()[1] for _, p in material.node_keys.values()}
    assert len(pubs) == len(DOMAINS)


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_tls_handshake_verifies_against_ca(material, name):
    """A real TLS handshake on loopback: the client trusts only ca.crt and checks the host name."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(material.server_cert, material.server_key)
    client_ctx = ssl.create_default_context(cafile=str(material.ca_cert))
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        errors: list[BaseException] = []

        def serve():
            conn, _ = srv.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.recv(2) == b"ok"
        t.join(5)
        assert not errors


def test_wrong_host_name_is_rejected(material):
    client_ctx = ssl.create_default_context(cafile=str(material.ca_cert))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(material.server_cert, material.server_key)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]

        def serve():
            conn, _ = srv.accept()
            try:
                server_ctx.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                pass

        threading.Thread(target=serve, daemon=True).start()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                client_ctx.wrap_socket(raw, server_hostname="not-the-superlink.example")


def test_idempotent_add_domain_and_force(tmp_path):
    m1 = certs.make_certs(tmp_path, ["a", "b"], ["127.0.0.1"])
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    m2 = certs.make_certs(tmp_path, ["a", "b", "c"], ["127.0.0.1"])
    assert sorted(p.name for p in m2.written) == ["c.key", "c.pub"]
    assert all(p.read_bytes() == data for p, data in before.items())
    m3 = certs.make_certs(tmp_path, ["a", "b", "c"], ["127.0.0.1"], force=True)
    assert len(m3.written) == 4 + 6
    assert all(p.read_bytes() != data for p, data in before.items())
    assert m1.out == m3.out


def test_mismatched_hosts_need_force(tmp_path):
    certs.make_certs(tmp_path, ["a"], ["127.0.0.1"])
    with pytest.raises(certs.CertError, match="--force"):
        certs.make_certs(tmp_path, ["a"], ["127.0.0.1", "superlink"])
    certs.make_certs(tmp_path, ["a"], ["127.0.0.1", "superlink"], force=True)


def test_recreated_ca_invalidates_old_server_cert(tmp_path):
    certs.make_certs(tmp_path, ["a"], ["127.0.0.1"])
    (tmp_path / "ca.crt").unlink()
    with pytest.raises(certs.CertError, match="--force"):
        certs.make_certs(tmp_path, ["a"], ["127.0.0.1"])


def test_keys_only(tmp_path):
    m = certs.make_certs(tmp_path, ["silo"], keys_only=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["silo.key", "silo.pub"]
    assert certs.load_node_private_key(m.node_keys["silo"][0]).curve.name == "secp384r1"


def test_bad_domain_names(tmp_path):
    with pytest.raises(ValueError):
        certs.make_certs(tmp_path, ["../etc"], ["127.0.0.1"])
    with pytest.raises(ValueError):
        certs.make_certs(tmp_path, ["a", "a"], ["127.0.0.1"])


def test_cli(tmp_path, capsys):
    assert certs.main(["--out", str(tmp_path / "s"), "--domains", "x,y", "--hosts", "127.0.0.1,superlink"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert certs.main(["--out", str(tmp_path / "s"), "--domains", "x,y", "--hosts", "127.0.0.1,superlink"]) == 0
    assert "wrote" not in capsys.readouterr().out
    assert certs.main(["--out", str(tmp_path / "s"), "--domains", "x", "--hosts", "10.0.0.1"]) == 1


def test_cli_reports_written_and_kept_files_exactly(tmp_path, capsys):
    out = tmp_path / "s"
    assert certs.main(["--out", str(out), "--domains", "x", "--hosts", "127.0.0.1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(ln.split()[0] for ln in lines) == ["wrote"] * 6
    assert certs.main(["--out", str(out), "--domains", "x,y", "--hosts", "127.0.0.1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(Path(ln.split()[1]).name for ln in lines if ln.startswith("wrote")) == ["y.key", "y.pub"]
    assert sorted(Path(ln.split()[1]).name for ln in lines if ln.startswith("kept")) == [
        "ca.crt", "ca.key", "server.key", "server.pem", "x.key", "x.pub"]


@pytest.mark.parametrize("name", ["ca.key", "server.key", "a.key"])
def test_kept_private_key_readable_by_others_is_fixed_with_a_warning(tmp_path, capsys, name):
    certs.make_certs(tmp_path, ["a"], ["127.0.0.1"])
    os.chmod(tmp_path / name, 0o644)
    m = certs.make_certs(tmp_path, ["a"], ["127.0.0.1"])
    assert m.fixed == [tmp_path / name] and m.written == []
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert f"private key {tmp_path / name} had mode 644" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- local stack


def test_run_config_and_node_config_formatting():
    from deployment.local import format_run_config, node_config

    assert format_run_config(None) is None
    assert format_run_config("epochs=1") == "epochs=1"
    assert format_run_config({"epochs": 2, "lr": 0.5, "run-dir": "/x y", "flag": True}) == \
        'epochs=2 lr=0.5 run-dir="/x y" flag=true'
    assert node_config("garden", Path("/data/garden")) == 'domain="garden" data-path="/data/garden"'


def test_marker_scan_finds_only_marked_processes():
    """deployment.procs.marked_pids: a run id finds its processes and those of run ids below it, nothing else."""
    import subprocess

    from deployment.procs import MARKER, marked_pids

    env = dict(os.environ, **{MARKER: "unit-test-marker"})
    sleep = [sys.executable, "-c", "import time; time.sleep(30)"]
    p = subprocess.Popen(sleep, env=env)
    child = subprocess.Popen(sleep, env={**env, MARKER: "unit-test-marker/child"})
    other = subprocess.Popen(sleep, env={**env, MARKER: "unit-test-marker-2"})
    try:
        assert marked_pids("unit-test-marker") == sorted([p.pid, child.pid])
        assert marked_pids("unit-test-marker/child") == [child.pid]
        assert marked_pids("another-marker") == []
    finally:
        for q in (p, child, other):
            q.kill()
            q.wait()
    assert marked_pids("unit-test-marker") == []


def test_check_artifacts_reports_problems(tmp_path):
    import json

    from deployment.check_artifacts import check

    assert check(tmp_path, ["a"]) == [f"{tmp_path / 'report.json'} is missing"]
    (tmp_path / "report.json").write_text(json.dumps({
        "active": ["a"], "dropped": [],
        "metrics": {"a": {"mergerec-task": {"values": {"ndcg@10": 0.5}}, "ties": {"values": {"ndcg@10": 1.5}}}}}))
    problems = check(tmp_path, ["a"])
    assert any("ties/ndcg@10" in p for p in problems)
    assert any("task vector of a" in p for p in problems)
    assert any("model.safetensors" in p for p in problems) and any("report.md" in p for p in problems)


@pytest.mark.e2e
@pytest.mark.slow
def test_e2e_smoke_app_on_tls_and_node_auth_stack(tmp_path):
    """Real processes on loopback: SuperLink (TLS, node auth) + 3 registered SuperNodes; an unregistered key
    is refused; a killed SuperNode takes its children with it and comes back under the same node id; the smoke
    app then reaches all three domains; nothing is left running afterwards."""
    import signal
    import time

    from deployment.local import SMOKE_APP, start_stack
    from deployment.procs import group_members, marked_pids
    from faults import kill_supernode, restart_supernode, superlink_healthy

    domains = ["garden", "kitchen", "outdoor"]
    t0 = time.monotonic()
    with start_stack(domains, run_dir=tmp_path / "stack", timeout=90) as stack:
        started = time.monotonic() - t0
        assert set(stack.node_ids) == set(domains)
        assert superlink_healthy(stack)

        code, log = stack.try_unregistered_node(timeout=60)
        assert code not in (None, 0), log
        assert "Failed to activate SuperNode" in log
        assert "No SuperNode found with the given public key" in (stack.logs / "superlink.log").read_text()

        # SIGTERM: the SuperNode deactivates itself, so it may come back at once (after SIGKILL the SuperLink
        # refuses the key until the node's heartbeat expires, ~60 s: restart_supernode retries through that)
        kitchen = stack.procs["supernode-kitchen"]
        kill_supernode(stack, "kitchen", sig=signal.SIGTERM)
        assert not kitchen.alive
        assert group_members(kitchen.popen.pid) == []  # its SuperExec and ClientApps went with it
        assert restart_supernode(stack, "kitchen", timeout=60) < 30
        assert f"SuperNode ID: {stack.node_ids['kitchen']}" in stack.procs["supernode-kitchen"].output()
        assert stack.procs["supernode-kitchen"] is not kitchen and stack.procs["supernode-kitchen"].offset > 0
        res = stack.run_app(SMOKE_APP, run_config={"min-nodes": 3, "expect-domains": ",".join(domains)},
                            timeout=180)
        assert res.ok, f"{res.status}: {res.details}\n{stack.log_tails()}"
        run_log = res.log.read_text()
        assert "SMOKE-OK domains=garden,kitchen,outdoor" in run_log
        for d in domains:
            assert f"SMOKE node {stack.node_ids[d]} domain={d} data-files={d}.txt" in run_log

        stack_id = stack.id
    assert marked_pids(stack_id) == []
    print(f"\nstack start {started:.1f} s, smoke run {res.elapsed_s:.1f} s, total {time.monotonic() - t0:.1f} s, "
          f"timings {stack.timings}")


# ---------------------------------------------------------------------------------------------- compose file

# Keys the compose specification allows (the subset a strict linter knows); anything else is a typo.
_SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "env_file", "volumes", "ports", "expose",
    "networks", "depends_on", "healthcheck", "restart", "init", "container_name", "hostname", "cap_drop",
    "cap_add", "security_opt", "user", "working_dir", "read_only", "tmpfs", "stop_signal", "stop_grace_period",
    "labels", "logging", "deploy", "ulimits", "shm_size", "profiles",
}
_TOP_KEYS = {"version", "services", "networks", "volumes", "secrets", "configs"}


@pytest.fixture(scope="module")
def compose():
    import yaml

    from deployment.compose import COMPOSE

    return yaml.safe_load(COMPOSE.read_text())


def _split_volume(v: str) -> tuple[str, str, str]:
    """source, target, mode of a short-syntax volume whose source may hold ${VAR:-default}."""
    if v.rsplit(":", 1)[-1] in ("ro", "rw"):
        src, dst, mode = v.rsplit(":", 2)
        return src, dst, mode
    src, dst = v.rsplit(":", 1)
    return src, dst, "rw"


def test_compose_is_generated_from_federation_toml():
    from deployment.compose import COMPOSE, load, render

    assert COMPOSE.read_text() == render(load()), "run: python -m deployment.compose --write"


def test_compose_keys_are_known(compose):
    assert set(compose) - {k for k in compose if k.startswith("x-")} <= _TOP_KEYS
    for name, svc in compose["services"].items():
        assert set(svc) <= _SERVICE_KEYS, f"{name}: unknown keys {set(svc) - _SERVICE_KEYS}"
        hc = svc.get("healthcheck", {})
        assert set(hc) <= {"test", "interval", "timeout", "retries", "start_period", "disable"}


def test_compose_services_tls_auth_and_isolation(compose):
    from deployment.compose import load

    fed = load()
    services = compose["services"]
    assert set(services) == {"superlink"} | {f"supernode-{d}" for d in fed.domains}
    assert set(compose["networks"]) == {"federation"}
    for name, svc in services.items():
        assert svc["init"] is True and svc["restart"] == "on-failure", name
        assert svc["networks"] == ["federation"], name
        assert svc["image"] == fed.image
        assert "--insecure" not in svc["command"], name
        assert ("ports" in svc) == (name == "superlink"), f"{name}: only the SuperLink publishes a port"
    sl = services["superlink"]
    assert {"--ssl-ca-certfile=/certs/ca.crt", "--ssl-certfile=/certs/server.pem",
            "--ssl-keyfile=/certs/server.key", "--enable-supernode-auth", "--port=8000"} <= set(sl["command"])
    assert len(sl["ports"]) == 1 and sl["ports"][0].endswith(":8000")
    assert "healthcheck" in sl and "/health" in " ".join(sl["healthcheck"]["test"])
    for d in fed.domains:
        svc = services[f"supernode-{d}"]
        cmd = svc["command"]
        assert cmd[0] == "flower-supernode"
        assert "--superlink=superlink:8000" in cmd and "--root-certificates=/certs/ca.crt" in cmd
        assert "--auth-supernode-private-key=/keys/node.key" in cmd
        assert f'--node-config=domain="{d}" data-path="/data/{d}"' in cmd
        assert svc["depends_on"]["superlink"]["condition"] == "service_healthy"
        vols = [_split_volume(v) for v in svc["volumes"]]
        assert {(src.rsplit("/", 1)[-1], dst, mode) for src, dst, mode in vols} == {
            ("ca.crt", "/certs/ca.crt", "ro"), (f"{d}.key", "/keys/node.key", "ro"), (d, f"/data/{d}", "ro")}
        others = set(fed.domains) - {d}
        assert not any(o in v for o in others for v in svc["volumes"]), f"{d} mounts another domain's files"
        assert not any("server.key" in v or "ca.key" in v for v in svc["volumes"])


def test_compose_adding_a_domain(tmp_path):
    import yaml

    from deployment.compose import load, render

    fed = tmp_path / "federation.toml"
    fed.write_text('domains = ["garden", "books"]\nsuperlink_port = 9555\n')
    doc = yaml.safe_load(render(load(fed)))
    assert set(doc["services"]) == {"superlink", "supernode-garden", "supernode-books"}
    assert "./secrets}/books.key:/keys/node.key:ro" in " ".join(doc["services"]["supernode-books"]["volumes"])
    assert "9555}:8000" in doc["services"]["superlink"]["ports"][0]
    fed.write_text('domains = ["Bad Name"]\n')
    with pytest.raises(ValueError):
        load(fed)


def test_compose_real_linter_where_installed():
    """docker-compose 1.29.2 `config -q` (`make compose-lint` installs it into .venv-lint)."""
    import shutil
    import subprocess

    from deployment.compose import COMPOSE

    exe = ROOT / ".venv-lint" / "bin" / "docker-compose"
    exe = str(exe) if exe.exists() else shutil.which("docker-compose")
    if not exe:
        pytest.skip("docker-compose not installed (make compose-lint installs it); structural checks above ran")
    r = subprocess.run([exe, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------- containers


def _podman_ready() -> str | None:
    """Why the container test cannot run here, or None."""
    import shutil
    import subprocess

    if not shutil.which("podman"):
        return "podman is not installed (deployment/podman/setup.sh installs it)"
    from deployment.containers import Containers, compose_bin

    try:
        compose_bin()
    except SystemExit as exc:
        return str(exc)
    c = Containers(ROOT / ".cache" / "isolation-test")
    if subprocess.run(["podman", "image", "exists", c.image], env=c.env).returncode != 0:
        return f"image {c.image} not built (python -m deployment.containers build)"
    if c.containers():
        return f"containers of the compose project are running: {c.containers()}"
    return None


@pytest.mark.e2e
@pytest.mark.slow
def test_container_cannot_read_another_domains_data(tmp_path):
    """Two SuperNode containers from compose.yaml: each lists its own /data/<domain> and no other domain's."""
    reason = _podman_ready()
    if reason and os.environ.get("MERGEREC_REQUIRE_CONTAINERS"):
        pytest.fail(f"MERGEREC_REQUIRE_CONTAINERS is set but {reason}")
    if reason:
        pytest.skip(reason)
    from deployment.containers import Containers

    c = Containers(tmp_path / "work", port=None)
    c.prepare(demo=True)
    garden, kitchen = c.fed.domains[:2]
    try:
        c.compose("up", "-d", "--no-deps", f"supernode-{garden}", f"supernode-{kitchen}")
        own = c.podman("exec", f"supernode-{garden}", "ls", f"/data/{garden}", check=False)
        assert own.returncode == 0 and "train.json" in own.stdout
        other = c.podman("exec", f"supernode-{garden}", "ls", f"/data/{kitchen}", check=False)
        assert other.returncode != 0 and "No such file or directory" in other.stderr
        assert c.podman("exec", f"supernode-{kitchen}", "cat", f"/data/{garden}/train.json",
                        check=False).returncode != 0
        assert c.podman("exec", f"supernode-{garden}", "touch", f"/data/{garden}/x", check=False).returncode != 0
        problems = [p for p in c.isolation() if f"supernode-{c.fed.domains[2]}" not in p]
        assert problems == []
    finally:
        assert c.down() == []
