"""Every dataset of the five scripts: three built-in synthetic ones, generated on the fly, and
loaders for the real datasets in the folder layouts their official code expects.

    get_dataset(name, root=None, split="train", size=None, check_files=True, **options) -> Dataset

`root` defaults to data/<name>; `size` is an int (square; for the 2:1 street sets, the height)
or (H, W); None gives the dataset's default (the paper's size for the real sets). Every problem
with the files on disk raises common.UserError with one sentence naming the path and the
expected layout; the scripts print it and exit with status 2. A real set is checked when it is
built (check_at_start: every label / instance / sketch / caption file an image needs is there,
and every file's header is readable, of a mode the loader reads, its maps the image's size),
so a bad file stops a run at start-up, all of them named. `python data.py --check NAME` reads
every file of every item, prints each bad one with its reason and exits with status 2 if any.

Every item is a dict; a dataset provides the keys in its `has` set:

    image     float32 (C, H, W) in [-1, 1]
    label     int64 (H, W) class ids in [0, num_classes)
    instance  int64 (H, W) contiguous instance ids 0..K-1 (INADE's instance maps)
    sketch    float32 (1, H, W) in {0, 1}, 1 on an edge
    caption   str
    style     float32 (C, H, W) in [-1, 1], a style reference (shapes)
    lowres    float32 (C, H/8, W/8), the 8x box-downsampled image (shapes, folder)
    class     int64 () class index (letters; folder with class sub-folders)
    widths    float32 (2,) rectangle widths (hshape)
    inst_*    shapes ground truth (below)
    name      str, the file stem (real sets), for writing results

and every dataset has the attributes `num_classes` (one-hot channels of `label`, including a
don't-care channel where the official code adds one; 0 without labels), `channels` (3 or 1),
`size` (H, W), `has`, `class_names`, `palette` (uint8 (num_classes, 3) colours for drawing
label maps) and `len()`.

Built-in synthetic sets (no files; an item is a pure function of (seed option, split, index);
options `seed`=0 and `length`=10_000; sizes multiples of 8 from 32 to 256, default 64):

    shapes   background + 1-4 objects (circle, square, triangle, striped diamond) whose colours
             come from a class-conditional palette with 2-3 named modes per class. Gives image,
             label, instance, sketch, caption, style, lowres and the exact ground truth.
    hshape   uMM-GAN's Fig. 6 toy: two white rectangles whose widths fill an H-shaped region.
    letters  glyphs drawn with Pillow's bundled scalable font in random styles (option
             `letters`, default "AB"; "all" = the 62 alphanumerics), grayscale.

shapes ground truth, rows padded to MAX_INSTANCES = 4 so that default collation works; instance
0 is the background and object j (drawing order) is instance j + 1 and row j:

    inst_class int64 (4,)   class 1..4 (0 = padding)      inst_mode  int64 (4,) palette mode (-1)
    inst_color float32 (4, 3) RGB in [0, 1]               inst_box   int64 (4, 4) y0, x0, y1, x1
    inst_valid bool (4,)                                  (exclusive ends, visible pixels)

Exact scores (no learned network) come from the palette: SHAPES_CLASSES, SHAPES_COLOURS,
SHAPES_MODE_NAMES, SHAPES_PALETTE, SHAPES_MODE_WEIGHTS and shapes_mode_assignment,
shapes_measure_colours, shapes_colour_fidelity, shapes_mode_coverage, shapes_caption_objects,
shapes_find_objects and shapes_caption_accuracy; for
hshape: hshape_sample, hshape_region, hshape_measure, hshape_jaccard.

Real sets (layouts in DATASETS[name]["layout"]): deepfashion, cityscapes, ade20k, celebamask-hq,
coco-stuff, mm-celeba-hq, gta5, folder, folder-pairs. Their transforms, label encodings,
instance maps, sketches and caption choice are described at FileDataset. In a folder,
sub-folders named after a split (cars_train / cars_test, trainA / testB, val) hold that split
only (scan_folder), so a test split is never trained on.

Map of this file: helpers (splits, tensors, edges, instance re-indexing, sketches, palettes)
-> shapes (palette, scene, drawing, captions, scoring helpers) -> hshape -> letters -> real
datasets (reading, label encodings, transforms, file checks, one scanner per layout) ->
registry and get_dataset -> start-up check and full scan -> benchmark, preview and main ->
each script's scores on the built-in data (poe_gan, inade, cimle, compose_diffusion, ummgan).

    python data.py --bench                    # items/s of the synthetic sets, one thread
    python data.py --preview shapes           # a sample grid in /tmp/data_preview_shapes.png
    python data.py --preview ade20k --data_dir data/ade20k
    python data.py --check ade20k --data_dir data/ade20k  # all files decoded, bad ones listed
"""

import argparse
import json
import math
import os
import pickle
import re
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from tqdm import tqdm

from common import UserError


# ----------------------------------------------------------------------------------------------
# Helpers shared by all datasets
# ----------------------------------------------------------------------------------------------

# "val" is read as "test" everywhere (SPADE's test phase reads the val folders).
SPLIT_IDS = {"train": 0, "test": 1}


def split_name(split):
    split = {"val": "test", "validation": "test"}.get(split, split)
    if split not in SPLIT_IDS:
        raise UserError(f"unknown split '{split}'; expected 'train' or 'test' (or 'val').")
    return split


def item_rng(seed, split, index):
    """The random generator of one synthetic item: a pure function of (seed, split, index)."""
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def parse_size(name, size, default, lo=8, hi=4096, multiple=1):
    """An int (square) or (H, W) -> (H, W), checked against the dataset's limits."""
    if size is None:
        size = default
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if not (lo <= h <= hi and lo <= w <= hi and h % multiple == 0 and w % multiple == 0):
        raise UserError(f"size {size} does not suit dataset '{name}'; expected sides from {lo} "
                        f"to {hi}" + (f", multiples of {multiple}." if multiple > 1 else "."))
    return int(h), int(w)


def to_image_tensor(array):
    """(H, W, C) or (H, W) array in [0, 1] -> float32 (C, H, W) in [-1, 1]."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1) * 2 - 1))


def box_downsample(image, factor=8):
    """The mean of every factor x factor block: tensor (C, H, W) -> (C, H/f, W/f)."""
    return torch.nn.functional.avg_pool2d(image[None], factor)[0]


def instance_edges(ids):
    """1 where a 4-neighbour has another id (INADE's edge map), 0 elsewhere.

    ids: numpy or torch integer array (..., H, W); returns the same kind, bool.
    """
    edge = np.zeros(ids.shape, bool) if isinstance(ids, np.ndarray) else \
        torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    dx = ids[..., :, 1:] != ids[..., :, :-1]   # both pixels of a differing horizontal pair
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    dy = ids[..., 1:, :] != ids[..., :-1, :]
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    return edge


def reindex(ids):
    """INADE's make_instances rule: sorted unique values -> 0..K-1. (H, W) int64."""
    _, inverse = np.unique(ids, return_inverse=True)
    return inverse.reshape(ids.shape).astype(np.int64)


SKETCH_THRESHOLD = 0.2  # our choice: an edge of at least 20% of the grey range


def image_sketch(image):
    """A thin edge map of an image (H, W) or (H, W, C) in [0, 1]: a Canny-like rule in numpy.

    Sobel gradient per channel (scaled so a unit step gives 1), the strongest channel per pixel
    (so edges between colours of equal brightness count), kept where it exceeds
    SKETCH_THRESHOLD and is a local maximum across the edge (non-maximum suppression along the
    dominant axis). No hysteresis (our simplification of Canny). float32 (H, W) in {0, 1}.
    """
    image = image[:, :, None] if image.ndim == 2 else image
    p = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    strongest = np.argmax(gx * gx + gy * gy, axis=-1)[..., None]           # (H, W, 1)
    gx = np.take_along_axis(gx, strongest, -1)[..., 0]
    gy = np.take_along_axis(gy, strongest, -1)[..., 0]
    mag = np.hypot(gx, gy) / 4
    m = np.pad(mag, 1)
    peak_x = (mag >= m[1:-1, :-2]) & (mag >= m[1:-1, 2:])
    peak_y = (mag >= m[:-2, 1:-1]) & (mag >= m[2:, 1:-1])
    peak = np.where(np.abs(gx) >= np.abs(gy), peak_x, peak_y)
    return ((mag > SKETCH_THRESHOLD) & peak).astype(np.float32)


def label_palette(n):
    """Fixed colours for n classes: the bits of the class id spread over R, G, B (id 0 black)."""
    ids = np.arange(n)
    pal = np.zeros((n, 3), np.int64)
    for bit in range(8):
        for ch in range(3):
            pal[:, ch] |= ((ids >> (3 * bit + ch)) & 1) << (7 - bit)
    return pal.astype(np.uint8)


def natural_key(path):
    """Sort key with digit runs compared as numbers (the official lists are natural-sorted)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path)]


# ----------------------------------------------------------------------------------------------
# shapes: a background and 1-4 objects with class-conditional, multimodal colours
# ----------------------------------------------------------------------------------------------
# Ground truth conventions: instance 0 is the background, object j (0-based, drawing order) is
# instance j + 1 and row j of the inst_* arrays; rows j >= n are padding (inst_valid False,
# inst_class 0, inst_mode -1, colour and box 0). Boxes are (y0, x0, y1, x1) with exclusive ends
# and bound the *visible* pixels of the object. Later objects occlude earlier ones, but every
# object keeps at least SHAPES_MIN_VISIBLE of its area (a placement that would hide more is
# redrawn), so every instance id in 0..n appears in the instance map.

MAX_INSTANCES = 4
SHAPES_CLASSES = ["background", "circle", "square", "triangle", "diamond"]
SHAPES_TEXTURED = (4,)  # diamonds are striped (SR ambiguity, see SHAPES_STRIPE_PERIOD)
SHAPES_COLOURS = {  # RGB in [0, 1]; pairwise distances > 0.55, so modes never blur together
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.75, 0.15), "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10), "cyan": (0.10, 0.80, 0.85), "magenta": (0.90, 0.15, 0.80),
    "white": (0.95, 0.95, 0.95),
}
SHAPES_MODE_NAMES = [[], ["red", "blue", "yellow"], ["green", "magenta"],
                     ["cyan", "white", "red"], ["yellow", "blue"]]
SHAPES_MODE_WEIGHTS = [[], [0.5, 0.3, 0.2], [0.6, 0.4], [0.5, 0.3, 0.2], [0.6, 0.4]]
SHAPES_PALETTE = [[SHAPES_COLOURS[n] for n in names] for names in SHAPES_MODE_NAMES]
SHAPES_JITTER = 0.05             # each channel of an instance colour: mode centre + U(-0.05, 0.05)
SHAPES_MODE_TOLERANCE = 0.2      # a measured colour this close to a mode centre is "in the mode"
SHAPES_BACKGROUND = (0.45, 0.60)  # background: flat grey, level uniform in this range per image
SHAPES_STRIPE_DARK = 0.25        # dark stripes are 0.25 x the instance colour
SHAPES_RADIUS = (0.12, 0.22)     # object radius as a fraction of the shorter side
SHAPES_MIN_VISIBLE = 0.75   # every object keeps 3/4 of its area visible
# Stripes: a square wave of period 4 px at every size. Its period divides the 8x SR factor, so
# each 8x8 block averages to a constant (exactly for axis-aligned stripes, within a few percent
# for oblique ones): the low-resolution input shows a flat mid colour, and the stripes' phase
# and orientation cannot be recovered from it -- the ambiguity the SR task needs.
SHAPES_STRIPE_PERIOD = 4


def shapes_appearance(rng):
    """What the objects are, independent of where: class, colour mode, colour, stripes."""
    n = int(rng.integers(1, MAX_INSTANCES + 1))
    classes = rng.integers(1, len(SHAPES_CLASSES), n)
    pick = rng.random(n)  # mode by inverse CDF of SHAPES_MODE_WEIGHTS
    jitter = rng.uniform(-SHAPES_JITTER, SHAPES_JITTER, (n, 3))
    angle, phase = rng.uniform(0, math.pi, n), rng.random(n)
    objects = []
    for j, cls in enumerate(classes.tolist()):
        cdf = _MODE_CDF[cls]
        mode = min(int(np.searchsorted(cdf, pick[j], side="right")), len(cdf) - 1)
        colour = np.clip(np.array(SHAPES_PALETTE[cls][mode]) + jitter[j], 0, 1).astype(np.float32)
        objects.append(dict(cls=cls, mode=mode, colour=colour,
                            angle=float(angle[j]), phase=float(phase[j])))
    background = np.float32(rng.uniform(*SHAPES_BACKGROUND))
    return objects, background


_MODE_CDF = [np.cumsum(w) for w in SHAPES_MODE_WEIGHTS]


def shape_mask(cls, cy, cx, r, yy, xx):
    """Inside-test at pixel centres (yy, xx) for an object of radius r centred at (cy, cx)."""
    dy, dx = yy - cy, xx - cx
    if cls == 1:   # circle
        return dy * dy + dx * dx <= r * r
    if cls == 2:   # axis-aligned square of side 1.7 r
        return (np.abs(dy) <= 0.85 * r) & (np.abs(dx) <= 0.85 * r)
    if cls == 3:   # triangle, apex up at cy - r, base at cy + 0.8 r, half-width r at the base
        return (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)
    return np.abs(dy) + np.abs(dx) <= 1.1 * r  # diamond


def _same_colour(a, b):
    return SHAPES_MODE_NAMES[a["cls"]][a["mode"]] == SHAPES_MODE_NAMES[b["cls"]][b["mode"]]


def shapes_layout(rng, objects, h, w, drop=True):
    """Place the objects one after another; returns the instance map and each object's geometry.

    A placement is redrawn (up to 20 times) while it would leave an earlier object less than
    SHAPES_MIN_VISIBLE of its area, or come near (inside the new object's window) an object of
    the same colour name, which would merge with it in the picture. If no try succeeds, the
    object is dropped (drop=True) or the last try is kept (style images: every colour stays).
    """
    ids = np.zeros((h, w), np.int64)  # (H, W) 0 = background, j + 1 = object j
    areas, visible, placed = [], [], []  # per placed object: its area, its visible pixels
    for obj in objects:
        same = [k + 1 for k, p in enumerate(placed) if _same_colour(p, obj)]  # their instance ids
        for attempt in range(20):
            u = rng.random(3)
            r = (SHAPES_RADIUS[0] + u[0] * (SHAPES_RADIUS[1] - SHAPES_RADIUS[0])) * min(h, w)
            cy, cx = r + u[1] * (h - 2 * r), r + u[2] * (w - 2 * r)
            y0, y1 = max(0, int(cy - 1.2 * r)), min(h, int(cy + 1.2 * r) + 2)
            x0, x1 = max(0, int(cx - 1.2 * r)), min(w, int(cx + 1.2 * r) + 2)
            yy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
            xx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
            mask = shape_mask(obj["cls"], cy, cx, r, yy, xx)  # (y1-y0, x1-x0) window
            window = ids[y0:y1, x0:x1]
            hidden = np.bincount(window[mask], minlength=len(placed) + 1)[1:].tolist()
            if all(v - hd >= SHAPES_MIN_VISIBLE * a for v, hd, a in zip(visible, hidden, areas)) \
                    and not any((window == k).any() for k in same):
                break
        else:
            if drop:
                continue
        window[mask] = len(placed) + 1
        area = int(mask.sum())
        visible = [v - hd for v, hd in zip(visible, hidden)] + [area]
        areas.append(area)
        placed.append(dict(obj, cy=cy, cx=cx, r=r, window=(y0, y1, x0, x1)))
    return ids, placed


def shapes_paint(ids, placed, background):
    """The image (H, W, 3) in [0, 1]: flat colours, stripes on textured classes."""
    h, w = ids.shape
    colours = np.concatenate([np.full((1, 3), background, np.float32),
                              np.stack([p["colour"] for p in placed])])
    image = np.take(colours, ids, axis=0)  # (H, W, 3); np.take is faster than colours[ids]
    period = SHAPES_STRIPE_PERIOD
    for j, p in enumerate(placed):
        if p["cls"] in SHAPES_TEXTURED:
            y0, y1, x0, x1 = p["window"]  # the object lies inside its window
            yy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
            xx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
            # square wave across the direction `angle`, random phase
            proj = (xx - p["cx"]) * math.cos(p["angle"]) + (yy - p["cy"]) * math.sin(p["angle"])
            dark = np.floor(2 * (proj / period + p["phase"])) % 2 == 1
            dark &= ids[y0:y1, x0:x1] == j + 1
            image[y0:y1, x0:x1][dark] *= SHAPES_STRIPE_DARK
    return image


# Every word data.shapes_caption can write: colour and shape names and the words around them.
SHAPES_CAPTION_WORDS = ("a", "and", "above", "below", "left", "right", "of", "striped")


def shapes_caption_vocabulary():
    """The closed vocabulary of the built-in captions (for common.WordTokenizer)."""
    return list(SHAPES_COLOURS) + SHAPES_CLASSES[1:] + list(SHAPES_CAPTION_WORDS)


def shapes_caption(placed):
    """'a red circle above a blue square and a yellow striped diamond': colours, shapes and the
    relation of each pair (objects 0-1, 2-3) by their centres' dominant offset."""
    def phrase(p):
        striped = "striped " if p["cls"] in SHAPES_TEXTURED else ""
        return f"a {SHAPES_MODE_NAMES[p['cls']][p['mode']]} {striped}{SHAPES_CLASSES[p['cls']]}"

    def relation(a, b):
        dy, dx = b["cy"] - a["cy"], b["cx"] - a["cx"]
        if abs(dy) >= abs(dx):
            return "above" if dy > 0 else "below"
        return "left of" if dx > 0 else "right of"

    parts = []
    for k in range(0, len(placed), 2):
        pair = placed[k:k + 2]
        parts.append(phrase(pair[0]) if len(pair) == 1 else
                     f"{phrase(pair[0])} {relation(*pair)} {phrase(pair[1])}")
    return " and ".join(parts)


def shapes_item(rng, h, w):
    """One shapes item (see the module docstring for the keys)."""
    objects, background = shapes_appearance(rng)
    ids, placed = shapes_layout(rng, objects, h, w)
    image = to_image_tensor(shapes_paint(ids, placed, background))  # (3, H, W)
    # Style reference: the same objects (classes, modes, colours), another layout and stripes.
    restyled = [dict(p, angle=rng.uniform(0, math.pi), phase=rng.uniform(0, 1)) for p in placed]
    style_ids, style_placed = shapes_layout(rng, restyled, h, w, drop=False)
    cls_of_id = np.array([0] + [p["cls"] for p in placed])
    n = len(placed)
    inst_class = np.zeros(MAX_INSTANCES, np.int64)
    inst_mode = np.full(MAX_INSTANCES, -1, np.int64)
    inst_color = np.zeros((MAX_INSTANCES, 3), np.float32)
    inst_box = np.zeros((MAX_INSTANCES, 4), np.int64)
    for j, p in enumerate(placed):
        wy0, wy1, wx0, wx1 = p["window"]
        visible = ids[wy0:wy1, wx0:wx1] == j + 1
        rows, cols = np.nonzero(visible.any(1))[0], np.nonzero(visible.any(0))[0]
        inst_box[j] = (wy0 + rows[0], wx0 + cols[0], wy0 + rows[-1] + 1, wx0 + cols[-1] + 1)
        inst_class[j], inst_mode[j], inst_color[j] = p["cls"], p["mode"], p["colour"]
    return {
        "image": image,
        "label": torch.from_numpy(np.take(cls_of_id, ids)),
        "instance": torch.from_numpy(ids),
        "sketch": torch.from_numpy(instance_edges(ids)[None].astype(np.float32)),
        "caption": shapes_caption(placed),
        "style": to_image_tensor(shapes_paint(style_ids, style_placed, background)),
        "lowres": box_downsample(image),  # (3, H/8, W/8)
        "inst_class": torch.from_numpy(inst_class),
        "inst_mode": torch.from_numpy(inst_mode),
        "inst_color": torch.from_numpy(inst_color),
        "inst_box": torch.from_numpy(inst_box),
        "inst_valid": torch.arange(MAX_INSTANCES) < n,
    }


# Scoring helpers: exact, no learned network. Colours are RGB in [0, 1].

def _palette_table():
    """(num_classes, max_modes, 3) mode centres, NaN where a class has fewer modes."""
    table = np.full((len(SHAPES_CLASSES), 3, 3), np.nan, np.float32)
    for c, modes in enumerate(SHAPES_PALETTE):
        if modes:
            table[c, :len(modes)] = modes
    return torch.from_numpy(table)


def shapes_mode_assignment(colour, cls):
    """Nearest palette mode of the object's own class, and the RGB distance to its centre.

    colour (..., 3) in [0, 1], cls (...) object classes 1..4 (torch or numpy)
    -> mode (...) int64 index into SHAPES_PALETTE[cls], distance (...) float32.
    """
    colour = torch.as_tensor(colour, dtype=torch.float32)
    cls = torch.as_tensor(cls, dtype=torch.int64).clamp(min=0)
    centres = _palette_table().to(colour.device)[cls]        # (..., M, 3)
    dist = (colour.unsqueeze(-2) - centres).norm(dim=-1)      # (..., M)
    dist = torch.nan_to_num(dist, nan=float("inf"))
    distance, mode = dist.min(dim=-1)
    return mode, distance


def shapes_measure_colours(images, instance, inst_class):
    """Measured colour of every object: the mean over its instance pixels.

    For striped classes only the light stripes count (pixels at or above the instance's mean
    luminance), so the measure is the object's colour, not its mix with the dark stripes.
    images (B, 3, H, W) in [-1, 1], instance (B, H, W) ids (object j = j + 1), inst_class (B, M)
    -> colours (B, M, 3) in [0, 1], area (B, M) pixels of each instance.
    """
    images = (torch.as_tensor(images, dtype=torch.float32) + 1) / 2
    instance = torch.as_tensor(instance)
    inst_class = torch.as_tensor(inst_class)
    m = inst_class.shape[1]
    ids = torch.arange(1, m + 1, device=instance.device)[None, :, None, None]
    masks = (instance[:, None] == ids).float()                         # (B, M, H, W)
    area = masks.sum((2, 3))
    lum = images.mean(1, keepdim=True)                                 # (B, 1, H, W)
    mean_lum = (masks * lum).sum((2, 3)) / area.clamp(min=1)           # (B, M)
    light = masks * (lum >= mean_lum[:, :, None, None] - 1e-6).float()
    textured = torch.zeros_like(masks[:, :, 0, 0], dtype=torch.bool)
    for c in SHAPES_TEXTURED:
        textured |= inst_class == c
    weights = torch.where(textured[:, :, None, None], light, masks)
    colours = torch.einsum("bmhw,bchw->bmc", weights, images)
    colours = colours / weights.sum((2, 3)).clamp(min=1)[..., None]
    return colours, area


def shapes_colour_fidelity(images, instance, inst_class, inst_valid):
    """Per-instance colour fidelity of images drawn for the given instance maps.

    Returns a dict: `distance` (B, M) to the nearest mode of the object's class, `mode` (B, M),
    `valid` (B, M) (object exists and is visible), `colour_error` (mean distance, float) and
    `in_mode` (fraction of objects within SHAPES_MODE_TOLERANCE of a mode centre).
    """
    colours, area = shapes_measure_colours(images, instance, inst_class)
    mode, distance = shapes_mode_assignment(colours, inst_class)
    valid = torch.as_tensor(inst_valid).bool() & (area > 0)
    d = distance[valid]
    if d.numel() == 0:
        d = torch.tensor([float("nan")])
    return {"distance": distance, "mode": mode, "valid": valid, "colour_error": float(d.mean()),
            "in_mode": float((d <= SHAPES_MODE_TOLERANCE).float().mean())}


def shapes_mode_coverage(mode, inst_class, valid=None):
    """How well a set of objects covers the palette's modes.

    mode, inst_class, valid: matching arrays (any shape) -> dict with `coverage` (fraction of
    the (class, mode) pairs of the classes present that occur at least once), `counts`
    {class name: counts per mode} and `tv` (total-variation distance between the observed mode
    frequencies and SHAPES_MODE_WEIGHTS, averaged over the classes present; 0 = exact).
    """
    mode = torch.as_tensor(mode).cpu().reshape(-1)
    cls = torch.as_tensor(inst_class).cpu().reshape(-1)
    keep = torch.ones_like(cls, dtype=torch.bool) if valid is None else \
        torch.as_tensor(valid).cpu().reshape(-1).bool()
    keep &= (cls > 0) & (mode >= 0)
    counts, hit, total, tv = {}, 0, 0, []
    for c in range(1, len(SHAPES_CLASSES)):
        sel = mode[keep & (cls == c)]
        if sel.numel() == 0:
            continue
        k = torch.bincount(sel, minlength=len(SHAPES_PALETTE[c]))
        counts[SHAPES_CLASSES[c]] = k.tolist()
        hit, total = hit + int((k > 0).sum()), total + len(k)
        freq = k.float() / k.sum()
        tv.append(0.5 * float((freq - torch.tensor(SHAPES_MODE_WEIGHTS[c])).abs().sum()))
    return {"coverage": hit / total if total else float("nan"), "counts": counts,
            "tv": float(np.mean(tv)) if tv else float("nan")}


_CAPTION_OBJECT = re.compile(r"\ba (\w+) (?:striped )?(" + "|".join(SHAPES_CLASSES[1:]) + r")\b")


def shapes_caption_objects(caption):
    """The (colour name, class id) pairs a shapes caption names, in order."""
    return [(colour, SHAPES_CLASSES.index(shape))
            for colour, shape in _CAPTION_OBJECT.findall(caption)]


def _components(masks):
    """4-connected components of bool masks (P, H, W) -> int32 labels (P, H, W), 0 = outside.

    Each pixel takes the largest label among itself and its 4 neighbours until nothing changes.
    (numpy: many small steps, where torch's thread pool only adds latency.)
    """
    p, h, w = masks.shape
    lab = np.arange(1, h * w + 1, dtype=np.int32).reshape(1, h, w) * masks
    while True:
        new = lab.copy()
        np.maximum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.maximum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        np.maximum(new[:, :, 1:], lab[:, :, :-1], out=new[:, :, 1:])
        np.maximum(new[:, :, :-1], lab[:, :, 1:], out=new[:, :, :-1])
        new *= masks
        if np.array_equal(new, lab):
            return lab
        lab = new


def shapes_find_objects(images, min_area=0.005):
    """Objects found in images (B, 3, H, W) in [-1, 1] by palette colour alone.

    Pixels within SHAPES_MODE_TOLERANCE of a named colour (or of its dark-stripe shade, for the
    colours of striped classes) form
    4-connected components; each component of at least `min_area` of the image is classified by
    its shape: fill of its box > 0.9 square, > 0.65 circle, else triangle if its mass sits low
    (centroid below 0.58 of the box height), else diamond. Objects of one colour that touch
    merge, and heavily occluded ones may be misread: a measure for generated images, exact
    enough on the ground truth (tests/test_data.py checks it there).
    Returns one list per image of dicts {colour, cls, box (y0, x0, y1, x1), area}.
    """
    rgb = torch.as_tensor(images, dtype=torch.float32).cpu().numpy().transpose(0, 2, 3, 1)
    rgb = (rgb[:, None] + 1) / 2                                           # (B, 1, H, W, 3)
    b, h, w = rgb.shape[0], rgb.shape[2], rgb.shape[3]
    names = list(SHAPES_COLOURS)
    centres = np.array([SHAPES_COLOURS[n] for n in names], np.float32)[:, None, None]  # (K,1,1,3)
    striped = np.array([any(n in SHAPES_MODE_NAMES[c] for c in SHAPES_TEXTURED) for n in names])
    near = ((rgb - centres) ** 2).sum(-1) <= SHAPES_MODE_TOLERANCE ** 2    # (B, K, H, W)
    dark = ((rgb - SHAPES_STRIPE_DARK * centres) ** 2).sum(-1) <= (SHAPES_MODE_TOLERANCE / 2) ** 2
    dark &= striped[:, None, None]
    masks = (near | dark).reshape(-1, h, w)                                  # (B*K, H, W)
    planes = np.nonzero(masks.reshape(len(masks), -1).sum(1) >= min_area * h * w)[0]
    lab = _components(masks[planes])  # only the colours that cover enough of an image
    # Statistics of every component at once: key = plane * (H*W + 1) + component label.
    plane, ys, xs = np.nonzero(lab)
    _, inv = np.unique(plane * (h * w + 1) + lab[plane, ys, xs], return_inverse=True)
    inv = inv.reshape(-1)
    n = int(inv.max()) + 1 if inv.size else 0
    area = np.bincount(inv, minlength=n)
    y0, x0 = np.full(n, h), np.full(n, w)
    y1, x1 = np.zeros(n, np.int64), np.zeros(n, np.int64)
    np.minimum.at(y0, inv, ys), np.minimum.at(x0, inv, xs)
    np.maximum.at(y1, inv, ys + 1), np.maximum.at(x1, inv, xs + 1)
    cy = np.bincount(inv, weights=ys + 0.5, minlength=n) / np.maximum(area, 1)
    comp_plane = np.zeros(n, np.int64)
    comp_plane[inv] = planes[plane]
    found = [[] for _ in range(b)]
    for i in np.nonzero(area >= min_area * h * w)[0].tolist():
        box = (int(y0[i]), int(x0[i]), int(y1[i]), int(x1[i]))
        fill = float(area[i]) / ((box[2] - box[0]) * (box[3] - box[1]))
        low = (float(cy[i]) - box[0]) / (box[2] - box[0])
        cls = 2 if fill > 0.9 else 1 if fill > 0.65 else 3 if low > 0.58 else 4
        image, k = divmod(int(comp_plane[i]), len(names))
        found[image].append(dict(colour=names[k], cls=cls, box=box, area=int(area[i])))
    return found


def shapes_caption_accuracy(images, captions):
    """How many of the objects each caption names are found in its image (shapes_find_objects).

    images (B, 3, H, W) in [-1, 1], captions list of B str -> dict of fractions over all named
    objects: `colour` (an object of that colour exists), `shape` (that shape in any colour),
    `object` (that shape in that colour).
    """
    hits, n = np.zeros(3), 0
    for found, caption in zip(shapes_find_objects(images), captions):
        for colour, cls in shapes_caption_objects(caption):
            n += 1
            hits += [any(f["colour"] == colour for f in found), any(f["cls"] == cls for f in found),
                     any(f["colour"] == colour and f["cls"] == cls for f in found)]
    hits = hits / max(n, 1)
    return {"colour": float(hits[0]), "shape": float(hits[1]), "object": float(hits[2])}


# ----------------------------------------------------------------------------------------------
# hshape: uMM-GAN Fig. 6, two rectangles whose widths fill an H-shaped region
# ----------------------------------------------------------------------------------------------
# Widths are in the paper's units (0..40). Our drawing (the paper gives no image size): one
# rectangle in the upper and one in the lower half, each a quarter of the image high,
# left-aligned at H/12, 40 units spanning 5/6 of the width; the right edge is anti-aliased by
# coverage so the exact width can be read back from the pixels (hshape_measure).

HSHAPE_MAX = 40.0


def hshape_sample(rng, n=None):
    """Widths (w1, w2) from the H: w1 ~ U[0, 40]; w2 ~ U[0, 40] on the legs (w1 <= 10 or
    w1 >= 30), U[15, 25] on the crossbar (10 < w1 < 30). (2,) or (n, 2) float32."""
    w1 = rng.uniform(0, HSHAPE_MAX, n)
    leg = (w1 <= 10) | (w1 >= 30)
    w2 = np.where(leg, rng.uniform(0, HSHAPE_MAX, n), rng.uniform(15, 25, n))
    return np.stack([w1, w2], -1).astype(np.float32)


def hshape_region(widths):
    """Which part of the H each (w1, w2) lies in: 0 left leg, 1 crossbar, 2 right leg, -1 none."""
    w = torch.as_tensor(widths, dtype=torch.float32)
    w1, w2 = w[..., 0], w[..., 1]
    inside = (w2 >= 0) & (w2 <= HSHAPE_MAX)
    region = torch.full(w1.shape, -1, dtype=torch.int64)
    region[inside & (w1 >= 0) & (w1 <= 10)] = 0
    region[(w1 > 10) & (w1 < 30) & (w2 >= 15) & (w2 <= 25)] = 1
    region[inside & (w1 >= 30) & (w1 <= HSHAPE_MAX)] = 2
    return region


def _hshape_geometry(h, w):
    """Row bands of the two rectangles, the left edge and pixels per width unit."""
    band = h // 4
    top, bottom = h // 8, h - h // 8 - band
    return (top, top + band), (bottom, bottom + band), round(w / 12), (5 / 6) * w / HSHAPE_MAX


def hshape_draw(widths, h, w):
    """(H, W) image in [0, 1] with the two rectangles of the given widths."""
    rows1, rows2, left, scale = _hshape_geometry(h, w)
    cols = np.arange(w, dtype=np.float32)
    image = np.zeros((h, w), np.float32)
    for (r0, r1), width in zip((rows1, rows2), widths):
        image[r0:r1] = np.clip(left + width * scale - cols, 0, 1) * (cols >= left)
    return image


def hshape_measure(images):
    """Read the widths back from images (B, 1, H, W) in [-1, 1] -> (B, 2) in width units."""
    images = (torch.as_tensor(images, dtype=torch.float32) + 1) / 2
    h, w = images.shape[-2:]
    rows1, rows2, _, scale = _hshape_geometry(h, w)
    ink = images[:, 0].sum(-1)  # (B, H): ink per row
    return torch.stack([ink[:, slice(*rows1)].mean(1), ink[:, slice(*rows2)].mean(1)], 1) / scale


def hshape_jaccard(widths, bins=20, threshold=0.5):
    """Jaccard index between the thresholded density of `widths` (N, 2) and the true H.

    Densities on a bins x bins grid over [0, 40]^2; a cell is "on" where the sample density is
    at least `threshold` x the smallest true density inside the H (1/1600 per unit^2, the legs)
    and the true set is the cells whose centre is inside the H. Our reading of the paper's
    "Jaccard of thresholded PDFs" (thresholds not given).
    """
    on = hshape_support(widths, bins, threshold)  # (bins, bins); defined with Fig. 6 further down
    centres = (torch.arange(bins) + 0.5) * (HSHAPE_MAX / bins)
    truth = hshape_region(torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1)) >= 0
    return float((on & truth).sum()) / max(float((on | truth).sum()), 1.0)


# ----------------------------------------------------------------------------------------------
# letters: glyphs in random styles, drawn with Pillow's bundled scalable font
# ----------------------------------------------------------------------------------------------

ALPHANUMERICS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_FONTS = {}


def letter_font(pixels):
    """Pillow's bundled FreeType font (Pillow >= 10.1) at a size in pixels, cached."""
    if pixels not in _FONTS:
        try:
            font = ImageFont.load_default(size=pixels)
        except (TypeError, ImportError, OSError):
            font = None
        if not isinstance(font, ImageFont.FreeTypeFont):
            raise UserError("the letters dataset needs Pillow >= 10.1 built with FreeType "
                            "(ImageFont.load_default(size=...) gave no scalable font); "
                            "install it with: pip install 'pillow>=10.1'.")
        _FONTS[pixels] = font
    return _FONTS[pixels]


def letter_style(rng, size):
    """A random style. Ranges are our choice (the paper's 216 handwriting styles are not public)."""
    return dict(scale=rng.uniform(0.6, 1.1), stroke=int(rng.integers(0, max(1, size // 32) + 1)),
                rotation=rng.uniform(-15, 15), shear=rng.uniform(-0.3, 0.3),
                position=rng.uniform(0, 1, 2))


def draw_letter(char, size, scale=0.8, stroke=0, rotation=0.0, shear=0.0, position=(0.5, 0.5)):
    """A white glyph on black, (H, W) float32 in [0, 1]: drawn at `scale` x H font pixels with
    `stroke` extra pixels of outline, rotated (degrees) and sheared about its centre, then
    placed at `position` (fractions of the free space left and above), always wholly inside."""
    h, w = size
    big = 2 * max(h, w)
    canvas = Image.new("L", (big, big), 0)
    font = letter_font(max(6, round(scale * h)))
    ImageDraw.Draw(canvas).text((big / 2, big / 2), char, fill=255, anchor="mm", font=font,
                                stroke_width=stroke, stroke_fill=255)
    a = math.radians(rotation)
    forward = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) @ \
        np.array([[1.0, shear], [0.0, 1.0]])
    inv = np.linalg.inv(forward)  # PIL maps each output pixel back to an input pixel
    c = np.array([big / 2, big / 2])
    offset = c - inv @ c
    canvas = canvas.transform((big, big), Image.AFFINE, (inv[0, 0], inv[0, 1], offset[0],
                              inv[1, 0], inv[1, 1], offset[1]), resample=Image.BILINEAR)
    glyph = canvas.crop(canvas.getbbox() or (0, 0, 1, 1))
    fit = min(1.0, (w - 2) / glyph.width, (h - 2) / glyph.height)
    if fit < 1:
        glyph = glyph.resize((max(1, int(glyph.width * fit)), max(1, int(glyph.height * fit))),
                             Image.BILINEAR)
    out = Image.new("L", (w, h), 0)
    out.paste(glyph, (1 + round(position[0] * (w - 2 - glyph.width)),
                      1 + round(position[1] * (h - 2 - glyph.height))))
    return np.asarray(out, np.float32) / 255


# ----------------------------------------------------------------------------------------------
# The synthetic datasets
# ----------------------------------------------------------------------------------------------

class SyntheticDataset(torch.utils.data.Dataset):
    """Items are a pure function of (seed, split, index); nothing is stored."""

    def __init__(self, name, split, size, seed=0, length=10_000, letters="AB"):
        self.name, self.split, self.seed, self.length = name, split_name(split), seed, length
        self.size = parse_size(name, size, 64, lo=32, hi=256, multiple=8)
        if name == "shapes":
            self.channels, self.num_classes = 3, len(SHAPES_CLASSES)
            self.class_names = SHAPES_CLASSES
            self.has = {"image", "label", "instance", "sketch", "caption", "style", "lowres",
                        "inst_class", "inst_mode", "inst_color", "inst_box", "inst_valid"}
        elif name == "hshape":
            self.channels, self.num_classes, self.class_names = 1, 0, []
            self.has = {"image", "widths"}
        else:
            self.letters = ALPHANUMERICS if letters == "all" else letters
            if not self.letters or any(ch not in ALPHANUMERICS for ch in self.letters):
                raise UserError(f"letters '{letters}' must be alphanumeric characters "
                                "(or 'all' for the 62 of them).")
            letter_font(16)  # fail now, not inside a worker, if there is no FreeType
            self.channels, self.num_classes, self.class_names = 1, 0, list(self.letters)
            self.has = {"image", "class"}
        self.palette = label_palette(self.num_classes)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = item_rng(self.seed, self.split, index)
        h, w = self.size
        if self.name == "shapes":
            return shapes_item(rng, h, w)
        if self.name == "hshape":
            widths = hshape_sample(rng)
            return {"image": to_image_tensor(hshape_draw(widths, h, w)),
                    "widths": torch.from_numpy(widths)}
        cls = index % len(self.letters)  # balanced classes; the style is random
        glyph = draw_letter(self.letters[cls], self.size, **letter_style(rng, h))
        return {"image": to_image_tensor(glyph), "class": torch.tensor(cls)}


# ----------------------------------------------------------------------------------------------
# Real datasets: reading files
# ----------------------------------------------------------------------------------------------

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def layout_error(what, name):
    return UserError(f"{what}; expected the {name} layout: {DATASETS[name]['layout']}.")


def require_dir(path, name):
    if not os.path.isdir(path):
        raise layout_error(f"dataset folder {path} does not exist", name)


def list_images(folder, recursive=False, exts=IMAGE_EXTS):
    """Image files of a folder (following symbolic links), natural-sorted; the "._*" files and
    "__MACOSX" folders that zips made on macOS carry are not images."""
    if recursive:
        paths = [os.path.join(d, f) for d, _, fs in os.walk(folder, followlinks=True)
                 if "__MACOSX" not in d.split(os.sep) for f in fs]
    elif os.path.isdir(folder):
        paths = [os.path.join(folder, f) for f in os.listdir(folder)]
    else:
        paths = []
    paths = [p for p in paths if p.lower().endswith(exts) and os.path.isfile(p)
             and not os.path.basename(p).startswith("._")]
    return sorted(paths, key=natural_key)


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


# What Pillow raises for a file that is missing, not an image, corrupt or truncated.
READ_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError,
               Image.DecompressionBombError)
# Modes the loader reads: images and sketches are converted to 8-bit RGB or L (a 16-bit or float
# image would be clipped to white); label and instance ids are read as as_ids() says.
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr")
ID_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "LA", "RGB", "RGBA")


def open_image(path, name):
    """Open and decode an image file; a missing, corrupt or truncated file is a UserError."""
    try:
        img = Image.open(path)
        img.load()
        return img
    except READ_ERRORS:
        raise layout_error(f"cannot read image file {path}", name) from None


COLOUR_CODED = "is colour-coded (its R, G, B differ), expected class ids in one channel"


def as_ids(img, first_channel=False):
    """A label/instance PNG as integers: L and P as stored (SPADE's ToTensor()*255 gives the same),
    I / I;16 as-is, a grey map saved as RGB by its first channel; None for a colour-coded one (R,
    G, B differ: its ids are not in any one channel). `first_channel`: channel 0 of any colour PNG
    (SMIS's DeepFashion masks, as INADE's make_instances reads them)."""
    if img.mode in ("RGB", "RGBA") and not first_channel:
        r, g, b = (np.asarray(img.getchannel(c)) for c in range(3))
        if not (np.array_equal(r, g) and np.array_equal(r, b)):
            return None
    if img.mode in ("RGB", "RGBA", "LA"):
        img = img.getchannel(0)
    elif img.mode.startswith("I;16"):
        img = img.convert("I")
    return img


# ----------------------------------------------------------------------------------------------
# Real datasets: label encodings (as the official loaders do them)
# ----------------------------------------------------------------------------------------------

def encode_spade(raw, label_nc, dontcare):
    """SPADE's Pix2pixDataset: 255 ('unknown') -> label_nc. With a don't-care channel that is a
    valid class; without one, 255 is out of range (the official code would crash in scatter_)."""
    label = raw.astype(np.int64)
    label[label == 255] = label_nc
    return label


def encode_ade20k(raw, label_nc, dontcare):
    """SPADE's ADE20K postprocess: label - 1, and 0 ('other', now -1) -> 150 (don't care)."""
    label = raw.astype(np.int64) - 1
    label[label == -1] = label_nc
    return label


CITYSCAPES_CLASSES = [  # labelIds 0..33 (cityscapesScripts labels.py); 34 is SPADE's slack
    "unlabeled", "ego vehicle", "rectification border", "out of roi", "static", "dynamic",
    "ground", "road", "sidewalk", "parking", "rail track", "building", "wall", "fence",
    "guard rail", "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan",
    "trailer", "train", "motorcycle", "bicycle", "(unused)"]
CITYSCAPES_COLOURS = [  # the official colour of each labelId
    (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (111, 74, 0), (81, 0, 81),
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70),
    (102, 102, 156), (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90),
    (153, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35),
    (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32), (0, 0, 0)]
TRAIN_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]  # the 19
GTA5_CLASSES = [CITYSCAPES_CLASSES[i] for i in TRAIN_IDS] + ["void"]
GTA5_COLOURS = [CITYSCAPES_COLOURS[i] for i in TRAIN_IDS] + [(0, 0, 0)]


def encode_gta5(raw, label_nc, dontcare):
    """cIMLE: RGB labels, one channel per Cityscapes trainId colour, every other colour -> void."""
    codes = (raw[..., 0].astype(np.int64) << 16) | (raw[..., 1].astype(np.int64) << 8) | raw[..., 2]
    palette = np.array([(r << 16) | (g << 8) | b for r, g, b in GTA5_COLOURS[:-1]])
    order = np.argsort(palette)
    pos = np.searchsorted(palette[order], codes).clip(0, len(palette) - 1)
    return np.where(palette[order][pos] == codes, order[pos], len(palette)).astype(np.int64)


DEEPFASHION_CLASSES = ["background", "hair", "face", "clothes", "body", "pants", "shoes", "class 7"]
CELEBAMASK_CLASSES = ["background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow",
                      "l_ear", "r_ear", "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l",
                      "neck", "cloth"]
ADE20K_CLASSES = (
    "wall building sky floor tree ceiling road bed windowpane grass cabinet sidewalk person earth "
    "door table mountain plant curtain chair car water painting sofa shelf house sea mirror rug "
    "field armchair seat fence desk rock wardrobe lamp bathtub railing cushion base box column "
    "signboard chest_of_drawers counter sand sink skyscraper fireplace refrigerator grandstand "
    "path stairs runway case pool_table pillow screen_door stairway river bridge bookcase blind "
    "coffee_table toilet flower book hill bench countertop stove palm kitchen_island computer "
    "swivel_chair boat bar arcade_machine hovel bus towel light truck tower chandelier awning "
    "streetlight booth television_receiver airplane dirt_track apparel pole land bannister "
    "escalator ottoman bottle buffet poster stage van ship fountain conveyer_belt canopy washer "
    "plaything swimming_pool stool barrel basket waterfall tent bag minibike cradle oven ball "
    "food step tank trade_name microwave pot animal bicycle lake dishwasher screen blanket "
    "sculpture hood sconce vase traffic_light tray ashcan fan pier crt_screen plate monitor "
    "bulletin_board shower radiator glass clock flag").split()
ADE20K_CLASSES = [c.replace("_", " ") for c in ADE20K_CLASSES] + ["other (don't care)"]
COCO_THINGS = (  # COCO category ids 1..91 -> grey values 0..90; () marks ids unused in 2017
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "(street_sign) stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra "
    "giraffe (hat) backpack umbrella (shoe) (eye_glasses) handbag tie suitcase frisbee skis "
    "snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket "
    "bottle (plate) wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli "
    "carrot hot_dog pizza donut cake chair couch potted_plant bed (mirror) dining_table (window) "
    "(desk) toilet (door) tv laptop mouse remote keyboard cell_phone microwave oven toaster sink "
    "refrigerator (blender) book clock vase scissors teddy_bear hair_drier toothbrush (hair_brush)")
COCO_STUFF = (  # stuff ids 92..182 -> grey values 91..181
    "banner blanket branch bridge building-other bush cabinet cage cardboard carpet ceiling-other "
    "ceiling-tile cloth clothes clouds counter cupboard curtain desk-stuff dirt door-stuff fence "
    "floor-marble floor-other floor-stone floor-tile floor-wood flower fog food-other fruit "
    "furniture-other grass gravel ground-other hill house leaves light mat metal mirror-stuff moss "
    "mountain mud napkin net paper pavement pillow plant-other plastic platform playingfield "
    "railing railroad river road rock roof rug salad sand sea shelf sky-other skyscraper snow "
    "solid-other stairs stone straw structural-other table tent textile-other towel tree vegetable "
    "wall-brick wall-concrete wall-other wall-panel wall-stone wall-tile wall-wood water-other "
    "waterdrops window-blind window-other wood")
COCO_CLASSES = [c.replace("_", " ") for c in (COCO_THINGS + " " + COCO_STUFF).split()]
COCO_CLASSES += ["unlabeled (don't care)"]


# ----------------------------------------------------------------------------------------------
# Real datasets: one Dataset class for all on-disk layouts
# ----------------------------------------------------------------------------------------------

class FileDataset(torch.utils.data.Dataset):
    """Items from a list of records {name, image, label?, instance?, sketch?, captions?, class?}.

    Spatial transforms follow SPADE's preprocess modes and are drawn once per item, then applied
    identically to image, label, instance and sketch (images bicubic, maps nearest):
      fixed            resize to `size` (Cityscapes, GTA-5, DeepFashion, MM-CelebA-HQ, folder-pairs)
      resize_and_crop  train: resize to 286/256 x size, random crop `size`; test: resize to `size`
                       (ADE20K, CelebAMask-HQ, COCO-Stuff)
      shortside_crop   scale the shorter side to `size`, crop the centre (folder); `stretch=True`
                       resizes anisotropically instead (cIMLE's ImageNet SR data)
    Horizontal flips (p = 0.5) in training where the official code flips. Random choices (crop,
    flip, the caption among several) come from torch's global generator, which the scripts seed
    and checkpoint, so a run stays reproducible; in the test split there is no randomness and
    the caption of item i is caption i mod n.
    Instance maps are re-indexed to 0..K-1 after the transforms (INADE's files are re-indexed
    at full resolution, so an instance lost to resizing leaves an empty slot there, not here).
    Without instance files the instance map is the raw label map re-indexed (make_instances).
    Sketches: the dataset's own files where they exist (MM-CelebA-HQ, folder-pairs), else
    image_sketch() of the transformed image.

    file_problems() checks one item's files without loading the item: present, readable, of a
    mode the loader reads, label / instance / sketch maps the size of their image (our rule: a
    map of another size is taken for a wrong pair, which nearest resizing would hide; with
    `scaled_maps`, CelebAMask-HQ's 512x512 g_mask.py masks beside 1024x1024 images, only the
    aspect ratio must agree), label values in range, captions present and UTF-8.
    """

    def __init__(self, name, records, split, size, preprocess, num_classes=0, class_names=(),
                 palette=None, encode=None, label_nc=0, dontcare=False, flip=True,
                 rgb_labels=False, channels=3, lowres=False, scaled_maps=False,
                 first_channel=False):
        self.name, self.records, self.split, self.size = name, records, split, size
        self.preprocess, self.flip = preprocess, flip and split == "train"
        self.num_classes, self.class_names = num_classes, list(class_names)
        self.palette = label_palette(num_classes) if palette is None else \
            np.asarray(palette, np.uint8)
        self.encode, self.label_nc, self.dontcare = encode, label_nc, dontcare
        self.rgb_labels, self.scaled_maps = rgb_labels, scaled_maps
        self.first_channel = first_channel  # colour maps: ids in channel 0 (see as_ids)
        self.channels, self.lowres, self.sketch = channels, lowres, True
        first = records[0]
        self.has = {"image", "sketch", "name"} | ({"lowres"} if lowres else set())
        if first.get("label"):
            self.has |= {"label", "instance"}
        if "captions" in first:
            self.has.add("caption")
        if "class" in first:
            self.has.add("class")

    def __len__(self):
        return len(self.records)

    def skip(self, keys):
        """Stop making these per-item keys (of OPTIONAL_KEYS) for a script that never reads them:
        the sketch (an edge detector over the image, or a file read) and the 8x low-res copy."""
        self.sketch = self.sketch and "sketch" not in keys
        self.lowres = self.lowres and "lowres" not in keys
        self.has -= set(keys)

    def transform_params(self, width, height):
        """Resize size, crop box and flip of one item, from the image's own size."""
        h, w = self.size
        train = self.split == "train"
        crop = None
        if self.preprocess == "resize_and_crop" and train:
            load = (round(h * 286 / 256), round(w * 286 / 256))  # SPADE: load 286, crop 256
            y, x = (int(torch.randint(0, load[i] - self.size[i] + 1, ())) for i in range(2))
            resize, crop = load, (x, y, x + w, y + h)
        elif self.preprocess == "shortside_crop":
            scale = max(h / height, w / width)
            resize = (max(h, round(height * scale)), max(w, round(width * scale)))
            y, x = (resize[0] - h) // 2, (resize[1] - w) // 2
            crop = (x, y, x + w, y + h)
        else:
            resize = (h, w)
        flip = self.flip and bool(torch.rand(()) < 0.5)
        return resize, crop, flip

    @staticmethod
    def apply(img, params, resample):
        resize, crop, flip = params
        if img.size != (resize[1], resize[0]):
            img = img.resize((resize[1], resize[0]), resample)
        if crop is not None:
            img = img.crop(crop)
        return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img

    def mode_problem(self, key, mode):
        """Why the loader cannot read a `key` file ("image", "label", ...) of this mode, or None."""
        if key in ("image", "sketch"):
            ok, expected = mode in IMAGE_MODES, "an 8-bit image (" + ", ".join(IMAGE_MODES) + ")"
        elif key == "label" and self.rgb_labels:  # GTA-5's own release stores them as P
            ok, expected = mode in ("RGB", "RGBA", "P"), "a colour-coded label image (RGB or P)"
        else:
            ok, expected = mode in ID_MODES, "integer ids (" + ", ".join(ID_MODES) + ")"
        return None if ok else f"has mode {mode}, expected {expected}"

    def size_problem(self, size, image_size):
        """Why a map of `size` (W, H) does not fit its image, or None."""
        (w, h), (iw, ih) = size, image_size
        if size == image_size or (self.scaled_maps and abs(h * iw / w - ih) <= 1):
            return None
        expected = "the same aspect ratio" if self.scaled_maps else "the same size"
        return f"is {w}x{h} but its image is {iw}x{ih}, expected {expected}"

    def value_problem(self, raw, label):
        """Why an encoded label map is out of range, naming the value as stored, or None."""
        outside = (label < 0) | (label >= self.num_classes)
        if outside.any():
            return (f"holds value {int(raw[outside].max())}, out of range for "
                    f"{self.num_classes} classes")
        return None

    def label_image(self, img):
        """What the label encoding reads: RGB colours (GTA-5) or integer ids (None: see as_ids)."""
        return img.convert("RGB") if self.rgb_labels else as_ids(img, self.first_channel)

    def read_file(self, key, path):
        """Open and decode one file of an item; unreadable or of a wrong mode is a UserError."""
        img = open_image(path, self.name)
        reason = self.mode_problem(key, img.mode)
        if reason:
            raise layout_error(f"{key} file {path} {reason}", self.name)
        return img

    def read_label(self, path, params):
        img = self.label_image(self.read_file("label", path))
        if img is None:
            raise layout_error(f"label file {path} {COLOUR_CODED}", self.name)
        raw = np.asarray(self.apply(img, params, Image.NEAREST))
        label = self.encode(raw, self.label_nc, self.dontcare)
        reason = self.value_problem(raw, label)
        if reason:
            raise layout_error(f"label file {path} {reason}", self.name)
        return raw, label

    def __getitem__(self, index):
        rec = self.records[index]
        img = self.read_file("image", rec["image"]).convert("RGB" if self.channels == 3 else "L")
        params = self.transform_params(*img.size)
        array = np.asarray(self.apply(img, params, Image.BICUBIC), np.float32) / 255
        image = to_image_tensor(array)
        item = {"image": image, "name": rec["name"]}
        if rec.get("label"):
            raw, label = self.read_label(rec["label"], params)
            if rec.get("instance"):
                inst = as_ids(self.read_file("instance", rec["instance"]), self.first_channel)
                if inst is None:
                    raise layout_error(f"instance file {rec['instance']} {COLOUR_CODED}",
                                       self.name)
                inst = np.asarray(self.apply(inst, params, Image.NEAREST)).astype(np.int64)
            else:
                inst = raw if raw.ndim == 2 else label
            item["label"] = torch.from_numpy(label)
            item["instance"] = torch.from_numpy(reindex(inst))
        if self.sketch:
            item["sketch"] = self.read_sketch(rec, params, array)
        if "captions" in rec:
            caps = rec["captions"]
            k = int(torch.randint(0, len(caps), ())) if self.split == "train" and caps else index
            item["caption"] = caps[k % len(caps)] if caps else ""
        if "class" in rec:
            item["class"] = torch.tensor(rec["class"])
        if self.lowres:
            item["lowres"] = box_downsample(image)
        return item

    def read_sketch(self, rec, params, array):
        """(1, H, W) float32 lines in {0, 1}: the dataset's sketch file, else image_sketch()."""
        if rec.get("sketch"):
            sk = self.read_file("sketch", rec["sketch"]).convert("L")
            sk = np.asarray(self.apply(sk, params, Image.NEAREST), np.float32) / 255
            # Lines may be dark on white (sketch simplification) or white on black (Canny):
            # the minority side is the line.
            sketch = (sk < 0.5) if sk.mean() > 0.5 else (sk >= 0.5)
        else:
            sketch = image_sketch(array)
        return torch.from_numpy(np.asarray(sketch, np.float32)[None])

    def file_problems(self, rec, read="header"):
        """[(path, reason)] for the files of one record, without loading the item. read="exists":
        every file is there and the captions (read when scanning) are non-empty UTF-8; "header":
        also what Image.open shows without decoding pixels (readable, mode, size); "pixels":
        every file decoded and label values checked at full resolution (data.py --check)."""
        problems, image_size = [], None
        for key in ("image", "label", "instance", "sketch"):
            path = rec.get(key)
            if not path:
                continue
            if not os.path.isfile(path):
                whose = "" if key == "image" else f", the {key} file of {rec['image']}"
                problems.append((path, "is missing" + whose))
                continue
            if read == "exists":
                continue
            reason, size = self.read_problem(key, path, read == "pixels")
            if reason is None and size and key != "image" and image_size:
                reason = self.size_problem(size, image_size)
            if reason:
                problems.append((path, reason))
            if key == "image":
                image_size = size
        if "captions" in rec:
            path = rec["caption_file"]
            if not os.path.isfile(path):
                problems.append((path, f"is missing, the captions of {rec['image']}"))
            elif not rec["captions"]:
                problems.append((path, f"holds no caption for {rec['image']}"))
            elif any("\ufffd" in c for c in rec["captions"]):  # read_lines' mark of a bad byte
                problems.append((path, "is not UTF-8 text"))
        return problems

    def read_problem(self, key, path, decode):
        """(reason or None, (W, H) or None) of an existing file: its header, or all its pixels."""
        try:
            with Image.open(path) as img:  # reads the header: size and mode, no pixels
                reason = self.mode_problem(key, img.mode)
                if decode and not reason:
                    img.load()
                    if key == "label":
                        ids = self.label_image(img)
                        if ids is None:
                            reason = COLOUR_CODED
                        else:
                            raw = np.asarray(ids)
                            label = self.encode(raw, self.label_nc, self.dontcare)
                            reason = self.value_problem(raw, label)
                return reason, img.size
        except READ_ERRORS:
            return "cannot be read (not an image, or corrupt or truncated)", None


# The scanners name the partner files (label, instance, sketch, captions) each image must have,
# whether or not they exist: get_dataset's start-up check names every missing one at once.
# An optional partner (instance maps, sketches) is wanted for every image when its folder
# exists, so that no batch mixes items with and without it.

def partner(image, folder, ext=".png"):
    """The file in `folder` with the image's stem and `ext` (or `ext` in upper case, as some
    tools write it), or None when there is no folder."""
    if not folder:
        return None
    path, upper = (os.path.join(folder, stem(image) + e) for e in (ext, ext.upper()))
    return upper if not os.path.isfile(path) and os.path.isfile(upper) else path


def existing_dir(folder):
    return folder if folder and os.path.isdir(folder) else None


def records_from(images, label_dir, instance_dir=None):
    """One record per image: label (and instance, if that folder exists) by the image's stem."""
    instance_dir = existing_dir(instance_dir)
    return [dict(name=stem(p), image=p, label=partner(p, label_dir),
                 instance=partner(p, instance_dir)) for p in images]


def need_images(images, folder, name):
    if not images:
        raise layout_error(f"found no images in {folder}", name)


# ----------------------------------------------------------------------------------------------
# Real datasets: one scanner per layout (facts from each official code)
# ----------------------------------------------------------------------------------------------

def scan_deepfashion(root, split, size, **options):
    """INADE's {phase}_img / _label / _inst folders, or SMIS's {phase} / cihp_{phase}_mask."""
    name = "deepfashion"
    require_dir(root, name)
    img_dir, lab_dir = os.path.join(root, f"{split}_img"), os.path.join(root, f"{split}_label")
    inst_dir = os.path.join(root, f"{split}_inst")
    if not os.path.isdir(img_dir) and os.path.isdir(os.path.join(root, f"cihp_{split}_mask")):
        img_dir, lab_dir = os.path.join(root, split), os.path.join(root, f"cihp_{split}_mask")
        inst_dir = None
    images = list_images(img_dir)
    need_images(images, img_dir, name)
    return FileDataset(name, records_from(images, lab_dir, inst_dir), split,
                       parse_size(name, size, 256), "fixed", num_classes=8,
                       class_names=DEEPFASHION_CLASSES, encode=encode_spade, label_nc=8,
                       first_channel=True)


def scan_cityscapes(root, split, size, **options):
    """leftImg8bit/{train,val}/<city>/*_leftImg8bit.png + gtFine labelIds (and instanceIds),
    paired by the first three '_' fields; the test split reads val."""
    name = "cityscapes"
    require_dir(root, name)
    phase = "train" if split == "train" else "val"
    img_dir = os.path.join(root, "leftImg8bit", phase)
    images = [p for p in list_images(img_dir, recursive=True) if p.endswith("_leftImg8bit.png")]
    need_images(images, img_dir, name)
    records = []
    for path in images:
        key = "_".join(os.path.basename(path).split("_")[:3])
        gt = os.path.join(root, "gtFine", phase, os.path.basename(os.path.dirname(path)), key)
        records.append(dict(name=key, image=path, label=gt + "_gtFine_labelIds.png",
                            instance=gt + "_gtFine_instanceIds.png"))
    # Instance maps are optional, but in both splits or in neither: a split without them would
    # fall back to class regions and measure something else than the other.
    if not any(f.endswith("_gtFine_instanceIds.png") for phase_ in ("train", "val")
               for _, _, files in os.walk(os.path.join(root, "gtFine", phase_)) for f in files):
        for rec in records:
            rec["instance"] = None
    h = size if isinstance(size, (int, np.integer)) else None
    size = (h, 2 * h) if h else size  # an int is the height: Cityscapes keeps aspect 2
    return FileDataset(name, records, split, parse_size(name, size, (256, 512)), "fixed",
                       num_classes=35, class_names=CITYSCAPES_CLASSES, palette=CITYSCAPES_COLOURS,
                       encode=encode_spade, label_nc=35)


def scan_ade20k(root, split, size, **options):
    """Walked recursively as SPADE does: jpgs with _train_/_val_ in the name are images, pngs
    under annotations/ labels, pngs under instances/ INADE's instance maps; paired by stem."""
    name = "ade20k"
    require_dir(root, name)
    tag = "_train_" if split == "train" else "_val_"
    files = [p for p in list_images(root, recursive=True, exts=(".jpg", ".png"))
             if tag in os.path.basename(p)]
    images = [p for p in files if p.lower().endswith(".jpg")]
    need_images(images, os.path.join(root, "images"), name)
    parts = lambda p: os.path.normpath(p).split(os.sep)  # noqa: E731
    labels = {stem(p): p for p in files if p.endswith(".png") and "instances" not in parts(p)}
    insts = {stem(p): p for p in files if p.endswith(".png") and "instances" in parts(p)}

    def beside(image, folder):  # images/<phase>/X.jpg -> <folder>/<phase>/X.png
        phase_dir = os.path.dirname(image)
        return os.path.join(os.path.dirname(os.path.dirname(phase_dir)), folder,
                            os.path.basename(phase_dir), stem(image) + ".png")

    records = [dict(name=stem(p), image=p,
                    label=labels.get(stem(p), beside(p, "annotations")),
                    instance=insts.get(stem(p), beside(p, "instances")) if insts else None)
               for p in images]
    return FileDataset(name, records, split, parse_size(name, size, 256), "resize_and_crop",
                       num_classes=151, class_names=ADE20K_CLASSES, encode=encode_ade20k,
                       label_nc=150, dontcare=True)


def scan_celebamask(root, split, size, **options):
    """INADE layout {train,test}/{images,labels,instances}; 19 classes from g_mask.py."""
    name = "celebamask-hq"
    require_dir(root, name)
    base = os.path.join(root, split)
    images = list_images(os.path.join(base, "images"))
    need_images(images, os.path.join(base, "images"), name)
    records = records_from(images, os.path.join(base, "labels"), os.path.join(base, "instances"))
    return FileDataset(name, records, split, parse_size(name, size, 256), "resize_and_crop",
                       num_classes=19, class_names=CELEBAMASK_CLASSES, encode=encode_spade,
                       label_nc=19, scaled_maps=True)


def read_coco_captions(path):
    try:
        with open(path) as f:
            annotations = json.load(f)["annotations"]
        captions = {}
        for a in annotations:
            captions.setdefault(int(a["image_id"]), []).append(a["caption"].strip())
        return captions
    except (OSError, ValueError, KeyError, TypeError):
        raise layout_error(f"cannot read COCO captions from {path} (a JSON with 'annotations' "
                           "of image_id and caption)", "coco-stuff") from None


def scan_coco_stuff(root, split, size, **options):
    """SPADE layout {train,val}_img / _label / _inst; optional COCO caption annotations."""
    name = "coco-stuff"
    require_dir(root, name)
    phase = "train" if split == "train" else "val"
    img_dir = os.path.join(root, f"{phase}_img")
    images = list_images(img_dir)
    need_images(images, img_dir, name)
    records = records_from(images, os.path.join(root, f"{phase}_label"),
                           os.path.join(root, f"{phase}_inst"))
    cap_file = os.path.join(root, "annotations", f"captions_{phase}2017.json")
    if os.path.isfile(cap_file):
        captions = read_coco_captions(cap_file)
        for rec in records:  # COCO file names are the zero-padded image id
            rec["captions"] = captions.get(int(rec["name"]), []) if rec["name"].isdigit() else []
            rec["caption_file"] = cap_file
    return FileDataset(name, records, split, parse_size(name, size, 256), "resize_and_crop",
                       num_classes=183, class_names=COCO_CLASSES, encode=encode_spade,
                       label_nc=182, dontcare=True)


def read_lines(path):
    """Non-empty lines of a text file (captions); no file gives no lines."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # -sig: no BOM in line 1
        return [line.strip() for line in f if line.strip()]


class _NamesOnly(pickle.Unpickler):
    """filenames.pickle holds a list of strings: refuse anything that would run code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def read_filenames(folder, name):
    """MM-CelebA-HQ's {split}/filenames.pickle (AttnGAN style) or filenames.txt (one a line)."""
    pkl, txt = os.path.join(folder, "filenames.pickle"), os.path.join(folder, "filenames.txt")
    try:
        if os.path.isfile(pkl):
            with open(pkl, "rb") as f:
                names = _NamesOnly(f, encoding="latin1").load()
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        else:
            with open(txt) as f:
                names = [line.strip() for line in f if line.strip()]
    except (OSError, pickle.UnpicklingError, EOFError, TypeError, ValueError, UnicodeDecodeError):
        raise layout_error(f"cannot read a list of file names from {pkl} (or {txt})",
                           name) from None
    return [stem(n) for n in names]


def jpg_or_png(folder, file_stem):
    """folder/<stem>.jpg, or .png where only that exists."""
    jpg = os.path.join(folder, file_stem + ".jpg")
    png = os.path.join(folder, file_stem + ".png")
    return png if os.path.isfile(png) and not os.path.isfile(jpg) else jpg


def scan_mm_celeba(root, split, size, **options):
    """image/<id>.jpg, text/celeba-caption/<id>.txt, {train,test}/filenames.pickle; masks and
    sketches, where their folders exist, in mask/<id>.png and sketch/<id>.(jpg|png) (our layout
    choice: the masks are CelebAMask-HQ's, merged by g_mask.py)."""
    name = "mm-celeba-hq"
    require_dir(root, name)
    mask_dir = existing_dir(os.path.join(root, "mask"))
    sketch_dir = existing_dir(os.path.join(root, "sketch"))
    records = []
    for i in read_filenames(os.path.join(root, split), name):
        cap = os.path.join(root, "text", "celeba-caption", i + ".txt")
        records.append(dict(name=i, image=jpg_or_png(os.path.join(root, "image"), i),
                            captions=read_lines(cap), caption_file=cap,
                            sketch=sketch_dir and jpg_or_png(sketch_dir, i),
                            label=partner(i, mask_dir), instance=None))
    need_images(records, os.path.join(root, "image"), name)
    return FileDataset(name, records, split, parse_size(name, size, 256), "fixed",
                       num_classes=19 if mask_dir else 0,
                       class_names=CELEBAMASK_CLASSES if mask_dir else [],
                       encode=encode_spade, label_nc=19, scaled_maps=True)


def scan_gta5(root, split, size, **options):
    """cIMLE's RGB256Full/%08d.png + Label256Full/%08d.png; train below 00100001, val from it."""
    name = "gta5"
    require_dir(root, name)
    img_dir = os.path.join(root, "RGB256Full")
    images = [p for p in list_images(img_dir) if stem(p).isdigit()
              and (int(stem(p)) < 100001) == (split == "train")]
    need_images(images, img_dir, name)
    h = size if isinstance(size, (int, np.integer)) else None
    size = (h, 2 * h) if h else size
    # No flips: IMLE keeps one latent code per training example, so the target must not change.
    return FileDataset(name, records_from(images, os.path.join(root, "Label256Full")), split,
                       parse_size(name, size, (256, 512)), "fixed", num_classes=20,
                       class_names=GTA5_CLASSES, palette=GTA5_COLOURS, encode=encode_gta5,
                       rgb_labels=True, flip=False)


# Sub-folder names that declare a split, as words separated by _ - . or a space, optionally
# ending in one capital or a number: train, training, trainA, cars_train / test, val, valid,
# validation, testB, val2017, cars_test.
SPLIT_WORDS = {"train": "train", "training": "train", "test": "test", "testing": "test",
               "val": "test", "valid": "test", "validation": "test"}


def folder_split(folder_name):
    """'train' or 'test' when a folder's name declares that split, else None (a class)."""
    for word in re.split(r"[_\-. ]+", folder_name):
        for w in (word, re.sub(r"(?:[A-Z]|\d+)$", "", word)):  # trainA -> train
            if w.lower() in SPLIT_WORDS:
                return SPLIT_WORDS[w.lower()]
    return None


def subfolders(folder):
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))


def split_folders(root, split):
    """(base, class folders) of one split of a `folder` dataset; see scan_folder."""
    named = {s: [d for d in subfolders(root) if folder_split(d) == s] for s in ("train", "test")}
    only = subfolders(root)
    if not any(named.values()) and len(only) == 1 and not list_images(root) and \
            any(folder_split(d) for d in subfolders(os.path.join(root, only[0]))):
        return split_folders(os.path.join(root, only[0]), split)  # unzipped: ROOT/cat2dog/trainA
    own = named[split] or named["train"]  # a test split without folders: the train images
    # ROOT/train, ROOT/val, ROOT/test are split roots, not classes: the first of SPLIT_WORDS
    # (test before val) is the split's root.
    plain = [d for d in own if d.lower() in SPLIT_WORDS]
    if plain:
        own = [min(plain, key=lambda d: list(SPLIT_WORDS).index(d.lower()))]
    if len(own) > 1:
        return root, own
    if own:
        base = os.path.join(root, own[0])
        inner = subfolders(base)
        while not list_images(base) and len(inner) == 1 and folder_split(inner[0]):
            base = os.path.join(base, inner[0])      # cars_train/cars_train/*.jpg (Kaggle's copy)
            inner = subfolders(base)
        return base, inner
    return root, [d for d in subfolders(root) if folder_split(d) is None]


def scan_folder(root, split, size, stretch=False, channels=3, **options):
    """Any folder of images. Sub-folders named after a split (folder_split) hold that split and
    only that split: one such folder is the split's root (ROOT/train, cars_train), several are
    its classes (DRIT's cat2dog: trainA, trainB / testA, testB). Without a folder of its own the
    train split reads ROOT minus its test folders, and the test split reads the train images.
    In the split's root, sub-folders are classes (images found recursively), else its images.
    A ROOT (or split root) holding nothing but one such folder stands for that folder (an archive
    unpacked into its own folder: ROOT/cat2dog/trainA, cars_train/cars_train).
    Class ids are the train split's: a test class folder takes the id of the training folder of
    its name (split-named classes, trainA / testA, pair up in sorted order)."""
    name = "folder"
    require_dir(root, name)
    base, classes = split_folders(root, split)
    names = split_folders(root, "train")[1] if classes else []
    if all(folder_split(d) for d in classes) and len(classes) > 1:      # trainA, trainB / testA...
        if len(classes) != len(names):
            raise layout_error(f"{root} has {len(names)} training class folders "
                               f"({', '.join(names)}) and {len(classes)} for the {split} split "
                               f"({', '.join(classes)})", name)
        ids = dict(zip(classes, range(len(classes))))
    else:
        ids = {d: names.index(d) for d in classes if d in names}
        unknown = [d for d in classes if d not in ids]
        if unknown:
            raise layout_error(f"the {split} split's class folders {', '.join(unknown)} in {base} "
                               f"have no training folder (training classes: "
                               f"{', '.join(names) or 'none'})", name)
    records = [dict(name=stem(p), image=p, **{"class": ids[d]}) for d in classes
               for p in list_images(os.path.join(base, d), recursive=True)]
    if not records:
        names, records = [], [dict(name=stem(p), image=p) for p in list_images(base)]
    need_images(records, base, name)
    ds = FileDataset(name, records, split, parse_size(name, size, 128),
                     "fixed" if stretch else "shortside_crop", channels=channels, lowres=True)
    ds.class_names = names
    if ds.size[0] % 8 or ds.size[1] % 8:
        raise UserError(f"size {ds.size} of dataset 'folder' must be a multiple of 8 "
                        "(for `lowres`).")
    return ds


def folder_pairs_base(root, split):
    """ROOT/<split> when it has images/ (the split named as SPLIT_WORDS name it, test before
    val), else ROOT (both splits read the same files)."""
    named = [os.path.join(root, w) for w, s in SPLIT_WORDS.items() if s == split]
    return next((d for d in named if os.path.isdir(os.path.join(d, "images"))), root)


def scan_folder_pairs(root, split, size, num_classes=None, **options):
    """ROOT[/<split>]/images/<name>.* (<split>: train, test or val) with labels/<name>.png,
    optional instances/, sketches/, captions/<name>.txt. The label files of both splits are
    read once, so that both encode alike: 255 (don't care, as in SPADE) becomes an extra last
    channel when present, and the classes are the largest other id + 1, or `num_classes`
    one-hot channels (don't care included) when given, for a model trained on more classes than
    these labels show."""
    name = "folder-pairs"
    require_dir(root, name)
    base = folder_pairs_base(root, split)
    images = list_images(os.path.join(base, "images"))
    need_images(images, os.path.join(base, "images"), name)
    records = records_from(images, os.path.join(base, "labels"), os.path.join(base, "instances"))
    sketch_dir = existing_dir(os.path.join(base, "sketches"))
    cap_dir = existing_dir(os.path.join(base, "captions"))
    for rec in records:
        rec["sketch"] = partner(rec["image"], sketch_dir)
        if cap_dir:
            rec["caption_file"] = partner(rec["image"], cap_dir, ".txt")
            rec["captions"] = read_lines(rec["caption_file"])
    values = set()
    label_dirs = sorted({os.path.join(folder_pairs_base(root, s), "labels")
                         for s in ("train", "test")})
    for path in [p for d in label_dirs for p in list_images(d, exts=(".png",))]:
        try:
            ids = as_ids(open_image(path, name))
        except UserError:  # unreadable: the file checks name it
            continue
        if ids is None:
            raise layout_error(f"label file {path} {COLOUR_CODED}", name)
        values |= set(np.unique(np.asarray(ids)).tolist())
    dontcare = 255 in values
    label_nc = max([v for v in values if v != 255], default=0) + 1
    if num_classes is not None:
        if num_classes < label_nc + dontcare:
            extra = " and 255 (don't care)" if dontcare else ""
            raise UserError(f"the labels in {' and '.join(label_dirs)} have ids "
                            f"0..{label_nc - 1}{extra}: {label_nc + dontcare} one-hot channels, "
                            f"more than the {num_classes} asked for (--num_classes).")
        label_nc = num_classes - dontcare
    return FileDataset(name, records, split, parse_size(name, size, 256), "fixed",
                       num_classes=label_nc + dontcare, encode=encode_spade,
                       label_nc=label_nc, dontcare=dontcare)


# ----------------------------------------------------------------------------------------------
# Registry and the one entry point
# ----------------------------------------------------------------------------------------------

DATASETS = {
    "shapes": dict(kind="synthetic", layout="built in (no files)"),
    "hshape": dict(kind="synthetic", layout="built in (no files)"),
    "letters": dict(kind="synthetic", layout="built in (no files)"),
    "deepfashion": dict(kind="real", scan=scan_deepfashion, layout=(
        "ROOT/{train,test}_img/*.jpg with ROOT/{train,test}_label/*.png (ids 0..7) and optional "
        "ROOT/{train,test}_inst/*.png (INADE), or ROOT/{train,test}/*.jpg with "
        "ROOT/cihp_{train,test}_mask/*.png (SMIS)")),
    "cityscapes": dict(kind="real", scan=scan_cityscapes, layout=(
        "ROOT/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png with "
        "ROOT/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png (ids 0..34) "
        "and optional ..._gtFine_instanceIds.png")),
    "ade20k": dict(kind="real", scan=scan_ade20k, layout=(
        "ROOT/images/{training,validation}/ADE_{train,val}_<n>.jpg with "
        "ROOT/annotations/{training,validation}/ADE_{train,val}_<n>.png (0 = other, 1..150) and "
        "optional ROOT/instances/{training,validation}/*.png, ROOT being ADEChallengeData2016 or "
        "a folder above it")),
    "celebamask-hq": dict(kind="real", scan=scan_celebamask, layout=(
        "ROOT/{train,test}/images/*.jpg with ROOT/{train,test}/labels/*.png (g_mask.py ids 0..18) "
        "and optional ROOT/{train,test}/instances/*.png")),
    "coco-stuff": dict(kind="real", scan=scan_coco_stuff, layout=(
        "ROOT/{train,val}_img/*.jpg with ROOT/{train,val}_label/*.png (ids 0..181, 255 = "
        "unlabeled), optional ROOT/{train,val}_inst/*.png and "
        "ROOT/annotations/captions_{train,val}2017.json")),
    "mm-celeba-hq": dict(kind="real", scan=scan_mm_celeba, layout=(
        "ROOT/image/<id>.jpg with ROOT/text/celeba-caption/<id>.txt (one caption per line), "
        "ROOT/{train,test}/filenames.pickle (or filenames.txt) listing the ids, optional "
        "ROOT/mask/<id>.png (CelebAMask-HQ ids 0..18) and ROOT/sketch/<id>.jpg")),
    "gta5": dict(kind="real", scan=scan_gta5, layout=(
        "ROOT/RGB256Full/<8 digits>.png with ROOT/Label256Full/<8 digits>.png (Cityscapes colours, "
        "RGB or palette PNG), train numbered from 00000001, val from 00100001 (cIMLE)")),
    "folder": dict(kind="real", scan=scan_folder, layout=(
        "ROOT/*.jpg|png or ROOT/<class>/...; sub-folders named after a split (train, trainA, "
        "cars_train / test, val, testB, cars_test) hold that split only, and several of them "
        "(trainA, trainB) are its classes")),
    "folder-pairs": dict(kind="real", scan=scan_folder_pairs, layout=(
        "ROOT[/<split>]/images/<name>.jpg|png with ROOT[/<split>]/labels/<name>.png (class ids, "
        "255 = don't care), optional instances/<name>.png, sketches/<name>.png, "
        "captions/<name>.txt; <split>: train, test or val")),
}


# Keys a real set computes per item whether or not a script reads them; get_dataset(skip=...)
# drops them (the built-in sets are cheap and keep their items whole).
OPTIONAL_KEYS = ("sketch", "lowres")


def get_dataset(name, root=None, split="train", size=None, check_files=True, skip=(), **options):
    """The dataset `name` (a key of DATASETS). Options: synthetic sets `seed`, `length`,
    `letters` (letters only); folder `stretch`, `channels`; folder-pairs `num_classes`.
    `skip`: OPTIONAL_KEYS a script never reads (real sets then do not make them).
    The files of a real set pass check_at_start first (check_files=False skips it: data.py
    --check makes its own, complete one)."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}.")
    assert set(skip) <= set(OPTIONAL_KEYS), skip  # a script's bug, not a user's input
    split = split_name(split)
    if DATASETS[name]["kind"] == "synthetic":
        return SyntheticDataset(name, split, size, **options)
    root = root or os.path.join("data", name)
    ds = DATASETS[name]["scan"](root, split, size, **options)
    ds.skip(skip)
    if check_files:
        check_at_start(ds, root)
    return ds


# ----------------------------------------------------------------------------------------------
# Checking the files: cheaply at start-up, completely with python data.py --check NAME
# ----------------------------------------------------------------------------------------------

HEADER_SCAN_LIMIT = 30_000  # items whose headers check_at_start reads (our choice, see there)
MAX_LISTED = 5              # bad files a start-up error names; data.py --check names them all


def plural(n, noun):
    return f"{n} {noun}" + "s" * (n != 1)


def check_at_start(ds, root):
    """Refuse a real dataset whose files would fail days into a run: every partner file (label,
    instance, sketch, captions) is looked for, and every file's header is read (Image.open:
    readable, mode, size; no pixels decoded): about 0.05 s per 1,000 files (warm disk cache,
    a busy 2-core machine), 5 s for 30,000 items of three files. Above HEADER_SCAN_LIMIT items
    (of the paper sets only COCO-Stuff's train split and LSUN) the headers of an evenly spread
    sample of at most that many are read; decoding and label values are data.py --check's."""
    step = -(-len(ds) // HEADER_SCAN_LIMIT)  # ceil: 1 up to the limit
    problems = []
    for index, rec in enumerate(ds.records):
        problems += ds.file_problems(rec, "header" if index % step == 0 else "exists")
    if problems:
        listed = "; ".join(f"{path} {reason}" for path, reason in problems[:MAX_LISTED])
        more = len(problems) - MAX_LISTED
        listed += f"; and {more} more" if more > 0 else ""
        raise layout_error(f"{plural(len(problems), 'bad file')} in the {ds.split} split: {listed} "
                           f"(python data.py --check {ds.name} --data_dir {root} lists them all)",
                           ds.name)


def check_dataset(name, root, splits=("train", "test"), size=None):
    """Every item of the splits: every file decoded and checked at full resolution
    (FileDataset.file_problems), then, when its files are good, the item loaded as training
    loads it (on one core about 4 and 20 ms for a 256x256 item). Goes on after a bad file.
    Returns the number of items and [(path, reason)]."""
    if DATASETS.get(name, {}).get("kind") != "real":
        real = [n for n, d in DATASETS.items() if d["kind"] == "real"]
        raise UserError(f"--check {name}: expected a dataset stored in files, one of: "
                        f"{', '.join(real)}.")
    problems, seen = [], set()
    for split in splits:
        ds = get_dataset(name, root, split, size, check_files=False)
        for index, rec in enumerate(tqdm(ds.records, desc=f"{name} {split}", unit="item")):
            if rec["image"] in seen:  # a folder's test split may be its train images
                continue
            seen.add(rec["image"])
            problems += ds.file_problems(rec, "pixels") or load_problems(ds, index)
    return len(seen), problems


def load_problems(ds, index):
    """[] when item `index` loads, else what went wrong, reported against its image."""
    try:
        ds[index]
        return []
    except UserError as err:
        return [(ds.records[index]["image"], str(err))]
    except Exception as err:  # a scan reports whatever a file does to the loader, and goes on
        return [(ds.records[index]["image"], f"fails to load: {type(err).__name__}: {err}")]


# ----------------------------------------------------------------------------------------------
# Benchmark and preview: python data.py --bench [NAME --data_dir DIR] | --preview NAME
# ----------------------------------------------------------------------------------------------

def items_per_second(ds, rounds=10, seconds=0.3):
    """Items per second of one data worker (one thread): the best of `rounds` short rounds of CPU
    time (time.process_time), so that other jobs on a shared machine disturb it as little as
    possible."""
    torch.set_num_threads(1)
    ds[0]  # warm caches (fonts, file system)
    best, index = 0.0, 0
    for _ in range(rounds):
        n, start = 0, time.process_time()
        while time.process_time() - start < seconds:
            ds[index % len(ds)]
            n, index = n + 1, index + 1
        best = max(best, n / (time.process_time() - start))
    return best


def benchmark(names=("shapes", "hshape", "letters"), sizes=(None, 256), root=None, **kw):
    """Items per second of one data worker: {(name, (H, W), what): items/s}. The synthetic sets
    at their default size and 256; a real set (`root`) at its default size, with every key and
    without OPTIONAL_KEYS (what a script that skips them pays)."""
    results = {}
    for name in names:
        if DATASETS.get(name, {}).get("kind") == "real":
            for skip in ((), OPTIONAL_KEYS):
                ds = get_dataset(name, root, split="train", size=sizes[0], skip=skip)
                what = "all keys" if not skip else "without " + " and ".join(skip)
                results[(name, ds.size, what)] = items_per_second(ds, **kw)
            continue
        for size in sizes:
            ds = get_dataset(name, size=size)
            results[(name, ds.size, "all keys")] = items_per_second(ds, **kw)
    return results


def preview(name, root=None, path=None, n=8, size=None):
    """A PNG grid: one column per item; rows image, label map, instance edges, sketch, lowres."""
    ds = get_dataset(name, root, size=size)
    rows = {"image": [], "label": [], "instance": [], "sketch": [], "style": [], "lowres": []}

    def to_rgb(t):  # (C, h, w) in [-1, 1] -> (H, W, 3) uint8 at the dataset's size
        rgb = ((t.numpy() + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)
        rgb = np.repeat(rgb, 3 // rgb.shape[2], 2)
        return np.asarray(Image.fromarray(rgb).resize(ds.size[::-1], Image.NEAREST))

    for i in range(min(n, len(ds))):
        item = ds[i]
        for key in rows:
            if key not in item:
                continue
            t = item[key]
            if key == "label":
                rows[key].append(ds.palette[t.numpy()])
            elif key == "instance":
                edges = instance_edges(t.numpy())[..., None]
                rows[key].append(np.repeat(edges * 255, 3, 2).astype(np.uint8))
            elif key == "sketch":
                rows[key].append(np.repeat((t[0].numpy() * 255).astype(np.uint8)[..., None], 3, 2))
            else:
                rows[key].append(to_rgb(t))
    rows = [r for r in rows.values() if r]
    h, w = ds.size
    grid = np.full((len(rows) * (h + 2), max(map(len, rows)) * (w + 2), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = tile
    path = path or f"/tmp/data_preview_{name}.png"
    if os.path.isdir(path) or not os.path.splitext(path)[1]:  # a folder: name the file inside it
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, f"preview_{name}.png")
    Image.fromarray(grid).save(path)
    return path


def check(name, root, split, size):
    """data.py --check: one line per bad file, a summary; exit status 2 when any file is bad."""
    root = root or os.path.join("data", name)
    splits = ("train", "test") if split == "all" else (split,)
    count, problems = check_dataset(name, root, splits, size)
    for path, reason in problems:
        print(f"{path}: {reason}")
    where = f"{count} items of {name} ({', '.join(splits)}) in {root}"
    if problems:
        files = plural(len({path for path, _ in problems}), "bad file")
        raise UserError(f"{files} among the {where}, listed above; expected every file "
                        f"present and readable, as the layout says: {DATASETS[name]['layout']}.")
    print(f"{where}: every file good")


def main(argv=None):
    p = argparse.ArgumentParser(description="datasets of the five scripts: benchmark, preview, "
                                "check")
    p.add_argument("--bench", nargs="?", const="synthetic", default=None, metavar="NAME",
                   help="items/s of one data worker (one thread): the synthetic sets, or the real "
                        "set NAME in --data_dir")
    p.add_argument("--preview", default=None, help="write a sample grid of this dataset")
    p.add_argument("--check", default=None, help="read every file of this dataset, list bad ones")
    p.add_argument("--data_dir", "--root", dest="data_dir", default=None,
                   help="dataset folder (default data/NAME)")
    p.add_argument("--split", default="all", choices=["train", "test", "all"],
                   help="the split --check reads")
    p.add_argument("--out", default=None, help="PNG path or folder (default /tmp/data_preview_NAME.png)")
    p.add_argument("--size", type=int, default=None)
    args = p.parse_args(argv)
    if args.bench:
        names = ("shapes", "hshape", "letters") if args.bench == "synthetic" else (args.bench,)
        sizes = (None, 256) if args.bench == "synthetic" else (args.size,)
        for (name, size, what), rate in benchmark(names, sizes, args.data_dir).items():
            print(f"{name:12s} {size[0]:4d}x{size[1]:<4d} {rate:8.0f} items/s per worker "
                  f"({what}; one thread, best round)")
    if args.preview:
        print(preview(args.preview, args.data_dir, args.out, size=args.size))
    if args.check:
        check(args.check, args.data_dir, args.split, args.size)


# ----------------------------------------------------------------------------------------------
# Scoring for poe_gan.py on the built-in data
# ----------------------------------------------------------------------------------------------
# Exact per-modality scores of images generated for shapes items, from counts that add up over
# batches and torchrun ranks (poe_gan.py --eval sums them per modality subset).

def shapes_foreground(images):
    """Object pixels of shapes images (B, 3, H, W) in [-1, 1]: all but the flat grey background
    (channels within 0.1 of each other at a level in [0.4, 0.65]; the set's grey is 0.45-0.60)."""
    rgb = (images + 1) / 2
    flat = rgb.amax(1) - rgb.amin(1) < 0.1
    level = rgb.mean(1)
    return ~(flat & (level > 0.4) & (level < 0.65))


def shapes_modality_metrics(images, batch):
    """Scores of images generated for the items of `batch` (collated, CPU), for every modality
    whether given or not (a given one should beat the unconditional samples):
      label_fg_acc    object/background pixels agree with the label map (seg)
      in_mode         each labelled region is painted in a palette mode of its class (seg)
      sketch_f1       edges of the image vs the sketch, 1-pixel tolerance (sketch)
      caption_*       the objects the caption names are found, by colour / shape / both (text)
      style_colour    colours of the style reference's objects found in the image (style)
      colour_precision  share of the objects found whose colour is one the item asks for (its
                      caption names and its style reference shows the same colours): recall
                      (caption_colour, style_colour) also rewards multicoloured blobs (text, style)
      mode_coverage   fraction of (class, palette mode) pairs drawn at least once, over the
                      objects found in all images, and mode_tv their distance to the set's weights
    Computed from counts (shapes_modality_counts), which add up batch by batch."""
    return shapes_modality_scores(shapes_modality_counts(images, batch))


def shapes_modality_zero_counts():
    """shapes_modality_counts of no images, all zeros: the start of a sum (on every torchrun
    rank, also one that scores no batch). The modes table counts the objects found per (class,
    palette mode + 1), column 0 for a colour that is no mode of its class."""
    keys = ("images", "fg_match", "pixels", "in_mode", "coloured", "edge_pred", "edge_pred_hit",
            "edge_true", "edge_true_hit", "named", "caption_colour", "caption_shape",
            "caption_object", "style_hits", "style_wanted", "asked")
    c = {k: torch.zeros((), dtype=torch.float64) for k in keys}
    columns = 1 + max(len(p) for p in SHAPES_PALETTE)
    c["modes"] = torch.zeros(len(SHAPES_CLASSES), columns, dtype=torch.float64)
    return c


def shapes_modality_counts(images, batch):
    """The sums behind shapes_modality_metrics (the keys of shapes_modality_zero_counts), as
    float64 tensors that add across batches and ranks."""
    images = images.float().cpu().clamp(-1, 1)
    c = {"images": len(images)}
    fg = shapes_foreground(images) == (batch["label"].cpu() > 0)
    c["fg_match"], c["pixels"] = int(fg.sum()), fg.numel()
    fid = shapes_colour_fidelity(images, batch["instance"].cpu(), batch["inst_class"].cpu(),
                                 batch["inst_valid"].cpu())
    distance = fid["distance"][fid["valid"]]
    c["in_mode"], c["coloured"] = int((distance <= SHAPES_MODE_TOLERANCE).sum()), len(distance)
    # colour edges: the objects' outlines (the targets) are colour changes, and grey edges lose
    # those between colours of equal brightness (the true images scored F1 0.51 on grey)
    rgb = ((images + 1) / 2).permute(0, 2, 3, 1).numpy()
    pred = torch.from_numpy(np.stack([image_sketch(x) for x in rgb])).bool()
    target = batch["sketch"][:, 0].cpu().bool()

    def grow(edges):                                   # 1-pixel tolerance
        return torch.nn.functional.max_pool2d(edges[:, None].float(), 3, 1, 1)[:, 0] > 0

    c["edge_pred"], c["edge_pred_hit"] = int(pred.sum()), int((pred & grow(target)).sum())
    c["edge_true"], c["edge_true_hit"] = int(target.sum()), int((target & grow(pred)).sum())
    named = sum(len(shapes_caption_objects(t)) for t in batch["caption"])
    caps = shapes_caption_accuracy(images, batch["caption"])          # fractions of `named`
    c["named"] = named
    c.update({f"caption_{k}": round(v * max(named, 1)) for k, v in caps.items()})
    table = torch.zeros_like(shapes_modality_zero_counts()["modes"], dtype=torch.long)
    hits, total, asked = 0, 0, 0
    for objs, cls, mode, valid in zip(shapes_find_objects(images), batch["inst_class"],
                                      batch["inst_mode"], batch["inst_valid"]):
        wanted = {SHAPES_MODE_NAMES[k][j] for k, j, v in zip(cls.tolist(), mode.tolist(),
                                                             valid.tolist()) if v}
        seen = {o["colour"] for o in objs}
        hits, total = hits + len(wanted & seen), total + len(wanted)
        asked += sum(o["colour"] in wanted for o in objs)
        for o in objs:
            names = SHAPES_MODE_NAMES[o["cls"]]
            table[o["cls"], 1 + names.index(o["colour"]) if o["colour"] in names else 0] += 1
    c.update(style_hits=hits, style_wanted=total, asked=asked, modes=table)
    return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in c.items()}


def shapes_modality_scores(c):
    """shapes_modality_metrics from the (summed) counts of shapes_modality_counts."""
    def ratio(a, b):
        return float(c[a] / c[b].clamp(min=1))

    precision, recall = ratio("edge_pred_hit", "edge_pred"), ratio("edge_true_hit", "edge_true")
    m = {"label_fg_acc": ratio("fg_match", "pixels"), "in_mode": ratio("in_mode", "coloured"),
         "sketch_f1": 2 * precision * recall / max(precision + recall, 1e-8)}
    m.update({f"caption_{k}": ratio(f"caption_{k}", "named")
              for k in ("colour", "shape", "object")})
    m["style_colour"] = ratio("style_hits", "style_wanted")
    table = c["modes"].long()
    m["colour_precision"] = float(c["asked"] / table.sum().clamp(min=1))
    cls, mode = torch.nonzero(table, as_tuple=True)                    # back to one per object
    counts = table[cls, mode]
    cover = shapes_mode_coverage((mode - 1).repeat_interleave(counts),
                                 cls.repeat_interleave(counts))
    m["mode_coverage"], m["mode_tv"] = cover["coverage"], cover["tv"]
    m["objects_per_image"] = float(table.sum() / c["images"].clamp(min=1))
    return m


# ----------------------------------------------------------------------------------------------
# Scoring for inade.py on the built-in data
# ----------------------------------------------------------------------------------------------
# Ground-truth scoring of INADE's samples on the built-in shapes: every object's measured colour
# against its class's colour modes (random styles should cover the modes, reconstructions should
# return the reference's own mode, two objects of one class should be able to differ).

def shapes_style_scores(batch, images):
    """One batch of test layouts: for each named image set (B, 3, H, W) in `images` (e.g. the
    real images, random samples, reconstructions) every object's nearest mode, its distance and
    visibility (each (B, M)), plus the true modes and classes."""
    inst, cls, valid = batch["instance"].cpu(), batch["inst_class"].cpu(), batch["inst_valid"].cpu()
    out = {}
    for name, imgs in images.items():
        f = shapes_colour_fidelity(imgs.cpu(), inst, cls, valid)
        out[name] = {k: f[k] for k in ("distance", "mode", "valid")}
    out["true_mode"], out["cls"] = batch["inst_mode"].cpu(), cls
    return out


def shapes_same_class_pairs_differ(mode, cls, ok):
    """Among pairs of objects of one class in one image (both where ok), the fraction whose modes
    differ: 0 if every instance of a class looked alike, as with one style per class."""
    differ = total = 0
    for i in range(mode.shape[1]):
        for j in range(i + 1, mode.shape[1]):
            pair = ok[:, i] & ok[:, j] & (cls[:, i] == cls[:, j])
            differ += int((pair & (mode[:, i] != mode[:, j])).sum())
            total += int(pair.sum())
    return differ / total if total else float("nan")


def shapes_style_summary(rows, names=("real", "random", "recon")):
    """The scores of shapes_style_scores over all batches: per image set, the colour error, the
    fraction in a mode, mode coverage and total variation to the true mode weights, how often
    two same-class objects differ and, for "recon", how often the reference's own mode returns."""
    cls = torch.cat([r["cls"] for r in rows])
    true_mode = torch.cat([r["true_mode"] for r in rows])
    out = {}
    for name in names:
        dist, mode, valid = (torch.cat([r[name][key] for r in rows])
                             for key in ("distance", "mode", "valid"))
        in_mode = valid & (dist <= SHAPES_MODE_TOLERANCE)
        cover = shapes_mode_coverage(mode, cls, in_mode)
        out[name] = {
            "colour_error": dist[valid].mean().item(),          # RGB distance to nearest mode
            "in_mode": in_mode[valid].float().mean().item(),    # within tolerance of a mode
            "mode_coverage": cover["coverage"], "mode_tv": cover["tv"],
            "mode_counts": cover["counts"],
            # the same over every visible object by its nearest mode, in tolerance or not
            "mode_coverage_nearest": shapes_mode_coverage(mode, cls, valid)["coverage"],
            "same_class_pairs_differ": shapes_same_class_pairs_differ(mode, cls, in_mode),
            "same_class_pairs_differ_nearest": shapes_same_class_pairs_differ(mode, cls, valid),
        }
        if name == "recon":  # prior noise remapping: the reference's own mode comes back
            out[name]["mode_accuracy"] = (mode == true_mode)[valid].float().mean().item()
    return out


# ----------------------------------------------------------------------------------------------
# Scoring for cimle.py on the built-in data
# ----------------------------------------------------------------------------------------------

class ShapesCimleScores:
    """cimle.py's --eval on shapes layouts, accumulated input by input (k samples of one layout
    and its z = 0 output at a time): per-instance colour fidelity (in a palette mode? colour
    error), pooled palette-mode coverage and TV (from per-class mode counts), and per-instance
    coverage: the share of its class's modes that one layout's samples hit."""

    def __init__(self):
        self.total, self.count = {}, {}
        self.counts = torch.zeros(len(SHAPES_CLASSES), 3, dtype=torch.long)  # (class, mode)

    def _add(self, name, value, count):
        self.total[name] = self.total.get(name, 0.0) + float(value)
        self.count[name] = self.count.get(name, 0) + count

    def _mean(self, name):
        return self.total[name] / self.count[name] if self.count.get(name) else float("nan")

    def _fidelity(self, prefix, images, inst, cls, valid):
        fid = shapes_colour_fidelity(images, inst, cls, valid)
        seen = int(fid["valid"].sum())
        if seen:  # means over the visible objects of all inputs
            self._add(prefix + "in_mode", fid["in_mode"] * seen, seen)
            self._add(prefix + "colour_error", fid["colour_error"] * seen, seen)
        return fid

    def add(self, samples, zero, item):
        """samples (k, 3, H, W) of one layout item, zero (3, H, W) its z = 0 output."""
        k = len(samples)
        inst, cls, valid = item["instance"], item["inst_class"], item["inst_valid"]
        rep = lambda t: t.unsqueeze(0).expand(k, *t.shape)  # noqa: E731
        fid = self._fidelity("", samples, rep(inst), rep(cls), rep(valid))
        keep = fid["valid"] & (fid["mode"] >= 0)
        self.counts.index_put_((rep(cls)[keep], fid["mode"][keep]),
                               torch.ones(int(keep.sum()), dtype=torch.long), accumulate=True)
        hit = (fid["distance"] <= SHAPES_MODE_TOLERANCE) & fid["valid"]
        modes = torch.nn.functional.one_hot(fid["mode"].clamp(min=0), 3) * hit.unsqueeze(-1)
        covered = modes.amax(0).sum(-1).float()                  # (M,) modes hit per object
        n_modes = torch.tensor([max(len(p), 1) for p in SHAPES_PALETTE])[cls]
        self._add("per_instance", (covered / n_modes)[valid.bool()].sum(), int(valid.sum()))
        self._fidelity("zero_", zero.unsqueeze(0), inst.unsqueeze(0), cls.unsqueeze(0),
                       valid.unsqueeze(0))

    def result(self):
        classes = torch.arange(len(self.counts)).repeat_interleave(3)
        modes = torch.arange(3).repeat(len(self.counts))
        cov = shapes_mode_coverage(  # one entry per counted object, rebuilt from the counts
            modes.repeat_interleave(self.counts.flatten()),
            classes.repeat_interleave(self.counts.flatten()))
        mean = self._mean
        return {"in_mode": mean("in_mode"), "colour_error": mean("colour_error"),
                "mode_coverage_pooled": cov["coverage"], "mode_tv": cov["tv"],
                "mode_counts": cov["counts"], "per_instance_mode_coverage": mean("per_instance"),
                "zero_z_in_mode": mean("zero_in_mode"),
                "zero_z_colour_error": mean("zero_colour_error")}


# ----------------------------------------------------------------------------------------------
# Scoring for compose_diffusion.py on the built-in data
# ----------------------------------------------------------------------------------------------

def shapes_caption_above_chance(images, captions):
    """How much more often each object a caption names is found (shapes_find_objects) than the
    objects it could have named instead, so that images made without reading the caption score
    about 0 (uniform noise, a flat image, a layout-only model picking a class's colour at random).

    images (B, 3, H, W) in [-1, 1], captions list of B str -> fractions in [-1, 1], averaged over
    the named objects (colour c, class k):
      `colour`: [colour c found] - mean over the other colours of class k [that colour found];
      `shape`:  [class k found, any colour] - mean over the other classes [that class found];
      `object`: [class k in colour c found] - mean over the other (colour, class) modes [found].
    """
    modes = [(c, k) for k in range(1, len(SHAPES_CLASSES)) for c in SHAPES_MODE_NAMES[k]]
    score, n = np.zeros(3), 0
    for found, caption in zip(shapes_find_objects(images), captions):
        colours = {f["colour"] for f in found}
        classes = {f["cls"] for f in found}
        objects = {(f["colour"], f["cls"]) for f in found}
        for colour, cls in shapes_caption_objects(caption):
            n += 1
            other_colours = [c for c in SHAPES_MODE_NAMES[cls] if c != colour]
            other_classes = [k for k in range(1, len(SHAPES_CLASSES)) if k != cls]
            other_modes = [m for m in modes if m != (colour, cls)]
            score += [(colour in colours) - np.mean([c in colours for c in other_colours]),
                      (cls in classes) - np.mean([k in classes for k in other_classes]),
                      ((colour, cls) in objects) - np.mean([m in objects for m in other_modes])]
    score = score / max(n, 1)
    return {"colour": float(score[0]), "shape": float(score[1]), "object": float(score[2])}


def shapes_composition_scores(images, batch):
    """Scores of images (B, 3, H, W) in [-1, 1] made for a batch's label map and caption.
    Label map: `layout` = fraction of the map's objects whose region shows a colour of their
    class's palette, `layout_iou` = IoU of palette-coloured pixels with the map's foreground.
    Caption: `caption_colour`, `caption_shape`, `caption_object` (shapes_caption_above_chance).
    Both: `both` = fraction of the map's objects whose region shows the colour the caption
    names for them (the caption's colour of each object is its ground-truth mode)."""
    fid = shapes_colour_fidelity(images, batch["instance"], batch["inst_class"],
                                 batch["inst_valid"])
    valid = batch["inst_valid"].bool()
    near = fid["distance"] <= SHAPES_MODE_TOLERANCE
    rgb = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)          # (B, H, W, 3)
    centres = torch.tensor(list(SHAPES_COLOURS.values()))               # (K, 3)
    dist = (rgb[..., None, :] - centres).norm(dim=-1).amin(-1)
    dark = (rgb[..., None, :] - SHAPES_STRIPE_DARK * centres).norm(dim=-1).amin(-1)
    fg = (dist <= SHAPES_MODE_TOLERANCE) | (dark <= SHAPES_MODE_TOLERANCE / 2)
    gt = batch["label"] > 0
    iou = ((fg & gt).sum((1, 2)) / (fg | gt).sum((1, 2)).clamp(min=1)).float()
    cap = shapes_caption_above_chance(images, batch["caption"])
    return {"layout": float(near[valid].float().mean()), "layout_iou": float(iou.mean()),
            "caption_colour": cap["colour"], "caption_shape": cap["shape"],
            "caption_object": cap["object"],
            "both": float((near & (fid["mode"] == batch["inst_mode"]))[valid].float().mean())}


# ----------------------------------------------------------------------------------------------
# Scoring for ummgan.py on the built-in data
# ----------------------------------------------------------------------------------------------
# uMM-GAN Fig. 6 on hshape: densities of the widths (w1, w2) read back from images, their
# thresholded supports, and the Jaccard index between two of them. One binning rule for all
# (hshape_jaccard, against the true H, uses it too): a bins x bins grid over [0, 40]^2, widths
# outside it count in N but in no cell.

def hshape_density(widths, bins=20):
    """Share of the widths (N, 2) in each cell (bins, bins): row = w1 cell, column = w2 cell."""
    w = torch.as_tensor(widths, dtype=torch.float32).reshape(-1, 2)
    idx = (w / (HSHAPE_MAX / bins)).floor().long()
    ok = ((idx >= 0) & (idx < bins)).all(1)
    counts = torch.bincount(idx[ok, 0] * bins + idx[ok, 1], minlength=bins * bins).float()
    return (counts / max(len(w), 1)).view(bins, bins)


def hshape_support(widths, bins=20, threshold=0.5):
    """Cells holding at least `threshold` x the mass of a uniform density over the square: the
    H's legs have exactly that density (1/1600 per unit^2). The paper gives no threshold: our
    choice, the same as hshape_jaccard's."""
    return hshape_density(widths, bins) >= threshold / bins ** 2


def hshape_jaccard_between(widths_a, widths_b, bins=20, threshold=0.5):
    """Fig. 6: Jaccard index |A & B| / |A | B| of the thresholded densities of two width sets
    (the paper: training set vs generated)."""
    a, b = hshape_support(widths_a, bins, threshold), hshape_support(widths_b, bins, threshold)
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def hshape_report(real, generated, real_test, bins=20):
    """The Fig. 6 numbers of a generator from three width sets (N, 2): real (train), generated,
    and a second real set (test) for the ceiling of the protocol."""
    sums = {"real": real.sum(1), "generated": generated.sum(1)}
    return {
        "jaccard": hshape_jaccard_between(real, generated, bins),          # real vs generated
        "jaccard_vs_true_H": hshape_jaccard(generated, bins),               # generated vs the H
        "jaccard_real_vs_real": hshape_jaccard_between(real, real_test, bins),  # the ceiling
        # w1 + w2 (mean, std): a generator that keeps the total white area fixed puts every
        # sample on one anti-diagonal line of the plane (what style mixing leads to)
        "width_sum": {k: [float(s.mean()), float(s.std())] for k, s in sums.items()},
        # share off the H (the gaps between legs and bar, which a continuous map from one
        # Gaussian tends to fill: the paper's argument for several constants); real: ~0
        "outside_H": {"real": float((hshape_region(real) < 0).float().mean()),
                      "generated": float((hshape_region(generated) < 0).float().mean())},
    }


def hshape_density_image(widths, bins=20, scale=6):
    """Density of widths (N, 2) -> (1, H, W) picture in [-1, 1] drawn as in Fig. 6: width 1 to
    the right, width 2 upwards (the H stands upright); each cell scale x scale pixels."""
    hist = hshape_density(widths, bins)
    img = (hist / hist.max().clamp(min=1e-12)).t().flip(0)
    img = img.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return (img * 2 - 1)[None]


# uMM-GAN Table 1 and Fig. 8 on letters without a pretrained Inception (a CPU stand-in for FID,
# our choice): pixel nearest neighbours between generated glyphs and a fixed set of real ones.

class LettersNearest:
    """Streams generated images (B, C, H, W) in [-1, 1] against `reference` real ones (N, C, H, W)
    of known `classes` (N,). Keeps a sum and per-class counts for the generated images and one
    running minimum per reference image, so memory is set by the reference set, not by how many
    are generated. report(): `fidelity`, the mean RMS pixel distance of a generated image to its
    nearest real one, and `coverage`, the mean RMS distance of a real one to its nearest generated
    one (lower is better for both: FID's two sides, crudely); `nearest_class_share`, the share of
    generated images whose nearest real image is of each class (1/N each for a balanced set)."""

    def __init__(self, reference, classes, num_classes):
        self.ref = reference.flatten(1).float()
        self.ref_sq = self.ref.pow(2).sum(1)
        self.classes, self.num_classes = torch.as_tensor(classes).long(), num_classes
        self.dist_sum, self.n = 0.0, 0
        self.counts = torch.zeros(num_classes)
        self.ref_min = torch.full((len(self.ref),), float("inf"))

    def add(self, images):
        x = images.flatten(1).float().to(self.ref.device)
        d2 = (x.pow(2).sum(1, keepdim=True) + self.ref_sq - 2 * x @ self.ref.t()).clamp(min=0)
        nearest, j = d2.min(1)  # (B,): each generated image's nearest real one
        self.dist_sum += float(nearest.div(x.shape[1]).sqrt().sum())
        self.n += len(x)
        self.counts += torch.bincount(self.classes[j], minlength=self.num_classes).float()
        self.ref_min = torch.minimum(self.ref_min, d2.min(0).values)

    def report(self):
        dim = self.ref.shape[1]
        return {"fidelity": self.dist_sum / max(self.n, 1),
                "coverage": float(self.ref_min.div(dim).sqrt().mean()),
                "nearest_class_share": (self.counts / max(self.n, 1)).tolist()}


if __name__ == "__main__":
    from common import run_main
    run_main(main)
