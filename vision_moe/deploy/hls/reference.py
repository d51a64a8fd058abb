"""Bit-accurate NumPy reference of the generated HLS model: quantised parameters and a layer-by-layer forward.

It performs the same operations as ``hls/include/vmoe/*.h`` on raw integers (see :mod:`.fixed`), in an order whose
result does not depend on the order the hardware uses (exact 64-bit accumulators wrap modulo 2**64, and every
activation sum wraps modulo 2**W), except where the kernel is sequential (online softmax over keys and experts,
top-k), which is reproduced step by step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import FxType, HLSConfig
from .fixed import (
    OverflowLog,
    Tables,
    cast,
    exact_matmul,
    exp_fx,
    gelu_fx,
    mul_shift,
    quantize,
    quantize_per_channel,
    recip_fx,
    rsqrt_fx,
    scaled_shift,
    wrap,
)
from .ir import LinearSpec, ModelSpec, MoESpec, UnsupportedModelError

__all__ = [
    "QLinear",
    "QMoE",
    "QuantModel",
    "quantize_model",
    "RefResult",
    "run_reference",
    "layer_names",
    "image_to_pixels",
]


@dataclass
class QLinear:
    w: np.ndarray  # (in, out) raw weight_t, or 8-bit integers when ``scale`` is set
    b: np.ndarray  # (out,) raw bias_t
    scale: np.ndarray | None = None  # (out,) raw scale_t: w ~ q * scale per output channel (8-bit weights)

    @property
    def is8(self) -> bool:
        return self.scale is not None


@dataclass
class QMoE:
    spec: MoESpec
    gates: list[tuple[QLinear, np.ndarray]]  # per task: gate, expert mask
    experts: list[tuple[QLinear, QLinear]]


@dataclass
class QuantModel:
    spec: ModelSpec
    cfg: HLSConfig
    tables: Tables
    patch_embed: QLinear | None
    stem: list[QLinear]
    stem_norm: tuple[np.ndarray, np.ndarray] | None  # raw act_t per-channel scale and shift of the stem input
    cls_pos: np.ndarray
    pos: np.ndarray
    blocks: list[dict]
    norm: tuple[np.ndarray, np.ndarray]
    head: QLinear | None
    inv_dim: int  # raw 1/C with cfg.inv_bits fraction bits
    eps: int  # raw LayerNorm eps in var_type
    log: OverflowLog = field(default_factory=OverflowLog)  # saturation while quantising parameters


def quantize_model(spec: ModelSpec, cfg: HLSConfig) -> QuantModel:
    """Round every parameter to its ap_fixed type (nearest, saturating); saturations are logged per tensor.

    ``cfg.weight8``: 'experts' stores the MoE experts' weights (MLP and attention) as 8-bit integers with a
    per-output-channel scale, 'all' also the dense linear layers and the head (never the gates, whose logits pick
    the experts, nor the first layer). A scale beyond ``cfg.scale`` raises, naming the layer."""
    log = OverflowLog()

    def ql(lin: LinearSpec, name: str, w8: bool = False) -> QLinear:
        b = quantize(lin.b, cfg.bias, log, name + ".bias")
        if w8:
            try:
                q, s = quantize_per_channel(lin.w, 8, cfg.scale, log, name + ".weight")
            except ValueError as e:
                raise UnsupportedModelError(str(e)) from None
            return QLinear(q, b, s)
        return QLinear(quantize(lin.w, cfg.weight, log, name + ".weight"), b)

    def qn(p: tuple[np.ndarray, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
        return quantize(p[0], cfg.bias, log, name + ".weight"), quantize(p[1], cfg.bias, log, name + ".bias")

    ex8, all8 = cfg.is8("expert"), cfg.is8("dense")

    def qmoe(m: MoESpec, p: str) -> QMoE:
        names = ("fc1", "fc2") if m.kind == "mlp" else ("q", "o")
        return QMoE(
            m,
            [(ql(g.lin, p + f".router[{g.task}]"), g.mask.copy()) for g in m.gates],
            [
                (ql(f1, p + f".experts[{e}].{names[0]}", ex8), ql(f2, p + f".experts[{e}].{names[1]}", ex8))
                for e, (f1, f2) in zip(m.expert_ids, m.experts)
            ],
        )

    blocks = []
    for b in spec.blocks:
        p = f"blocks.{b.index}."
        d: dict = dict(ln1=qn(b.ln1, p + "norm1"), ln2=qn(b.ln2, p + "norm2"))
        if b.task_embed is not None:
            d["task_embed"] = quantize(b.task_embed, cfg.bias, log, p + "task_embed")
        if b.attn_is_moe:
            d["kv"] = ql(b.kv, p + "attn.kv", all8)
            d["attn_moe"] = qmoe(b.attn_moe, p + "attn")
        else:
            d["qkv"], d["proj"] = ql(b.qkv, p + "attn.qkv", all8), ql(b.proj, p + "attn.proj", all8)
        if b.is_moe:
            d["mlp_moe"] = qmoe(b.mlp_moe, p + "mlp")
        else:
            d["fc1"], d["fc2"] = ql(b.fc1, p + "mlp.fc1", all8), ql(b.fc2, p + "mlp.fc2", all8)
        blocks.append(d)
    eps = max(1, int(np.floor(spec.ln_eps * 2.0**cfg.var_type.frac + 0.5)))
    stem_norm = None
    if spec.stem_norm is not None:
        stem_norm = (
            quantize(spec.stem_norm[0], cfg.act, log, "stem.input_scale"),
            quantize(spec.stem_norm[1], cfg.act, log, "stem.input_shift"),
        )
    return QuantModel(
        spec=spec,
        cfg=cfg,
        tables=Tables.build(cfg, spec.gelu_approx),
        patch_embed=ql(spec.patch_embed, "patch_embed") if spec.patch_embed is not None else None,
        stem=[ql(c.lin, c.name + ".conv") for c in spec.stem],
        stem_norm=stem_norm,
        cls_pos=quantize(spec.cls_pos, cfg.bias, log, "cls_token+pos_embed"),
        pos=quantize(spec.pos, cfg.bias, log, "pos_embed"),
        blocks=blocks,
        norm=qn(spec.norm, "norm"),
        head=ql(spec.head, "head", all8) if spec.head is not None else None,
        inv_dim=int(np.floor(2.0**cfg.inv_bits / spec.dim + 0.5)),
        eps=eps,
        log=log,
    )


def layer_names(spec: ModelSpec) -> list[str]:
    """The checkpoints the top function's debug switch can stop after, in order (index = stop_after value)."""
    names = [c.name for c in spec.stem[:-1]] + ["patch_embed"]
    for b in spec.blocks:
        p = f"blocks.{b.index}."
        names.append(p + "norm1")
        if b.attn_is_moe:
            names += [p + "attn.gate", p + "attn.kv", p + "attn.q", p + "attn", p + "attn.moe"]
        else:
            names += [p + "qkv", p + "attn", p + "proj"]
        names.append(p + "norm2")
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
    queues: list[list[int]]  # per MoE layer (execution order): assignments per kept expert
    routes: list[np.ndarray]  # per MoE layer: (S, k) chosen kept-expert indices
    log: OverflowLog

    def output(self) -> np.ndarray:
        return self.layers[list(self.layers)[-1]]


def _signed64(frac: int) -> FxType:
    return FxType(64, 64 - frac)


class _Ref:
    def __init__(self, qm: QuantModel, log: OverflowLog) -> None:
        self.qm, self.cfg, self.tab, self.log = qm, qm.cfg, qm.tables, log
        self.fa = qm.cfg.act.frac

    # ap_fixed<64, 64 - (F_in + F_w)> accumulator initialised with the bias, exact products, then act_t(acc);
    # 8-bit weights: the accumulator holds sum x q, then act_t(acc * scale + bias)
    def linear(
        self, x: np.ndarray, fx: int, lin: QLinear, name: str, gelu: bool = False, relu: bool = False
    ) -> np.ndarray:
        c = self.cfg
        self._acc_overflow(x, lin.w, name + ".acc")
        if lin.is8:
            if fx != c.act.frac:
                raise ValueError(f"{name}: 8-bit weights need activation inputs")
            acc = scaled_shift(exact_matmul(x, lin.w), lin.scale[None, :], c.scale.frac)  # frac F_A
            y = wrap(acc + (lin.b << (fx - c.bias.frac)), c.act, self.log, name)
        else:
            facc = fx + c.weight.frac
            acc = exact_matmul(x, lin.w) + (lin.b << (facc - c.bias.frac))
            y = cast(acc, facc, c.act, self.log, name)
        if gelu:
            y = gelu_fx(y, c, self.tab)
        if relu:
            y = np.maximum(y, 0)
        return y

    def _acc_overflow(self, a: np.ndarray, b: np.ndarray, name: str) -> None:
        """Count the sums of products a @ b that pass 2**62 (the 64-bit accumulators' range); the exact products
        are only estimated when a cheap bound says one could."""
        bound = float(np.abs(a).max(initial=0)) * float(np.abs(b).sum(axis=0).max(initial=0))
        n = a.shape[0] * b.shape[-1]
        if bound < 2.0**62:
            self.log.add(name, 0, n)
            return
        est = np.abs(a.astype(np.float64) @ b.astype(np.float64))
        self.log.add(name, int(np.count_nonzero(est >= 2.0**62)), est.size)

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

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, hq: int, hkv: int, name: str) -> np.ndarray:
        """Online-softmax attention over keys j = 0..N-1 for every (query, head); scale already in W_q.

        q (N, hq D), k and v (N, hkv D); query head h reads key/value head h mod hkv (hq = hkv for dense
        attention; Mod-Squad's slots: hq = top_k x expert_heads over one expert's shared key/value heads)."""
        c, fa = self.cfg, self.fa
        d = self.qm.spec.head_dim
        n = q.shape[0]
        fe = c.exp_type.frac
        qh = q.reshape(n, hq, d).transpose(1, 0, 2)  # (Hq, N, D)
        kk = k.reshape(n, hkv, d).transpose(1, 0, 2)[np.arange(hq) % hkv]  # (Hq, N, D)
        vv = v.reshape(n, hkv, d).transpose(1, 0, 2)[np.arange(hq) % hkv]
        s_acc = np.stack([exact_matmul(qh[i], kk[i].T) for i in range(hq)])  # (H, N, N) ap_fixed<64, 64 - 2 F_A>
        for i in range(hq):
            self._acc_overflow(qh[i], kk[i].T, name + ".score_acc")
        s = cast(s_acc, 2 * fa, c.act, self.log, name + ".score")  # (H, N, N)
        m = s[:, :, 0].copy()
        l = np.full((hq, n), 1 << fa, dtype=np.int64)
        o = np.broadcast_to(vv[:, 0:1, :], (hq, n, d)).copy()  # (H, N, D)
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
            o = cast(
                o * alpha[..., None] + p[..., None] * vv[:, j][:, None, :], fa + fe, c.act, self.log, name + ".acc"
            )
        inv = recip_fx(np.maximum(l, 1), c, self.tab, self.log, name + ".recip")
        out = cast(mul_shift(o, inv[..., None], 0), 2 * fa, c.act, self.log, name)  # (H, N, D)
        return out.transpose(1, 0, 2).reshape(n, hq * d)

    def gate(
        self, z: np.ndarray, mask: np.ndarray, k: int, renormalize: bool, name: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Online softmax over the allowed experts, top-k by logit (earlier expert wins ties) -> (idx, weights)."""
        c, fa = self.cfg, self.fa
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
        if renormalize:
            tot = wrap(w.sum(axis=1), c.act, self.log, name + ".weight_sum")
            r = recip_fx(np.maximum(tot, 1), c, self.tab, self.log, name + ".recip")
            w = cast(mul_shift(w, r[:, None], 0), 2 * fa, c.act, self.log, name + ".weight")
        return idx, w

    def conv(self, x: np.ndarray, lin: QLinear, stride: int, relu: bool, name: str) -> np.ndarray:
        """3x3 convolution, zero padding 1, on an (H, W, C) feature map; im2col rows in (ky, kx, c) order."""
        h, w, ch = x.shape
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        xp = np.zeros((h + 2, w + 2, ch), dtype=np.int64)
        xp[1:-1, 1:-1] = x
        cols = np.concatenate(
            [
                xp[ky : ky + stride * (ho - 1) + 1 : stride, kx : kx + stride * (wo - 1) + 1 : stride]
                for ky in range(3)
                for kx in range(3)
            ],
            axis=-1,
        ).reshape(ho * wo, 9 * ch)
        return self.linear(cols, self.fa, lin, name, relu=relu).reshape(ho, wo, -1)

    def _accumulate(self, y: np.ndarray, tok: np.ndarray, ye: np.ndarray, weight: np.ndarray, name: str) -> None:
        """y[tok] += act_t(weight * ye): an expert's outputs scaled by the gate weight while they are summed."""
        c = self.cfg
        contrib = cast(mul_shift(ye, weight[:, None], 0), 2 * self.fa, c.act, self.log, name + ".weighted")
        y[tok] = wrap(y[tok] + contrib, c.act, self.log, name + ".combine")

    def moe_mlp(self, x, h, qmoe: QMoE, ti: int, pre: str, out: dict, queues: list, routes: list) -> np.ndarray:
        """x + the gate-weighted sum of the chosen MLP experts on h (expert by expert, tokens in order)."""
        fa = self.fa
        m = qmoe.spec
        glin, mask = qmoe.gates[ti]
        z = out[pre + "gate"] = self.linear(h, fa, glin, pre + "gate")
        idx, w = self.gate(z, mask, m.top_k, m.renormalize, pre + "gate")
        y = np.zeros_like(x)
        q_sizes = []
        for e, (f1, f2) in enumerate(qmoe.experts):  # expert by expert, patches queued in token order
            tok, slot = np.nonzero(idx == e)
            q_sizes.append(len(tok))
            if not len(tok):
                continue
            hid = self.linear(h[tok], fa, f1, pre + f"experts[{m.expert_ids[e]}].fc1", gelu=True)
            ye = self.linear(hid, fa, f2, pre + f"experts[{m.expert_ids[e]}].fc2")
            self._accumulate(y, tok, ye, w[tok, slot], pre + "moe")
        queues.append(q_sizes)
        routes.append(idx)
        return wrap(x + y, self.cfg.act, self.log, pre + "moe.residual")

    def moe_attention(
        self, x, h, kvlin: QLinear, qmoe: QMoE, eh: int, ti: int, pre: str, out: dict, queues: list, routes: list
    ) -> np.ndarray:
        """Mod-Squad: per-expert query projection of each (token, slot), attention over the shared keys/values,
        per-expert output projection, gate-weighted sum over the slots."""
        fa = self.fa
        m = qmoe.spec
        inner, k = m.hidden, m.top_k
        glin, mask = qmoe.gates[ti]
        z = out[pre + "attn.gate"] = self.linear(h, fa, glin, pre + "attn.gate")
        idx, w = self.gate(z, mask, k, m.renormalize, pre + "attn.gate")
        kv = out[pre + "attn.kv"] = self.linear(h, fa, kvlin, pre + "attn.kv")
        n = x.shape[0]
        q = np.zeros((n, k * inner), dtype=np.int64)
        q_sizes = []
        for e, (fq, _) in enumerate(qmoe.experts):
            tok, slot = np.nonzero(idx == e)
            q_sizes.append(len(tok))
            if len(tok):
                qe = self.linear(h[tok], fa, fq, pre + f"attn.experts[{m.expert_ids[e]}].q")
                for s_ in range(k):
                    sel = slot == s_
                    q[tok[sel], s_ * inner : (s_ + 1) * inner] = qe[sel]
        out[pre + "attn.q"] = q
        att = out[pre + "attn"] = self.attention(q, kv[:, :inner], kv[:, inner:], k * eh, eh, pre + "attn")
        y = np.zeros_like(x)
        for e, (_, fo) in enumerate(qmoe.experts):
            tok, slot = np.nonzero(idx == e)
            if not len(tok):
                continue
            cols = (slot * inner)[:, None] + np.arange(inner)[None, :]
            a = np.take_along_axis(att[tok], cols, axis=1)
            ye = self.linear(a, fa, fo, pre + f"attn.experts[{m.expert_ids[e]}].o")
            self._accumulate(y, tok, ye, w[tok, slot], pre + "attn")
        queues.append(q_sizes)
        routes.append(idx)
        return wrap(x + y, self.cfg.act, self.log, pre + "attn.residual")


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
    fa, fb, fp = c.act.frac, c.bias.frac, c.pixel.frac
    out: dict[str, np.ndarray] = {}
    gh, gw = sp.grid
    if sp.stem:
        a, b = qm.stem_norm
        fm = cast(pixels.transpose(1, 2, 0) * a + (b << fp), fp + fa, c.act, log, "stem.input")  # (H, W, 3)
        for i, (conv, ql) in enumerate(zip(sp.stem, qm.stem)):
            fm = r.conv(fm, ql, conv.stride, conv.relu, conv.name)
            if i < len(sp.stem) - 1:
                out[conv.name] = fm.reshape(-1)
        pe = fm.reshape(gh * gw, sp.dim)
    else:
        p = sp.patch
        patches = pixels.reshape(3, gh, p, gw, p).transpose(1, 3, 0, 2, 4).reshape(gh * gw, 3 * p * p)
        pe = r.linear(patches, fp, qm.patch_embed, "patch_embed")
    x = np.concatenate(
        [cast(qm.cls_pos[None, :], fb, c.act), wrap(pe + (qm.pos << (fa - fb)), c.act, log, "patch_embed")]
    )
    out["patch_embed"] = x
    queues: list[list[int]] = []
    routes: list[np.ndarray] = []
    for b, qb in zip(sp.blocks, qm.blocks):
        pre = f"blocks.{b.index}."
        if "task_embed" in qb:
            x = wrap(x + (qb["task_embed"][ti][None, :] << (fa - fb)), c.act, log, pre + "task_embed")
        h = out[pre + "norm1"] = r.layernorm(x, qb["ln1"], pre + "norm1")
        if b.attn_is_moe:
            x = out[pre + "attn.moe"] = r.moe_attention(
                x, h, qb["kv"], qb["attn_moe"], b.expert_heads, ti, pre, out, queues, routes
            )
        else:
            qkv = out[pre + "qkv"] = r.linear(h, fa, qb["qkv"], pre + "qkv")
            d = sp.dim
            a = out[pre + "attn"] = r.attention(
                qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :], sp.heads, sp.heads, pre + "attn"
            )
            x = out[pre + "proj"] = wrap(
                x + r.linear(a, fa, qb["proj"], pre + "proj"), c.act, log, pre + "proj.residual"
            )
        h = out[pre + "norm2"] = r.layernorm(x, qb["ln2"], pre + "norm2")
        if b.is_moe:
            x = out[pre + "moe"] = r.moe_mlp(x, h, qb["mlp_moe"], ti, pre, out, queues, routes)
        else:
            hid = out[pre + "fc1"] = r.linear(h, fa, qb["fc1"], pre + "fc1", gelu=True)
            x = out[pre + "mlp"] = wrap(x + r.linear(hid, fa, qb["fc2"], pre + "fc2"), c.act, log, pre + "mlp.residual")
    xn = out["norm"] = r.layernorm(x, qm.norm, "norm")
    if qm.head is not None:
        out["head"] = r.linear(xn[0:1], fa, qm.head, "head")[0]
    return RefResult(out, queues, routes, log)
