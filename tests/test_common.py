"""Tests of common.py: plumbing (command line, checkpoints, resume, DDP), layers and losses.

The pretrained networks and metrics have their own section further down.
"""

import gzip
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

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


@pytest.mark.parametrize("dtype, compile_model, expected", [
    ("bfloat16", None, [("float32", None), ("bfloat16", None)]),
    ("float32", None, [("float32", None)]),
    ("bfloat16", "inductor", [("float32", None), ("bfloat16", None),
                              ("float32", "inductor"), ("bfloat16", "inductor")]),
    ("float32", "aot_eager", [("float32", None), ("float32", "aot_eager")]),
])
def test_bench_training_times_every_asked_configuration_after_float32_eager(
        capsys, dtype, compile_model, expected):
    """--bench: fresh networks per configuration, warm-up, one untimed step that counts the FLOPs,
    then N timed steps each: float32 eager first as the baseline, the asked --dtype, and with
    --compile both compiled; each later row has its speed-up, the summary comes last."""
    import argparse
    args = argparse.Namespace(bench=2, batch_size=4, dtype=dtype, compile=compile_model, seed=0,
                              data="toy", size=8)
    made, calls = [], []

    def make_step(run, compile_model):
        made.append((str(run.dtype).removeprefix("torch."), compile_model))
        return lambda: calls.append(len(made))

    summary = common.bench_training(args, common.Runtime(torch.device("cpu"), torch.float32),
                                    make_step)
    assert made == expected
    # 3 warm-up steps (+1 counting the FLOPs, the first configuration only) + 2 timed each
    assert calls == [1] * 6 + [i for i in range(2, len(expected) + 1) for _ in range(5)]
    rows = summary["bench"]
    assert [(r["dtype"], r["compile"]) for r in rows] == expected
    assert "speedup_vs_fp32_eager" not in rows[0]
    assert all(r["speedup_vs_fp32_eager"] > 0 for r in rows[1:])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert lines == rows + [summary]


def test_bench_counts_the_flops_of_a_training_step_and_reports_mfu_against_the_peak():
    """A linear layer's training step costs 2*B*I*O FLOPs forward and twice that backward (input
    and weight gradients): the count per image and the MFU = achieved / peak must follow."""
    import argparse
    batch, n_in, n_out = 8, 64, 32
    args = argparse.Namespace(bench=3, batch_size=batch, dtype="float32", compile=None, seed=0,
                              data="toy", size=8, peak_tflops=2.0)

    def make_step(run, compile_model):
        layer = nn.Linear(n_in, n_out, bias=False)
        x = torch.randn(batch, n_in, requires_grad=True)  # as inside a deeper network
        return lambda: layer(x).square().sum().backward()

    summary = common.bench_training(args, common.Runtime(torch.device("cpu"), torch.float32),
                                    make_step)
    assert summary["gflops_per_img"] == pytest.approx(6 * n_in * n_out / 1e9, rel=1e-3)
    row = summary["bench"][0]   # achieved TFLOP/s = FLOPs per image x images per second
    assert row["tflops"] == pytest.approx(summary["gflops_per_img"] * row["img_per_s"] / 1e3,
                                          rel=1e-2)
    assert row["mfu"] == pytest.approx(row["tflops"] / 2.0, rel=1e-3)  # --peak_tflops 2
    # the same count as torch's FlopCounterMode on a convolutional step (which it can run)
    from torch.utils.flop_counter import FlopCounterMode
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    with FlopCounterMode(display=False) as reference:
        net(images).sum().backward()
    assert common.count_flops(lambda: net(images).sum().backward()) == \
        reference.get_total_flops() > 0
    assert common.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert common.peak_tflops("NVIDIA H200", "float32") == 494.7
    assert common.peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    assert common.peak_tflops("cpu", "float32") is None
    assert common.peak_tflops("cpu", "float32", given=1.5) == 1.5
    # whole words only: a name that contains a known one is another GPU
    assert common.peak_tflops("NVIDIA H100 NVL", "bfloat16") == 835.5
    assert common.peak_tflops("NVIDIA GeForce RTX 4090", "float32") == 82.6
    assert common.peak_tflops("Tesla V100-SXM2-32GB", "float16") == 125.0
    assert common.peak_tflops("NVIDIA A10", "bfloat16") == 125.0
    assert common.peak_tflops("NVIDIA RTX A1000 6GB Laptop GPU", "bfloat16") is None
    assert common.peak_tflops("NVIDIA A10G", "bfloat16") is None


def test_bench_takes_the_given_peak_for_the_asked_dtype_only():
    """--peak_tflops is one device's peak in --dtype: the float32 baseline row of a bfloat16
    bench must not divide by it (an unknown CPU: that row has no MFU)."""
    import argparse
    args = argparse.Namespace(bench=1, batch_size=2, dtype="bfloat16", compile=None, seed=0,
                              data="toy", size=8, peak_tflops=2.0)
    layer = nn.Linear(16, 16)
    x = torch.randn(2, 16)
    summary = common.bench_training(args, common.Runtime(torch.device("cpu"), torch.float32),
                                    lambda run, compile_model: lambda: layer(x).sum().backward())
    fp32, bf16 = summary["bench"]
    assert fp32["dtype"] == "float32" and fp32["mfu"] is None
    assert bf16["dtype"] == "bfloat16" and bf16["mfu"] == pytest.approx(bf16["tflops"] / 2.0,
                                                                         rel=1e-3)


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


def test_data_workers_default_to_none_on_the_cpu_and_to_the_free_cores_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert [common.default_workers(d) for d in ("auto", "cuda", "cpu", "mps")] == [3, 3, 0, 0]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert common.default_workers("auto") == 8
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.default_workers("auto") == 0


class RandomCrops(ToyData):
    """An item with a random draw from torch's global RNG, as FileDataset's crop and flip."""

    def __getitem__(self, i):
        return dict(super().__getitem__(i), crop=torch.randint(0, 10 ** 9, ()))


def test_random_draws_of_items_survive_resume_workers_and_ranks_and_spare_the_global_rng(
        monkeypatch):
    rt = common.Runtime(torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    full = common.batch_stream(RandomCrops(), 6, rt, seed=3)
    batches = [next(full) for _ in range(5)]
    assert torch.equal(torch.get_rng_state(), before)  # the training's RNG is not consumed
    crops = [b["crop"].tolist() for b in batches]
    assert len({c for b in crops for c in b}) == 30     # also an item met again in epoch 2
    seeded = []  # CUDA's generators are left alone (torch.manual_seed would reseed them all)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: seeded.append(s))
    next(common.batch_stream(RandomCrops(), 6, rt, seed=3))
    assert seeded == []
    resumed = common.batch_stream(RandomCrops(), 6, rt, seed=3, start_iter=2, num_workers=2)
    assert [next(resumed)["crop"].tolist() for _ in range(3)] == crops[2:]
    world = [common.Runtime(torch.device("cpu"), torch.float32, rank, 2) for rank in (0, 1)]
    halves = [next(common.batch_stream(RandomCrops(), 6, r, seed=3))["crop"].tolist()
              for r in world]
    assert halves[0] + halves[1] == crops[0]


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


def test_resume_refuses_another_dataset_seed_or_batch_but_sampling_does_not(tmp_path, capsys):
    """The batches of a run are a function of (seed, batch number, index): a --resume with another
    --seed, --batch_size or --data would continue another run, so it is refused (a forgotten
    --seed was taken silently before); --iters may grow, and --sample / --eval load any seed."""
    path = str(tmp_path / "ckpt.pt")
    config = {"data": "shapes", "seed": 2, "batch_size": 4, "lr": 1e-3}
    common.save_checkpoint(path, "toy", config, 5, {"m": nn.Linear(2, 2)})
    for key, other in (("seed", 0), ("batch_size", 8), ("data", "hshape")):
        with pytest.raises(common.UserError, match=rf"--{key} {config[key]} \(asked: {other}\)"):
            common.load_checkpoint(path, "toy", {**config, key: other})
        common.load_checkpoint(path, "toy", {**config, key: other}, restore_rng=False)
    common.load_checkpoint(path, "toy", {**config, "lr": 1e-4})  # a new rate is the user's call
    ummgan = __import__("ummgan")  # end to end: a resume that forgot the run's --seed
    out = str(tmp_path / "run")
    ummgan.main(["--iters", "1", "--seed", "2", "--out_dir", out])
    capsys.readouterr()  # the progress bar
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    status, err = exit_of("ummgan", ["--resume", "--iters", "2", "--out_dir", out], capsys)
    assert (status, err) == (2, f"error: {out}/ckpt.pt was trained with --seed 2 (asked: 0); "
                                f"pass the same flags to use it.\n")
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    ummgan.main(["--resume", "--iters", "2", "--seed", "2", "--out_dir", out])


def test_a_checkpoint_keeps_the_training_flags_and_drops_the_run_mode_flags(tmp_path):
    """--sample and --eval rebuild networks from the saved config: it must hold what was trained
    (widths, data) and nothing that says what the saving command did (resume, device, ...)."""
    import argparse
    args = argparse.Namespace(data="shapes", ngf=16, lr=2e-4, resume=True, sample=False,
                              eval=False, dry_run=False, bench=None, device="cpu", num_workers=2,
                              compile=None)
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, "toy", args, 3, {"m": nn.Linear(2, 2)})
    assert common.load_checkpoint(path, "toy")["config"] == {"data": "shapes", "ngf": 16,
                                                              "lr": 2e-4}
    common.save_checkpoint(path, "toy", {"ngf": 8, "device": "cuda"}, 3, {"m": nn.Linear(2, 2)})
    assert common.load_checkpoint(path, "toy")["config"] == {"ngf": 8}


def test_rng_state_round_trip_restores_every_generator():
    state = common.rng_state()
    a = (np.random.rand(), torch.rand(1).item(), __import__("random").random())
    common.set_rng_state(state)
    assert (np.random.rand(), torch.rand(1).item(), __import__("random").random()) == a


def test_a_resume_restores_the_generators_of_the_gpus_this_process_sees(monkeypatch):
    """A checkpoint saved where 2 GPUs were visible, resumed where 1 is: the first state goes
    back to it (torch's set_rng_state_all indexes one generator per entry and would fail)."""
    restored = []

    def set_all(states):
        assert len(states) <= torch.cuda.device_count(), "a state for a GPU this process lacks"
        restored.extend(states)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                        lambda: [torch.tensor([7], dtype=torch.uint8)])
    state = common.rng_state()
    state["cuda"] = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    common.set_rng_state(state)
    assert [int(t) for t in restored] == [1]


def test_ema_is_the_exponential_moving_average():
    model = nn.Linear(3, 1)
    ema = common.EMA(model, decay=0.75)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.model.weight, 0.75 * w0 + 0.25 * (w0 + 1.0))
    assert not ema.model.weight.requires_grad
    norm = nn.BatchNorm1d(2)
    ema = common.EMA(norm, decay=0.75)
    norm(torch.randn(8, 2) + 5)                     # running statistics are buffers: copied
    ema.update(norm)
    assert torch.equal(ema.model.running_mean, norm.running_mean)


def test_logger_keeps_only_lines_up_to_the_resumed_iteration(tmp_path):
    log = common.Logger(str(tmp_path), 10, enabled=True)
    for it in (2, 4, 6):
        log.step(8)
        log.log(it, loss=1.0 / it)
    log.close()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"iter": 8, "loss": 0.1')  # the earlier run was killed mid-line
    before = (tmp_path / "log.jsonl").read_text()
    log = common.Logger(str(tmp_path), 10, start_iter=4, enabled=True)
    log.close()  # a resumed run that fails before its first log step changes nothing
    assert (tmp_path / "log.jsonl").read_text() == before
    log = common.Logger(str(tmp_path), 10, start_iter=4, enabled=True)
    log.step(8)
    log.log(5, loss=0.2)
    log.close()
    lines = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    assert [x["iter"] for x in lines] == [2, 4, 5] and lines[0]["img_per_s"] > 0


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
    # A checkpoint keeps every rank's random state: after a resume each rank draws what it would
    # have drawn (not rank 0's numbers).
    # So are the losses each rank summed since its last log line.
    torch.manual_seed(100 + rank)
    path = os.path.join(out_dir, "ckpt.pt")
    means = common.LossMeans(rt.device)
    means.add({"loss": torch.tensor(1.0 + rank)})
    common.save_checkpoint(path, "m", {}, 1, {"model": model}, rt=rt, per_rank={"log": means})
    torch.distributed.barrier()
    draws = [torch.rand(3)]
    resumed = common.LossMeans(rt.device)
    common.load_checkpoint(path, "m", objects={"model": model}, rt=rt, per_rank={"log": resumed})
    draws.append(torch.rand(3))
    resumed.add({"loss": torch.tensor(3.0)})
    draws.append(torch.tensor(resumed.pop(rt)["loss"]))  # ((1 + 3) / 2 + (2 + 3) / 2) / 2
    torch.save(draws, os.path.join(out_dir, f"draws{rank}.pt"))
    # Evaluation sums over the processes (--eval under torchrun): FID statistics, where a process
    # may have had no batch, and dicts of float sums with keys that only some processes have.
    feats = torch.arange(24.0).view(6, 4) ** 1.5
    split, empty = common.RunningFIDStats(), common.RunningFIDStats()
    split.add(feats[:2] if rank == 0 else feats[2:])
    if rank == 1:
        empty.add(feats)
    split.all_reduce(rt.device)
    empty.all_reduce(rt.device)
    sums = common.sum_over_ranks({"a": 1.0} if rank == 0 else {"a": 2.0, "b": 3.0}, rt)
    if rt.is_main:
        torch.save({"split": [torch.from_numpy(x) for x in split.stats()],
                    "empty": [torch.from_numpy(x) for x in empty.stats()], "sums": sums},
                   os.path.join(out_dir, "reduced.pt"))
    # Both ranks leave together, and skip the interpreter's teardown: on the CI machine a rank
    # was seen to abort there ("terminate called without an active exception", a C++ thread of
    # the process group still joinable at exit) after its work was done.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
    draws = [torch.load(tmp_path / f"draws{r}.pt") for r in (0, 1)]
    for before, after, loss in draws:
        assert torch.equal(before, after)          # the rank's own stream, resumed exactly
        assert float(loss) == 2.25
    assert not torch.equal(draws[0][0], draws[1][0])
    assert len(torch.load(tmp_path / "ckpt.pt", weights_only=True)["rng_per_rank"]) == 2
    reduced = torch.load(tmp_path / "reduced.pt")
    whole = common.RunningFIDStats()
    whole.add(torch.arange(24.0).view(6, 4) ** 1.5)
    for got in (reduced["split"], reduced["empty"]):
        for a, b in zip(got, whole.stats()):
            assert np.allclose(a.numpy(), b, rtol=1e-12)
    assert reduced["sums"] == {"a": 3.0, "b": 3.0}


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


def test_pixel_norm_gives_unit_mean_square_per_vector():
    x = torch.randn(3, 10) * 5
    assert torch.allclose(common.PixelNorm()(x).pow(2).mean(1), torch.ones(3), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def test_non_saturating_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    sp = lambda t: float(np.log1p(np.exp(t)))  # noqa: E731
    assert common.ns_d_loss(real, fake).item() == pytest.approx(
        (sp(-2) + sp(-0.5)) / 2 + (sp(-3) + sp(0)) / 2, rel=1e-6)
    assert common.ns_g_loss(fake).item() == pytest.approx((sp(3) + sp(0)) / 2, rel=1e-6)


def test_r1_of_a_linear_discriminator_is_its_squared_weight_norm():
    w = torch.randn(6)
    x = torch.randn(5, 6, requires_grad=True)
    assert common.r1_penalty(x @ w, x).item() == pytest.approx(w.pow(2).sum().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Nothing a user gives is lost: flags, run folders, checkpoints, pre-emption (all five scripts)
# ---------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("inade", "cimle", "ummgan", "poe_gan", "compose_diffusion")


def exit_of(script, argv, capsys):
    """Run script.main(argv) as the command line does: (exit status, stderr)."""
    module = __import__(script)
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(lambda: module.main(argv))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags, sentence", [
    (["--batch_size", "0"], "--batch_size must be at least 1 (got 0)."),
    (["--batch_size", "-2"], "--batch_size must be at least 1 (got -2)."),
    (["--iters", "-1"], "--iters must be at least 1 (got -1)."),
    (["--seed", "-1"], "--seed must be in 0 .. 2**31 - 1 (got -1)."),
    (["--iters", "0"], "--iters must be at least 1 (got 0)."),
    (["--log_every", "0"], "--log_every must be at least 1 (got 0)."),
    (["--ckpt_every", "0"], "--ckpt_every must be at least 1 (got 0)."),
    (["--sample_every", "0"], "--sample_every must be at least 1 (got 0)."),
    (["--num_workers", "-1"], "--num_workers must be at least 0 (got -1)."),
    (["--size", "0"], "--size must be at least 1 (got 0)."),
    (["--peak_tflops", "0"], "--peak_tflops must be a positive number of TFLOP/s (got 0.0)."),
])
def test_a_bad_common_flag_is_one_sentence_before_anything_is_written(script, flags, sentence,
                                                                       tmp_path, capsys):
    out = tmp_path / "run"
    status, err = exit_of(script, flags + ["--out_dir", str(out)], capsys)
    assert (status, err) == (2, f"error: {sentence}\n")
    assert not out.exists()  # refused before the run folder was made


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_batch_that_does_not_divide_over_the_torchrun_processes_is_refused_at_start(
        script, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it, before any process group exists
    status, err = exit_of(script, ["--batch_size", "3", "--iters", "1", "--out_dir",
                                   str(tmp_path / "r")], capsys)
    assert not os.path.exists(tmp_path / "r" / "ckpt.pt")  # refused before any training
    # the generic sentence, or the script's own (cIMLE says how to run |S~| = 1, PoE-GAN why a
    # process needs 2 images)
    assert status == 2 and err.startswith("error: --batch_size 3 ") and err.count("\n") == 1
    assert "2 processes" in err or "per process" in err


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--eval", "--sample"])
def test_outputs_that_one_process_makes_are_refused_under_torchrun(script, flag, tmp_path, capsys,
                                                                   monkeypatch):
    # PoE-GAN's and compose's --eval deal their batches out to the processes; the rest would be
    # made whole by every process.
    monkeypatch.setenv("WORLD_SIZE", "2")
    status, err = exit_of(script, [flag, "--out_dir", str(tmp_path / "r")], capsys)
    refused = (f"error: {script}.py {flag} runs in one process and would be repeated whole by "
               f"each of the 2 processes of this torchrun launch: start it with python.\n")
    shared = script in ("poe_gan", "compose_diffusion") and flag == "--eval"
    assert status == 2 and (err == refused) != shared, err  # shared: refused for no ckpt.pt


@pytest.mark.parametrize("script, reason", [
    ("ummgan", "the authors of uMM-GAN released no trained networks."),
    ("poe_gan", "the authors of PoE-GAN released no trained networks."),
])
def test_init_from_is_refused_with_the_reason_where_no_released_weights_load(script, reason,
                                                                              tmp_path, capsys):
    weights = tmp_path / "G.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    status, err = exit_of(script, ["--sample", "--init_from", str(weights), "--out_dir",
                                   str(tmp_path / "run")], capsys)
    assert (status, err) == (2, f"error: {script}.py cannot start from --init_from {weights}: "
                                f"{reason}\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", ["cimle", "inade"])
def test_init_from_a_missing_file_or_with_resume_is_one_sentence(script, tmp_path, capsys):
    missing = tmp_path / "best_net_G.pth"
    status, err = exit_of(script, ["--sample", "--init_from", str(missing)], capsys)
    assert status == 2 and err.count("\n") == 1 and f"--init_from {missing}: no such file" in err
    torch.save({"w": torch.zeros(1)}, missing)
    status, err = exit_of(script, ["--resume", "--init_from", str(missing), "--out_dir",
                                   str(tmp_path / "run")], capsys)
    assert (status, err) == (2, "error: --init_from starts a new run from released weights and "
                                "--resume continues ckpt.pt: give one of them.\n")
    if script == "cimle":
        return  # cimle.py reads the file before the run folder (widths from its shapes)
    run = tmp_path / "trained"  # a run of the user's own: released weights must not write into it
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"a day of training")
    (run / "eval.json").write_text("{}")
    status, err = exit_of(script, ["--eval", "--init_from", str(missing), "--out_dir", str(run)],
                          capsys)
    assert (status, err) == (2, f"error: --out_dir {run} holds a training run ({run / 'ckpt.pt'})"
                                f"; give --sample / --eval --init_from another --out_dir, so "
                                f"that the run's grids are kept.\n")
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pt", "eval.json"]
    assert (run / "eval.json").read_text() == "{}"


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("earlier", ["ckpt.pt", "log.jsonl"])
def test_a_run_folder_survives_a_second_run_without_resume(script, earlier, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / earlier).write_bytes(b"a day of training")
    status, err = exit_of(script, ["--out_dir", str(out), "--iters", "1"], capsys)
    if earlier == "ckpt.pt":
        assert status == 2 and err == (f"error: {out / earlier} already exists: pass --resume to "
                                       f"continue that run, or choose another --out_dir.\n")
    else:  # a run that stopped before its first checkpoint: --resume would find nothing
        assert status == 2 and err == (f"error: {out / earlier} already exists, of a run that "
                                       f"stopped before its first checkpoint (nothing to "
                                       f"--resume): delete it, or choose another --out_dir.\n")
    assert [p.name for p in out.iterdir()] == [earlier]
    assert (out / earlier).read_bytes() == b"a day of training"


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_out_dir_that_cannot_be_written_is_refused_before_any_work(script, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    status, err = exit_of(script, ["--out_dir", str(tmp_path / "file" / "run")], capsys)
    assert status == 2 and err.startswith(f"error: --out_dir {tmp_path / 'file' / 'run'} cannot "
                                          f"be written to (Not a directory)")
    assert err.count("\n") == 1


def test_a_resume_past_its_iters_is_one_sentence(tmp_path):
    """--resume --iters 3 of a checkpoint at iteration 5 has nothing to train (it exited 0 doing
    nothing); the same --iters is a finished run and loads."""
    path = str(tmp_path / "ckpt.pt")
    net = nn.Linear(2, 2)
    common.save_checkpoint(path, "m", {"iters": 5}, 5, {"net": net})
    with pytest.raises(common.UserError, match=r"at iteration 5, past --iters 3: nothing to "
                                               r"train; pass --iters 5 or more\."):
        common.load_checkpoint(path, "m", {"iters": 3}, objects={"net": net})
    assert common.load_checkpoint(path, "m", {"iters": 5}, objects={"net": net})["iter"] == 5
    common.load_checkpoint(path, "m", {"iters": 3}, objects={"net": net}, restore_rng=False)


def test_a_checkpoint_that_does_not_fit_names_the_object_and_the_key(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = torch.optim.Adam(net.parameters())
    common.save_checkpoint(path, "toy", {"width": 4}, 5, dict(net=net, opt=opt))
    ok = common.load_checkpoint(path, "toy", objects=dict(net=net, opt=opt))
    assert ok["iter"] == 5
    with pytest.raises(common.UserError, match=r"holds no 'scaler' \(it holds net, opt\)"):
        common.load_checkpoint(path, "toy", objects=dict(net=net, scaler=common.Runtime(
            torch.device("cpu"), torch.float32).scaler))
    wider = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    with pytest.raises(common.UserError) as err:
        common.load_checkpoint(path, "toy", objects=dict(net=wider))
    assert str(err.value) == (f"{path}: in 'net', 0.weight has shape (4, 3), expected (5, 3) "
                              f"(and 2 more); it was written with other flags or by another "
                              f"version of this script.")
    with pytest.raises(common.UserError, match=r"in 'net', 0.weight is torch.float32, expected "
                                               r"torch.float64"):
        common.load_checkpoint(path, "toy", objects=dict(net=copy_of(net).double()))
    deeper = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    with pytest.raises(common.UserError, match=r"in 'net', 2.weight is missing"):
        common.load_checkpoint(path, "toy", objects=dict(net=deeper))
    two_groups = torch.optim.Adam([{"params": [p]} for p in net.parameters()])
    with pytest.raises(common.UserError, match=r"'opt' does not fit this run"):
        common.load_checkpoint(path, "toy", objects=dict(opt=two_groups))
    with pytest.raises(common.UserError, match=r"trained with --width 4 \(asked: 8\)"):
        common.load_checkpoint(path, "toy", {"width": 8}, ("width",))
    with pytest.raises(common.UserError, match=r"written by toy, not other.py"):
        common.load_checkpoint(path, "other")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("mode", ["--resume", "--sample", "--eval"])
def test_a_missing_checkpoint_is_named_with_what_to_do(script, mode, tmp_path, capsys):
    out = tmp_path / "run"
    status, err = exit_of(script, [mode, "--out_dir", str(out)], capsys)
    assert status == 2 and err.startswith(f"error: no checkpoint at {out / 'ckpt.pt'}; train "
                                          f"first") and err.count("\n") == 1


def test_stop_signals_set_a_flag_and_a_second_ctrl_c_aborts():
    rt = common.Runtime(torch.device("cpu"), torch.float32)
    before = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN under nohup / a background job
    with common.StopSignals() as signals:
        assert not signals.requested(rt)
        signal.raise_signal(signal.SIGUSR1)  # SLURM's warning; raise_signal: this thread, now
        assert signals.requested(rt)
        with pytest.raises(common.Stopped) as stop:
            signals.stop(7, "run/ckpt.pt")
        assert stop.value.status == 128 + signal.SIGUSR1
        assert str(stop.value) == ("SIGUSR1: stopped after iteration 7; the checkpoint is "
                                   "run/ckpt.pt. Continue with the same command and --resume.")
    with common.StopSignals() as signals:
        signal.raise_signal(signal.SIGINT)   # Ctrl-C: finish the step first
        assert signals.requested(rt)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # again: abort now
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_under_ddp_every_rank_stops_one_step_after_any_rank_was_signalled(monkeypatch):
    """The ranks agree on the MAX of their flags, reduced at one step and read at the next (no
    step waits for the device): a signal on another rank stops this one too, one step later."""
    rt = common.Runtime(torch.device("cpu"), torch.float32, rank=0, world_size=2)
    other = {"flag": 0}  # what the other rank contributes to each reduction

    def all_reduce(tensor, op=None):
        assert op == common.dist.ReduceOp.MAX
        tensor.fill_(max(int(tensor), other["flag"]))

    monkeypatch.setattr(common.dist, "all_reduce", all_reduce)
    with common.StopSignals() as signals:
        assert [signals.requested(rt) for _ in range(3)] == [False] * 3
        other["flag"] = int(signal.SIGTERM)              # the other rank is pre-empted
        assert not signals.requested(rt)                 # reduced now, read at the next step
        other["flag"] = 0
        assert signals.requested(rt) and signals.received == signal.SIGTERM
    with common.StopSignals() as signals:
        signals.requested(rt)
        signal.raise_signal(signal.SIGUSR1)              # this rank: the same one-step delay
        assert [signals.requested(rt), signals.requested(rt)] == [False, True]
        assert signals.received == signal.SIGUSR1


def test_end_of_step_saves_on_schedule_at_the_end_and_on_a_signal():
    import argparse
    rt = common.Runtime(torch.device("cpu"), torch.float32)
    args = argparse.Namespace(ckpt_every=3, iters=7)
    saved = []
    with common.StopSignals() as signals:
        for done in range(1, 8):
            signals.end_of_step(rt, args, done, "run/ckpt.pt", lambda: saved.append(done))
        assert saved == [3, 6, 7]                  # every --ckpt_every and the last iteration
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(common.Stopped, match="stopped after iteration 4"):
            signals.end_of_step(rt, args, 4, "run/ckpt.pt", lambda: saved.append(4))
    assert saved == [3, 6, 7, 4]                   # off schedule, but saved before leaving


def test_dispatch_runs_dry_run_or_bench_or_sample_and_eval_or_train():
    import argparse
    modes = ("dry_run", "bench", "sample", "eval")
    ran = []
    run = {m: (lambda m: lambda args: ran.append(m) or m)(m) for m in modes + ("train",)}

    def call(**on):
        ran.clear()
        out = common.dispatch(argparse.Namespace(**{m: on.get(m, False) for m in modes}),
                              run["dry_run"], run["bench"], run["sample"], run["eval"],
                              run["train"])
        return out, list(ran)

    assert call() == ("train", ["train"]) and call(eval=True) == ("eval", ["eval"])
    assert call(sample=True) == ("sample", ["sample"])
    assert call(sample=True, eval=True) == ("eval", ["sample", "eval"])     # both, in order
    assert call(bench=3, sample=True) == ("bench", ["bench"])
    assert call(dry_run=True, bench=3) == ("dry_run", ["dry_run"])


@pytest.mark.parametrize("script", ["inade", "poe_gan"])  # the two mains of their own
def test_sample_and_eval_together_run_both(script, tmp_path, monkeypatch):
    module = __import__(script)
    ran = []
    if script == "inade":
        rt = common.Runtime(torch.device("cpu"), torch.float32)
        monkeypatch.setattr(module, "load_for_inference", lambda args: (rt,) + (None,) * 4)
        monkeypatch.setattr(module, "control_grids",
                            lambda *a: ran.append("sample") or {"grid": "g.png"})
    else:
        monkeypatch.setattr(module, "sample", lambda args: ran.append("sample"))
    monkeypatch.setattr(module, "evaluate", lambda args: ran.append("eval") or "metrics")
    assert module.main(["--sample", "--eval", "--out_dir", str(tmp_path / "run")]) == "metrics"
    assert ran == ["sample", "eval"]


def test_an_error_inside_the_training_loop_starts_on_a_line_of_its_own(capsys):
    def main():
        bar = tqdm(total=10, file=sys.stderr)
        bar.update(3)
        raise common.UserError("label value 9 in data/x.png is out of range.")
    with pytest.raises(SystemExit):
        common.run_main(main)
    err = capsys.readouterr().err
    assert "\nerror: label value 9 in data/x.png is out of range.\n" in err


def copy_of(module):
    import copy
    return copy.deepcopy(module)


def test_sigterm_checkpoints_mid_run_and_resume_gives_the_same_next_losses(tmp_path):
    """A pre-empted run (SIGTERM at an arbitrary step) resumes exactly: the losses after the
    stop equal those of a run that was never interrupted. The signal goes to the whole process
    group, data workers included, as torchrun and SLURM send it."""
    flags = ["--size", "32", "--style_dim", "16", "--max_channels", "8", "--channel_base", "128",
             "--batch_size", "4", "--phase_iters", "2", "--init_size", "8", "--log_every", "1",
             "--sample_every", "100000", "--ckpt_every", "100000", "--K", "2", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda *extra, **kw: subprocess.Popen(  # noqa: E731
        [sys.executable, os.path.join(ROOT, "ummgan.py"), *flags, *extra], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    part, full = tmp_path / "part", tmp_path / "full"
    proc = run("--iters", "100000", "--out_dir", str(part), "--num_workers", "2",
               start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (part / "log.jsonl").exists() and len((part / "log.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stopped = torch.load(part / "ckpt.pt", weights_only=True)["iter"]
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == (
        f"SIGTERM: stopped after iteration {stopped}; the checkpoint is {part / 'ckpt.pt'}. "
        f"Continue with the same command and --resume.")
    assert 3 <= stopped < 100000
    target = str(stopped + 3)
    for proc in (run("--iters", target, "--out_dir", str(part), "--resume"),
                 run("--iters", target, "--out_dir", str(full))):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    strip = lambda path: [{k: v for k, v in json.loads(x).items() if k != "img_per_s"}  # noqa
                          for x in path.read_text().splitlines()]
    resumed, uninterrupted = strip(part / "log.jsonl"), strip(full / "log.jsonl")
    assert [r["iter"] for r in resumed] == list(range(1, stopped + 4))
    assert resumed == uninterrupted


# ---------------------------------------------------------------------------------------------
# Pretrained networks and metrics
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A private, empty torch hub cache; a download attempt records its arguments and fails."""
    calls = []

    def no_network(url, path, hash_prefix=None, progress=True):
        calls.append({"url": url, "path": path, "hash_prefix": hash_prefix})
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    os.makedirs(tmp_path / "checkpoints")
    return tmp_path / "checkpoints", calls


def place_stand_in(state, path, sha256_prefix):
    """Random weights at a cache path, marked as hash-checked (the real file's hash cannot be
    produced by a stand-in): lets the tests exercise the strict loading of the real files."""
    torch.save(state, path)
    common.write_marker(str(path), sha256_prefix)


def random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}


def shapes_of(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------

def test_missing_weights_without_network_is_one_sentence_with_url_path_and_exit_2(
        offline_hub, capsys, monkeypatch):
    ckpt, calls = offline_hub
    path = os.path.join(str(ckpt), "vgg19-dcbb9e9d.pth")

    def built_too_early(*args, **kwargs):
        raise AssertionError("the network was built before its file was resolved")
    monkeypatch.setattr(common, "vgg_features", built_too_early)
    with pytest.raises(common.UserError) as err:
        common.VGG19(pretrained=True)
    assert str(err.value) == (f"{common.VGG19_URL} could not be downloaded (no network: Temporary "
                              f"failure in name resolution); place the file by hand at {path}.")
    # The torchvision name's 8 hex digits are the SHA-256 prefix the download is checked against.
    assert calls == [{"url": common.VGG19_URL, "path": path, "hash_prefix": "dcbb9e9d"}]

    def main():
        common.CLIPTokenizer()  # the official vocab, checked against its full SHA-256
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(main)
    assert exit_info.value.code == 2
    err_line = capsys.readouterr().err.strip()
    assert err_line.count("\n") == 0 and common.CLIP_BPE_URL in err_line
    assert os.path.join(str(ckpt), "bpe_simple_vocab_16e6.txt.gz") in err_line
    assert calls[-1]["hash_prefix"] == common.CLIP_BPE_SHA256
    # LPIPS needs two files: both are named in the one sentence; the generic lin file name gets a
    # distinct cache name.
    with pytest.raises(common.UserError) as err:
        common.LPIPS("alex", pretrained=True)
    assert str(err.value).count("could not be downloaded") == 2
    assert "alexnet-owt-7be5be79.pth" in str(err.value)
    assert str(err.value).endswith("lpips_v0.1_alex.pth.")
    assert calls[-1]["url"].endswith("/lpips/weights/v0.1/alex.pth")


@pytest.mark.parametrize("error, cause", [
    (urllib.error.HTTPError("u", 404, "Not Found", {}, None), "HTTP 404 Not Found"),
    (PermissionError(13, "Permission denied", "/hub/checkpoints"),
     "Permission denied: /hub/checkpoints"),
    (RuntimeError('invalid hash value (expected "dcbb9e9d", got "0badf00d")'),
     "the downloaded file has the wrong SHA-256")])
def test_the_cause_of_a_failed_download_is_named(offline_hub, monkeypatch, error, cause):
    def fail(url, path, hash_prefix=None, progress=True):
        raise error
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    with pytest.raises(common.UserError, match=re.escape(f"could not be downloaded ({cause})")):
        common.VGG19(pretrained=True)


def test_a_cached_file_is_hash_checked_on_first_use_then_remembered(offline_hub, monkeypatch):
    ckpt, calls = offline_hub
    # Random weights at the VGG-19 path are not the pretrained network.
    fake = ckpt / "vgg19-dcbb9e9d.pth"
    torch.save(random_state(shapes_of(common.VGG19(pretrained=False))), fake)
    with pytest.raises(common.UserError) as err:
        common.VGG19(pretrained=True)
    assert f"{fake} is not the official file" in str(err.value)
    assert common.VGG19_URL in str(err.value) and calls == []  # nothing downloaded over it
    # A file with the right hash is accepted, hashed once, and again after it changes.
    good = ckpt / "weights.bin"
    good.write_bytes(b"official bytes")
    prefix = hashlib.sha256(b"official bytes").hexdigest()[:8]
    hashed = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(common.hashlib, "sha256", lambda: hashed.append(1) or real_sha256())
    for _ in range(2):
        assert common.pretrained_files(("https://x/weights.bin", None, prefix)) == [str(good)]
    assert len(hashed) == 1
    good.write_bytes(b"changed bytes!")
    with pytest.raises(common.UserError, match="is not the official file"):
        common.pretrained_files(("https://x/weights.bin", None, prefix))


def test_a_hand_placed_converted_clip_file_is_not_trusted(offline_hub):
    ckpt, calls = offline_hub
    torch.save({}, common.clip_converted_path("ViT-B/32"))  # not made here from the archive
    with pytest.raises(common.UserError, match="ViT-B-32.pt could not be downloaded"):
        common.CLIP("ViT-B/32", pretrained=True)
    assert calls[-1]["url"] == common.CLIP_URLS["ViT-B/32"]


def test_an_unreadable_weights_file_is_a_user_error(offline_hub):
    ckpt, _ = offline_hub
    (ckpt / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(common.UserError, match="not a readable PyTorch weights file"):
        common.FIDInception(pretrained=True)


# ---------------------------------------------------------------------------------------------
# VGG-19
# ---------------------------------------------------------------------------------------------

VGG19_CONVS = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]  # torchvision indices
VGG19_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]


def vgg19_official_shapes():
    shapes, c_in = {}, 3
    for idx, c_out in zip(VGG19_CONVS, VGG19_WIDTHS):
        shapes[f"features.{idx}.weight"] = (c_out, c_in, 3, 3)
        shapes[f"features.{idx}.bias"] = (c_out,)
        c_in = c_out
    return shapes


def test_vgg19_loads_the_torchvision_file_strictly_and_taps_by_torchvision_index(offline_hub):
    ckpt, calls = offline_hub
    official = random_state(vgg19_official_shapes())
    # The file also holds the ImageNet head (38 keys in all); the loader drops it. (Tiny stand-ins
    # here: the real head is 123.6M parameters.)
    head = {f"classifier.{i}.{p}": torch.zeros(2) for i in (0, 3, 6) for p in ("weight", "bias")}
    place_stand_in({**official, **head}, ckpt / "vgg19-dcbb9e9d.pth", "dcbb9e9d")
    vgg = common.VGG19(pretrained=True)
    assert calls == []  # found in the cache, not downloaded
    assert shapes_of(vgg) == vgg19_official_shapes()  # 32 keys
    assert sum(p.numel() for p in vgg.parameters()) == 20_024_384  # "≈20.02M"
    assert all(torch.equal(vgg.state_dict()[k], v) for k, v in official.items())
    assert not any(p.requires_grad for p in vgg.parameters()) and not vgg.training
    vgg.train()
    assert not vgg.training  # a measuring network stays in eval mode

    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    taps = vgg(x, ["relu1_1", "conv5_4", "relu5_4", "conv1_1"])
    assert list(taps) == ["relu1_1", "conv5_4", "relu5_4", "conv1_1"]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    conv1_1 = F.conv2d((x - mean) / std, official["features.0.weight"], official["features.0.bias"],
                       padding=1)
    torch.testing.assert_close(taps["conv1_1"], conv1_1)
    torch.testing.assert_close(taps["relu1_1"], conv1_1.relu())
    assert taps["conv5_4"].shape == (2, 512, 1, 1) and (taps["conv5_4"] < 0).any()  # pre-ReLU
    torch.testing.assert_close(taps["relu5_4"], taps["conv5_4"].relu())
    # Gradients reach the input (perceptual losses train the generator), not the weights.
    taps["relu5_4"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    # normalize=False feeds the input unchanged (the SPADE/INADE [-1, 1] convention).
    raw = common.VGG19(pretrained=False, normalize=False)
    raw.load_state_dict(vgg.state_dict())
    torch.testing.assert_close(raw((x - mean) / std, "relu3_1")["relu3_1"],
                               vgg(x, "relu3_1")["relu3_1"])
    # pool="avg" only swaps the pools.
    avg = common.VGG19(pretrained=False, pool="avg")
    avg.load_state_dict(vgg.state_dict())
    torch.testing.assert_close(avg(x, "pool1")["pool1"],
                               F.avg_pool2d(vgg(x, "relu1_2")["relu1_2"], 2))


def test_vgg19_runs_only_as_deep_as_the_deepest_tap():
    vgg = common.VGG19(pretrained=False)
    ran = []
    for i, layer in enumerate(vgg.features):
        layer.register_forward_hook(lambda m, inp, out, i=i: ran.append(i))
    vgg(torch.rand(1, 3, 16, 16), ["relu2_1", "relu1_1"])
    assert ran == list(range(7))  # relu2_1 is features[6]
    assert common.VGG19.LAYERS[20] == "relu4_1" and common.VGG19.LAYERS[29] == "relu5_1"
    with pytest.raises(ValueError):
        vgg(torch.rand(1, 3, 16, 16), ["relu6_1"])


# ---------------------------------------------------------------------------------------------
# CLIP tokenizer
# ---------------------------------------------------------------------------------------------

# Byte ids: printable bytes first ('!' = 0, ..., 'a' = 97 - 33 = 64), "</w>" variants at +256.
def byte_id(ch, end_of_word=False):
    return ord(ch) - 33 + (256 if end_of_word else 0)


def test_bpe_on_a_small_merges_file_gives_hand_computed_ids(tmp_path):
    path = tmp_path / "merges.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:  # header line, then merges by rank
        f.write("#version: 0.2\nl o</w>\nh e\nhe l\nhel lo</w>\n")
    tok = common.CLIPTokenizer(bpe_path=str(path), context_length=12)
    # Vocabulary: 256 bytes, 256 bytes + "</w>", 4 merges (512..515), SOT 516, EOT 517.
    assert (tok.vocab_size, tok.sot, tok.eot) == (256 + 256 + 4 + 2, 516, 517)
    assert [tok.encoder[t] for t in ("lo</w>", "he", "hel", "hello</w>")] == [512, 513, 514, 515]
    # "hello": h e l l o</w> -> rank 0 (l, o</w>) -> h e l lo</w> -> rank 1 (h, e) -> he l lo</w>
    # -> rank 2 (he, l) -> hel lo</w> -> rank 3 -> hello</w> (515).
    assert tok.encode("hello") == [515]
    # "hell": h e l l</w> -> he l l</w> -> hel l</w>; (hel, l</w>) has no rank: stop.
    assert tok.encode("hell") == [514, byte_id("l", True)]
    assert tok.encode("lo") == [512]
    # Cleaning: HTML unescaped twice, whitespace collapsed, lower case; "!" is its own piece;
    # digits are single pieces; "'s" is a piece; UTF-8 bytes of "é" are C3 A9 (ids 127, 102).
    assert tok.encode("  HELLO &amp;amp;\n\tHeLLo! ") == [
        515, byte_id("&", True), 515, byte_id("!", True)]
    assert tok.encode("42") == [byte_id("4", True), byte_id("2", True)]
    assert tok.encode("it's") == [byte_id("i"), byte_id("t", True),
                                  byte_id("'"), byte_id("s", True)]
    assert tok.encode("é") == [127, 102 + 256]
    assert tok.encode("<|endoftext|>") == [517]
    ids = tok(["Hello hello!", "lo"])
    assert ids.dtype == torch.long and ids.shape == (2, 12)
    assert ids[0].tolist() == [516, 515, 515, byte_id("!", True), 517] + [0] * 7
    assert ids[1].tolist() == [516, 512, 517] + [0] * 9
    # A plain-text merges file without header and merges given as a list agree.
    (tmp_path / "m.txt").write_text("l o</w>\nh e\nhe l\nhel lo</w>\n")
    for other in (common.CLIPTokenizer(bpe_path=str(tmp_path / "m.txt"), context_length=12),
                  common.CLIPTokenizer(merges=[("l", "o</w>"), "h e", "he l", "hel lo</w>"],
                                       context_length=12)):
        assert torch.equal(other(["Hello hello!", "lo"]), ids)


def test_byte_level_tokenizer_needs_no_file_pads_truncates_and_decodes():
    tok = common.CLIPTokenizer(bpe_path="", context_length=6)
    assert (tok.vocab_size, tok.sot, tok.eot) == (514, 512, 513)
    assert tok.encode("ab") == [byte_id("a"), byte_id("b", True)] == [64, 321]
    assert tok.decode(tok("héllo wörld", context_length=20)[0]) == "héllo wörld "
    with pytest.raises(common.UserError, match="more than the context of 6"):
        tok(["abcdef"])
    cut = tok(["abcdef"], truncate=True)[0].tolist()
    assert cut == [512, 64, 65, 66, 67, 513]  # cut, and the last id forced to EOT


def test_word_tokenizer_gives_one_id_per_word_and_pools_at_eot():
    import data
    tok = common.WordTokenizer(data.shapes_caption_vocabulary(), context_length=12)
    words = sorted(set(data.shapes_caption_vocabulary()))
    assert tok.vocab_size == 2 + len(words) + 2 and (tok.sot, tok.eot) == (tok.vocab_size - 2,
                                                                           tok.vocab_size - 1)
    ids = tok(["a red circle above a Blue square", "a purple circle"])
    expect = [tok.sot] + [2 + words.index(w) for w in "a red circle above a blue square".split()]
    assert ids[0].tolist() == expect + [tok.eot] + [0] * (12 - len(expect) - 1)
    assert ids[1, 2].item() == tok.unk and ids.argmax(1).tolist() == [8, 4]  # EOT is the max id
    assert tok.decode(ids[0]) == "a red circle above a blue square"
    caption = data.get_dataset("shapes", size=32)[0]["caption"]
    assert tok.unk not in tok(caption, context_length=40)[0].tolist()  # every word data.py writes


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------

def clip_official_shapes(width=512, layers=12, vocab=49408, context=77, embed=512, prefix=""):
    block = {"ln_1.weight": (width,), "ln_1.bias": (width,),
             "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
             "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
             "ln_2.weight": (width,), "ln_2.bias": (width,),
             "mlp.c_fc.weight": (4 * width, width), "mlp.c_fc.bias": (4 * width,),
             "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,)}
    shapes = {f"{prefix}transformer.resblocks.{i}.{k}": s
              for i in range(layers) for k, s in block.items()}
    if prefix == "":  # text tower
        shapes.update({"token_embedding.weight": (vocab, width),
                       "positional_embedding": (context, width),
                       "ln_final.weight": (width,), "ln_final.bias": (width,),
                       "text_projection": (width, embed), "logit_scale": ()})
    return shapes


def clip_visual_shapes(patch, width=768, layers=12, resolution=224, embed=512):
    shapes = clip_official_shapes(width, layers, prefix="visual.")
    shapes.update({"visual.conv1.weight": (width, 3, patch, patch),
                   "visual.class_embedding": (width,),
                   "visual.positional_embedding": ((resolution // patch) ** 2 + 1, width),
                   "visual.ln_pre.weight": (width,), "visual.ln_pre.bias": (width,),
                   "visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,),
                   "visual.proj": (width, embed)})
    return shapes


def test_clip_has_openai_key_names_shapes_and_parameter_counts():
    with torch.device("meta"):  # shapes without memory
        b32 = common.CLIP("ViT-B/32", pretrained=False)
        b16 = common.CLIP("ViT-B/16", pretrained=False)
        text = common.CLIP("ViT-B/32", pretrained=False, vision=False)
    text_shapes = clip_official_shapes()
    assert len(text_shapes) == 150 and shapes_of(text) == text_shapes
    assert len(clip_visual_shapes(32)) == 152
    assert shapes_of(b32) == {**text_shapes, **clip_visual_shapes(32)}  # 302 keys
    assert shapes_of(b16) == {**text_shapes, **clip_visual_shapes(16)}
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(text), count(b32), count(b16)) == (63_428_097, 151_277_313, 149_620_737)
    # Strict load of a state dict with exactly the official names and shapes.
    official = {k: torch.empty(s, device="meta") for k, s in shapes_of(b32).items()}
    b32.load_state_dict(official, strict=True, assign=True)
    with pytest.raises(RuntimeError):
        b32.load_state_dict({**official, "input_resolution": torch.empty((), device="meta")},
                            assign=True)


def test_clip_attention_is_nn_multiheadattention_with_the_same_weights():
    torch.manual_seed(0)
    ours = common.CLIPAttention(32, 4)
    nn.init.normal_(ours.in_proj_weight, std=0.2)
    nn.init.normal_(ours.in_proj_bias, std=0.2)
    official = nn.MultiheadAttention(32, 4)  # what OpenAI's model uses, on (L, N, D)
    official.load_state_dict(ours.state_dict(), strict=True)  # same key names and shapes
    x = torch.randn(3, 7, 32)  # (N, L, D)
    mask = torch.full((7, 7), float("-inf")).triu(1)  # OpenAI's build_attention_mask
    for causal, attn_mask in ((True, mask), (False, None)):
        ref = official(*(x.transpose(0, 1),) * 3, need_weights=False, attn_mask=attn_mask)[0]
        torch.testing.assert_close(ours(x, causal), ref.transpose(0, 1), atol=1e-5, rtol=1e-5)


def small_clip(**vision):
    torch.manual_seed(0)
    if vision:
        return common.CLIP(pretrained=False, vocab_size=514, context_length=16, text_width=32,
                           text_layers=2, text_heads=4, embed_dim=24, **vision).eval()
    return common.CLIP.small(vocab_size=514, context_length=16, width=32, layers=2, heads=4,
                             embed_dim=24).eval()


def test_clip_text_tower_is_causal_and_pools_at_the_end_of_text_token():
    clip, tok = small_clip(), common.CLIPTokenizer(bpe_path="", context_length=16)
    assert clip.visual is None and all(p.requires_grad for p in clip.parameters())  # trainable
    ids = tok(["a cat"])  # SOT a</w> c a t</w> EOT 0 ...: EOT (513) at position 5
    eot = int(ids.argmax())
    assert eot == 5 and ids[0, eot] == tok.eot
    with torch.no_grad():
        emb = clip.encode_text(ids)
        assert emb.shape == (1, 24)
        after = ids.clone()
        after[0, eot + 1:] = torch.randint(1, 500, (16 - eot - 1,))
        torch.testing.assert_close(clip.encode_text(after), emb, atol=0, rtol=0)  # causal mask
        before = ids.clone()
        before[0, eot - 1] = 100
        assert (clip.encode_text(before) - emb).abs().max() > 1e-3
        # By hand: the ln_final output at the EOT position, times text_projection.
        h = clip.token_embedding(ids) + clip.positional_embedding
        for block in clip.transformer.resblocks:
            h = block(h, causal=True)
        torch.testing.assert_close(emb, clip.ln_final(h)[:, eot] @ clip.text_projection)


def test_clip_image_tower_takes_zero_one_rgb_and_does_clips_preprocessing():
    clip = small_clip(image_resolution=32, vision_patch_size=8, vision_width=32, vision_layers=1,
                      vision_heads=2)
    mean = torch.tensor(common.CLIP.IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(common.CLIP.IMAGE_STD).view(1, 3, 1, 1)
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        emb = clip.encode_image(x)
        assert emb.shape == (2, 24)
        torch.testing.assert_close(emb, clip.encode_image((x - mean) / std, preprocess=False))
        # Non-square: the shorter side to 32 (bicubic), then the centre 32x32.
        wide = torch.rand(1, 3, 40, 60)
        resized = F.interpolate(wide, size=(32, 48), mode="bicubic", align_corners=False,
                                antialias=True).clamp(0, 1)
        torch.testing.assert_close(clip.preprocess(wide), (resized[..., 8:40] - mean) / std)
        logits_img, logits_txt = clip(x, common.CLIPTokenizer(bpe_path="", context_length=16)(
            ["a", "b", "c"]))
    assert logits_img.shape == (2, 3) and torch.equal(logits_txt, logits_img.t())


def test_clip_torchscript_archive_is_converted_once_to_a_weights_only_state_dict(
        offline_hub, monkeypatch):
    ckpt, calls = offline_hub
    clip = small_clip(image_resolution=32, vision_patch_size=8, vision_width=32, vision_layers=1,
                      vision_heads=2)
    # A stand-in archive shaped like OpenAI's: TorchScript, fp16 weights, three scalar attributes.
    archived = small_clip(image_resolution=32, vision_patch_size=8, vision_width=32,
                          vision_layers=1, vision_heads=2)
    archived.load_state_dict(clip.state_dict())
    archived.visual.conv1.half()
    for name in ("input_resolution", "context_length", "vocab_size"):
        archived.register_buffer(name, torch.tensor(77))
    ids = common.CLIPTokenizer(bpe_path="", context_length=16)(["a cat"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace_module(archived, {"encode_text": ids})
        torch.jit.save(scripted, str(ckpt / "ViT-B-32.pt"))
    common.write_marker(str(ckpt / "ViT-B-32.pt"), common.CLIP_URLS["ViT-B/32"].split("/")[-2])

    state = common.clip_state_dict("ViT-B/32")
    assert calls == []  # the archive was found in the cache
    assert os.path.isfile(ckpt / "ViT-B-32.state_dict.pt")
    assert torch.load(ckpt / "ViT-B-32.state_dict.pt", weights_only=True).keys() == state.keys()
    assert all(v.dtype == torch.float32 for v in state.values())
    fresh = small_clip(image_resolution=32, vision_patch_size=8, vision_width=32, vision_layers=1,
                       vision_heads=2)
    fresh.load_state_dict(state, strict=True)  # the three scalars are gone
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_text(ids), clip.encode_text(ids))
    # Later loads never run TorchScript again; vision=False keeps the text keys only.
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("converted twice"))
    text_only = common.clip_state_dict("ViT-B/32", vision=False)
    assert text_only.keys() == {k for k in state if not k.startswith("visual.")}


# ---------------------------------------------------------------------------------------------
# FID Inception and FID
# ---------------------------------------------------------------------------------------------

INCEPTION_UNITS = {  # pytorch-fid / torchvision Inception3 BasicConv2d names per block type
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3", "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
          "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
          "branch7x7x3_4"],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
          "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
INCEPTION_BLOCKS = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B",
                    "Mixed_6b": "C", "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C",
                    "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}


def test_fid_inception_has_pytorch_fids_keys_and_loads_its_file_strictly(offline_hub):
    ckpt, calls = offline_hub
    units = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    units += [f"{block}.{unit}" for block, kind in INCEPTION_BLOCKS.items()
              for unit in INCEPTION_UNITS[kind]]
    assert len(units) == 94
    expected = {f"{u}.{k}" for u in units for k in ("conv.weight", "bn.weight", "bn.bias",
                "bn.running_mean", "bn.running_var", "bn.num_batches_tracked")}
    expected |= {"fc.weight", "fc.bias"}
    inc = common.FIDInception(pretrained=False)
    shapes = shapes_of(inc)
    assert set(shapes) == expected and len(shapes) == 566
    assert sum(p.numel() for p in inc.parameters()) == 23_850_960  # "≈23.85M"
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)
    c7 = [shapes[f"Mixed_6{b}.branch7x7_1.conv.weight"][0] for b in "bcde"]
    assert c7 == [128, 160, 160, 192]
    assert all(m.eps == 1e-3 for m in inc.modules() if isinstance(m, nn.BatchNorm2d))
    # The pretrained path: the file in the cache loads strictly (a file with any other key set
    # would raise), and BatchNorm statistics come from the file.
    official = inc.state_dict()
    official["Mixed_5b.branch1x1.bn.running_var"] = torch.full((64,), 2.0)
    torch.save(official, ckpt / "pt_inception-2015-12-05-6726825d.pth")
    loaded = common.FIDInception(pretrained=True)
    assert calls == []
    assert torch.equal(loaded.Mixed_5b.branch1x1.bn.running_var, torch.full((64,), 2.0))
    with pytest.raises(common.UserError, match="does not hold the expected weights.*fc.bias"):
        common.load_official(loaded, {k: v for k, v in official.items() if k != "fc.bias"}, "f")


class StopForward(Exception):
    pass


def test_fid_inception_takes_zero_one_rgb_resizes_to_299_and_gives_pool3():
    torch.manual_seed(0)
    inc = common.FIDInception(pretrained=False)
    assert (inc.Mixed_7b.pool, inc.Mixed_7c.pool) == ("avg", "max")  # as in the TF graph
    # The TF graph's 3x3 average pool ignores the padding: count_include_pad=False.
    assert torch.equal(common.fid_avg_pool(torch.ones(1, 1, 5, 5)), torch.ones(1, 1, 5, 5))
    seen = []

    def capture(module, inputs):
        seen.append(inputs[0])
        raise StopForward  # what enters the first conv is all this part checks

    hook = inc.Conv2d_1a_3x3.register_forward_pre_hook(capture)
    x = torch.rand(2, 3, 48, 40)  # RGB in [0, 1], any size
    with pytest.raises(StopForward):
        inc(x)
    # pytorch-fid: bilinear resize to 299 (align_corners=False, no antialias), then 2x - 1.
    expected = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(seen[0], expected)
    hook.remove()
    with torch.no_grad():
        feats = inc(x[:1])
    assert feats.shape == (1, 2048) and (feats >= 0).all()  # pool3: mean of ReLU outputs


def test_inception_features_streams_batches_without_gradients_in_float32():
    seen = []

    class Probe(nn.Module):  # stands in for FIDInception: (B, 3, H, W) -> (B, 2048)
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2048))

        def forward(self, x):
            seen.append((x.shape[0], x.dtype, torch.is_grad_enabled()))
            return x.mean(dim=(1, 2, 3))[:, None] * self.w

    x = torch.randint(0, 256, (6, 3, 8, 8)).float() / 255

    def batches():  # a generator, as when sampling a model batch by batch
        yield x[:2].double()
        yield (x[2:5], torch.arange(3))  # (images, labels), as a DataLoader gives
        yield (x[5:] * 255).round().to(torch.uint8)  # uint8 images count as [0, 255]
    feats = common.inception_features(Probe(), batches())
    assert feats.shape == (6, 2048) and feats.dtype == np.float32
    np.testing.assert_allclose(feats[:, 0], x.mean(dim=(1, 2, 3)).numpy(), rtol=1e-5)
    assert seen == [(n, torch.float32, False) for n in (2, 3, 1)]


def gaussian_fid(mu1, s1, mu2, s2):
    """Closed form for 2x2 covariances: Tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))
    (a 2x2 PSD square root M has tr(M)^2 = tr(M^2) + 2 det M)."""
    tr_root = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_root)


def test_fid_matches_the_closed_form_for_gaussians():
    mu1, mu2 = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[1.0, -0.5], [-0.5, 3.0]])  # does not commute with s1
    assert not np.allclose(s1 @ s2, s2 @ s1)
    want = gaussian_fid(mu1, s1, mu2, s2)
    assert common.fid((mu1, s1), (mu2, s2)) == pytest.approx(want, rel=1e-10)
    # Diagonal covariances in 64-d: ||mu1 - mu2||^2 + sum (sqrt(d1) - sqrt(d2))^2.
    rng = np.random.default_rng(0)
    d1, d2 = rng.uniform(0.5, 2, 64), rng.uniform(0.5, 2, 64)
    m1, m2 = rng.normal(size=64), rng.normal(size=64)
    diagonal = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert common.fid((m1, np.diag(d1)), (m2, np.diag(d2))) == pytest.approx(diagonal, rel=1e-10)
    # From samples: statistics with np.cov's N - 1, and the FID near the population value.
    a = rng.multivariate_normal(mu1, s1, size=200_000)
    b = rng.multivariate_normal(mu2, s2, size=200_000)
    mu_a, sigma_a = common.fid_stats(a.astype(np.float32))
    np.testing.assert_allclose(sigma_a, np.cov(a.astype(np.float32), rowvar=False), rtol=1e-6)
    np.testing.assert_allclose(mu_a, a.astype(np.float32).mean(0), rtol=1e-5)
    assert common.fid(a, b) == pytest.approx(want, rel=0.02)


def test_fid_of_a_set_with_itself_is_zero_and_saved_stats_give_the_same_value(tmp_path):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    assert abs(common.fid(feats, feats)) < 1e-8
    few = rng.normal(size=(20, 64))  # fewer samples than dimensions: singular covariance
    assert abs(common.fid(few, few)) < 1e-8
    other = rng.normal(size=(400, 32)) + 0.5
    path = str(tmp_path / "stats.npz")
    common.save_fid_stats(path, *common.fid_stats(other))
    with np.load(path) as f:
        assert set(f.files) == {"mu", "sigma"}  # pytorch-fid's format
    value = common.fid(feats, other)
    assert value > 0
    assert common.fid(feats, path) == pytest.approx(value, rel=1e-12)
    from_tensor = common.fid(torch.from_numpy(feats), common.fid_stats(other))
    assert from_tensor == pytest.approx(value, rel=1e-12)
    with pytest.raises(common.UserError, match="mu"):
        common.fid(feats, str(tmp_path / "missing.npz"))


def test_running_fid_stats_equal_the_stats_of_all_features_and_stream_batches():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(301, 16)) @ rng.normal(size=(16, 16)) + 3.0
    running = common.RunningFIDStats()
    for start in range(0, 301, 64):
        running.add(torch.from_numpy(feats[start:start + 64]).float())
    mu, sigma = running.stats()
    mu_all, sigma_all = common.fid_stats(feats.astype(np.float32))
    np.testing.assert_allclose(mu, mu_all, rtol=1e-6)
    np.testing.assert_allclose(sigma, sigma_all, rtol=1e-5, atol=1e-5)
    # inception_stats sees one batch at a time (a generator can sample each as it is asked for)
    inc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16))  # a stand-in feature net
    images = torch.rand(6, 3, 8, 8)
    seen = []

    def batches():
        for k in range(3):
            seen.append(k)
            yield images[2 * k:2 * k + 2]
    mu_s, sigma_s = common.inception_stats(inc, batches())
    mu_f, sigma_f = common.fid_stats(common.inception_features(inc, [images]))
    assert seen == [0, 1, 2]
    np.testing.assert_allclose(mu_s, mu_f, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sigma_s, sigma_f, rtol=1e-3, atol=1e-6)
    with pytest.raises(common.UserError, match="at least 2 images"):
        common.RunningFIDStats().stats()


# ---------------------------------------------------------------------------------------------
# LPIPS and the diversity protocols
# ---------------------------------------------------------------------------------------------

LPIPS_OFFICIAL = {  # torchvision conv indices and shapes; lin channels (lpips v0.1)
    "alex": ({0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3),
              10: (256, 256, 3)}, (64, 192, 384, 256, 256)),
    "vgg": ({0: (64, 3, 3), 2: (64, 64, 3), 5: (128, 64, 3), 7: (128, 128, 3), 10: (256, 128, 3),
             12: (256, 256, 3), 14: (256, 256, 3), 17: (512, 256, 3), 19: (512, 512, 3),
             21: (512, 512, 3), 24: (512, 512, 3), 26: (512, 512, 3), 28: (512, 512, 3)},
            (64, 128, 256, 512, 512)),
}


def lpips_official_shapes(net):
    convs, lins = LPIPS_OFFICIAL[net]
    backbone = {}
    for i, (c_out, c_in, k) in convs.items():
        backbone[f"features.{i}.weight"] = (c_out, c_in, k, k)
        backbone[f"features.{i}.bias"] = (c_out,)
    return backbone, {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(lins)}


def test_lpips_loads_the_torchvision_backbone_and_the_lin_file_strictly(offline_hub):
    ckpt, calls = offline_hub
    for net in ("alex", "vgg"):
        backbone, lins = lpips_official_shapes(net)
        assert shapes_of(common.LPIPS(net, pretrained=False)) == {**backbone, **lins}
    backbone, lins = lpips_official_shapes("alex")
    backbone_file = random_state(backbone)
    lin_file = {k: v.abs() for k, v in random_state(lins, seed=1).items()}
    head = {"classifier.1.weight": torch.zeros(2)}  # dropped by the loader
    place_stand_in({**backbone_file, **head}, ckpt / "alexnet-owt-7be5be79.pth", "7be5be79")
    place_stand_in(lin_file, ckpt / "lpips_v0.1_alex.pth", common.LPIPS_LIN_SHA256["alex"])
    lp = common.LPIPS("alex", pretrained=True)
    assert calls == []
    state = lp.state_dict()
    assert all(torch.equal(state[k], v) for k, v in {**backbone_file, **lin_file}.items())
    assert not any(p.requires_grad for p in lp.parameters())


def lpips_by_hand(lp, x, y):
    """LPIPS v0.1 from its definition (common.md), with the module's weights."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    hx, hy, total, start = (x - shift) / scale, (y - shift) / scale, 0, 0
    for k, end in enumerate([2, 5, 8, 10, 12]):  # alex relu1..relu5 = features[0:2], [2:5], ...
        hx, hy = lp.features[start:end](hx), lp.features[start:end](hy)
        start = end
        fx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        fy = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = getattr(lp, f"lin{k}").model[1].weight  # (1, C, 1, 1)
        total = total + ((fx - fy) ** 2 * w).sum(1).mean((1, 2))
    return total


def test_lpips_is_zero_on_identical_images_symmetric_positive_and_takes_minus_one_one():
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    alex = common.LPIPS("alex", pretrained=False)
    for lin in alex.lins:  # unequal non-negative channel weights, like the real ones
        lin.model[1].weight.data.uniform_(0, 0.1)
    with torch.no_grad():
        d = alex(x, y)
        assert d.shape == (2,) and (d > 0).all()
        torch.testing.assert_close(d, lpips_by_hand(alex, x, y))
        for lp in (alex, common.LPIPS("vgg", pretrained=False)):
            d = lp(x, y)
            assert lp(x, x).abs().max() < 1e-7 and (d > 0).all()
            torch.testing.assert_close(lp(y, x), d)
            # normalize=True takes the same images in [0, 1].
            torch.testing.assert_close(lp((x + 1) / 2, (y + 1) / 2, normalize=True), d)
            assert lp(x, y, spatial=True).shape == (2, 1, 32, 32)


def test_diversity_pairs_follow_the_papers_protocols():
    assert common.diversity_pairs(4, "all") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    cimle = common.diversity_pairs(80, "consecutive")  # 40 pairs of samples per layout
    assert len(cimle) == 40 and cimle[:2] == [(0, 1), (2, 3)] and cimle[-1] == (78, 79)
    assert common.diversity_pairs(2, "consecutive") == common.diversity_pairs(2, "all") == [(0, 1)]
    inade = common.diversity_pairs(10, "random", repeats=10, seed=3)  # 2 of 10 groups, 10 times
    assert len(inade) == 10 and all(i != j and 0 <= i < 10 and 0 <= j < 10 for i, j in inade)
    assert inade == common.diversity_pairs(10, "random", repeats=10, seed=3)
    with pytest.raises(common.UserError):
        common.diversity_pairs(1)


def test_lpips_diversity_averages_over_pairs_then_inputs():
    # Constant images with values v[n, m]; a mean-|difference| distance gives |v_i - v_j|.
    values = torch.tensor([[0.0, 0.1, 0.3, 0.6], [0.0, 0.0, 0.0, 0.6]])
    samples = values.view(2, 4, 1, 1, 1).expand(2, 4, 3, 8, 8)
    l1 = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3))  # noqa: E731
    # all pairs: input 0: (.1+.3+.6+.2+.5+.3)/6 = 2/6; input 1: (0+0+.6+0+.6+.6)/6 = 1.8/6.
    assert common.lpips_diversity(l1, samples) == pytest.approx((2 / 6 + 1.8 / 6) / 2)
    # consecutive pairs (0,1), (2,3): input 0: (.1 + .3)/2 = .2; input 1: (0 + .6)/2 = .3.
    assert common.lpips_diversity(l1, samples, pairs="consecutive") == pytest.approx(0.25)
    # An iterable of per-input tensors (one input in memory at a time) gives the same.
    assert common.lpips_diversity(l1, iter(samples), batch_size=2) == pytest.approx(3.8 / 12)
    with pytest.raises(ValueError, match="input 1 has 3 samples, the first had 4"):
        common.lpips_diversity(l1, [samples[0], samples[1, :3]])   # the pairs were drawn for 4
    with pytest.raises(ValueError, match="no inputs"):
        common.lpips_diversity(l1, iter([]))
    lp = common.LPIPS("alex", pretrained=False)
    same = torch.rand(2, 1, 3, 32, 32).expand(2, 3, 3, 32, 32) * 2 - 1  # 3 equal samples per input
    assert abs(common.lpips_diversity(lp, same, pairs="random", repeats=4)) < 1e-7


def test_lpips_diversity_batches_the_pairs_of_all_inputs():
    # PoE-GAN's eval: one pair per input for a whole batch -> one LPIPS call, not one per input.
    calls = []
    lp = common.LPIPS("alex", pretrained=False)

    def counted(a, b):
        calls.append(len(a))
        return lp(a, b)

    samples = torch.rand(6, 2, 3, 32, 32) * 2 - 1
    batched = common.lpips_diversity(counted, samples)
    assert calls == [6]
    one_by_one = common.lpips_diversity(counted, iter(samples))
    assert calls[1:] == [1] * 6 and batched == pytest.approx(one_by_one, rel=1e-6)
    calls.clear()  # 5 inputs x 6 pairs = 30 pairs, 8 per call; each input keeps its own pairs
    values = (torch.arange(1.0, 6.0).view(5, 1) * torch.arange(4.0)).view(5, 4, 1, 1, 1)
    values = values.expand(5, 4, 3, 8, 8)  # input n: 0, n, 2n, 3n -> mean |difference| 10n/6

    def l1(a, b):
        calls.append(len(a))
        return (a - b).abs().mean(dim=(1, 2, 3))

    spread = common.lpips_diversity(l1, values, batch_size=8)
    assert calls == [8, 8, 8, 6] and spread == pytest.approx(10 / 6 * 3)




def test_torchrun_runs_where_the_device_asked_for_is_or_says_why(monkeypatch):
    """Under torchrun --device cuda without a GPU, --device mps, or more processes than GPUs
    are one sentence each, before any process group is made (was a silent CPU run)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(common.dist, "init_process_group",
                        lambda **kw: pytest.fail("a process group was made"))

    def runtime(device):
        args = common.parse_args(common.base_parser("t"), PRESETS, "m", "shapes",
                                 ["--device", device])
        with pytest.raises(common.UserError) as err:
            common.setup_runtime(args)
        return str(err.value)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "sees no CUDA GPU" in runtime("cuda")
    assert "not on MPS" in runtime("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "--nproc_per_node 1 or fewer" in runtime("auto")


def test_the_mps_generator_is_saved_and_restored(monkeypatch):
    """On a Mac the MPS generator draws the training noise: a resume and a sample grid keep it."""
    device = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: device["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s: device.update(state=s.clone()))
    with common.preserved_rng():
        device["state"] = torch.tensor([9, 9, 9], dtype=torch.uint8)   # a grid's draws
    assert device["state"].tolist() == [1, 2, 3]
    saved = common.rng_state()
    device["state"] = torch.tensor([7], dtype=torch.uint8)
    common.set_rng_state(saved)
    assert device["state"].tolist() == [1, 2, 3]


def test_loss_means_sum_in_float32_whatever_the_autocast_dtype():
    """bf16 losses summed in bf16 stall (256 + 0.1 == 256 there): 3,000 steps of 0.1 must log
    0.1."""
    means = common.LossMeans(torch.device("cpu"))
    for _ in range(3000):
        means.add({"loss": torch.tensor(0.1, dtype=torch.bfloat16)})
    rt = common.Runtime(torch.device("cpu"), torch.bfloat16)
    assert means.pop(rt)["loss"] == pytest.approx(float(torch.tensor(0.1, dtype=torch.bfloat16)),
                                                  rel=1e-5)
    assert means.steps == 0 and means.sums == {}
