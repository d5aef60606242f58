"""Load both datasets, head-crop, cache as npy."""
import sys, numpy as np, pandas as pd
sys.path.insert(0, '/work/main/src')
from ichscan.io.image import read_grey
from scipy import ndimage as ndi
from PIL import Image

D = '/work/shared/data'

def load_labels():
    h = pd.read_csv(f'{D}/head_ct/labels.csv', dtype=str, skipinitialspace=True)
    h.columns = [c.strip() for c in h.columns]
    h['id'] = h['id'].str.strip().str.zfill(3); h['y'] = h['hemorrhage'].astype(int)
    r = pd.read_csv(f'{D}/rsna_png/labels.csv'); r['y'] = r['any'].astype(int)
    return h[['id', 'y']], r[['id', 'y']]

def head_mask(g, thr=30):
    m = g > thr
    m = ndi.binary_opening(m, iterations=2)          # detach thin table arcs / text strokes
    lab, n = ndi.label(m)
    if n == 0:
        return np.ones_like(g, bool)
    sizes = ndi.sum(m, lab, range(1, n + 1))
    m = lab == (1 + int(np.argmax(sizes)))
    m = ndi.binary_fill_holes(m)
    return ndi.binary_dilation(m, iterations=2)

def brain_mask(g, hm, bone=245):
    """inside of skull: non-bone tissue within the head, eroded, largest comp, holes filled."""
    soft = hm & (g < bone) & (g > 5)
    soft = ndi.binary_erosion(soft, iterations=3)
    lab, n = ndi.label(soft)
    if n == 0:
        return hm
    sizes = ndi.sum(soft, lab, range(1, n + 1))
    b = lab == (1 + int(np.argmax(sizes)))
    b = ndi.binary_fill_holes(b)
    return ndi.binary_dilation(b, iterations=2) & hm

def crop_square(g, m, size, margin=0.04):
    ys, xs = np.nonzero(m)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0; s = int(max(h, w) * (1 + 2 * margin))
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    out = np.zeros((s, s), g.dtype)
    sy0, sx0 = cy - s // 2, cx - s // 2
    gy0, gx0 = max(sy0, 0), max(sx0, 0); gy1, gx1 = min(sy0 + s, g.shape[0]), min(sx0 + s, g.shape[1])
    out[gy0 - sy0:gy1 - sy0, gx0 - sx0:gx1 - sx0] = g[gy0:gy1, gx0:gx1]
    return np.asarray(Image.fromarray(out).resize((size, size), Image.BILINEAR))

def process(g, size):
    hm = head_mask(g)
    bm = brain_mask(g, hm)
    raw = np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR))
    crop = crop_square(g * hm, hm, size)                    # head crop, outside-head zeroed (letters/table gone)
    bmc = crop_square((bm * 255).astype(np.uint8), hm, size) > 127
    return raw, crop, bmc

if __name__ == '__main__':
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 320
    h, r = load_labels()
    for name, df, sub in [('head', h, 'head_ct'), ('rsna', r, 'rsna_png')]:
        R, C, B = [], [], []
        for i in df['id']:
            g = read_grey(f'{D}/{sub}/images/{i}.png')
            a, c, b = process(g, size); R.append(a); C.append(c); B.append(b)
        np.save(f'{name}_raw{size}.npy', np.stack(R)); np.save(f'{name}_crop{size}.npy', np.stack(C))
        np.save(f'{name}_bmask{size}.npy', np.stack(B)); np.save(f'{name}_y.npy', df['y'].values)
        print(name, len(df), df['y'].mean())
