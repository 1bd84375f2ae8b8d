"""Flower ClientApp: one per domain silo. Thin: decode -> SiloWorker -> encode (see clients/silo.py).

Where the silo's data is:
- deployment: `flower-supernode --node-config 'domain="beauty" data-path="/data/beauty"'`
  (optional `state-path`: where the silo keeps its fine-tuned model; default .cache/silo-state/<domain>;
  optional `base-path`: this node's copy of the base checkpoint when it is not at the run config's path;
  optional `eval-max-users`, `eval-budget`, `eval-epsilon`: the silo's evaluation policy,
  common/protocol/eval_policy.py; the run config's values of these keys do not apply to a deployed silo)
- simulation: node_config has only partition-id; run_config `domains` (comma list) maps partition i to
  domains[i] and `data-root` holds one folder per domain; the evaluation policy is the run config's
  `eval-max-users`, `eval-budget`, `eval-epsilon` (one operator runs every simulated silo).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from clients.silo import SiloWorker
from common.data.format import DOMAIN_FILES, DataError
from common.data.demo import DEFAULT_ROOT as DEMO_ROOT, ensure_demo
from common.core.logs import setup_logging
from common.protocol.eval_policy import EvalBudgetError, EvalPolicy
from common.protocol.run_options import RunOptions
from common.protocol.messages import (
    EVALUATE,
    FED_ROUND,
    FINETUNE,
    HANDSHAKE,
    TEACHER,
    WEAVE,
    TUNE_GATES,
    BUDGET_ERROR_CODE,
    CONTRACT_ERROR_CODE,
    DATA_ERROR_CODE,
    INTERNAL_ERROR_CODE,
    ContractError,
    EvaluateRequest,
    FedRoundRequest,
    FinetuneRequest,
    GateTuneRequest,
    HandshakeRequest,
    SiloReplyError,
    TeacherRequest,
    WeaveRequest,
    decode,
    encode,
    error_text,
)

log = logging.getLogger(__name__)
app = ClientApp()
ERRORS_LOG = "errors.log"  # in the silo's state folder: the full text of its failures, never in a console log

_ROUTES = {
    HANDSHAKE: (HandshakeRequest, "handshake"),
    FINETUNE: (FinetuneRequest, "finetune"),
    TEACHER: (TeacherRequest, "teacher"),
    EVALUATE: (EvaluateRequest, "evaluate"),
    WEAVE: (WeaveRequest, "weave"),
    TUNE_GATES: (GateTuneRequest, "tune_gates"),
    FED_ROUND: (FedRoundRequest, "fed_round"),
}
_WITH_ARRAYS = {"evaluate", "weave", "tune_gates", "fed_round"}  # handlers whose requests carry array groups (models)
_workers: dict[tuple, SiloWorker] = {}


def silo_location(node_config: dict, run_config: dict) -> tuple[str, Path, Path | None]:
    """(domain, data path, state path) of this node, from deployment or simulation configuration."""
    if "domain" in node_config:
        if "data-path" not in node_config:
            raise ContractError("node-config has 'domain' but no 'data-path'")
        domain = str(node_config["domain"])
        state = node_config.get("state-path")
        return domain, Path(str(node_config["data-path"])), Path(str(state)) if state else None
    if "partition-id" in node_config:
        opts = RunOptions.from_run_config(run_config)
        pid = int(node_config["partition-id"])
        if pid >= len(opts.domains):
            raise ContractError(f"partition {pid} has no domain: run-config domains = {opts.domains}")
        domain, state_root = opts.domains[pid], opts.silo_state_root
        if opts.data_root == Path(DEMO_ROOT):  # the demo default: generate what is missing
            for made in ensure_demo(opts.data_root, [domain]):
                log.info("demo domain written to %s", made)
        return domain, opts.data_root / domain, state_root / domain if state_root else None
    raise ContractError("node-config must set domain and data-path (or run in simulation)")


def silo_policy(node_config: dict, run_config: dict) -> EvalPolicy:
    """The silo's evaluation policy: its node-config in deployment (the server's run config has no say), the run
    config in simulation. A bad value is a ContractError naming the key."""
    try:
        return EvalPolicy.from_config(node_config if "domain" in node_config else run_config)
    except ValueError as exc:
        raise ContractError(str(exc)) from None


def worker_for(node_config: dict, run_config: dict, run_id=None) -> SiloWorker:
    """This node's SiloWorker (kept across messages); `run_id`: Flower's, the run its evaluation budget counts."""
    domain, data, state = silo_location(node_config, run_config)
    policy = silo_policy(node_config, run_config)
    key = (domain, str(data), str(state), policy.model_dump_json())
    if key not in _workers:
        cache = RunOptions.from_run_config(run_config).cache_dir
        base = node_config.get("base-path")  # this node's copy of the base checkpoint, if not at the config's path
        _workers[key] = SiloWorker(domain, data, state, cache, base=base, policy=policy)
    if run_id is not None:
        _workers[key].run_key = f"run-{run_id}"
    return _workers[key]


def handle(worker: SiloWorker, message_type: str, content):
    """Decode a request, run the silo method, encode the reply (a flwr RecordDict)."""
    if message_type not in _ROUTES:
        raise ContractError(f"unexpected message type {message_type!r}")
    req_type, method = _ROUTES[message_type]
    header, arrays = decode(content, req_type)
    if method in _WITH_ARRAYS:
        reply, out_arrays = getattr(worker, method)(header, arrays)
    else:
        if arrays:
            raise ContractError(f"{message_type} carries no arrays, got {sorted(arrays)}")
        reply, out_arrays = getattr(worker, method)(header)
    return encode(reply, out_arrays)


def _data_file(exc: DataError) -> str:
    """The data file a DataError is about (its message starts with the path), or a generic phrase."""
    head = str(exc).split(": ", 1)[0]
    name = Path(head).name
    return name if name in DOMAIN_FILES else "the silo's data"


def _detail(worker: SiloWorker | None, message_type: str) -> str:
    """Append the current exception's full text and traceback to the silo's own errors.log (its state folder,
    on the silo's side; never the run directory, whose flwr-run.log holds every simulated ClientApp's console).
    Returns where it went, for the console line."""
    if worker is None:
        return "nowhere: the silo has no state folder yet"
    import traceback
    from datetime import datetime, timezone

    path = worker.state_dir / ERRORS_LOG
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{datetime.now(timezone.utc).isoformat()} {message_type}\n{traceback.format_exc()}\n")
    except OSError:
        return "nowhere: the silo's state folder is not writable"
    return str(path)


def safe_handle(get_worker, message_type: str, content):
    """`handle`, with every failure turned into a SiloReplyError of a code and its fixed text (`error_text`).
    DataError messages quote user keys and sequences, and any exception may: the console line (which simulation
    writes into the run directory's flwr-run.log) names only the category, the file or exception type and where
    the full text went (`_detail`)."""
    domain, worker = "?", None
    try:
        worker = get_worker()
        domain = worker.domain
        return handle(worker, message_type, content)
    except DataError as exc:
        log.error("silo %s: data error in %s on %s (details in %s)", domain, _data_file(exc), message_type,
                  _detail(worker, message_type))
        code = DATA_ERROR_CODE
    except EvalBudgetError as exc:  # a ContractError: caught first, so that it has its own code
        log.error("silo %s: refused %s: %s", domain, message_type, exc)
        code = BUDGET_ERROR_CODE
    except ContractError as exc:  # its text names what in the request was wrong, never user data
        log.error("silo %s: rejected %s: %s", domain, message_type, exc)
        code = CONTRACT_ERROR_CODE
    except Exception as exc:
        log.error("silo %s: internal error (%s) in %s (details in %s)", domain, type(exc).__name__, message_type,
                  _detail(worker, message_type))
        code = INTERNAL_ERROR_CODE
    raise SiloReplyError(code, error_text(code))


def in_process_endpoint(worker: SiloWorker):
    """The callable an InProcessTransport calls for this silo: the same error handling as the ClientApp."""
    return lambda message_type, content: safe_handle(lambda: worker, message_type, content)


def _serve(msg: Message, context: Context) -> Message:
    setup_logging()  # this silo's progress lines (fine-tuning epochs, ...) at INFO, request chatter at WARNING
    get = lambda: worker_for(dict(context.node_config), dict(context.run_config),  # noqa: E731
                             getattr(context, "run_id", None))
    try:
        return Message(content=safe_handle(get, msg.metadata.message_type, msg.content), reply_to=msg)
    except SiloReplyError as exc:
        return Message(error=Error(code=exc.code, reason=exc.reason), reply_to=msg)


# one handler serves every message type; Flower needs each registered under its own action name
for _message_type in _ROUTES:
    _kind, _action = _message_type.split(".")
    getattr(app, _kind)(_action)(_serve)
