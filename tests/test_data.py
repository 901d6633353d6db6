"""Tests of data.py: the synthetic sets are deterministic and their ground truth matches their
pixels; every real-dataset loader reads a tiny fake dataset written in the official layout, and
fails with the promised sentence on each kind of bad input.
"""

import glob
import json
import math
import os
import pickle
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402
from common import UserError  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: torch's thread pool would only add latency on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def same_item(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def edges_by_neighbours(ids):
    """Independent INADE edge map: 1 where any 4-neighbour inside the image differs."""
    h, w = ids.shape
    padded = np.full((h + 2, w + 2), -1)
    padded[1:-1, 1:-1] = ids
    edge = np.zeros((h, w), bool)
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        nb = padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        edge |= (nb != ids) & (nb != -1)
    return edge


def rgb01(image):
    return (image.numpy().transpose(1, 2, 0) + 1) / 2


# ---------------------------------------------------------------------------------------------
# Synthetic sets: determinism, sizes, arguments
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["shapes", "hshape", "letters"])
def test_synthetic_items_are_pure_functions_of_seed_split_and_index(name):
    a, b = data.get_dataset(name), data.get_dataset(name)
    first = a[7]
    a[3], a[8]  # no hidden state between items
    assert same_item(first, b[7]) and same_item(first, a[7])
    assert not torch.equal(first["image"], a[8]["image"])
    assert not torch.equal(first["image"], data.get_dataset(name, split="test")[7]["image"])
    assert not torch.equal(first["image"], data.get_dataset(name, seed=1)[7]["image"])
    val, test = data.get_dataset(name, split="val"), data.get_dataset(name, split="test")
    assert same_item(val[7], test[7])
    assert len(a) == 10_000 and len(data.get_dataset(name, length=5)) == 5
    with pytest.raises(IndexError):
        a[len(a)]
    assert set(first) == a.has and a.size == (64, 64)
    assert first["image"].shape == (a.channels, 64, 64)


def test_sizes_and_bad_arguments_are_user_errors():
    assert data.get_dataset("shapes", size=32)[0]["lowres"].shape == (3, 4, 4)
    item = data.get_dataset("shapes", size=(48, 96))[0]
    assert item["image"].shape == (3, 48, 96) and item["label"].shape == (48, 96)
    assert data.get_dataset("hshape", size=256)[0]["image"].shape == (1, 256, 256)
    for bad in (24, 264, 50):
        with pytest.raises(UserError, match="size"):
            data.get_dataset("shapes", size=bad)
    with pytest.raises(UserError, match="shapes"):
        data.get_dataset("nope")
    with pytest.raises(UserError, match="split"):
        data.get_dataset("shapes", split="dev")
    with pytest.raises(UserError, match="letters"):
        data.get_dataset("letters", letters="A?")


# ---------------------------------------------------------------------------------------------
# shapes: ground truth against pixels
# ---------------------------------------------------------------------------------------------

def test_shapes_ground_truth_matches_the_pixels():
    ds = data.get_dataset("shapes")
    assert ds.num_classes == len(data.SHAPES_CLASSES) == 5 and ds.palette.shape == (5, 3)
    counts = []
    for i in range(40):
        it = ds[i]
        assert it["image"].dtype == torch.float32 and it["label"].dtype == torch.int64
        assert it["image"].min() >= -1 and it["image"].max() <= 1
        img, inst = rgb01(it["image"]), it["instance"].numpy()
        n = int(it["inst_valid"].sum())
        counts.append(n)
        assert it["inst_valid"].tolist() == [True] * n + [False] * (data.MAX_INSTANCES - n)
        assert sorted(np.unique(inst).tolist()) == list(range(n + 1))  # contiguous, all visible
        classes = it["inst_class"].numpy()
        assert np.array_equal(it["label"].numpy(), np.r_[0, classes[:n]][inst])
        background = img[inst == 0]
        assert np.ptp(background) < 1e-6
        low, high = data.SHAPES_BACKGROUND
        assert low - 1e-6 <= background[0, 0] <= high + 1e-6
        for j in range(n):
            mask = inst == j + 1
            ys, xs = np.nonzero(mask)
            assert it["inst_box"][j].tolist() == [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
            colour, cls = it["inst_color"][j].numpy(), int(classes[j])
            pixels = img[mask]
            if cls in data.SHAPES_TEXTURED:
                light = np.abs(pixels - colour).max(1) < 1e-6
                dark = np.abs(pixels - data.SHAPES_STRIPE_DARK * colour).max(1) < 1e-6
                assert (light | dark).all() and 0.25 < light.mean() < 0.75
            else:
                assert np.abs(pixels - colour).max() < 1e-6
            mode, dist = data.shapes_mode_assignment(colour, cls)
            assert int(mode) == int(it["inst_mode"][j])
            assert float(dist) <= math.sqrt(3) * data.SHAPES_JITTER + 1e-6
        assert (classes[n:] == 0).all() and (it["inst_mode"][n:] == -1).all()
        assert (it["inst_box"][n:] == 0).all() and (it["inst_color"][n:] == 0).all()
        assert np.array_equal(it["sketch"][0].numpy() == 1, edges_by_neighbours(inst))
        assert set(np.unique(it["sketch"].numpy())) <= {0.0, 1.0}
        assert torch.allclose(it["lowres"], F.avg_pool2d(it["image"][None], 8)[0], atol=1e-6)
    assert set(counts) == {1, 2, 3, 4}


def test_shapes_captions_name_every_object_and_its_place():
    ds = data.get_dataset("shapes")
    for i in range(60):
        it = ds[i]
        n = int(it["inst_valid"].sum())
        named = data.shapes_caption_objects(it["caption"])
        assert named == [(data.SHAPES_MODE_NAMES[c][m], c) for c, m in
                         zip(it["inst_class"][:n].tolist(), it["inst_mode"][:n].tolist())]
        assert ("striped" in it["caption"]) == any(c in data.SHAPES_TEXTURED for c, _ in
                                                   [(c, 0) for _, c in named])
        relations = [r for r in ("above", "below", "left of", "right of") if r in it["caption"]]
        assert sum(it["caption"].count(r) for r in relations) == n // 2
        for k in range(0, n - 1, 2):  # box centres agree with the relation when clear-cut
            (a0, b0, a1, b1), (c0, d0, c1, d1) = it["inst_box"][k:k + 2].tolist()
            dy, dx = (c0 + c1 - a0 - a1) / 2, (d0 + d1 - b0 - b1) / 2
            if abs(abs(dy) - abs(dx)) > 12:
                word = ("above" if dy > 0 else "below") if abs(dy) > abs(dx) else \
                    ("left of" if dx > 0 else "right of")
                assert f" {word} " in it["caption"].split(" and ")[k // 2]


def test_shapes_style_reference_has_the_same_colours_in_another_layout():
    ds = data.get_dataset("shapes")
    moved = 0
    for i in range(20):
        it = ds[i]
        n = int(it["inst_valid"].sum())
        img, style = rgb01(it["image"]).reshape(-1, 3), rgb01(it["style"]).reshape(-1, 3)
        allowed = [img[0] * 0 + img[(it["instance"].numpy() == 0).reshape(-1)][0]]
        for j in range(n):
            colour = it["inst_color"][j].numpy()
            assert (np.abs(style - colour).max(1) < 1e-6).any()  # every object colour is there
            allowed += [colour, data.SHAPES_STRIPE_DARK * colour]
        dist = np.stack([np.abs(style - a).max(1) for a in allowed]).min(0)
        assert dist.max() < 1e-6  # and nothing else
        moved += not np.array_equal(img, style)
    assert moved == 20


def test_shapes_lowres_hides_the_stripes_but_not_the_colours():
    """SR ambiguity: other stripe phases/orientations give nearly the same 8x-downsampled input."""
    size = 64
    yy, xx = np.arange(size)[:, None] + 0.5, np.arange(size)[None] + 0.5
    r, c = 0.22 * size, size / 2
    ids = data.shape_mask(4, c, c, r, yy, xx).astype(np.int64)
    obj = dict(cls=4, mode=0, colour=np.float32(data.SHAPES_PALETTE[4][0]), angle=0.3, phase=0.0,
               cy=c, cx=c, r=r, window=(0, size, 0, size))
    low = lambda x: x.reshape(size // 8, 8, size // 8, 8, 3).mean((1, 3))  # noqa: E731
    a = data.shapes_paint(ids, [obj], np.float32(0.5))
    for angle, phase in ((1.9, 0.25), (0.0, 0.5), (0.785, 0.1)):
        b = data.shapes_paint(ids, [dict(obj, angle=angle, phase=phase)], np.float32(0.5))
        high_diff = np.abs(a - b)[ids == 1].mean()
        touched = low(np.repeat(ids[..., None], 3, 2)).max(-1) > 0  # blocks with stripes
        low_diff = np.abs(low(a) - low(b)).max(-1)[touched].mean()
        assert high_diff > 0.2 and low_diff < 0.15 * high_diff
    other_mode = dict(obj, colour=np.float32(data.SHAPES_PALETTE[4][1]))
    other = data.shapes_paint(ids, [other_mode], np.float32(0.5))
    assert np.abs(low(a) - low(other)).max() > 0.3


def test_shapes_palette_modes_are_named_weighted_and_well_separated():
    colours = np.array(list(data.SHAPES_COLOURS.values()))
    gaps = np.linalg.norm(colours[:, None] - colours[None], axis=-1) + np.eye(len(colours)) * 9
    assert gaps.min() > 2 * data.SHAPES_MODE_TOLERANCE
    striped = np.array([data.SHAPES_PALETTE[c][m] for c in data.SHAPES_TEXTURED
                        for m in range(len(data.SHAPES_PALETTE[c]))])
    greys = np.linspace(*data.SHAPES_BACKGROUND, 5)[:, None].repeat(3, 1)
    for shade in (colours, data.SHAPES_STRIPE_DARK * striped):  # nothing looks like the background
        gap = np.linalg.norm(shade[:, None] - greys[None], axis=-1).min()
        assert gap > 2 * data.SHAPES_MODE_TOLERANCE
    for c in range(1, len(data.SHAPES_CLASSES)):
        assert 2 <= len(data.SHAPES_PALETTE[c]) == len(data.SHAPES_MODE_NAMES[c]) <= 3
        assert abs(sum(data.SHAPES_MODE_WEIGHTS[c]) - 1) < 1e-9


def shapes_scores(images, batch):
    """The data.py scores of generated images, all at once, as the scripts combine them."""
    fid = data.shapes_colour_fidelity(images, batch["instance"], batch["inst_class"],
                                      batch["inst_valid"])
    colours, _ = data.shapes_measure_colours(images, batch["instance"], batch["inst_class"])
    v = fid["valid"]
    caps = data.shapes_caption_accuracy(images, batch["caption"])
    return {"colour_error": fid["colour_error"], "in_mode": fid["in_mode"],
            "mode_match": float((fid["mode"] == batch["inst_mode"])[v].float().mean()),
            "gt_colour_error": float((colours - batch["inst_color"]).norm(dim=-1)[v].mean()),
            "caption_colour": caps["colour"], "caption_object": caps["object"]}


def test_shapes_scores_are_exact_on_ground_truth_and_drop_on_wrong_images():
    ds = data.get_dataset("shapes", split="test")
    batch = torch.utils.data.default_collate([ds[i] for i in range(48)])
    truth = shapes_scores(batch["image"], batch)
    assert truth["in_mode"] == 1 and truth["mode_match"] == 1 and truth["gt_colour_error"] < 1e-5
    assert truth["colour_error"] <= math.sqrt(3) * data.SHAPES_JITTER
    assert truth["caption_colour"] == 1 and truth["caption_object"] >= 0.9

    # Every object repainted in the next mode of its class: still in a mode, never its own.
    repainted = batch["image"].clone()
    for b in range(48):
        for j in range(int(batch["inst_valid"][b].sum())):
            cls, mode = int(batch["inst_class"][b, j]), int(batch["inst_mode"][b, j])
            new = torch.tensor(data.SHAPES_PALETTE[cls][(mode + 1) % len(data.SHAPES_PALETTE[cls])])
            mask = batch["instance"][b] == j + 1
            old = (repainted[b][:, mask] + 1) / 2
            dark = old.sum(0) < batch["inst_color"][b, j].sum() * (1 + data.SHAPES_STRIPE_DARK) / 2
            shaded = torch.where(dark, new[:, None] * data.SHAPES_STRIPE_DARK, new[:, None])
            repainted[b][:, mask] = shaded * 2 - 1
    moved = shapes_scores(repainted, batch)
    assert moved["in_mode"] == 1 and moved["mode_match"] == 0 and moved["gt_colour_error"] > 0.4
    assert moved["caption_object"] < 0.3

    grey = shapes_scores(torch.zeros_like(batch["image"]), batch)
    assert grey["in_mode"] == 0 and grey["caption_colour"] == 0
    shuffled = dict(batch, caption=batch["caption"][1:] + batch["caption"][:1])
    assert shapes_scores(batch["image"], shuffled)["caption_object"] < 0.6


def test_shapes_mode_coverage_sees_missing_and_skewed_modes():
    ds = data.get_dataset("shapes")
    batch = torch.utils.data.default_collate([ds[i] for i in range(200)])
    full = data.shapes_mode_coverage(batch["inst_mode"], batch["inst_class"], batch["inst_valid"])
    assert full["coverage"] == 1 and full["tv"] < 0.1
    assert sum(map(sum, full["counts"].values())) == int(batch["inst_valid"].sum())
    collapsed = data.shapes_mode_coverage(torch.zeros_like(batch["inst_mode"]), batch["inst_class"],
                                          batch["inst_valid"])
    assert collapsed["coverage"] == 0.4 and collapsed["tv"] > 0.3  # 4 of 10 modes, all in mode 0


# ---------------------------------------------------------------------------------------------
# hshape and letters
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64, 256])
def test_hshape_widths_lie_in_the_H_and_are_read_back_from_the_pixels(size):
    ds = data.get_dataset("hshape", size=size)
    batch = torch.utils.data.default_collate([ds[i] for i in range(100)])
    assert batch["image"].shape == (100, 1, size, size) and ds.channels == 1
    assert (data.hshape_region(batch["widths"]) >= 0).all()
    assert torch.allclose(data.hshape_measure(batch["image"]), batch["widths"], atol=1e-3)


def test_hshape_distribution_and_jaccard():
    rng = np.random.default_rng(0)
    w = data.hshape_sample(rng, 20_000)
    bar = (w[:, 0] > 10) & (w[:, 0] < 30)
    assert abs(bar.mean() - 0.5) < 0.02 and (w[bar, 1] >= 15).all() and (w[bar, 1] <= 25).all()
    assert w[~bar, 1].min() < 1 and w[~bar, 1].max() > 39
    assert data.hshape_jaccard(w) > 0.95
    square = rng.uniform(0, 40, (20_000, 2))
    assert abs(data.hshape_jaccard(square) - 250 / 400) < 0.03  # the H covers 250 of 400 cells
    one_leg = w[w[:, 0] <= 10]
    assert data.hshape_jaccard(one_leg) < 0.5
    points = np.array([[5, 20], [20, 20], [35, 1], [20, 5]])
    assert data.hshape_region(points).tolist() == [0, 1, 2, -1]


def glyph_features(image):
    """The glyph cropped to its box and resized to 16x16: position-free features."""
    ink = (image[0].numpy() + 1) / 2
    ys, xs = np.nonzero(ink > 0.5)
    crop = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    crop = Image.fromarray((crop * 255).astype(np.uint8))
    return np.asarray(crop.resize((16, 16), Image.BILINEAR), np.float32).ravel() / 255


def test_letters_class_matches_the_glyph():
    train, test = data.get_dataset("letters"), data.get_dataset("letters", split="test")
    assert train.class_names == ["A", "B"] and train.channels == 1
    feats = {0: [], 1: []}
    for i in range(60):
        it = train[i]
        assert int(it["class"]) == i % 2 and it["class"].dtype == torch.int64
        g = it["image"][0]
        border = torch.cat([g[0], g[-1], g[:, 0], g[:, -1]])
        assert (border == -1).all() and it["image"].max() > 0.5  # the glyph is wholly inside
        feats[i % 2].append(glyph_features(it["image"]))
    means = [np.mean(feats[k], 0) for k in (0, 1)]
    correct = 0
    for i in range(40):
        f = glyph_features(test[i]["image"])
        correct += int(np.argmin([np.abs(f - m).sum() for m in means]) == int(test[i]["class"]))
    assert correct >= 36


def test_letters_all_62_alphanumerics():
    ds = data.get_dataset("letters", letters="all")
    assert len(ds.class_names) == 62 and int(ds[61]["class"]) == 61 and ds.class_names[61] == "z"
    plain = [data.draw_letter(ch, (64, 64)) for ch in "0OlI"]
    assert all(not np.array_equal(plain[a], plain[b]) for a in range(4) for b in range(a))


# ---------------------------------------------------------------------------------------------
# Helpers shared by the real-dataset tests
# ---------------------------------------------------------------------------------------------

def test_instance_edges_reindex_and_image_sketch():
    ids = np.array([[3, 3, 9], [3, 7, 9], [3, 3, 9]])
    assert np.array_equal(data.reindex(ids), [[0, 0, 2], [0, 1, 2], [0, 0, 2]])
    assert np.array_equal(data.instance_edges(ids), edges_by_neighbours(ids))
    assert torch.equal(data.instance_edges(torch.from_numpy(ids)),
                       torch.from_numpy(edges_by_neighbours(ids)))
    rows = np.array([[1, 1, 1], [1, 1, 1], [2, 2, 2]])  # a horizontal border marks both rows
    assert data.instance_edges(rows).tolist() == [[False] * 3, [True] * 3, [True] * 3]
    assert data.instance_edges(rows.T).tolist() == [[False, True, True]] * 3
    step = np.zeros((20, 30), np.float32)
    step[:, 12:] = 0.8
    sketch = data.image_sketch(step)
    assert set(np.nonzero(sketch.any(0))[0].tolist()) <= {11, 12} and sketch.sum(0).max() == 20
    assert data.image_sketch(np.full((20, 30), 0.4, np.float32)).sum() == 0
    assert data.image_sketch(step * 0.15).sum() == 0  # below the threshold
    red, green = np.zeros((20, 30, 3), np.float32), np.zeros((20, 30, 3), np.float32)
    red[..., 0], green[..., 1] = 0.6, 0.6  # equal brightness, different colour: still an edge
    both = np.concatenate([red[:, :12], green[:, 12:]], 1)
    assert set(np.nonzero(data.image_sketch(both).any(0))[0].tolist()) == {11, 12}


COLOURS = np.array([(230, 25, 25), (25, 200, 40), (40, 60, 230), (240, 220, 30), (235, 235, 235)],
                   np.uint8)


def block_map(rng, h, w, k):
    """(H, W) class indices 0..k-1 constant on 8x8 blocks; left and right columns differ."""
    blocks = rng.integers(0, k, (h // 8, w // 8))
    blocks[:, 0], blocks[:, -1] = 0, 1
    return np.kron(blocks, np.ones((8, 8), np.int64))


def save(array, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **({"quality": 95} if path.endswith(".jpg") else {}))


class Fake:
    """A fake dataset under construction: what was written, for the checks."""

    def __init__(self, root, size, num_classes):
        self.root, self.size, self.num_classes = str(root), size, num_classes
        self.labels = {}   # (split, name) -> expected encoded label at the written size
        self.colour = {}   # encoded label -> RGB written for it
        self.test_image = self.test_label = None  # the first test item's files
        self.images = {"train": [], "test": []}   # split -> image files, in writing order
        self.label_files = {"train": [], "test": []}

    def pair(self, split, name, image_path, label_path, raw_values, encoded, h, w, rng,
             rgb_label=None):
        """Write image (colour per class) and label (raw ids or RGB); remember the expectation."""
        idx = block_map(rng, h, w, len(raw_values))
        save(COLOURS[idx], image_path)
        self.images[split].append(image_path)
        raw = np.array(raw_values)[idx]
        if label_path:
            save(rgb_label[idx] if rgb_label is not None else raw.astype(np.uint8), label_path)
            self.label_files[split].append(label_path)
        self.labels[(split, name)] = np.array(encoded)[idx]
        self.colour.update({e: COLOURS[k] for k, e in enumerate(encoded)})
        if split == "test" and self.test_image is None:
            self.test_image, self.test_label = image_path, label_path
        return raw


def natural_first(paths):
    return sorted(paths, key=data.natural_key)[0]


# ---------------------------------------------------------------------------------------------
# Fake datasets in the official layouts (data.md)
# ---------------------------------------------------------------------------------------------

def fake_deepfashion(root, rng):
    fake = Fake(root, 32, 8)
    fake.bad_value = 8
    for split in ("train", "test"):
        for name in ("a", "b"):
            raw = fake.pair(split, name, f"{root}/{split}_img/{name}.jpg",
                            f"{root}/{split}_label/{name}.png", [0, 3, 5, 7], [0, 3, 5, 7],
                            32, 32, rng)
            save(raw.astype(np.uint8), f"{root}/{split}_inst/{name}.png")  # INADE: inst = label
    fake.remove_for_layout = f"{root}/test_label/a.png"
    return fake


def fake_deepfashion_smis(root, rng):
    fake = Fake(root, 32, 8)
    fake.bad_value = 9
    for split in ("train", "test"):
        for name in ("a", "b"):
            raw = fake.pair(split, name, f"{root}/{split}/{name}.jpg", None,
                            [1, 2, 4, 6], [1, 2, 4, 6], 32, 32, rng)
            # a 3-channel mask: only channel 0 is the label (make_instances)
            three = np.stack([raw, (raw * 7) % 5, np.full_like(raw, 9)], -1).astype(np.uint8)
            save(three, f"{root}/cihp_{split}_mask/{name}.png")
            fake.label_files[split].append(f"{root}/cihp_{split}_mask/{name}.png")
            if split == "test" and name == "a":
                fake.test_label = f"{root}/cihp_{split}_mask/{name}.png"
    fake.remove_for_layout = f"{root}/cihp_test_mask/a.png"
    return fake


def fake_cityscapes(root, rng):
    fake = Fake(root, 32, 35)
    fake.bad_value = 40
    for split, phase in (("train", "train"), ("test", "val")):
        for k in (1, 2):
            key = f"aachen_000000_00000{k}"
            base = f"{root}/gtFine/{phase}/aachen/{key}_gtFine_"
            raw = fake.pair(split, key, f"{root}/leftImg8bit/{phase}/aachen/{key}_leftImg8bit.png",
                            base + "labelIds.png", [7, 8, 11, 26], [7, 8, 11, 26], 32, 64, rng)
            inst = raw.astype(np.uint16)
            cars = raw == 26
            inst[cars] = 26000 + (np.arange(64)[None, :].repeat(32, 0)[cars] >= 32)  # two cars
            save(inst, base + "instanceIds.png")
    fake.remove_for_layout = f"{root}/gtFine/val/aachen/aachen_000000_000001_gtFine_labelIds.png"
    return fake


def fake_ade20k(root, rng):
    fake = Fake(root, 32, 151)
    fake.bad_value = 200
    base = f"{root}/ADEChallengeData2016"
    for split, phase, tag in (("train", "training", "train"), ("test", "validation", "val")):
        for k in (1, 2):
            name = f"ADE_{tag}_{k:08d}"
            fake.pair(split, name, f"{base}/images/{phase}/{name}.jpg",
                      f"{base}/annotations/{phase}/{name}.png",
                      [0, 1, 12, 150], [150, 0, 11, 149], 32, 32, rng)  # label - 1, and 0 -> 150
    fake.remove_for_layout = f"{base}/annotations/validation/ADE_val_00000001.png"
    return fake


def fake_celebamask(root, rng):
    fake = Fake(root, 32, 19)
    fake.bad_value = 19
    for split in ("train", "test"):
        for k in (0, 1):
            fake.pair(split, str(k), f"{root}/{split}/images/{k}.jpg",
                      f"{root}/{split}/labels/{k}.png", [0, 1, 13, 18], [0, 1, 13, 18], 32, 32, rng)
    fake.remove_for_layout = f"{root}/test/labels/0.png"
    return fake


def fake_coco_stuff(root, rng):
    fake = Fake(root, 32, 183)
    fake.bad_value = 200
    fake.captions = {}
    for split, phase in (("train", "train"), ("test", "val")):
        annotations = []
        for k in (9, 25):
            name = f"{k:012d}"
            fake.pair(split, name, f"{root}/{phase}_img/{name}.jpg",
                      f"{root}/{phase}_label/{name}.png",
                      [0, 90, 181, 255], [0, 90, 181, 182], 32, 32, rng)  # 255 -> 182 (don't care)
            caps = [f"caption {c} of image {k}" for c in range(3)]
            fake.captions[(split, name)] = caps
            annotations += [{"image_id": k, "id": 100 * k + c, "caption": cap}
                            for c, cap in enumerate(caps)]
        os.makedirs(f"{root}/annotations", exist_ok=True)
        with open(f"{root}/annotations/captions_{phase}2017.json", "w") as f:
            json.dump({"annotations": annotations}, f)
    fake.remove_for_layout = f"{root}/val_label/000000000009.png"
    return fake


def fake_mm_celeba(root, rng):
    fake = Fake(root, 32, 19)
    fake.bad_value = 19
    fake.captions, fake.sketches = {}, {}
    for split, ids in (("train", ["0", "1"]), ("test", ["2", "3"])):
        os.makedirs(f"{root}/{split}", exist_ok=True)
        with open(f"{root}/{split}/filenames.pickle", "wb") as f:
            pickle.dump(ids, f, protocol=2)
        for i in ids:
            fake.pair(split, i, f"{root}/image/{i}.jpg", f"{root}/mask/{i}.png",
                      [0, 1, 13, 17], [0, 1, 13, 17], 32, 32, rng)
            caps = [f"face {i} caption {c}" for c in range(10)]
            os.makedirs(f"{root}/text/celeba-caption", exist_ok=True)
            with open(f"{root}/text/celeba-caption/{i}.txt", "w") as f:
                f.write("\n".join(caps) + "\n")
            fake.captions[(split, i)] = caps
            lines = np.full((32, 32), 255, np.uint8)  # dark lines on white (sketch simplification)
            lines[rng.integers(0, 32, 5)] = 0
            save(lines, f"{root}/sketch/{i}.png")
            fake.sketches[(split, i)] = lines == 0
    fake.remove_for_layout = f"{root}/text/celeba-caption/2.txt"
    return fake


# road, building, sky, car (official Cityscapes colours) and one colour of no class (void)
GTA_COLOURS = np.array([(128, 64, 128), (70, 70, 70), (70, 130, 180), (0, 0, 142), (1, 2, 3)],
                       np.uint8)


def fake_gta5(root, rng):
    fake = Fake(root, 32, 20)
    fake.bad_value = None  # every colour is valid (unknown ones are void): a grey file is bad
    for split, numbers in (("train", (1, 2)), ("test", (100001, 100002))):
        for k in numbers:
            name = f"{k:08d}"
            fake.pair(split, name, f"{root}/RGB256Full/{name}.png",
                      f"{root}/Label256Full/{name}.png",
                      [0, 1, 2, 3, 4], [0, 2, 10, 13, 19], 32, 64, rng, rgb_label=GTA_COLOURS)
    fake.remove_for_layout = f"{root}/Label256Full/00100001.png"
    return fake


def fake_folder_pairs(root, rng):
    fake = Fake(root, 32, 5)  # ids 0, 2, 3 and 255: 4 classes inferred + the don't-care channel
    fake.bad_value = None
    for split in ("train", "test"):
        for name in ("a", "b"):
            fake.pair(split, name, f"{root}/{split}/images/{name}.png",
                      f"{root}/{split}/labels/{name}.png",
                      [0, 2, 3, 255], [0, 2, 3, 4], 32, 32, rng)
    fake.remove_for_layout = f"{root}/test/labels/a.png"
    return fake


REAL = {"deepfashion": fake_deepfashion, "deepfashion-smis": fake_deepfashion_smis,
        "cityscapes": fake_cityscapes, "ade20k": fake_ade20k, "celebamask-hq": fake_celebamask,
        "coco-stuff": fake_coco_stuff, "mm-celeba-hq": fake_mm_celeba, "gta5": fake_gta5,
        "folder-pairs": fake_folder_pairs}


def dataset_name(key):
    return key.replace("-smis", "")


def check_aligned(item, colour_of):
    """Where the label is constant in a 5x5 neighbourhood, the image shows that class's colour:
    true only if image and label went through the same resize, crop and flip."""
    label = item["label"].numpy()
    h, w = label.shape
    p = np.pad(label, 2, mode="edge")
    interior = np.ones_like(label, bool)
    for dy in range(5):
        for dx in range(5):
            interior &= p[dy:dy + h, dx:dx + w] == label
    keys = sorted(colour_of)
    palette = np.array([colour_of[k] for k in keys], np.float32)
    image = (item["image"].numpy().transpose(1, 2, 0) + 1) * 127.5
    nearest = np.array(keys)[np.linalg.norm(image[:, :, None] - palette, axis=-1).argmin(-1)]
    assert interior.mean() > 0.15
    assert (nearest[interior] == label[interior]).all()
    return interior


# ---------------------------------------------------------------------------------------------
# Real datasets: reading
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", list(REAL))
def test_real_loader_reads_the_official_layout(key, tmp_path):
    name = dataset_name(key)
    fake = REAL[key](str(tmp_path), np.random.default_rng(0))
    ds = data.get_dataset(name, root=fake.root, split="test", size=fake.size)
    assert len(ds) == 2 and ds.num_classes == fake.num_classes and ds.channels == 3
    assert ds.palette.shape == (fake.num_classes, 3) and ds.palette.dtype == np.uint8
    assert len(ds.class_names) in (0, fake.num_classes)
    for index in range(len(ds)):
        item = ds[index]
        assert set(item) == ds.has >= {"image", "label", "instance", "sketch", "name"}
        h, w = ds.size
        assert item["image"].shape == (3, h, w) and item["image"].dtype == torch.float32
        assert -1 <= item["image"].min() and item["image"].max() <= 1
        assert item["label"].shape == (h, w) and item["label"].dtype == torch.int64
        assert item["instance"].dtype == torch.int64 and item["sketch"].shape == (1, h, w)
        # Exact label encoding (no resize at the written size, no randomness in test).
        assert np.array_equal(item["label"].numpy(), fake.labels[("test", item["name"])])
        inst = item["instance"].numpy()
        assert sorted(np.unique(inst).tolist()) == list(range(inst.max() + 1))  # contiguous
        interior = check_aligned(item, fake.colour)
        if name != "mm-celeba-hq":  # computed from the image: edges only at colour boundaries
            assert item["sketch"][0].numpy()[interior].sum() == 0 and item["sketch"].sum() > 0
        if name == "cityscapes":  # things keep their own ids: two cars, one class
            cars = item["label"].numpy() == 26
            assert len(np.unique(inst[cars])) == 2
            assert len(np.unique(inst)) == len(np.unique(item["label"])) + 1
        else:  # one instance per class (make_instances)
            pairs = set(zip(item["label"].numpy().ravel().tolist(), inst.ravel().tolist()))
            assert len(pairs) == inst.max() + 1
        if "caption" in ds.has:
            caps = fake.captions[("test", item["name"])]
            assert item["caption"] == caps[index % len(caps)]
        if name == "mm-celeba-hq":
            drawn = fake.sketches[("test", item["name"])]
            assert np.array_equal(item["sketch"][0].numpy() == 1, drawn)
    assert same_item(ds[1], ds[1])


@pytest.mark.parametrize("key", list(REAL))
def test_real_loader_transforms_image_and_maps_identically(key, tmp_path):
    """Train split at another size: resize, random crop and flip hit image and label alike."""
    name = dataset_name(key)
    fake = REAL[key](str(tmp_path), np.random.default_rng(1))
    ds = data.get_dataset(name, root=fake.root, split="train", size=24)
    flips = set()
    for seed in range(6):
        torch.manual_seed(seed)
        item = ds[0]
        assert item["image"].shape[1:] == item["label"].shape == item["instance"].shape == ds.size
        check_aligned(item, fake.colour)
        left = item["label"][:, :2].numpy()
        flips.add(bool((left == fake.labels[("train", item["name"])][0, 0]).mean() < 0.5))
        if "caption" in ds.has:
            assert item["caption"] in fake.captions[("train", item["name"])]
    assert flips == ({False} if name == "gta5" else {False, True})  # cIMLE data is never flipped
    assert data.get_dataset(name, root=fake.root, split="test", size=24).size == ds.size


def test_folder_classes_lowres_and_sketch(tmp_path):
    rng = np.random.default_rng(0)
    for sub, n in (("trainA", 3), ("trainB", 2), ("testA", 1), ("testB", 1)):
        for k in range(n):
            img = np.zeros((40, 48, 3), np.uint8)
            img[:, 24:] = COLOURS[int(rng.integers(0, 5))]
            save(img, f"{tmp_path}/{sub}/{k}.png")
    ds = data.get_dataset("folder", root=str(tmp_path), size=32)
    assert len(ds) == 5 and ds.class_names == ["trainA", "trainB"] and ds.num_classes == 0
    assert [int(ds[i]["class"]) for i in range(5)] == [0, 0, 0, 1, 1]
    item = ds[0]
    assert set(item) == ds.has == {"image", "sketch", "lowres", "class", "name"}
    assert item["image"].shape == (3, 32, 32)
    assert torch.allclose(item["lowres"], F.avg_pool2d(item["image"][None], 8)[0], atol=1e-6)
    columns = np.nonzero(item["sketch"][0].numpy().any(0))[0]
    assert len(columns) and columns.min() >= 14 and columns.max() <= 17  # the one vertical edge
    test = data.get_dataset("folder", root=str(tmp_path), split="test", size=32)
    assert len(test) == 2 and test.class_names == ["trainA", "trainB"]  # the ids' names
    flat = tmp_path / "flat"
    save(np.zeros((40, 48, 3), np.uint8), f"{flat}/x.jpg")
    assert "class" not in data.get_dataset("folder", root=str(flat), size=16)[0]


@pytest.mark.parametrize("key", ["mm-celeba-hq", "deepfashion"])  # sketch files / computed
def test_skipped_keys_are_neither_made_nor_read_and_the_rest_is_unchanged(key, tmp_path,
                                                                          monkeypatch):
    fake = REAL[key](str(tmp_path), np.random.default_rng(0))
    full = data.get_dataset(key, root=fake.root, split="test", size=fake.size)
    lean = data.get_dataset(key, root=fake.root, split="test", size=fake.size,
                            skip=data.OPTIONAL_KEYS)
    expected = {k: v for k, v in full[1].items() if k not in data.OPTIONAL_KEYS}
    made, read = [], []
    monkeypatch.setattr(data, "image_sketch", lambda a: made.append(a))
    original = data.FileDataset.read_file
    monkeypatch.setattr(data.FileDataset, "read_file",
                        lambda self, what, path: read.append(what) or original(self, what, path))
    item = lean[1]
    assert "sketch" in full.has and set(item) == lean.has == full.has - {"sketch"}
    assert same_item(item, expected)
    assert made == [] and "sketch" not in read


def test_bench_measures_one_worker_on_a_real_layout_with_and_without_the_optional_keys(tmp_path):
    fake = fake_deepfashion(str(tmp_path), np.random.default_rng(0))
    rates = data.benchmark(("deepfashion",), (fake.size,), fake.root, rounds=1, seconds=0.05)
    assert list(rates) == [("deepfashion", (32, 32), "all keys"),
                           ("deepfashion", (32, 32), "without sketch and lowres")]
    assert all(rate > 0 for rate in rates.values())


# ---------------------------------------------------------------------------------------------
# Real datasets: the promised sentences
# ---------------------------------------------------------------------------------------------

def raises_naming(path, fn, *also):
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    assert str(path) in message and "expected" in message and message.count("\n") == 0, message
    for text in also:
        assert text in message, message
    return message


@pytest.mark.parametrize("key", list(REAL))
def test_real_loader_errors_name_the_path_and_the_layout(key, tmp_path):
    name = dataset_name(key)
    missing = tmp_path / "missing"
    layout = data.DATASETS[name]["layout"]
    raises_naming(missing, lambda: data.get_dataset(name, root=str(missing)), layout)

    fake = REAL[key](str(tmp_path / "ok"), np.random.default_rng(2))
    load = lambda: data.get_dataset(name, root=fake.root, split="test", size=fake.size)  # noqa: E731
    ds = load()
    first = [i for i in range(len(ds)) if ds.records[i]["image"] == fake.test_image][0]

    # Label value out of range (or, for colour-coded GTA-5 labels, a label that is not RGB).
    label = Image.open(fake.test_label)
    bad = np.asarray(label).copy()
    if name == "gta5":
        Image.fromarray(bad[..., 0]).save(fake.test_label)
        raises_naming(fake.test_label, lambda: ds[first], "RGB")
    else:
        if name == "folder-pairs":
            ds = data.get_dataset(name, root=fake.root, split="test", size=fake.size, num_classes=5)
            assert ds.num_classes == 5 and ds.label_nc == 4  # 255 -> 4, the don't-care channel
            bad[:3, :3], value = 7, "7"
        else:
            bad[..., :3, :3] = fake.bad_value
            value = str(fake.bad_value)
        Image.fromarray(bad).save(fake.test_label)
        raises_naming(fake.test_label, lambda: ds[first], value, "out of range")
    label.save(fake.test_label)
    ds[first]

    # Unreadable image: garbage bytes, then a truncated file.
    original = open(fake.test_image, "rb").read()
    with open(fake.test_image, "wb") as f:
        f.write(b"this is not an image")
    raises_naming(fake.test_image, lambda: ds[first])
    with open(fake.test_image, "wb") as f:
        f.write(original[:len(original) // 2])
    raises_naming(fake.test_image, lambda: ds[first])
    with open(fake.test_image, "wb") as f:
        f.write(original)

    # Wrong layout: a file the layout pairs with an image is missing.
    os.remove(fake.remove_for_layout)
    raises_naming(fake.root, load)


def test_folder_errors(tmp_path):
    nothing, empty = tmp_path / "nothing", tmp_path / "empty"
    raises_naming(nothing, lambda: data.get_dataset("folder", root=str(nothing)))
    os.makedirs(empty)
    raises_naming(empty, lambda: data.get_dataset("folder", root=str(empty)), "no images")
    save(np.zeros((8, 8, 3), np.uint8), f"{tmp_path}/imgs/a.png")
    with open(f"{tmp_path}/imgs/b.png", "wb") as f:
        f.write(b"\x89PNG broken")
    imgs, broken = str(tmp_path / "imgs"), f"{tmp_path}/imgs/b.png"
    load = lambda **k: data.get_dataset("folder", root=imgs, size=16, **k)  # noqa: E731
    raises_naming(broken, load, "cannot be read")  # at start-up
    ds = load(check_files=False)
    raises_naming(broken, lambda: ds[1])            # and in training


def test_check_reads_a_folder_whose_splits_share_their_images_once(tmp_path, capsys):
    save(np.zeros((8, 8, 3), np.uint8), f"{tmp_path}/a.png")
    with open(f"{tmp_path}/b.png", "wb") as f:
        f.write(b"\x89PNG broken")
    code, lines, err = run_check(capsys, "folder", "--data_dir", str(tmp_path), "--size", "16")
    assert code == 2 and lines == [f"{tmp_path}/b.png: cannot be read (not an image, or corrupt "
                                   "or truncated)"]
    assert f"1 bad file among the 2 items of folder (train, test) in {tmp_path}" in err


def test_mm_celeba_refuses_a_pickle_that_would_run_code(tmp_path):
    fake = fake_mm_celeba(str(tmp_path), np.random.default_rng(0))
    with open(f"{tmp_path}/test/filenames.pickle", "wb") as f:
        pickle.dump([os.system], f)  # a global: a malicious pickle would call it
    raises_naming(f"{tmp_path}/test/filenames.pickle",
                  lambda: data.get_dataset("mm-celeba-hq", root=fake.root, split="test"))


def test_bad_input_exits_2_with_one_sentence(tmp_path, capsys):
    missing = tmp_path / "no_cityscapes"
    with pytest.raises(SystemExit) as info:
        common.run_main(lambda: data.get_dataset("cityscapes", root=str(missing)))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(missing) in err and "leftImg8bit" in err


# ---------------------------------------------------------------------------------------------
# Real datasets: bad files found at start-up (pairing, headers) and by python data.py --check
# ---------------------------------------------------------------------------------------------

def save_other_size(path, shape):
    """Replace an image or map by one of another (H, W), same mode and format."""
    img = Image.open(path)
    img.load()
    img.resize(shape[::-1], Image.NEAREST).save(path, format=img.format)


@pytest.mark.parametrize("key", list(REAL))
def test_start_up_check_names_missing_partners_and_bad_headers(key, tmp_path):
    name = dataset_name(key)
    fake = REAL[key](str(tmp_path), np.random.default_rng(3))
    load = lambda: data.get_dataset(name, fake.root, "test", fake.size)  # noqa: E731
    image, label = fake.images["test"][1], fake.label_files["test"][1]
    original = {p: open(p, "rb").read() for p in (image, label)}

    def restore():
        for path, content in original.items():
            with open(path, "wb") as f:
                f.write(content)
        load()

    w, h = Image.open(image).size
    save_other_size(label, (h, w // 2))  # another aspect ratio: refused by every layout
    raises_naming(label, load, f"is {w // 2}x{h} but its image is {w}x{h}")
    restore()
    Image.fromarray(np.full((h, w), 40000, np.uint16)).save(image, format="PNG")  # 16-bit grey
    raises_naming(image, load, "mode I;16")
    restore()
    with open(image, "wb") as f:
        f.write(b"not an image at all")
    raises_naming(image, load, "cannot be read")
    restore()
    instance = load().records[1].get("instance")
    if instance:  # optional instance maps: wanted for every image once some exist
        original[instance] = open(instance, "rb").read()
        os.remove(instance)
        raises_naming(instance, load, "is missing, the instance file of")
        restore()
    for path in fake.label_files["test"]:  # every missing partner is named, not the first only
        os.remove(path)
    message = raises_naming(fake.label_files["test"][0], load, fake.label_files["test"][1])
    assert message.count(" is missing") == 2 and "--check" in message


def test_start_up_check_caps_its_list_and_scales_masks_only_where_allowed(tmp_path, monkeypatch):
    root = tmp_path / "df"
    for k in range(8):
        save(np.zeros((16, 16, 3), np.uint8), f"{root}/test_img/{k}.jpg")
    os.makedirs(root / "test_label")
    message = raises_naming(root / "test_label", lambda: data.get_dataset(
        "deepfashion", root=str(root), split="test"), "8 bad files", "; and 3 more")
    assert message.count(" is missing") == 5
    # Above HEADER_SCAN_LIMIT items only a sample's headers are read, every partner is looked for.
    monkeypatch.setattr(data, "HEADER_SCAN_LIMIT", 4)
    for k in range(8):
        save(np.zeros((16, 16), np.uint8), f"{root}/test_label/{k}.png")
    save(np.zeros((16, 8), np.uint8), f"{root}/test_label/1.png")  # item 1: not in the sample
    data.get_dataset("deepfashion", root=str(root), split="test")
    os.remove(f"{root}/test_label/7.png")
    raises_naming(f"{root}/test_label/7.png", lambda: data.get_dataset(
        "deepfashion", root=str(root), split="test"), "1 bad file in")
    # CelebAMask-HQ: g_mask.py's masks are half the size of the images, the same aspect ratio.
    fake = fake_celebamask(str(tmp_path / "celeba"), np.random.default_rng(0))
    mask = fake.test_label
    save_other_size(mask, (64, 64))
    item = data.get_dataset("celebamask-hq", root=fake.root, split="test", size=32)[0]
    assert np.array_equal(item["label"].numpy(), fake.labels[("test", "0")])
    save_other_size(mask, (64, 48))
    raises_naming(mask, lambda: data.get_dataset("celebamask-hq", root=fake.root, split="test"),
                  "expected the same aspect ratio")


def run_check(capsys, *argv):
    """python data.py --check ...: (exit status, stdout lines, stderr)."""
    try:
        common.run_main(lambda: data.main(["--check", *argv]))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def truncate(path):
    content = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(content[:len(content) // 2])


@pytest.mark.parametrize("key", list(REAL))
def test_check_lists_every_bad_file_and_exits_2(key, tmp_path, capsys):
    name = dataset_name(key)
    fake = REAL[key](str(tmp_path), np.random.default_rng(4))
    flags = [name, "--data_dir", fake.root, "--size", "16"]
    code, lines, _ = run_check(capsys, *flags)
    assert code == 0 and lines[-1] == f"4 items of {name} (train, test) in {fake.root}: every " \
        "file good"
    truncated, missing = fake.images["train"][0], fake.label_files["train"][1]
    out_of_range, other_size = fake.label_files["test"]
    truncate(truncated)                   # header intact: only decoding finds it
    os.remove(missing)
    label = np.asarray(Image.open(out_of_range)).copy()
    if name == "gta5":                    # every colour is valid: a grey label is the bad one
        Image.fromarray(label[..., 0]).save(out_of_range)
    elif name == "folder-pairs":          # classes inferred from the values: none out of range
        out_of_range = None
    else:                                 # one pixel, dropped by resizing to --size 16
        label[4, 6] = fake.bad_value
        Image.fromarray(label).save(out_of_range)
    h, w = label.shape[:2]
    save_other_size(other_size, (h, w // 2))
    code, lines, err = run_check(capsys, *flags)
    bad = {line.split(": ", 1)[0]: line for line in lines}
    expected = {truncated, missing, out_of_range, other_size} - {None}
    assert code == 2 and set(bad) == expected, lines
    assert "is missing" in bad[missing] and "cannot be read" in bad[truncated]
    if out_of_range and name != "gta5":
        assert f"holds value {fake.bad_value}, out of range" in bad[out_of_range]
    assert err.strip().splitlines()[-1].startswith(f"error: {len(expected)} bad files among")
    code, lines, _ = run_check(capsys, *flags, "--split", "test")
    assert code == 2 and {line.split(": ", 1)[0] for line in lines} == expected & {out_of_range,
                                                                                  other_size}


def test_check_reads_instance_maps_and_captions(tmp_path, capsys):
    fake = fake_deepfashion(str(tmp_path / "df"), np.random.default_rng(5))
    broken, other_size = f"{fake.root}/train_inst/a.png", f"{fake.root}/test_inst/b.png"
    truncate(broken)
    save_other_size(other_size, (32, 16))
    code, lines, _ = run_check(capsys, "deepfashion", "--data_dir", fake.root)
    assert code == 2 and sorted(lines) == sorted([
        f"{broken}: cannot be read (not an image, or corrupt or truncated)",
        f"{other_size}: is 16x32 but its image is 32x32, expected the same size"])
    fake = fake_mm_celeba(str(tmp_path / "mm"), np.random.default_rng(5))
    empty, not_utf8 = (f"{fake.root}/text/celeba-caption/{i}.txt" for i in "03")
    open(empty, "w").close()
    with open(not_utf8, "wb") as f:
        f.write(b"a caption in latin-1: \xe9t\xe9\n")
    code, lines, _ = run_check(capsys, "mm-celeba-hq", "--data_dir", fake.root)
    assert code == 2 and lines == [f"{empty}: holds no caption for {fake.root}/image/0.jpg",
                                   f"{not_utf8}: is not UTF-8 text"]
    raises_naming(empty, lambda: data.get_dataset("mm-celeba-hq", root=fake.root), "no caption")


def test_check_refuses_a_built_in_dataset(capsys):
    code, _, err = run_check(capsys, "shapes")
    assert code == 2 and "expected a dataset stored in files" in err


def test_folder_split_sub_folders_hold_their_split_only(tmp_path):
    """Stanford Cars unpacks as cars_train/ and cars_test/: the parent folder trains on
    cars_train only."""
    assert [data.folder_split(d) for d in ("train", "trainA", "cars_train", "Training", "test",
                                            "testB", "cars_test", "val", "valid", "val2017",
                                            "validation", "cats", "testimonials")] == \
        ["train"] * 4 + ["test"] * 7 + [None] * 2
    cars = tmp_path / "cars"
    for sub, n in (("cars_train", 3), ("cars_test", 2)):
        for k in range(n):
            save(np.zeros((24, 32, 3), np.uint8), f"{cars}/{sub}/{k:05d}.jpg")
    train = data.get_dataset("folder", root=str(cars), size=16)
    test = data.get_dataset("folder", root=str(cars), split="test", size=16)
    assert [os.path.basename(os.path.dirname(r["image"])) for r in train.records] == \
        ["cars_train"] * 3
    assert [os.path.basename(os.path.dirname(r["image"])) for r in test.records] == \
        ["cars_test"] * 2
    assert "class" not in train.has and train.class_names == []
    # Class folders beside a held-out folder: the held-out one is the test split, not a class.
    pets = tmp_path / "pets"
    for sub in ("cats", "dogs", "val/cats", "val/dogs"):
        save(np.zeros((16, 16, 3), np.uint8), f"{pets}/{sub}/0.png")
    train = data.get_dataset("folder", root=str(pets), size=16)
    test = data.get_dataset("folder", root=str(pets), split="test", size=16)
    assert train.class_names == test.class_names == ["cats", "dogs"]
    assert len(train) == len(test) == 2 and all("/val/" in r["image"] for r in test.records)


def test_folder_splits_share_the_training_class_ids(tmp_path):
    """ROOT/{train,val,test}/<class>/: test (before val) is the test split's root, not a class,
    and a class keeps its training id in a split that lacks some classes."""
    root = tmp_path / "animals"
    for sub in ("train/cat", "train/dog", "train/fox", "val/dog", "test/cat", "test/fox"):
        save(np.zeros((16, 16, 3), np.uint8), f"{root}/{sub}/0.png")
    train = data.get_dataset("folder", root=str(root), size=16)
    test = data.get_dataset("folder", root=str(root), split="test", size=16)
    assert train.class_names == test.class_names == ["cat", "dog", "fox"]
    assert [(os.path.basename(os.path.dirname(r["image"])), r["class"]) for r in test.records] \
        == [("cat", 0), ("fox", 2)]
    assert all("/test/" in r["image"] for r in test.records)
    save(np.zeros((16, 16, 3), np.uint8), f"{root}/test/owl/0.png")
    with pytest.raises(data.UserError, match="class folders owl .*training classes: cat, dog, fox"):
        data.get_dataset("folder", root=str(root), split="test", size=16)
    # DRIT's trainA, trainB / testA, testB pair up in order
    drit = tmp_path / "cat2dog"
    for sub in ("trainA", "trainB", "testA", "testB"):
        save(np.zeros((16, 16, 3), np.uint8), f"{drit}/{sub}/0.png")
    test = data.get_dataset("folder", root=str(drit), split="test", size=16)
    assert test.class_names == ["trainA", "trainB"]
    assert [(os.path.basename(os.path.dirname(r["image"])), r["class"]) for r in test.records] \
        == [("testA", 0), ("testB", 1)]


def test_folder_pairs_num_classes_counts_the_dont_care_channel(tmp_path):
    """A model's one-hot width (dontcare included) reads a folder whose labels show fewer
    classes: 255 stays the last channel; too few channels for the labels is one sentence."""
    fake = fake_folder_pairs(str(tmp_path), np.random.default_rng(0))   # ids 0, 2, 3 and 255
    found = data.get_dataset("folder-pairs", root=fake.root, split="test", size=fake.size)
    wide = data.get_dataset("folder-pairs", root=fake.root, split="test", size=fake.size,
                            num_classes=7)
    assert (found.num_classes, wide.num_classes, wide.label_nc) == (5, 7, 6)
    raw = np.asarray(Image.open(wide.records[0]["label"]))
    dontcare = torch.from_numpy(raw == 255)
    assert dontcare.any() and wide[0]["label"].shape == dontcare.shape  # test split: no flip
    assert (wide[0]["label"][dontcare] == 6).all() and (found[0]["label"][dontcare] == 4).all()
    with pytest.raises(data.UserError, match=r"ids 0\.\.3 and 255 \(don't care\): 5 one-hot"):
        data.get_dataset("folder-pairs", root=fake.root, split="test", size=fake.size,
                         num_classes=4)


def test_gta5_palette_labels_read_as_their_colours(tmp_path):
    """The Playing-for-Data release stores labels as palette (P) PNGs: the same colours as RGB."""
    fake = fake_gta5(str(tmp_path), np.random.default_rng(0))
    ds = data.get_dataset("gta5", root=fake.root, split="test", size=fake.size)
    rgb = ds[0]["label"]
    path = ds.records[0]["label"]
    Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MAXCOVERAGE,
                                             dither=Image.Dither.NONE).save(path)
    assert Image.open(path).mode == "P"
    assert torch.equal(data.get_dataset("gta5", root=fake.root, split="test",
                                        size=fake.size)[0]["label"], rgb)


def test_folder_pairs_finds_a_val_folder_as_its_test_split(tmp_path):
    fake = fake_folder_pairs(str(tmp_path), np.random.default_rng(0))
    os.rename(os.path.join(fake.root, "test"), os.path.join(fake.root, "val"))
    test = data.get_dataset("folder-pairs", root=fake.root, split="test", size=fake.size)
    assert len(test) == 2 and all("/val/images/" in r["image"] for r in test.records)


def test_folder_steps_into_the_one_folder_an_archive_unpacks_to(tmp_path):
    """DRIT's cat2dog.zip unpacked into data/folder gives ROOT/cat2dog/{trainA, ..., testB}; a
    Kaggle copy of Stanford Cars gives cars_train/cars_train/*.jpg: no test image is trained on,
    no wrapper folder is a class."""
    drit = tmp_path / "drit"
    for sub in ("trainA", "trainB", "testA", "testB"):
        save(np.zeros((16, 16, 3), np.uint8), f"{drit}/cat2dog/{sub}/{sub}_0.png")
    train = data.get_dataset("folder", root=str(drit), size=16)
    test = data.get_dataset("folder", root=str(drit), split="test", size=16)
    assert [r["name"] for r in train.records] == ["trainA_0", "trainB_0"]
    assert [r["name"] for r in test.records] == ["testA_0", "testB_0"]
    assert train.class_names == ["trainA", "trainB"]
    cars = tmp_path / "cars"
    for sub in ("cars_train/cars_train", "cars_test/cars_test"):
        save(np.zeros((16, 16, 3), np.uint8), f"{cars}/{sub}/{sub[:5]}_0.jpg")
    train = data.get_dataset("folder", root=str(cars), size=16)
    test = data.get_dataset("folder", root=str(cars), split="test", size=16)
    assert train.class_names == [] and [r["name"] for r in train.records] == ["cars__0"]
    assert len(test) == 1 and "cars_test/cars_test" in test.records[0]["image"]


def test_listing_follows_links_and_skips_macos_archive_files(tmp_path):
    root = tmp_path / "imgs"
    save(np.zeros((8, 8, 3), np.uint8), f"{root}/cats/a.png")
    save(np.zeros((8, 8, 3), np.uint8), f"{tmp_path}/elsewhere/b.png")
    os.symlink(tmp_path / "elsewhere", root / "cats" / "linked")
    (root / "cats" / "._a.png").write_bytes(b"resource fork")
    save(np.zeros((8, 8, 3), np.uint8), f"{root}/__MACOSX/cats/c.png")
    assert [os.path.basename(p) for p in data.list_images(str(root), recursive=True)] == \
        ["a.png", "b.png"]
    (tmp_path / "cap.txt").write_bytes("\ufefffirst line\nsecond\n".encode("utf-8"))
    assert data.read_lines(str(tmp_path / "cap.txt")) == ["first line", "second"]


def test_colour_coded_label_maps_are_refused_not_read_by_their_red_channel(tmp_path):
    """Classes whose colours share a red value would merge: a label PNG whose R, G, B differ is
    one sentence (SMIS's DeepFashion masks excepted: channel 0 is their label, as make_instances
    reads it); a grey map saved as RGB reads as its ids."""
    fake = fake_celebamask(str(tmp_path / "celeba"), np.random.default_rng(0))
    ds = data.get_dataset("celebamask-hq", root=fake.root, split="test", size=fake.size)
    i = [r["label"] for r in ds.records].index(fake.test_label)
    ids = np.asarray(Image.open(fake.test_label))
    before = ds[i]["label"]
    Image.fromarray(np.stack([ids] * 3, -1)).save(fake.test_label)          # grey as RGB
    assert torch.equal(ds[i]["label"], before)
    Image.fromarray(np.stack([ids, ids, ids // 2], -1)).save(fake.test_label)  # colour-coded
    raises_naming(fake.test_label, lambda: ds[i], "colour-coded")
    assert [reason for _, reason in ds.file_problems(ds.records[i], read="pixels")] == \
        [data.COLOUR_CODED]
    pairs = fake_folder_pairs(str(tmp_path / "pairs"), np.random.default_rng(0))
    ids = np.asarray(Image.open(pairs.test_label))
    Image.fromarray(np.stack([ids, ids // 2, ids], -1)).save(pairs.test_label)
    raises_naming(pairs.test_label, lambda: data.get_dataset("folder-pairs", root=pairs.root,
                                                             split="test"), "colour-coded")
    smis = fake_deepfashion_smis(str(tmp_path / "smis"), np.random.default_rng(0))
    assert len(data.get_dataset("deepfashion", root=smis.root, split="test", size=32)[0]["label"])


def test_folder_pairs_splits_encode_their_labels_alike(tmp_path):
    """Classes and the don't-care channel come from the labels of both splits: a test split
    without class 5 must not move don't care (255) onto the train split's class 4."""
    root = tmp_path / "pairs"
    for split, ids in (("train", [0, 2, 5, 255]), ("test", [0, 2, 3, 255])):
        save(np.zeros((8, 8, 3), np.uint8), f"{root}/{split}/images/a.png")
        label = np.repeat(np.array(ids, np.uint8), 16).reshape(8, 8)
        save(label, f"{root}/{split}/labels/a.png")
    train = data.get_dataset("folder-pairs", root=str(root), size=8)
    test = data.get_dataset("folder-pairs", root=str(root), split="test", size=8)
    assert train.num_classes == test.num_classes == 7
    assert sorted(test[0]["label"].unique().tolist()) == [0, 2, 3, 6]


def test_partner_files_may_have_upper_case_extensions(tmp_path):
    fake = fake_folder_pairs(str(tmp_path), np.random.default_rng(0))
    for path in (fake.test_label, fake.test_image):
        os.rename(path, path[:-4] + ".PNG")
    ds = data.get_dataset("folder-pairs", root=fake.root, split="test", size=fake.size)
    assert fake.test_label[:-4] + ".PNG" in {r["label"] for r in ds.records}
    assert all(ds[i]["label"].shape == (32, 32) for i in range(len(ds)))


def test_cityscapes_instance_maps_in_one_split_are_wanted_in_both(tmp_path):
    """Without instanceIds anywhere both splits use class regions; with them in train only,
    the test split names its missing files (it fell back to class regions without a word)."""
    fake = fake_cityscapes(str(tmp_path), np.random.default_rng(0))
    for path in glob.glob(f"{fake.root}/gtFine/val/*/*_instanceIds.png"):
        os.remove(path)
    raises_naming("instanceIds", lambda: data.get_dataset("cityscapes", root=fake.root,
                                                          split="test", size=32))
    for path in glob.glob(f"{fake.root}/gtFine/train/*/*_instanceIds.png"):
        os.remove(path)
    for split in ("train", "test"):
        ds = data.get_dataset("cityscapes", root=fake.root, split=split, size=32)
        assert all(r["instance"] is None for r in ds.records)
