"""Tests of cimle.py: the exact chunked search, its flat memory, the search and the batch split
over ranks, the distance terms and their weights (§3.7 calibration), the schedule of outer
iterations, the inner step and Adam's schedule, the rarity KDE and its guard, the sampling
controls, the metrics, exact resume, --compile, --bench, the streamed --eval and its flat
memory, network sizes, every bad flag, and the paper presets (gta5, SR folder) under torchrun on
fake data in the official layouts."""

import functools
import json
import math
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cimle  # noqa: E402
import common  # noqa: E402
from test_data import fake_gta5  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LAYOUT = ["--size", "32", "--crn_channels", "8,8,8,8", "--encoder_channels", "8",
               "--noise_channels", "4", "--n_train", "48", "--S", "12", "--m", "4", "--L", "5",
               "--batch_size", "4", "--log_every", "5", "--sample_every", "1000",
               "--rarity_min_images", "0"]


def flags_only(argv):
    """The parsed flags, without preparing a run folder (no out/ written, none refused)."""
    return cimle.parse(argv + ["--dry_run"])


@functools.lru_cache(maxsize=None)
def random_vgg():
    """A VGG-19 with random weights (no download in tests), built once for the whole file."""
    return common.VGG19(pretrained=False).eval()


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
        cond = torch.rand((n, 3, 2, 2), generator=gen) * 2 - 1
        target = torch.rand((n, 3, 16, 16), generator=gen) * 2 - 1
        mask = None
        vgg = random_vgg()
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
    ms = (8, 16, 48)  # at least two chunks of 4 each, so the running merge is part of the peak
    fast_peaks = [peak(fast, m) for m in ms]
    naive_peaks = [peak(naive, m) for m in ms]
    assert max(fast_peaks) <= 1.05 * min(fast_peaks), fast_peaks
    assert naive_peaks[2] > 4 * naive_peaks[0], naive_peaks  # the measurement can see growth
    assert naive_peaks[2] > 6 * fast_peaks[2]


# ---------------------------------------------------------------------------------------------
# The distance L (§3.7, Eq. 1) term by term, the inner step, Adam and its schedule
# ---------------------------------------------------------------------------------------------

def test_distance_terms_by_hand_for_every_kind():
    gen = torch.Generator().manual_seed(11)
    fake = torch.rand((6, 3, 32, 32), generator=gen) * 2 - 1   # 2 targets x 3 candidates
    target = torch.rand((2, 3, 32, 32), generator=gen) * 2 - 1
    mask = torch.rand((2, 1, 32, 32), generator=gen)
    vgg = random_vgg()
    rep = lambda t: t.repeat_interleave(3, 0)  # noqa: E731  candidates of one target are adjacent
    with torch.no_grad():
        pixel = cimle.Distance("layout", "pixel", "cpu")
        want = (fake - rep(target)).abs().flatten(1).mean(1)
        assert torch.allclose(pixel(fake, pixel.prepare(target)), want, atol=1e-6)
        # layouts: L1 per term, each weighted by the rarity mask area-resized to its resolution;
        # the taps after the ReLU (DISL's MatConvNet VGG, the default) or before it
        for variant, names in (("matconvnet", [f"relu{i}_2" for i in range(1, 6)]),
                               ("torchvision", [f"conv{i}_2" for i in range(1, 6)])):
            lay = cimle.Distance("layout", "vgg", "cpu", vgg, variant)
            lay.weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
            ff, ft = vgg((fake + 1) / 2, names), vgg((target + 1) / 2, names)
            want = (fake - rep(target)).abs().mul(rep(mask)).flatten(1).mean(1)
            for w, name in zip(range(2, 7), names):
                m = torch.nn.functional.adaptive_avg_pool2d(mask, ff[name].shape[-2:])
                want = want + w * ((ff[name] - rep(ft[name])).abs() * rep(m)).flatten(1).mean(1)
            assert torch.allclose(lay(fake, lay.prepare(target, mask)), want, rtol=1e-4)
        # SR, Eq. (1): a sum of l2 norms (root mean squares), not of squared norms
        sr = cimle.Distance("sr", "vgg", "cpu", vgg)
        sr.weights = torch.tensor([1.0, 3.0])
        f5, t5 = vgg((fake + 1) / 2, ["relu5_4"])["relu5_4"], vgg((target + 1) / 2, ["relu5_4"])
        want = ((fake - rep(target)).pow(2).flatten(1).mean(1).sqrt()
                + 3 * (f5 - rep(t5["relu5_4"])).pow(2).flatten(1).mean(1).sqrt())
        assert torch.allclose(sr(fake, sr.prepare(target)), want, rtol=1e-4)
        # SRIM's code: 0.01 L1 pixels (its images in [0, 1]) + L1 conv5_4 (pre-ReLU), fixed
        off = cimle.Distance("sr", "official", "cpu", vgg)
        assert off.calibrated and not sr.calibrated and not lay.calibrated
        c5, t5 = vgg((fake + 1) / 2, ["conv5_4"])["conv5_4"], vgg((target + 1) / 2, ["conv5_4"])
        want = (0.01 * ((fake + 1) / 2 - rep((target + 1) / 2)).abs().flatten(1).mean(1)
                + (c5 - rep(t5["conv5_4"])).abs().flatten(1).mean(1))
        assert torch.allclose(off(fake, off.prepare(target)), want, rtol=1e-4)


def test_layout_distance_takes_the_official_average_pooled_post_relu_vgg_by_default(monkeypatch):
    """§5.2.1 "activations" of conv1_2 .. conv5_2; DISL: MatConvNet's VGG-19, post-ReLU, average
    pooling. --layout_vgg torchvision: pre-ReLU taps, max pooling. SR keeps torchvision's VGG."""
    class Built(torch.nn.Module):  # what make_distance asks common.VGG19 for, without weights
        def __init__(self, pretrained=True, normalize=True, pool="max"):
            super().__init__()
            self.pool = pool

    monkeypatch.setattr(common, "VGG19", Built)
    pools = {}
    for argv in ([], ["--layout_vgg", "torchvision"], ["--task", "sr"]):
        args = flags_only(["--distance", "vgg", "--bench", "1"] + argv)  # --bench: random VGG
        distance = cimle.make_distance(args, torch.device("cpu"))
        pools[tuple(argv)] = (distance.vgg.pool, distance.layers)
    assert pools[()] == ("avg", [f"relu{i}_2" for i in range(1, 6)])
    assert pools[("--layout_vgg", "torchvision")] == ("max", [f"conv{i}_2" for i in range(1, 6)])
    assert pools[("--task", "sr")] == ("max", ["relu5_4"])
    assert [type(m).__name__ for m in common.vgg_features((2, 2, 4, 4, 4), "avg")][4] == \
        "AvgPool2d"


def test_inner_step_is_one_adam_step_on_the_mean_distance_of_the_selected_codes():
    """Algorithm 1 lines 9-12: the loss of |S~| examples of S with their codes, its mean, one
    Adam step of size --lr (Adam's first step moves every weight with a gradient by ~lr)."""
    args = flags_only(TINY_LAYOUT + ["--lr", "0.01"])
    rt = common.setup_runtime(args)
    gen = torch.Generator().manual_seed(12)
    items = (torch.randint(0, 5, (12, 16, 16), generator=gen),
             torch.rand((12, 3, 16, 16), generator=gen) * 2 - 1,
             torch.rand((12, 1, 16, 16), generator=gen) + 0.1)
    codes = torch.randn((12, 3, 16, 16), generator=gen)
    G = tiny_layout_generator()
    before = [p.detach().clone() for p in G.parameters()]
    distance = cimle.Distance("layout", "pixel", "cpu")
    pick = torch.randperm(12, generator=torch.Generator().manual_seed(args.seed * 15_485_863 + 5))
    pick = pick[:4]
    with torch.no_grad():
        want = ((G(items[0][pick], codes[pick]) - items[1][pick]).abs()
                * items[2][pick]).flatten(1).mean(1).mean()
    opt, sched = cimle.make_optimiser(G, args)
    loss = cimle.inner_step(G, distance, opt, sched, items, codes, 5, args, rt)
    assert math.isclose(loss, float(want), rel_tol=1e-5)
    steps = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(G.parameters(), before)])
    assert abs(float(steps.max()) - 0.01) < 1e-3 and float(steps.median()) > 0.005


def test_learning_rate_schedules_of_the_paper_presets():
    """SRIM: 1.5e-4 halved at 50k/100k/200k/300k IMLE steps (after 150k of pretraining); DISL:
    1e-4, then 1e-5 after 5 outer iterations of 10k."""
    for data, checks in (("folder", {0: 1.5e-4, 199_999: 1.5e-4, 200_000: 7.5e-5,
                                     250_000: 3.75e-5, 450_000: 9.375e-6}),
                         ("gta5", {0: 1e-4, 49_999: 1e-4, 50_000: 1e-5, 159_999: 1e-5})):
        args = flags_only(["--data", data])
        sched = cimle.make_optimiser(torch.nn.Linear(1, 1), args)[1]
        for it in sorted(checks):  # the lr after `it` scheduler steps
            sched.last_epoch = it
            assert math.isclose(sched._get_closed_form_lr()[0], checks[it], rel_tol=1e-9), it


def test_paper_presets_hold_the_papers_values():
    sr = flags_only(["--data", "folder"])
    assert (sr.task, sr.size, sr.S, sr.m, sr.L, sr.batch_size, sr.z_channels) == \
        ("sr", 256, 640, 100, 200_000, 4, 5)                          # §5.1.2, §5.1.4
    assert (sr.pretrain_iters, sr.n_train, sr.n_eval, sr.eval_samples, sr.distance) == \
        (150_000, 1280, 80, 50, "vgg")                                # §5.1.1, §5.1.4, §5.1.6
    lay = flags_only(["--data", "gta5"])
    assert (lay.task, lay.size, lay.S, lay.m, lay.L, lay.batch_size) == \
        ("layout", 256, 400, 10, 10_000, 1)                           # §5.2.5
    assert (lay.noise_channels, lay.encoder_channels, lay.noise_encoder) == (10, 100, 1)
    assert (lay.rebalance_data, lay.rebalance_loss, lay.rebalance_classes) == (1, 1, 5)
    assert (lay.n_eval, lay.eval_samples, lay.rarity_min_images) == (100, 80, 67)  # §5.2.6, DISL


# ---------------------------------------------------------------------------------------------
# The schedule of outer iterations: z = 0 pretraining sweeps all images; the bilinear switch
# ---------------------------------------------------------------------------------------------

def test_outer_iterations_of_the_sr_preset():
    """z = 0 pretraining in rounds of |S| / |S~| = 160 steps; IMLE outer iterations of L from
    150k; the switch to bilinear at 450k starts a fresh one."""
    args = flags_only(["--data", "folder"])
    starts = [it for it in (0, 1, 159, 160, 320, 149_920, 149_999, 150_000, 150_001, 350_000,
                            449_999, 450_000, 550_000, 650_000) if cimle.new_outer(it, args)]
    assert starts == [0, 160, 320, 149_920, 150_000, 350_000, 450_000, 650_000]
    numbers = [cimle.outer_index(it, args) for it in (0, 159, 160, 149_999, 150_000, 350_000,
                                                       449_999, 450_000, 749_999)]
    assert numbers == [1, 1, 2, 938, 939, 940, 940, 941, 942]  # k = 1 .. K as Algorithm 1
    layout = flags_only(["--data", "gta5"])
    assert [cimle.outer_index(it, layout) for it in (0, 9_999, 10_000, 159_999)] == [1, 1, 2, 16]


def test_pretraining_rounds_show_every_training_image():
    args = flags_only(["--data", "folder"])
    rounds = math.ceil(args.pretrain_iters / (args.S // args.batch_size))
    seen = torch.zeros(args.n_train, dtype=torch.bool)
    for outer in range(0, rounds, 25):  # a few of the 938 rounds already cover the set
        seen[cimle.pick_subset(outer, args.n_train, args, None)] = True
    assert bool(seen.all())
    one = cimle.pick_subset(0, args.n_train, args, None)
    assert len(one) == len(set(one.tolist())) == 640  # without replacement


# ---------------------------------------------------------------------------------------------
# Sampling controls (--sample), measured on the tensors
# ---------------------------------------------------------------------------------------------

def test_sampling_controls_change_only_what_they_control():
    G = tiny_layout_generator()
    gen = torch.Generator().manual_seed(13)
    cond = torch.randint(0, 5, (3, 16, 16), generator=gen)
    many = cimle.generate_samples(G, cond, 4, "cpu", seed=1)            # (3, 4, 3, 16, 16)
    z = torch.randn((3, 4, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for i in range(3):
            assert torch.allclose(many[i], G(cond[i:i + 1].expand(4, -1, -1), z[i]).clamp(-1, 1),
                                  atol=1e-6)
    assert (many[:, 0] - many[:, 1]).abs().mean() > 1e-3            # codes differ -> samples
    zero = cimle.generate_samples(G, cond, 4, "cpu", zero=True)
    assert torch.equal(zero[:, 0], zero[:, 3])                        # z = 0: one output
    za, zb = torch.randn((2, 3, 16, 16), generator=gen)
    frames = cimle.interpolate_latents(G, cond[:1], za, zb)
    with torch.no_grad():
        for t, frame in zip(torch.linspace(0, 1, 8), frames):
            want = G(cond[:1], ((1 - t) * za + t * zb)[None]).clamp(-1, 1)[0]
            assert torch.allclose(frame, want, atol=1e-5)
        shared = cimle.one_latent_many_inputs(G, cond, za)
        for i in range(3):
            assert torch.allclose(shared[i], G(cond[i:i + 1], za[None]).clamp(-1, 1)[0],
                                  atol=1e-5)
    assert not torch.allclose(shared[0], shared[1])


def test_without_noise_encoder_the_crn_gets_the_raw_codes(capsys):
    """Table 2's "Ours w/o noise encoder": T(x, z~) = CRN(x, z~); no encoder parameters."""
    torch.manual_seed(0)
    G = cimle.LayoutGenerator(5, 3, 6, [6, 6, 6], noise_encoder=False).eval()
    cond = torch.randint(0, 5, (2, 16, 16))
    z = torch.randn(2, 3, 16, 16)
    layout = torch.nn.functional.one_hot(cond, 5).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        assert torch.equal(G(cond, z), G.crn(layout, z))
        full = tiny_layout_generator()  # with the encoder: z' = E(x, z~) feeds the CRN
        assert torch.equal(full(cond, z), full.crn(layout, full.encoder(layout, z)))
    cimle.main(["--data", "gta5", "--noise_encoder", "0", "--dry_run"])
    params = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"]
    assert set(params) == {"G"} and params["G"] == 98_416_131


def test_crn_baseline_makes_k_images_trained_by_the_classwise_hindsight_loss(capsys):
    """Table 2's "CRN" (§5.2.3): Chen & Koltun's CRN with K images per layout, no noise input,
    trained with sum_p min_u of the loss on class p's pixels; a sample is one of the K images,
    image floor(K Phi(z)) for a code z ~ N(0, 1)."""
    cimle.main(["--data", "gta5", "--baseline", "crn", "--dry_run"])
    params = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"]
    widths, crn, prev = [1024] * 5 + [512] * 2, 0, 0
    for w in widths:  # the layout's 20 channels only, no noise channels
        crn += (prev + 20) * w * 9 + w * w * 9 + 4 * w
        prev = w
    assert params == {"G": crn + 512 * 27 + 27}
    torch.manual_seed(0)
    G = cimle.MultiImageCRN(5, [6, 6, 6], images=3).eval()
    gen = torch.Generator().manual_seed(4)
    cond = torch.randint(0, 5, (2, 16, 16), generator=gen)
    target = torch.rand((2, 3, 16, 16), generator=gen) * 2 - 1
    with torch.no_grad():
        every = G(cond, None)                                   # (2, K, 3, 16, 16)
        assert every.shape == (2, 3, 3, 16, 16) and not torch.allclose(every[:, 0], every[:, 1])
        for u in range(3):  # the code at quantile (u + 1/2) / K picks image u
            z = torch.full((2, 1, 1, 1), float(torch.distributions.Normal(0, 1).icdf(
                torch.tensor((u + 0.5) / 3))))
            assert torch.equal(G(cond, z), every[:, u])
        distance = cimle.Distance("layout", "pixel", "cpu")
        prepared = distance.prepare(target)
        classes = torch.nn.functional.one_hot(cond, 5).permute(0, 3, 1, 2).float()
        diff = (every - target.unsqueeze(1)).abs().sum(2)      # (2, K, 16, 16)
        per_class = torch.einsum("ekhw,ephw->ekp", diff, classes) / (3 * 16 * 16)
        want = per_class.min(1).values.sum(1)                  # sum over p of min over u
        assert torch.allclose(distance.hindsight(every, prepared, classes), want, atol=1e-6)
        assert (want < distance(every.flatten(0, 1), prepared).view(2, 3).min(1).values).all()
        one = every[:, :1]  # K = 1: the plain distance (the classes split every term's mean)
        assert torch.allclose(distance.hindsight(one, prepared, classes),
                              distance(one[:, 0], prepared), atol=1e-6)
    args = flags_only(TINY_LAYOUT + ["--baseline", "crn", "--crn_images", "3"])
    args.num_classes = 5
    calls = []
    recorder = lambda c, z: (calls.append(z), G(c, z))[1]  # noqa: E731
    items = (cond.repeat(6, 1, 1), target.repeat(6, 1, 1, 1), None)
    opt, sched = cimle.make_optimiser(G, args)
    loss = cimle.inner_step(recorder, distance, opt, sched, items, None, 5, args,
                            common.setup_runtime(args))
    pick = torch.randperm(12, generator=torch.Generator().manual_seed(args.seed * 15_485_863 + 5))
    pick = pick[:4]
    hot = torch.nn.functional.one_hot(items[0][pick], 5).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        want = distance.hindsight(every.repeat(6, 1, 1, 1, 1)[pick], distance.prepare(
            items[1][pick]), hot).mean()
    assert calls == [None] and math.isclose(float(loss), float(want), rel_tol=1e-5)


def test_crn_noise_baseline_trains_on_a_fresh_code_every_step():
    """Table 2's "CRN + noise": the plain loss on a fresh N(0, I) code per step, whatever codes
    a search would hold; a pure function of (seed, step), one process's codes under DDP."""
    args = flags_only(TINY_LAYOUT + ["--baseline", "crn_noise", "--noise_encoder", "0"])
    gen = torch.Generator().manual_seed(9)
    items = (torch.randint(0, 5, (12, 16, 16), generator=gen),
             torch.rand((12, 3, 16, 16), generator=gen) * 2 - 1, None)

    def codes_seen(codes, it, rank=0, world=1):
        G = cimle.LayoutGenerator(5, 3, 6, [6, 6, 6], noise_encoder=False)
        seen = []
        recorder = lambda c, z: (seen.append(z), G(c, z))[1]  # noqa: E731
        recorder.latent_shape = G.latent_shape
        rt = common.Runtime(torch.device("cpu"), torch.float32, rank=rank, world_size=world)
        opt, sched = cimle.make_optimiser(G, args)
        cimle.inner_step(recorder, cimle.Distance("layout", "pixel", "cpu"), opt, sched, items,
                         codes, it, args, rt)
        return seen[0]

    a = codes_seen(torch.zeros(12, 3, 16, 16), 5)
    assert torch.equal(a, codes_seen(torch.randn(12, 3, 16, 16), 5))  # held codes unused
    assert torch.equal(a, codes_seen(None, 5)) and not torch.equal(a, codes_seen(None, 6))
    assert abs(float(a.std()) - 1) < 0.05 and abs(float(a.mean())) < 0.05
    assert torch.equal(torch.cat([codes_seen(None, 5, r, 2) for r in range(2)]), a)


@pytest.mark.parametrize("baseline", ["crn", "crn_noise"])
def test_the_baselines_train_without_a_search(baseline, tmp_path, monkeypatch):
    def no_search(*a, **k):
        raise AssertionError("the baselines of Table 2 have no nearest-sample search")

    monkeypatch.setattr(cimle, "outer_search", no_search)
    out = str(tmp_path / baseline)
    cimle.main(TINY_LAYOUT + ["--baseline", baseline, "--iters", "1", "--L", "1", "--S", "4",
                              "--n_train", "8", "--out_dir", out, "--crn_images", "2",
                              "--rebalance_data", "0"])
    assert len(open(os.path.join(out, "log.jsonl")).readlines()) == 1


def test_encoder_reinitialisation_restarts_the_encoder_and_adam_only(tmp_path, monkeypatch):
    """DISL's restart (--reinit_encoder_at): a fresh noise encoder, seeded by (seed, step), and
    empty Adam moments; the CRN keeps its weights; the global RNG does not move."""
    args = flags_only(TINY_LAYOUT + ["--reinit_encoder_at", "7"])
    args.num_classes = 5
    G = cimle.LayoutGenerator(5, 4, 8, [6, 6, 6])
    opt, _ = cimle.make_optimiser(G, args)
    G(torch.randint(0, 5, (1, 16, 16)), torch.randn(1, 4, 16, 16)).mean().backward()
    opt.step()
    crn = {k: v.clone() for k, v in G.crn.state_dict().items()}
    enc = {k: v.clone() for k, v in G.encoder.state_dict().items()}
    rng = torch.get_rng_state()
    cimle.reinit_encoder(G, opt, 7, args)
    assert torch.equal(torch.get_rng_state(), rng) and not opt.state
    assert all(torch.equal(v, G.crn.state_dict()[k]) for k, v in crn.items())
    fresh = {k: v.clone() for k, v in G.encoder.state_dict().items()}
    assert not torch.equal(fresh["net.0.0.weight"], enc["net.0.0.weight"])
    assert abs(float(fresh["net.0.0.weight"].std()) - 0.15) < 0.03  # DISL's trunc-normal 0.15
    torch.manual_seed(123)  # another global state (another rank's): the same fresh encoder
    cimle.reinit_encoder(G, opt, 7, args)
    assert all(torch.equal(v, G.encoder.state_dict()[k]) for k, v in fresh.items())
    steps = []
    monkeypatch.setattr(cimle, "reinit_encoder", lambda G, opt, it, args: steps.append(it))
    cimle.main(TINY_LAYOUT + ["--iters", "2", "--L", "1", "--S", "4", "--n_train", "8",
                              "--reinit_encoder_at", "1", "--rebalance_data", "0",
                              "--out_dir", str(tmp_path / "run")])
    assert steps == [1]


def test_cached_target_features_give_the_very_steps_of_per_step_features():
    """prepare_subset: the targets' features of S once per outer iteration; the inner steps that
    index them compute the same losses and weights as steps that prepare their own."""
    args = flags_only(TINY_LAYOUT)
    gen = torch.Generator().manual_seed(13)
    items = (torch.randint(0, 5, (12, 16, 16), generator=gen),
             torch.rand((12, 3, 16, 16), generator=gen) * 2 - 1,
             torch.rand((12, 1, 16, 16), generator=gen) + 0.1)
    codes = torch.randn((12, 3, 16, 16), generator=gen)
    rt = common.setup_runtime(args)
    distance = cimle.Distance("layout", "vgg", "cpu", random_vgg())
    cache = cimle.prepare_subset(distance, items, args, rt)
    assert cimle.prepare_subset(distance, items, args, rt, budget=0) is None
    assert cache["feats"]["relu3_2"].shape == (12, 256, 4, 4)
    runs = []
    for c in (cache, None):
        G = tiny_layout_generator()
        opt, sched = cimle.make_optimiser(G, args)
        losses = [float(cimle.inner_step(G, distance, opt, sched, items, codes, it, args, rt, c))
                  for it in range(3)]
        runs.append((losses, [p.detach().clone() for p in G.parameters()]))
    assert np.allclose(runs[0][0], runs[1][0], rtol=1e-5) and runs[0][0][0] != runs[0][0][2]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(runs[0][1], runs[1][1]))


def test_selected_codes_do_not_depend_on_the_chunk_and_cpu_picks_ten():
    """Each example's m codes are drawn at once from its own stream, so the chunk (given, or
    chosen from free memory when --search_chunk is 0: min(m, 10) on a CPU) changes nothing."""
    args = flags_only(["--S", "5", "--m", "12", "--search_examples", "2", "--batch_size", "2",
                        "--search_chunk", "0"])
    rt = common.setup_runtime(args)
    G = tiny_layout_generator()
    gen = torch.Generator().manual_seed(3)
    items = (torch.randint(0, 5, (5, 16, 16), generator=gen),
             torch.rand((5, 3, 16, 16), generator=gen) * 2 - 1, None)
    distance = cimle.Distance("layout", "pixel", "cpu")
    assert cimle.search_chunk_size(G, distance, items, args, rt) == 10
    args.m = 4
    assert cimle.search_chunk_size(G, distance, items, args, rt) == 4
    args.m, args.search_chunk = 12, 5
    assert cimle.search_chunk_size(G, distance, items, args, rt) == 5
    codes = [cimle.outer_search(G, distance, items, 2, args, rt, chunk)[0] for chunk in (1, 5, 12)]
    assert torch.equal(codes[0], codes[1]) and torch.equal(codes[0], codes[2])


def test_a_bfloat16_search_selects_the_float32_codes_on_a_toy():
    """--search_dtype: the search's forwards run under that autocast dtype (the inner steps keep
    --dtype); on candidates far apart it selects the very codes a float32 search selects."""
    torch.manual_seed(5)
    G = ToyGenerator()  # 1x1 images from a 1-d code: candidates lie far apart
    gen = torch.Generator().manual_seed(5)
    items = (torch.zeros(16, 1, 1, 1), torch.rand((16, 3, 1, 1), generator=gen) * 2 - 1, None)
    distance = cimle.Distance("layout", "pixel", "cpu")
    picked, dtypes = {}, {}
    for dtype in ("float32", "bfloat16"):
        args = flags_only(["--S", "16", "--m", "8", "--batch_size", "2", "--rebalance_data", "0",
                           "--search_dtype", dtype])
        seen = []
        recorder = lambda c, z: (lambda out: (seen.append(out.dtype), out)[1])(G(c, z))  # noqa
        recorder.latent_shape = G.latent_shape
        picked[dtype], dist = cimle.outer_search(recorder, distance, items, 1, args,
                                                 common.setup_runtime(args), chunk=4)
        dtypes[dtype] = set(seen)
        assert common.setup_runtime(args).dtype == torch.float32  # training stays float32
    assert dtypes == {"float32": {torch.float32}, "bfloat16": {torch.bfloat16}}
    assert torch.equal(picked["float32"], picked["bfloat16"])


# ---------------------------------------------------------------------------------------------
# Several processes: the search split over ranks gives one process's codes; |S~| must divide
# ---------------------------------------------------------------------------------------------

def test_search_split_over_ranks_selects_the_codes_of_one_process(monkeypatch):
    """Each rank searches examples r, r + W, ... of S with codes that depend only on (seed,
    outer, example): the gathered codes equal one process's; --perturb adds perturb * N(0, I)."""
    args = flags_only(["--S", "7", "--m", "5", "--search_examples", "3", "--search_chunk", "2",
                        "--batch_size", "2"])
    G = tiny_layout_generator()
    gen = torch.Generator().manual_seed(7)
    items = (torch.randint(0, 5, (7, 16, 16), generator=gen),
             torch.rand((7, 3, 16, 16), generator=gen) * 2 - 1, None)
    distance = cimle.Distance("layout", "pixel", "cpu")

    def search(rank, world, outer=3):
        rt = common.Runtime(torch.device("cpu"), torch.float32, rank=rank, world_size=world)
        return cimle.outer_search(G, distance, items, outer, args, rt)[0]

    one = search(0, 1)
    table = torch.stack([torch.randn((5, 3, 16, 16), generator=cimle.code_stream(args, 3, i, "cpu"))
                         for i in range(7)])  # each example's own stream, m codes in order
    idx, _ = brute_force(G, distance, items[0], items[1], None, table)
    assert torch.equal(one, table[torch.arange(7), idx])
    monkeypatch.setattr(cimle, "gather_shares", lambda x, n, rt: x)  # keep each rank's share
    for world in (2, 3):
        for rank in range(world):
            assert torch.equal(search(rank, world), one[rank::world]), (world, rank)
    assert not torch.equal(search(0, 1, outer=4), one)  # a new outer iteration, new codes
    monkeypatch.undo()
    args.perturb = 0.5
    moved = search(0, 1) - one
    assert abs(float(moved.std()) - 0.5) < 0.05 and abs(float(moved.mean())) < 0.05
    # drawn from the stream after S's examples: the same on a resume and on every rank
    after = torch.randn(one.shape, generator=cimle.code_stream(args, 3, 7, "cpu"))
    assert torch.allclose(moved, 0.5 * after, atol=1e-6) and torch.equal(search(0, 1), one + moved)


def test_distance_weights_are_set_from_several_examples_the_same_whatever_the_chunking():
    """§3.7: lambda_i = 1 / mean of term i over the first --calibrate_examples examples of S, one
    code each (z = 0 before pretraining ends); not moved by the speed flags or the rank."""
    gen = torch.Generator().manual_seed(8)
    items = (torch.randint(0, 5, (9, 16, 16), generator=gen),
             torch.rand((9, 3, 16, 16), generator=gen) * 2 - 1,
             torch.rand((9, 1, 16, 16), generator=gen) + 0.1)
    G = tiny_layout_generator()
    vgg = random_vgg()
    weights = []
    for examples, chunk, rank, world in ((1, 1, 0, 1), (2, 3, 1, 2), (5, 2, 0, 3)):
        args = flags_only(["--S", "9", "--calibrate_examples", "6", "--search_examples",
                            str(examples), "--search_chunk", str(chunk), "--batch_size", "3"])
        distance = cimle.Distance("layout", "vgg", "cpu", vgg)
        rt = common.Runtime(torch.device("cpu"), torch.float32, rank=rank, world_size=world)
        cimle.calibrate_distance(G, distance, items, 2, False, args, rt)
        assert distance.calibrated
        weights.append(distance.weights)
    z = torch.stack([torch.randn((3, 16, 16), generator=cimle.code_stream(args, 2, i, "cpu"))
                     for i in range(6)])
    probe = cimle.Distance("layout", "vgg", "cpu", vgg)
    with torch.no_grad():
        terms = probe.terms(G(items[0][:6], z), probe.prepare(items[1][:6], items[2][:6]))
    assert len(weights[0]) == 6  # pixels + conv1_2 .. conv5_2
    for w in weights:
        assert torch.allclose(w, 1 / terms.mean(0), rtol=1e-4), (w, 1 / terms.mean(0))
    distance = cimle.Distance("layout", "vgg", "cpu", vgg)  # at the start of z = 0 pretraining
    cimle.calibrate_distance(G, distance, items, 2, True, args, rt)
    with torch.no_grad():
        zero = probe.terms(G(items[0][:6], torch.zeros_like(z)),
                           probe.prepare(items[1][:6], items[2][:6]))
    assert torch.allclose(distance.weights, 1 / zero.mean(0), rtol=1e-4)


def test_a_batch_that_cannot_be_split_over_the_processes_is_refused_at_start(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    out = tmp_path / "run"
    with pytest.raises(common.UserError) as err:  # the gta5 preset: |S~| = 1; no data there
        cimle.parse(["--data", "gta5", "--data_dir", str(tmp_path / "none"), "--out_dir",
                     str(out)])
    assert str(err.value).startswith("--batch_size 1 (Algorithm 1's |S~|")
    assert "8 processes" in str(err.value) and "python cimle.py --data gta5" in str(err.value)
    assert not out.exists()  # refused before the run folder (and any data) is touched
    with pytest.raises(common.UserError, match="--batch_size 12 .* 8 processes"):
        cimle.parse(["--data", "gta5", "--batch_size", "12", "--S", "24"])
    args = cimle.parse(["--data", "gta5", "--batch_size", "8", "--out_dir", str(out)])
    assert args.batch_size == 8 and args.S == 400


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


def test_a_blank_image_stays_out_of_the_rarity_estimation():
    """GTA-5's frame 00009062 is one colour: its mean colours would be the KDE's outliers and the
    rebalancing would draw it most; it counts no class, gets rarity 0 and moves no other score."""
    labels = torch.randint(0, 3, (6, 4, 4), generator=torch.Generator().manual_seed(0))
    images = torch.rand((6, 3, 4, 4), generator=torch.Generator().manual_seed(1)) * 2 - 1
    images[2] = -1.0                                                  # a black frame
    colours, present, count = cimle.mean_colours(images, labels, 3)
    assert not present[2].any() and not count[2].any() and present[[0, 1, 3, 4, 5]].any(1).all()
    rarity = cimle.rarity_scores(colours, present)
    keep = [0, 1, 3, 4, 5]
    alone = cimle.rarity_scores(*cimle.mean_colours(images[keep], labels[keep], 3)[:2])
    assert (rarity[2] == 0).all() and torch.allclose(rarity[keep], alone)
    assert (cimle.rarity_mask(labels[2:3], rarity[2:3]) == 0).all()   # no weight, no NaN


def test_a_class_in_few_images_takes_the_largest_rarity_of_its_image():
    """DISL's guard: a class found in <= --rarity_min_images images gets no KDE of its own (a
    near-singular one would give it rarity ~0); its pixels weigh as the image's rarest class."""
    gen = torch.Generator().manual_seed(14)
    colours = torch.rand((8, 3, 3), generator=gen, dtype=torch.float64) * 255
    present = torch.ones(8, 3, dtype=torch.bool)
    present[2:, 2] = False                         # class 2 in images 0 and 1 only
    present[1, 1] = False
    plain = cimle.rarity_scores(colours, present)
    guarded = cimle.rarity_scores(colours, present, min_images=2)
    assert torch.equal(guarded[:, :2], plain[:, :2])               # classes in > 2 images
    assert float(plain[0, 2]) < 1e-3 * float(plain[0, :2].max())   # the KDE's inversion
    for k in (0, 1):
        assert guarded[k, 2] == guarded[k, :2].max()
    assert (guarded[2:, 2] == 0).all()
    labels = torch.tensor([[[0, 1], [2, 2]]])
    assert torch.equal(cimle.rarity_mask(labels, guarded[:1])[0, 0, 1], torch.ones(2))
    alone = cimle.rarity_scores(colours[:, 2:], present[:, 2:], min_images=2)
    assert torch.equal(alone[:, 0], present[:, 2].double())  # no scored class: weight 1


def test_dataset_rebalancing_draws_by_rarity_within_the_largest_classes():
    args = flags_only(["--S", "3000", "--rebalance_classes", "2"])
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


def test_sr_generator_concatenates_z_to_the_input_and_upsamples_x8_as_asked():
    """§5.1.1: [x in [0, 1], z] -> first conv -> RRDB trunk (+ long skip) -> 3 x (up x2, conv,
    LReLU) -> HR conv, LReLU -> conv -> tanh; nearest or bilinear up-sampling as set."""
    G = tiny_sr_generator()
    lr = torch.rand(2, 3, 4, 4) * 2 - 1
    z = torch.randn(2, 2, 4, 4)
    F = torch.nn.functional

    def by_hand(mode):
        fea = G.fea_conv(torch.cat([(lr + 1) / 2, z], 1))
        fea = fea + G.trunk_conv(G.trunk(fea))
        for conv in G.up_convs:
            up = F.interpolate(fea, scale_factor=2, mode=mode,
                               **({"align_corners": False} if mode == "bilinear" else {}))
            fea = F.leaky_relu(conv(up), 0.2)
        return torch.tanh(G.out_conv(F.leaky_relu(G.hr_conv(fea), 0.2)))

    with torch.no_grad():
        for mode in ("nearest", "bilinear"):
            G.upsample_mode = mode
            out = G(lr, z)
            assert out.shape == (2, 3, 32, 32)
            assert torch.allclose(out, by_hand(mode), atol=1e-6), mode
        assert not torch.allclose(G(lr, z), G(lr, torch.zeros_like(z)))


def test_pretraining_steps_ignore_the_codes():
    """§5.1.1: while it < pretrain_iters the model is trained with z = 0, whatever the codes."""
    args = flags_only(["--task", "sr", "--size", "32", "--nf", "6", "--gc", "4", "--n_blocks",
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

class ToyGenerator(torch.nn.Module):
    """T(x, z) for a 1x1 'image': a small MLP of the code alone (one input x)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(),
                                       torch.nn.Linear(32, 3))

    def latent_shape(self, cond):
        return (1, 1, 1)

    def forward(self, cond, z):
        return self.net(z.flatten(1)).view(-1, 3, 1, 1)


def test_imle_covers_both_modes_of_a_bimodal_target():
    """What makes IMLE IMLE: one input whose targets are two colours (+1 or -1). Training each
    target's nearest of m samples towards it makes the samples cover both modes, where a
    regression on the one input would give one output."""
    args = flags_only(["--S", "32", "--m", "8", "--L", "20", "--batch_size", "8", "--lr", "0.02",
                        "--rebalance_data", "0"])
    rt = common.setup_runtime(args)
    target = torch.ones(32, 3, 1, 1)
    target[16:] = -1
    items = (torch.zeros(32, 1, 1, 1), target, None)
    torch.manual_seed(0)
    G = ToyGenerator()
    opt, sched = cimle.make_optimiser(G, args)
    distance = cimle.Distance("layout", "pixel", "cpu")
    selected = []
    for outer in range(6):
        codes, sel = cimle.outer_search(G, distance, items, outer, args, rt)
        selected.append(sel)
        for it in range(outer * args.L, (outer + 1) * args.L):
            cimle.inner_step(G, distance, opt, sched, items, codes, it, args, rt)
    with torch.no_grad():
        out = G(None, torch.randn(400, 1, 1, 1)).mean(1).flatten()
    assert selected[-1] < 0.3 * selected[0], selected
    assert (out > 0.7).float().mean() > 0.25 and (out < -0.7).float().mean() > 0.25


def test_resume_is_exact(tmp_path, monkeypatch):
    """SIGTERM after iteration 7: in the middle of outer iteration 2 (its subset, codes and
    targets come back) and of a log interval (--log_every 5: the line at 10 still averages
    steps 6-10, and still shows that outer iteration's search)."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    cimle.main(TINY_LAYOUT + ["--iters", "14", "--out_dir", full])
    step, steps = cimle.inner_step, []

    def signalled(*args, **kwargs):
        steps.append(step(*args, **kwargs))
        if len(steps) == 7:
            signal.raise_signal(signal.SIGTERM)   # as a cluster pre-empting the job
        return steps[-1]

    monkeypatch.setattr(cimle, "inner_step", signalled)
    with pytest.raises(common.Stopped):
        cimle.main(TINY_LAYOUT + ["--iters", "14", "--out_dir", part])
    monkeypatch.setattr(cimle, "inner_step", step)
    ck = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert ck["iter"] == 7 and ck["extra"]["subset"] is not None
    cimle.main(TINY_LAYOUT + ["--iters", "14", "--out_dir", part, "--resume"])
    a = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    for k, v in a["state"]["G"].items():
        assert torch.equal(v, b["state"]["G"][k]), k
    assert torch.equal(a["extra"]["codes"], b["extra"]["codes"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    timings = ("img_per_s", "search_s")
    log_a, log_b = ([{k: v for k, v in json.loads(line).items() if k not in timings}
                     for line in open(os.path.join(d, "log.jsonl"))] for d in (full, part))
    assert [r["iter"] for r in log_b] == [5, 10, 14] and "selected_distance" in log_b[1]
    assert log_a == log_b
    args = cimle.parse(TINY_LAYOUT + ["--out_dir", full, "--resume"])  # the finished run folder
    assert os.path.isfile(cimle.rarity_cache_path(args, 48))


def test_each_rank_takes_its_half_of_the_global_batch():
    args = flags_only(TINY_LAYOUT)
    gen = torch.Generator().manual_seed(9)
    items = (torch.randint(0, 5, (12, 16, 16), generator=gen),
             torch.rand((12, 3, 16, 16), generator=gen) * 2 - 1, None)
    codes = torch.randn(12, 3, 16, 16, generator=gen)
    seen = {}

    def batches(world):
        rows = []
        for rank in range(world):
            G = tiny_layout_generator()
            opt, sched = cimle.make_optimiser(G, args)
            rt = common.Runtime(torch.device("cpu"), torch.float32, rank=rank, world_size=world)
            recorder = lambda cond, z: (rows.append((cond, z)), G(cond, z))[1]  # noqa: E731
            cimle.inner_step(recorder, cimle.Distance("layout", "pixel", "cpu"), opt, sched,
                             items, codes, 5, args, rt)
        return rows

    for world in (1, 2, 4):
        seen[world] = batches(world)
        assert [len(c) for c, _ in seen[world]] == [4 // world] * world  # --batch_size 4, global
        assert torch.equal(torch.cat([c for c, _ in seen[world]]), seen[1][0][0])
        assert torch.equal(torch.cat([z for _, z in seen[world]]), seen[1][0][1])


# ---------------------------------------------------------------------------------------------
# --eval streams: the metrics of all samples at once, with memory set by one input's samples
# ---------------------------------------------------------------------------------------------

def reference_metrics(batches, d, task):
    """The metrics computed the direct way, from every sample held at once (the definitions)."""
    samples = torch.stack([s for _, _, s, _ in batches])                 # (n, k, 3, H, W)
    zero = torch.stack([z for _, _, _, z in batches])
    truth = torch.stack([it["image"] for it, _, _, _ in batches])
    n, k = samples.shape[:2]
    half = k // 2  # §5.2.6: disjoint pairs (0, 1), (2, 3), ...
    flat = samples.flatten(0, 1)
    rep = lambda t: t.unsqueeze(1).expand(n, k, *t.shape[1:]).flatten(0, 1)  # noqa: E731
    out = {"diversity_pixel_l1": d(samples[:, 0:2 * half:2].flatten(0, 1),
                                   samples[:, 1:2 * half:2].flatten(0, 1)).mean(),
           "distance_to_truth_pixel_l1": d(flat, rep(truth)).mean(),
           "zero_z_distance_to_truth_pixel_l1": d(zero, truth).mean()}
    fwv = cimle.faithfulness_weighted_variance(samples, truth, d)
    out.update({f"fwv_{s}": v for s, v in fwv.items()})
    if task == "sr":
        cond = torch.cat([c for _, c, _, _ in batches])
        down = torch.nn.functional.avg_pool2d(flat, 8).view(n, k, *cond.shape[1:])
        out["lr_consistency_l1"] = (down - cond.unsqueeze(1)).abs().mean() / 2
        return {key: float(v) for key, v in out.items()}
    items = [it for it, _, _, _ in batches]
    inst, cls, valid = (torch.stack([it[key] for it in items])
                        for key in ("instance", "inst_class", "inst_valid"))
    fid = cimle.data.shapes_colour_fidelity(flat, rep(inst), rep(cls), rep(valid))
    cov = cimle.data.shapes_mode_coverage(fid["mode"], rep(cls), fid["valid"])
    zero_fid = cimle.data.shapes_colour_fidelity(zero, inst, cls, valid)
    hit = (fid["distance"] <= cimle.data.SHAPES_MODE_TOLERANCE) & fid["valid"]
    modes = torch.nn.functional.one_hot(fid["mode"].clamp(min=0), 3) * hit.unsqueeze(-1)
    covered = modes.view(n, k, *modes.shape[1:]).amax(1).sum(-1).float()  # (n, M) modes hit
    n_modes = torch.tensor([max(len(p), 1) for p in cimle.data.SHAPES_PALETTE])[cls]
    out["per_instance_mode_coverage"] = (covered / n_modes)[valid.bool()].mean()
    out.update(in_mode=fid["in_mode"], colour_error=fid["colour_error"],
               mode_coverage_pooled=cov["coverage"], mode_tv=cov["tv"],
               zero_z_in_mode=zero_fid["in_mode"], zero_z_colour_error=zero_fid["colour_error"])
    return {key: float(v) for key, v in out.items()}, cov["counts"]


def test_streamed_eval_equals_the_metrics_of_all_samples_at_once(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    cimle.main(TINY_LAYOUT + ["--iters", "2", "--out_dir", out])
    batches = []
    stream = cimle.eval_stream

    def recorded(*a, **kw):  # the model's samples, moved towards the truth by varying amounts,
        for item, cond, samples, zero in stream(*a, **kw):  # so that some hit a palette mode
            w = torch.linspace(0, 1, len(samples)).view(-1, 1, 1, 1) ** 2
            batch = (item, cond, w * samples + (1 - w) * item["image"], item["image"] * 0.9)
            batches.append(batch)
            yield batch

    monkeypatch.setattr(cimle, "eval_stream", recorded)
    cimle.main(TINY_LAYOUT + ["--out_dir", out, "--eval", "--n_eval", "5", "--eval_samples", "5",
                              "--search_examples", "1", "--search_chunk", "2"])
    got = json.load(open(os.path.join(out, "eval.json")))
    assert len(batches) == 5 and all(s.shape[0] == 5 for _, _, s, _ in batches)
    assert not torch.equal(batches[0][2][0], batches[0][2][1])  # samples differ within an input
    want, counts = reference_metrics(batches, lambda a, b: (a - b).abs().flatten(1).mean(1) / 2,
                                     "layout")
    for key, value in want.items():
        saved = got["faithfulness_weighted_variance"][key[4:]] if key.startswith("fwv_") \
            else got[key]
        assert math.isclose(saved, value, rel_tol=1e-5, abs_tol=1e-7), key
    assert got["mode_counts"] == counts
    assert 0 < got["in_mode"] < 1 and 0 < got["per_instance_mode_coverage"] < 1


def test_eval_memory_does_not_grow_with_the_number_of_inputs(tmp_path):
    out = str(tmp_path / "run")
    cimle.main(TINY_LAYOUT + ["--iters", "1", "--out_dir", out])

    def peak(n):
        with cimle.PeakMemory() as pm:
            cimle.main(TINY_LAYOUT + ["--out_dir", out, "--eval", "--n_eval", str(n),
                                      "--eval_samples", "6"])
        assert json.load(open(os.path.join(out, "eval.json")))["n_inputs"] == n
        return pm.peak

    small, large = peak(3), peak(12)
    assert large <= 1.02 * small, (small, large)


def test_compiled_training_step_gives_the_eager_losses(tmp_path):
    """--compile compiles the generator of the inner steps (the search runs it eagerly, no grad)."""
    base = TINY_LAYOUT + ["--iters", "3", "--log_every", "1", "--L", "2", "--n_train", "12",
                          "--rebalance_data", "0"]
    logs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
        torch._dynamo.reset()
        out = str(tmp_path / name)
        cimle.main(base + extra + ["--out_dir", out])
        logs[name] = [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]
    assert len(logs["compiled"]) == 3 and logs["eager"][0] != logs["eager"][2]
    assert np.allclose(logs["compiled"], logs["eager"], rtol=1e-4, atol=1e-6), logs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile


def test_bench_times_inner_steps_and_the_search_offline_under_the_asked_dtype(tmp_path,
                                                                              monkeypatch):
    """--bench N: N inner steps (the training loop's own, on one fixed mini-batch) through
    common.bench_training (float32 eager, then --dtype) and select_latents vs the naive search
    in one bench.json; the paper's VGG distance without the download (--pretrained 0)."""
    out = str(tmp_path / "bench")
    steps = []
    real = cimle.inner_step
    monkeypatch.setattr(cimle, "inner_step", lambda *a: steps.append(a[6]) or real(*a))
    searches = []
    real_search = cimle.outer_search
    monkeypatch.setattr(cimle, "outer_search", lambda *a: searches.append(a) or real_search(*a))
    cimle.main(["--data", "folder", "--pretrained", "0", "--size", "16", "--nf", "4", "--gc", "4",
                "--n_blocks", "1", "--S", "3", "--candidates", "4", "--batch_size", "2",
                "--search_examples", "2", "--search_chunk", "3", "--bench", "2", "--dtype",
                "bfloat16", "--search_dtype", "float32", "--L", "2", "--out_dir", out])
    p = 150_000  # the preset's pretrain_iters: the steps timed are IMLE steps
    assert set(steps[:-3]) == {p} and len(steps) >= 3 + 2 * (3 + 2)  # 3 warm-up + 2 timed, twice
    assert steps[-3:] == [p, p, p + 1]  # the outer iteration: 1 warm-up step, then min(N, L) = 2
    assert len(searches) == 2  # the outer iteration: one warm-up round, one timed
    result = json.load(open(os.path.join(out, "bench.json")))
    rows = result["training"]["bench"]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    assert result["training"]["batch_size"] == 2 and result["training"]["size"] == 16
    outer = result["outer_iteration"]
    assert (outer["L"], outer["inner_steps_timed"], outer["chunk"]) == (2, 2, 3)
    assert (outer["dtype"], outer["search_dtype"]) == ("bfloat16", "float32")
    assert math.isclose(sum(outer["share"].values()), 1, abs_tol=1e-3) and outer["targets_cached"]
    assert math.isclose(sum(outer["seconds"].values()), outer["outer_s"], abs_tol=2e-3)
    search = result["search"]
    assert search["same_indices"] and search["dtype"] == "float32"
    assert (search["S"], search["m"], search["distance"]) == (3, 4, "vgg")


def test_dry_run_flops_are_the_inner_steps_and_the_benchs(tmp_path, capsys):
    """--dry_run's FLOPs per training image (training_flops, counted on the meta device) equal
    common.count_flops of a real inner step on the CPU, per image: layouts with the VGG distance,
    the CRN baseline's hindsight loss, SR; and --bench's training row. The
    target's features are cached (prepare_subset), so a step does not pay for them."""
    cpu = torch.device("cpu")
    small = ["--size", "16", "--crn_channels", "8,8,8", "--encoder_channels", "4",
             "--noise_channels", "3", "--S", "5", "--batch_size", "2", "--crn_images", "3"]
    for argv in (["--data", "gta5"] + small, ["--data", "gta5", "--baseline", "crn"] + small,
                 ["--data", "folder", "--size", "16", "--nf", "4", "--gc", "4", "--n_blocks", "1",
                  "--S", "3", "--batch_size", "2"]):
        args = flags_only(argv)
        rt = common.setup_runtime(args)
        items = cimle.bench_inputs(args, args.S, cpu)
        G = cimle.build_generator(args)
        codes = torch.randn((args.S, *G.latent_shape(items[0])))
        distance = cimle.make_distance(args, cpu, pretrained=False)
        opt, sched = cimle.make_optimiser(G, args)
        cache = cimle.prepare_subset(distance, items, args, rt)
        real = common.count_flops(lambda: cimle.inner_step(
            G, distance, opt, sched, items, codes, args.pretrain_iters, args, rt, cache))
        assert cimle.training_flops(args) * args.batch_size == real > 0, argv
    cimle.main(["--data", "gta5", "--dry_run"])
    assert "training: 6,771.5 GFLOP per image" in capsys.readouterr().out  # 256x512, README
    out = str(tmp_path / "bench")
    cimle.main(["--data", "folder", "--pretrained", "0", "--size", "16", "--nf", "4", "--gc", "4",
                "--n_blocks", "1", "--S", "2", "--m", "2", "--batch_size", "2", "--L", "1",
                "--search_examples", "1", "--bench", "1", "--out_dir", out])
    bench = json.load(open(os.path.join(out, "bench.json")))["training"]
    assert bench["gflops_per_img"] == common.significant(cimle.training_flops(args) / 1e9)


def test_checkpoints_of_another_method_or_network_are_refused(tmp_path):
    out = str(tmp_path / "run")
    cimle.main(TINY_LAYOUT + ["--iters", "1", "--out_dir", out])
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert "bench" not in ck["config"] and "resume" not in ck["config"]  # run-mode flags
    assert ck["config"]["noise_encoder"] == 1
    with pytest.raises(common.UserError, match="--noise_encoder 1 \\(asked: 0\\)"):
        cimle.main(TINY_LAYOUT + ["--out_dir", out, "--sample", "--noise_encoder", "0"])
    with pytest.raises(common.UserError, match="--crn_channels 8,8,8,8 \\(asked: 8,8,8,6\\)"):
        cimle.main(TINY_LAYOUT + ["--out_dir", out, "--resume", "--iters", "2",
                                  "--crn_channels", "8,8,8,6"])
    ck["method"] = "inade"
    torch.save(ck, os.path.join(out, "ckpt.pt"))
    with pytest.raises(common.UserError, match="written by inade, not cimle.py"):
        cimle.main(TINY_LAYOUT + ["--out_dir", out, "--eval"])


def test_lpips_backbone_flag_reaches_the_metric(monkeypatch):
    """--lpips_net: the paper names no backbone; the authors' evaluation script used vgg."""
    built = []

    class StandIn(torch.nn.Module):
        def __init__(self, net, pretrained):
            super().__init__()
            built.append((net, pretrained))

        def forward(self, a, b):
            return (a - b).abs().flatten(1).mean(1)

    monkeypatch.setattr(common, "LPIPS", StandIn)
    for net in ("alex", "vgg"):
        args = flags_only(["--pretrained", "1", "--lpips_net", net])
        name, _ = cimle.make_metric_distance(args, "cpu")
        assert name == "lpips" and built[-1] == (net, True)


def test_the_z0_baseline_is_evaluated_with_z0(tmp_path):
    """--pretrain_iters >= --iters trains the deterministic regression; --eval samples it as
    trained (z = 0): no diversity, every sample the z = 0 output."""
    out = str(tmp_path / "run")
    flags = TINY_LAYOUT + ["--out_dir", out, "--pretrain_iters", "2"]
    cimle.main(flags + ["--iters", "2"])
    cimle.main(flags + ["--eval", "--n_eval", "2", "--eval_samples", "4"])  # --iters not given
    got = json.load(open(os.path.join(out, "eval.json")))
    assert got["z"].startswith("zero") and got["diversity_pixel_l1"] == 0
    assert got["distance_to_truth_pixel_l1"] == pytest.approx(
        got["zero_z_distance_to_truth_pixel_l1"], rel=1e-6)
    # --sample draws it as trained too: every sample of an input the same, every frame alike
    cimle.main(flags + ["--sample"])
    for name in ("many_samples.png", "interpolation.png"):
        grid = np.asarray(Image.open(os.path.join(out, name)), dtype=np.float64)
        cell = grid.shape[0] // (6 if name == "many_samples.png" else 3)  # rows of the grid
        first = 2 if name == "many_samples.png" else 1      # the input (and target) columns
        tiles = [grid[:cell, c * cell:(c + 1) * cell] for c in range(first, grid.shape[1] // cell)]
        assert len(tiles) > 2 and all(np.array_equal(t, tiles[0]) for t in tiles), name


def test_a_flat_folders_test_split_is_the_runs_own(tmp_path):
    """A flat folder's test split is its last --n_eval images: --resume, --sample and --eval with
    another --n_eval would train on test images or score training images as unseen; refused."""
    root, out = str(tmp_path / "imnet"), str(tmp_path / "run")
    fake_image_folder(root)
    flags = ["--data", "folder", "--data_dir", root, "--size", "32", "--nf", "8", "--gc", "4",
             "--n_blocks", "1", "--S", "2", "--m", "2", "--L", "2", "--batch_size", "2",
             "--pretrain_iters", "0", "--bilinear_from", "0", "--distance", "pixel",
             "--pretrained", "0", "--eval_samples", "2", "--out_dir", out]
    cimle.main(flags + ["--iters", "1", "--n_eval", "2"])
    for extra in (["--iters", "2", "--resume"], ["--sample"], ["--eval"]):
        with pytest.raises(common.UserError, match=r"held out the last 2 images of --data_dir "
                                                   r".* pass --n_eval 2 so that"):
            cimle.main(flags + extra + ["--n_eval", "1"])
    cimle.main(flags + ["--eval", "--n_eval", "2"])
    # too few training images for the mini-batch: one sentence, not a shape error mid-step
    with pytest.raises(common.UserError, match="3 training images cannot fill a mini-batch of "
                                               "--batch_size 4"):
        cimle.main(flags[:-1] + [str(tmp_path / "run2"), "--iters", "1", "--n_eval", "3",
                                 "--batch_size", "4", "--S", "4"])


def test_the_targets_of_S_do_not_depend_on_the_data_workers(tmp_path):
    """The folder set's random flips of an outer iteration's targets come from per-item seeds:
    the same targets with or without data workers (--num_workers is not a resume key)."""
    root = str(tmp_path / "imnet")
    fake_image_folder(root)
    args = flags_only(["--data", "folder", "--data_dir", root, "--size", "32", "--n_eval", "1"])
    ds = cimle.load_data(args)
    indices = torch.arange(len(ds)).repeat(2)           # each image twice: flips differ by slot
    got = {}
    for workers in (0, 2):
        args.num_workers = workers
        got[workers] = cimle.gather_items(ds, indices, args, None, outer=3)[1]
    assert torch.equal(got[0], got[2])
    flipped = [not torch.equal(a, b) for a, b in zip(got[0][:len(ds)], got[0][len(ds):])]
    assert any(flipped)                                  # the flips are really drawn
    args.num_workers = 0
    assert not torch.equal(cimle.gather_items(ds, indices, args, None, outer=4)[1], got[0])


def test_the_rarity_cache_goes_to_the_run_folder_when_the_dataset_is_read_only(tmp_path,
                                                                             monkeypatch):
    """Beside the dataset when that folder is writable or already holds it; otherwise (a shared
    read-only copy) in the run folder, not a permission error after the whole rarity pass."""
    args = flags_only(["--data", "gta5", "--data_dir", str(tmp_path / "gta"), "--out_dir",
                       str(tmp_path / "run")])
    os.makedirs(args.data_dir)
    beside = cimle.rarity_cache_path(args, 8)
    assert os.path.dirname(beside) == args.data_dir
    monkeypatch.setattr(cimle.os, "access", lambda path, mode: False)   # read-only (even root)
    assert os.path.dirname(cimle.rarity_cache_path(args, 8)) == args.out_dir
    open(beside, "wb").close()                                           # computed there before
    assert cimle.rarity_cache_path(args, 8) == beside


# ---------------------------------------------------------------------------------------------
# Bad input: one sentence, exit status 2
# ---------------------------------------------------------------------------------------------

def test_bad_input_is_one_sentence_and_exit_2(tmp_path, capsys):
    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(lambda: cimle.main(["--data", "gta5", "--data_dir", missing, "--out_dir",
                                            str(tmp_path / "o")]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and missing in err and len(err.strip().splitlines()) == 1
    with pytest.raises(common.UserError, match="no checkpoint"):
        cimle.main(["--sample", "--out_dir", str(tmp_path / "none")])


BAD_FLAGS = [  # argv, words of the sentence; each refused before the run folder is made
    (["--S", "0"], "--S must be at least 1"),
    (["--m", "0"], "--m (--candidates), the latent codes drawn per example, must be at least 1"),
    (["--candidates", "-2"], "--m (--candidates)"),
    (["--L", "0"], "--L must be at least 1"),
    (["--search_chunk", "-1"], "--search_chunk must be at least 0"),
    (["--crn_images", "0"], "--crn_images must be at least 1"),
    (["--task", "sr", "--baseline", "crn"], "it exists for --task layout only"),
    (["--reinit_encoder_at", "5", "--noise_encoder", "0"], "it needs --noise_encoder 1"),
    (["--reinit_encoder_at", "-1"], "--reinit_encoder_at must be at least 0"),
    (["--search_examples", "-1"], "--search_examples must be at least 1"),
    (["--S", "3", "--batch_size", "2"], "--S 3 must be at least --rebalance_classes 5"),
    (["--data", "gta5", "--S", "4"], "--S 4 must be at least --rebalance_classes 5"),
    (["--rebalance_classes", "0"], "--rebalance_classes must be at least 1"),
    (["--batch_size", "100", "--S", "10"], "must not exceed --S 10"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lr_gamma", "-1"], "--lr_gamma must be a positive number"),
    (["--lr_milestones", "5,x"], "--lr_milestones must be comma-separated integers"),
    (["--lr_milestones", "0,10"], "--lr_milestones must be iterations >= 1"),
    (["--pretrain_iters", "-1"], "--pretrain_iters must be at least 0"),
    (["--bilinear_from", "-5"], "--bilinear_from must be at least 0"),
    (["--n_train", "-1"], "--n_train must be at least 0"),
    (["--perturb", "-0.1"], "--perturb must be at least 0"),
    (["--reject", "-1"], "--reject must be at least 0"),
    (["--n_eval", "0", "--eval"], "--n_eval must be at least 1"),
    (["--eval_samples", "1", "--eval"], "--eval_samples must be at least 2"),
    (["--noise_channels", "0"], "--noise_channels must be at least 1"),
    (["--encoder_channels", "0"], "--encoder_channels must be at least 1"),
    (["--crn_channels", "8,0,8,8"], "--crn_channels must be positive widths"),
    (["--crn_channels", "8,8,8,8,8,8"], "6 modules do not fit --size 32"),
    (["--size", "36"], "--size must be a multiple of 8"),
    (["--task", "sr", "--nf", "0"], "--nf must be at least 1"),
    (["--task", "sr", "--gc", "0"], "--gc must be at least 1"),
    (["--task", "sr", "--z_channels", "0"], "--z_channels must be at least 1"),
    (["--task", "sr", "--n_blocks", "0"], "--n_blocks must be at least 1"),
    (["--task", "layout", "--data", "folder"], "--task layout is not available on --data folder"),
    (["--distance", "official"], "it exists for --task sr only"),
    (["--distance", "vgg", "--pretrained", "0"], "needs the pretrained VGG-19"),
]


def test_every_out_of_range_flag_is_one_sentence_exit_2_before_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    for argv, words in BAD_FLAGS:
        with pytest.raises(SystemExit) as exit_info:
            common.run_main(lambda: cimle.main(argv + ["--out_dir", str(out)]))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, argv
        assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1, (argv,
                                                                                        err)
        assert err.rstrip().endswith("."), err
        assert not out.exists(), argv


# ---------------------------------------------------------------------------------------------
# The paper presets under torchrun, on fake data in the official layouts, then resume/sample/eval
# ---------------------------------------------------------------------------------------------

def stand_in_weights(home):
    """Random-weight VGG-19 and LPIPS (alex) files at the torch hub cache paths, marked as checked
    (a stand-in cannot have the official SHA-256)."""
    folder = os.path.join(home, "hub", "checkpoints")
    os.makedirs(folder)
    lpips = common.LPIPS(net="alex", pretrained=False).state_dict()
    url, sha256 = common.LPIPS_NETS["alex"][:2]
    files = [(common.VGG19(pretrained=False).state_dict(), os.path.basename(common.VGG19_URL),
              "dcbb9e9d"),
             ({k: v for k, v in lpips.items() if k.startswith("features.")},
              os.path.basename(url), sha256),
             ({k: v for k, v in lpips.items() if k.startswith("lin")}, "lpips_v0.1_alex.pth",
              common.LPIPS_LIN_SHA256["alex"])]
    for state, name, prefix in files:
        torch.save(state, os.path.join(folder, name))
        common.write_marker(os.path.join(folder, name), prefix)


def fake_gta5_train(root):
    """tests/test_data.py's fake GTA-5 (RGB256Full/, Label256Full/, 2 train + 2 test images),
    plus mirrored copies as train images 3-6."""
    fake_gta5(root, np.random.default_rng(0))
    for k in range(3, 7):
        for folder in ("RGB256Full", "Label256Full"):
            img = Image.open(os.path.join(root, folder, f"{1 + k % 2:08d}.png"))
            img = img.transpose(Image.FLIP_LEFT_RIGHT if k < 5 else Image.FLIP_TOP_BOTTOM)
            img.save(os.path.join(root, folder, f"{k:08d}.png"))


def fake_image_folder(root):
    """The SR set: a flat folder of images (an ImageNet synset), 6 random-blob PNGs of 96x80."""
    rng = np.random.default_rng(1)
    os.makedirs(root)
    for k in range(6):
        img = np.full((80, 96, 3), rng.integers(0, 256, 3), np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, 64, 2)
            img[y:y + 16, x:x + 24] = rng.integers(0, 256, 3)
        Image.fromarray(img).save(os.path.join(root, f"n0000_{k}.png"))


def test_a_flat_image_folder_holds_out_its_last_images_scaled_whole(tmp_path):
    """§5.1.2: 1,280 training and 80 disjoint test images, each scaled anisotropically to
    256x256 (not centre-cropped): a flat folder keeps its last --n_eval images for testing."""
    root = str(tmp_path / "imnet")
    fake_image_folder(root)
    args = flags_only(["--data", "folder", "--data_dir", root, "--size", "64", "--n_eval", "2"])
    train, test = cimle.load_data(args), cimle.load_data(args, "test")
    names = [[r["name"] for r in ds.records] for ds in (train, test)]
    assert len(train) == 4 and len(test) == 2 and not set(names[0]) & set(names[1])
    path = [r["image"] for r in test.records][0]
    whole = Image.open(path).convert("RGB").resize((64, 64), Image.BICUBIC)
    whole = torch.from_numpy(np.array(whole)).permute(2, 0, 1).float() / 127.5 - 1
    assert (test[0]["image"] - whole).abs().mean() < 0.03


PRESET_RUNS = {  # preset structure kept; widths, |S|, m, L, |S~| and the step counts shrunk
    "gta5": (fake_gta5_train, [  # 32x64; CRN modules from 4 px high, so 4 of them at 32
        "--size", "32", "--crn_channels", "8,8,8,8", "--encoder_channels", "4", "--S", "5",
        "--candidates", "2", "--L", "3", "--batch_size", "2"], 3, False),
    "folder": (fake_image_folder, [  # x8 SR, 32x32 from 4x4; z = 0 pretraining, IMLE, bilinear
        "--size", "32", "--nf", "8", "--gc", "4", "--n_blocks", "1", "--S", "4",
        "--candidates", "2", "--L", "2", "--batch_size", "2", "--pretrain_iters", "1",
        "--bilinear_from", "3"], 4, True),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("torch"))
    stand_in_weights(home)
    return home


@pytest.mark.parametrize("preset", list(PRESET_RUNS))
def test_paper_preset_resumes_exactly_then_samples_and_evaluates(preset, tmp_path, monkeypatch,
                                                                 torch_home):
    """The paper presets on fake data in the official layouts: 2 steps (folder: under torchrun,
    each rank half the batch), then --resume in the middle of an outer iteration (the folder
    set's flips redrawn), give one process's losses; then --sample and --eval (LPIPS)."""
    write, flags, iters, launch = PRESET_RUNS[preset]
    root = str(tmp_path / "data")
    write(root)
    monkeypatch.setenv("TORCH_HOME", torch_home)  # here and in the subprocesses
    flags = ["--data", preset, "--data_dir", root, "--device", "cpu", "--log_every", "1",
             "--n_eval", "2", "--eval_samples", "2"] + flags

    def losses(out):
        return [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    cimle.main(flags + ["--iters", str(iters), "--out_dir", one])  # one process, whole batch
    if launch:  # the environment torchrun --nproc_per_node=2 gives its two processes
        port = str(free_port())
        procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "cimle.py")] + flags
                                  + ["--iters", "2", "--out_dir", two], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank),
                                           LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                 for rank in range(2)]
        for proc in procs:
            output = proc.communicate(timeout=300)[0]
            assert proc.returncode == 0, output[-3000:]
    else:
        cimle.main(flags + ["--iters", "2", "--out_dir", two])
    assert not cimle.new_outer(2, flags_only(flags))  # the resume lands mid outer iteration
    cimle.main(flags + ["--iters", str(iters), "--out_dir", two, "--resume"])
    assert len(set(losses(one))) == iters
    assert np.allclose(losses(two), losses(one), rtol=1e-4, atol=1e-7), (losses(two), losses(one))
    cimle.main(flags + ["--out_dir", two, "--sample"])
    for name in ("many_samples.png", "interpolation.png", "one_latent_many_inputs.png"):
        assert os.path.getsize(os.path.join(two, name)) > 0
    trained = cimle.parse(flags + ["--out_dir", two, "--sample"])
    G, _, regression = cimle.load_model(trained, "cpu")
    assert G.upsample_mode == ("bilinear" if preset == "folder" else "nearest") and not regression
    cimle.main(flags + ["--out_dir", two, "--eval"])
    result = json.load(open(os.path.join(two, "eval.json")))
    assert result["metric_distance"] == "lpips" and result["n_inputs"] == 2
    assert result["lpips_net"] == "alex"
    assert result["diversity_lpips"] > 0 and math.isfinite(result["distance_to_truth_lpips"])


# ---------------------------------------------------------------------------------------------
# Released weights (--init_from): SRIM's generators (niopeng/SRIM-pytorch), without the files
# ---------------------------------------------------------------------------------------------

# The official IMRRDBNet's state_dict at nf 8, gc 4, nb 1, z 5 (x8), as the official code names
# and shapes it: every key, in order. The z-free RRDBNet differs only in model.0.weight (8, 3).
SRIM_TINY_KEYS = """
model.0.weight 8,8,3,3 | model.0.bias 8
model.1.sub.0.RDB1.conv1.0.weight 4,8,3,3 | model.1.sub.0.RDB1.conv1.0.bias 4
model.1.sub.0.RDB1.conv2.0.weight 4,12,3,3 | model.1.sub.0.RDB1.conv2.0.bias 4
model.1.sub.0.RDB1.conv3.0.weight 4,16,3,3 | model.1.sub.0.RDB1.conv3.0.bias 4
model.1.sub.0.RDB1.conv4.0.weight 4,20,3,3 | model.1.sub.0.RDB1.conv4.0.bias 4
model.1.sub.0.RDB1.conv5.0.weight 8,24,3,3 | model.1.sub.0.RDB1.conv5.0.bias 8
model.1.sub.0.RDB2.conv1.0.weight 4,8,3,3 | model.1.sub.0.RDB2.conv1.0.bias 4
model.1.sub.0.RDB2.conv2.0.weight 4,12,3,3 | model.1.sub.0.RDB2.conv2.0.bias 4
model.1.sub.0.RDB2.conv3.0.weight 4,16,3,3 | model.1.sub.0.RDB2.conv3.0.bias 4
model.1.sub.0.RDB2.conv4.0.weight 4,20,3,3 | model.1.sub.0.RDB2.conv4.0.bias 4
model.1.sub.0.RDB2.conv5.0.weight 8,24,3,3 | model.1.sub.0.RDB2.conv5.0.bias 8
model.1.sub.0.RDB3.conv1.0.weight 4,8,3,3 | model.1.sub.0.RDB3.conv1.0.bias 4
model.1.sub.0.RDB3.conv2.0.weight 4,12,3,3 | model.1.sub.0.RDB3.conv2.0.bias 4
model.1.sub.0.RDB3.conv3.0.weight 4,16,3,3 | model.1.sub.0.RDB3.conv3.0.bias 4
model.1.sub.0.RDB3.conv4.0.weight 4,20,3,3 | model.1.sub.0.RDB3.conv4.0.bias 4
model.1.sub.0.RDB3.conv5.0.weight 8,24,3,3 | model.1.sub.0.RDB3.conv5.0.bias 8
model.1.sub.1.weight 8,8,3,3 | model.1.sub.1.bias 8
model.3.weight 8,8,3,3 | model.3.bias 8
model.6.weight 8,8,3,3 | model.6.bias 8
model.9.weight 8,8,3,3 | model.9.bias 8
model.11.weight 8,8,3,3 | model.11.bias 8
model.13.weight 3,8,3,3 | model.13.bias 3
"""
# The released configuration (nf 64, gc 128, nb 24; z 5 for code_81_480000_G.pth): 734 keys,
# 109,055,043 parameters (109,052,163 z-free); SHA-256 of the sorted "name (shape)" lines.
SRIM_RELEASED_SHA256 = {5: "2d1ac75ad1b84b26ee971ed582b1c1f055ac2fe3fbcc5aa7b873663c6abcb99d",
                        0: "4a9b43c0f5c09c7a5de690d462257cab7dd4132f641d62c9fb523d56b6ca16d5"}


def srim_tiny_shapes(z=5):
    pairs = [p.split() for line in SRIM_TINY_KEYS.strip().splitlines() for p in line.split("|")]
    shapes = {name: tuple(int(v) for v in dims.split(",")) for name, dims in pairs}
    shapes["model.0.weight"] = (8, 3 + z, 3, 3)
    return shapes


def fake_srim_file(path, z=5, seed=0, legacy=True):
    """A stand-in for a released *_G.pth: the official keys and shapes, random values, saved as
    SRIM's save_network does (plain state_dict; legacy serialisation, as the 2019 files)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=gen) / math.sqrt(math.prod(s[1:]) if len(s) > 1 else 25)
             for k, s in srim_tiny_shapes(z).items()}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return state


def srim_official_forward(sd, lr01, z, last_act, mode="nearest"):
    """SRIM's IMRRDBNet (RRDBNet when z is None) written from the official key names: LR in
    [0, 1] -> [0, 1]; tanh outputs are mapped by (t + 1) / 2 as the official forward does."""
    F = torch.nn.functional

    def conv(x, key):
        return F.conv2d(x, sd[key + ".weight"], sd[key + ".bias"], padding=1)

    nb = len({k.split(".")[3] for k in sd if ".RDB" in k})
    fea = conv(lr01 if z is None else torch.cat([lr01, z], 1), "model.0")
    h = fea
    for b in range(nb):
        block_in = h
        for r in (1, 2, 3):
            feats = [h]
            for c in (1, 2, 3, 4):
                feats.append(F.leaky_relu(conv(torch.cat(feats, 1),
                                               f"model.1.sub.{b}.RDB{r}.conv{c}.0"), 0.2))
            h = 0.2 * conv(torch.cat(feats, 1), f"model.1.sub.{b}.RDB{r}.conv5.0") + feats[0]
        h = 0.2 * h + block_in
    h = fea + conv(h, f"model.1.sub.{nb}")
    for key in ("model.3", "model.6", "model.9"):
        h = F.leaky_relu(conv(F.interpolate(h, scale_factor=2, mode=mode), key), 0.2)
    h = conv(F.leaky_relu(conv(h, "model.11"), 0.2), "model.13")
    return torch.sigmoid(h) if last_act == "sigmoid" else (torch.tanh(h) + 1) / 2


def test_the_official_key_names_and_shapes_map_onto_ours_at_small_and_released_sizes():
    """The key mapping covers SRIM's state_dict exactly (names and shapes), at a small config and,
    by digest, at the released one (734 keys, 109,055,043 parameters)."""
    import hashlib
    official = srim_tiny_shapes()
    ours = {k: tuple(v.shape) for k, v in cimle.SRGenerator(5, 8, 4, 1).state_dict().items()}
    key_map = cimle.srim_key_map(1)
    mapped = {f"{key_map[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": s
              for k, s in official.items()}
    assert len(official) == len(ours) == 44 and mapped == ours
    assert cimle.srim_architecture({k: torch.empty(s) for k, s in official.items()}, "f") == dict(
        nf=8, gc=4, n_blocks=1, z_channels=5)
    for z in (5, 0):
        with torch.device("meta"):
            G = cimle.SRGenerator(5, 64, 128, 24)
        back = {v: k for k, v in cimle.srim_key_map(24).items()}
        shapes = {f"{back[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": tuple(v.shape)
                  for k, v in G.state_dict().items()}
        shapes["model.0.weight"] = (64, 3 + z, 3, 3)
        text = "\n".join(f"{k} {s}" for k, s in sorted(shapes.items()))
        assert hashlib.sha256(text.encode()).hexdigest() == SRIM_RELEASED_SHA256[z]
        assert len(shapes) == 734
        assert sum(math.prod(s) for s in shapes.values()) == (109_055_043 if z else 109_052_163)


@pytest.mark.parametrize("last_act", ["sigmoid", "tanh"])
def test_a_released_file_loads_strictly_and_computes_the_official_function(last_act, tmp_path):
    """A fake file with the official keys -> --init_from's conversion -> our generator computes
    SRIM's forward (written from the official names) on the same LR input and z; a couple of
    tensors converted by hand. --init_last_act picks the activation it was trained with."""
    path = str(tmp_path / "code_G.pth")
    official = fake_srim_file(path)
    args = flags_only(["--task", "sr", "--init_from", path, "--init_last_act", last_act])
    assert (args.nf, args.gc, args.n_blocks, args.z_channels) == (8, 4, 1, 5)
    G = cimle.build_generator(args).eval()
    assert cimle.load_released(G, args) is False  # a net with z: not the z = 0 baseline
    half = 0.5 if last_act == "sigmoid" else 1.0  # sigmoid(a) = (1 + tanh(a / 2)) / 2
    assert torch.equal(G.out_conv.weight, official["model.13.weight"] * half)
    assert torch.equal(G.trunk[0].blocks[2].convs[4].bias,
                       official["model.1.sub.0.RDB3.conv5.0.bias"])
    assert torch.equal(G.up_convs[1].weight, official["model.6.weight"])
    gen = torch.Generator().manual_seed(3)
    lr01, z = torch.rand(2, 3, 4, 4, generator=gen), torch.randn(2, 5, 4, 4, generator=gen)
    with torch.no_grad():
        for mode in ("nearest", "bilinear"):
            G.upsample_mode = mode
            want = srim_official_forward(official, lr01, z, last_act, mode)
            assert (want.std() > 0.05) and torch.allclose((G(lr01 * 2 - 1, z) + 1) / 2, want,
                                                          atol=1e-5), mode
    kept = {k: v.clone() for k, v in official.items()}
    cimle.convert_srim(official, last_act)
    assert all(torch.equal(v, kept[k]) for k, v in official.items())  # a pure function
    default = flags_only(["--task", "sr", "--init_from", path])
    G = cimle.build_generator(default)
    cimle.load_released(G, default)  # a file with z was written by SRIM's sigmoid config
    assert torch.equal(G.out_conv.bias, official["model.13.bias"] / 2)


def test_the_z_free_net_is_widened_for_z_as_srim_does(tmp_path):
    """blank_*_G.pth (no z): the RGB columns of the first conv are the file's, the z columns
    N(0, 0.03^2) drawn from --seed; at z = 0 it is the official z-free net (tanh); it is sampled
    and evaluated as the z = 0 baseline."""
    path = str(tmp_path / "blank_G.pth")
    official = fake_srim_file(path, z=0)
    args = flags_only(["--data", "folder", "--init_from", path])
    assert (args.nf, args.gc, args.n_blocks, args.z_channels) == (8, 4, 1, 5)  # z: the preset's
    G = cimle.build_generator(args).eval()
    assert cimle.load_released(G, args) is True
    first = G.fea_conv.weight.detach()
    assert first.shape == (8, 8, 3, 3) and torch.equal(first[:, :3], official["model.0.weight"])
    assert 0.02 < first[:, 3:].std() < 0.04
    again = cimle.build_generator(args)
    cimle.load_released(again, args)
    assert torch.equal(again.fea_conv.weight, first)  # reproducible from --seed
    lr01 = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = srim_official_forward(official, lr01, None, "tanh")
        got = (G(lr01 * 2 - 1, torch.zeros(2, 5, 4, 4)) + 1) / 2
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(G(lr01, torch.randn(2, 5, 4, 4)), G(lr01, torch.zeros(2, 5, 4, 4)))


def test_released_files_of_another_kind_and_contradicting_flags_are_refused(tmp_path, capsys):
    """One sentence, exit 2, before any data or model: another family's file, an x4 RRDB, this
    project's own checkpoint, a file that needs pickle code, no file, a TensorFlow checkpoint, the
    layout task, and flags that contradict the file."""
    import argparse
    import re
    code = str(tmp_path / "code_G.pth")
    fake_srim_file(code)
    files = {}
    files["vgg"] = common.VGG19(pretrained=False).state_dict()  # another family's file
    x4 = {k: torch.zeros(s) for k, s in srim_tiny_shapes().items() if not k.startswith("model.9")}
    x4["model.8.weight"], x4["model.8.bias"] = x4.pop("model.11.weight"), x4.pop("model.11.bias")
    x4["model.10.weight"], x4["model.10.bias"] = x4.pop("model.13.weight"), x4.pop("model.13.bias")
    files["x4"] = x4
    files["ours"] = {"method": "cimle", "config": {}, "state": {}}
    files["pickled"] = dict(torch.load(code, weights_only=True), opt=argparse.Namespace(lr=1))
    for name, state in files.items():
        torch.save(state, str(tmp_path / f"{name}.pth"))
    (tmp_path / "model.ckpt-160000.index").write_bytes(b"\x00tf-index-not-a-torch-file" * 8)
    cases = [
        (["--init_from", str(tmp_path / "vgg.pth")], "is not a released SRIM generator"),
        (["--init_from", str(tmp_path / "x4.pth")],
         "layers model.\\{3, 6, 8, 10\\} after the trunk, not SRIM's x8"),
        (["--init_from", str(tmp_path / "ours.pth")], "is a checkpoint of this project"),
        (["--init_from", str(tmp_path / "pickled.pth")], "needs Python pickle code"),
        (["--init_from", str(tmp_path / "none.pth")], "no such file"),
        (["--init_from", str(tmp_path / "model.ckpt-160000.index")], "TensorFlow 1"),
        (["--init_from", code, "--data", "gta5"], "SRIM's x8 super-resolution generators"),
        (["--init_from", code, "--task", "layout"], "TensorFlow 1 checkpoint"),
        (["--init_from", code, "--task", "sr", "--nf", "16", "--n_blocks", "1"],
         "with --nf 8 --gc 4 --n_blocks 1 --z_channels 5, which contradicts --nf 16: leave"),
        (["--init_from", code, "--task", "sr", "--z_channels", "3"], "contradicts --z_channels 3"),
    ]
    for argv, sentence in cases:
        out = tmp_path / "o"
        with pytest.raises(SystemExit) as exit_info:
            common.run_main(lambda: cimle.main(argv + ["--sample", "--out_dir", str(out)]))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err, argv
        assert len(err.strip().splitlines()) == 1 and re.search(sentence, err), (argv, err)
        assert not out.exists(), argv


def test_sample_and_eval_from_released_weights_need_no_checkpoint(tmp_path):
    """--sample / --eval --init_from: the grids and eval.json, no ckpt.pt anywhere; the z-free
    net is evaluated with z = 0 as trained."""
    root = str(tmp_path / "imnet")
    fake_image_folder(root)
    for z, kind in ((5, "N(0, I)"), (0, "zero")):
        path = str(tmp_path / f"G{z}.pth")
        fake_srim_file(path, z=z)
        out = tmp_path / f"out{z}"
        flags = ["--data", "folder", "--data_dir", root, "--size", "64", "--n_eval", "2",
                 "--eval_samples", "2", "--pretrained", "0", "--distance", "pixel",
                 "--search_chunk", "2", "--device", "cpu", "--init_from", path, "--out_dir",
                 str(out)]
        cimle.main(flags + ["--eval"])  # into a folder that did not exist
        cimle.main(flags + ["--sample"])
        assert sorted(os.listdir(out)) == ["eval.json", "interpolation.png", "many_samples.png",
                                           "one_latent_many_inputs.png"]
        assert json.load(open(out / "eval.json"))["z"].startswith(kind)


def test_training_from_released_weights_starts_from_them_and_resumes_exactly(tmp_path):
    """Training with --init_from: the first step starts from the file's weights (fresh Adam and
    schedule); the run resumes exactly with the file's widths given as flags."""
    path = str(tmp_path / "code_G.pth")
    official = fake_srim_file(path)
    flags = ["--task", "sr", "--size", "32", "--S", "4", "--m", "2", "--L", "4",
             "--batch_size", "2", "--pretrain_iters", "0", "--n_train", "8", "--log_every", "1"]
    widths = ["--nf", "8", "--gc", "4", "--n_blocks", "1", "--z_channels", "5"]
    out = str(tmp_path / "run")
    cimle.main(flags + ["--init_from", path, "--iters", "1", "--lr", "1e-12", "--out_dir", out])
    G = cimle.SRGenerator(5, 8, 4, 1)
    G.load_state_dict(torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["state"]["G"])
    want = cimle.convert_srim(official, "sigmoid")
    assert all(torch.allclose(v, want[k], atol=1e-8) for k, v in G.state_dict().items())

    def losses(run):
        return [json.loads(line)["loss"] for line in open(os.path.join(run, "log.jsonl"))]

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    cimle.main(flags + ["--init_from", path, "--iters", "3", "--out_dir", one])
    cimle.main(flags + ["--init_from", path, "--iters", "1", "--out_dir", two])
    cimle.main(flags + widths + ["--iters", "3", "--out_dir", two, "--resume"])
    assert np.allclose(losses(two), losses(one), rtol=1e-5), (losses(two), losses(one))


def test_select_latents_keeps_the_first_of_tied_candidates_in_any_chunking():
    """argmin's first-index rule: a generator that ignores z ties every candidate, and every
    chunking must then pick candidate 0 (a later chunk must not win a tie)."""
    n, m = 3, 6
    table = torch.randn(n, m, 4)
    cond = torch.rand(n, 3, 8, 8) * 2 - 1

    def generate(c, z):
        return c
    distance = cimle.Distance("layout", "pixel", "cpu")
    for chunk, examples in ((1, 1), (2, 2), (4, 3), (6, 3)):
        index, codes, _ = cimle.select_latents(
            generate, distance, cond, torch.zeros(n, 3, 8, 8), None, m,
            lambda e0, e1, j0, j1: table[e0:e1, j0:j1], chunk, examples, "cpu")
        assert index.tolist() == [0] * n and torch.equal(codes, table[:, 0]), (chunk, examples)
