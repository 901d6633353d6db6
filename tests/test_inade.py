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

    def save_then_crash(path, method, config, iteration, objects, extra=None):
        save(path, method, config, iteration, objects, extra)
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
