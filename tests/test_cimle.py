"""Tests of cimle.py: the exact chunked search, its flat memory, the rarity KDE, the metric,
Algorithm 1 lowering the selected distance, exact resume, network sizes, and bad input."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cimle  # noqa: E402
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LAYOUT = ["--size", "32", "--crn_channels", "8,8,8,8", "--encoder_channels", "8",
               "--noise_channels", "4", "--n_train", "48", "--S", "12", "--m", "4", "--L", "5",
               "--batch_size", "4", "--log_every", "5", "--sample_every", "1000"]


def tiny_layout_generator(seed=0, classes=5):
    torch.manual_seed(seed)
    return cimle.LayoutGenerator(classes, 3, 6, [6, 6, 6]).eval()  # 16x16 outputs


def tiny_sr_generator(seed=0):
    torch.manual_seed(seed)
    G = cimle.SRGenerator(z_channels=2, nf=6, gc=4, n_blocks=1).eval()
    for module in G.modules():  # PyTorch's default init instead of SRIM's x0.1: z matters more,
        if isinstance(module, torch.nn.Conv2d):  # so candidates are far from ties
            module.reset_parameters()
    return G


def brute_force(G, distance, cond, target, mask, table):
    """One generator call per (example, candidate): the definition of sigma(i), no chunking."""
    n, m = table.shape[:2]
    d = torch.empty(n, m)
    with torch.no_grad():
        for i in range(n):
            prepared = distance.prepare(target[i:i + 1], None if mask is None else mask[i:i + 1])
            for j in range(m):
                d[i, j] = distance(G(cond[i:i + 1], table[i, j:j + 1]), prepared)[0]
    return d.argmin(1), d


# ---------------------------------------------------------------------------------------------
# select_latents: exact, chunk-independent, memory flat in m
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["layout", "sr"])
def test_select_latents_equals_brute_force_for_any_chunking(task):
    gen = torch.Generator().manual_seed(1)
    n, m = (5, 7) if task == "layout" else (3, 5)  # SR: a (random) VGG-19 per call, keep it small
    if task == "layout":
        G = tiny_layout_generator()
        cond = torch.randint(0, 5, (n, 16, 16), generator=gen)
        target = torch.rand((n, 3, 16, 16), generator=gen) * 2 - 1
        mask = torch.rand((n, 1, 16, 16), generator=gen) + 0.1  # a rarity-like mask
        distance = cimle.Distance("layout", "pixel", "cpu")
    else:
        G = tiny_sr_generator()
        cond = torch.rand((n, 3, 4, 4), generator=gen) * 2 - 1
        target = torch.rand((n, 3, 32, 32), generator=gen) * 2 - 1
        mask = None
        vgg = common.VGG19(pretrained=False)  # random weights: no download in tests
        distance = cimle.Distance("sr", "official", "cpu", vgg)  # two weighted terms
    table = torch.randn((n, m, *G.latent_shape(cond)), generator=gen)
    expected, d_all = brute_force(G, distance, cond, target, mask, table)
    assert len(set(expected.tolist())) > 1  # the argmin differs between examples: not trivial

    def draw(e0, e1, j0, j1):
        return table[e0:e1, j0:j1]

    configs = ((1, 1), (2, 3), (3, 2), (7, 1), (10, 5)) if task == "layout" else \
        ((1, 1), (2, 2), (10, 3))  # chunks 2, 3 don't divide m; 2, 3 don't divide n = 5 or 3
    for chunk, examples in configs:
            idx, codes, dist = cimle.select_latents(G, distance, cond, target, mask, m, draw,
                                                    chunk, examples, "cpu")
            assert torch.equal(idx, expected), (chunk, examples)
            assert torch.equal(codes, table[torch.arange(n), expected])
            assert torch.allclose(dist, d_all.min(1).values, rtol=1e-5, atol=1e-7)
    naive_idx, _ = cimle.select_latents_naive(G, distance, cond, target, mask, m, draw, 2, "cpu")
    assert torch.equal(naive_idx, expected)


def test_reject_skips_near_candidates_and_falls_back():
    """RS-IMLE option: the nearest candidate at distance >= eps; all rejected -> plain argmin."""
    G = tiny_layout_generator()
    gen = torch.Generator().manual_seed(2)
    cond = torch.randint(0, 5, (4, 16, 16), generator=gen)
    target = torch.rand((4, 3, 16, 16), generator=gen) * 2 - 1
    distance = cimle.Distance("layout", "pixel", "cpu")
    table = torch.randn((4, 6, *G.latent_shape(cond)), generator=gen)
    _, d = brute_force(G, distance, cond, target, None, table)
    eps = float(d.quantile(0.3))  # rejects the nearest candidates of some examples
    masked = d.masked_fill(d < eps, float("inf"))
    expected = torch.where(torch.isfinite(masked.min(1).values), masked.argmin(1), d.argmin(1))
    idx, _, _ = cimle.select_latents(G, distance, cond, target, None, 6,
                                     lambda e0, e1, j0, j1: table[e0:e1, j0:j1], 4, 3, "cpu",
                                     reject=eps)
    assert torch.equal(idx, expected)
    assert not torch.equal(idx, d.argmin(1))
    idx_all, _, _ = cimle.select_latents(G, distance, cond, target, None, 6,
                                         lambda e0, e1, j0, j1: table[e0:e1, j0:j1], 4, 3, "cpu",
                                         reject=1e9)
    assert torch.equal(idx_all, d.argmin(1))


def test_memory_of_the_search_is_flat_in_m():
    G = tiny_layout_generator()
    gen = torch.Generator().manual_seed(3)
    cond = torch.randint(0, 5, (4, 16, 16), generator=gen)
    target = torch.rand((4, 3, 16, 16), generator=gen) * 2 - 1
    distance = cimle.Distance("layout", "pixel", "cpu")
    shape = G.latent_shape(cond)

    def peak(fn, m):
        draw_gen = torch.Generator().manual_seed(0)
        draw = lambda e0, e1, j0, j1: torch.randn((e1 - e0, j1 - j0, *shape),  # noqa: E731
                                                  generator=draw_gen)
        with cimle.PeakMemory() as pm:
            fn(draw, m)
        return pm.peak

    fast = lambda draw, m: cimle.select_latents(G, distance, cond, target, None, m, draw, 4, 4,  # noqa
                                                "cpu")
    naive = lambda draw, m: cimle.select_latents_naive(G, distance, cond, target, None, m, draw,  # noqa
                                                       4, "cpu")
    ms = (8, 24, 64)  # at least two chunks of 4 each, so the running merge is part of the peak
    fast_peaks = [peak(fast, m) for m in ms]
    naive_peaks = [peak(naive, m) for m in ms]
    assert max(fast_peaks) <= 1.05 * min(fast_peaks), fast_peaks
    assert naive_peaks[2] > 5 * naive_peaks[0], naive_peaks  # the measurement can see growth
    assert naive_peaks[2] > 8 * fast_peaks[2]


# ---------------------------------------------------------------------------------------------
# Rarity (§5.2.4) and the metric (§5.1.5) by hand
# ---------------------------------------------------------------------------------------------

def hand_kde(points, x):
    n, d = points.shape
    cov = np.cov(points.T, ddof=1) * n ** (-2.0 / (d + 4))      # Scott's factor, as scipy
    cov = cov + (1e-6 * np.trace(cov) / d + 1e-9) * np.eye(d)  # cimle's ridge
    inv, det = np.linalg.inv(cov), np.linalg.det(cov)
    total = 0.0
    for p in points:
        diff = x - p
        total += math.exp(-0.5 * diff @ inv @ diff) / math.sqrt((2 * math.pi) ** d * det)
    return total / n


def test_rarity_scores_and_mask_match_a_hand_computed_kde():
    # 6 images of 2x2 pixels, classes 0..2; class 2 only in some images
    labels = torch.tensor([[[0, 0], [1, 2]], [[0, 1], [1, 1]], [[0, 0], [0, 2]],
                           [[1, 1], [0, 2]], [[0, 2], [1, 1]], [[0, 0], [1, 1]]])
    gen = torch.Generator().manual_seed(4)
    images = torch.rand((6, 3, 2, 2), generator=gen) * 2 - 1
    colours, present, count = cimle.mean_colours(images, labels, 3)
    rgb = ((images.double() + 1) * 127.5).numpy()
    for k in range(6):
        for p in range(3):
            sel = labels[k].numpy() == p
            assert present[k, p] == sel.any() and count[k, p] == sel.sum()
            if sel.any():
                assert np.allclose(colours[k, p].numpy(), rgb[k][:, sel].mean(1))
    rarity = cimle.rarity_scores(colours, present)
    for p in range(3):
        rows = np.nonzero(present[:, p].numpy())[0]
        pts = colours[rows, p].numpy()
        for k in range(6):
            want = 1.0 / hand_kde(pts, colours[k, p].numpy()) if k in rows else 0.0
            assert math.isclose(float(rarity[k, p]), want, rel_tol=1e-6), (k, p)
    mask = cimle.rarity_mask(labels, rarity)
    for k in range(6):
        per_pixel = rarity[k][labels[k]]
        assert torch.allclose(mask[k, 0].double(), per_pixel / per_pixel.max(), rtol=1e-6)
        assert mask[k].max() == 1 and mask[k].min() > 0


def test_dataset_rebalancing_draws_by_rarity_within_the_largest_classes():
    args = cimle.parse(["--S", "3000", "--rebalance_classes", "2"])
    rarity = {"R": torch.tensor([[1.0, 0.0, 5.0], [3.0, 2.0, 0.0], [0.0, 6.0, 1.0]],
                                dtype=torch.float64),
              "area": torch.tensor([10.0, 30.0, 1.0])}  # largest: class 1, then class 0
    subset = cimle.pick_subset(0, 3, args, rarity)
    assert torch.equal(subset, cimle.pick_subset(0, 3, args, rarity))  # pure function of outer
    even, odd = subset[0::2], subset[1::2]  # slot i -> class top[i mod 2] = [1, 0][i mod 2]
    assert (even != 0).all() and (odd != 2).all()  # never an image without the slot's class
    assert abs((even == 2).float().mean().item() - 0.75) < 0.05  # R 6 : 2
    assert abs((odd == 1).float().mean().item() - 0.75) < 0.05   # R 3 : 1


def test_faithfulness_weighted_variance_by_hand():
    gen = torch.Generator().manual_seed(5)
    samples = torch.rand((2, 3, 1, 2, 2), generator=gen)
    truth = torch.rand((2, 1, 2, 2), generator=gen)
    d = lambda a, b: (a - b).abs().flatten(1).mean(1)  # noqa: E731
    got = cimle.faithfulness_weighted_variance(samples, truth, d, sigmas=(0.3, 0.15))
    for sigma in (0.3, 0.15):
        total = 0.0
        for j in range(2):
            mean = samples[j].mean(0)
            for i in range(3):
                w = math.exp(-float((samples[j, i] - truth[j]).abs().mean()) / (2 * sigma ** 2))
                total += w * float((samples[j, i] - mean).abs().mean())
        assert math.isclose(got[sigma], total / 6, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------
# Networks: the official sizes, x8, z concatenated, z = 0 pretraining
# ---------------------------------------------------------------------------------------------

def rrdb_params(cin, z, nf, gc, nb):
    conv = lambda i, o: i * o * 9 + o  # noqa: E731
    rdb = sum(conv(nf + k * gc, gc) for k in range(4)) + conv(nf + 4 * gc, nf)
    return conv(cin + z, nf) + nb * 3 * rdb + conv(nf, nf) * 5 + conv(nf, cin)


def test_paper_networks_have_the_official_sizes(capsys):
    cimle.main(["--data", "folder", "--dry_run"])
    sr = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"]
    assert sr["G"] == rrdb_params(3, 5, 64, 128, 24) == 109_055_043  # cimle.md: ~109.06M
    cimle.main(["--data", "gta5", "--dry_run"])
    lay = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"]
    # CRN: 7 modules, no conv bias, GroupNorm affine, 1x1 head with bias (cimle.md: ~98.4M)
    widths, cond, crn, prev = [1024] * 5 + [512] * 2, 30, 0, 0
    for w in widths:
        crn += (prev + cond) * w * 9 + w * w * 9 + 4 * w
        prev = w
    assert lay["G"] == crn + 512 * 3 + 3 == 98_416_131
    assert lay["E"] == 30 * 100 * 9 + 200 + 100 * 100 * 9 + 200 + 100 * 10 + 10 == 118_410


def test_sr_generator_is_x8_and_uses_z_and_upsampling_mode():
    G = tiny_sr_generator()
    lr = torch.rand(2, 3, 4, 4) * 2 - 1
    z = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        out = G(lr, z)
        assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1
        assert not torch.allclose(out, G(lr, torch.zeros_like(z)))
        G.upsample_mode = "bilinear"
        assert not torch.allclose(out, G(lr, z))


def test_pretraining_steps_ignore_the_codes():
    """§5.1.1: while it < pretrain_iters the model is trained with z = 0, whatever the codes."""
    args = cimle.parse(["--task", "sr", "--size", "32", "--nf", "6", "--gc", "4", "--n_blocks",
                        "1", "--pretrain_iters", "10", "--batch_size", "2", "--S", "4"])
    rt = common.setup_runtime(args)
    gen = torch.Generator().manual_seed(6)
    items = (torch.rand((4, 3, 4, 4), generator=gen) * 2 - 1,
             torch.rand((4, 3, 32, 32), generator=gen) * 2 - 1, None)
    results = []
    for codes, it in ((torch.randn(4, 5, 4, 4), 3), (torch.zeros(4, 5, 4, 4), 3),
                      (torch.randn(4, 5, 4, 4), 12), (torch.zeros(4, 5, 4, 4), 12)):
        torch.manual_seed(0)
        G = cimle.build_generator(args)
        for module in G.modules():  # default init: the output depends clearly on z
            if isinstance(module, torch.nn.Conv2d):
                module.reset_parameters()
        opt, sched = cimle.make_optimiser(G, args)
        loss = cimle.inner_step(G, cimle.Distance("sr", "pixel", "cpu"), opt, sched, items, codes,
                                it, args, rt)
        results.append((loss, [p.detach().clone() for p in G.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert results[2][0] != results[3][0]  # after pretraining the codes matter
    assert not all(torch.equal(a, b) for a, b in zip(results[2][1], results[3][1]))


# ---------------------------------------------------------------------------------------------
# Algorithm 1 on shapes: the selected distance falls; resume is exact
# ---------------------------------------------------------------------------------------------

def test_outer_iterations_lower_the_selected_distance():
    args = cimle.parse(TINY_LAYOUT + ["--rebalance_data", "0", "--rebalance_loss", "0",
                                      "--lr", "3e-3", "--L", "15"])
    rt = common.setup_runtime(args)
    ds = cimle.load_data(args)
    torch.manual_seed(0)
    G = cimle.build_generator(args)
    opt, sched = cimle.make_optimiser(G, args)
    distance = cimle.Distance("layout", "pixel", "cpu")
    items = cimle.gather_items(ds, torch.arange(12), args, None)  # one fixed S
    selected = []
    for outer in range(4):
        G.eval()
        codes, sel = cimle.outer_search(G, distance, items, outer, args, rt)
        G.train()
        selected.append(sel)
        for it in range(outer * args.L, (outer + 1) * args.L):
            cimle.inner_step(G, distance, opt, sched, items, codes, it, args, rt)
    assert selected[-1] < 0.7 * selected[0], selected


def test_resume_is_exact(tmp_path):
    base = TINY_LAYOUT + ["--ckpt_every", "7"]  # a checkpoint in the middle of outer iteration 2
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    cimle.main(base + ["--iters", "14", "--out_dir", full])
    cimle.main(base + ["--iters", "7", "--out_dir", part])
    ck = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert ck["iter"] == 7 and ck["extra"]["subset"] is not None
    cimle.main(base + ["--iters", "14", "--out_dir", part, "--resume"])
    a = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    for k, v in a["state"]["G"].items():
        assert torch.equal(v, b["state"]["G"][k]), k
    assert torch.equal(a["extra"]["codes"], b["extra"]["codes"])
    log_a = [json.loads(line)["loss"] for line in open(os.path.join(full, "log.jsonl"))]
    log_b = [json.loads(line)["loss"] for line in open(os.path.join(part, "log.jsonl"))]
    assert log_a[-1] == log_b[-1]
    args = cimle.parse(base + ["--out_dir", full, "--resume"])  # the finished run folder
    assert os.path.isfile(cimle.rarity_cache_path(args, 48))


# ---------------------------------------------------------------------------------------------
# Bad input: one sentence, exit status 2
# ---------------------------------------------------------------------------------------------

def run_script(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "cimle.py"), *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_bad_input_is_one_sentence_and_exit_2(tmp_path):
    missing = str(tmp_path / "no_such_folder")
    res = run_script("--data", "gta5", "--data_dir", missing, "--out_dir", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and missing in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    for argv, words in ((["--task", "layout", "--data", "folder"], "not available"),
                        (["--batch_size", "100", "--S", "10"], "must not exceed"),
                        (["--distance", "vgg", "--pretrained", "0"], "pretrained"),
                        (["--sample", "--out_dir", str(tmp_path / "none")], "no checkpoint")):
        with pytest.raises(common.UserError, match=words):
            cimle.main(argv)
