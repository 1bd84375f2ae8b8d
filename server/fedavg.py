"""Federated averaging (FedAvg, FedProx) in the same ServerApp: the multi-round alternative to one-shot merging,
and the hybrid that starts its rounds from the merged model (run-config `strategy = "fedavg"`).

Round r sends the global model theta_{r-1} to every silo (FedRoundRequest, "train.round"). Each silo scores it on
the validation items of its held-out users (the seeded `val-max-users` subsample, which no round trains on) and
trains it `fedavg-epochs` epochs on every other user's train + validation items (FedProx: + mu/2 ||theta -
theta_{r-1}||^2), and sends back the weight update and how many users it trained on. The new global model is
theta_r = theta_{r-1} + sum_d n_d * update_d / sum_d n_d over the silos that answered (a silo that fails is retried,
then dropped, and the round completes with the others, renormalised). After the last round one validation-only
call scores theta_R. The round shipped is the one with the best mean held-out validation NDCG@10 (round 0 is the
starting model: with `fedavg-init = merged` it is the best merged candidate on the same validation, so the
hybrid is never worse than its start on it).

Every global model is stored (rounds/<r>.safetensors, recorded) and the state is checkpointed after every round:
a server that is killed resumes after the last completed round; silos keep nothing between rounds.

Why not Flower's own FedAvg strategy (flwr.serverapp.strategy.FedAvg): it drives its own message flow (its
"train" messages, records and weighting keys), while this project's contract is one pydantic header plus named
array groups per message, validated completely before anything is stored, with retries, drops, a per-round
checkpoint and resume, and every recorded message checked for user data. The aggregation itself is the few lines
below.
"""

from __future__ import annotations

import logging
import time

import torch

from common.merging.task_vectors import state_from_numpy, state_to_numpy
from common.protocol.messages import FED_ROUND, FedRoundReply, FedRoundRequest
from server.base import BaseContext
from server.checkpoint import Checkpoint, FedAvgState, FedRound
from server.run_dir import RunDir
from server.silo_caller import SiloCaller
from server.validation import check_round

log = logging.getLogger("server.pipeline")


def average(global_state: dict[str, torch.Tensor], updates: dict[str, dict[str, torch.Tensor]],
            users: dict[str, int]) -> dict[str, torch.Tensor]:
    """theta + sum_d n_d * update_d / sum_d n_d (the FedAvg step), over the silos in `updates`."""
    total = sum(users[d] for d in updates)
    if total <= 0:
        raise ValueError("no silo trained on any user this round")
    return {n: t + sum(updates[d][n] * (users[d] / total) for d in sorted(updates)) for n, t in global_state.items()}


def model_name(cfg) -> str:
    """The evaluation name of the model FedAvg ships: "fedavg" (from the base) or "hybrid" (from the merge)."""
    return "hybrid" if cfg.fedavg.init == "merged" else "fedavg"


def mean_ndcg(val: dict[str, dict]) -> float | None:
    vals = [m["values"]["ndcg@10"] for m in val.values()]
    return sum(vals) / len(vals) if vals else None


class FedAvg:
    def __init__(self, cfg, run: RunDir, state: Checkpoint, base: BaseContext, calls: SiloCaller):
        self.cfg, self.run, self.state, self.base, self.calls = cfg, run, state, base, calls

    # ------------------------------------------------------------------ one call
    def _call(self, r: int, model: dict[str, torch.Tensor], epochs: int) -> dict:
        """Send theta to every active silo for round r (epochs 0: validation only); returns domain -> Outcome of
        the silos that answered with a valid reply (the others retried, then dropped)."""
        f = self.cfg.fedavg
        train = self.cfg.train.model_copy(update={"freeze": list(f.freeze)})
        req = FedRoundRequest(base=self.base.spec, train=train, round=r, epochs=epochs, prox_mu=f.prox_mu)
        arrays = {"model": state_to_numpy(model)}

        def validate(d, o):
            check_round(o.header, o.arrays, domain=d, base_fp=self.base.fingerprint, round_=r, epochs=epochs,
                        shapes=self.base.shapes, base_norm=self.base.norm, max_ratio=self.cfg.max_task_vector_ratio,
                        users=self.base.users.get(d))

        return self.calls.ask("fedavg", FED_ROUND, {d: (req, arrays) for d in self.state.active()}, FedRoundReply,
                              validate)

    def _validate(self, r: int, model: dict[str, torch.Tensor]) -> dict[str, dict]:
        return {d: o.header.val.model_dump() for d, o in self._call(r, model, 0).items()}

    # ------------------------------------------------------------------ the stage
    def _start(self, merged: dict[str, dict[str, torch.Tensor]] | None) -> tuple[FedAvgState, dict]:
        """(state, theta_0): resume after the last stored round when its model is intact, else start from the base
        or (hybrid) from the merged candidate with the best held-out validation."""
        st = self.state.fedavg
        if st is not None and st.rounds and self.run.intact(self.state, self.run.round(st.rounds[-1].round)):
            log.info("fedavg: resuming after round %d", st.rounds[-1].round)
            return st, self.run.read_tensors(self.run.round(st.rounds[-1].round))
        if self.cfg.fedavg.init == "base" or not merged:
            st, theta, val = FedAvgState(init="base"), dict(self.base.state), {}
        else:
            scores = {name: self._validate(0, s) for name, s in merged.items()}
            name = max(scores, key=lambda n: (mean_ndcg(scores[n]) or -1.0, -list(merged).index(n)))
            log.info("fedavg: starting from %s (held-out validation NDCG@10 %s)", name,
                     ", ".join(f"{n} {mean_ndcg(v):.4f}" for n, v in scores.items()))
            st, theta, val = FedAvgState(init=name, init_val={n: mean_ndcg(v) for n, v in scores.items()}), \
                merged[name], scores[name]
        st.rounds = [FedRound(round=0, val=val)]
        self.state.fedavg = st
        self.run.write_tensors(self.state, self.run.round(0), theta)
        self.run.save(self.state)
        return st, theta

    def run_stage(self, merged: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        """R rounds (see the module docstring); `merged`: the merged candidates a hybrid may start from."""
        f = self.cfg.fedavg
        st, theta = self._start(merged)
        for r in range(st.rounds[-1].round + 1, f.rounds + 1):
            t0 = time.perf_counter()
            got = self._call(r, theta, f.local_epochs)
            st.rounds[-1].val.update({d: o.header.val.model_dump() for d, o in got.items()})
            updates = {d: state_from_numpy(o.arrays["update"]) for d, o in got.items()}
            users = {d: o.header.users for d, o in got.items()}
            theta = average(theta, updates, users)
            self.run.write_tensors(self.state, self.run.round(r), theta)
            st.rounds.append(FedRound(round=r, users=users, loss={d: o.header.loss for d, o in got.items()},
                                      seconds={d: round(o.header.seconds, 2) for d, o in got.items()},
                                      up={d: o.bytes_up for d, o in got.items()},
                                      down={d: o.bytes_down for d, o in got.items()}))
            self.run.save(self.state)
            log.info("fedavg: round %d/%d with %s in %.1fs; held-out validation NDCG@10 of round %d: %s", r, f.rounds,
                     ", ".join(f"{d} ({users[d]} users)" for d in sorted(users)), time.perf_counter() - t0, r - 1,
                     _fmt(mean_ndcg(st.rounds[-2].val)))
        if not st.rounds[-1].val:
            st.rounds[-1].val = self._validate(st.rounds[-1].round, theta)
        scored = [x for x in st.rounds if x.val]
        st.chosen = max(scored, key=lambda x: (mean_ndcg(x.val), -x.round)).round
        self.run.save(self.state)
        log.info("fedavg: shipping round %d of %d (held-out validation NDCG@10 %s)", st.chosen, f.rounds,
                 _fmt(mean_ndcg(st.rounds[st.chosen].val)))

    # ------------------------------------------------------------------ results
    def round_model(self, r: int) -> dict[str, torch.Tensor]:
        return self.run.read_tensors(self.run.round(r))

    def candidates(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"fedavg" or "hybrid": the chosen round's model} once the stage ran, else {}."""
        st = self.state.fedavg
        if self.cfg.strategy != "fedavg" or st is None or st.chosen is None:
            return {}
        return {model_name(self.cfg): self.round_model(st.chosen)}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
