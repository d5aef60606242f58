"""Pooled features from cached augmented views; LR trained on all views (feature-level augmentation)."""
import sys, glob, numpy as np, time, warnings
warnings.filterwarnings('ignore')
from evalf import *
def pooled(od, ds, layers=('s5', 's6', 'hd')):
    vs = sorted(glob.glob(f'{od}/{ds}_v*.npz'), key=lambda s: int(s.split('_v')[-1][:-4]))
    out = []
    for f in vs:
        z = np.load(f); fs = []
        for k in layers:
            a = z[k].astype(np.float32); fs += [a.mean((2, 3)), a.max((2, 3))]
        out.append(np.concatenate(fs, 1))
    return np.stack(out)  # V,N,F
def oof_aug(P, y, make, seeds=(0, 1), train_views=None, test_views=(0, 1)):
    V = P.shape[0]; train_views = range(V) if train_views is None else train_views; res = []
    for s in seeds:
        p = np.zeros(len(y))
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=s).split(y, y):
            Xtr = np.concatenate([P[v, tr] for v in train_views]); ytr = np.tile(y[tr], len(train_views))
            clf = make().fit(Xtr, ytr)
            p[te] = np.mean([clf.predict_proba(P[v, te])[:, 1] for v in test_views], 0)
        res.append(p)
    return res
if __name__ == '__main__':
    od = sys.argv[1]
    for ds in ['head', 'rsna']:
        y = np.load(f'{ds}_y.npy'); P = pooled(od, ds); np.save(f'feats/{ds}_{od}_pooled.npy', P)
        for tv in [[0, 1], None]:
            for C in [0.003, 0.01, 0.03]:
                t = time.time()
                a, c = summarize(y, oof_aug(P, y, LR(C), train_views=tv))
                print(ds, 'views', 'all' if tv is None else tv, C, f'AUC {a:.3f} acc {c:.3f}', f'{time.time()-t:.0f}s', flush=True)
