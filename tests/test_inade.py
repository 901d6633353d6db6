"""Tests of inade.py: the INADE layer against Eq. (2) by hand, unified sampling, instance pooling
(Eq. 4), the KL of Eq. (9), the exact parameter counts of Tables 3-4, a short training run,
exact resume, the control grids, and the error sentences."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import inade

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--size", "32", "--batch_size", "4", "--ngf", "4", "--nef", "4", "--ndf", "8",
        "--noise_nc", "4", "--z_dim", "8", "--num_workers", "0"]


# ----------------------------------------------------------------------------------------------
# The INADE layer, Eq. (1)-(3)
# ----------------------------------------------------------------------------------------------

def test_inade_layer_matches_eq2_by_hand():
    torch.manual_seed(0)
    C, L, C0 = 3, 2, 4
    layer = inade.INADE(C, L, C0)
    inst = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]]])  # (1, 4, 4)
    label = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]])
    noise = torch.randn(1, 3, 2, C0)
    x = torch.randn(1, C, 4, 4)
    with torch.no_grad():
        layer.b.normal_()
    y = layer(x, inst, inade.instance_classes(label, inst, 3), noise)

    # By hand: batch norm over (B, H, W), biased variance, eps 1e-5, no affine (Eq. 1)
    x_hat = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    W, bias = layer.fc_noise.weight, layer.fc_noise.bias
    expected = torch.empty_like(x)
    gammas = {}
    for i in range(4):
        for j in range(4):
            p, m = inst[0, i, j], label[0, i, j]
            n_gamma = W @ noise[0, p, 0] + bias              # Eq. (3), F(N_gamma)[l_p]
            n_beta = W @ noise[0, p, 1] + bias
            gamma = layer.a[m, :, 0] * n_gamma + layer.b[m, :, 0]   # Eq. (2)
            beta = layer.a[m, :, 1] * n_beta + layer.b[m, :, 1]
            expected[0, :, i, j] = gamma * x_hat[0, :, i, j] + beta
            gammas[(i, j)] = gamma
    assert torch.allclose(y, expected, atol=1e-5)
    # two instances of class 1 get different gamma; the pixels of one instance share it
    assert not torch.allclose(gammas[(0, 2)], gammas[(2, 0)])
    assert torch.allclose(gammas[(0, 2)], gammas[(1, 3)]) and torch.allclose(gammas[(2, 0)], gammas[(3, 3)])


def test_one_noise_tensor_feeds_all_18_inade_layers():
    torch.manual_seed(0)
    G = inade.Generator(num_classes=3, height=32, width=32, ngf=4, z_dim=8, noise_nc=4)
    seen = []
    for layer in G.inade_layers():
        layer.register_forward_pre_hook(lambda m, args: seen.append(args[3]))
    label = torch.zeros(2, 32, 32, dtype=torch.long)
    label[:, 8:20, 8:20] = 1
    inst = label.clone()
    inst[:, 20:30, 20:30] = 2
    label[:, 20:30, 20:30] = 1
    noise = torch.randn(2, 3, 2, 4)
    G(torch.randn(2, 8), label, inst, noise).mean().backward()
    assert len(G.inade_layers()) == 18 and len(seen) == 18
    assert all(t is noise for t in seen)  # the same tensor, not 18 samples
    assert all(layer.fc_noise.weight.grad.abs().sum() > 0 for layer in G.inade_layers())


def test_instance_classes_and_edges():
    inst = torch.tensor([[[0, 1, 1], [0, 2, 2]]])
    label = torch.tensor([[[0, 3, 3], [0, 3, 3]]])
    assert inade.instance_classes(label, inst, 4).tolist() == [[0, 3, 3, 0]]
    edge = inade.instance_edges(inst)[0, 0]
    assert edge.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert inade.instance_edges(torch.zeros(1, 3, 3, dtype=torch.long)).sum() == 0


# ----------------------------------------------------------------------------------------------
# Prior noise remapping, Eq. (4), (5), (9)
# ----------------------------------------------------------------------------------------------

def test_instance_average_pool_is_masked_mean():
    torch.manual_seed(0)
    feat = torch.randn(2, 5, 6, 7)
    inst = torch.randint(0, 3, (2, 6, 7))
    inst[1][inst[1] == 2] = 0  # instance 2 absent from sample 1
    pooled = inade.instance_average_pool(feat, inst, 3)
    for b in range(2):
        for k in range(3):
            mask = inst[b] == k
            want = feat[b][:, mask].mean(1) if mask.any() else torch.zeros(5)
            assert torch.allclose(pooled[b, k], want, atol=1e-6)
    assert torch.equal(pooled[1, 2], torch.zeros(5))


def test_instance_aware_conv_sees_only_its_own_instance():
    torch.manual_seed(0)
    conv = inade.InstanceAwareConv2d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 8, 8)
    one = torch.zeros(1, 8, 8, dtype=torch.long)
    assert torch.allclose(conv(x, one), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5)
    inst = torch.zeros(1, 8, 8, dtype=torch.long)
    inst[:, :, 4:] = 1
    y = conv(x, inst)
    x2 = x.clone()
    x2[:, :, :, 4:] += 10 * torch.randn(1, 2, 8, 4)  # change instance 1 only
    y2 = conv(x2, inst)
    assert torch.allclose(y[..., :4], y2[..., :4], atol=1e-5)   # instance 0's outputs unmoved
    assert not torch.allclose(y[..., 4:], y2[..., 4:])
    # stride 2 keeps the centre rule: the encoder's first layer
    s2 = inade.InstanceAwareConv2d(2, 3, 3, stride=2, padding=1)
    assert s2(x, inst).shape == (1, 3, 4, 4)


def test_encoder_shapes_and_kl_closed_form():
    torch.manual_seed(0)
    E = inade.NoiseEncoder(noise_nc=4, nef=4)
    inst = torch.zeros(2, 32, 32, dtype=torch.long)
    inst[:, 4:12, 4:12] = 1
    inst[0, 20:28, 20:28] = 2
    mu, logvar = E(torch.randn(2, 3, 32, 32), inst, 3)
    assert mu.shape == logvar.shape == (2, 3, 2, 4)
    assert torch.equal(mu[1, 2], torch.zeros(2, 4))  # absent instance: zero (mu, logvar)
    mu, logvar = torch.randn(3, 5, 2, 4), torch.randn(3, 5, 2, 4)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    kl = torch.distributions.kl_divergence(q, p)             # (B, K, 2, C0)
    want = (0.5 * (kl[:, :, 0].sum((1, 2)) + kl[:, :, 1].sum((1, 2)))).mean()   # Eq. (9)
    assert torch.allclose(inade.kl_loss(mu, logvar), want, atol=1e-5)
    # Eq. (5): remapped noise has the encoder's mean and standard deviation
    torch.manual_seed(1)
    m, lv = torch.full((20000, 1, 2, 1), 1.5), torch.full((20000, 1, 2, 1), 2 * torch.log(torch.tensor(0.5)))
    s = inade.remap_noise(m, lv)
    assert abs(s.mean() - 1.5) < 0.02 and abs(s.std() - 0.5) < 0.02


# ----------------------------------------------------------------------------------------------
# Parameter counts (Tables 3 and 4)
# ----------------------------------------------------------------------------------------------

def generator_params(L, C0, ngf=64, z_dim=256, sh=8, sw=8):
    """The count derived from the architecture: fc, 7 ResBlks (INADE: 4 L c for a, b and
    C0 c + c for the noise map; 3x3 convs with bias, 1x1 shortcut without), conv_img."""
    inade_layer = lambda c: 4 * L * c + C0 * c + c
    conv = lambda i, o, k, bias=True: i * o * k * k + (o if bias else 0)
    total = z_dim * 16 * ngf * sh * sw + 16 * ngf * sh * sw + conv(ngf, 3, 3)
    for fi, fo in [(16, 16), (16, 16), (16, 16), (16, 8), (8, 4), (4, 2), (2, 1)]:
        fin, fout = fi * ngf, fo * ngf
        mid = min(fin, fout)
        total += inade_layer(fin) + conv(fin, mid, 3) + inade_layer(mid) + conv(mid, fout, 3)
        if fin != fout:
            total += inade_layer(fin) + conv(fin, fout, 1, bias=False)
    return total


@pytest.fixture
def no_init(monkeypatch):
    """Parameter counts depend on shapes only: skip the random init of the 85M-parameter
    networks (default init, xavier, spectral norm's 15 power iterations) to keep the test fast."""
    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters", lambda self: None)
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: None)
    monkeypatch.setattr(torch.nn.init, "xavier_normal_", lambda w, gain=1.0: w)
    monkeypatch.setattr(torch.nn.utils.parametrizations._SpectralNorm, "_power_method",
                        lambda self, w, n: None)


@pytest.mark.parametrize("data,noise_nc,L,sh,paper", [
    ("deepfashion", 64, 8, 8, 84.63), ("cityscapes", 64, 35, 4, 77.39),
    ("ade20k", 64, 151, 8, 90.89), ("celebamask-hq", 64, 19, 8, 85.12),
    ("cityscapes", 8, 35, 4, 76.78), ("cityscapes", 128, 35, 4, 78.10),
    ("celebamask-hq", 8, 19, 8, 84.50), ("celebamask-hq", 128, 19, 8, 85.82)])
def test_parameter_counts_match_tables_3_and_4(data, noise_nc, L, sh, paper, capsys, no_init):
    inade.main(["--data", data, "--noise_nc", str(noise_nc), "--dry_run"])
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"]
    want = generator_params(L, noise_nc, sh=sh)
    assert counts["G"] == want
    assert abs(want / 1e6 - paper) <= 0.01 + 1e-9  # the paper's C0 = 128 Cityscapes is 0.01 high
    if (data, noise_nc) != ("cityscapes", 128):
        assert round(want / 1e6, 2) == paper
    # encoder (not in the paper's P): 14 instance-aware 3x3 convs, derived by hand
    widths = [(3, 64), (64, 128), (128, 256), (256, 512), (512, 256), (512, 128), (256, 64),
              (128, 64), (64, 4 * noise_nc)]
    assert counts["E"] == sum(9 * i * o + o for i, o in widths)
    d_rounded = {"deepfashion": 5.55, "cityscapes": 5.60, "ade20k": 5.84, "celebamask-hq": 5.57}
    assert round(counts["D"] / 1e6, 2) == d_rounded[data]  # reference: official D sizes


# ----------------------------------------------------------------------------------------------
# Training, resume, controls, evaluation, errors
# ----------------------------------------------------------------------------------------------

def test_training_lowers_reconstruction_loss():
    import data
    torch.manual_seed(0)
    args = common.parse_args(inade.build_parser(), inade.PRESETS, "inade", "shapes", TINY)
    ds = data.get_dataset("shapes", split="train", size=32)
    args.num_classes = ds.num_classes
    rt = common.setup_runtime(args)
    G, E, D = inade.build_models(args)
    opt_g = torch.optim.Adam(list(G.parameters()) + list(E.parameters()), 2e-3, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), 4e-3, betas=(0.0, 0.9))
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    rec = [inade.train_step(args, rt, G, E, D, inade.ReconstructionLoss("l1", 0), opt_g, opt_d,
                            batch)["g_rec"] for _ in range(40)]
    assert sum(rec[-5:]) / 5 < 0.9 * sum(rec[:5]) / 5, rec


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("inade"))
    inade.main(TINY + ["--iters", "4", "--ckpt_every", "2", "--sample_every", "4",
                       "--log_every", "1", "--out_dir", out])
    return out


def test_resume_is_exact(trained, tmp_path, monkeypatch):
    out = str(tmp_path)
    save = common.save_checkpoint

    def save_then_crash(path, method, config, iteration, objects, extra=None, rt=None):
        save(path, method, config, iteration, objects, extra, rt)
        raise KeyboardInterrupt  # the run dies right after its first checkpoint (iter 2)

    monkeypatch.setattr(common, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        inade.main(TINY + ["--iters", "4", "--ckpt_every", "2", "--sample_every", "4",
                           "--log_every", "1", "--out_dir", out])
    monkeypatch.setattr(common, "save_checkpoint", save)
    inade.main(TINY + ["--iters", "4", "--ckpt_every", "2", "--sample_every", "4",
                       "--log_every", "1", "--out_dir", out, "--resume"])
    a = torch.load(os.path.join(trained, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert a["iter"] == b["iter"] == 4
    for net in ("G", "E", "D"):
        for k, v in a["state"][net].items():
            assert torch.equal(v, b["state"][net][k]), (net, k)
    logs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["iter"] for r in logs] == [1, 2, 3, 4]
    assert os.path.exists(os.path.join(out, "samples_000004.png"))


def test_every_sample_control_writes_its_grid(trained):
    inade.main(TINY + ["--out_dir", trained, "--sample", "--n_styles", "3"])
    for name in ("random", "class", "instance", "reference", "reconstruction"):
        path = os.path.join(trained, f"sample_{name}.png")
        assert os.path.getsize(path) > 0, name


def test_eval_writes_metrics(trained):
    inade.main(TINY + ["--out_dir", trained, "--eval", "--eval_n", "8"])
    result = json.load(open(os.path.join(trained, "eval.json")))
    for key in ("lpips_diversity", "mISD", "mOID", "mCSD", "mOCD", "locality_ratio"):
        assert result[key] == result[key] and result[key] >= 0, key  # not NaN
    real = result["shapes"]["real"]
    assert real["in_mode"] == 1.0 and real["colour_error"] < 0.1  # the scorer on ground truth


def test_bad_inputs_give_one_sentence(trained, tmp_path):
    with pytest.raises(common.UserError, match="no checkpoint"):
        inade.main(TINY + ["--out_dir", str(tmp_path), "--sample"])
    with pytest.raises(common.UserError, match="--noise_nc"):
        inade.main(TINY[:-6] + ["--noise_nc", "8", "--z_dim", "8", "--out_dir", trained, "--sample"])
    with pytest.raises(common.UserError, match="--sample_instance 9"):
        inade.main(TINY + ["--out_dir", trained, "--sample", "--sample_instance", "9"])
    with pytest.raises(common.UserError, match="divisible"):
        inade.main(["--size", "40", "--out_dir", str(tmp_path), "--iters", "1"])
    proc = subprocess.run([sys.executable, "inade.py", "--data", "deepfashion", "--data_dir",
                           str(tmp_path / "missing"), "--iters", "1"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# --eval streams: memory set by the batch, not by --eval_n
# ----------------------------------------------------------------------------------------------

def live_tensor_bytes():
    """Bytes of every tensor storage reachable from Python objects right now (views counted once)."""
    import gc
    import warnings
    storages = {}
    gc.collect()   # garbage in reference cycles (of this run or earlier tests) is not live
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            # plain tensors and parameters only: the fake tensors a torch.compile test may leave
            # behind have no data
            if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def eval_peak(monkeypatch, argv, hook_module=inade, hook="eval_batch", main=inade.main):
    """Run --eval with a hook around the per-batch function that records the live tensor bytes
    after each batch (its measures still held); (peak, batches)."""
    peaks = []
    per_batch = getattr(hook_module, hook)

    def recording(*args, **kwargs):
        out = per_batch(*args, **kwargs)
        peaks.append(live_tensor_bytes())   # the batch's measures are still held here
        return out
    monkeypatch.setattr(hook_module, hook, recording)
    main(argv)
    monkeypatch.setattr(hook_module, hook, per_batch)
    return max(peaks), len(peaks)


def test_eval_memory_does_not_grow_with_eval_n(trained, monkeypatch):
    argv = TINY + ["--out_dir", trained, "--eval", "--eval_n"]
    small, batches_small = eval_peak(monkeypatch, argv + ["4"])
    large, batches_large = eval_peak(monkeypatch, argv + ["16"])
    assert (batches_small, batches_large) == (1, 4)   # one batch of 4 layouts vs four batches
    one_group = 4 * 3 * 32 * 32 * 4                   # one batch's images of one sample group
    assert large - small < one_group / 2, (small, large)


def test_without_a_test_split_training_runs_and_sample_says_why(tmp_path, capsys):
    import shutil

    import numpy as np

    import data
    from test_data import fake_deepfashion
    root = tmp_path / "deepfashion"
    fake_deepfashion(str(root), np.random.default_rng(0))
    shutil.rmtree(root / "test_img")
    flags = ["--data", "deepfashion", "--data_dir", str(root), "--size", "32", "--ngf", "2",
             "--nef", "2", "--ndf", "4", "--z_dim", "4", "--noise_nc", "2", "--pretrained", "0",
             "--perceptual", "l1", "--batch_size", "2", "--out_dir", str(tmp_path / "run")]
    why = (f"--sample and --eval take their layouts from the test split of --data deepfashion, "
           f"which could not be read: found no images in {root}/test_img; expected the "
           f"deepfashion layout: {data.DATASETS['deepfashion']['layout']}.")
    inade.main(flags + ["--iters", "1"])      # training: the grids fall back to training layouts
    assert capsys.readouterr().out.startswith(f"note: {why} The training grids show the first "
                                              f"training layouts instead.\n")
    assert os.path.exists(tmp_path / "run" / "samples_000001.png")
    for mode in ("--sample", "--eval"):
        with pytest.raises(common.UserError) as err:
            inade.main(flags + [mode])
        assert str(err.value) == why


def test_compiled_training_step_gives_the_eager_losses():
    """--compile (aot_eager: the graph capture and autograd of torch.compile without code
    generation) trains G, E and D with the losses of the eager step."""
    import data
    args = common.parse_args(inade.build_parser(), inade.PRESETS, "inade", "shapes",
                             TINY + ["--compile", "aot_eager"])
    ds = data.get_dataset("shapes", split="train", size=32)
    args.num_classes = ds.num_classes
    rt = common.setup_runtime(args)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    losses = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for compile_model in (None, args.compile):
        torch.manual_seed(0)
        G, E, D = [common.prepare_model(m, rt, compile_model) for m in inade.build_models(args)]
        opt_g = torch.optim.Adam(list(G.parameters()) + list(E.parameters()), 1e-3, betas=(0.0, 0.9))
        opt_d = torch.optim.Adam(D.parameters(), 1e-3, betas=(0.0, 0.9))
        torch.manual_seed(1)
        losses.append([inade.train_step(args, rt, G, E, D, inade.ReconstructionLoss("l1", 0),
                                        opt_g, opt_d, batch) for _ in range(2)])  # 2nd: updated
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3   # G, E and D ran compiled
    for eager, compiled in zip(*losses):
        for key in eager:
            assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("flags,sentence", [
    (["--ngf", "0"], "--ngf must be at least 1 (got 0)."),
    (["--ndf", "-1"], "--ndf must be at least 1 (got -1)."),
    (["--nef", "0"], "--nef must be at least 1 (got 0)."),
    (["--num_d", "0"], "--num_d must be at least 1 (got 0)."),
    (["--z_dim", "0"], "--z_dim must be at least 1 (got 0)."),
    (["--noise_nc", "0"], "--noise_nc must be at least 1 (got 0)."),
    (["--num_classes", "1"], "--num_classes must be at least 2 (got 1)."),
    (["--eval_n", "0", "--eval"], "--eval_n must be at least 1 (got 0)."),
    (["--eval_n", "1", "--eval", "--pretrained", "1", "--perceptual", "l1"],
     "--eval_n must be at least 2 for FID (got 1)."),
    (["--n_styles", "0", "--sample"], "--n_styles must be at least 1 (got 0)."),
    (["--bench", "0"], "--bench must be at least 1 (got 0)."),
    (["--lambda_kl", "-1"], "--lambda_kl must be at least 0 (got -1.0)."),
    (["--sample_class", "-1", "--sample"], "--sample_class must be at least 0 (got -1)."),
    (["--ref_index", "-2", "--sample"], "--ref_index must be at least 0 (got -2)."),
    (["--aspect_ratio", "0"], "--aspect_ratio must be positive (got 0.0)."),
    (["--lr_d", "0"], "--lr_g and --lr_d must be positive (got 0.0004, 0.0)."),
    (["--beta2", "1"], "--beta1 and --beta2 must be in [0, 1) (got 0.0, 1.0)."),
    (["--size", "48"], "image size 48x48 must be divisible by 32 (5 up-samplings, --num_up "
                       "normal); set --size / --aspect_ratio."),
    (["--num_up", "more"], "image size 32x32 must be divisible by 64 (6 up-samplings, --num_up "
                           "more); set --size / --aspect_ratio."),
    (["--data", "cityscapes", "--size", "64", "--aspect_ratio", "1.5"],
     "image size 64x96 must be divisible by 64 (6 up-samplings, --num_up more); set --size / "
     "--aspect_ratio."),
    (["--perceptual", "vgg"], "--perceptual vgg needs the pretrained VGG-19 (--pretrained 1); "
                              "without it use --perceptual l1 or off."),
])
def test_every_flag_out_of_range_is_one_sentence_exit_2(flags, sentence, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        common.run_main(lambda: inade.main(flags + ["--out_dir", str(tmp_path / "run"),
                                                    "--iters", "1"]))
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {sentence}"
    assert not os.path.exists(tmp_path / "run" / "log.jsonl")


# ----------------------------------------------------------------------------------------------
# The paper presets end to end: torchrun (2 CPU processes, gloo), --resume, --sample, --eval
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stand_in_home(tmp_path_factory):
    """TORCH_HOME with random-weight stand-ins for VGG-19, the FID Inception and LPIPS-AlexNet at
    their torch hub cache paths, marked as hash-checked (a stand-in cannot have the real hash)."""
    home = tmp_path_factory.mktemp("torch_home")
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)

    def place(state, name, sha256_prefix):
        torch.save(state, ckpt / name)
        if sha256_prefix:
            common.write_marker(str(ckpt / name), sha256_prefix)
    torch.manual_seed(0)
    place(common.VGG19(pretrained=False).state_dict(), "vgg19-dcbb9e9d.pth", "dcbb9e9d")
    place(common.FIDInception(pretrained=False).state_dict(),
          os.path.basename(common.FID_INCEPTION_URL), None)
    lpips = common.LPIPS("alex", pretrained=False).state_dict()
    place({k: v for k, v in lpips.items() if k.startswith("features.")},
          "alexnet-owt-7be5be79.pth", "7be5be79")
    place({k: v for k, v in lpips.items() if k.startswith("lin")}, "lpips_v0.1_alex.pth",
          common.LPIPS_LIN_SHA256["alex"])
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(home / "hub"))
    yield home
    torch.hub.set_dir(hub)


def torchrun(script, argv, torch_home):
    """`torchrun --nproc_per_node=2 script argv` on the CPU (gloo); fails the test on exit != 0."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port", str(port), script] + argv, cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", TORCH_HOME=str(torch_home)))
    assert proc.returncode == 0, proc.stderr[-3000:]


def rank_datasets(ds, root, tmp_path, global_batch, world=2):
    """Copies of the dataset, one per rank, holding only the training items that rank takes in
    the first global batch (common.ResumableBatches, seed 0): one process on copy r does exactly
    what rank r does (its --seed is 0 + r, as under torchrun)."""
    import shutil
    roots = []
    for rank in range(world):
        mine = next(iter(common.ResumableBatches(len(ds), global_batch, 0, 0, rank, world)))
        copy = tmp_path / f"rank{rank}"
        shutil.copytree(root, copy)
        for i, record in enumerate(ds.records):
            if i not in mine:
                for key in ("image", "label", "instance"):
                    if record.get(key):
                        os.remove(os.path.join(copy, os.path.relpath(record[key], root)))
        roots.append(str(copy))
    return roots


def with_rank0_weights(build):
    """build_models as rank r sees it under torchrun: it draws its own initial weights (moving its
    random stream, seeded 0 + r), then DDP gives it rank 0's (those drawn after seeding 0)."""
    def wrapped(args):
        models = build(args)
        with common.preserved_rng():
            common.seed_everything(0)
            for model, rank0 in zip(models, build(args)):
                model.load_state_dict(rank0.state_dict())
        return models
    return wrapped


INADE_PRESETS = {  # the paper presets' structure, widths shrunk by flags, 64 pixels high
    "deepfashion": "fake_deepfashion",
    "cityscapes": "fake_cityscapes",   # 64x128, 6 up-samplings, 35 classes
}


@pytest.mark.parametrize("preset", list(INADE_PRESETS))
def test_paper_preset_under_torchrun_then_resume_sample_eval(preset, stand_in_home, tmp_path,
                                                             monkeypatch):
    """The first G losses under torchrun (2 ranks, one layout each; the preset's VGG loss, 2 D
    scales, C0 noise) are the mean of what one process computes on each rank's half of the
    batch. One process on the whole batch cannot be compared directly: the generator's batch norm
    (Eq. 1) takes its statistics over a rank's own samples (SyncBatchNorm needs CUDA), and each
    rank draws its noise and flips from its own stream (seed + rank). So the reference for rank r
    is one process on r's layouts with --seed r and rank 0's initial weights (what DDP gives r).
    Every G loss is a mean over samples, so the mean over ranks is the whole batch's loss.
    Then --resume to a third step, --sample, and --eval (FID, LPIPS) on the result."""
    import numpy as np

    import data
    import test_data
    root = tmp_path / preset
    getattr(test_data, INADE_PRESETS[preset])(str(root), np.random.default_rng(0))
    flags = ["--data", preset, "--size", "64", "--ngf", "2", "--nef", "2", "--ndf", "4",
             "--z_dim", "4", "--noise_nc", "2", "--device", "cpu", "--log_every", "1",
             "--sample_every", "100", "--ckpt_every", "100", "--eval_n", "2"]
    run = flags + ["--data_dir", str(root), "--batch_size", "2"]
    two = str(tmp_path / "two")
    torchrun("inade.py", run + ["--iters", "2", "--out_dir", two], stand_in_home)
    logs = lambda out: [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    first = logs(two)[0]
    ds = data.get_dataset(preset, root=str(root), split="train", size=64)
    halves = []
    monkeypatch.setattr(inade, "build_models", with_rank0_weights(inade.build_models))
    for rank, rank_root in enumerate(rank_datasets(ds, root, tmp_path, 2)):
        out = str(tmp_path / f"one{rank}")
        inade.main(flags + ["--data_dir", rank_root, "--batch_size", "1", "--iters", "1",
                            "--seed", str(rank), "--out_dir", out])
        halves.append(logs(out)[0])
    monkeypatch.undo()
    close = lambda a, b: a == pytest.approx(b, rel=1e-4, abs=1.1e-6)   # the log keeps 6 decimals
    for key in ("g_gan", "g_fm", "g_rec", "g_kl"):   # computed before any update
        assert close(first[key], (halves[0][key] + halves[1][key]) / 2), key

    inade.main(run + ["--iters", "3", "--out_dir", two, "--resume"])
    assert [r["iter"] for r in logs(two)] == [1, 2, 3]
    inade.main(run + ["--out_dir", two, "--sample", "--n_styles", "2"])
    for name in ("random", "class", "instance", "reference", "reconstruction"):
        assert os.path.getsize(os.path.join(two, f"sample_{name}.png")) > 0
    result = inade.main(run + ["--out_dir", two, "--eval"]) or \
        json.load(open(os.path.join(two, "eval.json")))
    assert result["distance"] == "lpips-alex" and result["layouts"] == 2
    assert result["fid"] >= 0 and result["lpips_diversity"] >= 0
