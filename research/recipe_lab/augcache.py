"""Cache frozen lite0 spatial maps for augmented views (view 0 = identity, 1 = hflip, 2.. = random aug)."""
import sys, os, time, numpy as np, torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
torch.set_num_threads(2)
from feats import load, MEAN, STD

def augment(x, rng):
    """x: [1,1,H,W] float in [0,1]."""
    if rng.random() < 0.5: x = x.flip(-1)
    ang = rng.uniform(-15, 15); sc = rng.uniform(0.9, 1.1)
    H = x.shape[-1]; tx, ty = rng.uniform(-0.06, 0.06, 2) * H
    x = TF.affine(x, angle=ang, translate=[float(tx), float(ty)], scale=sc, shear=[0.0, 0.0],
                  interpolation=TF.InterpolationMode.BILINEAR)
    x = x.clamp(0, 1) ** rng.uniform(0.85, 1.15)
    x = (x - 0.5) * rng.uniform(0.9, 1.1) + 0.5 + rng.uniform(-0.05, 0.05)
    return x.clamp(0, 1)

@torch.no_grad()
def maps(m, x):
    x = m._swish(m._bn0(m._conv_stem(x))); out = {}
    for i, blk in enumerate(m._blocks):
        x = blk(x)
        if i == 10: out['s5'] = x
        if i == 14: out['s6'] = x
    x = m._swish(m._bn1(m._conv_head(m._blocks[15](out['s6']))))
    out['hd'] = x
    return out

if __name__ == '__main__':
    arch, variant, res, nviews = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    m = load(arch).to(memory_format=torch.channels_last)
    od = f'aug_{arch}_{variant}_{res}'; os.makedirs(od, exist_ok=True)
    data = {}
    for ds in ['head', 'rsna']:
        g = np.load(f'{ds}_crop320.npy').astype(np.float32) / 255
        if variant == 'brain': g = g * np.load(f'{ds}_bmask320.npy')
        data[ds] = torch.from_numpy(g)[:, None]
    for v in range(nviews):
        for ds in ['head', 'rsna']:
            fn = f'{od}/{ds}_v{v}.npz'
            if os.path.exists(fn): continue
            t0 = time.time(); c0 = time.process_time()
            rng = np.random.default_rng(1000 * v + (ds == 'rsna'))
            X = data[ds]
            if v == 1: X = X.flip(-1)
            elif v >= 2: X = torch.cat([augment(X[i:i + 1], rng) for i in range(len(X))])
            X = F.interpolate(X, size=(res, res), mode='bilinear', antialias=True, align_corners=False)
            X = ((X.repeat(1, 3, 1, 1) - MEAN) / STD).contiguous(memory_format=torch.channels_last)
            outs = {k: [] for k in ['s5', 's6', 'hd']}
            for b in range(0, len(X), 25):
                o = maps(m, X[b:b + 25])
                for k in outs: outs[k].append(o[k].float().contiguous().numpy().astype(np.float16))
            np.savez(fn, **{k: np.concatenate(val) for k, val in outs.items()})
            print(ds, 'view', v, f'wall {time.time()-t0:.1f}s cpu {time.process_time()-c0:.1f}s', flush=True)
