"""Tests of common.py: plumbing (command line, checkpoints, resume, DDP), layers and losses.

The pretrained networks and metrics have their own section further down.
"""

import json
import os
import socket
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

PRESETS = {"shapes": {"iters": 100, "batch_size": 8, "size": 32},
           "cityscapes": {"iters": 10_000, "batch_size": 16, "size": 256}}


def test_presets_fill_flags_and_command_line_wins():
    args = common.parse_args(common.base_parser("t"), PRESETS, "m", "shapes",
                             ["--data", "cityscapes", "--batch_size", "4"])
    assert (args.iters, args.batch_size, args.size) == (10_000, 4, 256)
    assert args.data_dir == os.path.join("data", "cityscapes")
    assert args.out_dir == os.path.join("out", "m-cityscapes")
    args = common.parse_args(common.base_parser("t"), PRESETS, "m", "shapes", [])
    assert (args.data, args.iters) == ("shapes", 100)


def test_unknown_dataset_is_a_user_error_and_exits_2(capsys):
    def main():
        common.parse_args(common.base_parser("t"), PRESETS, "m", "shapes", ["--data", "nope"])
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--data nope" in err and "cityscapes" in err


def test_dry_run_prints_exact_counts_as_last_line(capsys):
    common.print_dry_run({"G": nn.Linear(3, 5), "D": nn.Conv2d(2, 4, 3)})
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == \
        {"params": {"G": 3 * 5 + 5, "D": 2 * 4 * 9 + 4}}


# ---------------------------------------------------------------------------------------------
# Batches, checkpoints, resume
# ---------------------------------------------------------------------------------------------

class ToyData(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(4, generator=g), "y": torch.tensor(float(i % 3)), "idx": i}


def test_batch_stream_resumes_the_same_batches_and_splits_ranks():
    data, rt = ToyData(), common.Runtime(torch.device("cpu"), torch.float32)
    full = common.batch_stream(data, 6, rt, seed=3)
    first = [next(full)["idx"].tolist() for _ in range(7)]  # crosses an epoch boundary (3/epoch)
    resumed = common.batch_stream(data, 6, rt, seed=3, start_iter=4)
    assert [next(resumed)["idx"].tolist() for _ in range(3)] == first[4:]
    assert all(len(set(b)) == 6 for b in first)
    # Two ranks together see exactly the global batch of one process.
    r0 = common.ResumableBatches(20, 6, 3, 0, rank=0, world_size=2)
    r1 = common.ResumableBatches(20, 6, 3, 0, rank=1, world_size=2)
    assert next(iter(r0)) + next(iter(r1)) == first[0]


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


def train_toy(out_dir, iters, resume=False, stop_at=None):
    """A miniature of every method script's loop: data stream, model, EMA, Adam, scheduler."""
    common.seed_everything(0)
    rt = common.Runtime(torch.device("cpu"), torch.float32)
    model = ToyModel()
    ema = common.EMA(model, decay=0.9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / iters)
    objects = {"model": model, "ema": ema, "opt": opt, "sched": sched}
    path, start = os.path.join(out_dir, "ckpt.pt"), 0
    if resume:
        start = common.load_checkpoint(path, "toy", {"w": 16}, ["w"], objects)["iter"]
    batches = common.batch_stream(ToyData(), 4, rt, seed=0, start_iter=start)
    losses = []
    for it in range(start, stop_at or iters):
        b = next(batches)
        loss = F.mse_loss(model(b["x"]), b["y"] + 0.01 * torch.randn(4))  # RNG in loss and dropout
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema.update(model)
        losses.append(loss.item())
        common.save_checkpoint(path, "toy", {"w": 16}, it + 1, objects)
    return losses, ema.model.net[0].weight.detach().clone()


def test_resume_gives_the_same_next_losses_as_an_uninterrupted_run(tmp_path):
    straight, w_straight = train_toy(str(tmp_path / "a"), 30)
    first, _ = train_toy(str(tmp_path / "b"), 30, stop_at=13)
    rest, w_resumed = train_toy(str(tmp_path / "b"), 30, resume=True)
    assert first + rest == straight  # exactly, not approximately
    assert torch.equal(w_straight, w_resumed)
    assert np.mean(straight[-5:]) < np.mean(straight[:5])  # and it trained


def test_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    model = nn.Linear(2, 2)
    common.save_checkpoint(path, "toy", {}, 7, {"model": model})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the user pressed Ctrl-C in the middle of the write
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, "toy", {}, 8, {"model": nn.Linear(2, 2)})
    monkeypatch.undo()
    fresh = nn.Linear(2, 2)
    assert common.load_checkpoint(path, "toy", objects={"model": fresh})["iter"] == 7
    assert torch.equal(fresh.weight, model.weight)


def test_foreign_or_mismatched_checkpoints_are_refused_with_one_sentence(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, "cimle", {"K": 3}, 1, {"m": nn.Linear(2, 2)})
    with pytest.raises(common.UserError, match=r"written by cimle, not inade\.py"):
        common.load_checkpoint(path, "inade")
    with pytest.raises(common.UserError, match=r"--K 3 \(asked: 4\)"):
        common.load_checkpoint(path, "cimle", {"K": 4}, ["K"])
    with pytest.raises(common.UserError, match="no checkpoint at"):
        common.load_checkpoint(str(tmp_path / "missing.pt"), "cimle")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.UserError, match="not a readable checkpoint"):
        common.load_checkpoint(str(tmp_path / "junk.pt"), "cimle")


def test_rng_state_round_trip_restores_every_generator():
    state = common.rng_state()
    a = (np.random.rand(), torch.rand(1).item(), __import__("random").random())
    common.set_rng_state(state)
    assert (np.random.rand(), torch.rand(1).item(), __import__("random").random()) == a


def test_ema_is_the_exponential_moving_average():
    model = nn.Linear(3, 1)
    ema = common.EMA(model, decay=0.75)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.model.weight, 0.75 * w0 + 0.25 * (w0 + 1.0))
    assert not ema.model.weight.requires_grad


def test_logger_keeps_only_lines_up_to_the_resumed_iteration(tmp_path):
    log = common.Logger(str(tmp_path), 10, enabled=True)
    for it in (2, 4, 6):
        log.step(8)
        log.log(it, loss=1.0 / it)
    log.close()
    log = common.Logger(str(tmp_path), 10, start_iter=4, enabled=True)
    log.close()
    lines = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    assert [x["iter"] for x in lines] == [2, 4] and lines[0]["img_per_s"] > 0


def test_grid_colours_label_maps_with_the_palette(tmp_path):
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8)
    label = torch.tensor([[0, 1], [2, 1]])
    image = torch.full((3, 2, 2), 1.0)
    canvas = common.save_grid(str(tmp_path / "g.png"), [[label, image]], palette, pad=1)
    assert canvas[1, 2].tolist() == [255, 0, 0] and canvas[2, 1].tolist() == [0, 0, 255]
    assert canvas[1, 4].tolist() == [255, 255, 255]  # image in [-1, 1]: 1 -> white
    assert os.path.exists(tmp_path / "g.png") and not os.path.exists(tmp_path / "g.png.tmp.png")


# ---------------------------------------------------------------------------------------------
# DDP: two gloo processes give the gradients of one process on the whole batch
# ---------------------------------------------------------------------------------------------

def _ddp_worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    args = common.parse_args(common.base_parser("t"), PRESETS, "m", "shapes", ["--device", "cpu"])
    rt = common.setup_runtime(args)
    torch.manual_seed(0)  # same initial weights on both ranks
    model = common.prepare_model(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), rt)
    batch = next(common.batch_stream(ToyData(), 8, rt, seed=1))
    F.mse_loss(model(batch["x"]).squeeze(1), batch["y"]).backward()
    if rt.is_main:
        torch.save([p.grad for p in model.parameters()], os.path.join(out_dir, "ddp.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one_process_on_the_full_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    ddp_grads = torch.load(tmp_path / "ddp.pt")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    rt = common.Runtime(torch.device("cpu"), torch.float32)
    batch = next(common.batch_stream(ToyData(), 8, rt, seed=1))
    F.mse_loss(model(batch["x"]).squeeze(1), batch["y"]).backward()
    for g_ddp, p in zip(ddp_grads, model.parameters()):
        assert torch.allclose(g_ddp, p.grad, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

def test_equalised_layers_scale_weights_at_run_time():
    torch.manual_seed(0)
    lin = common.EqualLinear(256, 64, lr_mul=0.01)
    assert torch.allclose(lin(torch.eye(256))[:, :3].t(), lin.weight[:3] * 0.01 / 16, atol=1e-6)
    conv = common.EqualConv2d(8, 4, 3, padding=1)
    x = torch.randn(2, 8, 5, 5)
    ref = F.conv2d(x, conv.weight / (8 * 9) ** 0.5, conv.bias, padding=1)
    assert torch.allclose(conv(x), ref, atol=1e-6)


def test_adain_sets_each_channel_to_the_styles_mean_and_std():
    torch.manual_seed(0)
    layer = common.AdaIN(4, 8)
    with torch.no_grad():
        layer.style.bias.normal_()
        layer.style.weight.zero_()  # style = bias: gamma, beta are known constants
    x, w = torch.randn(2, 4, 16, 16) * 3 + 1, torch.randn(2, 8)
    y = layer(x, w)
    gamma, beta = layer.style.bias[:4], layer.style.bias[4:]
    assert torch.allclose(y.mean((2, 3)), beta.expand(2, 4), atol=1e-4)
    assert torch.allclose(y.std((2, 3), unbiased=False), gamma.abs().expand(2, 4), atol=1e-2)


def test_pixel_norm_and_noise_injection():
    x = torch.randn(3, 10)
    assert torch.allclose(common.PixelNorm()(x).pow(2).mean(1), torch.ones(3), atol=1e-5)
    inj = common.NoiseInjection(4)
    with torch.no_grad():
        inj.weight.copy_(torch.arange(4.0).view(1, 4, 1, 1))
    noise = torch.randn(1, 1, 3, 3)
    out = inj(torch.zeros(1, 4, 3, 3), noise)
    assert torch.allclose(out[0, 2], 2 * noise[0, 0])


def test_multiscale_discriminator_shapes_and_spade_layout():
    d = common.MultiscaleDiscriminator(in_ch=12, num_d=2)
    outs = d(torch.randn(2, 12, 64, 64))
    assert len(outs) == 2 and [len(o) for o in outs] == [5, 5]
    assert outs[0][-1].shape == (2, 1, 11, 11) and outs[1][-1].shape == (2, 1, 7, 7)
    per_scale = (12 * 64 * 16 + 64) + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 \
        + (512 * 16 + 1)  # SPADE's NLayerDiscriminator: SN convs have no bias
    assert common.count_params(d) == 2 * per_scale


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def test_gan_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert common.hinge_d_loss(real, fake).item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    assert common.hinge_g_loss(fake).item() == pytest.approx(1.5)
    sp = lambda t: float(np.log1p(np.exp(t)))  # noqa: E731
    assert common.ns_d_loss(real, fake).item() == pytest.approx(
        (sp(-2) + sp(-0.5)) / 2 + (sp(-3) + sp(0)) / 2, rel=1e-6)
    assert common.ns_g_loss(fake).item() == pytest.approx((sp(3) + sp(0)) / 2, rel=1e-6)


def test_r1_of_a_linear_discriminator_is_its_squared_weight_norm():
    w = torch.randn(6)
    x = torch.randn(5, 6, requires_grad=True)
    assert common.r1_penalty(x @ w, x).item() == pytest.approx(w.pow(2).sum().item(), rel=1e-5)


def test_feature_matching_skips_the_logit_and_averages_scales():
    real = [[torch.zeros(1, 2), torch.zeros(1, 1)], [torch.zeros(1, 2), torch.zeros(1, 1)]]
    fake = [[torch.ones(1, 2), torch.full((1, 1), 9.0)], [torch.full((1, 2), 3.0), torch.zeros(1, 1)]]
    assert common.feature_matching_loss(real, fake).item() == pytest.approx((1 + 3) / 2)


def test_kl_divergences_match_the_closed_form():
    torch.manual_seed(0)
    mu_q, lv_q, mu_p, lv_p = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    q = torch.distributions.Normal(mu_q, (0.5 * lv_q).exp())
    p = torch.distributions.Normal(mu_p, (0.5 * lv_p).exp())
    ref = torch.distributions.kl_divergence(q, p)
    assert torch.allclose(common.kl_diag_gaussians(mu_q, lv_q, mu_p, lv_p), ref, atol=1e-5)
    std = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(common.kl_standard_normal(mu_q, lv_q), std, atol=1e-5)
    assert common.kl_standard_normal(torch.zeros(3), torch.zeros(3)).abs().max() == 0


def test_contrastive_loss_is_eq_10_written_as_sums():
    torch.manual_seed(0)
    u, v, tau = torch.randn(5, 7), torch.randn(5, 7), 0.3
    cos = F.cosine_similarity(u[:, None], v[None], dim=2)  # cos[i, j] = cos(u_i, v_j)
    n = len(u)
    term1 = -sum(torch.log(torch.exp(cos[i, i] / tau) / torch.exp(cos[i] / tau).sum())
                 for i in range(n)) / (2 * n)
    term2 = -sum(torch.log(torch.exp(cos[i, i] / tau) / torch.exp(cos[:, i] / tau).sum())
                 for i in range(n)) / (2 * n)
    assert common.contrastive_loss(u, v, tau).item() == pytest.approx((term1 + term2).item(),
                                                                       rel=1e-5)
    log_scale = torch.tensor(1.0, requires_grad=True)  # a learnable temperature gets a gradient
    common.contrastive_loss(u, v, torch.exp(-log_scale)).backward()
    assert log_scale.grad is not None and log_scale.grad != 0
