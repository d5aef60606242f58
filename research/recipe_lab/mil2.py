"""Multi-scale MIL head (native-res per-scale 1x1 convs) on cached frozen lite0 maps; mixed training with per-dataset bias."""
import sys, glob, time, numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from sklearn.metrics import roc_auc_score, accuracy_score
torch.set_num_threads(2)
DS = ['head', 'rsna']

def load_views(od, ds, nmax=99):
    vs = sorted(glob.glob(f'{od}/{ds}_v*.npz'), key=lambda s: int(s.split('_v')[-1][:-4]))[:nmax]
    A, B = [], []
    for f in vs:
        z = np.load(f)
        A.append(torch.from_numpy(z['s5'].astype(np.float32)))
        B.append(torch.from_numpy(np.concatenate([z['s6'], z['hd']], 1).astype(np.float32)))
    return torch.stack(A), torch.stack(B)   # [V,N,112,16,16], [V,N,1472,8,8]

class Head(nn.Module):
    def __init__(self, ca, cb, hid=64, drop=0.3, r=5.0, nds=2):
        super().__init__()
        self.na, self.nb = nn.BatchNorm2d(ca), nn.BatchNorm2d(cb)
        self.da, self.db = nn.Dropout2d(drop), nn.Dropout2d(drop)
        self.ca, self.cb = nn.Conv2d(ca, hid, 1), nn.Conv2d(cb, hid, 1)
        self.out = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Conv2d(hid, 1, 1))
        self.bias = nn.Parameter(torch.zeros(nds)); self.r = r
    def forward(self, a, b, d):
        h = self.ca(self.da(self.na(a))) + F.interpolate(self.cb(self.db(self.nb(b))), scale_factor=2, mode='nearest')
        s = self.out(h).flatten(1)
        z = torch.logsumexp(self.r * s, 1) / self.r - np.log(s.shape[1]) / self.r
        return z + self.bias[d]

def train_head(A, B, D, y, epochs=30, lr=1e-3, wd=1e-2, bs=32, seed=0, smooth=0.1, **kw):
    torch.manual_seed(seed); rng = np.random.default_rng(seed)
    h = Head(A.shape[2], B.shape[2], **kw); opt = torch.optim.AdamW(h.parameters(), lr=lr, weight_decay=wd)
    V, N = A.shape[:2]; steps = epochs * ((N + bs - 1) // bs)
    sch = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    yt = torch.tensor(y, dtype=torch.float32) * (1 - smooth) + smooth / 2; D = torch.as_tensor(D)
    for ep in range(epochs):
        perm = rng.permutation(N)
        for b0 in range(0, N, bs):
            idx = perm[b0:b0 + bs]; v = rng.integers(0, V, len(idx))
            loss = F.binary_cross_entropy_with_logits(h(A[v, idx], B[v, idx], D[idx]), yt[idx])
            opt.zero_grad(); loss.backward(); opt.step(); sch.step()
    return h.eval()

def run(X, y, seeds=(0, 1), test_views=(0, 1), nseeds_model=1, **kw):
    res = {ds: [] for ds in DS}; t0 = time.time(); c0 = time.process_time()
    for s in seeds:
        folds = {ds: list(StratifiedKFold(5, shuffle=True, random_state=s).split(y[ds], y[ds])) for ds in DS}
        p = {ds: np.zeros(len(y[ds])) for ds in DS}
        for k in range(5):
            tr = {ds: folds[ds][k][0] for ds in DS}
            A = torch.cat([X[ds][0][:, tr[ds]] for ds in DS], 1); B = torch.cat([X[ds][1][:, tr[ds]] for ds in DS], 1)
            D = np.concatenate([np.full(len(tr[ds]), i) for i, ds in enumerate(DS)])
            yy = np.concatenate([y[ds][tr[ds]] for ds in DS])
            hs = [train_head(A, B, D, yy, seed=1000 * m + s * 10 + k, **kw) for m in range(nseeds_model)]
            with torch.no_grad():
                for i, ds in enumerate(DS):
                    te = folds[ds][k][1]; dd = torch.full((len(te),), i)
                    p[ds][te] = np.mean([torch.sigmoid(h(X[ds][0][v, te], X[ds][1][v, te], dd)).numpy()
                                         for h in hs for v in test_views], 0)
        for ds in DS: res[ds].append(p[ds].copy())
    out = {ds: (round(np.mean([roc_auc_score(y[ds], p) for p in res[ds]]), 4),
                round(np.mean([accuracy_score(y[ds], p > 0.5) for p in res[ds]]), 4)) for ds in DS}
    return out, res, (time.time() - t0, time.process_time() - c0)

if __name__ == '__main__':
    od = sys.argv[1]; seeds = tuple(int(s) for s in sys.argv[2].split(','))
    X = {ds: load_views(od, ds) for ds in DS}; y = {ds: np.load(f'{ds}_y.npy') for ds in DS}
    import json
    for name, kw in json.loads(sys.argv[3]).items():
        o, res, t = run(X, y, seeds=seeds, **kw)
        np.save(f'oof_{name}.npy', np.array([np.concatenate(res[ds]) for ds in DS], dtype=object), allow_pickle=True)
        print(name, kw, o, f'wall {t[0]:.0f}s cpu {t[1]:.0f}s', flush=True)
