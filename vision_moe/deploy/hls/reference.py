"""Bit-accurate NumPy reference of the generated HLS model: quantised parameters and a layer-by-layer forward.

It performs the same operations as ``hls/include/vmoe/*.h`` on raw integers (see :mod:`.fixed`), in an order whose
result does not depend on the order the hardware uses (exact 64-bit accumulators wrap modulo 2**64), except where
the kernel is sequential (online softmax over keys and experts, top-k), which is reproduced step by step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import HLSConfig
from .fixed import (
    OverflowLog,
    Tables,
    cast,
    exact_matmul,
    exp_fx,
    gelu_fx,
    mul_shift,
    quantize,
    recip_fx,
    rsqrt_fx,
    wrap,
)
from .ir import LinearSpec, ModelSpec

__all__ = ["QLinear", "QuantModel", "quantize_model", "RefResult", "run_reference", "layer_names", "image_to_pixels"]


@dataclass
class QLinear:
    w: np.ndarray  # (in, out) raw weight_t
    b: np.ndarray  # (out,) raw bias_t


@dataclass
class QuantModel:
    spec: ModelSpec
    cfg: HLSConfig
    tables: Tables
    patch_embed: QLinear
    cls_pos: np.ndarray
    pos: np.ndarray
    blocks: list[dict]
    norm: tuple[np.ndarray, np.ndarray]
    head: QLinear | None
    inv_dim: int  # raw 1/C with cfg.inv_bits fraction bits
    eps: int  # raw LayerNorm eps in var_type
    log: OverflowLog = field(default_factory=OverflowLog)  # saturation while quantising parameters


def quantize_model(spec: ModelSpec, cfg: HLSConfig) -> QuantModel:
    """Round every parameter to its ap_fixed type (nearest, saturating); saturations are logged per tensor."""
    log = OverflowLog()

    def ql(lin: LinearSpec, name: str) -> QLinear:
        return QLinear(
            quantize(lin.w, cfg.weight, log, name + ".weight"), quantize(lin.b, cfg.bias, log, name + ".bias")
        )

    def qn(p: tuple[np.ndarray, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
        return quantize(p[0], cfg.bias, log, name + ".weight"), quantize(p[1], cfg.bias, log, name + ".bias")

    blocks = []
    for b in spec.blocks:
        p = f"blocks.{b.index}."
        d = dict(
            ln1=qn(b.ln1, p + "norm1"),
            qkv=ql(b.qkv, p + "attn.qkv"),
            proj=ql(b.proj, p + "attn.proj"),
            ln2=qn(b.ln2, p + "norm2"),
        )
        if b.is_moe:
            d["gates"] = [(ql(g.lin, p + f"mlp.router[{g.task}]"), g.mask.copy()) for g in b.gates]
            d["experts"] = [
                (ql(f1, p + f"mlp.experts[{e}].fc1"), ql(f2, p + f"mlp.experts[{e}].fc2"))
                for e, (f1, f2) in zip(b.expert_ids, b.experts)
            ]
        else:
            d["fc1"], d["fc2"] = ql(b.fc1, p + "mlp.fc1"), ql(b.fc2, p + "mlp.fc2")
        blocks.append(d)
    eps = max(1, int(np.floor(spec.ln_eps * 2.0**cfg.var_type.frac + 0.5)))
    return QuantModel(
        spec=spec,
        cfg=cfg,
        tables=Tables.build(cfg, spec.gelu_approx),
        patch_embed=ql(spec.patch_embed, "patch_embed"),
        cls_pos=quantize(spec.cls_pos, cfg.bias, log, "cls_token+pos_embed"),
        pos=quantize(spec.pos, cfg.bias, log, "pos_embed"),
        blocks=blocks,
        norm=qn(spec.norm, "norm"),
        head=ql(spec.head, "head") if spec.head is not None else None,
        inv_dim=int(np.floor(2.0**cfg.inv_bits / spec.dim + 0.5)),
        eps=eps,
        log=log,
    )


def layer_names(spec: ModelSpec) -> list[str]:
    """The checkpoints the top function's debug switch can stop after, in order (index = stop_after value)."""
    names = ["patch_embed"]
    for b in spec.blocks:
        p = f"blocks.{b.index}."
        names += [p + "norm1", p + "qkv", p + "attn", p + "proj", p + "norm2"]
        names += [p + "gate", p + "moe"] if b.is_moe else [p + "fc1", p + "mlp"]
    names.append("norm")
    if spec.head is not None:
        names.append("head")
    return names


def image_to_pixels(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) or (3, H, W) image -> (3, H, W) raw ap_ufixed<8,0> values (the bytes themselves)."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 3 and a.shape[0] != 3:
        a = a.transpose(2, 0, 1)
    return np.ascontiguousarray(a).astype(np.int64)


@dataclass
class RefResult:
    layers: dict[str, np.ndarray]  # name -> raw activations (int64), in layer_names order
    queues: list[list[int]]  # per MoE layer: patches per kept expert
    routes: list[np.ndarray]  # per MoE layer: (S, k) chosen kept-expert indices
    log: OverflowLog

    def output(self) -> np.ndarray:
        return self.layers[list(self.layers)[-1]]


class _Ref:
    def __init__(self, qm: QuantModel, log: OverflowLog) -> None:
        self.qm, self.cfg, self.tab, self.log = qm, qm.cfg, qm.tables, log
        self.fa = qm.cfg.act.frac

    # ap_fixed<64, 64 - (F_in + F_w)> accumulator initialised with the bias, exact products, then act_t(acc)
    def linear(self, x: np.ndarray, fx: int, lin: QLinear, name: str, gelu: bool = False) -> np.ndarray:
        c = self.cfg
        facc = fx + c.weight.frac
        acc = exact_matmul(x, lin.w) + (lin.b << (facc - c.bias.frac))
        self._acc_overflow(x, fx, lin, facc, name)
        y = cast(acc, facc, c.act, self.log, name)
        return gelu_fx(y, c, self.tab) if gelu else y

    def _acc_overflow(self, x, fx, lin, facc, name) -> None:
        est = (x.astype(np.float64) @ lin.w.astype(np.float64)) * 2.0 ** (-fx - self.cfg.weight.frac)
        lim = 2.0 ** (63 - facc)
        self.log.add(name + ".acc", int(np.count_nonzero(np.abs(est) >= lim)), est.size)

    def layernorm(self, x: np.ndarray, gb: tuple[np.ndarray, np.ndarray], name: str) -> np.ndarray:
        c, qm = self.cfg, self.qm
        fa, ib = self.fa, c.inv_bits
        s = wrap(x.sum(axis=-1), _signed64(fa))  # ap_fixed<64, 64 - F_A> running sum (int64 wraps alike)
        mean = wrap(np.asarray((s.astype(object) * qm.inv_dim) >> ib), c.act, self.log, name + ".mean")  # act_t
        d = wrap(x - mean[:, None], c.act, self.log, name + ".dev")
        sq = wrap((d * d) >> (2 * fa - c.sq_type.frac), c.sq_type, self.log, name + ".sq")  # d*d < 2**62
        vs = sq.sum(axis=-1)  # ap_ufixed<64, 64 - F_SQ>
        var = wrap(
            np.asarray((vs.astype(object) * qm.inv_dim) >> (ib + c.sq_type.frac - c.var_type.frac)),
            c.var_type,
            self.log,
            name + ".var",
        )
        var = wrap(var + qm.eps, c.var_type, self.log, name + ".var")
        rstd = rsqrt_fx(np.maximum(var, 1), c, self.tab, self.log, name + ".rstd")
        n = wrap(mul_shift(d, rstd[:, None], c.rstd_type.frac), c.act, self.log, name + ".norm")
        g, b = gb
        y = n * g[None, :] + (b[None, :] << fa)  # frac F_A + F_B, exact
        return cast(y, fa + c.bias.frac, c.act, self.log, name)

    def attention(self, qkv: np.ndarray, name: str) -> np.ndarray:
        """Online-softmax attention over keys j = 0..N-1 for every (query, head); scale already in W_q."""
        sp, c, fa = self.qm.spec, self.cfg, self.fa
        n, dim, h = qkv.shape[0], sp.dim, sp.heads
        d = dim // h
        fe = c.exp_type.frac
        q = qkv[:, :dim].reshape(n, h, d).transpose(1, 0, 2)  # (H, N, D)
        k = qkv[:, dim : 2 * dim].reshape(n, h, d).transpose(1, 0, 2)
        v = qkv[:, 2 * dim :].reshape(n, h, d).transpose(1, 0, 2)
        s_acc = np.stack([exact_matmul(q[i], k[i].T) for i in range(h)])  # (H, N, N) ap_fixed<64, 64 - 2 F_A>
        est = np.einsum("hid,hjd->hij", q.astype(np.float64), k.astype(np.float64)) * 2.0 ** (-2 * fa)
        self.log.add(name + ".score_acc", int(np.count_nonzero(np.abs(est) >= 2.0 ** (63 - 2 * fa))), est.size)
        s = cast(s_acc, 2 * fa, c.act, self.log, name + ".score")  # (H, N, N)
        m = s[:, :, 0].copy()
        l = np.full((h, n), 1 << fa, dtype=np.int64)
        o = np.broadcast_to(v[:, 0:1, :], (h, n, d)).copy()  # (H, N, D)
        one = np.int64(1 << fe)
        for j in range(1, n):
            sj = s[:, :, j]
            up = sj > m
            diff = wrap(np.where(up, m - sj, sj - m), c.act, self.log, name + ".diff")
            e = exp_fx(diff, c, self.tab)
            alpha = np.where(up, e, one)
            p = np.where(up, one, e)
            m = np.where(up, sj, m)
            l = cast(l * alpha + (p << fa), fa + fe, c.act, self.log, name + ".sum")
            o = cast(o * alpha[..., None] + p[..., None] * v[:, j][:, None, :], fa + fe, c.act, self.log, name + ".acc")
        inv = recip_fx(np.maximum(l, 1), c, self.tab, self.log, name + ".recip")
        out = cast(mul_shift(o, inv[..., None], 0), 2 * fa, c.act, self.log, name)  # (H, N, D)
        return out.transpose(1, 0, 2).reshape(n, dim)

    def gate(self, z: np.ndarray, mask: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Online softmax over the allowed experts, top-k by logit (earlier expert wins ties) -> (idx, weights)."""
        c, fa, k = self.cfg, self.fa, self.qm.spec.top_k
        fe = c.exp_type.frac
        s, e = z.shape
        allowed = np.flatnonzero(mask)
        one = np.int64(1 << fe)
        m = z[:, allowed[0]].copy()
        l = np.full(s, 1 << fa, dtype=np.int64)
        for j in allowed[1:]:
            zj = z[:, j]
            up = zj > m
            ex = exp_fx(wrap(np.where(up, m - zj, zj - m), c.act, self.log, name + ".diff"), c, self.tab)
            alpha, p = np.where(up, ex, one), np.where(up, one, ex)
            m = np.where(up, zj, m)
            l = cast(l * alpha + (p << fa), fa + fe, c.act, self.log, name + ".sum")
        inv = recip_fx(np.maximum(l, 1), c, self.tab, self.log, name + ".recip")
        # top-k: insertion into a sorted list, strict '>' so the lower expert index wins ties
        idx = np.zeros((s, k), dtype=np.int64)
        val = np.zeros((s, k), dtype=np.int64)
        for t in range(s):
            best: list[tuple[int, int]] = []
            for j in allowed:
                pos = len(best)
                while pos > 0 and z[t, j] > best[pos - 1][0]:
                    pos -= 1
                if pos < k:
                    best.insert(pos, (int(z[t, j]), int(j)))
                    del best[k:]
            idx[t] = [j for _, j in best]
            val[t] = [v for v, _ in best]
        ex = exp_fx(wrap(val - m[:, None], c.act, self.log, name + ".diff"), c, self.tab)
        w = cast(ex * inv[:, None], fe + fa, c.act, self.log, name + ".weight")
        if self.qm.spec.renormalize:
            tot = wrap(w.sum(axis=1), c.act, self.log, name + ".weight_sum")
            r = recip_fx(np.maximum(tot, 1), c, self.tab, self.log, name + ".recip")
            w = cast(mul_shift(w, r[:, None], 0), 2 * fa, c.act, self.log, name + ".weight")
        return idx, w


def _signed64(frac: int):
    from .config import FxType

    return FxType(64, 64 - frac)


def run_reference(qm: QuantModel, pixels: np.ndarray, task: str | None = None) -> RefResult:
    """Run the fixed-point model on one image ((3, H, W) raw pixel bytes); every layer's raw output is kept."""
    sp, c = qm.spec, qm.cfg
    if task is None:
        if len(sp.tasks) != 1:
            raise ValueError(f"this project holds tasks {list(sp.tasks)}: pass task=...")
        task = sp.tasks[0]
    if task not in sp.tasks:
        raise ValueError(f"unknown task {task!r}; this project holds {list(sp.tasks)}")
    ti = sp.tasks.index(task)
    if tuple(pixels.shape) != (3, *sp.img_size):
        raise ValueError(f"image shape {tuple(pixels.shape)} != (3, {sp.img_size[0]}, {sp.img_size[1]})")
    log = OverflowLog()
    r = _Ref(qm, log)
    fa, fb = c.act.frac, c.bias.frac
    out: dict[str, np.ndarray] = {}
    p = sp.patch
    gh, gw = sp.grid
    patches = pixels.reshape(3, gh, p, gw, p).transpose(1, 3, 0, 2, 4).reshape(gh * gw, 3 * p * p)
    pe = r.linear(patches, c.pixel.frac, qm.patch_embed, "patch_embed")
    x = np.concatenate(
        [cast(qm.cls_pos[None, :], fb, c.act), wrap(pe + (qm.pos << (fa - fb)), c.act, log, "patch_embed")]
    )
    out["patch_embed"] = x
    queues, routes = [], []
    for b, qb in zip(sp.blocks, qm.blocks):
        pre = f"blocks.{b.index}."
        h = out[pre + "norm1"] = r.layernorm(x, qb["ln1"], pre + "norm1")
        qkv = out[pre + "qkv"] = r.linear(h, fa, qb["qkv"], pre + "qkv")
        a = out[pre + "attn"] = r.attention(qkv, pre + "attn")
        x = out[pre + "proj"] = wrap(x + r.linear(a, fa, qb["proj"], pre + "proj"), c.act, log, pre + "proj.residual")
        h = out[pre + "norm2"] = r.layernorm(x, qb["ln2"], pre + "norm2")
        if b.is_moe:
            glin, mask = qb["gates"][ti]
            z = out[pre + "gate"] = r.linear(h, fa, glin, pre + "gate")
            idx, w = r.gate(z, mask, pre + "gate")
            y = np.zeros_like(x)
            q_sizes = []
            for e, (f1, f2) in enumerate(qb["experts"]):  # expert by expert, patches queued in token order
                tok, slot = np.nonzero(idx == e)
                q_sizes.append(len(tok))
                if not len(tok):
                    continue
                hid = r.linear(h[tok], fa, f1, pre + f"experts[{b.expert_ids[e]}].fc1", gelu=True)
                ye = r.linear(hid, fa, f2, pre + f"experts[{b.expert_ids[e]}].fc2")
                contrib = cast(mul_shift(ye, w[tok, slot][:, None], 0), 2 * fa, c.act, log, pre + "moe.weighted")
                y[tok] = wrap(y[tok] + contrib, c.act, log, pre + "moe.combine")
            queues.append(q_sizes)
            routes.append(idx)
            x = out[pre + "moe"] = wrap(x + y, c.act, log, pre + "moe.residual")
        else:
            hid = out[pre + "fc1"] = r.linear(h, fa, qb["fc1"], pre + "fc1", gelu=True)
            x = out[pre + "mlp"] = wrap(x + r.linear(hid, fa, qb["fc2"], pre + "fc2"), c.act, log, pre + "mlp.residual")
    xn = out["norm"] = r.layernorm(x, qm.norm, "norm")
    if qm.head is not None:
        out["head"] = r.linear(xn[0:1], fa, qm.head, "head")[0]
    return RefResult(out, queues, routes, log)
