"""MoDeGPT's attention solvers on a model with q/k/v biases: per layer, what the bias-blind solvers
(before 2026-12-07) predicted, what they achieved, and what the affine solvers achieve.

    python bench/modegpt_parts.py --model ~/.cache/compress-models/qwen2.5-coder-0.5b --data-dir ../shared/data

Statistics: the attention input of every layer of the dense model over the protocol's calibration set
(its Gram, sum and token count). At ratio 0.25 with a uniform allocation every layer keeps 48 of 64
query/key dimensions (24 rotary pairs) and a value/output rank of 48 per key-value group; these
columns take those widths:

* vo_predicted_blind: the relative whitened error the bias-blind SVD reports (dropped singular values
  of the stacked O_h W_v without the bias);
* vo_actual_blind: the relative error of that factorization on the affine value path (bias projected
  by the same map, as the pass did);
* vo_actual_affine: the same for the SVD of [W_v | b_v] on [x; 1] (the exact optimum);
* bias_share_q / bias_share_k: the share of the query/key projections' output energy that the bias
  terms add (2 b·Wx̄ + n b² over the total);
* qk_dropped_blind / qk_dropped_affine: the share of the query–key score energy (bias included) in
  the rotary pairs each selection drops.

The MLP part has no bias in this family; its Nyström error is the same with and without the change.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from common import device_name, parser, protocol_for


def main() -> None:
    ap = parser(__doc__, "modegpt_qwen_parts", rows=False)
    ap.add_argument("--keep", type=int, default=48, help="kept query/key and value/output width of 64")
    args = ap.parse_args()
    protocol = protocol_for(args)
    from compress.calib.data import CalibConfig, calibration_ids
    from compress.models import load_model
    from compress.solvers.modular import affine_system, cr_qk, qk_energy, svd_vo, vo_errors

    model, tok, _ = load_model(args.model, dtype="float32", device="cpu")
    c = protocol["calibration"]
    ids = calibration_ids(tok, CalibConfig(source="c4", samples=c["samples"], seqlen=c["seqlen"], seed=c["seed"]), args.data_dir)
    layers = model.model.layers
    sums: dict[int, list] = {}

    def hook(i: int):  # type: ignore[no-untyped-def]
        def f(_m, a):  # type: ignore[no-untyped-def]
            x = a[0].reshape(-1, a[0].shape[-1]).double()
            s = sums.setdefault(i, [0, 0, 0])
            s[0], s[1], s[2] = s[0] + x.T @ x, s[1] + x.sum(0), s[2] + x.shape[0]
        return f

    for i, layer in enumerate(layers):
        layer.self_attn.q_proj.register_forward_pre_hook(hook(i))
    with torch.no_grad():
        for b in range(0, ids.shape[0], 4):
            model(input_ids=ids[b : b + 4], use_cache=False)
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    HD = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    rep, r, half = H // KV, args.keep, HD // 2
    rows = []
    for i, layer in enumerate(layers):
        C, s, n = sums[i]
        a = layer.self_attn
        Wq, Wk, Wv, Wo = (a.get_submodule(m).weight.detach().double() for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
        bq, bk, bv = (a.get_submodule(m).bias.detach().double() for m in ("q_proj", "k_proj", "v_proj"))
        Ca, (Wqa, Wka, Wva) = affine_system(C, s, n, [Wq, Wk, Wv], [bq, bk, bv])

        def vo_error(V2a: torch.Tensor, O2: torch.Tensor) -> float:
            err = tot = 0.0
            for g in range(KV):
                Os = torch.cat([Wo[:, h * HD : (h + 1) * HD] for h in range(g * rep, (g + 1) * rep)])
                O2s = torch.cat([O2[:, h * r : (h + 1) * r] for h in range(g * rep, (g + 1) * rep)])
                F = Os @ Wva[g * HD : (g + 1) * HD]
                E = F - O2s @ V2a[g * r : (g + 1) * r]
                err += float(((E @ Ca) * E).sum())
                tot += float(((F @ Ca) * F).sum())
            return err / tot

        V2, O2, T = svd_vo(Wv, Wo, C, H, KV, HD, r)
        b2 = torch.einsum("grh,gh->gr", T, bv.view(KV, HD)).reshape(-1)
        blind = vo_error(torch.cat([V2, b2[:, None]], 1), O2)
        V3, O3, _ = svd_vo(Wva, Wo, Ca, H, KV, HD, r)
        eq = qk_energy(Wqa, Ca).view(KV, rep, HD)
        ek = qk_energy(Wka, Ca).view(KV, 1, HD)
        score = (eq * ek).sum(1)
        score = score[:, :half] + score[:, half:]

        def dropped(idx: torch.Tensor) -> float:
            return 1 - float(score.gather(1, idx[:, : r // 2]).sum() / score.sum())

        def bias_share(W: torch.Tensor, Wa: torch.Tensor) -> float:
            return 1 - float(qk_energy(W, C).sum() / qk_energy(Wa, Ca).sum())

        rows.append({
            "layer": i, "vo_predicted_blind": round(vo_errors(Wv, Wo, C, H, KV, HD, [r])[0], 4), "vo_actual_blind": round(blind, 4),
            "vo_actual_affine": round(vo_error(V3, O3), 4), "bias_share_q": round(bias_share(Wq, Wqa), 3),
            "bias_share_k": round(bias_share(Wk, Wka), 3), "qk_dropped_blind": round(dropped(cr_qk(Wq, Wk, C, H, KV, HD, r // 2)), 4),
            "qk_dropped_affine": round(dropped(cr_qk(Wqa, Wka, Ca, H, KV, HD, r // 2)), 4),
        })
        print(rows[-1], flush=True)
    out = Path(args.out)
    data = {"protocol": protocol, "device": device_name(), "keep": r, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    cols = list(rows[0])
    mean = {k: round(sum(x[k] for x in rows) / len(rows), 4) for k in cols[1:]}
    lines = [f"# MoDeGPT's attention solvers with q/k/v biases: {protocol['model']}, width {r} of {HD}", "",
             f"Device: {data['device']}.", "", f"Protocol: {json.dumps(protocol)}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(x[k]) for k in cols) + " |" for x in rows]
    lines += ["| mean | " + " | ".join(str(mean[k]) for k in cols[1:]) + " |", "", __doc__.split("\n\n", 2)[2].strip()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
