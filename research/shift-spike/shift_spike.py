#!/usr/bin/env python3
"""Shift spike for xrayq (issue 13): which recipe levers generalise, measured on honest shift proxies.

Standalone: torch, torchvision, numpy, pillow, scikit-learn only. Trains from scratch (weights=None).

Proxies (all on images never trained on):
  V1  patient-grouped random validation (15 % of the non-held-out data, stratified, hashed like the project)
  V2  "different collection": NORMAL `IM-*` family (first acquisition batch; NORMAL2-IM-* is a second one)
      + PNEUMONIA person id < 400 (earliest id range) held out whole; train on NORMAL2-IM-* and person >= 400
  V3  corrupted copies of V1 (fixed severities and seeds): contrast, gamma, brightness, blur, JPEG, down-up,
      zoom in, zoom out (black border), letterbox, noise

The whole data set is decoded once into a uint8 tensor on the GPU; augmentation and preprocessing run
batched on the GPU (no DataLoader needed: nothing is read per step).

Usage:
  python3 shift_spike.py --data .spike/data --out $OUT --budget 330          # device
  python3 shift_spike.py --data ... --out /tmp/o --tiny                       # CPU smoke test
  python3 shift_spike.py --cpu-bench                                          # CPU step timings (2 threads)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from sklearn.metrics import roc_auc_score

CLASSES = ["NORMAL", "PNEUMONIA"]
NO_EMA = False
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


# ----------------------------------------------------------------------------------------------- data
def patient_group(name: str) -> str:
    for pat in (r"^(person\d+)_", r"^((?:NORMAL2-)?IM-\d+)-"):
        m = re.match(pat, name)
        if m:
            return m.group(1)
    return name


def family(name: str, label: int) -> str:
    if label == 0:
        return "IM" if name.startswith("IM-") else "NORMAL2"
    pid = int(re.match(r"person(\d+)_", name).group(1))
    return "P<400" if pid < 400 else "P>=400"


HELD_FAMILIES = {"IM", "P<400"}


def load(root: str, per_class: int | None, threads: int = 16):
    items = []
    for label, cls in enumerate(CLASSES):
        names = sorted(os.listdir(os.path.join(root, cls)))
        if per_class:
            names = names[:: max(1, len(names) // per_class)][:per_class]
        items += [(cls, n, label) for n in names]

    def dec(it):
        im = Image.open(os.path.join(root, it[0], it[1])).convert("L")
        if im.size != (224, 224):
            im = im.resize((224, 224), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)

    with ThreadPoolExecutor(threads) as pool:
        arrays = list(pool.map(dec, items))
    pixels = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
    labels = np.array([it[2] for it in items])
    names = [it[1] for it in items]
    return pixels, labels, names


def splits(labels, names, val_fraction=0.15, seed=0):
    fam = [family(n, l) for n, l in zip(names, labels)]
    v2 = np.array([i for i, f in enumerate(fam) if f in HELD_FAMILIES])
    rest = [i for i, f in enumerate(fam) if f not in HELD_FAMILIES]
    groups: dict[str, list[int]] = {}
    for i in rest:
        groups.setdefault(patient_group(names[i]), []).append(i)
    by_class: dict[int, list[str]] = {}
    for g, idx in groups.items():
        by_class.setdefault(int(round(np.mean(labels[idx]))), []).append(g)
    v1, tr = [], []
    for _c, gs in sorted(by_class.items()):
        order = sorted(gs, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
        target = max(1, round(val_fraction * sum(len(groups[g]) for g in gs)))
        taken = 0
        for g in order:
            if taken < target:
                v1 += groups[g]
                taken += len(groups[g])
            else:
                tr += groups[g]
    return np.array(sorted(tr)), np.array(sorted(v1)), v2


# ---------------------------------------------------------------------------------------- GPU imaging
def gaussian_blur(x, sigma):
    """x (B,1,H,W); sigma (B,) per-sample std in pixels (<=0.05 -> identity)."""
    B = x.shape[0]
    k = 9
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    s = sigma.clamp(min=0.05).to(x.dtype).view(B, 1)
    w = torch.exp(-0.5 * (r.view(1, k) / s) ** 2)
    w = w / w.sum(1, keepdim=True)
    y = x.reshape(1, B, *x.shape[-2:])
    y = F.pad(y, (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, w.view(B, 1, k, 1), groups=B)
    y = F.conv2d(y, w.view(B, 1, 1, k), groups=B)
    return y.reshape(x.shape)


def equalize(x):
    """Per-image global histogram equalisation of x (B,1,H,W) in [0,1] -> [0,1]."""
    B = x.shape[0]
    q = (x.clamp(0, 1) * 255).round().long().view(B, -1)
    hist = torch.zeros(B, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float32))
    cdf = hist.cumsum(1)
    cmin = cdf.gather(1, q.min(1, keepdim=True).values)
    n = q.shape[1]
    lut = ((cdf - cmin) / (n - cmin).clamp(min=1)).clamp(0, 1)
    return lut.gather(1, q).view_as(x)


def clahe(x, tiles=4, clip=3.0):
    """CLAHE (tiled, clipped histogram equalisation with bilinear LUT interpolation), batched on the GPU."""
    B, _, H, W = x.shape
    th, tw = H // tiles, W // tiles
    Hc, Wc = th * tiles, tw * tiles
    q = (x[:, 0, :Hc, :Wc].clamp(0, 1) * 255).round().long()
    t = q.view(B, tiles, th, tiles, tw).permute(0, 1, 3, 2, 4).reshape(B * tiles * tiles, th * tw)
    hist = torch.zeros(t.shape[0], 256, device=x.device).scatter_add_(1, t, torch.ones_like(t, dtype=torch.float32))
    limit = clip * th * tw / 256.0
    excess = (hist - limit).clamp(min=0).sum(1, keepdim=True)
    hist = hist.clamp(max=limit) + excess / 256.0
    cdf = hist.cumsum(1)
    lut = ((cdf - cdf[:, :1]) / (cdf[:, -1:] - cdf[:, :1]).clamp(min=1e-6)).view(B, tiles * tiles * 256)
    qf = (x[:, 0].clamp(0, 1) * 255).round().long()  # full image (B,H,W)
    # tile-centre coordinates
    yy = (torch.arange(H, device=x.device, dtype=torch.float32) + 0.5) / th - 0.5
    xx = (torch.arange(W, device=x.device, dtype=torch.float32) + 0.5) / tw - 0.5
    y0 = yy.floor().clamp(0, tiles - 1)
    x0 = xx.floor().clamp(0, tiles - 1)
    y1 = (y0 + 1).clamp(max=tiles - 1)
    x1 = (x0 + 1).clamp(max=tiles - 1)
    wy = (yy - y0).clamp(0, 1).view(1, H, 1)
    wx = (xx - x0).clamp(0, 1).view(1, 1, W)
    y0, y1, x0, x1 = (v.long() for v in (y0, y1, x0, x1))
    out = 0
    flat = qf.view(B, -1)
    for ty, wyv in ((y0, 1 - wy), (y1, wy)):
        for tx, wxv in ((x0, 1 - wx), (x1, wx)):
            tidx = (ty.view(H, 1) * tiles + tx.view(1, W)) * 256  # (H,W)
            val = lut.gather(1, (tidx.view(1, -1) + flat)).view(B, H, W)
            out = out + val * wyv * wxv
    return out.unsqueeze(1)


def preprocess(x, prep: str, size: int, crop: float):
    """The candidate 'one preprocessing function': raw grey image in [0,1] (B,1,224,224) -> model input."""
    if crop > 0:
        m = int(round(x.shape[-1] * crop))
        x = x[..., m : x.shape[-2] - m, m : x.shape[-1] - m]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if prep == "fixed":
        x = (x - 0.5) / 0.25
    elif prep == "perimage":
        m = x.mean((2, 3), keepdim=True)
        s = x.std((2, 3), keepdim=True)
        x = (x - m) / (s + 1e-3)
    elif prep == "histeq":
        x = (equalize(x) - 0.5) / 0.29
    elif prep == "clahe":
        x = clahe(x)
        m = x.mean((2, 3), keepdim=True)
        s = x.std((2, 3), keepdim=True)
        x = (x - m) / (s + 1e-3)
    else:
        raise ValueError(prep)
    return x.expand(-1, 3, -1, -1)


AUG = {
    "none": None,
    # today's recipe: RandomAffine(7, translate .05, scale .92-1.08) + ColorJitter(brightness .15, contrast .15)
    "mild": dict(deg=7, tr=0.05, smin=0.92, smax=1.08, ar=0.0, bri=0.15, con=0.15, gam=0.0,
                 blur_p=0.0, noise_p=0.0, downup_p=0.0, out_p=0.0),
    # aimed at acquisition shift: RandomResizedCrop-like zoom (area 0.6-1), some zoom-out with black border,
    # aspect jitter, rotation, brightness/contrast/gamma, blur, noise, down-up resampling
    "strong": dict(deg=10, tr=0.06, smin=1.0, smax=1.29, ar=0.15, bri=0.25, con=0.3, gam=0.4,
                   blur_p=0.3, noise_p=0.3, downup_p=0.2, out_p=0.2),
}


def augment(x, level: str):
    a = AUG[level]
    if a is None:
        return x
    B, dev = x.shape[0], x.device
    U = lambda lo, hi: torch.empty(B, device=dev).uniform_(lo, hi)  # noqa: E731
    ang = U(-a["deg"], a["deg"]) * math.pi / 180
    s = U(a["smin"], a["smax"])  # content magnification (>1 zooms in)
    if a["out_p"] > 0:
        zo = torch.rand(B, device=dev) < a["out_p"]
        s = torch.where(zo, U(0.8, 0.95), s)
    asp = torch.exp(U(-a["ar"], a["ar"])) if a["ar"] > 0 else torch.ones(B, device=dev)
    sx, sy = 1 / (s * asp.sqrt()), asp.sqrt() / s
    room = (1 - 1 / s).clamp(min=0) + a["tr"] * 2
    tx, ty = U(-1, 1) * room, U(-1, 1) * room
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, tx], 1), torch.stack([sin * sx, cos * sy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if a["gam"] > 0:
        x = x.clamp(1e-4, 1) ** torch.exp(U(-a["gam"], a["gam"])).view(B, 1, 1, 1)
    m = x.mean((2, 3), keepdim=True)
    x = (x - m) * (1 + U(-a["con"], a["con"])).view(B, 1, 1, 1) + m
    x = x * (1 + U(-a["bri"], a["bri"])).view(B, 1, 1, 1)
    if a["blur_p"] > 0:
        sig = torch.where(torch.rand(B, device=dev) < a["blur_p"], U(0.3, 1.8), torch.zeros(B, device=dev))
        x = gaussian_blur(x, sig)
    if a["downup_p"] > 0:
        lo = int(torch.randint(64, 129, (1,)).item())
        y = F.interpolate(F.interpolate(x, size=(lo, lo), mode="bilinear", antialias=True), size=x.shape[-2:],
                          mode="bilinear")
        x = torch.where((torch.rand(B, device=dev) < a["downup_p"]).view(B, 1, 1, 1), y, x)
    if a["noise_p"] > 0:
        std = torch.where(torch.rand(B, device=dev) < a["noise_p"], U(0.0, 0.04), torch.zeros(B, device=dev))
        x = x + torch.randn_like(x) * std.view(B, 1, 1, 1)
    return x.clamp(0, 1)


def jpeg(pixels_u8, quality):
    out = []
    for a in pixels_u8[:, 0].cpu().numpy():
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L")))
    return torch.from_numpy(np.stack(out)).unsqueeze(1)


def resize_pad(x, h, w):
    y = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    H, W = x.shape[-2:]
    top, left = (H - h) // 2, (W - w) // 2
    return F.pad(y, (left, W - w - left, top, H - h - top), value=0.0)


def corruptions(x, jpeg_u8, seed=1234):
    """x: float (B,1,224,224) in [0,1]. Returns name -> corrupted float copy. Fixed seeds."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    m = x.mean((2, 3), keepdim=True)
    H = x.shape[-1]
    c = {
        "contrast_0.6": (x - m) * 0.6 + m,
        "contrast_1.5": (x - m) * 1.5 + m,
        "gamma_0.6": x.clamp(1e-4, 1) ** 0.6,
        "gamma_1.6": x.clamp(1e-4, 1) ** 1.6,
        "bright_+0.15": x + 0.15,
        "bright_-0.15": x - 0.15,
        "blur_1.5": gaussian_blur(x, torch.full((x.shape[0],), 1.5, device=x.device)),
        "jpeg_q15": jpeg_u8.to(x.device).float() / 255,
        "downup_64": F.interpolate(F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True),
                                   size=(H, H), mode="bilinear"),
        "zoom_in_0.8": F.interpolate(x[..., int(H * 0.1) : H - int(H * 0.1), int(H * 0.1) : H - int(H * 0.1)],
                                     size=(H, H), mode="bilinear", antialias=True),
        "zoom_out_border": resize_pad(x, int(H * 0.8), int(H * 0.8)),
        "letterbox_4:3": resize_pad(x, int(H * 0.75), H),
        "noise_0.04": x + torch.randn(x.shape, generator=g, device=x.device) * 0.04,
    }
    return {k: v.clamp(0, 1) for k, v in c.items()}


# -------------------------------------------------------------------------------------------- metrics
def ece(p, y, bins=15):
    conf = np.maximum(p, 1 - p)
    pred = (p >= 0.5).astype(int)
    edges = np.linspace(0.5, 1.0, bins + 1)
    e = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi) if lo > 0.5 else (conf >= lo) & (conf <= hi)
        if m.any():
            e += m.mean() * abs((pred[m] == y[m]).mean() - conf[m].mean())
    return float(e)


def sigmoid(z):
    return 1 / (1 + np.exp(-np.clip(z, -40, 40)))


def fit_temperature(z, y):
    ts = np.exp(np.linspace(np.log(0.1), np.log(10), 400))
    nll = [-np.mean(y * np.log(sigmoid(z / t) + 1e-12) + (1 - y) * np.log(1 - sigmoid(z / t) + 1e-12)) for t in ts]
    return float(ts[int(np.argmin(nll))])


def youden_threshold(z, y):
    zs = np.unique(z)
    cands = np.concatenate([[zs[0] - 1], (zs[:-1] + zs[1:]) / 2, [zs[-1] + 1]])
    pos, neg = (y == 1), (y == 0)
    best, keep = -1, []
    for t in cands:
        pr = z > t
        j = pr[pos].mean() + (~pr[neg]).mean() - 1
        if j > best + 1e-12:
            best, keep = j, [t]
        elif abs(j - best) <= 1e-12:
            keep.append(t)
    return float(np.median(keep))


def metrics(z, y, thr, T):
    def at(t):
        pr = (z > t).astype(int)
        sens = float((pr[y == 1] == 1).mean()) if (y == 1).any() else float("nan")
        spec = float((pr[y == 0] == 0).mean()) if (y == 0).any() else float("nan")
        return dict(acc=float((pr == y).mean()), sens=sens, spec=spec)

    out = dict(n=int(len(y)), auc=float(roc_auc_score(y, z)) if len(set(y)) > 1 else float("nan"))
    out["at0.5"] = at(0.0)
    out["atthr"] = at(thr)
    out["ece"] = ece(sigmoid(z), y)
    out["ece_T"] = ece(sigmoid(z / T), y)
    return out


# ------------------------------------------------------------------------------------------ training
ARCH = {"mnv3l": "mobilenet_v3_large", "resnet18": "resnet18", "effb0": "efficientnet_b0",
        "densenet121": "densenet121", "mnv3s": "mobilenet_v3_small"}
COST = {"mnv3l": 1.0, "mnv3s": 0.8, "resnet18": 0.8, "effb0": 1.6, "densenet121": 3.0}

BASE = dict(arch="mnv3l", size=176, prep="fixed", crop=0.0, aug="mild", balance="weights", ls=0.05, epochs=8,
            bs=32, lr=2e-3, wd=1e-4, seed=0)


def build(arch):
    model = torchvision.models.get_model(ARCH[arch], weights=None, num_classes=2)
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.momentum = 0.1  # as the project does (use_fast_batchnorm)
    return model


def train_eval(r, D, dev, deadline, amp=None):
    amp = dev.type == "cuda" if amp is None else amp
    torch.manual_seed(r["seed"])
    np.random.seed(r["seed"])
    model = build(r["arch"]).to(dev).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["wd"], fused=dev.type == "cuda")
    tr_idx = D["train"]
    y_all = D["y_t"]
    n = len(tr_idx)
    spe = math.ceil(n / r["bs"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=spe * r["epochs"], pct_start=0.2)
    ytr = y_all[tr_idx]
    counts = torch.bincount(ytr, minlength=2).float().clamp(min=1)
    weight = (counts.sum() / (2 * counts)) if r["balance"] == "weights" else None
    samp_w = (1.0 / counts)[ytr]
    ema_decay = 0.995
    t0 = time.time()
    steps_done = 0
    aborted = False
    for ep in range(r["epochs"]):
        model.train()
        if r["balance"] == "sampler":
            order = torch.multinomial(samp_w, n, replacement=True)
        else:
            order = torch.randperm(n, device=dev)
        for s in range(spe):
            bi = order[s * r["bs"] : (s + 1) * r["bs"]]
            if len(bi) < 2:
                continue
            idx = tr_idx[bi]
            x = D["pix"][idx].float().div_(255)
            x = augment(x, r["aug"])
            x = preprocess(x, r["prep"], r["size"], r["crop"]).contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y_all[idx], weight=weight, label_smoothing=r["ls"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps_done += 1
            with torch.no_grad():
                ep_ = list(ema.parameters()) + [b for b in ema.buffers() if b.dtype.is_floating_point]
                mp_ = list(model.parameters()) + [b for b in model.buffers() if b.dtype.is_floating_point]
                torch._foreach_lerp_(ep_, mp_, 1 - ema_decay)
        if time.time() > deadline + 25:
            aborted = True
            log(f"  abort {r['name']} after epoch {ep + 1}: past deadline")
            break
    if dev.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t0
    out = {"train_s": train_s, "steps": steps_done, "aborted": aborted, "last_loss": float(loss.item())}
    t1 = time.time()
    zs = {"final": predict_all(model, r, D, amp)}
    if not NO_EMA:
        zs["ema"] = predict_all(ema, r, D, amp)
    out["eval_s"] = time.time() - t1
    return out, zs


@torch.inference_mode()
def predict_all(model, r, D, amp):
    model.eval()
    res = {}
    for name, x in D["eval_sets"].items():
        zl = []
        for i in range(0, x.shape[0], 512):
            xb = x[i : i + 512]
            xb = xb.float().div_(255) if xb.dtype == torch.uint8 else xb
            xb = preprocess(xb, r["prep"], r["size"], r["crop"]).contiguous(memory_format=torch.channels_last)
            with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=amp):
                lo = model(xb).float()
            zl.append((lo[:, 1] - lo[:, 0]).cpu())
        res[name] = torch.cat(zl).numpy()
    return res


def summarise(zs, D):
    yv1, yv2 = D["y_v1"], D["y_v2"]
    z1 = zs["V1"]
    thr = youden_threshold(z1, yv1)
    T = fit_temperature(z1, yv1)
    s = {"thr_z": thr, "T": T, "V1": metrics(z1, yv1, thr, T), "V2": metrics(zs["V2"], yv2, thr, T), "V3": {}}
    for k, z in zs.items():
        if k.startswith("c:"):
            s["V3"][k[2:]] = metrics(z, yv1, thr, T)
    v3 = list(s["V3"].values())
    if v3:
        s["V3mean"] = {
            "auc": float(np.mean([m["auc"] for m in v3])),
            "at0.5": {k: float(np.mean([m["at0.5"][k] for m in v3])) for k in ("acc", "sens", "spec")},
            "atthr": {k: float(np.mean([m["atthr"][k] for m in v3])) for k in ("acc", "sens", "spec")},
            "ece": float(np.mean([m["ece"] for m in v3])),
            "ece_T": float(np.mean([m["ece_T"] for m in v3])),
            "worst_auc": float(min(m["auc"] for m in v3)),
            "worst_spec_thr": float(min(m["atthr"]["spec"] for m in v3)),
            "worst_sens_thr": float(min(m["atthr"]["sens"] for m in v3)),
        }
    return s


def score(s):
    """Generalisation score used to pick the stage-2 anchor: shift proxies only (V2 and V3), threshold from V1."""
    def bal(m):
        return (m["sens"] + m["spec"]) / 2
    v2 = (s["V2"]["auc"] + bal(s["V2"]["atthr"])) / 2
    v3 = (s["V3mean"]["auc"] + bal(s["V3mean"]["atthr"])) / 2
    return (v2 + v3) / 2


def line(name, variant, s, o):
    f = lambda m: f"auc {m['auc']:.3f} acc {m['atthr']['acc']:.3f} se {m['atthr']['sens']:.3f} sp {m['atthr']['spec']:.3f}"  # noqa: E731
    return (f"{name:28s} {variant:5s} | V1 {f(s['V1'])} | V2 {f(s['V2'])} | V3 {f(s['V3mean'])} "
            f"| ece V2 {s['V2']['ece']:.3f}->{s['V2']['ece_T']:.3f} T={s['T']:.2f} | {o['train_s']:.1f}s")


# ---------------------------------------------------------------------------------------------- main
def recipes_stage1():
    R = []
    def add(name, **kw):
        R.append({**BASE, **kw, "name": name})
    add("base(today)")
    add("perimage", prep="perimage")
    add("histeq", prep="histeq")
    add("clahe", prep="clahe")
    add("strongaug", aug="strong")
    add("perimage+strong", prep="perimage", aug="strong")
    add("histeq+strong", prep="histeq", aug="strong")
    add("clahe+strong", prep="clahe", aug="strong")
    return R


def recipes_stage2(anchor):
    R = []
    a = {k: v for k, v in anchor.items() if k != "name"}
    an = anchor["name"]
    def add(name, **kw):
        R.append({**a, **kw, "name": f"{an}|{name}"})
    add("seed1", seed=1)
    R.append({**BASE, "seed": 1, "name": "base(today)|seed1"})
    add("crop8%", crop=0.08)
    add("resnet18", arch="resnet18")
    add("224px", size=224)
    add("128px", size=128)
    add("balanced-sampler", balance="sampler")
    add("no-class-weight", balance="none")
    add("effb0", arch="effb0")
    add("16ep", epochs=16)
    add("ls0", ls=0.0)
    add("densenet121", arch="densenet121")
    add("ls0.1", ls=0.1)
    return R


def est_cost(r):
    return COST[r["arch"]] * (r["size"] / 176) ** 1.5 * r["epochs"] / 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "data"))
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/spike_out"))
    ap.add_argument("--budget", type=float, default=330.0, help="seconds from start after which no recipe starts")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: few images, 1 epoch, 64 px")
    ap.add_argument("--cpu-bench", action="store_true")
    ap.add_argument("--override", default="", help="JSON applied to every recipe, e.g. CPU fallback scale")
    ap.add_argument("--only", default="", help="comma list of stage-1 recipe names, in this order; no stage 2")
    ap.add_argument("--no-ema", action="store_true")
    ap.add_argument("--extra", default="", help="JSON list of recipes (dicts over BASE, each with a name) run instead")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global NO_EMA
    NO_EMA = args.no_ema
    os.makedirs(args.out, exist_ok=True)
    if args.cpu_bench:
        return cpu_bench()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log("gpu", torch.cuda.get_device_name(0), "torch", torch.__version__, "tv", torchvision.__version__)
    deadline = T0 + args.budget
    pix, labels, names = load(args.data, per_class=60 if args.tiny else None)
    tr, v1, v2 = splits(labels, names)
    fam_counts = {}
    for i, (n, l) in enumerate(zip(names, labels)):
        side = "train" if i in set(tr.tolist()) else ("V1" if i in set(v1.tolist()) else "V2")
        key = f"{side}:{family(n, l)}"
        fam_counts[key] = fam_counts.get(key, 0) + 1
    meta = {"n": len(labels), "train": len(tr), "V1": len(v1), "V2": len(v2), "families": fam_counts,
            "train_class": np.bincount(labels[tr], minlength=2).tolist(),
            "V1_class": np.bincount(labels[v1], minlength=2).tolist(),
            "V2_class": np.bincount(labels[v2], minlength=2).tolist()}
    log("data", json.dumps(meta))
    json.dump(meta, open(os.path.join(args.out, "meta.json"), "w"), indent=1)
    pix_d = pix.to(dev)
    x_v1 = pix_d[torch.as_tensor(v1, device=dev)].float() / 255
    jp = jpeg(pix[torch.as_tensor(v1)], 15)
    eval_sets = {"V1": pix_d[torch.as_tensor(v1, device=dev)], "V2": pix_d[torch.as_tensor(v2, device=dev)]}
    for k, v in corruptions(x_v1, jp).items():
        eval_sets["c:" + k] = v
    D = {"pix": pix_d, "y_t": torch.as_tensor(labels, device=dev), "train": torch.as_tensor(tr, device=dev),
         "eval_sets": eval_sets, "y_v1": labels[v1], "y_v2": labels[v2]}
    log("ready: eval sets", {k: tuple(v.shape) for k, v in eval_sets.items()})

    res_path = os.path.join(args.out, "results.jsonl")
    open(res_path, "w").close()
    logits = {"y_v1": labels[v1].astype(np.int8), "y_v2": labels[v2].astype(np.int8)}
    base_time = None
    done = []

    def run(r):
        nonlocal base_time
        if args.tiny:
            r = {**r, "epochs": 1, "size": 64}
        if args.override:
            r = {**r, **json.loads(args.override)}
        est = (base_time or 0) * est_cost(r)
        if base_time is not None and time.time() + est > deadline:
            log(f"skip {r['name']}: est {est:.0f}s, {deadline - time.time():.0f}s left")
            return None
        log("start", r["name"], {k: r[k] for k in BASE})
        o, zs = train_eval(r, D, dev, deadline)
        if base_time is None:
            base_time = (o["train_s"] + o["eval_s"]) / est_cost(r)
        rec = {"recipe": r, **o, "variants": {}}
        for var, z in zs.items():
            s = summarise(z, D)
            rec["variants"][var] = s
            print(line(r["name"], var, s, o), flush=True)
            for k, v in z.items():
                logits[f"{r['name']}/{var}/{k}"] = v.astype(np.float32)
        with open(res_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        np.savez_compressed(os.path.join(args.out, "logits.npz"), **logits)
        done.append(rec)
        return rec

    if args.extra:
        for kw in json.loads(args.extra):
            run({**BASE, **kw})
        log("done", len(done), "recipes")
        return
    if args.only:
        by_name = {r["name"]: r for r in recipes_stage1()}
        extra = {"base(today)|seed1": {**BASE, "seed": 1, "name": "base(today)|seed1"}}
        for name in args.only.split(","):
            run(by_name.get(name) or extra[name])
        log("done", len(done), "recipes")
        return
    stage1 = [x for x in (run(r) for r in recipes_stage1()) if x]
    best = max(stage1, key=lambda rec: score(rec["variants"]["final"]))
    log("anchor:", best["recipe"]["name"], "score", round(score(best["variants"]["final"]), 4),
        {rec["recipe"]["name"]: round(score(rec["variants"]["final"]), 4) for rec in stage1})
    anchor = {**best["recipe"]}
    if args.tiny:
        anchor.update(epochs=BASE["epochs"], size=BASE["size"])
    for r in recipes_stage2(anchor):
        run(r)
    log("done", len(done), "recipes")


def cpu_bench():
    """Seconds per training step (batch 32, fp32, augmentation + preprocessing included) on this CPU."""
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    out = {}
    pix = (torch.rand(256, 1, 224, 224) * 255).to(torch.uint8)
    for arch, size, prep, aug in [("mnv3l", 176, "fixed", "mild"), ("mnv3l", 176, "clahe", "strong"),
                                  ("mnv3l", 128, "clahe", "strong"), ("mnv3l", 224, "clahe", "strong"),
                                  ("resnet18", 176, "clahe", "strong"), ("effb0", 176, "clahe", "strong"),
                                  ("densenet121", 176, "clahe", "strong")]:
        model = build(arch)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        y = torch.randint(0, 2, (32,))
        ts = []
        for i in range(4):
            t = time.time()
            x = augment(pix[i * 32 : (i + 1) * 32].float() / 255, aug)
            x = preprocess(x, prep, size, 0.0)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ts.append(time.time() - t)
        model.eval()
        with torch.inference_mode():
            t = time.time()
            model(preprocess(pix[:128].float() / 255, prep, size, 0.0))
            inf = (time.time() - t) / 128
        key = f"{arch}@{size}/{prep}/{aug}"
        out[key] = {"step_s": float(np.median(ts[1:])), "infer_img_s": inf}
        print(key, out[key], flush=True)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "cpu_bench.json"), "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
