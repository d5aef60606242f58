import sys, numpy as np, warnings
warnings.filterwarnings('ignore')
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.pipeline import make_pipeline
from sklearn.model_selection import StratifiedKFold
from sklearn.metrics import roc_auc_score, accuracy_score

def boot_ci(y, p, fn, n=2000, seed=0):
    rng = np.random.default_rng(seed); v = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if y[i].min() == y[i].max(): continue
        v.append(fn(y[i], p[i]))
    return np.percentile(v, [2.5, 97.5])

def oof(X, y, make, seeds=(0, 1), Xtta=None):
    """returns list of OOF prob arrays, one per fold seed. Xtta: list of extra views averaged at predict."""
    res = []
    for s in seeds:
        p = np.zeros(len(y))
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=s).split(X, y):
            clf = make().fit(X[tr], y[tr])
            views = [X] + (Xtta or [])
            p[te] = np.mean([clf.predict_proba(V[te])[:, 1] for V in views], 0)
        res.append(p)
    return res

def summarize(y, ps, thr=0.5):
    aucs = [roc_auc_score(y, p) for p in ps]; accs = [accuracy_score(y, p > thr) for p in ps]
    return np.mean(aucs), np.mean(accs)

def LR(C): return lambda: make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))
