#!/usr/bin/env python3
"""Markdown tables from shift_spike.py's results.jsonl (and per-corruption detail)."""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1] if len(sys.argv) > 1 else "results.jsonl")]
variant = sys.argv[2] if len(sys.argv) > 2 else "final"


def f(m, key="atthr"):
    return f"{m['auc']:.3f} / {m[key]['acc']:.3f} / {m[key]['sens']:.3f} / {m[key]['spec']:.3f}"


print("| recipe | V1 AUC/acc/sens/spec | V2 AUC/acc/sens/spec | V3 mean AUC/acc/sens/spec | V3 worst AUC, spec | "
      "gap AUC V1-V2 / V1-V3 | V2 at 0.5: acc/sens/spec | ECE V1, V2, V3 raw -> T | T | train s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    s = r["variants"][variant]
    v1, v2, v3 = s["V1"], s["V2"], s["V3mean"]
    print(f"| {r['recipe']['name']} | {f(v1)} | {f(v2)} | {f(v3)} | {v3['worst_auc']:.3f}, {v3['worst_spec_thr']:.3f} | "
          f"{v1['auc'] - v2['auc']:+.3f} / {v1['auc'] - v3['auc']:+.3f} | "
          f"{v2['at0.5']['acc']:.3f}/{v2['at0.5']['sens']:.3f}/{v2['at0.5']['spec']:.3f} | "
          f"{v1['ece']:.3f}->{v1['ece_T']:.3f}, {v2['ece']:.3f}->{v2['ece_T']:.3f}, {v3['ece']:.3f}->{v3['ece_T']:.3f} | "
          f"{s['T']:.2f} | {r['train_s']:.0f} |")
print()
names = list(rows[0]["variants"][variant]["V3"].keys())
print("| recipe | " + " | ".join(names) + " |")
print("|---|" + "---|" * len(names))
for r in rows:
    v = r["variants"][variant]["V3"]
    print(f"| {r['recipe']['name']} | " + " | ".join(f"{v[n]['auc']:.2f}/{v[n]['atthr']['spec']:.2f}" for n in names) + " |")
