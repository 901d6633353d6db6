"""Tests of poe_gan.py: the paper's identities (Eq. 4, 5, 7, 9), the subset invariants, a short
training run, exact resume, the ablation switches and the error sentences. CPU, no network."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import data
import poe_gan as P

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


def test_kl_loss_weights_and_presence():
    args = tiny_args()
    mods = ("text", "seg", "sketch", "style")
    kls = [("text", 0, torch.tensor([1.0, 2.0])), ("seg", 0, torch.tensor([4.0, 8.0])),
           ("seg", 2, torch.tensor([1.0, 1.0])), ("style", 0, torch.tensor([3.0, 5.0]))]
    mask = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 1]])
    got = P.kl_loss(kls, mask, mods, args)
    want = (args.w_text * (1.0 + 0) / 2 + args.w_seg * (4 + 8) / 2 + args.w_seg * (1 + 1) / 2
            + args.w_style * (0 + 5) / 2)
    assert abs(got.item() - want) < 1e-6


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


# ---------------------------------------------------------------- offline text tokenizer

def test_word_tokenizer_known_ids_unknown_words_padding_and_truncation():
    tok = P.text_tokenizer(tiny_args())                     # shapes: one id per caption word
    assert isinstance(tok, P.WordTokenizer) and tok.vocab_size == 23
    assert (tok.sot, tok.eot) == (21, 22)                   # the two largest ids: CLIP's EOT pooling
    ids = tok(["A red circle above a blue striped diamond"])
    assert ids.shape == (1, 64) and ids.dtype == torch.long
    assert ids[0, :10].tolist() == [21, 2, 14, 7, 3, 2, 6, 17, 9, 22]
    assert ids[0, 10:].eq(0).all()                          # zero padding after EOT
    assert int(ids[0].argmax()) == 9                        # the tower pools here
    assert tok(["a purple circle!"])[0, :6].tolist() == [21, 2, 1, 7, 1, 22]   # <unk> = 1
    long = " ".join(["red"] * 100)
    row = tok([long], truncate=True)[0]
    assert row[0] == tok.sot and row[-1] == tok.eot and (row[1:-1] == 14).all()
    with pytest.raises(common.UserError, match="more than the context of 64"):
        tok([long])
    # every built-in caption is in the vocabulary and fits (data.shapes_caption's words)
    ds = data.get_dataset("shapes", size=32)
    for i in range(300):
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
    args, info, G, D = build_tiny()
    cond_of = P.Conditioner(args, info, torch.device("cpu"))
    cond = cond_of(batch)
    other = cond_of({**batch, "caption": ["a white square"] * 4, "label": batch["label"].flip(1),
                     "sketch": batch["sketch"].flip(2), "style": batch["style"].flip(3)})
    subsets = P.all_subsets(G.modalities)
    assert len(subsets) == 16 and subsets[0] == ()
    with torch.no_grad():
        for subset in subsets:
            mask = P.subset_mask(subset, G.modalities, 4, "cpu")
            torch.manual_seed(7)
            x, kls = G(cond, mask)
            assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all()
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


# ---------------------------------------------------------------- ablation switches

def test_ablation_switches():
    _, _, Gc, _ = build_tiny("--fusion", "concat")
    assert not hasattr(Gc, "global_experts") and not hasattr(Gc.blocks[0], "experts")
    _, _, G, _ = build_tiny()
    assert set(G.global_experts) == {"text", "seg", "sketch", "style"}
    assert set(G.blocks[0].experts) == {"seg", "sketch"}       # local experts: spatial only
    torch.manual_seed(0)
    mask = P.dropout_mask(4000, 4, 0.5, "cpu")
    assert abs(mask.mean().item() - 0.5) < 0.03                # per sample, per modality
    assert mask.std(0).min() > 0.4


def test_training_steps_lower_d_loss_and_contrastive(shapes_batch):
    batch, _ = shapes_batch
    args, info, G, D = build_tiny("--lr", "0.004")
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.0, 0.99))
    rt = common.Runtime(torch.device("cpu"), torch.float32)
    cond = P.Conditioner(args, info, rt.device)(batch)
    torch.manual_seed(0)
    hist = [P.train_step(G, D, opt_g, opt_d, batch["image"], cond, it, args, rt,
                         P.RandomConvFeatures(3))
            for it in range(24)]
    first = lambda k: sum(h[k] for h in hist[:4]) / 4          # noqa: E731
    last = lambda k: sum(h[k] for h in hist[-4:]) / 4           # noqa: E731
    assert last("loss_d") < first("loss_d") - 0.1
    assert all(math.isfinite(h[k]) for h in hist for k in h)


def test_no_kl_and_no_dropout_flags(shapes_batch):
    batch, _ = shapes_batch
    for flags, check in ((["--no_kl"], lambda s: s["kl"] == 0.0),
                         (["--fusion", "concat"], lambda s: s["kl"] == 0.0),
                         (["--kl_warmup", "1000"], lambda s: 0.0 < s["kl"] < 0.01),
                         ([], lambda s: s["kl"] > 0.05)):
        args, info, G, D = build_tiny(*flags)
        opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.0, 0.99))
        opt_d = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.0, 0.99))
        rt = common.Runtime(torch.device("cpu"), torch.float32)
        cond = P.Conditioner(args, info, rt.device)(batch)
        torch.manual_seed(1)
        features = P.RandomConvFeatures(3)
        assert check(P.train_step(G, D, opt_g, opt_d, batch["image"], cond, 1, args, rt, features))


# ---------------------------------------------------------------- toy metrics

def test_toy_metrics_reward_the_right_images():
    ds = data.get_dataset("shapes", size=32, split="test")
    batch = torch.utils.data.default_collate([ds[i] for i in range(24)])
    real = P.toy_metrics(batch["image"], batch)
    shuffled = P.toy_metrics(batch["image"].roll(1, 0), batch)
    assert real["label_fg_acc"] == 1.0 and real["in_mode"] == 1.0
    assert real["caption_colour"] > 0.95 and real["style_colour"] > 0.95
    for k in ("label_fg_acc", "in_mode", "sketch_f1", "caption_object", "style_colour",
              "colour_precision"):
        assert real[k] > shuffled[k] + 0.1, k
    assert real["colour_precision"] > 0.95
    # precision, unlike recall, drops when extra objects in unasked colours are drawn
    both = torch.maximum(batch["image"], batch["image"].roll(1, 0))
    assert P.toy_metrics(both, batch)["colour_precision"] < real["colour_precision"] - 0.1


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


def test_bench_runs_the_training_step_on_shapes_and_on_a_synthetic_paper_batch(capsys):
    for extra in ([], ["--data", "mm-celeba-hq", "--text_width", "0", "--pretrained", "1",
                       "--cx_features", "random"]):
        code, out, err = run_main(TINY + ["--bench", "1", "--dtype", "bfloat16"] + extra, capsys)
        assert code == 0, err
        rows = json.loads(out.strip().splitlines()[-1])["bench"]
        assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
        assert all(r["img_per_s"] > 0 for r in rows)


def test_dry_run_parameter_counts(capsys):
    code, out, _ = run_main(["--dry_run"], capsys)
    assert code == 0
    counts = json.loads(out.strip().splitlines()[-1])["params"]
    # shapes: the text towers' token embeddings hold 23 word ids (WordTokenizer), 64 wide
    assert counts == {"G": 482200, "D": 379461}
    # paper preset (MM-CelebA-HQ 256, text + seg + sketch; the frozen CLIP tower not counted)
    code, out, _ = run_main(["--dry_run", "--data", "mm-celeba-hq"], capsys)
    counts = json.loads(out.strip().splitlines()[-1])["params"]
    assert counts == {"G": 66465555, "D": 48405703}


def test_resume_is_exact(tmp_path, capsys):
    flags = TINY + ["--sample_every", "100", "--log_every", "1", "--r1_every", "2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_main(flags + ["--iters", "4", "--out_dir", a], capsys)[0] == 0
    assert run_main(flags + ["--iters", "2", "--out_dir", b], capsys)[0] == 0
    assert run_main(flags + ["--iters", "4", "--out_dir", b, "--resume"], capsys)[0] == 0
    ka = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)
    kb = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)
    assert ka["iter"] == kb["iter"] == 4
    for net in ("G", "D", "ema"):
        for k, v in ka["state"][net].items():
            assert torch.equal(v, kb["state"][net][k]), (net, k)
    assert os.path.isfile(os.path.join(a, "samples_000004.png"))
    log = [json.loads(line) for line in open(os.path.join(b, "log.jsonl"))]
    assert [r["iter"] for r in log] == [1, 2, 3, 4]
    # the controls and the metrics run from the checkpoint: 16 subsets + the real ceiling
    assert run_main(TINY + ["--sample", "--out_dir", a], capsys)[0] == 0
    assert os.path.isfile(os.path.join(a, "subsets_0.png"))
    assert run_main(TINY + ["--eval", "--eval_n", "8", "--out_dir", a], capsys)[0] == 0
    subsets = json.load(open(os.path.join(a, "eval.json")))["subsets"]
    assert len(subsets) == 17 and subsets["real"]["label_fg_acc"] == 1.0
    assert subsets["uncond"]["pixel_diversity"] > 0


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
