"""Best recipe found (ichscan recipe lab). Run: /work/main/.venv/bin/python best_recipe.py [fold_seeds=2,3] [--rebuild]
Pipeline per image: read_grey -> head crop (largest >30 component, filled, square bbox +4% margin, outside-head zeroed)
-> brain mask (non-bone <245 tissue inside head, eroded 3, largest comp, filled, dilated 2) -> brain-only image.
Model: frozen ImageNet EfficientNet-Lite0 @256 (grey x3, ImageNet mean/std), spatial maps of block 10 (112ch 16x16),
block 14 (192ch 8x8) and conv head (1280ch 8x8) for 8 views/image (identity, hflip, 6 random augs);
trainable multi-scale MIL head (BN, Dropout2d .3, 1x1 convs -> 64, ReLU, 1x1 -> logit map, LSE pooling r=5,
per-dataset bias), trained on head_ct+rsna together (AdamW 1e-3 wd 1e-2, one-cycle, 30 epochs, bs 32,
label smoothing .1, one random view per image per epoch). Test: mean prob over identity+flip views.
Plus hand-crafted density features in the brain mask -> RandomForest(500, leaf 2) per dataset.
Plus LR(C=.01, standardised) per dataset on avg+max pooled maps of all 8 views (test: id+flip).
Final score = 0.5*logit(p_MIL) + 0.25*logit(p_RF) + 0.25*logit(p_LR); decision threshold 0 (prob 0.5).
Uses sibling modules prep.py, augcache.py, hand.py, mil2.py, evalf.py in this folder."""
import sys, os, time, subprocess, numpy as np, torch
os.chdir(os.path.dirname(os.path.abspath(__file__)))
from scipy.special import logit
from sklearn.model_selection import StratifiedKFold
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score, accuracy_score
from evalf import boot_ci
import mil2, hand, augpool
from evalf import LR
torch.set_num_threads(2)
PY = sys.executable; OD = 'aug_lite0_brain_256'; DS = ['head', 'rsna']
W_MIL, W_HAND, W_POOL = 0.5, 0.25, 0.25; NVIEWS = 8

def main():
    seeds = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith('--') else '2,3').split(',')]
    t0 = time.time(); c0 = time.process_time()
    if '--rebuild' in sys.argv or not os.path.exists('rsna_crop320.npy'):
        subprocess.run([PY, 'prep.py', '320'], check=True)
    if '--rebuild' in sys.argv or not os.path.exists(f'{OD}/rsna_v{NVIEWS-1}.npz'):
        if '--rebuild' in sys.argv: subprocess.run(['rm', '-rf', OD])
        subprocess.run([PY, 'augcache.py', 'lite0', 'brain', '256', str(NVIEWS)], check=True)
    print(f'preprocessing+feature cache (this process; children not counted in cpu): wall {time.time()-t0:.0f}s', flush=True)
    X = {ds: mil2.load_views(OD, ds) for ds in DS}; y = {ds: np.load(f'{ds}_y.npy') for ds in DS}
    H = {ds: hand.hand_feats(np.load(f'{ds}_crop320.npy'), np.load(f'{ds}_bmask320.npy')) for ds in DS}
    P = {ds: augpool.pooled(OD, ds) for ds in DS}   # [V,N,3168] avg+max pooled s5,s6,head maps
    L = lambda p: logit(np.clip(p, 1e-4, 1 - 1e-4))
    res = {ds: {'mil': [], 'rf': [], 'pool': [], 'comb': []} for ds in DS}; times = []
    for s in seeds:
        folds = {ds: list(StratifiedKFold(5, shuffle=True, random_state=s).split(y[ds], y[ds])) for ds in DS}
        pm = {ds: np.zeros(len(y[ds])) for ds in DS}; pr = {ds: np.zeros(len(y[ds])) for ds in DS}; pq = {ds: np.zeros(len(y[ds])) for ds in DS}
        for k in range(5):
            tw, tc = time.time(), time.process_time()
            tr = {ds: folds[ds][k][0] for ds in DS}
            A = torch.cat([X[ds][0][:, tr[ds]] for ds in DS], 1); B = torch.cat([X[ds][1][:, tr[ds]] for ds in DS], 1)
            D = np.concatenate([np.full(len(tr[ds]), i) for i, ds in enumerate(DS)])
            h = mil2.train_head(A, B, D, np.concatenate([y[ds][tr[ds]] for ds in DS]), seed=s * 10 + k)
            rfs = {ds: RandomForestClassifier(500, min_samples_leaf=2, random_state=k, n_jobs=1).fit(H[ds][tr[ds]], y[ds][tr[ds]]) for ds in DS}
            lrs = {ds: LR(0.01)().fit(P[ds][:, tr[ds]].reshape(-1, P[ds].shape[2]), np.tile(y[ds][tr[ds]], P[ds].shape[0])) for ds in DS}
            times.append((time.time() - tw, time.process_time() - tc))
            with torch.no_grad():
                for i, ds in enumerate(DS):
                    te = folds[ds][k][1]; dd = torch.full((len(te),), i)
                    pm[ds][te] = np.mean([torch.sigmoid(h(X[ds][0][v, te], X[ds][1][v, te], dd)).numpy() for v in (0, 1)], 0)
                    pr[ds][te] = rfs[ds].predict_proba(H[ds][te])[:, 1]
                    pq[ds][te] = np.mean([lrs[ds].predict_proba(P[ds][v, te])[:, 1] for v in (0, 1)], 0)
        for ds in DS:
            res[ds]['mil'].append(pm[ds].copy()); res[ds]['rf'].append(pr[ds].copy()); res[ds]['pool'].append(pq[ds].copy())
            res[ds]['comb'].append(W_MIL * L(pm[ds]) + W_HAND * L(pr[ds]) + W_POOL * L(pq[ds]))
    np.save('oof_best_recipe.npy', np.array([res[ds]['comb'] for ds in DS], dtype=object), allow_pickle=True)
    print(f'fold seeds {seeds}; per-model training (MIL head + RF + pooled LR, features cached): wall {np.mean([t[0] for t in times]):.1f}s cpu {np.mean([t[1] for t in times]):.1f}s')
    for ds in DS:
        for nm, thr in [('mil', 0.5), ('rf', 0.5), ('pool', 0.5), ('comb', 0.0)]:
            ps = res[ds][nm]
            aucs = [roc_auc_score(y[ds], p) for p in ps]; accs = [accuracy_score(y[ds], p > thr) for p in ps]
            pa = np.mean([p > thr for p in ps], 0)   # CI: bootstrap over images, seed-averaged scores
            pavg = np.mean(ps, 0)
            ci_auc = boot_ci(y[ds], pavg, roc_auc_score); ci_acc = boot_ci(y[ds], pavg, lambda a, b: accuracy_score(a, b > thr))
            print(f'{ds:4s} n={len(y[ds])} {nm:4s}: AUC {np.mean(aucs):.3f} (per seed {[round(a,3) for a in aucs]}, 95% CI {ci_auc[0]:.3f}-{ci_auc[1]:.3f}) '
                  f'acc {np.mean(accs):.3f} (per seed {[round(a,3) for a in accs]}, 95% CI {ci_acc[0]:.3f}-{ci_acc[1]:.3f})', flush=True)
    print(f'total wall {time.time()-t0:.0f}s')

if __name__ == '__main__':
    main()
