"""Tests of poe_gan.py: the paper's identities (Eq. 4, 5, 7, 9), the subset invariants, a short
training run, exact resume and interval-mean logs, the ablation switches, every flag check and
error sentence, a training step without host syncs, the compiled training step, streamed
evaluation, and the paper presets under torchrun (random-weight stand-ins for the pretrained
files). CPU, no network."""

import gzip
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import traceback
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import data
import poe_gan as P
from test_data import fake_coco_stuff, fake_mm_celeba

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--size", "32", "--ch_base", "128", "--ch_max", "8", "--z_base", "32", "--z_max", "2",
        "--feat_dim", "16", "--z0_dim", "8", "--w_dim", "16", "--text_width", "16",
        "--batch_size", "4"]


def tiny_args(*extra):
    return common.parse_args(P.build_parser(), P.PRESETS, "poe_gan", "shapes", TINY + list(extra))


@pytest.fixture(scope="module")
def shapes_batch():
    ds = data.get_dataset("shapes", size=32)
    return torch.utils.data.default_collate([ds[i] for i in range(4)]), ds


def build_tiny(*extra):
    torch.manual_seed(0)
    args = tiny_args(*extra)
    info = P.dataset_info(args)
    G, D = P.build(args, info)
    return args, info, G, D


# ---------------------------------------------------------------- product of experts (Eq. 4)

def closed_form_product(mu, var, mask):
    """Product of Gaussians the textbook way: precisions add, the mean is precision-weighted."""
    prec = (mask[..., None] / var).sum(1)
    return (mask[..., None] * mu / var).sum(1) / prec, 1 / prec


def test_product_of_experts_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 4, 7, generator=g, dtype=torch.float64)
    logvar = torch.randn(5, 4, 7, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1], [1, 0, 0, 1]],
                        dtype=torch.float64)
    m, lv = P.product_of_experts(mu, logvar, mask)
    m_ref, var_ref = closed_form_product(mu, logvar.exp(), mask)
    assert torch.allclose(m, m_ref, atol=1e-12) and torch.allclose(lv.exp(), var_ref, atol=1e-12)
    # the variance is 1 / sum of precisions (Eq. 4 printed as sigma): narrower than every expert
    assert (lv <= logvar.masked_fill(mask[..., None] == 0, float("inf")).amin(1) + 1e-12).all()


def test_product_of_experts_extreme_variances_stay_finite_and_exact():
    mu = torch.tensor([[[0.0], [3.0], [-2.0]]])
    logvar = torch.tensor([[[0.0], [-80.0], [80.0]]])          # var e^-80 and e^80 in float32
    m, lv = P.product_of_experts(mu, logvar, torch.ones(1, 3))
    assert torch.isfinite(m).all() and torch.isfinite(lv).all()
    assert abs(m.item() - 3.0) < 1e-6                           # the sharpest expert wins
    assert abs(lv.item() - (-80.0)) < 1e-4


def test_absent_expert_changes_nothing_even_if_garbage():
    mu, logvar = torch.randn(3, 3, 4, 2, 2), torch.randn(3, 3, 4, 2, 2)
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0], [1, 0, 1]])
    m1, lv1 = P.product_of_experts(mu, logvar, mask)
    mu2, logvar2 = mu.clone(), logvar.clone()
    mu2[mask == 0], logvar2[mask == 0] = float("nan"), float("inf")
    m2, lv2 = P.product_of_experts(mu2, logvar2, mask)
    assert torch.equal(m1, m2) and torch.equal(lv1, lv2)


def test_prior_alone_gives_standard_normal():
    args, info, G, _ = build_tiny()
    vecs = {m: torch.randn(6, args.feat_dim) for m in G.modalities}
    masks = {m: torch.zeros(6) for m in G.modalities}
    mu, lv, _ = G.global_posterior(vecs, masks, 6, "cpu")
    assert torch.equal(mu, torch.zeros_like(mu)) and torch.equal(lv, torch.zeros_like(lv))


def test_logvar_limiter():
    x = torch.tensor([-1e6, -3.0, 0.0, 0.5, 1e6])
    y = P.limit_logvar(x, 10.0)
    assert torch.allclose(y, 10 * torch.tanh(x / 10)) and y.abs().max() <= 10


# ---------------------------------------------------------------- KL (Eq. 9)

def test_conditional_kl_matches_closed_form():
    g = torch.Generator().manual_seed(1)
    mu0, lv0, mu1, lv1 = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(4))
    v0, v1 = lv0.exp(), lv1.exp()
    var = v0 * v1 / (v0 + v1)                                   # product of prior and expert 1
    mean = (mu0 * v1 + mu1 * v0) / (v0 + v1)
    ref = 0.5 * (torch.log(v0 / var) + (var + (mean - mu0) ** 2) / v0 - 1)
    assert torch.allclose(P.conditional_kl(mu0, lv0, mu1, lv1), ref, atol=1e-12)
    # an expert equal to "no information" (infinite variance) costs nothing
    assert P.conditional_kl(mu0, lv0, mu1, torch.full_like(lv1, 60.0)).abs().max() < 1e-12


def test_kl_diag_gaussians_is_the_closed_form_kl():
    g = torch.Generator().manual_seed(2)
    mq, lq, mp, lp = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mq, (0.5 * lq).exp()),
                                            torch.distributions.Normal(mp, (0.5 * lp).exp()))
    assert torch.allclose(P.kl_diag_gaussians(mq, lq, mp, lp), ref, atol=1e-12)


def test_kl_loss_is_eq9_with_its_stated_reductions():
    """Eq. (9) in kl_loss: channels summed, a local map's locations averaged (--kl_locations mean)
    or summed, omega_i per modality, only the samples where the modality is given, batch mean."""
    args = tiny_args("--w_text", "0.5", "--w_seg", "0.25", "--w_sketch", "2", "--w_style", "3")
    mods = ("text", "seg", "sketch", "style")
    text = torch.tensor([[1.0, 0.5], [2.0, 0.0]])                      # (B, z0): level 0
    seg_map = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)   # level 2
    sketch_map = torch.ones(2, 1, 4, 4)                                # level 3
    kls = [("text", 0, text), ("seg", 2, seg_map), ("sketch", 3, sketch_map),
           ("style", 0, torch.tensor([[3.0], [5.0]]))]
    mask = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 1]])
    seg = seg_map.sum(1)                                               # (B, 2, 2)
    base = 0.5 * (1.5 + 0) / 2 + 3 * (0 + 5) / 2
    want_mean = base + 0.25 * seg.mean((1, 2)).sum() / 2 + 2 * (0 + 1) / 2
    want_sum = base + 0.25 * seg.sum((1, 2)).sum() / 2 + 2 * (0 + 16) / 2
    assert abs(P.kl_loss(kls, mask, mods, args).item() - want_mean) < 1e-5
    args.kl_locations = "sum"
    assert abs(P.kl_loss(kls, mask, mods, args).item() - want_sum) < 1e-4
    assert tiny_args().kl_locations == "mean"
    assert P.PRESETS["mm-celeba-hq"]["kl_locations"] == "mean"


def test_local_kl_is_the_single_expert_conditional_per_element(shapes_batch):
    """Each local term is KL(prior x expert_i || prior) of that block's heads, element by element,
    whatever other experts are present (not the KL of the full product)."""
    batch, _ = shapes_batch
    args, info, G, _ = build_tiny()
    cond = P.Conditioner(args, info, torch.device("cpu"))(batch)
    block = G.blocks[1]                                                # r = 8
    _, skips = P.encode_all(G.encoders, cond)
    torch.manual_seed(0)
    h = torch.randn(4, P.channels_at(4, args), 8, 8)
    masks = {m: torch.ones(4) for m in G.modalities}
    with torch.no_grad():
        _, kls = block.local_latent(h, skips, masks, lambda shape, d, t: torch.randn(shape))
        mu0, lv0 = block.prior(h)
        for s in P.SPATIAL:
            mu, lv = block.experts[s](torch.cat([h, skips[s][8]], 1))
            assert kls[s].shape == (4, block.z_ch, 8, 8)
            assert torch.allclose(kls[s], P.conditional_kl(mu0, lv0, mu, lv), atol=1e-6), s
    # the global terms likewise, per z^0 element
    vecs, _ = P.encode_all(G.encoders, cond)
    with torch.no_grad():
        _, _, kl0 = G.global_posterior(vecs, masks, 4, "cpu")
        mu, lv = G.global_experts["text"](vecs["text"]).chunk(2, 1)
        zeros = torch.zeros_like(mu)
        want = P.conditional_kl(zeros, zeros, mu, P.limit_logvar(lv, P.THETA_EXPERT))
    assert torch.allclose(kl0["text"], want, atol=1e-6)


def test_gaussian_heads_limit_the_log_variance():
    """supp: logvar = theta * tanh(raw / theta), theta 1 for the priors and 10 for the experts."""
    _, _, G, _ = build_tiny()
    block = G.blocks[0]
    assert block.prior.theta == P.THETA_PRIOR == 1.0
    assert all(e.theta == P.THETA_EXPERT == 10.0 for e in block.experts.values())
    x = torch.randn(2, P.channels_at(4, tiny_args()), 4, 4) * 50
    head = block.prior
    with torch.no_grad():
        head.net[-1].bias.fill_(30.0)                                 # a huge raw log-variance
        mu, lv = head(x)
        raw_mu, raw_lv = head.net(x).chunk(2, 1)
    assert torch.equal(mu, raw_mu)
    assert torch.allclose(lv, torch.tanh(raw_lv)) and lv.abs().max() <= 1.0


# ---------------------------------------------------------------- LG-AdaIN (Eq. 5)

def test_lg_adain_matches_eq5():
    torch.manual_seed(0)
    layer = P.LGAdaIN(6, 5, 2)
    for p in layer.parameters():
        p.data.normal_()
    h, z, w = torch.randn(3, 6, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 5)
    gw, bw = layer.global_affine(w).chunk(2, 1)
    gz, bz = layer.local_affine(z).chunk(2, 1)
    mean = h.mean((2, 3), keepdim=True)
    std = (h.var((2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    want = gw[..., None, None] * ((1 + gz) * (h - mean) / std + bz) + bw[..., None, None]
    assert torch.allclose(layer(h, z, w), want, atol=1e-5)


def test_image_gradient_reaches_every_local_expert_at_init(shapes_batch):
    """At initialisation the image must depend on z^k, so the GAN loss can teach the seg/sketch
    experts before the KL switches them off (a zero-initialised z^k conv in LG-AdaIN blocked it)."""
    batch, _ = shapes_batch
    args, info, G, _ = build_tiny()
    cond = P.Conditioner(args, info, torch.device("cpu"))(batch)
    x, _ = G(cond, torch.ones(4, 4))
    x.square().sum().backward()
    for block in G.blocks:
        for s in P.SPATIAL:
            grad = block.experts[s].net[-1].weight.grad
            assert grad is not None and grad.abs().sum() > 0, (block.res, s)
    for m in G.modalities:
        assert G.global_experts[m][-1].weight.grad.abs().sum() > 0, m


# ---------------------------------------------------------------- discriminator (Eq. 7)

def test_discriminator_logits_are_eq7():
    args, info, _, D = build_tiny()
    torch.manual_seed(3)
    B = 3
    x = torch.randn(B, 3, 32, 32)
    vecs = {m: torch.randn(B, args.feat_dim) for m in ("text", "style")}
    skips = {s: {r: torch.randn(B, P.channels_at(r, args), r, r) for r in (16, 8, 4)}
             for s in ("seg", "sketch")}
    mask = torch.tensor([[1.0, 1, 0, 1], [0, 0, 1, 0], [1, 1, 1, 1]])
    with torch.no_grad():
        logits, emb = D(x, None, mask, (vecs, skips))
        zero_logits, _ = D(x, None, torch.zeros_like(mask), (vecs, skips))
    m = dict(zip(D.modalities, mask.t()))
    dx = emb["image"]
    want = D.uncond_global(dx) + sum(m[k][:, None] * (vecs[k] * dx).sum(1, True)
                                     for k in ("text", "style"))
    assert torch.allclose(logits[-1], want, atol=1e-5)
    for f, f0, h in zip(logits[:-1], zero_logits[:-1], emb["maps"]):
        r = h.shape[-1]
        proj = sum(m[s][:, None, None, None] * (skips[s][r] * h).sum(1, True)
                   for s in ("seg", "sketch"))
        assert torch.allclose(f - f0, proj, atol=1e-4)          # the conditional terms
    assert [f.shape[-1] for f in logits[:-1]] == [16, 8, 4]     # multiscale (Fig. 5c)


# ---------------------------------------------------------------- image contrastive features

def test_offline_image_features_are_fixed_and_pooled_over_locations():
    net = P.RandomConvFeatures(3)
    assert list(net.parameters()) == [] and torch.equal(net.w1, P.RandomConvFeatures(3).w1)
    def square(colour, y, x):                            # a flat square on a zero background
        img = torch.zeros(1, 3, 32, 32)
        img[0, :, y:y + 8, x:x + 8] = torch.tensor(colour)[:, None, None]
        return img
    red, red_moved, blue = square((1, -1, -1), 4, 4), square((1, -1, -1), 18, 12), \
        square((-1, -1, 1), 4, 4)
    f = {k: net(v)[0] for k, v in (("red", red), ("moved", red_moved), ("blue", blue))}
    assert f["red"].shape == (64,)
    assert torch.allclose(f["red"], f["moved"], atol=1e-6)      # where it is drawn: no matter
    assert F.cosine_similarity(f["red"], f["blue"], dim=0) < 0.9   # what colour: matters
    # so with "random" the contrastive loss of Eq. (11) cannot tell a moved copy from the image
    x, y = torch.cat([red, blue]), torch.cat([red_moved, blue])
    loss = lambda a, b, kind: P.masked_contrastive(                    # noqa: E731
        P.image_features(a, net, kind), P.image_features(b, net, kind), torch.ones(2), 0.3)
    assert torch.allclose(loss(x, y, "random"), loss(x, x, "random"))
    assert loss(x, y, "pixels") > loss(x, x, "pixels") + 0.1             # "pixels" can
    both = P.image_features(x, net, "random+pixels")                    # the CPU preset's
    assert both.shape == (2, 64 + 3 * 64)
    assert torch.allclose(both[:, :64].norm(dim=1), torch.ones(2))
    assert torch.allclose(both[:, 64:].norm(dim=1), torch.ones(2))
    assert loss(x, x, "random+pixels") < loss(x, y, "random+pixels") < loss(x, y, "pixels")
    assert tiny_args().cx_features == "random+pixels"


def test_contrastive_loss_is_eq10_and_masked_pairs_are_dropped():
    g = torch.Generator().manual_seed(4)
    u, v = torch.randn(3, 5, generator=g, dtype=torch.float64), \
        torch.randn(3, 5, generator=g, dtype=torch.float64)
    tau = 0.7
    cos = torch.tensor([[F.cosine_similarity(u[i], v[j], dim=0).item() for j in range(3)]
                        for i in range(3)], dtype=torch.float64) / tau
    want = -sum(cos[i, i] - torch.logsumexp(cos[i], 0) for i in range(3)) / 6 \
        - sum(cos[i, i] - torch.logsumexp(cos[:, i], 0) for i in range(3)) / 6
    assert abs(P.contrastive_loss(u, v, tau).item() - want.item()) < 1e-10
    # masked: only the kept pairs (rows 0 and 2), and no loss from fewer than two pairs
    keep = torch.tensor([1.0, 0.0, 1.0])
    got = P.masked_contrastive(u, v, keep, tau)
    assert abs(got.item() - P.contrastive_loss(u[[0, 2]], v[[0, 2]], tau).item()) < 1e-12
    assert P.masked_contrastive(u, v, torch.tensor([0.0, 1.0, 0.0]), tau).item() == 0.0


# ---------------------------------------------------------------- offline text tokenizer

def test_word_tokenizer_known_ids_unknown_words_padding_and_truncation():
    tok = P.text_tokenizer(tiny_args())                     # shapes: one id per caption word
    assert isinstance(tok, common.WordTokenizer) and tok.vocab_size == 23
    assert tok.vocab[2:-2] == sorted(set(data.shapes_caption_vocabulary()))
    assert (tok.sot, tok.eot) == (21, 22)                   # the two largest ids: CLIP's EOT pooling
    ids = tok(["A red circle above a blue striped diamond"])
    assert ids.shape == (1, 64) and ids.dtype == torch.long
    assert ids[0, :10].tolist() == [21, 2, 14, 7, 3, 2, 6, 17, 9, 22]
    assert ids[0, 10:].eq(0).all()                          # zero padding after EOT
    assert int(ids[0].argmax()) == 9                        # the tower pools here
    assert tok(["a purple circle!"])[0, :6].tolist() == [21, 2, 1, 7, 1, 22]   # <unk> = 1
    # every built-in caption is in the vocabulary and fits (data.shapes_caption's words)
    ds = data.get_dataset("shapes", size=32)
    for i in range(100):
        caption = ds[i]["caption"]
        ids = tok.encode(caption)
        assert tok.unk not in ids and len(ids) + 2 <= 64, caption
        assert [tok.vocab[j] for j in ids] == caption.split()
    # real captions keep CLIP's byte-level tokens (an open vocabulary)
    other = P.text_tokenizer(tiny_args("--data", "mm-celeba-hq"))
    assert type(other) is common.CLIPTokenizer and other.vocab_size == 514


def test_text_tower_reads_the_colour_word():
    args, info, G, _ = build_tiny()
    tok = P.Conditioner(args, info, torch.device("cpu")).tokenizer
    enc = G.encoders["text"]
    assert enc.tower.token_embedding.num_embeddings == tok.vocab_size
    with torch.no_grad():
        a, b = (enc(tok([c])) for c in ("a red circle", "a blue circle"))
        a_short = enc(tok(["a red circle"])[:, :8])               # padding after EOT is unread
    assert (a - b).abs().max() > 1e-3
    assert torch.allclose(a, a_short, atol=1e-5)


# ---------------------------------------------------------------- every subset, G and D

def test_every_subset_runs_and_absent_inputs_are_ignored(shapes_batch):
    batch, ds = shapes_batch
    batch = {k: v[:2] for k, v in batch.items()}                   # two inputs are enough
    args, info, G, D = build_tiny()
    cond_of = P.Conditioner(args, info, torch.device("cpu"))
    cond = cond_of(batch)
    other = cond_of({**batch, "caption": ["a white square"] * 2, "label": batch["label"].flip(1),
                     "sketch": batch["sketch"].flip(2), "style": batch["style"].flip(3)})
    subsets = P.all_subsets(G.modalities)
    assert len(subsets) == 16 and subsets[0] == ()
    with torch.no_grad():
        for subset in subsets:
            mask = P.subset_mask(subset, G.modalities, 2, "cpu")
            torch.manual_seed(7)
            x, kls = G(cond, mask)
            assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
            logits, _ = D(x, cond, mask)
            assert all(torch.isfinite(f).all() for f in logits)
            for m in G.modalities:                 # swap one modality's input
                swapped = {**cond, m: other[m]}
                torch.manual_seed(7)
                y, _ = G(swapped, mask)
                same = torch.allclose(x, y, atol=1e-6)
                assert same == (m not in subset), (subset, m)


def test_empty_subset_samples_from_the_prior(shapes_batch):
    batch, _ = shapes_batch
    args, info, G, _ = build_tiny()
    cond = P.Conditioner(args, info, torch.device("cpu"))(batch)
    mask = torch.zeros(4, 4)
    with torch.no_grad():
        a, _ = G(cond, mask)
        b, _ = G(cond, mask)
    assert (a - b).abs().mean() > 1e-4                         # stochastic, not a fixed output


def test_subset_grid_rows_follow_their_subsets(shapes_batch):
    """The Fig. 1 grid (--sample, training grids): per input a row of the real image, then one
    row per subset showing exactly the given inputs; a row's samples depend on its subset's
    inputs only (the unconditional row is the same for other inputs, the full row is not)."""
    batch, ds = shapes_batch
    args, info, G, _ = build_tiny()
    cond_of = P.Conditioner(args, info, torch.device("cpu"))
    other = {**batch, "caption": ["a white square"] * 4, "label": batch["label"].flip(1),
             "sketch": batch["sketch"].flip(2), "style": batch["style"].flip(3)}
    grids = []
    for b in (batch, other):
        torch.manual_seed(3)
        grids.append(P.subset_grid(G, b, cond_of, ds, os.devnull, n_inputs=1, n_samples=2))
    rows, rows_other = grids
    subsets = P.all_subsets(G.modalities)
    assert len(rows) == 1 + len(subsets) and torch.equal(rows[0][0], batch["image"][0])
    blank = torch.ones(3, 32, 32)
    for row, subset in zip(rows[1:], subsets):
        shown = row[1:1 + len(G.modalities)]
        assert [not torch.equal(t, blank) for t in shown] == [m in subset for m in G.modalities]
    assert all(torch.equal(a, b) for a, b in zip(rows[1][-2:], rows_other[1][-2:]))    # uncond
    assert not torch.allclose(rows[-1][-1], rows_other[-1][-1])                        # all four
    assert (rows[1][-1] - rows[1][-2]).abs().mean() > 1e-4        # two samples, two draws


# ---------------------------------------------------------------- ablation switches

def test_ablation_switches():
    _, _, Gc, _ = build_tiny("--fusion", "concat")
    assert not hasattr(Gc, "global_experts") and not hasattr(Gc.blocks[0], "experts")
    # row (a): an absent modality's embedding and skips are zeroed, so its input changes nothing
    cond = {"text": torch.randint(1, 20, (2, 6)), "seg": torch.rand(2, 5, 32, 32),
            "sketch": torch.rand(2, 1, 32, 32), "style": torch.randn(2, 3, 32, 32)}
    for m in P.MODALITIES:
        mask = torch.ones(2, 4)
        mask[:, P.MODALITIES.index(m)] = 0
        outs = []
        for c in (cond, {**cond, m: cond[m].flip(0)}):
            torch.manual_seed(0)
            with torch.no_grad():
                outs.append(Gc(c, mask)[0])
        assert torch.equal(*outs), m
    _, _, G, _ = build_tiny()
    assert set(G.global_experts) == {"text", "seg", "sketch", "style"}
    assert set(G.blocks[0].experts) == {"seg", "sketch"}       # local experts: spatial only


def test_training_steps_lower_d_loss_and_contrastive(shapes_batch):
    batch, _ = shapes_batch
    args, info, G, D = build_tiny("--lr", "0.008")
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.0, 0.99))
    rt = common.Runtime(torch.device("cpu"), torch.float32)
    cond = P.Conditioner(args, info, rt.device)(batch)
    torch.manual_seed(0)
    hist = [P.train_step(G, D, opt_g, opt_d, batch["image"], cond, it, args, rt,
                         P.RandomConvFeatures(3))
            for it in range(16)]
    first = lambda k: sum(h[k] for h in hist[:4]) / 4          # noqa: E731
    last = lambda k: sum(h[k] for h in hist[-4:]) / 4           # noqa: E731
    assert last("loss_d") < first("loss_d") - 0.1
    assert all(math.isfinite(h[k]) for h in hist for k in h)


def test_every_trainable_parameter_gets_a_gradient_as_ddp_requires(shapes_batch):
    """DDP (without find_unused_parameters) stops at the second iteration if a trainable parameter
    of G or D gets no gradient: D's seg/sketch vector layers fed no term of Eq. (7). Frozen ones
    (the small text towers' logit_scale) must stay frozen after the step."""
    batch, _ = shapes_batch
    args, info, G, D = build_tiny("--r1_every", "1")
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.0, 0.99))
    rt = common.Runtime(torch.device("cpu"), torch.float32)
    cond = P.Conditioner(args, info, rt.device)(batch)
    frozen = {n for n, p in D.named_parameters() if not p.requires_grad}
    assert frozen == {"encoders.text.tower.logit_scale"}
    torch.manual_seed(0)
    P.train_step(G, D, opt_g, opt_d, batch["image"], cond, 0, args, rt, P.RandomConvFeatures(3))
    for name, net in (("G", G), ("D", D)):
        silent = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
        assert not silent, (name, silent)
    assert {n for n, p in D.named_parameters() if not p.requires_grad} == frozen


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that read a tensor's values on the host (on a GPU, each waits for the
    device) when this repository's code calls them: .item(), float(), `if tensor`, a boolean mask
    index. torch's own reads of host tensors (Adam's step count) are left out."""

    READS = {"_local_scalar_dense", "nonzero", "masked_select", "equal"}
    WRAPPERS = (__file__, "_python_dispatch.py", f"torch{os.sep}_compile.py", "_dynamo")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masked = name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1])
        if name in self.READS or masked:
            caller = next(f for f in reversed(traceback.extract_stack())     # who asked
                          if not any(w in f.filename for w in self.WRAPPERS))
            if caller.filename.startswith(ROOT) and f"{os.sep}torch{os.sep}" not in caller.filename:
                self.seen.append(f"{os.path.basename(caller.filename)}:{caller.lineno} {name}")
        return func(*args, **(kwargs or {}))


def test_train_step_reads_nothing_on_the_host_and_d_gets_no_gradient_from_g(shapes_batch):
    """No host sync in the step (the losses come back as device tensors, read at log steps only;
    the contrastive masks without `if keep.sum() < 2` or u[keep]), and G's backward reaches no
    weight of D (D's weights frozen during the G step)."""
    batch, _ = shapes_batch
    args, info, G, D = build_tiny("--r1_every", "1", "--no_modality_dropout")   # every term runs
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.0, 0.99)) for m in (G, D))
    rt = common.Runtime(torch.device("cpu"), torch.float32)
    cond = P.Conditioner(args, info, rt.device)(batch)
    d_grads_at_g_step = []
    g_step = opt_g.step
    opt_g.step = lambda *a, **k: d_grads_at_g_step.extend(
        n for n, p in D.named_parameters() if p.grad is not None) or g_step(*a, **k)
    torch.manual_seed(0)
    with HostReads() as reads:
        stats = P.train_step(G, D, opt_g, opt_d, batch["image"], cond, 0, args, rt,
                             P.RandomConvFeatures(3))
    assert reads.seen == []
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in stats.values())
    assert stats["r1"] > 0 and stats["cy_g"] > 0 and stats["cx"] > 0        # all terms ran
    assert d_grads_at_g_step == []
    assert all(p.grad is not None for p in G.parameters() if p.requires_grad)


def test_compiled_training_step_gives_the_eager_losses():
    """--compile: G and D compiled (aot_eager: the graph capture without code generation), R1's
    double backward eager on the plain D. The paper's modalities (text, seg, sketch) at 8x8."""
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 19, (4, 8, 8), generator=g)
    batch = dict(image=torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, label=label,
                 sketch=data.instance_edges(label)[:, None].float(),
                 caption=["wavy hair", "smiling", "black hair", "a beard"])

    def first_step(backend):
        torch.manual_seed(0)
        args = tiny_args("--data", "mm-celeba-hq", "--pretrained", "0", "--size", "8",
                         "--cx_features", "random", "--r1_every", "1", "--compile", backend)
        rt = common.Runtime(torch.device("cpu"), torch.float32)
        info = P.dataset_info(args)
        G, D = (common.prepare_model(m, rt, args.compile) for m in P.build(args, info))
        opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.0, 0.99))
                        for m in (G, D))
        cond = P.Conditioner(args, info, rt.device)(batch)
        torch.manual_seed(5)
        return P.train_step(G, D, opt_g, opt_d, batch["image"], cond, 0, args, rt,
                            P.make_image_net(args, rt.device))

    eager, compiled = first_step(""), first_step("aot_eager")     # "" : not compiled
    assert eager["r1"] > 0 and eager["cy_g"] > 0                   # R1 and Eq. (13) ran
    for k, v in eager.items():
        assert abs(compiled[k] - v) <= 1e-5 * max(1.0, abs(v)), (k, compiled[k], v)


class RecordingScaler:
    """The disabled GradScaler of a CPU run, recording the total loss each backward starts from."""

    def __init__(self):
        self.inner, self.totals = torch.amp.GradScaler("cpu", enabled=False), []

    def scale(self, loss):
        self.totals.append(float(loss.detach()))
        return self.inner.scale(loss)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def one_step(batch, *flags, it=0):
    """One train_step at lr 0 (the networks stay as built) with the noise of seed 1: the step's
    statistics, the totals G and D were trained on, and what is needed to recompute them."""
    args, info, G, D = build_tiny("--r1_every", "2", *flags)
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=0.0, betas=(0.0, 0.99)) for m in (G, D))
    rt = common.Runtime(torch.device("cpu"), torch.float32)
    rt.scaler = RecordingScaler()
    cond = P.Conditioner(args, info, rt.device)(batch)
    net = P.make_image_net(args, rt.device)
    seen = []
    forward = G.forward
    G.forward = lambda c, mask: seen.append(mask) or forward(c, mask)
    torch.manual_seed(1)
    stats = P.train_step(G, D, opt_g, opt_d, batch["image"], cond, it, args, rt, net)
    return stats, rt.scaler.totals, seen[0], (args, G, D, cond, net)


def test_train_step_losses_are_the_papers_on_the_right_tensors(shapes_batch):
    """Eq. (14): every logged term recomputed by hand from the same noise, and the totals G and D
    step on weigh them by --lambda_cx, --lambda_cy and --r1_gamma (lazy R1 scaled by r1_every)."""
    batch, _ = shapes_batch
    stats, totals, _, (args, G, D, cond, net) = one_step(
        batch, "--lambda_cx", "0.7", "--lambda_cy", "1.3", "--r1_gamma", "3000", "--tau", "0.5")
    torch.manual_seed(1)                                   # the step's draws, in its order
    mask = P.dropout_mask(4, 4, args.dropout_p, "cpu")
    fake, kls = G(cond, mask)
    fake_logits, fake_emb = D(fake, cond, mask)
    real_logits, real_emb = D(batch["image"], cond, mask)
    has_text = mask[:, 0]
    feats = lambda x: P.image_features(x, net, args.cx_features)      # noqa: E731
    want = dict(loss_g=common.ns_g_loss(fake_logits), kl=P.kl_loss(kls, mask, G.modalities, args),
                cx=P.masked_contrastive(feats(batch["image"]), feats(fake), mask.sum(1) > 0, 0.5),
                cy_g=P.masked_contrastive(fake_emb["image"], fake_emb["text"], has_text, 0.5),
                loss_d=common.ns_d_loss(real_logits, fake_logits),
                cy_d=P.masked_contrastive(real_emb["image"], real_emb["text"], has_text, 0.5))
    for k, v in want.items():
        assert abs(stats[k] - v.item()) < 1e-5, (k, stats[k], v.item())
    assert min(stats["kl"], stats["cx"], stats["cy_g"], stats["cy_d"], stats["r1"]) > 0
    total_g = stats["loss_g"] + stats["kl"] + 0.7 * stats["cx"] + 1.3 * stats["cy_g"]
    total_d = stats["loss_d"] + 1.3 * stats["cy_d"] + 3000 / 2 * stats["r1"] * 2
    assert 3000 / 2 * stats["r1"] > 0.01 * total_d                  # the R1 term weighs
    assert totals == pytest.approx([total_g, total_d], rel=1e-6)
    # R1 only every r1_every-th iteration; --lambda_cx 0 (Table 3 row (e)) skips Eq. (11)
    stats, totals, _, _ = one_step(batch, "--lambda_cx", "0", "--lambda_cy", "0", it=1)
    assert stats["r1"] == 0.0 and stats["cx"] == 0.0 and stats["cy_g"] > 0
    assert totals == pytest.approx([stats["loss_g"] + stats["kl"], stats["loss_d"]], rel=1e-5)
    assert P.make_image_net(tiny_args("--lambda_cx", "0"), "cpu") is None


def test_modality_dropout_and_its_switch(shapes_batch):
    """Table 3 row (c): --no_modality_dropout gives G every modality; otherwise each modality of
    each sample is dropped with probability --dropout_p."""
    batch, _ = shapes_batch
    _, _, mask, _ = one_step(batch)
    assert 0 < mask.sum() < mask.numel()
    _, _, mask, _ = one_step(batch, "--no_modality_dropout")
    assert torch.equal(mask, torch.ones(4, 4))
    torch.manual_seed(0)
    drawn = P.dropout_mask(4000, 4, 0.25, "cpu")
    assert abs(drawn.mean().item() - 0.75) < 0.03 and drawn.std(0).min() > 0.35


def test_no_kl_concat_and_warmup_flags(shapes_batch):
    batch, _ = shapes_batch
    full = one_step(batch)[0]["kl"]
    assert full > 0.05
    assert one_step(batch, "--no_kl")[0]["kl"] == 0.0                  # Table 3 row (b)
    assert one_step(batch, "--fusion", "concat")[0]["kl"] == 0.0       # row (a): no experts
    warm = one_step(batch, "--kl_warmup", "1000", it=1)[0]["kl"]
    assert 0.0 < warm < 0.01


def test_concatenation_discriminator_of_table3_row_d():
    """--discriminator concat: the label map and sketch enter with the image, text and style with
    the global embedding; an absent modality is zeroed; no projection (no seg/sketch encoders)."""
    args, info, _, D = build_tiny("--discriminator", "concat")
    assert set(D.encoders) == {"text", "style"} and D.from_rgb.weight.shape[1] == 3 + 5 + 1
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    cond = {"seg": torch.rand(2, 5, 32, 32), "sketch": torch.rand(2, 1, 32, 32),
            "text": torch.randint(1, 20, (2, 6)), "style": torch.randn(2, 3, 32, 32)}
    for m in P.MODALITIES:
        other = {**cond, m: cond[m].flip(0)}
        for given in (0.0, 1.0):
            mask = torch.ones(2, 4)
            mask[:, P.MODALITIES.index(m)] = given
            with torch.no_grad():
                a, _ = D(x, cond, mask)
                b, _ = D(x, other, mask)
            moved = not all(torch.allclose(u, v) for u, v in zip(a, b))
            assert moved == bool(given), (m, given)
    assert build_tiny()[3].from_rgb.weight.shape[1] == 3                # MMPD: image only


# ---------------------------------------------------------------- toy metrics

def test_toy_metrics_reward_the_right_images():
    ds = data.get_dataset("shapes", size=32, split="test")
    batch = torch.utils.data.default_collate([ds[i] for i in range(24)])
    real = data.shapes_modality_metrics(batch["image"], batch)
    shuffled = data.shapes_modality_metrics(batch["image"].roll(1, 0), batch)
    assert real["label_fg_acc"] == 1.0 and real["in_mode"] == 1.0
    assert real["caption_colour"] > 0.95 and real["style_colour"] > 0.95
    for k in ("label_fg_acc", "in_mode", "sketch_f1", "caption_object", "style_colour",
              "colour_precision"):
        assert real[k] > shuffled[k] + 0.1, k
    assert real["colour_precision"] > 0.95
    assert real["sketch_f1"] > 0.9  # the true image's colour edges are its sketch (not 1: touching
                                    # objects of one colour have no edge between them)
    # precision, unlike recall, drops when extra objects in unasked colours are drawn
    both = torch.maximum(batch["image"], batch["image"].roll(1, 0))
    assert data.shapes_modality_metrics(both, batch)["colour_precision"] < real["colour_precision"] - 0.1


def test_toy_metrics_summed_over_batches_equal_those_of_all_items_at_once():
    """--eval adds toy_counts batch by batch (and rank by rank): the sums must be additive."""
    ds = data.get_dataset("shapes", size=32, split="test")
    items = [ds[i] for i in range(24)]
    batch = torch.utils.data.default_collate(items)
    images = torch.maximum(batch["image"], batch["image"].roll(1, 0))   # imperfect images
    total = data.shapes_modality_zero_counts()
    for k in range(0, 24, 8):
        part = torch.utils.data.default_collate(items[k:k + 8])
        total = {key: v + total[key] for key, v in data.shapes_modality_counts(images[k:k + 8], part).items()}
    streamed, at_once = data.shapes_modality_scores(total), data.shapes_modality_metrics(images, batch)
    assert streamed.keys() == at_once.keys()
    for key, v in at_once.items():
        assert abs(streamed[key] - v) < 1e-9, key


# ---------------------------------------------------------------- command line, resume, errors

def run_cli(*argv, cwd):
    """The script as a user runs it (a fresh process): exit status and output."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "poe_gan.py"), *argv],
                          cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})


def run_main(argv, capsys):
    """main() in this process, as run_main wraps it: (exit status, stdout, stderr)."""
    try:
        common.run_main(lambda: P.main(list(argv)))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bench_runs_the_training_step_on_shapes_and_on_a_synthetic_paper_batch(capsys,
                                                                                 tmp_path):
    for extra, dtypes in ((["--dtype", "bfloat16"], ["float32", "bfloat16"]),
                          (["--data", "mm-celeba-hq", "--text_width", "0", "--pretrained", "1",
                            "--cx_features", "random", "--size", "8"], ["float32"])):
        folder = tmp_path / str(len(extra))
        code, out, err = run_main(TINY + ["--bench", "1", "--out_dir", str(folder)] + extra,
                                  capsys)
        assert code == 0, err
        rows = json.loads(out.strip().splitlines()[-1])["bench"]
        assert json.loads((folder / "bench.json").read_text())["training"]["bench"] == rows
        assert [r["dtype"] for r in rows] == dtypes
        assert all(r["img_per_s"] > 0 for r in rows)


def test_dry_run_flops_are_the_training_steps_and_the_benchs(capsys, tmp_path):
    """--dry_run's FLOPs per training image (training_flops, counted on the meta device) equal
    common.count_flops of a real train_step at iteration 3 (--bench's counted step) on the CPU,
    per image: shapes (the small text tower in G and D, the random conv features of Eq. 11; no
    lazy R1) and a paper set (frozen CLIP text features made before the step, the VGG-19
    features of Eq. 11, both at random weights; --r1_every 3: with the lazy R1 step, its double
    backward); and --bench's gflops_per_img. The CPU's fused attention kernel has no FLOP
    formula, so the real shapes step runs attention on the math path (its matrix multiplies, as
    on the meta device)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cpu = torch.device("cpu")
    paper = ["--data", "mm-celeba-hq", "--text_width", "0", "--pretrained", "1", "--size", "16",
             "--r1_every", "3"]
    for extra in ([], paper):
        args, info, G, D = build_tiny("--batch_size", "2", *extra)
        torch.manual_seed(0)
        label = torch.randint(0, info["num_classes"], (2, args.size, args.size))
        batch = dict(image=torch.rand(2, 3, args.size, args.size) * 2 - 1, label=label,
                     sketch=data.instance_edges(label)[:, None].float(),
                     caption=["a red circle and a blue square"] * 2)
        if args.data == "shapes":   # --bench's batch: the first items (their captions' lengths)
            batch = torch.utils.data.default_collate([data.get_dataset("shapes", size=32)[i]
                                                      for i in range(2)])
        cond = P.Conditioner(args, info, cpu, weights=False)(batch)
        image_net = P.make_image_net(args, cpu, weights=False)
        opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
        rt = common.Runtime(cpu, torch.float32)
        with sdpa_kernel(SDPBackend.MATH):
            real = common.count_flops(lambda: P.train_step(G, D, opt_g, opt_d, batch["image"],
                                                           cond, 3, args, rt, image_net))
        assert P.training_flops(args) * 2 == real > 0, extra
    code, out, _ = run_main(["--dry_run", "--data", "mm-celeba-hq"], capsys)
    assert code == 0
    assert out.strip().splitlines()[-2].startswith("training: 1,001.3 GFLOP per image")  # batch 64
    folder = tmp_path / "bench"
    code, out, err = run_main(TINY + ["--batch_size", "2", "--bench", "1", "--out_dir",
                                      str(folder)] + paper, capsys)
    assert code == 0, err
    bench = json.loads((folder / "bench.json").read_text())["training"]
    args = tiny_args("--batch_size", "2", *paper)
    assert bench["gflops_per_img"] == common.significant(P.training_flops(args) / 1e9) > 0


def test_paper_presets_keep_the_papers_values():
    """What the paper experiments depend on (supp. values; a flag or preset value that silently
    changes moves one of these)."""
    for name in ("mm-celeba-hq", "coco-stuff"):
        args = common.parse_args(P.build_parser(), P.PRESETS, "poe_gan", "shapes",
                                 ["--data", name])
        got = {k: getattr(args, k) for k in (
            "size", "lr", "r1_every", "ema_decay", "w_text", "w_seg", "w_sketch", "w_style",
            "lambda_cx", "lambda_cy", "tau", "dropout_p", "kl_warmup", "cx_features",
            "pretrained", "text_width", "fusion", "discriminator", "no_kl",
            "no_modality_dropout", "z_base", "z_max", "w_dim", "feat_dim")}
        assert got == dict(size=256, lr=0.004, r1_every=16, ema_decay=0.999, w_text=0.05,
                           w_seg=0.1, w_sketch=1.0, w_style=0.01, lambda_cx=3.0, lambda_cy=0.3,
                           tau=0.3, dropout_p=0.5, kl_warmup=0, cx_features="vgg", pretrained=1,
                           text_width=0, fusion="poe", discriminator="mmpd", no_kl=False,
                           no_modality_dropout=False, z_base=2048, z_max=32, w_dim=512,
                           feat_dim=512), name
    assert (P.THETA_PRIOR, P.THETA_EXPERT, P.GRAD_CLIP) == (1.0, 10.0, 10.0)
    assert [P.z_channels_at(r, args) for r in P.resolutions(args)] == [32, 32, 32, 32, 32, 16, 8]


def test_dry_run_parameter_counts(capsys):
    code, out, _ = run_main(["--dry_run"], capsys)
    assert code == 0
    counts = json.loads(out.strip().splitlines()[-1])["params"]
    # shapes: the text towers' token embeddings hold 23 word ids (WordTokenizer), 64 wide
    assert counts == {"G": 482200, "D": 313797}
    # paper preset (MM-CelebA-HQ 256, text + seg + sketch; the frozen CLIP tower not counted)
    code, out, _ = run_main(["--dry_run", "--data", "mm-celeba-hq"], capsys)
    counts = json.loads(out.strip().splitlines()[-1])["params"]
    # D has no seg/sketch vector layers (Fig. 5c: maps only); they held 8,389,632 dead parameters
    assert counts == {"G": 66465555, "D": 40016071}


def test_a_run_stopped_between_two_log_lines_resumes_to_the_same_log(tmp_path, capsys,
                                                                      monkeypatch):
    """SIGTERM after iteration 1 of a --log_every 2 run: the resumed line at 2 still holds the
    mean of steps 1 and 2 (the sum of step 1 travels in the checkpoint)."""
    flags = TINY + ["--sample_every", "100", "--r1_every", "2", "--iters", "3", "--log_every", "2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_main(flags + ["--out_dir", a], capsys)[0] == 0
    step = P.train_step

    def signalled(*args, **kwargs):
        out = step(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)   # as a cluster pre-empting the job
        return out

    monkeypatch.setattr(P, "train_step", signalled)
    code, _, err = run_main(flags + ["--out_dir", b], capsys)
    assert code == 128 + signal.SIGTERM and "stopped after iteration 1" in err, err
    monkeypatch.setattr(P, "train_step", step)
    assert run_main(flags + ["--out_dir", b, "--resume"], capsys)[0] == 0
    logs = [[{k: v for k, v in json.loads(line).items() if k != "img_per_s"}
             for line in open(os.path.join(d, "log.jsonl"))] for d in (a, b)]
    assert [r["iter"] for r in logs[1]] == [2, 3] and logs[0] == logs[1]


def test_resume_is_exact(tmp_path, capsys):
    flags = TINY + ["--sample_every", "100", "--log_every", "1", "--r1_every", "2",
                    "--ema_decay", "0"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_main(flags + ["--iters", "3", "--log_every", "2", "--out_dir", a], capsys)[0] == 0
    assert run_main(flags + ["--iters", "2", "--out_dir", b], capsys)[0] == 0
    assert run_main(flags + ["--iters", "3", "--out_dir", b, "--resume"], capsys)[0] == 0
    ka = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)
    kb = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)
    assert ka["iter"] == kb["iter"] == 3
    for net in ("G", "D", "ema"):
        for k, v in ka["state"][net].items():
            assert torch.equal(v, kb["state"][net][k]), (net, k)
    for net in ("opt_g", "opt_d"):                            # Adam's moments resume too
        for i, st in ka["state"][net]["state"].items():
            assert all(torch.equal(v, kb["state"][net]["state"][i][k]) for k, v in st.items())
    # the EMA is updated after every step: with --ema_decay 0 it is G itself
    assert all(torch.equal(v, ka["state"]["G"][k]) for k, v in ka["state"]["ema"].items())
    assert ka["config"]["ema_decay"] == 0 and "resume" not in ka["config"]
    assert os.path.isfile(os.path.join(a, "samples_000003.png"))
    log = [json.loads(line) for line in open(os.path.join(b, "log.jsonl"))]
    assert [r["iter"] for r in log] == [1, 2, 3]
    # a log line holds the means over its log interval (summed on the device in between)
    means = [json.loads(line) for line in open(os.path.join(a, "log.jsonl"))]
    assert [r["iter"] for r in means] == [2, 3]
    for row, steps in zip(means, (log[:2], log[2:])):
        for k in ("loss_d", "loss_g", "kl", "cx", "cy_d", "cy_g", "r1"):
            assert row[k] == pytest.approx(sum(r[k] for r in steps) / len(steps), abs=2e-6), k
    # the metrics run from the checkpoint: 16 subsets + the real ceiling (--sample: torchrun test)
    assert run_main(TINY + ["--eval", "--eval_n", "4", "--out_dir", a], capsys)[0] == 0
    subsets = json.load(open(os.path.join(a, "eval.json")))["subsets"]
    assert len(subsets) == 17 and subsets["real"]["label_fg_acc"] == 1.0
    assert subsets["uncond"]["pixel_diversity"] > 0
    # a checkpoint of another dataset: one sentence naming --data, not a load_state_dict traceback
    code, _, err = run_main(TINY + ["--eval", "--out_dir", a, "--data", "mm-celeba-hq",
                                    "--pretrained", "0", "--cx_features", "random"], capsys)
    assert code == 2 and "--data shapes (asked: mm-celeba-hq)" in err, err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_main(flags + ["--iters", "4", "--out_dir", a, "--resume",
                                     "--discriminator", "concat"], capsys)
    assert code == 2 and "in 'D'" in err and len(err.strip().splitlines()) == 1, err


# Every method flag that can be out of range: (flags, words of the one sentence). check_args runs
# before any data or model is built, so each costs a parse.
BAD_FLAGS = [
    (["--size", "48"], "power of two"),
    (["--size", "4"], "power of two"),
    (["--size", "16"], "size 16 does not suit dataset 'shapes'"),
    (["--ch_base", "0"], "--ch_base must be at least 1"),
    (["--ch_base", "16"], "--ch_base must be at least --size 32"),
    (["--ch_max", "0"], "--ch_max must be at least 1"),
    (["--z_base", "0"], "--z_base must be at least 1"),
    (["--z_max", "-1"], "--z_max must be at least 1"),
    (["--feat_dim", "0"], "--feat_dim must be at least 1"),
    (["--z0_dim", "0"], "--z0_dim must be at least 1"),
    (["--w_dim", "0"], "--w_dim must be at least 1"),
    (["--text_width", "-4"], "--text_width must be at least 0"),
    (["--text_width", "18"], "multiple of the small text tower's 4 heads"),
    (["--r1_every", "0"], "--r1_every must be at least 1"),
    (["--eval_n", "0"], "--eval_n must be at least 1"),
    (["--kl_warmup", "-1"], "--kl_warmup must be at least 0"),
    (["--bench", "0"], "--bench must be at least 1"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--tau", "0"], "--tau must be a finite number > 0"),
    (["--r1_gamma", "-1"], "--r1_gamma must be a finite number >= 0"),
    (["--w_text", "-0.1"], "--w_text must be a finite number >= 0"),
    (["--w_seg", "nan"], "--w_seg must be a finite number >= 0"),
    (["--w_sketch", "-1"], "--w_sketch must be a finite number >= 0"),
    (["--w_style", "-1"], "--w_style must be a finite number >= 0"),
    (["--lambda_cx", "-3"], "--lambda_cx must be a finite number >= 0"),
    (["--lambda_cy", "-0.3"], "--lambda_cy must be a finite number >= 0"),
    (["--ema_decay", "1.5"], "--ema_decay must be in [0, 1]"),
    (["--dropout_p", "1"], "--dropout_p must be in [0, 1)"),
    (["--dropout_p", "nan"], "--dropout_p must be in [0, 1)"),
    (["--pretrained", "1"], "pass --text_width 0 with it"),
    (["--text_width", "0"], "--text_width 0 means the pretrained CLIP text tower"),
    (["--data", "mm-celeba-hq", "--text_width", "0", "--eval", "--eval_n", "1"],
     "FID needs two images per set"),
    (["--data", "mm-celeba-hq", "--text_width", "0", "--eval", "--size", "16"],
     "--eval with --pretrained 1 needs --size 32 or more"),
    (["--batch_size", "1"], "need at least 2 per process"),
    (["--cx_features", "vgg"], "on a randomly initialised VGG-19"),
]


@pytest.mark.parametrize("flags,words", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_every_flag_out_of_range_is_one_sentence(flags, words, tmp_path, capsys):
    code, out, err = run_main(TINY + ["--iters", "1"] + flags + ["--out_dir", str(tmp_path / "run")],
                              capsys)                    # --iters 1: a missing check fails fast
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "run")              # refused before the folder is made


def test_contrastive_batch_is_per_process(monkeypatch):
    """Under torchrun each process contrasts its own share of the batch (Eq. 10-13)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(common.UserError, match="gives 1 image per process.*at least 4"):
        P.check_args(tiny_args("--batch_size", "2"))
    P.check_args(tiny_args("--batch_size", "4"))
    P.check_args(tiny_args("--batch_size", "2", "--lambda_cx", "0", "--lambda_cy", "0"))
    P.check_args(tiny_args("--batch_size", "2", "--eval"))      # the batch trains nothing there


def test_subset_scores_average_diversity_over_inputs_and_stream_the_fid_statistics():
    """--eval's running sums: diversity is the mean over all inputs (not over batch means), and
    the Inception statistics equal those of all images at once."""
    class Features(torch.nn.Module):             # a stand-in "Inception": fixed 2048 features
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3 * 4 * 4, 2048)

        def forward(self, x):                     # x in [0, 1]
            return self.proj(x.flatten(1))

    inception = Features()
    distance = lambda a, b: (a - b).abs().flatten(1).mean(1)        # noqa: E731
    scores = P.SubsetScores(tiny_args("--data", "mm-celeba-hq", "--pretrained", "0",
                                      "--cx_features", "random"), (distance, inception))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    scores.add(images[:3], None, images[:3] + 1)                     # distance 1 for 3 inputs
    scores.add(images[3:], None, images[3:] + 5)                     # distance 5 for 1 input
    assert scores.scores()["lpips_diversity"] == pytest.approx(2.0)  # (3 * 1 + 5) / 4
    with torch.no_grad():
        feats = inception((images + 1) / 2)
    for got, want in zip(scores.fid_stats.stats(), common.fid_stats(feats)):
        assert np.abs(got - want).max() < 1e-5          # float32 features of other batch splits
    offline = P.SubsetScores(tiny_args("--data", "mm-celeba-hq", "--pretrained", "0",
                                       "--cx_features", "random"), (None, None))
    offline.add(images, None, images.flip(0))
    assert offline.scores() == {"pixel_diversity": pytest.approx(
        float((images - images.flip(0)).abs().mean()))}


def test_eval_memory_is_set_by_the_batch_not_by_eval_n(tmp_path, capsys, monkeypatch):
    """--eval streams: the conditions and generated images alive at any moment (counted in
    items, through weak references) are the same for 1 and for 2 evaluated items: one batch of
    conditions, two samples of it (the pair for the diversity)."""
    run = str(tmp_path / "run")
    args, _, G, _ = build_tiny("--out_dir", run)                # an untrained run's checkpoint
    common.save_checkpoint(os.path.join(run, "ckpt.pt"), "poe_gan", args, 0,
                           {"ema": common.EMA(G)})
    live, peak = {}, {}

    def track(kind, tensor):
        live[kind] = live.get(kind, 0) + len(tensor)
        peak[kind] = max(peak.get(kind, 0), live[kind])
        weakref.finalize(tensor, lambda n=len(tensor): live.__setitem__(kind, live[kind] - n))

    conditioner, generator = P.Conditioner.__call__, P.Generator.forward

    def condition(self, batch):
        cond = conditioner(self, batch)
        track("conditions", cond["seg"])
        return cond

    def generate(self, cond, mask):
        x, kls = generator(self, cond, mask)
        track("images", x)
        return x, kls

    monkeypatch.setattr(P.Conditioner, "__call__", condition)
    monkeypatch.setattr(P.Generator, "forward", generate)
    peaks = {}
    for n in (1, 2):                                        # 1 and 2 batches of 1
        live.clear(), peak.clear()
        assert run_main(TINY + ["--eval", "--eval_n", str(n), "--batch_size", "1",
                                "--out_dir", run], capsys)[0] == 0
        assert json.load(open(os.path.join(run, "eval.json")))["n"] == n
        peaks[n] = dict(peak)
    assert peaks[1] == peaks[2] == {"conditions": 1, "images": 2}, peaks


def test_bad_inputs_give_one_sentence(tmp_path, capsys):
    out = run_cli("--data", "nowhere", cwd=tmp_path)              # a real process: exit status 2
    assert out.returncode == 2 and "no preset for --data nowhere" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    for argv, words in ((["--sample", "--out_dir", str(tmp_path / "e")], "no checkpoint at"),
                        (["--size", "48", "--dry_run"], "power of two"),
                        (["--data", "mm-celeba-hq", "--data_dir", str(tmp_path / "none"),
                          "--iters", "1"], str(tmp_path / "none"))):
        code, _, err = run_main(argv, capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    args = tiny_args()
    with pytest.raises(common.UserError, match="label values must lie"):
        P.Conditioner(args, P.dataset_info(args), torch.device("cpu"))(
            {"caption": ["a"], "label": torch.full((1, 32, 32), 9),
             "sketch": torch.zeros(1, 1, 32, 32), "style": torch.zeros(1, 3, 32, 32)})


# ---------------------------------------------------------------- paper presets under torchrun

def paper_stand_ins(home):
    """Random-weight stand-ins at the torch hub cache paths, marked as checked (a stand-in cannot
    have the official SHA-256): CLIP ViT-B/32's text tower (converted state dict) and a small BPE
    merges file, VGG-19 (Eq. 11), LPIPS-AlexNet (--eval)."""
    folder = os.path.join(home, "hub", "checkpoints")
    os.makedirs(folder)

    def place(state, name, marker):
        torch.save(state, os.path.join(folder, name))
        if marker:
            common.write_marker(os.path.join(folder, name), marker)

    place(common.CLIP("ViT-B/32", pretrained=False, vision=False).state_dict(),
          "ViT-B-32.state_dict.pt", "converted")
    with gzip.open(os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz"), "wt") as f:
        f.write("#version: 0.2\nh a\ni r</w>\nha ir</w>\n")
    common.write_marker(os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz"),
                        common.CLIP_BPE_SHA256)
    place(common.VGG19(pretrained=False).state_dict(), os.path.basename(common.VGG19_URL),
          "dcbb9e9d")
    lpips = common.LPIPS(net="alex", pretrained=False).state_dict()
    url, sha256 = common.LPIPS_NETS["alex"][:2]
    place({k: v for k, v in lpips.items() if k.startswith("features.")}, os.path.basename(url),
          sha256)
    place({k: v for k, v in lpips.items() if k.startswith("lin")}, "lpips_v0.1_alex.pth",
          common.LPIPS_LIN_SHA256["alex"])


def flat(path, value, mode):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, (32, 32), value).save(path)


def fake_mm_celeba_train4(root):
    """tests/test_data.py's fake MM-CelebA-HQ, its train split replaced by 4 items on which the
    loader's random choices (flip, caption among several) change nothing: flat image and mask,
    a blank sketch, one caption."""
    fake_mm_celeba(root, np.random.default_rng(0))
    ids = ["0", "1", "4", "5"]
    for k, i in enumerate(ids):
        if os.path.exists(f"{root}/image/{i}.jpg"):
            os.remove(f"{root}/image/{i}.jpg")
        flat(f"{root}/image/{i}.png", (40 + 50 * k, 200 - 40 * k, 90), "RGB")
        flat(f"{root}/mask/{i}.png", (0, 1, 13, 17)[k], "L")
        flat(f"{root}/sketch/{i}.png", 255, "L")
        with open(f"{root}/text/celeba-caption/{i}.txt", "w") as f:
            f.write(f"this person {k} has wavy hair\n")
    with open(f"{root}/train/filenames.pickle", "wb") as f:
        pickle.dump(ids, f, protocol=2)


def fake_coco_stuff_train4(root):
    """tests/test_data.py's fake COCO-Stuff, its train split replaced by 4 flat items (the random
    crop and flip change nothing) with one caption each."""
    fake_coco_stuff(root, np.random.default_rng(0))
    for folder in ("train_img", "train_label"):
        for name in os.listdir(f"{root}/{folder}"):
            os.remove(f"{root}/{folder}/{name}")
    annotations = []
    for k in range(4):
        flat(f"{root}/train_img/{k + 1:012d}.jpg", (40 + 50 * k, 200 - 40 * k, 90), "RGB")
        flat(f"{root}/train_label/{k + 1:012d}.png", (0, 90, 181, 7)[k], "L")
        annotations.append({"image_id": k + 1, "id": k, "caption": f"a flat picture {k}"})
    with open(f"{root}/annotations/captions_train2017.json", "w") as f:
        json.dump({"annotations": annotations}, f)


PAPER_RUNS = {"mm-celeba-hq": fake_mm_celeba_train4, "coco-stuff": fake_coco_stuff_train4}
# the preset's structure (pretrained CLIP text tower, VGG-19 Eq. 11 features, 3 modalities,
# every resolution 4..32) with its widths shrunk
PAPER_SHRINK = ["--size", "32", "--ch_base", "128", "--ch_max", "8", "--z_base", "64",
                "--z_max", "2", "--feat_dim", "16", "--z0_dim", "8", "--w_dim", "16",
                "--batch_size", "4", "--device", "cpu", "--log_every", "1"]


@pytest.fixture(scope="module")
def stand_in_home(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("torch_home"))
    paper_stand_ins(home)
    return home


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_paper_preset(preset, home, tmp_path, monkeypatch, *argv):
    root = str(tmp_path / "data")
    PAPER_RUNS[preset](root)
    monkeypatch.setenv("TORCH_HOME", home)                          # for the subprocesses
    monkeypatch.setattr(torch.hub, "get_dir", lambda: os.path.join(home, "hub"))
    return ["--data", preset, "--data_dir", root] + PAPER_SHRINK + list(argv)


def log_of(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


class PooledFeatures(torch.nn.Module):
    """A cheap stand-in for the FID Inception: 2048 fixed features of the image pooled to 4x4
    (the real network's forward at 299x299 is common.py's, tested there)."""

    def __init__(self, pretrained=True):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 16, 2048)

    def forward(self, x):                                        # x in [0, 1]
        return self.proj(F.adaptive_avg_pool2d(x, 4).flatten(1))


def eval_with_stand_ins(flags, out, monkeypatch, capsys):
    """--eval with LPIPS (random-weight stand-in files) and PooledFeatures for the Inception (and
    a 64-dim Frechet distance: the 2048-dim eigh takes seconds a subset here); returns eval.json
    and the networks built."""
    built, frechet = [], common.frechet_distance
    for name, cls in (("LPIPS", common.LPIPS), ("FIDInception", PooledFeatures)):
        monkeypatch.setattr(common, name,
                            lambda *a, cls=cls, **kw: built.append(cls) or cls(*a, **kw))

    def frechet_of_64_dims(mu1, sigma1, mu2, sigma2):
        assert mu1.shape == mu2.shape == (2048,) and sigma1.shape == sigma2.shape == (2048, 2048)
        return frechet(mu1[:64], sigma1[:64, :64], mu2[:64], sigma2[:64, :64])

    monkeypatch.setattr(common, "frechet_distance", frechet_of_64_dims)
    code, _, err = run_main(flags + ["--eval", "--eval_n", "2", "--batch_size", "2",
                                     "--out_dir", out], capsys)
    assert code == 0, err
    return json.load(open(os.path.join(out, "eval.json"))), built


def test_coco_stuff_preset_trains_one_step_then_evaluates(stand_in_home, tmp_path, monkeypatch,
                                                          capsys):
    """COCO-Stuff's preset (183 classes, captions, edge sketches, frozen CLIP, VGG Eq. 11), one
    step; then --eval with FID and LPIPS (stand-ins), each network loaded once."""
    flags = run_paper_preset("coco-stuff", stand_in_home, tmp_path, monkeypatch)
    out = str(tmp_path / "one")
    code, _, err = run_main(flags + ["--iters", "1", "--out_dir", out], capsys)
    assert code == 0, err
    (row,) = log_of(out)
    assert row["r1"] > 0 and row["cx"] > 0 and all(math.isfinite(v) for v in row.values())
    result, built = eval_with_stand_ins(flags, out, monkeypatch, capsys)
    assert len(built) == 2                                       # once per --eval, not per subset
    assert result["n"] == 2 and len(result["subsets"]) == 8      # 2^3 subsets of text, seg, sketch
    for scores in result["subsets"].values():
        assert math.isfinite(scores["fid"]) and scores["lpips_diversity"] > 0


def test_paper_preset_under_torchrun_equals_one_process_then_resume_and_sample(
        tmp_path, monkeypatch, capsys):
    """MM-CelebA-HQ's preset, two steps under torchrun (2 ranks, 2 images each), with the offline
    text tower and Eq. (11) features (the frozen CLIP and VGG run outside DDP; the coco-stuff test
    runs them). The first step gives one process's losses on the whole batch of 4 for every loss
    that is a mean over samples (GAN losses, KL, R1). The contrastive losses (Eq. 10-13) contrast
    each sample with the others of its rank's batch, so they differ by design (negatives: 1 per
    sample vs 3), and so do all losses after the first update. Then, in one process, --resume of
    the torchrun checkpoint and --sample."""
    flags = run_paper_preset("mm-celeba-hq", str(tmp_path / "no_files"), tmp_path, monkeypatch,
                             "--pretrained", "0", "--text_width", "16", "--cx_features", "random")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    code, _, err = run_main(flags + ["--iters", "1", "--out_dir", one], capsys)
    assert code == 0, err
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_port", str(free_port()), os.path.join(ROOT, "poe_gan.py")]
                         + flags + ["--iters", "2", "--out_dir", two], capture_output=True,
                         text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         timeout=300)              # a second step: every DDP bucket was reduced
    assert res.returncode == 0, res.stderr[-3000:]
    ref, ddp = log_of(one)[0], log_of(two)[0]
    assert ref["r1"] > 0                                          # lazy R1 runs at iteration 0
    for k in ("loss_d", "loss_g", "kl", "r1"):
        assert math.isclose(ddp[k], ref[k], rel_tol=1e-4, abs_tol=1e-6), (k, ddp[k], ref[k])
    assert run_main(flags + ["--iters", "3", "--out_dir", two, "--resume"], capsys)[0] == 0
    assert [r["iter"] for r in log_of(two)] == [1, 2, 3] and log_of(two)[0] == ddp
    assert all(math.isfinite(v) for r in log_of(two) for v in r.values())
    assert run_main(flags + ["--sample", "--out_dir", two], capsys)[0] == 0
    assert os.path.getsize(os.path.join(two, "subsets_0.png")) > 0


def test_sample_gaussian_draws_with_the_standard_deviation_of_its_log_variance():
    """Eq. (3)-(4)'s reparameterisation: z = mu + exp(logvar / 2) eps (not exp(logvar) eps)."""
    mu, logvar = torch.tensor([0.5, -1.0]), torch.tensor([1.5, -2.0])
    eps = torch.tensor([0.3, -0.7])
    z = P.sample_gaussian(mu, logvar, lambda shape, device, dtype: eps.clone())
    assert torch.allclose(z, mu + torch.exp(logvar / 2) * eps)
