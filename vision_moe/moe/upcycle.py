"""Sparse upcycling: initialise an MoE layer from a dense layer so that it computes the dense layer exactly.

A dense MLP ``fc2(act(fc1 x))`` of hidden width ``H`` goes into ``E`` experts of hidden width ``h``:

- **granularity decomposition**: the ``H`` hidden units are split into ``G = H / h`` groups of ``h``; because the
  activation acts unit by unit, ``fc2(act(fc1 x)) = sum_g fc2_g(act(fc1_g x)) + b2``: the dense MLP is the sum of
  its ``G`` group MLPs (``G = 1``: every expert is a copy, the classic sparse upcycling);
- **weight allocation**: expert ``e`` holds group ``e mod G``, so every group has ``E / G`` identical replicas;
- **router initialisation**: every token must take ``m = top_k / G`` experts of each group, with a weight known in
  advance. The gate's input-dependent weights start at zero and its constant input (the gate bias, or a
  task-embedding router's task vector) gives the "lead" experts ``e < top_k`` the logit ``beta`` and the others 0,
  so every token picks exactly the leads (``m`` per group) with the same combine weight ``c`` (the softmax of those
  logits, ``1 / top_k`` when renormalised). ``beta`` puts 95 % of the softmax mass on the leads (65 noise standard
  deviations of margin for the V-MoE gate of 16 experts, top-4), so even the training noise keeps the choice;
- **combine scale**: each expert's second layer is scaled by ``1 / (m c)`` (its bias also divided by ``G``), so
  ``sum_leads c * expert_e(x) = sum_g fc2_g(act(fc1_g x)) + b2`` exactly.

The router keeps learning: the softmax over all experts gives its logits (and so its zero-initialised weights) a
non-zero gradient, and the load-balancing losses push tokens to the other replicas. When the experts are full
copies (``G = 1``) and the gate renormalises its top-k weights, any routing is already exact and the router keeps
its own initialisation.

Dense attention goes into MoE attention (Mod-Squad) only as full copies (``G = 1``): the experts share one key /
value projection of ``expert_heads`` heads, which equals the dense layer's per-head keys and values only when each
expert owns every head. Configurations where exactness is impossible raise a ValueError saying which argument to
change; the caller prefixes the layer name.
"""

from __future__ import annotations

import math

import torch

from .layer import MoEAttention, MoEMlp
from .router import MultiGateRouter, TaskEmbeddingRouter

__all__ = ["upcycle_mlp", "upcycle_attention", "lead_logit"]


def lead_logit(num_experts: int, top_k: int) -> float:
    """The gate logit of the lead experts (the others get 0): 95 % of the softmax mass on the ``top_k`` leads."""
    return math.log(19.0 * (num_experts - top_k) / top_k) if num_experts > top_k else 0.0


def _renormalized(router) -> bool:
    if isinstance(router, MultiGateRouter):
        return all(g.renormalize for g in router.gates.values())
    return router.gate.renormalize


def _lead_router_state(router, lead: torch.Tensor, what: str) -> dict[str, torch.Tensor]:
    """Router tensors (keys relative to the router) that give every token the logits ``beta * lead``."""
    e, k = router.num_experts, router.top_k
    beta = lead_logit(e, k)
    logits = lead.float() * beta  # (E,)
    out: dict[str, torch.Tensor] = {}
    if isinstance(router, MultiGateRouter):
        for t, g in router.gates.items():
            if g.proj.bias is None:
                raise ValueError(
                    f"{what}; a gate without a constant input cannot do that: create the model with "
                    "router_kwargs=dict(bias=True) or router='task_embed' (the zoo tags do)"
                )
            out[f"gates.{t}.proj.weight"] = torch.zeros_like(g.proj.weight)
            out[f"gates.{t}.proj.bias"] = logits.to(g.proj.bias.dtype)
        return out
    if isinstance(router, TaskEmbeddingRouter):
        proj = router.gate.proj
        weight = torch.zeros_like(proj.weight)  # (E, dim + task_dim)
        if proj.bias is not None:
            out["gate.proj.bias"] = logits.to(proj.bias.dtype)
        else:  # the task vector is the constant input: find u with emb_t . u = 1 for every task t
            emb = router.task_embed.weight.detach().double()  # (T, task_dim)
            ones = torch.ones(emb.shape[0], 1, dtype=emb.dtype)
            u = torch.linalg.lstsq(emb, ones).solution  # (task_dim, 1)
            if (emb @ u - ones).abs().max() > 1e-9:
                raise ValueError(
                    f"{what}; the task embeddings ({emb.shape[0]} tasks, task_dim={emb.shape[1]}) are linearly "
                    "dependent, so they give no constant input: create the model with router_kwargs=dict(bias=True)"
                )
            d = proj.in_features - emb.shape[1]
            weight[:, d:] = (logits.double()[:, None] * u[:, 0][None, :]).to(weight.dtype)
        out["gate.proj.weight"] = weight
        return out
    raise ValueError(f"{what}; unknown router {type(router).__name__}")


def _combine_weight(router) -> float:
    """The combine weight each lead gets from the lead router state."""
    e, k = router.num_experts, router.top_k
    if _renormalized(router):
        return 1.0 / k
    beta = lead_logit(e, k)
    return math.exp(beta) / (k * math.exp(beta) + (e - k))


def _check_dropless(layer: MoEMlp | MoEAttention) -> None:
    if layer.capacity is not None or layer.capacity_factor is not None:
        raise ValueError(
            "an expert capacity limit drops assignments, so the upcycled layer cannot equal the dense one; upcycle "
            "dropless (the default) and set the capacity afterwards with model.set_capacity(...)"
        )


def upcycle_mlp(
    layer: MoEMlp, fc1_w: torch.Tensor, fc1_b: torch.Tensor | None, fc2_w: torch.Tensor, fc2_b: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """State of ``layer`` (keys relative to it) equal to the dense MLP ``fc1 (H, dim) -> act -> fc2 (dim, H)``."""
    _check_dropless(layer)
    ex = layer.experts
    h_dense, dim = fc1_w.shape
    e, k, h = ex.num_experts, layer.top_k, ex.hidden
    if h_dense % h:
        raise ValueError(
            f"dense MLP hidden {h_dense} is not a multiple of expert hidden {h}; upcycling splits the dense hidden "
            f"units into equal groups, so expected an expert_hidden that divides {h_dense}"
        )
    groups = h_dense // h
    if k % groups:
        raise ValueError(
            f"splitting the dense MLP (hidden {h_dense}) into {groups} groups of {h} needs top_k to be a multiple "
            f"of {groups} (every token takes the same number of experts of each group), got top_k={k}"
        )
    per_group = k // groups
    if e // groups < per_group:
        raise ValueError(
            f"splitting the dense MLP (hidden {h_dense}) into {groups} groups with top_k={k} needs "
            f"{per_group} experts per group, so num_experts >= {groups * per_group}; got num_experts={e}"
        )
    copies = groups == 1 and _renormalized(layer.router)
    out: dict[str, torch.Tensor] = {}
    if copies:
        scale = 1.0
    else:
        what = (
            f"splitting the dense MLP (hidden {h_dense}) into {groups} groups of {h} is exact only if every token "
            f"picks {per_group} expert(s) of each group with a fixed weight"
            if groups > 1
            else f"copies of the dense MLP combined by top-{k} weights that are not renormalised are exact only if "
            "every token picks the same experts with a fixed weight (or create the model with "
            "router_kwargs=dict(renormalize=True))"
        )
        lead = torch.arange(e) < k  # experts 0 .. k-1: m of each group (group = e mod G)
        out.update({f"router.{n}": v for n, v in _lead_router_state(layer.router, lead, what).items()})
        scale = 1.0 / (per_group * _combine_weight(layer.router))
    group = torch.arange(e) % groups
    w1 = fc1_w.reshape(groups, h, dim)[group]  # (E, h, dim)
    w2 = fc2_w.reshape(dim, groups, h).permute(1, 0, 2)[group]  # (E, dim, h)
    out["experts.fc1.weight"] = w1.transpose(1, 2).contiguous()  # (E, dim, h)
    out["experts.fc2.weight"] = (w2.transpose(1, 2) * scale).contiguous()  # (E, h, dim)
    if ex.fc1.bias is not None:
        b1 = fc1_b if fc1_b is not None else torch.zeros(h_dense, dtype=fc1_w.dtype)
        out["experts.fc1.bias"] = b1.reshape(groups, h)[group].contiguous()
    if ex.fc2.bias is not None:
        b2 = fc2_b if fc2_b is not None else torch.zeros(dim, dtype=fc2_w.dtype)
        out["experts.fc2.bias"] = (b2 * (scale / groups)).unsqueeze(0).repeat(e, 1)
    elif fc2_b is not None and fc2_b.abs().max() > 0:
        raise ValueError("the dense MLP has an output bias and the experts have none; create them with bias=True")
    return out


def upcycle_attention(
    layer: MoEAttention,
    qkv_w: torch.Tensor,
    qkv_b: torch.Tensor | None,
    proj_w: torch.Tensor,
    proj_b: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """State of ``layer`` (keys relative to it) equal to dense attention ``qkv (3 dim, dim)``, ``proj (dim, dim)``."""
    _check_dropless(layer)
    dim = qkv_w.shape[1]
    inner = layer.expert_heads * layer.head_dim
    heads = dim // layer.head_dim
    if inner != dim:
        raise ValueError(
            f"dense attention upcycles exactly only when each expert owns all {heads} heads (the experts share "
            f"one key/value projection of expert_heads heads; the dense layer has keys and values for every head); "
            f"got expert_heads={layer.expert_heads}: create the model with expert_heads={heads} (the zoo tags do, "
            "with attn_top_k=1)"
        )
    e, k = layer.num_experts, layer.top_k
    out: dict[str, torch.Tensor] = {}
    if _renormalized(layer.router):
        scale = 1.0
    else:
        what = (
            f"copies of the dense attention combined by top-{k} weights that are not renormalised are exact only "
            "if every token picks the same experts with a fixed weight (or create the model with "
            "router_kwargs=dict(renormalize=True))"
        )
        lead = torch.arange(e) < k
        out.update({f"router.{n}": v for n, v in _lead_router_state(layer.router, lead, what).items()})
        scale = 1.0 / (k * _combine_weight(layer.router))
    out["kv.weight"] = qkv_w[dim:]
    out["q_experts.weight"] = qkv_w[:dim].t().unsqueeze(0).repeat(e, 1, 1)
    if qkv_b is not None:
        out["kv.bias"] = qkv_b[dim:]
        if layer.q_experts.bias is not None:
            out["q_experts.bias"] = qkv_b[:dim].unsqueeze(0).repeat(e, 1)
    out["o_experts.weight"] = (proj_w.t() * scale).unsqueeze(0).repeat(e, 1, 1)
    b = proj_b if proj_b is not None else torch.zeros(dim, dtype=proj_w.dtype)
    out["o_experts.bias"] = (b * scale).unsqueeze(0).repeat(e, 1)
    return out
