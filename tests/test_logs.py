"""Console logging of the apps: progress lines pass, third-party request lines (httpx posting the streamed
log, one per post) do not."""

from __future__ import annotations

import logging

from common.core.logs import QUIET, setup_logging


def test_request_chatter_is_dropped_progress_kept(caplog):
    setup_logging()
    with caplog.at_level(logging.INFO):
        logging.getLogger("httpx").info('HTTP Request: POST http://127.0.0.1:1/v1/runtime/push-logs "200 OK"')
        logging.getLogger("httpx").warning("connection reset")
        logging.getLogger("common.model.train").info("garden: epoch 1 loss 5.1 val NDCG@10 0.05")
    assert "push-logs" not in caplog.text
    assert "connection reset" in caplog.text and "epoch 1 loss" in caplog.text
    assert all(logging.getLogger(n).level == logging.WARNING for n in QUIET)
    assert logging.getLogger().level == logging.INFO
