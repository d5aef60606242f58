"""Hand-crafted density features inside the brain mask."""
import numpy as np
from scipy import ndimage as ndi

def feats_one(g, bm):
    g = g.astype(np.float32)
    inner = ndi.binary_erosion(bm, iterations=8)           # stay away from skull partial volume
    if inner.sum() < 500: inner = bm
    v = g[inner]; med = np.median(v); area = inner.sum()
    f = [med, v.std(), np.percentile(v, 90), np.percentile(v, 99)]
    for t in [170, 190, 210, 230, 250]:
        f.append((v >= t).mean())
    for r in [1.4, 1.6, 1.8, 2.0]:
        f.append((v >= r * med).mean())
    for d in [40, 60, 80]:
        f.append((v >= med + d).mean())
    # bright components (relative threshold)
    for thr in [med + 50, med + 70]:
        b = (g >= thr) & inner
        b = ndi.binary_opening(b, iterations=1)
        lab, n = ndi.label(b)
        if n:
            sizes = ndi.sum(b, lab, range(1, n + 1)); k = int(np.argmax(sizes)); L = lab == k + 1
            per = L.sum() - ndi.binary_erosion(L).sum()
            f += [sizes.max() / area, n, sizes.sum() / area, 4 * np.pi * sizes.max() / max(per, 1) ** 2 / 10,
                  g[L].mean() - med]
        else:
            f += [0, 0, 0, 0, 0]
    # left-right asymmetry about image centre column of mask bbox
    xs = np.nonzero(inner.any(0))[0]; cx = (xs.min() + xs.max()) // 2
    gf = g[:, ::-1]; mf = inner[:, ::-1]
    sh = 2 * cx - (g.shape[1] - 1)
    gf = np.roll(gf, sh, 1); mf = np.roll(mf, sh, 1)
    both = inner & mf
    if both.sum() > 100:
        d = g[both] - gf[both]
        f += [np.abs(d).mean(), (d > 40).mean(), (d > 60).mean()]
    else:
        f += [0, 0, 0]
    return np.array(f, np.float32)

def hand_feats(G, BM):
    return np.stack([feats_one(g, b) for g, b in zip(G, BM)])

if __name__ == '__main__':
    from evalf import *
    from sklearn.ensemble import RandomForestClassifier
    for ds in ['head', 'rsna']:
        G = np.load(f'{ds}_crop320.npy'); BM = np.load(f'{ds}_bmask320.npy'); y = np.load(f'{ds}_y.npy')
        H = hand_feats(G, BM); np.save(f'feats/{ds}_hand.npy', H)
        for C in [0.01, 0.1, 1]:
            print(ds, 'hand LR', C, summarize(y, oof(H, y, LR(C))))
        print(ds, 'hand RF', summarize(y, oof(H, y, lambda: RandomForestClassifier(500, min_samples_leaf=2, random_state=0, n_jobs=1))))
