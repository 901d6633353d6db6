"""Tests of ummgan.py: uMM-GAN / sMM-GAN identities (§3-4), StyleGAN pieces, metrics, plumbing."""

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402
import ummgan  # noqa: E402

TINY = ["--size", "16", "--style_dim", "16", "--max_channels", "16", "--channel_base", "128"]
RUN_TINY = ["--size", "32", "--style_dim", "16", "--max_channels", "8", "--channel_base", "128"]


def make_args(*extra, data="hshape"):
    return common.parse_args(ummgan.build_parser(), ummgan.PRESETS, "ummgan", data,
                             ["--data", data, *TINY, *extra])


def build(*extra, seed=0, data="hshape"):
    args = make_args(*extra, data=data)
    torch.manual_seed(seed)
    G, D = ummgan.build(args)
    return args, G, D


def stylegan_param_count(args, img_ch=1):
    """Plain StyleGAN (one constant, no w_R branch) counted by hand from the architecture."""
    d, ch = args.style_dim, lambda r: ummgan.channels_at(r, args)
    n = 8 * (d * d + d)                      # mapping: 8 FC with bias
    n += ch(4) * 16                          # the single root constant
    adain = lambda c: d * 2 * c + 2 * c     # style FC to (gamma, beta)
    noise = lambda c: c
    conv = lambda i, o, k: i * o * k * k + o
    res = 4
    while res <= args.size:
        c = ch(res)
        if res == 4:
            n += noise(c) + adain(c)
        else:
            n += conv(ch(res // 2), c, 3) + noise(c) + adain(c)
        n += conv(c, c, 3) + noise(c) + adain(c) + conv(c, img_ch, 1)
        res *= 2
    return n


# ---------------------------------------------------------------------------------------------
# uMM-GAN identities
# ---------------------------------------------------------------------------------------------

def test_k1_is_exactly_stylegan_parameters():
    args, G, _ = build("--K", "1")
    assert G.mapping.mix_head is None
    assert common.count_params(G) == stylegan_param_count(args)
    _, G_smm, _ = build("--K", "1", "--mode", "smm")
    assert common.count_params(G_smm) == common.count_params(G)


def test_k1_output_equals_k2_with_equal_constants_for_any_mixing():
    """Sum_k w_R[k] C with sum_k w_R[k] = 1 is C: with both constants equal to StyleGAN's one,
    uMM-GAN K=2 renders exactly what the K=1 StyleGAN renders for the same z and noise."""
    _, G1, _ = build("--K", "1", seed=0)
    _, G2, _ = build("--K", "2", seed=5)
    sd = {k: v for k, v in G1.state_dict().items() if k != "constants"}
    G2.load_state_dict(sd, strict=False)
    with torch.no_grad():
        G2.constants.copy_(G1.constants.expand(2, -1, -1, -1))
    z = torch.randn(4, 16)
    torch.manual_seed(1)
    a = G1(z)
    torch.manual_seed(1)
    b = G2(z)
    assert a.shape == (4, 1, 16, 16)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)  # float rounding of w_R C + (1-w_R) C
    # with different constants the K = 2 output does change (the test can fail)
    with torch.no_grad():
        G2.constants[1].add_(1.0)
    torch.manual_seed(1)
    assert not torch.allclose(a, G2(z), atol=1e-3)


def test_mixing_weights_are_softmax_of_shared_trunk():
    _, G, _ = build("--K", "4")
    z = torch.randn(6, 16)
    w, w_R = G.mapping(z)
    assert w_R.shape == (6, 4) and (w_R > 0).all()
    assert torch.allclose(w_R.sum(1), torch.ones(6), atol=1e-6)
    assert G.mapping.branch_after == 6                     # the preset: share 6, replace FC 7

    def by_hand(G, z, shared):  # the trunk's first `shared` layers, the head FC, a softmax
        h = common.PixelNorm()(z)
        for layer in G.mapping.layers[:shared]:
            h = ummgan.lrelu(layer(h))
        return torch.softmax(G.mapping.mix_head(h), 1)
    assert torch.allclose(w_R, by_hand(G, z, 6), atol=1e-6)
    _, G7, _ = build("--K", "4", "--branch_after", "7")   # the other reading: share 7
    assert torch.allclose(G7.mapping(z)[1], by_hand(G7, z, 7), atol=1e-6)
    assert not torch.allclose(G7.mapping(z)[1], by_hand(G7, z, 6), atol=1e-3)
    with torch.no_grad():  # a shared layer moves both w and w_R
        G.mapping.layers[0].weight.mul_(-1.0)
    w2, w_R2 = G.mapping(z)
    assert not torch.allclose(w, w2) and not torch.allclose(w_R, w_R2)
    with torch.no_grad():  # the last FC is w's own: w_R stays
        G.mapping.layers[-1].weight.mul_(-1.0)
    w3, w_R3 = G.mapping(z)
    assert not torch.allclose(w2, w3) and torch.equal(w_R2, w_R3)
    with torch.no_grad():  # the head is w_R's own: w stays
        G.mapping.mix_head.weight.mul_(-1.0)
    w4, w_R4 = G.mapping(z)
    assert torch.equal(w3, w4) and not torch.allclose(w_R3, w_R4)


def test_one_hot_mix_reproduces_a_single_constant_exactly():
    _, G, _ = build("--K", "3")
    for k in range(3):
        one_hot = F.one_hot(torch.tensor([k, k]), 3).float()
        assert torch.equal(G.root(one_hot), G.constants[k].expand(2, -1, -1, -1))
    # and the whole generator on mode k equals a StyleGAN whose constant is C_k
    _, G1, _ = build("--K", "1")
    G1.load_state_dict({k: v for k, v in G.state_dict().items()
                        if not k.startswith(("constants", "mapping.mix_head"))}, strict=False)
    with torch.no_grad():
        G1.constants.copy_(G.constants[2:3])
    z = torch.randn(3, 16)
    a = G(z, modes=torch.full((3,), 2), noise_off=True)
    b = G1(z, noise_off=True)
    assert torch.equal(a, b)


def test_added_parameters_match_paper_count(capsys):
    """§4: 512 K (w_R head) + 4*4*512 (K-1) (extra constants), plus K head biases we keep."""
    for K in (2, 4, 16):
        ummgan.main(["--data", "hshape", "--size", "8", "--style_dim", "512", "--max_channels",
                     "512", "--channel_base", "16384", "--K", str(K), "--dry_run"])
        out = capsys.readouterr().out.strip().splitlines()
        base = make_args("--K", "1", "--size", "8", "--style_dim", "512", "--max_channels",
                         "512", "--channel_base", "16384")
        g = json.loads(out[-1])["params"]["G"]
        added = 512 * K + 4 * 4 * 512 * (K - 1) + K
        assert g - stylegan_param_count(base) == added
        assert f"G adds {added} parameters over StyleGAN (K=1)" in out[-3]  # the printed line


# ---------------------------------------------------------------------------------------------
# sMM-GAN
# ---------------------------------------------------------------------------------------------

def test_smm_classifier_loss_gives_g_no_gradient_when_mode_right_and_confident():
    args, G, D = build("--K", "2", "--mode", "smm")
    with torch.no_grad():
        D.classifier.bias.copy_(torch.tensor([60.0, -60.0]))  # D sure: every image is mode 0
    z = torch.randn(4, 16)

    def g_grad_norm(mode):
        G.zero_grad()
        img = G(z, modes=torch.full((4,), mode), noise_off=True)
        _, cls = D(img)
        ummgan.smm_class_loss(cls, torch.full((4,), mode)).backward()
        return sum(p.grad.abs().sum() for p in G.parameters() if p.grad is not None).item()

    assert g_grad_norm(0) < 1e-12   # right and confident: nothing to learn
    assert g_grad_norm(1) > 1e-3    # wrong mode: G is pushed


def test_smm_training_steps_lower_the_classifier_loss():
    """Real images of two modes (bright left or right half): D's K-way classifier learns them."""
    args = make_args("--K", "2", "--mode", "smm", "--progressive", "0", "--size", "8",
                     "--lr", "0.003")
    rt = common.setup_runtime(args)
    G, D = ummgan.build(args)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.0, 0.99))
    labels = torch.arange(16) % 2
    real = -torch.ones(16, 1, 8, 8)
    real[labels == 0, :, :, :4] = 1
    real[labels == 1, :, :, 4:] = 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 30 steps of tiny ops: threads only wait on a loaded machine
    try:
        losses = [float(ummgan.train_step(G, D, opt_g, opt_d, real.clone(), labels, i, args,
                                          rt)["cls_d"]) for i in range(30)]
    finally:
        torch.set_num_threads(threads)
    assert losses[0] > 0.5 and sum(losses[-5:]) / 5 < 0.5 * losses[0]


# ---------------------------------------------------------------------------------------------
# StyleGAN pieces: progressive fade-in, schedule, style mixing, truncation
# ---------------------------------------------------------------------------------------------

def test_fade_in_alpha_0_and_1_equal_lower_and_higher_paths():
    _, G, D = build("--K", "2")
    z = torch.randn(3, 16)
    w, w_R = G.mapping(z)
    styles = w[:, None].expand(-1, G.n_styles, -1)
    with torch.no_grad():
        for s in (1, 2):
            low = G.synthesis(styles, w_R, s - 1, 1.0, noise_off=True)
            high = G.synthesis(styles, w_R, s, 1.0, noise_off=True)
            assert torch.allclose(G.synthesis(styles, w_R, s, 1.0 - 1e-9, noise_off=True),
                                  high, atol=1e-6)
            assert torch.allclose(G.synthesis(styles, w_R, s, 0.0, noise_off=True),
                                  F.interpolate(low, scale_factor=2), atol=1e-6)
            x = torch.randn(4, 1, 4 * 2 ** s, 4 * 2 ** s)
            assert torch.allclose(D(x, s, 0.0)[0], D(F.avg_pool2d(x, 2), s - 1, 1.0)[0],
                                  atol=1e-5)
            assert not torch.allclose(D(x, s, 0.5)[0], D(x, s, 1.0)[0])


def test_progressive_schedule():
    args = make_args("--init_size", "4", "--phase_iters", "10", "--size", "16")
    got = [ummgan.schedule(i, args) for i in (0, 9, 10, 12, 15, 19, 20, 25, 30, 99)]
    assert got == [(0, 1.0), (0, 1.0), (1, 0.0), (1, 0.4), (1, 1.0), (1, 1.0), (2, 0.0),
                   (2, 1.0), (2, 1.0), (2, 1.0)]
    fixed = make_args("--progressive", "0")
    assert ummgan.schedule(0, fixed) == (2, 1.0)


def test_style_mixing_and_truncation():
    _, G, _ = build("--K", "2")
    z, z2 = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        plain = G(z, noise_off=True)
        assert torch.equal(G(z, z2=z2, crossover=G.n_styles, noise_off=True), plain)
        assert not torch.allclose(G(z, z2=z2, crossover=2, noise_off=True), plain)
        w_avg = G.mean_style(n=2000)
        modes = torch.zeros(3, dtype=torch.long)
        avg = G(z, modes=modes, psi=0.0, w_avg=w_avg, noise_off=True)  # psi = 0: w = w_avg
        assert torch.allclose(avg, avg[:1].expand_as(avg), atol=1e-6)
        assert torch.equal(G(z, modes=modes, psi=1.0, w_avg=w_avg, noise_off=True),
                           G(z, modes=modes, noise_off=True))


def test_minibatch_stddev_feature():
    x = torch.randn(8, 3, 4, 4)
    y = ummgan.minibatch_stddev(x)
    assert y.shape == (8, 4, 4, 4)
    g = x.view(4, 2, 3, 4, 4)
    expect = (g.var(0, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3))  # (2,)
    assert torch.allclose(y[:, 3, 0, 0], expect.repeat(4), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# H-shape metric (Fig. 6)
# ---------------------------------------------------------------------------------------------

def test_jaccard_index_on_hand_made_point_sets():
    J = lambda a, b: data.hshape_jaccard_between(a, b, bins=4)   # cells of 10 x 10 units
    a = torch.tensor([[5.0, 5.0], [15.0, 5.0], [25.0, 5.0], [35.0, 5.0]]).repeat(10, 1)
    assert J(a, a) == 1.0
    far = torch.tensor([[5.0, 35.0]]).repeat(40, 1)
    assert J(a, far) == 0.0
    half = a[a[:, 0] < 20]                  # covers 2 of the 4 cells of a
    assert J(a, half) == 0.5 and J(half, a) == 0.5
    shifted = a + torch.tensor([10.0, 0.0])  # cells 1..3 and one off the square: 3 of union 4
    assert J(a, shifted) == 0.75
    # a cell holding less than half the uniform mass (1/32 here) is not support
    dense = a.repeat(10, 1)                                 # 400 points
    assert J(dense, torch.cat([dense, torch.tensor([[5.0, 35.0]])])) == 1.0
    assert J(dense, torch.cat([dense, torch.tensor([[5.0, 35.0]]).repeat(13, 1)])) == 0.8
    # widths off the square count in N but in no cell: 40 outside points halve a's cell masses
    # (10/80 = 1/8 >= 1/32: still support), 400 of them push them below (10/440 < 1/32)
    out = torch.tensor([[45.0, 5.0]])
    assert J(a, torch.cat([a, out.repeat(40, 1)])) == 1.0
    assert J(a, torch.cat([a, out.repeat(400, 1)])) == 0.0
    # one binning rule: against the exact H it agrees with data.hshape_jaccard
    rng = __import__("numpy").random.default_rng(0)
    w = torch.from_numpy(data.hshape_sample(rng, 4000)) * torch.tensor([1.0, 0.8])
    cells = (torch.arange(20) + 0.5) * 2
    centres = torch.stack(torch.meshgrid(cells, cells, indexing="ij"), -1).reshape(-1, 2)
    truth = centres[data.hshape_region(centres) >= 0].repeat_interleave(10, 0)
    assert data.hshape_jaccard_between(truth, w) == pytest.approx(data.hshape_jaccard(w))


def test_hshape_report_keys_measure_the_right_sets():
    """jaccard: real vs generated; the ceiling: real vs real test; outside_H and width_sum per
    set: a generator that puts everything in the gap between legs and bar scores outside 1."""
    rng = __import__("numpy").random.default_rng(0)
    real = torch.from_numpy(data.hshape_sample(rng, 4000))
    test = torch.from_numpy(data.hshape_sample(rng, 4000))
    gap = torch.tensor([[20.0, 5.0]]).repeat(1000, 1) + torch.rand(1000, 2)
    r = data.hshape_report(real, gap, test)
    assert r["jaccard"] == 0.0 and r["jaccard_vs_true_H"] == 0.0
    assert r["jaccard_real_vs_real"] > 0.9
    assert r["outside_H"] == {"real": 0.0, "generated": 1.0}
    assert r["width_sum"]["generated"] == pytest.approx([float(gap.sum(1).mean()),
                                                         float(gap.sum(1).std())])
    assert r["width_sum"]["real"][0] == pytest.approx(40.0, abs=1.0)


# ---------------------------------------------------------------------------------------------
# Plumbing: exact resume, bad input
# ---------------------------------------------------------------------------------------------

RUN = RUN_TINY + ["--batch_size", "4", "--iters", "4", "--phase_iters", "2", "--init_size", "8",
              "--log_every", "1", "--sample_every", "100", "--num_workers", "0", "--K", "2"]


def test_resume_is_exact(tmp_path):
    torch.set_num_threads(1)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    ummgan.main(RUN + ["--out_dir", full, "--ckpt_every", "100"])
    ummgan.main(RUN + ["--out_dir", part, "--iters", "2", "--ckpt_every", "2"])
    ummgan.main(RUN + ["--out_dir", part, "--resume", "--ckpt_every", "100"])
    a = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert a["iter"] == b["iter"] == 4
    for net in ("G", "D", "G_ema"):
        for key, value in a["state"][net].items():
            assert torch.equal(value, b["state"][net][key]), (net, key)
    logs = [open(os.path.join(d, "log.jsonl")).read().splitlines() for d in (full, part)]
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "img_per_s"}
                           for x in lines]
    assert strip(logs[0]) == strip(logs[1]) and len(logs[0]) == 4


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as info:
        common.run_main(lambda: ummgan.main(argv))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.count("\n") == 0, err
    return err


def test_image_mean_depends_on_the_last_style_only():
    """Why style mixing hurts on hshape: the last AdaIN sets each channel's spatial mean to its
    bias, and to_rgb is linear, so with the last style from z2 the image mean ignores z."""
    args, G, _ = build("--K", "2")
    gen = torch.Generator().manual_seed(0)
    z1, z1b, z2 = (torch.randn(4, args.style_dim, generator=gen) for _ in range(3))
    last = G.n_styles - 1
    with torch.no_grad():
        a = G(z=z1, z2=z2, crossover=last)
        b = G(z=z1b, z2=z2, crossover=last)
    assert (a - b).abs().mean() > 1e-2                        # z changes the image ...
    torch.testing.assert_close(a.mean((1, 2, 3)), b.mean((1, 2, 3)), atol=1e-5, rtol=0)  # ... not its mean


def test_bench_times_training_at_full_size(capsys, monkeypatch, tmp_path):
    steps = []
    train_step = ummgan.train_step

    def recorded(*a, **k):
        steps.append(train_step(*a, **k))
        return steps[-1]
    monkeypatch.setattr(ummgan, "train_step", recorded)
    for extra in ([], ["--data", "folder", "--mode", "smm", "--K", "2", "--mixing_prob", "1"]):
        steps.clear()
        out = tmp_path / str(len(extra))
        argv = ["--batch_size", "4", *RUN_TINY, *extra]
        ummgan.main(["--bench", "1", "--out_dir", str(out), *argv])
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert json.loads((out / "bench.json").read_text())["training"] == printed
        assert len(steps) == 3 + 1 + 1               # warm-up, the FLOP count, timed; one dtype
        assert all(s["res"] == 32 and s["alpha"] == 1.0 for s in steps)   # no growing
        if "smm" in extra:
            assert all(s["cls_d"] > 0 for s in steps)            # D's classifier is trained too
        # --dry_run's count on shape-only tensors is the real step's (style mixing drawn always
        # or never here: a mixed step also maps a second z)
        args = common.parse_args(ummgan.build_parser(), ummgan.PRESETS, "ummgan", "hshape",
                                 argv + ["--dry_run"])
        assert printed["gflops_per_img"] == common.significant(ummgan.training_flops(args) / 1e9)
    ummgan.main(["--data", "folder", "--dry_run"])
    assert "training: 627.4 GFLOP per image" in capsys.readouterr().out  # the README's figure


def test_bad_input_gives_one_sentence_and_exit_2(tmp_path, capsys):
    assert "--K must be at least 1" in run_cli(["--K", "0", "--dry_run"], capsys)
    assert "power of two" in run_cli(["--size", "24", "--dry_run"], capsys)
    assert "no checkpoint at" in run_cli(["--sample", "--out_dir", str(tmp_path)], capsys)
    err = run_cli(["--mode", "smm", "--out_dir", str(tmp_path / "s")] + RUN_TINY, capsys)
    assert "class label" in err and "--mode umm" in err
    out = str(tmp_path / "r")
    ummgan.main(RUN + ["--out_dir", out, "--iters", "1"])
    capsys.readouterr()
    err = run_cli(RUN + ["--out_dir", out, "--resume", "--K", "3"], capsys)
    assert "--K 2 (asked: 3)" in err
    assert "already exists" in run_cli(RUN + ["--out_dir", out], capsys)


def test_sample_and_eval_write_the_controls(tmp_path, capsys):
    """--sample: one mode_style row per constant (Fig. 7), one modes tile per constant (Fig. 10);
    --eval: Jaccard indices in [0, 1], the real-vs-real ceiling above the untrained generator."""
    from PIL import Image
    out = str(tmp_path / "run")
    ummgan.main(RUN + ["--out_dir", out, "--iters", "2", "--K", "3"])
    ummgan.main(RUN + ["--out_dir", out, "--K", "3", "--sample", "--psi", "0.7"])
    usage = json.loads(capsys.readouterr().out.strip().splitlines()[-2])["mode_usage_argmax"]
    assert len(usage) == 3 and abs(sum(usage) - 1) < 1e-5
    tile = 32 + 2
    assert Image.open(os.path.join(out, "mode_style.png")).size == (8 * tile + 2, 3 * tile + 2)
    assert Image.open(os.path.join(out, "modes.png")).size == (3 * tile + 2, tile + 2)
    ummgan.main(RUN + ["--out_dir", out, "--K", "3", "--eval", "--eval_n", "200"])
    result = json.load(open(os.path.join(out, "eval.json")))
    assert 0 <= result["jaccard"] <= 1 and result["fid"] is None
    assert result["jaccard_real_vs_real"] > result["jaccard"]
    eval_args = common.parse_args(ummgan.build_parser(), ummgan.PRESETS, "ummgan", "hshape",
                                  RUN + ["--out_dir", out, "--eval"])
    real_sum = data.hshape_measure(torch.cat(list(ummgan.real_batches(
        ummgan.load_data(eval_args), 200, 64)))).sum(1)
    assert result["width_sum"]["real"] == pytest.approx([float(real_sum.mean()),
                                                         float(real_sum.std())], rel=1e-5)
    assert result["outside_H"]["real"] < 0.01 and 0 <= result["outside_H"]["generated"] <= 1
    assert len(result["mean_w_R"]) == 3 and abs(sum(result["mode_usage_argmax"]) - 1) < 1e-5
    assert os.path.exists(os.path.join(out, "densities.png"))


def test_eval_memory_does_not_grow_with_eval_n(tmp_path, monkeypatch):
    """--eval streams: the tensors alive after each measured batch are the same for 4 and for
    8 images per set (real, generated, the second real set; K = 1, so no per-mode sets)."""
    from test_inade import live_tensor_bytes
    out = str(tmp_path / "run")
    ummgan.main(RUN + ["--out_dir", out, "--iters", "1", "--K", "1"])
    measure_batch = ummgan.measure_batch

    def peak(eval_n):
        peaks = []

        def recording(*args, **kwargs):
            result = measure_batch(*args, **kwargs)
            peaks.append(live_tensor_bytes())   # the batch's measures are still held here
            return result
        monkeypatch.setattr(ummgan, "measure_batch", recording)
        ummgan.main(RUN + ["--out_dir", out, "--K", "1", "--eval", "--eval_n", str(eval_n)])
        return max(peaks), len(peaks)

    (small, batches_small), (large, batches_large) = peak(4), peak(8)
    assert (batches_small, batches_large) == (3, 6)  # real, generated, real test
    one_batch = 4 * 1 * 32 * 32 * 4                             # 4 grey 32x32 float images
    assert large - small < one_batch / 2, (small, large)


# ---------------------------------------------------------------------------------------------
# Random streams: grids give every generator back; --sample/--eval use the checkpoint's flags
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fake_cuda_generator(monkeypatch):
    """A stand-in for the CUDA generators on a CPU machine: torch.manual_seed reseeds it (as it
    reseeds every CUDA device) and common.rng_state / set_rng_state save and restore it."""
    state = {"seed": torch.tensor([-1])}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "manual_seed_all",
                        lambda seed: state.update(seed=torch.tensor([int(seed)])))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [state["seed"].clone()])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda states: state.update(seed=states[0].clone()))
    return state


def test_grids_give_every_random_generator_back(tmp_path, monkeypatch, fake_cuda_generator):
    """A sample grid after every iteration leaves the training draws as a run without grids has
    them (CPU and the stand-in CUDA generator), and a grid alone gives the CUDA generator back."""
    device_states = []
    train_step = ummgan.train_step

    def recorded(*args, **kwargs):
        device_states.append(int(fake_cuda_generator["seed"]))   # at the start of each step
        return train_step(*args, **kwargs)
    monkeypatch.setattr(ummgan, "train_step", recorded)
    argv = RUN + ["--device", "cpu", "--iters", "3", "--ckpt_every", "100"]
    ummgan.main(argv + ["--out_dir", str(tmp_path / "grids"), "--sample_every", "1"])
    with_grids, device_states[:] = list(device_states), []
    ummgan.main(argv + ["--out_dir", str(tmp_path / "none"), "--sample_every", "100"])
    assert with_grids == device_states and len(with_grids) == 3
    logs = [[{k: v for k, v in json.loads(line).items() if k != "img_per_s"}
             for line in open(tmp_path / name / "log.jsonl")] for name in ("grids", "none")]
    assert logs[0] == logs[1] and len(logs[0]) == 3
    args = make_args("--K", "2")
    _, G, _ = build("--K", "2")
    fake_cuda_generator["seed"] = torch.tensor([12345])
    before = int(fake_cuda_generator["seed"])
    ummgan.mode_style_grid(G, G.max_step, args, "cpu")         # reseeds inside (fixed noise)
    assert int(fake_cuda_generator["seed"]) == before


def test_sample_and_eval_take_the_architecture_from_the_checkpoint(tmp_path, capsys):
    from PIL import Image
    out = str(tmp_path / "run")
    ummgan.main(["--size", "64", "--style_dim", "8", "--max_channels", "8", "--channel_base",
                 "64", "--K", "2", "--init_size", "8", "--phase_iters", "2", "--iters", "3",
                 "--batch_size", "4", "--sample_every", "100", "--out_dir", out])
    ummgan.main(["--sample", "--out_dir", out])                 # preset: 32x32, K 3, width 64
    tile = 64 + 2
    assert Image.open(os.path.join(out, "mode_style.png")).size == (8 * tile + 2, 2 * tile + 2)
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-2])
    assert (info["step"], info["alpha"], len(info["mean_w_R"])) == (2, 0.0, 2)  # 16x16 fading in
    ummgan.main(["--eval", "--eval_n", "8", "--batch_size", "4", "--out_dir", out])
    result = json.load(open(os.path.join(out, "eval.json")))
    assert (result["K"], result["iter_step"], result["n_generated"]) == (2, 2, 8)
    err = run_cli(["--sample", "--out_dir", out, "--size", "32"], capsys)
    assert "--size 64 (asked: 32)" in err
    # the growing schedule and the data are the run's too: another value is refused, not used
    # (--phase_iters 100 would render the 16x16 net at 8x8; --data letters score hshape's run)
    for flags, words in ((["--sample", "--phase_iters", "100"], "--phase_iters 2 (asked: 100)"),
                         (["--eval", "--data", "letters"], "--data hshape (asked: letters)"),
                         (["--resume", "--iters", "4", "--init_size", "16"],
                          "--init_size 8 (asked: 16)")):
        err = run_cli(flags + ["--out_dir", out], capsys)
        assert words in err and "pass the same flags to use it." in err, err


def test_resume_takes_the_runs_data_and_schedule_from_the_checkpoint(tmp_path):
    """--resume without --chars, --train_fraction or the growing schedule continues the run on its
    own letters, share and resolution (the presets' values would silently change the run)."""
    out = str(tmp_path / "run")
    flags = ["--data", "letters", "--size", "32", "--style_dim", "8", "--max_channels", "8",
             "--channel_base", "64", "--batch_size", "4", "--log_every", "1", "--sample_every",
             "100", "--out_dir", out]
    ummgan.main(flags + ["--chars", "ABC", "--K", "3", "--train_fraction", "0.5",
                         "--init_size", "8", "--phase_iters", "2", "--iters", "5"])
    ummgan.main(flags + ["--K", "3", "--iters", "6", "--resume"])
    config = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]
    assert (config["chars"], config["train_fraction"], config["init_size"],
            config["phase_iters"]) == ("ABC", 0.5, 8, 2)
    logs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    sizes = [row["res"] for row in logs if "res" in row]
    assert sizes == sorted(sizes) and sizes[-1] == 32, sizes   # never back to the first size


@pytest.mark.parametrize("r1_gamma", ["1", "0"])
def test_compiled_training_step_gives_the_eager_losses(r1_gamma):
    """--compile aot_eager (torch.compile's graph capture and autograd, no code generation): the
    step's losses equal the eager ones. With R1 on, D stays eager (double backward)."""
    args = make_args("--K", "2", "--progressive", "0", "--size", "8", "--compile", "aot_eager",
                     "--r1_gamma", r1_gamma)
    rt = common.setup_runtime(args)
    real = torch.rand(4, 1, 8, 8) * 2 - 1
    losses = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for compile_model in (None, args.compile):
        torch.manual_seed(0)
        G, D = ummgan.build(args)
        G = common.prepare_model(G, rt, compile_model)
        D = common.prepare_model(D, rt, compile_model and ummgan.compile_d(args))
        opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.0, 0.99))
        opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.0, 0.99))
        torch.manual_seed(1)
        losses.append([{k: float(v) for k, v in ummgan.train_step(
            G, D, opt_g, opt_d, real.clone(), None, i, args, rt).items()} for i in range(2)])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= (1 if r1_gamma == "1" else 2)                      # G (and D) ran compiled
    for eager, compiled in zip(*losses):
        for key in eager:
            assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("flags,sentence", [
    (["--K", "0"], "--K must be at least 1 (got 0)."),
    (["--style_dim", "0"], "--style_dim must be at least 1 (got 0)."),
    (["--max_channels", "0"], "--max_channels must be at least 1 (got 0)."),
    (["--channel_base", "16"], "--channel_base 16 leaves no channel at 32x32 (channels = "
                               "channel_base / resolution); give at least --channel_base 32."),
    (["--size", "24"], "--size must be a power of two >= 8 (got 24)."),
    (["--init_size", "4"], "--init_size must be a power of two between 8 and --size 32 (got 4)."),
    (["--phase_iters", "1"], "--phase_iters must be at least 2 (got 1)."),
    (["--eval_n", "0", "--eval"], "--eval_n must be at least 2 (got 0)."),
    (["--lr", "0"], "--lr and --mapping_lr_mul must be positive (got 0.0, 0.1)."),
    (["--mapping_lr_mul", "-1"], "--lr and --mapping_lr_mul must be positive (got 0.002, -1.0)."),
    (["--head_lr_mul", "0"], "--head_lr_mul must be positive (got 0.0)."),
    (["--branch_after", "8"], "--branch_after must be between 1 and 7 (got 8)."),
    (["--r1_gamma", "-1"], "--r1_gamma must be at least 0 (got -1.0)."),
    (["--cls_weight", "-0.5"], "--cls_weight must be at least 0 (got -0.5)."),
    (["--mixing_prob", "1.5"], "--mixing_prob is a probability in [0, 1] (got 1.5)."),
    (["--ema_decay", "1"], "--ema_decay must be in [0, 1) (got 1.0)."),
    (["--bench", "0"], "--bench must be at least 1 (got 0)."),
    (["--K", "1", "--separate_z", "1"], "--separate_mapping and --separate_z change uMM-GAN's "
     "w_R branch, which needs --mode umm and --K 2 or more."),
    (["--train_fraction", "0"], "--train_fraction must be in (0, 1] (got 0.0)."),
    (["--chars", "AB"], "--chars chooses the characters of --data letters, not of --data hshape."),
    (["--data", "letters", "--chars", ""],
     "letters '' must be alphanumeric characters (or 'all' for the 62 of them)."),
    (["--data", "letters", "--mode", "smm", "--K", "3"],
     "--mode smm needs one constant per class: --K 2 for the 2 classes of --data letters (got --K 3)."),
])
def test_every_flag_out_of_range_is_one_sentence_exit_2(flags, sentence, tmp_path, capsys):
    err = run_cli(flags + ["--out_dir", str(tmp_path / "run"), "--iters", "1"], capsys)
    assert err == f"error: {sentence}"
    assert not os.path.exists(tmp_path / "run" / "log.jsonl")


# ---------------------------------------------------------------------------------------------
# The paper preset end to end: torchrun (2 CPU processes, gloo), --resume, --sample, --eval
# ---------------------------------------------------------------------------------------------

from test_inade import rank_datasets, torchrun  # noqa: E402


@pytest.fixture(scope="module")
def inception_home(tmp_path_factory):
    """TORCH_HOME with a random-weight stand-in for the FID Inception at its torch hub cache path
    (the only pretrained network uMM-GAN uses)."""
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(common.FIDInception(pretrained=False).state_dict(),
               home / "hub" / "checkpoints" / os.path.basename(common.FID_INCEPTION_URL))
    # Undone after the module as it was: set_dir cannot unset, and a pinned default would hide
    # the TORCH_HOME that later tests set.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "_hub_dir", str(home / "hub"))
        yield home


def fake_cats_dogs(root, n=4, size=80):
    """Cats & Dogs in the folder layout the README uses, ROOT/<class>/<image>: random blobs,
    mirror-symmetric and lossless (PNG), so a horizontal flip leaves an item as it is (the
    per-rank references below cannot replay the flips, which are seeded per global batch)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        os.makedirs(os.path.join(root, cls))
        for i in range(n):
            img = np.kron(rng.integers(0, 256, (size // 8, size // 16, 3)), np.ones((8, 8, 1)))
            img = np.concatenate([img, img[:, ::-1]], axis=1)
            Image.fromarray(img.astype(np.uint8)).save(os.path.join(root, cls, f"{i}.png"))


def test_folder_preset_under_torchrun_then_resume_sample_eval(inception_home, tmp_path,
                                                              monkeypatch):
    """The README's `torchrun ... ummgan.py --data folder --data_dir data/cats_dogs --K 2`, widths
    shrunk by flags, 32x32: 2 ranks with 2 images each. D's minibatch stddev couples the images
    of a rank's group, and each rank draws z, noise and flips from its own stream (seed + rank):
    so the reference for rank r is one process on r's 2 images with --seed r and rank 0's
    initial weights (what DDP gives r). D's losses at the first step (before any update) are
    means over samples: under torchrun they are the mean of the two references. Then --resume,
    --sample (flags from the checkpoint) and --eval (FID with a stand-in Inception)."""
    root = str(tmp_path / "cats_dogs")
    fake_cats_dogs(root)
    flags = ["--data", "folder", "--K", "2", "--size", "32", "--style_dim", "8",
             "--max_channels", "8", "--channel_base", "64", "--init_size", "8", "--phase_iters",
             "2", "--device", "cpu", "--log_every", "1", "--sample_every", "100", "--ckpt_every",
             "100"]
    two = str(tmp_path / "two")
    torchrun("ummgan.py", flags + ["--data_dir", root, "--batch_size", "4", "--iters", "2",
                                   "--out_dir", two], inception_home)
    logs = lambda out: [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    first = logs(two)[0]

    def build_with_rank0_weights(args, device="cpu"):
        G, D = build(args, device)
        with common.preserved_rng():
            common.seed_everything(0)
            G0, D0 = build(args, device)
        G.load_state_dict(G0.state_dict()), D.load_state_dict(D0.state_dict())
        return G, D
    build = ummgan.build
    monkeypatch.setattr(ummgan, "build", build_with_rank0_weights)
    ds = data.get_dataset("folder", root=root, split="train", size=32)
    halves = []
    for rank, rank_root in enumerate(rank_datasets(ds, root, tmp_path, 4)):
        out = str(tmp_path / f"one{rank}")
        ummgan.main(flags + ["--data_dir", rank_root, "--batch_size", "2", "--iters", "1",
                             "--seed", str(rank), "--out_dir", out])
        halves.append(logs(out)[0])
    monkeypatch.undo()
    for key in ("loss_d", "r1"):
        assert first[key] == pytest.approx((halves[0][key] + halves[1][key]) / 2, rel=1e-4,
                                           abs=1.1e-6), key

    ummgan.main(flags + ["--data_dir", root, "--batch_size", "4", "--iters", "3", "--out_dir",
                         two, "--resume"])
    assert [r["iter"] for r in logs(two)] == [1, 2, 3]
    ummgan.main(["--sample", "--out_dir", two])
    for name in ("mode_style", "modes", "style_mixing"):
        assert os.path.getsize(os.path.join(two, f"{name}.png")) > 0
    ummgan.main(["--eval", "--eval_n", "4", "--batch_size", "4", "--out_dir", two])
    result = json.load(open(os.path.join(two, "eval.json")))
    assert (result["n_real"], result["n_generated"]) == (4, 4)
    assert result["fid"] >= 0 and len(result["mean_w_R"]) == 2


# ---------------------------------------------------------------------------------------------
# Behaviour: noise, learning rates, EMA, truncation, the losses and their weights, mixing
# ---------------------------------------------------------------------------------------------

def test_noise_injection_adds_scaled_noise_and_reaches_the_image():
    layer = ummgan.NoiseInjection(3)
    x, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4)
    assert torch.equal(layer(x, noise), x)                       # the scales start at zero
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1))
    torch.testing.assert_close(layer(x, noise), x + layer.weight * noise)
    _, G, _ = build("--K", "2")
    for m in G.modules():
        if isinstance(m, ummgan.NoiseInjection):
            torch.nn.init.constant_(m.weight, 0.5)
    z = torch.randn(2, 16)
    with torch.no_grad():
        a, b = G(z), G(z)
        off = G(z, noise_off=True)
    assert (a - b).abs().mean() > 1e-3                            # a fresh draw every call
    assert torch.equal(off, G(z, noise_off=True))                 # noise_off: deterministic
    torch.manual_seed(3)
    c = G(z)
    torch.manual_seed(3)
    assert torch.equal(c, G(z))


def test_one_training_step_moves_mapping_and_head_at_their_lr_multipliers():
    """Adam's first step (beta1 = 0) moves every stored weight by lr * sign(grad); the run-time
    scale lr_mul / sqrt(fan_in) then gives the mapping's effective weights lr_mul x the step of an
    ordinary layer (StyleGAN's 0.01 x mapping rate), and the w_R head its own multiplier."""
    args = make_args("--K", "2", "--progressive", "0", "--size", "8", "--mapping_lr_mul", "0.1",
                     "--head_lr_mul", "0.5", "--lr", "0.01")
    rt = common.setup_runtime(args)
    torch.manual_seed(0)
    G, D = ummgan.build(args)
    opt_g, opt_d = ummgan.optimizers(G, D, args)
    eff = lambda m: (m.weight * m.scale).detach().clone()
    layers = {"mapping": G.mapping.layers[0], "head": G.mapping.mix_head,
              "adain": G.layers[1].adain.style}
    before = {k: eff(m) for k, m in layers.items()}
    ummgan.train_step(G, D, opt_g, opt_d, torch.rand(4, 1, 8, 8) * 2 - 1, None, 0, args, rt)
    fan_in = 16
    for name, mul in (("mapping", 0.1), ("head", 0.5), ("adain", 1.0)):
        step = (eff(layers[name]) - before[name]).abs()
        moved = step > 0
        assert moved.float().mean() > 0.5, name
        # (a few entries with |grad| near Adam's eps move a little less)
        assert step[moved].median().item() == pytest.approx(0.01 * mul / fan_in ** 0.5,
                                                            rel=1e-3), name


def test_ema_of_g_is_updated_after_every_step(tmp_path, monkeypatch):
    """One iteration: G_ema = decay * G_init + (1 - decay) * G_after_the_step, every parameter."""
    inits = []
    build = ummgan.build

    def recording(args, device="cpu"):
        G, D = build(args, device)
        inits.append({k: v.clone() for k, v in G.state_dict().items()})
        return G, D
    monkeypatch.setattr(ummgan, "build", recording)
    out = str(tmp_path / "run")
    ummgan.main(RUN + ["--out_dir", out, "--iters", "1", "--ema_decay", "0.75"])
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["state"]
    moved = 0
    for name, _ in ummgan.Generator(make_args("--K", "2", *RUN_TINY), 1).named_parameters():
        g, ema, init = state["G"][name], state["G_ema"][name], inits[0][name]
        torch.testing.assert_close(ema, 0.75 * init + 0.25 * g, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(ema, init))
    assert moved > 10


def test_truncation_pulls_every_style_toward_w_avg():
    """psi: w' = w_avg + psi (w - w_avg) on every layer, w_R untouched (our choice)."""
    _, G, _ = build("--K", "2")
    z = torch.randn(3, 16)
    w_avg = torch.randn(16)
    with torch.no_grad():
        w, w_R = G.mapping(z)
        styles = (w_avg + 0.6 * (w - w_avg))[:, None].expand(-1, G.n_styles, -1)
        expect = G.synthesis(styles, w_R, G.max_step, noise_off=True)
        torch.testing.assert_close(G(z, psi=0.6, w_avg=w_avg, noise_off=True), expect)
        avg = G.mean_style(n=3000)
    gen = torch.Generator().manual_seed(0)
    z_all = torch.randn(3000, 16, generator=gen)
    torch.testing.assert_close(avg, G.mapping(z_all)[0].mean(0).detach(), rtol=1e-4, atol=1e-5)


class Recorder(torch.nn.Module):
    """Wraps a network and keeps every call's inputs and outputs."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, *args, **kwargs):
        out = self.net(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


@pytest.mark.parametrize("mode", ["umm", "smm"])
def test_train_step_losses_by_hand(mode, monkeypatch):
    """D: softplus(-D(x)) + softplus(D(G(z))) + gamma/2 R1 + cls_weight CE(D_cls(x), label);
    G: softplus(-D(G(z))) + cls_weight CE(D_cls(G(z, w_M)), w_M). The totals handed to backward
    and each term are recomputed from the recorded D calls."""
    args = make_args("--K", "2", "--mode", mode, "--progressive", "0", "--size", "8",
                     "--r1_gamma", "3", "--cls_weight", "0.7", data="letters")
    rt = common.setup_runtime(args)
    totals = []
    monkeypatch.setattr(rt.scaler, "scale", lambda loss: totals.append(loss) or loss)
    torch.manual_seed(0)
    G, D = ummgan.build(args)
    G, D = Recorder(G), Recorder(D)
    opt_g, opt_d = ummgan.optimizers(G.net, D.net, args)
    labels = torch.tensor([0, 1, 1, 0])
    real = torch.rand(4, 1, 8, 8) * 2 - 1
    D_before = __import__("copy").deepcopy(D.net)
    out = ummgan.train_step(G, D, opt_g, opt_d, real.clone(), labels, 0, args, rt)
    out = {k: float(v) for k, v in out.items()}   # the step hands back tensors (no host sync)
    sp = F.softplus
    (real_in, *_), _, (real_logit, real_cls) = D.calls[0]
    (fake_in, *_), _, (fake_logit, _) = D.calls[1]
    (g_in, *_), _, (g_logit, g_cls) = D.calls[2]
    assert torch.equal(real_in.detach(), real) and not fake_in.requires_grad
    assert torch.equal(fake_in, G.calls[0][2]) and torch.equal(g_in, G.calls[1][2])
    loss_d = (sp(-real_logit).mean() + sp(fake_logit).mean()).item()
    x = real.clone().requires_grad_(True)                  # R1 by hand, on D before its step
    r1 = torch.autograd.grad(D_before(x)[0].sum(), x)[0].pow(2).flatten(1).sum(1).mean().item()
    loss_g = sp(-g_logit).mean().item()
    assert out["loss_d"] == pytest.approx(loss_d, rel=1e-5)
    assert out["r1"] == pytest.approx(r1, rel=1e-4)
    assert out["loss_g"] == pytest.approx(loss_g, rel=1e-5)
    if mode == "smm":
        modes = G.calls[1][1]["modes"]                            # w_M of the G step
        assert torch.equal(G.calls[0][1]["modes"], modes)         # one w_M per step, both phases
        assert out["cls_d"] == pytest.approx(F.cross_entropy(real_cls, labels).item(), rel=1e-5)
        assert out["cls_g"] == pytest.approx(F.cross_entropy(g_cls, modes).item(), rel=1e-5)
        assert out["cls_g"] != pytest.approx(F.cross_entropy(g_cls, 1 - modes).item(), rel=1e-3)
    else:
        assert out["cls_d"] == out["cls_g"] == 0 and G.calls[1][1]["modes"] is None
    assert totals[0].item() == pytest.approx(out["loss_d"] + 1.5 * out["r1"]
                                             + 0.7 * out["cls_d"], rel=1e-5)
    assert totals[1].item() == pytest.approx(out["loss_g"] + 0.7 * out["cls_g"], rel=1e-5)


def test_style_mixing_crossover_is_drawn_over_the_active_layers():
    args = make_args("--mixing_prob", "1")
    gen = torch.Generator().manual_seed(0)
    for step in (1, 2):       # 8x8: layers 0-3 active, 16x16: 0-5
        cuts = {ummgan.sample_styles_args(step, 2, args, "cpu", gen)["crossover"]
                for _ in range(200)}
        assert cuts == set(range(1, 2 * (step + 1)))
    never = make_args("--mixing_prob", "0")
    assert all("z2" not in ummgan.sample_styles_args(2, 2, never, "cpu", gen) for _ in range(50))
    half = make_args("--mixing_prob", "0.5")
    mixed = sum("z2" in ummgan.sample_styles_args(2, 2, half, "cpu", gen) for _ in range(400))
    assert 150 < mixed < 250


# ---------------------------------------------------------------------------------------------
# Sampling controls on tensors: what changes and what stays
# ---------------------------------------------------------------------------------------------

def test_mode_style_grid_rows_change_the_mode_only():
    """Row k = one-hot w_R on C_k; a column keeps its z and its noise down the rows: with equal
    constants every row is the same image, with different ones the rows differ."""
    args, G, _ = build("--K", "3")
    for m in G.modules():
        if isinstance(m, ummgan.NoiseInjection):
            torch.nn.init.constant_(m.weight, 0.5)
    rows = torch.stack([torch.stack(r) for r in ummgan.mode_style_grid(G, G.max_step, args,
                                                                       "cpu", n_styles=4)])
    assert rows.shape == (3, 4, 1, 16, 16)
    z = torch.randn(4, 16, generator=torch.Generator().manual_seed(1234))
    with common.preserved_rng():
        torch.manual_seed(1234)
        torch.testing.assert_close(rows[2], G(z, modes=torch.full((4,), 2)))
    assert (rows[0] - rows[1]).abs().mean() > 1e-3 and (rows[:, 0] - rows[:, 1]).abs().mean() > 1e-3
    with torch.no_grad():
        G.constants.copy_(G.constants[:1].expand(3, -1, -1, -1))
    same = torch.stack([torch.stack(r) for r in ummgan.mode_style_grid(G, G.max_step, args,
                                                                       "cpu", n_styles=4)])
    torch.testing.assert_close(same[0], same[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(same[0], same[2], atol=1e-5, rtol=0)


def test_mode_renders_and_style_mixing_grid():
    """modes.png: C_k with w = w_avg and no noise. style_mixing.png: the coarse styles (layers
    0-3: 4x4 and 8x8) and w_R of column j, the rest of row b; top and left are plain samples."""
    args, G, _ = build("--K", "2", "--psi", "0.5")
    w_avg = G.mean_style(n=500)
    with torch.no_grad():
        for m in G.modules():       # noise scales on: the renders must still be noise-free
            if isinstance(m, ummgan.NoiseInjection):
                m.weight.fill_(0.5)
        renders = ummgan.mode_renders(G, G.max_step, 1.0, w_avg)
        styles = w_avg.view(1, 1, -1).expand(2, G.n_styles, -1)
        torch.testing.assert_close(renders, G.synthesis(styles, torch.eye(2), G.max_step,
                                                        noise_off=True))
        for m in G.modules():       # noise off, so that the grid's images can be recomputed
            if isinstance(m, ummgan.NoiseInjection):
                m.weight.zero_()
        top, left, mixed = ummgan.style_mixing_grid(G, G.max_step, 1.0, args, w_avg)
        gen = torch.Generator().manual_seed(7)
        za, zb = torch.randn(5, 16, generator=gen), torch.randn(4, 16, generator=gen)
        trunc = lambda w: w_avg + 0.5 * (w - w_avg)
        (wa, wR_a), (wb, _) = G.mapping(za), G.mapping(zb)
        torch.testing.assert_close(top, G(za, psi=0.5, w_avg=w_avg))
        torch.testing.assert_close(left, G(zb, psi=0.5, w_avg=w_avg))
        for b in (0, 3):
            styles = torch.stack([trunc(wa) if i < 4 else trunc(wb[b]).expand(5, -1)
                                  for i in range(G.n_styles)], 1)
            torch.testing.assert_close(mixed[b], G.synthesis(styles, wR_a, G.max_step))
    assert mixed.shape == (4, 5, 1, 16, 16)


def test_mode_usage_counts_the_dominant_constant():
    _, G, _ = build("--K", "3")
    with torch.no_grad():
        G.mapping.mix_head.weight.zero_()
        G.mapping.mix_head.bias.copy_(torch.tensor([0.0, 2.0, 1.0]) / G.mapping.mix_head.lr_mul)
    u = ummgan.mode_usage(G, "cpu", n=100)
    p = torch.softmax(torch.tensor([0.0, 2.0, 1.0]), 0)
    assert u["mode_usage_argmax"] == [0.0, 1.0, 0.0]
    assert u["mean_w_R"] == pytest.approx(p.tolist(), rel=1e-5)
    assert u["mean_max_w_R"] == pytest.approx(p.max().item(), rel=1e-5)
    assert ummgan.mode_usage(build("--K", "1")[1], "cpu") == {}


def test_dry_run_counts_what_smm_adds_to_d(capsys):
    """sMM-GAN's D adds a K-way classifier on the 4x4 features: (c4 + 1) K parameters over the
    StyleGAN D (K = 2, c4 = 16 here: 34)."""
    ummgan.main(["--data", "letters", *TINY, "--K", "2", "--mode", "smm", "--dry_run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "D adds 34 (K-way classifier)" in lines[-3]  # then the FLOPs, then the counts
    d_smm = json.loads(lines[-1])["params"]["D"]
    ummgan.main(["--data", "letters", *TINY, "--K", "1", "--dry_run"])
    assert d_smm - json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"]["D"] \
        == 34


# ---------------------------------------------------------------------------------------------
# §4 ablations, Fig. 8's half dataset, the letters scores
# ---------------------------------------------------------------------------------------------

def test_separate_mapping_gives_w_r_its_own_layers():
    """--separate_mapping: w_R from its own branch_after FCs and the head; no layer is shared."""
    args, G, _ = build("--K", "3", "--separate_mapping", "1")
    _, G0, _ = build("--K", "3")
    d = args.style_dim
    assert common.count_params(G) - common.count_params(G0) == 6 * (d * d + d)
    z = torch.randn(5, 16)
    with torch.no_grad():
        w, w_R = G.mapping(z)
        h = common.PixelNorm()(z)
        for layer in G.mapping.mix_layers:
            h = ummgan.lrelu(layer(h))
        torch.testing.assert_close(w_R, torch.softmax(G.mapping.mix_head(h), 1))
        G.mapping.layers[0].weight.mul_(-1.0)            # w's trunk moves w only
        w2, w_R2 = G.mapping(z)
        assert not torch.allclose(w, w2) and torch.equal(w_R, w_R2)
        G.mapping.mix_layers[0].weight.mul_(-1.0)        # w_R's own layers move w_R only
        w3, w_R3 = G.mapping(z)
        assert torch.equal(w2, w3) and not torch.allclose(w_R2, w_R3)


def test_separate_z_feeds_w_and_w_r_from_two_latents():
    """--separate_z: z has two halves, the first makes w, the second w_R (through the shared
    trunk); every sampler draws the doubled z."""
    args, G, _ = build("--K", "3", "--separate_z", "1")
    assert G.z_dim == 32 and ummgan.sample_styles_args(0, 2, args, "cpu")["z"].shape == (2, 32)
    z = torch.randn(5, 32)
    other = z.clone()
    other[:, 16:] = torch.randn(5, 16)
    with torch.no_grad():
        (w, w_R), (w2, w_R2) = G.map(z), G.map(other)
        assert torch.equal(w, w2) and not torch.allclose(w_R, w_R2)
        assert torch.equal(w_R, G.mapping(z[:, 16:])[1])  # z_R alone gives the shared w_R
        other = z.clone()
        other[:, :16] = torch.randn(5, 16)
        w3, w_R3 = G.map(other)
        assert not torch.allclose(w, w3) and torch.equal(w_R, w_R3)
        torch.manual_seed(0)
        a = G(z, noise_off=True)
        assert a.shape == (5, 1, 16, 16)
        assert ummgan.mode_renders(G, G.max_step, 1.0, G.mean_style(n=100)).shape[0] == 3


def test_train_fraction_trains_on_a_fixed_share_and_eval_sees_all():
    args = make_args("--K", "2", "--size", "32", "--train_fraction", "0.5", data="letters")
    half, again = ummgan.load_data(args, training=True), ummgan.load_data(args, training=True)
    full = ummgan.load_data(args)
    assert (len(half), len(full)) == (5000, 10000) and half.indices == again.indices
    assert half.class_names == ["A", "B"] and "class" in half.has
    i = half.indices[7]
    assert torch.equal(half[7]["image"], full[i]["image"])
    labels = torch.tensor([i % 2 for i in half.indices])  # letters: class = index % 2
    assert 0.45 < labels.float().mean() < 0.55          # a random share keeps both letters
    assert len(ummgan.load_data(make_args("--K", "2", "--size", "32", data="letters"),
                                training=True)) == 10000


def test_letters_nearest_scores_by_hand():
    ref = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0),
                       torch.full((1, 2, 2), 0.9)])
    classes = torch.tensor([0, 1, 1])
    one = data.LettersNearest(ref, classes, 2)
    fake = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), -0.5)])
    one.add(fake[:1])
    one.add(fake[1:])                                   # streamed: two batches
    r = one.report()
    assert r["fidelity"] == pytest.approx((0 + 0.5) / 2)          # RMS to the nearest real
    assert r["coverage"] == pytest.approx((0 + 1.5 + 1.4) / 3)     # each real to its nearest
    assert r["nearest_class_share"] == [1.0, 0.0]
    both = data.LettersNearest(ref, classes, 2)
    both.add(torch.cat([fake, ref[2:]]))
    assert both.report()["nearest_class_share"] == pytest.approx([2 / 3, 1 / 3])


def test_letters_eval_scores_generated_and_real_test(tmp_path, monkeypatch):
    monkeypatch.setattr(ummgan, "LETTERS_REFERENCE", 8)
    out = str(tmp_path / "run")
    flags = ["--data", "letters", *RUN_TINY, "--K", "2", "--batch_size", "4", "--iters", "1",
             "--phase_iters", "2", "--init_size", "8", "--out_dir", out]  # G at 8x8
    ummgan.main(flags)
    ummgan.main(["--eval", "--eval_n", "8", "--out_dir", out])
    r = json.load(open(os.path.join(out, "eval.json")))["letters"]
    assert sum(r["generated"]["nearest_class_share"]) == pytest.approx(1.0)
    # an untrained G is far from every glyph; real test glyphs are near the reference
    assert r["real_test"]["fidelity"] < r["generated"]["fidelity"]
    assert r["real_test"]["coverage"] < r["generated"]["coverage"]


def test_step_keeps_the_batch_and_d_grads_and_hands_back_tensors(monkeypatch):
    """One train step: the losses come back as tensors (no host sync in the step); the caller's
    real batch and R1's input leaf get no gradient from D's backward (only R1 differentiates
    w.r.t. the images); the G step leaves D's weight gradients as D's own step made them."""
    args = make_args("--K", "2", "--progressive", "0", "--size", "8", "--r1_gamma", "1")
    rt = common.setup_runtime(args)
    torch.manual_seed(0)
    G, D = ummgan.build(args)
    opt_g, opt_d = ummgan.optimizers(G, D, args)
    r1_inputs, d_grads = [], []
    r1_penalty = common.r1_penalty
    monkeypatch.setattr(common, "r1_penalty", lambda logits, x: r1_inputs.append(x) or
                        r1_penalty(logits, x))
    d_step = opt_d.step

    def recording_step(*a, **k):
        d_grads.append([p.grad.clone() for p in D.parameters() if p.grad is not None])
        return d_step(*a, **k)
    monkeypatch.setattr(opt_d, "step", recording_step)
    real = torch.rand(4, 1, 8, 8) * 2 - 1
    out = ummgan.train_step(G, D, opt_g, opt_d, real, None, 0, args, rt)
    assert all(isinstance(out[k], torch.Tensor) for k in ("loss_d", "loss_g", "r1"))
    assert real.grad is None and not real.requires_grad
    assert len(r1_inputs) == 1 and r1_inputs[0].grad is None
    used = [p for p in D.parameters() if p.grad is not None]  # (4x4 from_rgb is idle at 8x8)
    assert len(used) == len(d_grads[0]) > 10
    assert all(torch.equal(p.grad, g) for p, g in zip(used, d_grads[0]))
    assert all(p.requires_grad for p in D.parameters())


def test_noise_injection_adds_one_noise_map_scaled_per_channel():
    """StyleGAN §2 ("B"): a single-channel noise image per layer and image, broadcast to every
    channel with a learned per-channel scale."""
    layer = ummgan.NoiseInjection(4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, -3.0, 0.5]).view(1, 4, 1, 1))
    x = torch.randn(2, 4, 5, 5)
    per_channel = (layer(x) - x) / layer.weight
    assert torch.allclose(per_channel, per_channel[:, :1].expand_as(per_channel), atol=1e-6)
    assert not torch.allclose(per_channel[0], per_channel[1])        # a fresh map per image
