"""X-Cross-style dynamic integration of K domain models (issue 16 B; idea from X-Cross, SIGIR 2025,
arXiv:2504.20859, adapted to the light backbone; own code).

The K domain models are base + tau_d (the dense task vectors the server holds, whatever produced them: full
fine-tuning or materialised LoRA deltas). For every transformer block l the integrated model runs the K
domain versions of that block on the same input h_l and mixes their outputs per position:

    h_{l+1}[b, t] = sum_d g_{l,d}(h_l[b, t]) * block_l^{(d)}(h_l)[b, t],   g_l = softmax over d

Gate g_l: a linear map (or a one-hidden-layer MLP, ``gate_hidden`` > 0) of the parameter-free LayerNorm of
the block input at that position. Per position, not mean-pooled: a position's gate sees only its own
(causally computed) hidden state, so the model stays causal and the "positions" output used in training and
the "histories" output (last position) are the same computation. The gate's last layer starts at zero, so
the mix starts as the uniform average of the K blocks.

Non-block parameters (adaptor, position embeddings; the light backbone has no final norm) are one shared set:
the pipeline uses its MergeRec-learned merge (see server/integration_stage.py). Item embeddings therefore come
from that one adaptor, exactly as for a merged model; only the history tower is integrated. Inference cost:
K x the block compute of one model, + the gates (`parameter_count`, `inference_cost`).

Parameter names (what an integrated model's array group in an EvaluateRequest holds): the base's non-block
names (``adaptor.weight`` ...), ``experts.<l>.<d>.<block parameter>`` and ``gates.<l>.<...>``; the base and an
`IntegratedSpec` fix every name and shape (`IntegratedRecommender.skeleton`).
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from common.model.backbones import DomainInputs, LightRecommender, Recommender, pad_histories
from common.core.strict import Strict
from common.model.config import INT32_MAX

#: most domain models an integrated model may carry (bounds what a request can make a silo allocate)
MAX_INTEGRATED_DOMAINS = 32
MAX_GATE_HIDDEN = 1024


class IntegratedSpec(BaseModel):
    """An integrated (X-Cross) model: K domain versions of every transformer block mixed by per-layer gates
    (common/model/integration.py). The spec and the base fix every array's name and shape; the silo requires
    exactly those (`IntegratedRecommender.skeleton(base, spec)`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["xcross"] = "xcross"
    num_domains: int = Field(ge=1, le=MAX_INTEGRATED_DOMAINS)
    gate_hidden: int = Field(0, ge=0, le=MAX_GATE_HIDDEN, description="0: linear gate; H: MLP with H hidden units")


_BLOCK = re.compile(r"^blocks\.layers\.(\d+)\.(.+)$")


class IntegrationConfig(Strict):
    """Run-config `integration*` keys: the optional integrated-model candidate and how its gates are trained
    (the loss, batch size, held-out fraction and seed are coefficient learning's: `CoefficientConfig`)."""

    kind: Literal["none", "xcross"] = Field("none", description="none | xcross: also evaluate per-layer gated "
                                            "domain blocks")
    steps: int = Field(200, ge=0, le=INT32_MAX, description="gate-training steps (Adam)")
    lr: float = Field(1e-2, gt=0, description="gate-training learning rate")
    gate_hidden: int = Field(0, ge=0, le=1024, description="integrated model: 0 = linear gate per layer, H = "
                             "MLP with H hidden units")


def is_block(name: str) -> bool:
    """True for a parameter of a transformer block of the light backbone (``blocks.layers.<l>.*``)."""
    return _BLOCK.match(name) is not None


class Gate(nn.Module):
    """[..., dim] -> [..., K] mixing weights (softmax), from the parameter-free LayerNorm of the input.
    The output layer starts at zero: uniform weights 1/K."""

    def __init__(self, dim: int, num_domains: int, hidden: int = 0):
        super().__init__()
        self.hidden = nn.Linear(dim, hidden) if hidden else None
        self.out = nn.Linear(hidden or dim, num_domains)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = F.layer_norm(h, h.shape[-1:])
        if self.hidden is not None:
            z = F.gelu(self.hidden(z))
        return torch.softmax(self.out(z), dim=-1)


class IntegratedRecommender(Recommender):
    """The Recommender interface (forward(dom, kind, x)) over K gated domain versions of every block."""

    causal = True
    _items = LightRecommender._items
    block_inputs = LightRecommender.block_inputs

    def __init__(self, base: LightRecommender, spec: IntegratedSpec):
        super().__init__()
        if not isinstance(base, LightRecommender):
            raise ValueError("integrated models need the light backbone")
        self.cfg, self.spec = base.cfg, spec
        self.adaptor = copy.deepcopy(base.adaptor)
        self.adaptor_mlp = copy.deepcopy(base.adaptor_mlp)
        self.position = copy.deepcopy(base.position)
        layers = list(base.blocks.layers)
        self.experts = nn.ModuleList(nn.ModuleList(copy.deepcopy(layer) for _ in range(spec.num_domains))
                                     for layer in layers)
        dim = self.adaptor.out_features
        self.gates = nn.ModuleList(Gate(dim, spec.num_domains, spec.gate_hidden) for _ in layers)

    @classmethod
    def skeleton(cls, base: LightRecommender, spec: IntegratedSpec) -> "IntegratedRecommender":
        """The model `spec` describes, with the base's weights in every block (to load arrays into)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return cls(base, spec)

    @classmethod
    def from_states(cls, base: LightRecommender, shared: Mapping[str, torch.Tensor],
                    domain_states: Sequence[Mapping[str, torch.Tensor]], gate_hidden: int = 0
                    ) -> "IntegratedRecommender":
        """Non-block parameters from `shared` (a full state of the base's names), block l of expert d from
        `domain_states[d]` (full states, e.g. base + tau_d); gates at their uniform start."""
        model = cls.skeleton(base, IntegratedSpec(num_domains=len(domain_states), gate_hidden=gate_hidden))
        state = {n: t for n, t in shared.items() if not is_block(n)}
        for d, st in enumerate(domain_states):
            for n, t in st.items():
                m = _BLOCK.match(n)
                if m:
                    state[f"experts.{m.group(1)}.{d}.{m.group(2)}"] = t
        state.update({n: p.detach() for n, p in model.named_parameters() if n.startswith("gates.")})
        load_exact(model, state)
        return model

    def _positions(self, dom: DomainInputs, hist: torch.Tensor) -> torch.Tensor:
        x, mask = self.block_inputs(dom, hist)
        for experts, gate in zip(self.experts, self.gates):
            g = gate(x)  # [B, L, K]
            outs = torch.stack([blk(x, src_mask=mask) for blk in experts], dim=-1)  # [B, L, dim, K]
            x = (outs * g.unsqueeze(-2)).sum(-1)
        return x

    # the light backbone's item / history / position outputs, over this class's gated `_positions`
    forward = LightRecommender.forward

    def layer_of(self, param_name: str) -> str:
        """Layer i's expert blocks and gate are 'layer<i>'; the shared adaptor and positions group as in the
        light backbone."""
        m = re.match(r"(?:experts|gates)\.(\d+)\.", param_name)
        return f"layer{int(m.group(1))}" if m else LightRecommender.layer_of(self, param_name)


def load_exact(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into `model`: exactly the model's parameter names and shapes (ValueError otherwise)."""
    own = dict(model.named_parameters())
    if set(own) != set(state):
        diff = sorted(set(own) ^ set(state))
        raise ValueError(f"integrated model parameters differ from the state, e.g. {diff[:3]}")
    with torch.no_grad():
        for n, p in own.items():
            t = torch.as_tensor(state[n])
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"parameter {n}: shape {list(t.shape)}, expected {list(p.shape)}")
            p.copy_(t.to(p.dtype))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def inference_cost(model: Recommender, dom: DomainInputs, *, batch: int = 256, length: int | None = None,
                   repeats: int = 5, seed: int = 0) -> dict:
    """Median seconds to score one batch of `batch` random catalog histories of `length` items against every
    item of `dom` (item embeddings computed once, outside the timing, as evaluation does), and the
    parameter count. Catalog item ids only: no user data."""
    from common.model.backbones import encode_all_items

    model.eval()
    length = length or model.cfg.max_items
    gen = torch.Generator().manual_seed(seed)
    hist = pad_histories(torch.randint(0, dom.num_items, (batch, length), generator=gen).tolist(), length)
    items = encode_all_items(model, dom)
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        _ = model(dom, "histories", hist) @ items.T
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return {"seconds_per_batch": times[len(times) // 2], "batch": batch, "history_length": length,
            "parameters": parameter_count(model)}


def from_arrays(base: Recommender, spec: IntegratedSpec, named: Mapping, what: str) -> IntegratedRecommender:
    """The integrated model a silo evaluates, from a request's array group: exactly the names and shapes that
    `spec` and the silo's own base imply, float32, finite (ContractError otherwise, before anything runs)."""
    import numpy as np

    from common.core.errors import ContractError
    from common.merging.task_vectors import check_state_arrays

    if not isinstance(base, LightRecommender):
        raise ContractError(f"{what}: integrated models need the light backbone")
    model = IntegratedRecommender.skeleton(base, spec)
    check_state_arrays(named, {n: tuple(p.shape) for n, p in model.named_parameters()}, what)
    load_exact(model, {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in named.items()})
    return model.eval()
