"""What makes `flwr run .` work on a fresh clone without preparation: silos generate the missing demo domains
under the default data root, and the ServerApp with min-nodes = 0 follows the federation's size."""

from __future__ import annotations

import pytest

from clients.client_app import silo_location
from common.data.demo import DEFAULT_ROOT, ensure_demo
from server.server_app import wait_for_nodes


def test_ensure_demo_writes_missing_domains_once(tmp_path):
    made = ensure_demo(tmp_path, ["garden", "kitchen"])
    assert [p.name for p in made] == ["garden", "kitchen"] and (tmp_path / "kitchen" / "test.json").exists()
    assert ensure_demo(tmp_path, ["garden", "kitchen"]) == []
    with pytest.raises(ValueError, match="not demo domains"):
        ensure_demo(tmp_path, ["Beauty"])


def test_simulated_silo_generates_demo_data_only_at_the_default_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    domain, data, _ = silo_location({"partition-id": 1}, {"domains": "garden,outdoor"})
    assert domain == "outdoor" and (tmp_path / DEFAULT_ROOT / "outdoor" / "smap.json").exists()
    assert not (tmp_path / DEFAULT_ROOT / "garden").exists()
    silo_location({"partition-id": 0}, {"domains": "garden", "data-root": str(tmp_path / "mine")})
    assert not (tmp_path / "mine").exists()  # a user's own data root is never filled with demo data


class _Grid:
    def __init__(self, counts):
        self.counts = list(counts)

    def get_node_ids(self):
        n = self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
        return list(range(n))


def test_min_nodes_zero_follows_the_federation(monkeypatch):
    monkeypatch.setattr("server.server_app.time.sleep", lambda s: None)
    # one per domain when they all come
    assert len(wait_for_nodes(_Grid([0, 1, 3]), 0, 60.0, domains=3, settle_s=1000)) == 3
    # a federation of 2 for 3 domains: go on once the count is stable
    assert len(wait_for_nodes(_Grid([2]), 0, 60.0, domains=3, settle_s=0.0)) == 2
    # an explicit min-nodes waits for that many
    assert len(wait_for_nodes(_Grid([1, 2, 4]), 4, 60.0, domains=3, settle_s=0.0)) == 4
