"""Stage 1 (local fine-tuning in a silo) and full-ranking evaluation. Runs inside the silo only.

Loss: cross-entropy over cosine / tau against the next item, either over the domain's full item softmax or
over in-batch candidates. A causal backbone (light) is trained on every position of each training sequence
at once (next item at each step); the text backbone on (train[:-1] -> train[-1]) per user, with the full
item table re-encoded without gradient once per epoch (as Recformer-style training does on CPU budgets).
By default the most recent input item is left out of the training softmax unless it is the target
(`TrainConfig.mask_current_item`): a text model's nearest neighbour of an item is the item itself, and
without the mask much of the early gradient only pushes histories away from their own last item. With
`seen_items="exclude"` (the default) the softmax leaves out every item of the input so far instead (except the
target), consistent with an evaluation that does not rank a user's history (common/model/metrics.py).

Training on validation items (`TrainConfig.selection`). Real Amazon data drift over time (popularity ranks
val items ~30% better than test items), and the validation item is each user's most recent interaction before
the test one: without it, fine-tuning gains on validation may not reach test (docs/benchmarks.md). Two ways:
- "refit": early stopping on the validation item picks the epoch count E; the model is then retrained from its
  starting weights for E epochs on each user's train sequence plus their validation item (`refit_on_val`).
- "held-out-users": one run on train + validation items of every user except a seeded subsample of
  `val_max_users` users, whose validation items alone score the epochs; the best epoch's weights are final.
- "continue": the held-out-users run, then `continue_epochs` (1) more epochs from the best epoch's weights on
  every user's train + validation items, so the held-out users' validation items are learned too (the final fit
  costs one epoch instead of E).
Either way that is the model a silo evaluates on test and sends. Test items are never trained on.

Negatives (`TrainConfig.negatives`): "full" scores every item of the domain at every position; "sampled" the
target plus `num_negatives` items drawn uniformly per batch, with the log(N / num_negatives) correction that
makes the sampled normaliser an unbiased estimate of the full one (on 18k items about 6x faster per epoch).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from common.model.backbones import ITEM_MLP, DomainInputs, Recommender, encode_all_items, pad_histories, shared_state
from common.model.config import MIN_USERS_FOR_METRICS, TrainConfig, resolve_device
from common.data.format import SiloData
from common.model.metrics import DEFAULT_KS, RankingAccumulator, SeenItems, ranks_excluding_seen, target_ranks

log = logging.getLogger(__name__)


@dataclass
class FineTuneResult:
    """Final weights (the best epoch's, or the refit's) and aggregate numbers only: safe to report, the
    weights are what the silo sends as a task vector."""

    state: dict[str, torch.Tensor]
    val: dict[str, float]
    history: list[dict] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    best_epoch: int = 0  # the epoch early stopping chose (0: none beat the starting weights)
    refit_epochs: int = 0  # epochs of the final fit on train + val (0: no refit; `state` is the best epoch's)
    dp: dict | None = None  # DP fine-tuning: the guarantee and how it was reached (DPPlan.summary), else None


def _subsample(n: int, k: int | None, seed: int) -> torch.Tensor:
    if k is None or k >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


def _user_sequences(silo: SiloData, max_users: int | None, seed: int, with_val: bool = False,
                    held_out: frozenset[int] = frozenset(), skip: frozenset[int] = frozenset()):
    """(user index into silo.users, item sequence) of every user fine-tuning trains on: the seeded `max_users`
    subsample, less the users in `skip` (DP: the held-out validation users are not trained on), less the users
    whose sequence is shorter than two items. with_val: each user's validation item is appended to their train
    sequence (the final fit), except for the users in `held_out`, whose validation items score the epochs."""
    for u in _subsample(len(silo.train), max_users, seed).tolist():
        if u in skip:
            continue
        seq = silo.train[u]
        if with_val and u not in held_out and silo.users[u] in silo.val:
            seq = [*seq, silo.val[silo.users[u]]]
        if len(seq) >= 2:
            yield u, seq


def _training_rows(silo: SiloData, causal: bool, max_items: int, max_users: int | None, seed: int,
                   with_val: bool = False, held_out: frozenset[int] = frozenset(), skip: frozenset[int] = frozenset()):
    """(inputs, targets) per training example: one row per user of `_user_sequences` (causal: targets per
    position)."""
    rows = []
    for _, seq in _user_sequences(silo, max_users, seed, with_val, held_out, skip):
        if causal:
            seq = seq[-(max_items + 1) :]
            rows.append((seq[:-1], seq[1:]))
        else:
            rows.append((seq[:-1][-max_items:], [seq[-1]]))
    return rows


def _length_buckets(rows, batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffled batches of rows with similar input length (little padding): random order, stable sort by
    length, cut into batches, shuffle the batches."""
    order = torch.randperm(len(rows), generator=gen).tolist()
    order.sort(key=lambda i: len(rows[i][0]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def _sampled_candidates(dom: DomainInputs, num: int, device) -> tuple[torch.Tensor, float]:
    """`num` item ids drawn uniformly without replacement (torch's global RNG, seeded per run), shared by the
    batch, and the log-weight each sampled non-target item carries in the softmax's normaliser: log(N / num),
    so that the sampled sum estimates the sum over all N items without bias (0 when every item is drawn)."""
    neg = torch.randperm(dom.num_items, device=device)[:num]
    return neg, math.log(dom.num_items / num)


def _batch_loss(model: Recommender, dom: DomainInputs, rows, cfg: TrainConfig, item_table, device,
                shared=None) -> torch.Tensor:
    """Mean cross-entropy of the next item over one batch of rows (see the module docstring).

    negatives="full": softmax over every item of the domain; "inbatch": over the batch's distinct targets;
    "sampled": over the target plus `cfg.num_negatives` items drawn uniformly for the batch (accidental hits
    masked, each sampled logit shifted by log(N / num_negatives)); with num_negatives >= N it is the full
    softmax exactly. 1/tau scales the queries, not the [P, N] logits (one pass fewer over the big matrix).
    `shared` (sampled negatives): (ids, embeddings, log-weight) drawn once for several calls (a DP step's users)."""
    inputs = pad_histories([r[0] for r in rows], model.cfg.max_items).to(device)
    if model.causal:
        targets = pad_histories([r[1] for r in rows], model.cfg.max_items).to(device)
        out = model(dom, "positions", inputs)
        valid = inputs >= 0
        queries, tgt = out[valid], targets[valid]
        if cfg.seen_items == "exclude":  # each position's whole prefix: [P, L] item ids, -1 beyond it
            upto = torch.ones(inputs.shape[1], inputs.shape[1], dtype=torch.bool, device=device).tril()
            seen = torch.where(upto, inputs.unsqueeze(1), torch.full_like(inputs.unsqueeze(1), -1))[valid]
        else:
            seen = inputs[valid].unsqueeze(1)
    else:
        queries = model(dom, "histories", inputs)
        tgt = torch.tensor([r[1][0] for r in rows], device=device)
        seen = inputs if cfg.seen_items == "exclude" else inputs[:, -1:]
    if cfg.seen_items == "rank" and not cfg.mask_current_item:
        seen = seen[:, :0]
    queries = queries / cfg.tau
    if cfg.negatives == "sampled" and cfg.num_negatives < dom.num_items:
        return _sampled_loss(model, dom, queries, tgt, seen, cfg, device, shared)
    if cfg.negatives == "inbatch":
        cands, tgt = torch.unique(tgt, return_inverse=True)
        items = model(dom, "items", cands)
        pos = torch.searchsorted(cands, seen.clamp_min(0)).clamp_max(len(cands) - 1)
        seen = torch.where((seen >= 0) & (cands[pos] == seen), pos, -1)  # not among the candidates: no mask
    else:
        items = item_table if item_table is not None else model(dom, "items", torch.arange(dom.num_items, device=device))
    logits = queries @ items.T
    # an item already seen is the nearest text neighbour of itself; unless it is the target, leave it out of the
    # softmax instead of teaching the model to move away from it
    r, c = _masked(seen, tgt)
    logits[r, seen[r, c]] = float("-inf")  # in place: mm's backward needs its inputs, not its output
    return F.cross_entropy(logits, tgt)


def _masked(seen: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the entries of `seen` [P, S] (item ids, -1 = none) to leave out of position p's
    softmax: every seen item but the position's own target."""
    return torch.nonzero((seen >= 0) & (seen != tgt.unsqueeze(1)), as_tuple=True)


def _sampled_loss(model: Recommender, dom: DomainInputs, queries, tgt, seen, cfg: TrainConfig, device,
                  shared=None):
    """Sampled softmax: column 0 is each position's target, then the batch's shared uniform negatives.
    queries [P, d] already divided by tau; tgt [P] item ids; seen [P, S] item ids left out (-1 = none);
    shared: (negative ids, their embeddings, log-weight) drawn by the caller (`shared_negatives`), else drawn here."""
    if shared is None:
        neg, log_weight = _sampled_candidates(dom, cfg.num_negatives, device)
        emb = model(dom, "items", torch.cat([tgt, neg]))
        pos_emb, neg_emb = emb[: len(tgt)], emb[len(tgt):]
    else:
        neg, neg_emb, log_weight = shared
        pos_emb = model(dom, "items", tgt)
    pos_logit = (queries * pos_emb).sum(-1)
    neg_logits = queries @ neg_emb.T
    # column of each item among the negatives (-1 = not drawn): O(P) lookups instead of [P, M] comparisons
    column = torch.full((dom.num_items,), -1, dtype=torch.long, device=device)
    column[neg] = torch.arange(len(neg), device=device)
    rows = torch.arange(len(tgt), device=device)
    drop = [(rows, column[tgt])]  # the target drawn as a negative: counted once, as the positive
    r, c = _masked(seen, tgt)
    drop.append((r, column[seen[r, c]]))
    for r, c in drop:
        hit = c >= 0
        neg_logits[r[hit], c[hit]] = float("-inf")  # in place: mm's backward needs its inputs, not its output
    # -log softmax of the positive over [positive, negatives + log_weight], without building that [P, 1 + M]
    # matrix: the shift by log_weight moves the negatives' logsumexp by exactly log_weight
    return (torch.logaddexp(pos_logit, torch.logsumexp(neg_logits, dim=1) + log_weight) - pos_logit).mean()


@torch.no_grad()
def evaluate(
    model: Recommender,
    dom: DomainInputs,
    histories: list[list[int]],
    targets: list[int],
    *,
    ks=DEFAULT_KS,
    batch_size: int = 256,
    max_users: int | None = None,
    seed: int = 0,
    progress: bool = False,
    item_embeddings: torch.Tensor | None = None,
    seen_items: SeenItems = "exclude",
) -> dict[str, float]:
    """Full ranking over every item of the domain (`seen_items`: a user's history items left out, or ranked too;
    common/model/metrics.py); aggregate Recall@k / NDCG@k only.

    item_embeddings: [N, d] the model's own item embeddings when already known (e.g. an untrained text
    encoder's are the cached item-text embeddings); computed here otherwise."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    items = encode_all_items(model, dom) if item_embeddings is None else item_embeddings.to(device)
    if items.shape[0] != dom.num_items:
        raise ValueError(f"{dom.domain}: {items.shape[0]} item embeddings for {dom.num_items} items")
    keep = _subsample(len(histories), max_users, seed).tolist()
    keep.sort(key=lambda i: min(len(histories[i]), model.cfg.max_items))  # similar lengths batch together
    acc = RankingAccumulator(ks)
    gen = torch.Generator().manual_seed(seed)
    for s in tqdm(range(0, len(keep), batch_size), disable=not progress, desc=f"eval {dom.domain}", leave=False):
        idx = keep[s : s + batch_size]
        hist = pad_histories([histories[i] for i in idx], model.cfg.max_items).to(device)
        scores = (model(dom, "histories", hist) @ items.T).cpu()
        tg = torch.tensor([targets[i] for i in idx])
        if seen_items == "exclude":
            acc.add(ranks_excluding_seen(scores, tg, [histories[i] for i in idx], gen))
        else:
            acc.add(target_ranks(scores, tg, gen))
    model.train(was_training)
    return acc.result()


def evaluate_split(model: Recommender, silo: SiloData, dom: DomainInputs, split: str, **kw) -> dict[str, float]:
    histories, targets = silo.eval_split(split)
    return evaluate(model, dom, histories, targets, **kw)


def popularity_metrics(silo: SiloData, split: str, *, ks=DEFAULT_KS, seed: int = 0,
                       seen_items: SeenItems = "exclude") -> dict[str, float]:
    """Baseline: rank items by their training interaction count (ties broken at random)."""
    counts = torch.as_tensor(silo.interaction_counts(), dtype=torch.float32)
    histories, targets = silo.eval_split(split)
    acc = RankingAccumulator(ks)
    gen = torch.Generator().manual_seed(seed)
    t = torch.tensor(targets)
    for s in range(0, len(t), 1024):
        chunk, scores = t[s : s + 1024], counts.expand(len(t[s : s + 1024]), -1).clone()
        acc.add(ranks_excluding_seen(scores, chunk, histories[s : s + 1024], gen) if seen_items == "exclude"
                else target_ranks(scores, chunk, gen))
    return acc.result()


def _anchor(model: Recommender, cfg: TrainConfig) -> dict[str, torch.Tensor] | None:
    """The starting weights L2-SP pulls toward (None when `cfg.l2sp` is 0)."""
    if not cfg.l2sp:
        return None
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def l2sp_penalty(model: Recommender, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum over trained parameters of ||theta - theta_start||^2 (the L2-SP regulariser, before its weight)."""
    return sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in anchor)


def _full_tables(model: Recommender, doms, cfg: TrainConfig) -> list[torch.Tensor | None]:
    """Per domain, the whole catalog's item embeddings (no grad) that the text backbone's full softmax scores
    against for an epoch; None per domain otherwise (the loss embeds the items it needs itself)."""
    if model.causal or cfg.negatives != "full":
        return [None] * len(doms)
    return [encode_all_items(model, d).detach() for d in doms]


def _run_epoch(model: Recommender, rows, doms, cfg: TrainConfig, opt, sched, gen, device, desc: str,
               anchor: dict[str, torch.Tensor] | None = None) -> tuple[float, int]:
    """One pass over every domain's rows (each batch from one domain). Returns (mean loss, steps); the mean
    loss is the recommendation loss alone (without the L2-SP term)."""
    model.train()
    tables = _full_tables(model, doms, cfg)
    batches = [(t, b) for t, r in enumerate(rows) for b in _length_buckets(r, cfg.batch_size, gen)]
    if len(rows) > 1:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    if cfg.max_steps_per_epoch:
        batches = batches[: cfg.max_steps_per_epoch]
    total = 0.0
    bar = tqdm(batches, disable=None if cfg.progress else True, desc=desc, leave=False)
    for t, b in bar:
        loss = _batch_loss(model, doms[t], [rows[t][i] for i in b], cfg, tables[t], device)
        opt.zero_grad(set_to_none=True)
        (loss + cfg.l2sp * l2sp_penalty(model, anchor) if anchor is not None else loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        value = loss.item()
        total += value
        bar.set_postfix(loss=f"{value:.3f}")
    return total / max(1, len(batches)), len(batches)


def shared_negatives(model: Recommender, dom: DomainInputs, cfg: TrainConfig, device):
    """One draw of sampled negatives and their embeddings (graph kept) for all users of a DP step: each user's
    backward pass then reuses the item tower's forward instead of recomputing it (None unless negatives=sampled
    draws fewer than every item)."""
    if cfg.negatives != "sampled" or cfg.num_negatives >= dom.num_items:
        return None
    neg, log_weight = _sampled_candidates(dom, cfg.num_negatives, device)
    return neg, model(dom, "items", neg), log_weight


def _run_dp_epoch(model: Recommender, rows, dom: DomainInputs, cfg: TrainConfig, opt, sched, device, desc: str,
                  plan) -> tuple[float, int]:
    """One epoch of user-level DP-SGD (common/model/dp.py): `plan.steps_per_epoch` steps, each over a Poisson
    sample of the rows (one row per user), per-user clipping, Gaussian noise. Returns (mean sampled-user loss,
    steps)."""
    from common.model.dp import noisy_step

    model.train()
    table = _full_tables(model, [dom], cfg)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    bar = tqdm(range(plan.steps_per_epoch), disable=None if cfg.progress else True, desc=desc, leave=False)
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        shared = shared_negatives(model, dom, cfg, device)
        step_losses, _ = noisy_step(plan, params, len(rows),
                                    lambda i: _batch_loss(model, dom, [rows[i]], cfg, table, device, shared))
        opt.step()
        sched.step()
        losses += step_losses
    return sum(losses) / max(1, len(losses)), plan.steps_per_epoch


def warmup_steps(cfg: TrainConfig, rows: list[list]) -> int:
    """Linear warm-up length: `cfg.warmup_steps`, but never longer than one epoch (the batches of every
    domain's `rows`). A small silo, or a user subsample, must still train at the configured lr."""
    per_epoch = sum(math.ceil(len(r) / cfg.batch_size) for r in rows)
    if cfg.max_steps_per_epoch:
        per_epoch = min(per_epoch, cfg.max_steps_per_epoch)
    return min(cfg.warmup_steps, per_epoch)


#: parameter-name prefixes no silo trains (the server fits them: common/model/tower_fit.py)
SERVER_FITTED = (ITEM_MLP,)


def _optimiser(model: Recommender, cfg: TrainConfig, rows: list[list]):
    """AdamW over every parameter not frozen by `cfg.freeze` (frozen ones get requires_grad False). A model with
    LoRA factors attached (common/model/lora.py) trains only those factors: everything else stays at the base.
    The item adaptor's MLP residual (`adaptor_mlp`) is never trained here: the server fits it when merging
    (common/model/tower_fit.py), so in every task vector it is zero."""
    from common.model.lora import is_lora_param

    names = [n for n, _ in model.named_parameters()]
    for prefix in cfg.freeze:
        if not any(n.startswith(prefix) for n in names):
            raise ValueError(f"freeze: no parameter name starts with {prefix!r}")
    lora = any(is_lora_param(n) for n in names)
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(SERVER_FITTED) and not any(n.startswith(prefix) for prefix in cfg.freeze)
                         and (not lora or is_lora_param(n)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    warm = max(1, warmup_steps(cfg, rows))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
    return opt, sched


def held_out_users(silo: SiloData, cfg: TrainConfig) -> list[int]:
    """Indices into silo.users of the validation users early stopping scores: a seeded subsample of
    `cfg.val_max_users` of the users with a validation item (all of them when it is None), in user order.
    With DP and a `max_users` subsample they are drawn from the users outside it (DP never trains on them, so the
    subsample keeps its size), unless fewer than MIN_USERS_FOR_METRICS are left there."""
    with_val = [i for i, u in enumerate(silo.users) if u in silo.val]
    if cfg.dp_epsilon is not None and cfg.max_users is not None:
        trained = set(_subsample(len(silo.train), cfg.max_users, cfg.seed).tolist())
        outside = [i for i in with_val if i not in trained]
        if len(outside) >= MIN_USERS_FOR_METRICS:
            with_val = outside
    return [with_val[i] for i in _subsample(len(with_val), cfg.val_max_users, cfg.seed).tolist()]


def _dp_skip(silo: SiloData, cfg: TrainConfig) -> frozenset[int]:
    """Users (indices into silo.users) never trained on: with DP, the held-out validation users (their data picks
    the epoch, outside the accounted training); none otherwise."""
    return frozenset(held_out_users(silo, cfg)) if cfg.dp_epsilon is not None else frozenset()


def trained_users(silo: SiloData, causal: bool, cfg: TrainConfig) -> list[int]:
    """Indices into silo.users of the users fine-tuning trains on (the final fit's rows: every user's train +
    validation items, less the users DP leaves out). These are the members a membership-inference attack targets."""
    return [u for u, _ in _user_sequences(silo, cfg.max_users, cfg.seed, with_val=True, skip=_dp_skip(silo, cfg))]


def _selection_data(silo: SiloData, model: Recommender, cfg: TrainConfig):
    """(training rows, (validation histories, targets), validation subsample size) for one silo.
    'refit': train items only, validation on a seeded subsample drawn at evaluation time; 'held-out-users' and
    'continue': train + validation items except for the held-out users, validated on exactly those users (with
    DP, the held-out users are not trained on at all)."""
    if cfg.selection == "refit":
        rows = _training_rows(silo, model.causal, model.cfg.max_items, cfg.max_users, cfg.seed)
        return rows, silo.eval_split("val"), cfg.val_max_users
    held = held_out_users(silo, cfg)
    rows = _training_rows(silo, model.causal, model.cfg.max_items, cfg.max_users, cfg.seed, with_val=True,
                          held_out=frozenset(held), skip=_dp_skip(silo, cfg))
    return rows, ([list(silo.train[u]) for u in held], [silo.val[silo.users[u]] for u in held]), None


def _as_lists(silo, dom) -> tuple[list[SiloData], list[DomainInputs], str]:
    silos = silo if isinstance(silo, list) else [silo]
    doms = dom if isinstance(dom, list) else [dom]
    return silos, doms, "+".join(s.domain for s in silos)


def chosen_epoch(history: list[dict]) -> int:
    """The epoch early stopping keeps: the earliest with the highest validation NDCG@10 (0 = the starting
    weights). `history` rows are {"epoch": int, "val_ndcg@10": float, ...}, as `FineTuneResult.history`."""
    return max(history, key=lambda h: (h["val_ndcg@10"], -h["epoch"]))["epoch"]


def _start(model: Recommender, cfg: TrainConfig) -> torch.device:
    """Seed, then move `model` to the configured device (the first lines of every training run)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(device)
    return device


def refit(model: Recommender, silo: SiloData | list[SiloData], dom: DomainInputs | list[DomainInputs],
          cfg: TrainConfig, epochs: int, held_out: frozenset[int] = frozenset(), dp=None) -> tuple[int, float]:
    """Train `model` in place for exactly `epochs` epochs on each user's train sequence followed by their
    validation item (no validation, nothing restored): the final fit once early stopping has chosen the
    epoch count. Seeded on its own, so it gives the same weights whether or not a selection run came first.
    `held_out` (one silo: indices into silo.users): users whose validation item is not trained on.
    `dp` (one silo): the DP plan of the selection run; its epochs continue that run's sampling and accounting, and
    the held-out validation users are left out. Returns (steps, seconds)."""
    silos, doms, name = _as_lists(silo, dom)
    t0 = time.perf_counter()
    device = _start(model, cfg)
    skip = _dp_skip(silos[0], cfg) if dp is not None else frozenset()
    rows = [_training_rows(s, model.causal, model.cfg.max_items, cfg.max_users, cfg.seed, with_val=True,
                           held_out=held_out, skip=skip) for s in silos]
    opt, sched = _optimiser(model, cfg, rows)
    anchor = _anchor(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = 0
    for epoch in range(1, epochs + 1):
        desc = f"{name} refit epoch {epoch}/{epochs}"
        if dp is not None:
            loss, n = _run_dp_epoch(model, rows[0], doms[0], cfg, opt, sched, device, desc, dp)
        else:
            loss, n = _run_epoch(model, rows, doms, cfg, opt, sched, gen, device, desc, anchor)
        steps += n
        log.info("%s: refit on train + val, epoch %d/%d loss %.4f", name, epoch, epochs, loss)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return steps, time.perf_counter() - t0


@dataclass
class RoundResult:
    """One federated round at a silo: aggregates only (the weights stay in the model)."""

    val: dict[str, float]  # the received model on the held-out users' validation items
    users: int  # users whose sequences were trained on (the FedAvg weight)
    loss: float | None
    seconds: float


def local_round(model: Recommender, silo: SiloData, dom: DomainInputs, cfg: TrainConfig, epochs: int,
                round_: int = 0) -> RoundResult:
    """A silo's part of one FedAvg / FedProx round, in place: score the received model on the validation items of
    the held-out users (`held_out_users`: the same seeded users every round, never trained on), then train it
    `epochs` epochs on every other user's train + validation items (each round reseeded: cfg.seed + round_;
    FedProx: `cfg.l2sp` pulls toward the received weights, which are the starting weights)."""
    t0 = time.perf_counter()
    held = held_out_users(silo, cfg)
    histories, targets = [list(silo.train[u]) for u in held], [silo.val[silo.users[u]] for u in held]
    device = _start(model, cfg)
    val = evaluate(model, dom, histories, targets, batch_size=cfg.eval_batch_size, seed=cfg.seed,
                   seen_items=cfg.seen_items)
    if epochs == 0:
        return RoundResult(val, 0, None, time.perf_counter() - t0)
    round_cfg = cfg.model_copy(update={"seed": cfg.seed + round_})
    rows = _training_rows(silo, model.causal, model.cfg.max_items, cfg.max_users, cfg.seed, with_val=True,
                          held_out=frozenset(held))  # the same users every round; batches reshuffled per round
    torch.manual_seed(round_cfg.seed)
    opt, sched = _optimiser(model, round_cfg, [rows])
    anchor = _anchor(model, round_cfg)
    gen = torch.Generator().manual_seed(round_cfg.seed)
    losses = []
    for epoch in range(1, epochs + 1):
        loss, _ = _run_epoch(model, [rows], [dom], round_cfg, opt, sched, gen, device,
                             f"{silo.domain} round {round_} epoch {epoch}/{epochs}", anchor)
        losses.append(loss)
        log.info("%s: round %d, epoch %d/%d loss %.4f", silo.domain, round_, epoch, epochs, loss)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return RoundResult(val, len(rows), sum(losses) / len(losses), time.perf_counter() - t0)


def fine_tune(model: Recommender, silo: SiloData | list[SiloData], dom: DomainInputs | list[DomainInputs],
              cfg: TrainConfig) -> FineTuneResult:
    """Fine-tune `model` in place on the silo's training sequences, early-stopping on validation NDCG@10;
    then, with `cfg.refit_on_val` and when some epoch beat the start, the final fit on train + validation items
    (`cfg.final_fit_epochs`: `refit` from the starting weights for the chosen number of epochs, or from the best
    epoch's weights for `continue_epochs`; `val` stays the selection run's metrics).

    Given lists of silos and their domain inputs, trains one model on the pooled data (each batch from one
    domain, softmax over that domain's items; validation = mean NDCG@10 over the domains): the non-private
    joint-training reference. The model ends holding the final weights (also returned as `state`, on CPU).

    `cfg.dp_epsilon` set (one silo only): user-level DP-SGD (common/model/dp.py) over every planned step, the final
    fit's included; the held-out validation users pick the epoch and are not trained on; `dp` reports the
    guarantee."""
    silos, doms, name = _as_lists(silo, dom)
    t0 = time.perf_counter()
    device = _start(model, cfg)
    start_state = copy.deepcopy(model.state_dict())
    rows, vals, val_users = zip(*[_selection_data(s, model, cfg) for s in silos])
    for s, r in zip(silos, rows):
        if not r:
            raise ValueError(f"{s.domain}: no training sequence has two or more items")
    plan = None
    if cfg.dp_epsilon is not None:
        from common.model.dp import make_plan

        if len(silos) != 1:
            raise ValueError("DP fine-tuning is per silo: give one silo, not several")
        plan = make_plan(cfg.dp_epsilon, cfg.dp_delta, cfg.dp_clip, len(rows[0]), cfg.batch_size,
                         cfg.epochs + (cfg.final_fit_epochs or 0), cfg.seed, cfg.max_steps_per_epoch)
        log.info("%s: DP-SGD over %d users, noise multiplier %.3f for epsilon %.3f at delta %.2e over %d planned "
                 "steps", name, plan.users, plan.sigma, plan.epsilon, plan.delta, plan.planned_steps)
    opt, sched = _optimiser(model, cfg, rows)
    anchor = _anchor(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)

    def validate() -> dict[str, float]:
        results = [evaluate(model, d, h, t, batch_size=cfg.eval_batch_size, max_users=n, seed=cfg.seed,
                            seen_items=cfg.seen_items)
                   for d, (h, t), n in zip(doms, vals, val_users)]
        return results[0] if len(results) == 1 else {k: sum(r[k] for r in results) / len(results) for k in results[0]}

    best = validate()
    best_state, best_epoch = copy.deepcopy(model.state_dict()), 0
    history = [{"epoch": 0, "val_ndcg@10": best["ndcg@10"], "val_recall@10": best["recall@10"]}]
    log.info("%s: epoch 0 val NDCG@10 %.4f Recall@10 %.4f", name, best["ndcg@10"], best["recall@10"])
    stale, steps, epoch = 0, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        te = time.perf_counter()
        if plan is not None:
            loss, n = _run_dp_epoch(model, rows[0], doms[0], cfg, opt, sched, device, f"{name} epoch {epoch}", plan)
        else:
            loss, n = _run_epoch(model, rows, doms, cfg, opt, sched, gen, device, f"{name} epoch {epoch}", anchor)
        steps += n
        val = validate()
        history.append({"epoch": epoch, "loss": loss, "val_ndcg@10": val["ndcg@10"],
                        "val_recall@10": val["recall@10"], "seconds": time.perf_counter() - te})
        log.info("%s: epoch %d loss %.4f val NDCG@10 %.4f (best %.4f)", name, epoch, loss, val["ndcg@10"], best["ndcg@10"])
        if val["ndcg@10"] > best["ndcg@10"]:
            best, best_state, best_epoch, stale = val, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    refit_epochs = cfg.final_fit_epochs
    refit_epochs = 0 if best_epoch == 0 else best_epoch if refit_epochs is None else refit_epochs
    model.load_state_dict(start_state if cfg.refits and refit_epochs else best_state)
    if refit_epochs:
        refit_steps, _ = refit(model, silos, doms, cfg, refit_epochs, dp=plan)
        steps += refit_steps
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return FineTuneResult(shared_state(model), best, history, epoch, steps, time.perf_counter() - t0,
                          best_epoch=best_epoch, refit_epochs=refit_epochs, dp=plan.summary() if plan else None)
