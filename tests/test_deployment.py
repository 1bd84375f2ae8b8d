"""Deployment: certificates and node keys, compose file structure, and (marked e2e) a real loopback stack."""

from __future__ import annotations

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


# ---------------------------------------------------------------------------------------------- local stack


def test_run_config_and_node_config_formatting():
    from deployment.local import format_run_config, node_config

    assert format_run_config(None) is None
    assert format_run_config("epochs=1") == "epochs=1"
    assert format_run_config({"epochs": 2, "lr": 0.5, "run-dir": "/x y", "flag": True}) == \
        'epochs=2 lr=0.5 run-dir="/x y" flag=true'
    assert node_config("garden", Path("/data/garden")) == 'domain="garden" data-path="/data/garden"'


def test_marker_scan_finds_only_marked_processes():
    import os
    import subprocess

    from deployment.local import MARKER, marked_pids

    env = dict(os.environ, **{MARKER: "unit-test-marker"})
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    try:
        assert marked_pids("unit-test-marker") == [p.pid]
        assert marked_pids("another-marker") == []
    finally:
        p.kill()
        p.wait()
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
    assert any("merged.safetensors" in p for p in problems)


@pytest.mark.e2e
@pytest.mark.slow
def test_e2e_smoke_app_on_tls_and_node_auth_stack(tmp_path):
    """Real processes on loopback: SuperLink (TLS, node auth) + 3 registered SuperNodes; an unregistered key
    is refused; a killed SuperNode takes its children with it and comes back under the same node id; the smoke
    app then reaches all three domains; nothing is left running afterwards."""
    import signal
    import time

    from deployment.local import SMOKE_APP, group_members, start_stack

    domains = ["garden", "kitchen", "outdoor"]
    t0 = time.monotonic()
    with start_stack(domains, run_dir=tmp_path / "stack", timeout=90) as stack:
        started = time.monotonic() - t0
        assert set(stack.node_ids) == set(domains)
        assert stack.healthy()

        code, log = stack.try_unregistered_node(timeout=60)
        assert code not in (None, 0), log
        assert "Failed to activate SuperNode" in log
        assert "No SuperNode found with the given public key" in (stack.logs / "superlink.log").read_text()

        # SIGTERM: the SuperNode deactivates itself, so it may come back at once (after SIGKILL the SuperLink
        # refuses the key until the node's heartbeat expires, ~60 s: restart_supernode retries through that)
        kitchen = stack.procs["supernode-kitchen"]
        stack.kill_supernode("kitchen", sig=signal.SIGTERM)
        assert not kitchen.alive
        assert group_members(kitchen.popen.pid) == []  # its SuperExec and ClientApps went with it
        assert stack.restart_supernode("kitchen", timeout=60) < 30
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
    from deployment.local import marked_pids

    assert marked_pids(stack_id) == []
    print(f"\nstack start {started:.1f} s, smoke run {res.elapsed_s:.1f} s, total {time.monotonic() - t0:.1f} s, "
          f"timings {stack.timings}")
