"""What the five method scripts share: the command line, the training plumbing, a few layers and
losses, and (further down) the pretrained networks and metrics.

Every method script is read top to bottom on its own; this file holds only what at least two of
them use, so that each script can stay about its paper. Map of this file:

    errors        UserError and the exit-2 wrapper
    command line  the flags all five scripts take, per-dataset presets, --dry_run output
    runtime       device / dtype / autocast, seeding, torchrun DDP, torch.compile
    data feeding  an endless, resumable batch stream over any map-style dataset
    checkpoints   atomic save, exact resume (models, EMA, optimisers, RNG), foreign-checkpoint check
    logging       JSONL log + tqdm bar with img/s, sample grids with label maps in a fixed palette
    layers        equalised-lr linear/conv, pixel norm, AdaIN (uMM-GAN and PoE-GAN)
    losses        non-saturating GAN losses and R1 (uMM-GAN and PoE-GAN)
    pretrained    VGG-19, CLIP and its BPE tokenizer, FID Inception, LPIPS; FID and diversity metrics
"""

import argparse
import contextlib
import copy
import gzip
import hashlib
import html
import json
import math
import os
import random
import re
import signal
import sys
import time
import urllib.parse
import warnings

import ftfy
import numpy as np
import regex
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

class UserError(Exception):
    """Bad input from the user: main() prints the one-sentence message and exits with status 2."""


class Stopped(Exception):
    """Training stopped on a signal after writing its checkpoint; carries the exit status."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def run_main(main):
    """Run `main()`; a UserError becomes one sentence on stderr and exit status 2, no traceback.

    A stop on a signal (see StopSignals) prints how to resume and exits with 128 + the signal's
    number, as a shell reports a process ended by that signal.
    """
    status = 0
    try:
        main()
        barrier()  # all ranks done (rank 0's last checkpoint) before any tears gloo down
    except UserError as err:
        close_progress_bars()
        print(f"error: {err}", file=sys.stderr)
        status = 2
    except Stopped as stop:
        barrier()
        close_progress_bars()
        print(stop, file=sys.stderr)
        status = stop.status
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if status:
        sys.exit(status)


def dispatch(args, dry_run, bench, sample, evaluate, train):
    """What every script's main does with the parsed flags: --dry_run, else --bench, else
    --sample and / or --eval (both: the grids, then the metrics), else training."""
    if args.dry_run:
        return dry_run(args)
    if args.bench:
        return bench(args)
    if args.sample or args.eval:
        grids = sample(args) if args.sample else None
        return evaluate(args) if args.eval else grids
    return train(args)


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def close_progress_bars():
    """Close every open tqdm bar, so that a message starts on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# ----------------------------------------------------------------------------------------------
# Command line: one contract for all five scripts
# ----------------------------------------------------------------------------------------------

def base_parser(description):
    """The flags every script takes. Defaults of None are filled from the dataset's preset."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="dataset name (data.py); default: the built-in one")
    p.add_argument("--data_dir", default=None, help="dataset folder; default data/<data>")
    p.add_argument("--out_dir", default=None, help="run folder; default out/<method>-<data>")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype for the forward passes (weights stay float32)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the networks (backend inductor; aot_eager compiles fast "
                        "and checks the graph capture without generating kernels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=None, help="training iterations")
    p.add_argument("--batch_size", type=int, default=None, help="global batch (all GPUs together)")
    p.add_argument("--size", type=int, default=None, help="image size (height for non-square sets)")
    p.add_argument("--num_workers", type=int, default=None, help="data loader workers")
    p.add_argument("--log_every", type=int, default=None)
    p.add_argument("--sample_every", type=int, default=None)
    p.add_argument("--ckpt_every", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue exactly from out_dir/ckpt.pt")
    p.add_argument("--sample", action="store_true", help="load ckpt.pt and write control grids")
    p.add_argument("--eval", action="store_true", help="load ckpt.pt and write eval.json")
    p.add_argument("--dry_run", action="store_true",
                   help="build the models, print their parameter counts as JSON, touch no data")
    p.add_argument("--init_from", default=None, metavar="PATH",
                   help="the authors' released weights (recognised by their keys): --sample and "
                        "--eval use them instead of ckpt.pt; training starts from them")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="--bench: the device's dense peak TFLOP/s in --dtype for the MFU figure "
                        "(known GPUs are looked up, every dtype; see common.PEAK_TFLOPS)")
    return p


def parse_args(parser, presets, method, default_data, argv=None, check=None,
               no_released_weights=None):
    """Parse the command line, fill every flag left at None from the dataset's preset, check every
    flag, and make sure the run folder can be used; all of it before any data or model is built.

    `presets` maps a dataset name to a dict of flag values (the paper's settings); a flag given on
    the command line always wins. `check(args)` is the script's own flag check (it raises
    UserError). `no_released_weights`: for a script that cannot read released weights, the reason,
    said when --init_from is given. Returns the args namespace with `args.method` set.
    """
    args = parser.parse_args(argv)
    args.method = method
    if args.init_from and no_released_weights:
        raise UserError(f"{method}.py cannot start from --init_from {args.init_from}: "
                        f"{no_released_weights}")
    args.data = args.data or default_data
    if args.data not in presets:
        raise UserError(f"{method}.py has no preset for --data {args.data}; "
                        f"choose one of: {', '.join(sorted(presets))}.")
    for key, value in presets[args.data].items():
        if not hasattr(args, key):
            raise KeyError(f"preset '{args.data}' sets unknown flag '{key}'")  # a bug, not input
        if getattr(args, key) is None:
            setattr(args, key, value)
    generic = dict(log_every=50, sample_every=500, ckpt_every=1000,
                   num_workers=default_workers(args.device))
    for key, value in generic.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.data_dir = args.data_dir or os.path.join("data", args.data)
    args.out_dir = args.out_dir or os.path.join("out", f"{method}-{args.data}")
    check_common_flags(args)
    if check is not None:
        check(args)  # before the split check, so that a script can say how to split its batch
    check_batch_divides(args)
    prepare_out_dir(args)
    return args


def default_workers(device):
    """Data workers when --num_workers is not given (our choice): on a GPU up to 8 per process,
    one CPU core kept for the process itself (items are made while the GPU computes); on the CPU
    none, as the cores are busy training. Batches do not depend on it (ResumableBatches)."""
    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return 0
    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(0, min(8, cores - 1))


def require(ok, sentence):
    """Bad input unless `ok`: the sentence says what was expected (flag checks read as a list)."""
    if not ok:
        raise UserError(sentence)


def at_least(args, low, *flags):
    """Every named flag (when set) is a number >= low."""
    for flag in flags:
        value = getattr(args, flag)
        require(value is None or value >= low, f"--{flag} must be at least {low} (got {value}).")


def world_size():
    """The number of processes of this launch (torchrun sets WORLD_SIZE), known before DDP."""
    return int(os.environ.get("WORLD_SIZE", 1))


def check_common_flags(args):
    at_least(args, 1, "iters", "batch_size", "size", "log_every", "sample_every", "ckpt_every")
    at_least(args, 0, "num_workers")
    require(0 <= args.seed < 2 ** 31, f"--seed must be in 0 .. 2**31 - 1 (got {args.seed}).")
    init = getattr(args, "init_from", None)
    require(not (init and args.resume), "--init_from starts a new run from released weights and "
                                        "--resume continues ckpt.pt: give one of them.")
    require(not init or os.path.isfile(init), f"--init_from {init}: no such file (released "
                                              f"weights are downloaded by hand; see the README).")
    peak = getattr(args, "peak_tflops", None)
    require(peak is None or peak > 0, f"--peak_tflops must be a positive number of TFLOP/s "
                                      f"(got {peak}).")


def require_one_process_for_outputs(args, sharded_eval=False):
    """For a script whose --sample (and --eval, unless sharded_eval) do not deal their work out to
    torchrun's processes: refuse a launch of several, where each would repeat all of it and
    write the same files."""
    asked = [flag for flag, on in (("--sample", args.sample),
                                   ("--eval", args.eval and not sharded_eval)) if on]
    require(not (asked and world_size() > 1),
            f"{args.method}.py {asked[0] if asked else ''} runs in one process and would be "
            f"repeated whole by each of the {world_size()} processes of this torchrun launch: "
            f"start it with python.")


def check_batch_divides(args):
    world = world_size()
    require(args.batch_size is None or args.batch_size % world == 0,
            f"--batch_size {args.batch_size} is the global batch and must divide evenly over the "
            f"{world} processes of this torchrun launch.")


def training_run(args):
    """True when this command trains (not --sample, --eval, --dry_run or --bench)."""
    return not (args.sample or args.eval or args.dry_run or getattr(args, "bench", None))


def prepare_out_dir(args):
    """Refuse to train over an earlier run unless --resume; create the folder and prove that it is
    writable, so that a bad --out_dir fails now and not after data and models were built."""
    if args.dry_run or getattr(args, "bench", None):
        return
    ckpt, log = (os.path.join(args.out_dir, name) for name in ("ckpt.pt", "log.jsonl"))
    if training_run(args) and not args.resume:
        require(not os.path.exists(ckpt), f"{ckpt} already exists: pass --resume to continue "
                                          f"that run, or choose another --out_dir.")
        require(not os.path.exists(log), f"{log} already exists, of a run that stopped before "
                                         f"its first checkpoint (nothing to --resume): delete "
                                         f"it, or choose another --out_dir.")
    if training_run(args) and args.resume:
        require(os.path.isfile(ckpt), no_checkpoint_sentence(ckpt))
    # networks from elsewhere (released weights, other runs' experts): their grids / eval.json
    # must not replace those of the run in --out_dir
    outside = next((f for f in ("init_from", "expert_ckpt") if getattr(args, f, None)), None)
    if not training_run(args) and outside:
        require(not os.path.exists(ckpt), f"--out_dir {args.out_dir} holds a training run "
                                          f"({ckpt}); give --sample / --eval --{outside} another "
                                          f"--out_dir, so that the run's grids are kept.")
    if int(os.environ.get("RANK", 0)) != 0:
        return  # rank 0 alone writes into the run folder
    if not training_run(args) and not os.path.isdir(args.out_dir) and not outside:
        return  # --sample / --eval: load_checkpoint names the missing checkpoint
    probe = os.path.join(args.out_dir, f".write_test_{os.getpid()}")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise UserError(f"--out_dir {args.out_dir} cannot be written to ({err.strerror or err}); "
                        f"choose a folder you can write.") from None


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def print_dry_run(networks):
    """The last line of --dry_run: exact parameter counts per network, as one JSON object."""
    print(json.dumps({"params": {name: count_params(m) for name, m in networks.items()}}))


# ----------------------------------------------------------------------------------------------
# Runtime: device, dtype, autocast, seeds, DDP
# ----------------------------------------------------------------------------------------------

class Runtime:
    """Where and how we compute. Built once by `setup_runtime(args)`.

    Under torchrun (RANK set) every process drives one GPU (or one CPU process with gloo);
    rank 0 alone logs and saves. --batch_size is the global batch: each rank takes its share.
    """

    def __init__(self, device, dtype, rank=0, world_size=1, local_rank=0):
        self.device = device
        self.dtype = dtype
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.ddp = world_size > 1
        self.is_main = rank == 0
        # fp16 needs loss scaling; bf16 and fp32 do not. The scaler is a no-op when disabled.
        self.scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16
                                                                 and device.type == "cuda"))

    def autocast(self):
        """Mixed precision for forward passes; a no-op for float32 (and where unsupported)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        if self.device.type == "mps" and not torch.amp.is_autocast_available("mps"):
            return contextlib.nullcontext()  # old MPS builds: run in float32 rather than fail
        return torch.autocast(self.device.type, dtype=self.dtype)

    def local_batch(self, batch_size):
        if batch_size % self.world_size:
            raise UserError(f"--batch_size {batch_size} is not divisible by the "
                            f"{self.world_size} processes of this torchrun launch.")
        return batch_size // self.world_size


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU here.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but this torch build has no MPS support.")
    return torch.device(name)


def setup_runtime(args):
    """Device, dtype, DDP from the torchrun environment, and seeds (offset by rank)."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    if "RANK" in os.environ:  # launched by torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        require(args.device != "mps", "torchrun runs on CUDA GPUs (nccl) or the CPU (gloo), "
                "not on MPS: run without torchrun to use --device mps.")
        if args.device == "cuda":
            pick_device("cuda")  # no silent CPU run when GPUs were asked for
        if args.device in ("auto", "cuda") and torch.cuda.is_available():
            require(local_rank < torch.cuda.device_count(),
                    f"torchrun started process {local_rank} of this node, but torch sees "
                    f"{torch.cuda.device_count()} GPU(s): pass --nproc_per_node "
                    f"{torch.cuda.device_count()} or fewer.")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        dist.init_process_group(backend=backend)
        rt = Runtime(device, dtype, rank, world, local_rank)
    else:
        rt = Runtime(pick_device(args.device), dtype)
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as nanoGPT: TF32 for float32 matmuls
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    seed_everything(args.seed + rt.rank)
    return rt


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def unwrap(model):
    """The plain nn.Module under DDP and torch.compile wrappers (what we save and sample with)."""
    model = getattr(model, "module", model)       # DistributedDataParallel
    return getattr(model, "_orig_mod", model)     # torch.compile


def prepare_model(model, rt, compile_model=None, ddp=True, **ddp_kwargs):
    """Move to the device, optionally compile (`compile_model`: a torch.compile backend name, as
    --compile gives it), and wrap in DDP when running under torchrun."""
    model = model.to(rt.device)
    if compile_model:
        model = torch.compile(model, backend=compile_model)
    if ddp and rt.ddp:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)
    return model


def sum_over_ranks(sums, rt):
    """A dict of float sums, added key by key over the torchrun processes (a process that got no
    batch brings an empty dict); itself in a single process."""
    if not rt.ddp:
        return sums
    every = [None] * rt.world_size
    dist.all_gather_object(every, sums)
    total = {}
    for part in every:  # rank order: the same total on every process
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


def reduce_mean(value, rt):
    """Average a float over all processes (for logging); identity in a single process."""
    if not rt.ddp:
        return float(value)
    t = torch.tensor(float(value), device=rt.device)
    dist.all_reduce(t)
    return t.item() / rt.world_size


# Dense peak TFLOP/s (no sparsity) from the vendors' datasheets, per autocast dtype, for the MFU
# line of --bench; float32 counts TF32 tensor cores, which setup_runtime switches on. The first
# name whose words all appear, in order and whole, in torch.cuda.get_device_name() wins ("NVIDIA
# A100-SXM4-80GB" is an A100, "NVIDIA RTX A1000" and "NVIDIA A10G" are unknown); other devices
# take --peak_tflops.
PEAK_TFLOPS = {  # name: (float32 as TF32, bfloat16, float16)
    "H100 PCIe": (378.0, 756.0, 756.0),
    "H100 NVL": (417.5, 835.5, 835.5),
    "H200 NVL": (417.5, 835.5, 835.5),
    "H100": (494.7, 989.4, 989.4),      # SXM; the H200 has the same tensor cores
    "H200": (494.7, 989.4, 989.4),
    "GH200": (494.7, 989.4, 989.4),
    "A100": (156.0, 312.0, 312.0),
    "L40S": (183.0, 362.1, 362.1),
    "A10": (62.5, 125.0, 125.0),
    "RTX 4090": (82.6, 165.2, 165.2),
    "V100": (15.7, None, 125.0),        # no TF32 and no bf16 tensor cores
}


def peak_tflops(device_name, dtype, given=None):
    """The device's dense peak for `dtype` (a name: float32, bfloat16, float16); `given`
    (--peak_tflops) wins; None where unknown (CPUs), and then no MFU is printed."""
    if given:
        return float(given)
    words = " " + " ".join(re.split(r"[\s\-_]+", device_name)) + " "
    for name, peaks in PEAK_TFLOPS.items():
        if f" {name} " in words:
            return peaks[("float32", "bfloat16", "float16").index(dtype)]
    return None


def significant(x, digits=4):
    return float(f"{x:.{digits}g}")


def count_flops(step):
    """FLOPs of one call of `step` (forward and backward): matrix multiplies and convolutions with
    torch.utils.flop_counter's formulas (element-wise work is not counted, as in MFU figures).
    FlopCounterMode itself cannot run R1's double backward (its module tracker refuses
    autograd.grad), so a bare dispatch mode applies the same formulas to every op."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **(kwargs or {}), out_val=out)
            return out

    with Count() as counter:
        step()
    return counter.total


def bench_training(args, rt, make_step, warmup=3):
    """--bench N: images/s and peak memory of N training steps, float32 eager first as the
    baseline, then the asked --dtype eager, then with --compile both dtypes compiled: every
    configuration in one process (speed is a ratio within one run). make_step(run,
    compile_model) builds fresh networks for Runtime `run` (compiled if asked) and returns a
    no-argument step that trains on one fixed batch of args.batch_size images.
    One extra float32 step, untimed, counts the FLOPs per image; with the device's peak (the
    table above or --peak_tflops) that gives the model FLOPs utilisation, as nanoGPT reports it:
    MFU = FLOPs per step x steps per second / peak. Prints one JSON line per configuration, then
    a summary line; returns the summary."""
    import resource
    dtypes = ["float32"] + ([args.dtype] if args.dtype != "float32" else [])
    compiles = [None] + ([args.compile] if args.compile else [])
    configs = [(dtype, compile_model) for compile_model in compiles for dtype in dtypes]
    cuda = rt.device.type == "cuda"
    device_name = torch.cuda.get_device_name(rt.device) if cuda else "cpu"
    rows, flops = [], None
    for dtype, compile_model in configs:
        torch.manual_seed(args.seed)
        step = make_step(Runtime(rt.device, getattr(torch, dtype)), compile_model)
        for _ in range(warmup):  # cudnn autotuning, compilation
            step()
        if flops is None:
            flops = count_flops(step)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.bench):
            step()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
        else:  # the process's peak resident memory so far (Linux reports KiB)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        seconds = time.perf_counter() - t0
        given = getattr(args, "peak_tflops", None) if dtype == args.dtype else None
        peak_flops = peak_tflops(device_name, dtype, given)
        achieved = flops * args.bench / seconds  # FLOP/s
        rows.append(dict(dtype=dtype, compile=compile_model,
                         img_per_s=round(args.bench * args.batch_size / seconds, 2),
                         ms_per_step=round(1000 * seconds / args.bench, 1),
                         peak_mem_gib=round(peak, 3),
                         tflops=significant(achieved / 1e12),
                         mfu=None if not peak_flops else significant(achieved / peak_flops / 1e12)))
        if len(rows) > 1:
            rows[-1]["speedup_vs_fp32_eager"] = round(rows[-1]["img_per_s"] / rows[0]["img_per_s"],
                                                      3)
        print(json.dumps(rows[-1]), flush=True)
        del step
        if cuda:
            torch.cuda.empty_cache()
    summary = {"bench": rows, "data": args.data, "batch_size": args.batch_size,
               "size": args.size, "gflops_per_img": significant(flops / args.batch_size / 1e9),
               "device": device_name, "threads": torch.get_num_threads()}
    print(json.dumps(summary), flush=True)
    return summary


def write_bench(args, result):
    """--bench's results, --out_dir/bench.json (written whole, then renamed: never half a file)."""
    path = os.path.join(args.out_dir, "bench.json")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return result


# ----------------------------------------------------------------------------------------------
# Data feeding: an endless, resumable stream of batches
# ----------------------------------------------------------------------------------------------

class ResumableBatches(torch.utils.data.Sampler):
    """Index lists for an endless run: epoch e is a permutation drawn from (seed, e).

    Batch number i of the run is a pure function of (seed, i), so `start_iter` resumes the
    stream exactly where a checkpoint left it. Under DDP each rank takes its own slice of every
    global batch, so the processes together see exactly what one process would. With `seeded`,
    each index comes with the seed of its item's random draws (crop, flip, caption): a pure
    function of (seed, i, index) too, so that neither data workers nor a resume change them.
    """

    def __init__(self, n_items, batch_size, seed, start_iter=0, rank=0, world_size=1,
                 seeded=False):
        require(batch_size % world_size == 0,
                f"--batch_size {batch_size} is the global batch and must divide evenly over the "
                f"{world_size} processes of this torchrun launch.")
        if n_items < batch_size:
            raise UserError(f"the dataset has {n_items} items, fewer than one batch of "
                            f"{batch_size}; lower --batch_size or add data.")
        self.n, self.batch, self.seed = n_items, batch_size, seed
        self.start, self.rank, self.world = start_iter, rank, world_size
        self.seeded = seeded

    def __iter__(self):
        per_epoch = self.n // self.batch  # the last incomplete batch of an epoch is dropped
        i = self.start
        while True:
            epoch, k = divmod(i, per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))
            batch = perm[k * self.batch:(k + 1) * self.batch]
            share = self.batch // self.world
            mine = batch[self.rank * share:(self.rank + 1) * share].tolist()
            if self.seeded:
                mine = [(j, (self.seed * 1_000_003 + i) * 1_000_033 + j) for j in mine]
            yield mine
            i += 1


class SeededItems(torch.utils.data.Dataset):
    """dataset[(index, seed)]: the item made with torch's RNG seeded to `seed` (the dataset's
    random crop, flip and caption draw from it), the caller's RNG left as it was."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):  # the CPU generator; CUDA's are not touched
            torch.default_generator.manual_seed(seed % 2 ** 63)
            return self.dataset[index]


def ignore_stop_signals(worker_id=None):
    """A data worker's worker_init_fn: the stop signals are the main process's to handle.
    torchrun and SLURM signal the whole process group; a worker killed by SIGTERM would crash
    the run (DataLoader raises in the main process) before StopSignals could save it."""
    for name in StopSignals.SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def batch_stream(dataset, batch_size, rt, seed, start_iter=0, num_workers=0):
    """Endless iterator of collated batches (dicts of tensors / lists), resumable at start_iter.

    `batch_size` is the GLOBAL batch (--batch_size): each rank yields its share of it. Batch i is
    the same whatever the number of processes, data workers or resumes.
    """
    sampler = ResumableBatches(len(dataset), batch_size, seed, start_iter, rt.rank, rt.world_size,
                               seeded=True)
    loader = torch.utils.data.DataLoader(
        SeededItems(dataset), batch_sampler=sampler, num_workers=num_workers,
        pin_memory=rt.device.type == "cuda", persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(seed * 7919 + start_iter))  # not the global RNG
    return iter(loader)


def to_device(batch, device):
    """Move every tensor of a collated batch dict to the device (non-blocking from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic, exact, and refusing what belongs to another script or configuration
# ----------------------------------------------------------------------------------------------

def rng_state():
    """Every random generator we use, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": np_state["state"]["pos"], "has_gauss": np_state["has_gauss"],
                  "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # the GPUs this process sees now (a run saved where more were visible resumes too)
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


@contextlib.contextmanager
def preserved_rng():
    """Run a block (a sample grid, say) without moving any training random generator (Python,
    NumPy, torch CPU, every CUDA device and MPS), so that a run that samples more often, or
    resumes, draws the same training noise."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


# Flags that say what a command does, not what was trained: never saved in a checkpoint's config.
RUN_MODE_FLAGS = ("resume", "sample", "eval", "dry_run", "bench", "device", "num_workers",
                  "compile", "peak_tflops", "init_from")


def save_checkpoint(path, method, config, iteration, objects, extra=None, rt=None,
                    per_rank=None):
    """Write {method, config, iter, state of every object, RNG} atomically.

    `config` is the parsed flags (a Namespace or a dict); the run-mode flags are left out.

    `objects` maps names to anything with state_dict(): networks (unwrapped), EMA, optimisers,
    schedulers, the grad scaler. The file is written to `path.tmp` and renamed over `path`, so an
    interrupted save leaves the previous checkpoint intact. Under DDP every rank calls it (pass
    `rt`): each rank's random state and `per_rank` objects (a LossMeans, say) are gathered, so
    that a resumed rank draws and logs what it would have, and rank 0 writes.
    """
    mine = {"rng": rng_state(), **{k: obj.state_dict() for k, obj in (per_rank or {}).items()}}
    ranks = [mine]
    if rt is not None and rt.ddp:
        ranks = [None] * rt.world_size
        dist.all_gather_object(ranks, mine)
        if not rt.is_main:
            return
    config = {k: v for k, v in (vars(config) if isinstance(config, argparse.Namespace)
                                else dict(config)).items() if k not in RUN_MODE_FLAGS}
    state = {"method": method, "config": config, "iter": iteration, "rng": ranks[0]["rng"],
             "rng_per_rank": [r.pop("rng") for r in ranks], "per_rank": ranks,
             "state": {name: unwrap(obj).state_dict() if isinstance(obj, nn.Module)
                       else obj.state_dict() for name, obj in objects.items()},
             "extra": extra or {}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def no_checkpoint_sentence(path):
    return (f"no checkpoint at {path}; train first (without --resume/--sample/--eval) or point "
            f"--out_dir at the run folder.")


# The flags that fix a run's stream of batches (batch_stream: seed, batch number, index), checked
# on --resume beside the architecture. --iters, learning rates and logging may change.
RESUME_KEYS = ("data", "seed", "batch_size")


def load_checkpoint(path, method, config=None, arch_keys=(), objects=None, restore_rng=True,
                    rt=None, per_rank=None):
    """Load a checkpoint written by `save_checkpoint` into `objects` (and this rank's `per_rank`
    objects, on a resume); return the whole dict.

    Refuses, with one sentence, a missing or unreadable file, a checkpoint of another method, and
    one whose architecture flags (`arch_keys` of `config`) differ from the ones asked for now.
    A resume (restore_rng) also refuses other RESUME_KEYS: with another dataset, seed or global
    batch the continued run would silently differ from the uninterrupted one.
    """
    require(os.path.isfile(path), no_checkpoint_sentence(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, foreign or pickled with code objects
        raise UserError(f"{path} is not a readable checkpoint of this project ({type(err).__name__})."
                        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != method:
        other = ckpt.get("method") if isinstance(ckpt, dict) else None
        raise UserError(f"{path} was written by {other or 'something else'}, not {method}.py.")
    if config is not None:
        saved = ckpt.get("config", {})
        keys = list(arch_keys) + [k for k in RESUME_KEYS if restore_rng and k not in arch_keys]
        diff = [k for k in keys if saved.get(k) != config.get(k)]
        if diff:
            shown = ", ".join(f"--{k} {saved.get(k)} (asked: {config.get(k)})"
                              for k in diff)
            raise UserError(f"{path} was trained with {shown}; pass the same flags to use it.")
        if restore_rng and config.get("iters") is not None:  # a resume
            done = ckpt.get("iter", 0)
            require(done <= config["iters"], f"{path} is at iteration {done}, past --iters "
                                             f"{config['iters']}: nothing to train; pass --iters "
                                             f"{done} or more.")
    for name, obj in (objects or {}).items():
        target = unwrap(obj) if isinstance(obj, nn.Module) else obj
        if name not in ckpt["state"]:
            raise UserError(f"{path} holds no '{name}' (it holds {', '.join(ckpt['state'])}); it "
                            f"was written by another version of {method}.py.")
        state = ckpt["state"][name]
        if isinstance(target, (nn.Module, EMA)):
            require_same_tensors(path, name, target.state_dict(), state)
        try:
            target.load_state_dict(state)
        except (KeyError, ValueError, RuntimeError, TypeError) as err:  # optimisers, schedulers
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else repr(err)
            raise UserError(f"{path}: '{name}' does not fit this run ({reason}); it was written "
                            f"with other flags or by another version of {method}.py.") from None
    if restore_rng:
        restore_rank_rng(ckpt, rt)
        rank, world = (rt.rank, rt.world_size) if rt is not None else (0, 1)
        saved = ckpt.get("per_rank") or [{}]
        mine = saved[rank] if len(saved) == world else saved[0]  # another world: rank 0's
        for name, obj in (per_rank or {}).items():
            if name in mine:
                obj.load_state_dict(mine[name])
    return ckpt


def restore_rank_rng(ckpt, rt):
    """Each rank takes back its own random state. Resumed with another number of processes, the
    ranks start from rank 0's state, each moved to a stream of its own (exactness is lost then)."""
    rank, world = (rt.rank, rt.world_size) if rt is not None else (0, 1)
    per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]
    if len(per_rank) == world:
        set_rng_state(per_rank[rank])
        return
    set_rng_state(per_rank[0])
    if rank:
        seed_everything(int(torch.randint(2 ** 31, ())) + rank)


def require_same_tensors(path, name, expected, saved):
    """One sentence naming the first key that is missing, unexpected, or of another shape/dtype."""
    problems = [f"{k} is missing" for k in expected if k not in saved]
    problems += [f"{k} is not expected" for k in saved if k not in expected]
    for k in expected:
        if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape):
            problems.append(f"{k} has shape {tuple(saved[k].shape)}, "
                            f"expected {tuple(expected[k].shape)}")
        elif k in saved and saved[k].dtype != expected[k].dtype:
            problems.append(f"{k} is {saved[k].dtype}, expected {expected[k].dtype}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{path}: in '{name}', {problems[0]}{more}; it was written with other "
                        f"flags or by another version of this script.")


class StopSignals:
    """SIGTERM, SIGUSR1 and Ctrl-C (SIGINT) ask training to stop at the end of the current step.

    A cluster sends SIGTERM before it pre-empts a job (SLURM can send SIGUSR1 before a time
    limit): the loop then writes its checkpoint and leaves, instead of losing everything since
    the last periodic one. A second Ctrl-C aborts at once. Use as a context manager around the
    training loop; `requested(rt)` agrees over all ranks under DDP (one tiny all-reduce a step,
    read a step later).
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self):
        self.received = None
        self.previous = {}
        self.pending = None  # DDP: the stop flag reduced over ranks at the previous step

    def __enter__(self):
        for name in self.SIGNALS:
            if hasattr(signal, name):
                self.previous[name] = signal.signal(getattr(signal, name), self.handle)
        return self

    def __exit__(self, *exc):
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)

    def handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: abort now
        self.received = signal.Signals(signum)

    def requested(self, rt):
        """Whether to stop after this step. Under DDP every rank must answer the same: the MAX of
        all ranks' flags, reduced at the previous call and read now, so that no step waits for
        the GPU to finish (the stop comes one step after the signal, on every rank alike)."""
        if not rt.ddp:
            return self.received is not None
        agreed = 0
        if self.pending is not None:
            flag, ready = self.pending
            if ready is not None:
                ready.synchronize()  # the previous step's reduction, long done
            agreed = int(flag)
        local = torch.tensor(0 if self.received is None else int(self.received), device=rt.device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        cuda = rt.device.type == "cuda"
        flag = torch.empty((), dtype=local.dtype, pin_memory=cuda)
        flag.copy_(local, non_blocking=cuda)
        ready = torch.cuda.Event() if cuda else None
        if ready is not None:
            ready.record()
        self.pending = (flag, ready)
        if agreed and self.received is None:  # another rank was signalled
            self.received = signal.Signals(agreed)
        return bool(agreed)

    def end_of_step(self, rt, args, done, ckpt_path, save):
        """The last thing of every training step: `save()` (the checkpoint) every --ckpt_every
        iterations, at the last one, and when a signal asked to stop; then leave if one did.
        Every rank calls it (the stop request and the checkpoint's RNG gather are collective)."""
        stop = self.requested(rt)
        if done % args.ckpt_every == 0 or done == args.iters or stop:
            save()
        if stop:
            self.stop(done, ckpt_path)

    def stop(self, iteration, ckpt_path):
        """Leave training (after the checkpoint at `iteration` was written) with a resume hint."""
        name = self.received.name
        raise Stopped(f"{name}: stopped after iteration {iteration}; the checkpoint is "
                      f"{ckpt_path}. Continue with the same command and --resume.",
                      128 + int(self.received))


class EMA:
    """Exponential moving average of a network's weights (buffers are copied as they are).

    ema_param <- decay * ema_param + (1 - decay) * param, after every optimiser step.
    """

    def __init__(self, model, decay=0.999):
        self.decay = decay
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, decay=None):
        decay = self.decay if decay is None else decay
        src = unwrap(model)
        for e, p in zip(self.model.parameters(), src.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
        for e, b in zip(self.model.buffers(), src.buffers()):
            e.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# Logging and pictures
# ----------------------------------------------------------------------------------------------

class LossMeans:
    """The losses of the steps since the last log line, summed on the device (no host sync in a
    step); `pop(rt)` gives their means, averaged over the ranks, and starts afresh. Saved per
    rank in the checkpoint (save_checkpoint's `per_rank`), so that a run resumed between two log
    steps writes the very line the uninterrupted run writes."""

    def __init__(self, device):
        self.device, self.sums, self.steps = device, {}, 0

    def add(self, losses):
        """One step's {name: 0-dim tensor} (summed in float32 whatever the autocast dtype)."""
        self.sums = {k: self.sums.get(k, 0) + v.detach().float() for k, v in losses.items()}
        self.steps += 1

    def pop(self, rt):
        values = (torch.stack(list(self.sums.values())) / self.steps).tolist()  # one host sync
        means = {k: reduce_mean(v, rt) for k, v in zip(self.sums, values)}
        self.sums, self.steps = {}, 0
        return means

    def state_dict(self):
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "steps": self.steps}

    def load_state_dict(self, state):
        self.sums = {k: v.to(self.device) for k, v in state["sums"].items()}
        self.steps = state["steps"]


class Logger:
    """One JSON object per log step in out_dir/log.jsonl, and a tqdm bar showing losses and img/s.

    Nothing is written until the first log step, so a run that fails at start-up leaves an
    earlier log as it was. On resume, the lines past the resumed iteration (written after the
    checkpoint) and a half-written last line (a killed run) are dropped, atomically, so the log
    reads as one uninterrupted run.
    """

    def __init__(self, out_dir, total_iters, start_iter=0, enabled=True):
        self.enabled, self.start_iter = enabled, start_iter
        self.path = os.path.join(out_dir, "log.jsonl")
        self.bar = tqdm(total=total_iters, initial=start_iter, disable=not enabled,
                        dynamic_ncols=True, smoothing=0.1)
        self.last_time, self.images = time.perf_counter(), 0
        self.started = False

    def start(self):
        """The run is under way: keep the log's lines up to the resumed iteration, atomically."""
        self.started = True
        kept = []
        if self.start_iter > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short when the earlier run was killed
                    if record.get("iter", 0) <= self.start_iter:
                        kept.append(json.dumps(record) + "\n")
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def step(self, images):
        """Count one training iteration that processed `images` images (all ranks together)."""
        self.images += images
        self.bar.update(1)

    def log(self, iteration, **scalars):
        now = time.perf_counter()
        img_per_s = self.images / max(now - self.last_time, 1e-9)
        self.last_time, self.images = now, 0
        if not self.enabled:
            return
        if not self.started:
            self.start()
        record = {"iter": iteration, **{k: round(float(v), 6) for k, v in scalars.items()},
                  "img_per_s": round(img_per_s, 2)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")  # one write: a kill leaves at most one cut line
        shown = {k: f"{float(v):.3g}" for k, v in scalars.items()}
        self.bar.set_postfix(shown | {"img/s": f"{img_per_s:.1f}"}, refresh=False)

    def close(self):
        self.bar.close()


def to_uint8(tile, palette=None):
    """One picture tile as a (H, W, 3) uint8 array.

    Accepts an image (C, H, W) float in [-1, 1] with C = 1 or 3, a label map (H, W) integer
    coloured with `palette` (uint8 array (num_classes, 3)), or a map (1, H, W) in [0, 1].
    """
    tile = tile.detach().float().cpu() if torch.is_tensor(tile) else torch.as_tensor(tile)
    if tile.dim() == 2:  # label map
        if palette is None:
            raise ValueError("a label map needs a palette")
        pal = torch.as_tensor(np.asarray(palette), dtype=torch.uint8)
        return pal[tile.long().clamp(0, len(pal) - 1)].numpy()
    img = ((tile.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.permute(1, 2, 0).numpy()


def save_grid(path, rows, palette=None, pad=2):
    """Write a PNG grid. `rows` is a list of rows, each a list of tiles (see `to_uint8`).

    Tiles of one grid may differ in size (e.g. a low-resolution input beside its outputs): each is
    resized (nearest) to the largest tile's size, so pixels stay visible. Written atomically.
    """
    arrays = [[to_uint8(t, palette) for t in row] for row in rows]
    h = max(a.shape[0] for row in arrays for a in row)
    w = max(a.shape[1] for row in arrays for a in row)
    ncol = max(len(row) for row in arrays)
    canvas = np.full((len(arrays) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(arrays):
        for c, a in enumerate(row):
            if a.shape[:2] != (h, w):
                a = np.asarray(Image.fromarray(a).resize((w, h), Image.NEAREST))
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y:y + h, x:x + w] = a
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    Image.fromarray(canvas).save(tmp)
    os.replace(tmp, path)
    return canvas


# ----------------------------------------------------------------------------------------------
# Layers shared by the GANs
# ----------------------------------------------------------------------------------------------

class EqualLinear(nn.Module):
    """Linear layer with an equalised learning rate (Karras et al., ProGAN §4.1; StyleGAN).

    Weights are stored N(0, 1/lr_mul) and scaled at run time by lr_mul/sqrt(fan_in), so Adam's
    per-parameter step acts alike on every layer; lr_mul = 0.01 gives StyleGAN's slow mapping net.
    """

    def __init__(self, in_dim, out_dim, bias=True, bias_init=0.0, lr_mul=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x):
        bias = self.bias * self.lr_mul if self.bias is not None else None
        return F.linear(x, self.weight * self.scale, bias)


class EqualConv2d(nn.Module):
    """Conv2d with an equalised learning rate: weight N(0, 1) scaled by 1/sqrt(fan_in)."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale = 1 / math.sqrt(in_ch * kernel_size ** 2)
        self.stride, self.padding = stride, padding

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, self.stride, self.padding)


class PixelNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) over the feature axis (ProGAN §4.2; StyleGAN's mapping input)."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class AdaIN(nn.Module):
    """Adaptive instance norm (StyleGAN Eq. 1): gamma(w) * (x - mu(x)) / sigma(x) + beta(w).

    The affine map from the style vector w is an EqualLinear initialised to gamma = 1, beta = 0.
    """

    def __init__(self, channels, style_dim):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.style = EqualLinear(style_dim, 2 * channels)
        with torch.no_grad():
            self.style.bias[:channels] = 1.0  # gamma starts at one

    def forward(self, x, w):
        gamma, beta = self.style(w)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        return gamma * self.norm(x) + beta


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

def ns_d_loss(real_logits, fake_logits):
    """Non-saturating GAN loss for D (Goodfellow et al. 2014): softplus(-D(x)) + softplus(D(G(z))).

    A logit tensor, or a list of them (one per scale): each averaged over its locations, then the
    scales averaged."""
    real, fake = logit_list(real_logits), logit_list(fake_logits)
    return sum(F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real, fake)) / len(real)


def ns_g_loss(fake_logits):
    """Non-saturating GAN loss for G: softplus(-D(G(z))) = -log sigmoid(D(G(z)))."""
    fake = logit_list(fake_logits)
    return sum(F.softplus(-f).mean() for f in fake) / len(fake)


def logit_list(logits):
    return [logits] if torch.is_tensor(logits) else list(logits)


def r1_penalty(real_logits, real_inputs):
    """R1 (Mescheder et al. 2018): E ||grad_x D(x)||^2 on real data, summed over pixels.

    `real_inputs` must have requires_grad set before D is run; multiply by gamma / 2 outside.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


# ==============================================================================================
# Pretrained networks and metrics
#
# Every network is written out by hand with the official parameter names and shapes, so the
# official files load with `load_state_dict(strict=True)` and no torchvision / clip / lpips package
# is needed. The official files are downloaded on first use into the torch hub cache; without
# network the user gets one sentence saying where to put the file by hand. `pretrained=False`
# builds the same architecture with random weights: the tests and the CPU defaults use that.
#
#     VGG19           torchvision vgg19 `features`, named taps (relu4_1, conv5_4, ...)
#     CLIPTokenizer   OpenAI's byte-level BPE; any merges file, or none (bytes only)
#     CLIP            OpenAI CLIP ViT-B/32 and ViT-B/16 (text and image towers), or a small
#                     text tower to train from scratch
#     FIDInception    pytorch-fid's Inception-v3 (the TF FID graph), pool3 features (2048)
#     fid             Frechet distance from features or saved statistics (float64, no scipy)
#     LPIPS           lpips v0.1, AlexNet or VGG-16 backbone
#     lpips_diversity the diversity protocols of INADE, cIMLE and PoE-GAN
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Downloads: the official addresses, into the torch hub cache
# ----------------------------------------------------------------------------------------------

# torchvision files: the 8 hex digits in the name are the start of the file's SHA-256.
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
# OpenAI CLIP: the hex path segment of the URL is the archive's full SHA-256.
CLIP_URLS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
                "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
}
CLIP_BPE_URL = "https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz"
CLIP_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# pytorch-fid: the suffix 6726825d is not known to be a SHA-256 prefix (pytorch-fid never checks
# it), so this file is downloaded without a hash check.
FID_INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     "pt_inception-2015-12-05-6726825d.pth")
# lpips v0.1 linear layers (also inside the `lpips` wheel at lpips/weights/v0.1/); SHA-256 prefixes
# checked against the files of lpips 0.1.4.
LPIPS_LIN_URL = ("https://github.com/richzhang/PerceptualSimilarity/raw/master/"
                 "lpips/weights/v0.1/{}.pth")
LPIPS_LIN_SHA256 = {"alex": "df73285e35b22355", "vgg": "a78928a0af1e5f0f"}


def hub_checkpoint_path(filename):
    """Where torch.hub keeps downloaded weights: <torch.hub.get_dir()>/checkpoints/<filename>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def pretrained_files(*files):
    """Local paths of pretrained files, each given as (url, filename or None, SHA-256 prefix or
    None), all resolved before any network is built.

    A missing file is downloaded into the torch hub cache; a file already there (downloaded
    earlier or placed by hand) is checked against the SHA-256 prefix on first use, and a marker
    beside it (size, mtime, hash) spares the next runs from hashing it again. Every file that
    cannot be had is named, with its address and the cause, in one sentence.
    """
    paths, problems = [], []
    for url, filename, sha256_prefix in files:
        try:
            paths.append(fetch_verified(url, filename, sha256_prefix))
        except _FetchProblem as problem:
            problems.append(str(problem))
    if problems:
        raise UserError("; ".join(problems) + ".")
    return paths


def load_pretrained_file(url, filename=None, sha256_prefix=None):
    """One file of `pretrained_files`."""
    return pretrained_files((url, filename, sha256_prefix))[0]


class _FetchProblem(Exception):
    pass


def fetch_verified(url, filename=None, sha256_prefix=None):
    filename = filename or os.path.basename(urllib.parse.urlparse(url).path)
    path = hub_checkpoint_path(filename)
    if not os.path.isfile(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # Writes to a temporary file and renames it only after the hash check passed.
            torch.hub.download_url_to_file(url, path, hash_prefix=sha256_prefix, progress=True)
        except Exception as err:
            raise _FetchProblem(f"{url} could not be downloaded ({fetch_cause(err)}); place the "
                                f"file by hand at {path}") from None
    if sha256_prefix:
        verify_sha256(path, sha256_prefix, url)
    return path


def fetch_cause(err):
    """The reason of a failed download in a few words: no network, HTTP status, hash, disk."""
    import urllib.error
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"no network: {err.reason}"
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    if "hash" in str(err):
        return "the downloaded file has the wrong SHA-256"
    return f"{type(err).__name__}: {str(err).splitlines()[0][:150] if str(err) else ''}"


def verify_sha256(path, sha256_prefix, url):
    """Check a cached file against the published SHA-256 (prefix), once per version of the file."""
    if has_marker(path, sha256_prefix):
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(sha256_prefix):
        raise _FetchProblem(f"{path} is not the official file (its SHA-256 starts "
                            f"{digest.hexdigest()[:len(sha256_prefix)]}, the official one "
                            f"{sha256_prefix}); delete it and run again to download it from {url}")
    write_marker(path, sha256_prefix)


def has_marker(path, tag):
    """True when path's marker was written for this very file (same size and mtime) and tag."""
    stat = os.stat(path)
    marker = path + ".sha256-ok"
    if not os.path.isfile(marker):
        return False
    with open(marker) as f:
        return f.read() == f"{stat.st_size} {stat.st_mtime_ns} {tag}"


def write_marker(path, tag):
    stat = os.stat(path)
    try:
        with open(path + ".sha256-ok", "w") as f:
            f.write(f"{stat.st_size} {stat.st_mtime_ns} {tag}")
    except OSError:
        pass  # a read-only cache: the file is simply checked again next time


def load_weights(path):
    """A state_dict file, read with weights_only=True (tensors only, no arbitrary pickles)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path} is not a readable PyTorch weights file; delete it so that it "
                        f"is downloaded again, or replace it with the official file.") from err


def load_official(module, state, source, assign=False):
    """Strict load; a file with other keys or shapes (a wrong file placed by hand) is bad input.
    assign=True takes the file's tensors as the parameters (for a module built on the meta device)."""
    try:
        module.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as err:
        first_problem = str(err).splitlines()[1].strip()[:300]
        raise UserError(f"{source} does not hold the expected weights ({first_problem}); "
                        f"replace it with the official file.") from err


class FrozenNet(nn.Module):
    """Base of the measuring networks (VGG-19, FID Inception, LPIPS).

    They measure and never train: they stay in eval mode even inside a parent's .train() (FID
    Inception has BatchNorm, LPIPS has Dropout), and their parameters do not require gradients.
    Gradients still flow to the *input*, so a VGG or LPIPS loss trains the generator.
    """

    def freeze(self):
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def train(self, mode=True):
        return super().train(False)


# ----------------------------------------------------------------------------------------------
# VGG-19 (torchvision `vgg19`, config "E"), and the VGG feature stacks LPIPS uses
# ----------------------------------------------------------------------------------------------

def vgg_layer_names(convs_per_block):
    """Names of a torchvision VGG `features` Sequential, index by index.

    (2, 2, 4, 4, 4) is VGG-19: conv1_1 relu1_1 conv1_2 relu1_2 pool1 conv2_1 ... pool5 (37 names);
    (2, 2, 3, 3, 3) is VGG-16.
    """
    names = []
    for block, n_convs in enumerate(convs_per_block, start=1):
        for i in range(1, n_convs + 1):
            names += [f"conv{block}_{i}", f"relu{block}_{i}"]
        names.append(f"pool{block}")
    return names


def vgg_features(convs_per_block, pool="max"):
    """torchvision's VGG `features`: 3x3 convs (stride 1, pad 1, bias), ReLU, 2x2 pools.

    Same indices as torchvision, so its keys `features.N.weight` load unchanged. The ReLUs are not
    in-place: a pre-ReLU tap (conv5_4 for cIMLE) must stay intact. pool="avg" swaps every max
    pool for an average pool (the MatConvNet variant of cIMLE's layout distance); no weights change.
    """
    if pool not in ("max", "avg"):
        raise ValueError(f"pool must be 'max' or 'avg', not {pool!r}")
    layers, c_in = [], 3
    for block, n_convs in enumerate(convs_per_block):
        c_out = (64, 128, 256, 512, 512)[block]
        for _ in range(n_convs):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
            c_in = c_out
        layers.append(nn.MaxPool2d(2, 2) if pool == "max" else nn.AvgPool2d(2, 2))
    for m in layers:
        if isinstance(m, nn.Conv2d):  # torchvision's random init (used only with pretrained=False)
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class VGG19(FrozenNet):
    """VGG-19 feature extractor with torchvision's `vgg19` weights (IMAGENET1K_V1, top-1 72.376).

    vgg = VGG19(pretrained=True)
    acts = vgg(x, ["relu1_1", "relu4_1", "conv5_4"])    # dict name -> (B, C, h, w)

    x is RGB in [0, 1], ImageNet-normalised inside (mean 0.485 0.456 0.406, std 0.229 0.224
    0.225); normalize=False feeds x unchanged (SPADE/INADE put the [-1, 1] generator output
    straight in). Only `features` is kept, under torchvision's indices: state_dict keys are
    features.{0,2,5,...,34}.{weight,bias} (32 keys, 20,024,384 parameters). The file's
    classifier.* keys (the ImageNet head, 123.6M parameters no tap reads) are dropped before the
    strict load. Runs only as deep as the deepest tap asked for.
    """

    LAYERS = vgg_layer_names((2, 2, 4, 4, 4))  # LAYERS[i] names torchvision's features[i]

    def __init__(self, pretrained=True, normalize=True, pool="max"):
        super().__init__()
        path = load_pretrained_file(VGG19_URL, sha256_prefix="dcbb9e9d") if pretrained else None
        self.features = vgg_features((2, 2, 4, 4, 4), pool)
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
                             persistent=False)
        if pretrained:
            state = load_weights(path)
            load_official(self, {k: v for k, v in state.items() if k.startswith("features.")}, path)
        self.freeze()

    def forward(self, x, layers):
        names = [layers] if isinstance(layers, str) else list(layers)
        unknown = [n for n in names if n not in self.LAYERS]
        if unknown:
            raise ValueError(f"unknown VGG-19 layers {unknown}; known: {self.LAYERS}")
        wanted = {self.LAYERS.index(n) for n in names}
        if self.normalize:
            x = (x - self.mean) / self.std
        taps = {}
        for i, layer in enumerate(self.features[:max(wanted) + 1]):
            x = layer(x)
            if i in wanted:
                taps[self.LAYERS[i]] = x
        return {n: taps[n] for n in names}


# ----------------------------------------------------------------------------------------------
# CLIP tokenizer: OpenAI's byte-level BPE (clip/simple_tokenizer.py)
# ----------------------------------------------------------------------------------------------

def bytes_to_unicode():
    """The 256 bytes as 256 printable characters (GPT-2 / CLIP byte-level BPE).

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) are mapped
    in byte order to chr(256), chr(257), ... The order of this dict (printable ones first) is the
    order of the first 256 vocabulary ids: '!' is id 0, 'a' id 64.
    """
    # '!'..'~', '¡'..'¬', '®'..'ÿ'
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + k) for k, b in enumerate(others)})
    return table


def read_bpe_merges(path):
    """Merge rules from a CLIP vocab file (gzip or plain text): one "left right" pair per line.

    The official file's first line is a header ('"bpe_simple_vocab_16e6.txt#version: 0.2'), and it
    holds far more merges than CLIP uses: we keep the first 49152 - 256 - 2 = 48894, as OpenAI
    does. A first line containing '#version' is skipped; a file without one starts with merges.
    """
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"Could not read the BPE merges file {path}.") from err
    if lines and "#version" in lines[0]:
        lines = lines[1:]
    return [tuple(line.split()) for line in lines[:49152 - 256 - 2] if line.strip()]


class CLIPTokenizer:
    """OpenAI CLIP's tokenizer: clean, pre-tokenise, byte-level BPE, wrap in SOT/EOT, pad.

    tok = CLIPTokenizer()                  # the official vocab (downloaded once, SHA-256 checked)
    ids = tok(["a photo of a cat"])        # LongTensor (N, 77): 49406, 320, 1125, 539, 320, 2368,
                                           # 49407, 0, 0, ...
    CLIPTokenizer(bpe_path="path/merges.txt")  # another merges file (gzip or text)
    CLIPTokenizer(merges=[("a", "b</w>")])     # merges given directly
    CLIPTokenizer(bpe_path="")                 # bytes only: no merges, no download

    Vocabulary: 256 byte symbols, the same 256 with the end-of-word mark "</w>", one entry per
    merge, then <|startoftext|> and <|endoftext|>: 256 + 256 + len(merges) + 2 ids, so SOT and EOT
    are the two largest ids (49406 and 49407 for the official 48894 merges; 512 and 513 for bytes
    only). CLIP's text tower pools at the largest id of each row, i.e. at EOT.

    Known official ids (without SOT/EOT): "a photo of a cat" [320, 1125, 539, 320, 2368];
    "a diagram" [320, 22697]; "a dog" [320, 1929]; "Hello, World!" [3306, 267, 1002, 256].
    """

    # Special tokens, contractions, letter runs, single digits, runs of other non-space symbols.
    PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                            r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    SPECIAL = ("<|startoftext|>", "<|endoftext|>")

    def __init__(self, bpe_path=None, merges=None, context_length=77):
        if merges is None:
            if bpe_path is None:
                bpe_path = load_pretrained_file(CLIP_BPE_URL, sha256_prefix=CLIP_BPE_SHA256)
            merges = read_bpe_merges(bpe_path) if bpe_path else []
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in merges]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        self.vocab = (symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
                      + list(self.SPECIAL))
        self.encoder = {token: i for i, token in enumerate(self.vocab)}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}  # lower rank merges first
        self.sot, self.eot = len(self.vocab) - 2, len(self.vocab) - 1
        self.vocab_size = len(self.vocab)
        self.context_length = context_length
        self.cache = {s: [s] for s in self.SPECIAL}

    def bpe(self, word):
        """Merge one pre-token (a string of byte symbols) into vocabulary strings.

        The last symbol carries "</w>"; then, repeatedly, the adjacent pair with the lowest merge
        rank is joined everywhere it occurs (left to right, without overlaps), until no adjacent
        pair has a rank.
        """
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text):
        """One string -> list of ids (no SOT/EOT)."""
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()  # mojibake, &amp;amp;
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for piece in self.PATTERN.findall(text):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[token] for token in self.bpe(symbols)]
        return ids

    def decode(self, ids):
        """Ids -> text, stopping at EOT; each end of word becomes a space."""
        tokens = []
        for i in map(int, ids):
            if i == self.eot:
                break
            if i != self.sot:
                tokens.append(self.vocab[i])
        data = bytes(self.byte_decoder[c] for c in "".join(tokens))
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts, context_length=None, truncate=False):
        """List of strings -> LongTensor (N, context_length): SOT, ids, EOT, zero padding.

        A text that does not fit raises a UserError, unless truncate=True (cut, and end on EOT).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot] + self.encode(text) + [self.eot]
            if len(ids) > length:
                if not truncate:
                    raise UserError(f"The text {text[:40]!r} is {len(ids)} tokens long with its "
                                    f"start and end tokens, more than the context of {length}.")
                ids = ids[:length - 1] + [self.eot]
            out[row, :len(ids)] = torch.tensor(ids)
        return out


class WordTokenizer(CLIPTokenizer):
    """A closed word vocabulary with CLIPTokenizer's call, for small text towers trained from
    scratch offline (our choice for the built-in captions, whose words data.py lists): a tower
    trained with one id per word only has to learn what each id means, where byte-level tokens
    must first be assembled into words.

    Only the vocabulary and `encode` differ from CLIPTokenizer; its call (SOT, ids, EOT, zero
    padding, truncation) is reused. Ids: 0 padding, 1 <unk> (any word outside the vocabulary),
    the sorted words, then SOT and EOT as the two largest ids, so that a CLIP-shaped text tower
    pools at EOT (the largest id of each row) exactly as with CLIP's own tokenizer."""

    def __init__(self, words, context_length):   # no BPE: CLIPTokenizer.__init__ is not needed
        self.vocab = ["<pad>", "<unk>"] + sorted(set(words)) + list(self.SPECIAL)
        self.encoder = {w: i for i, w in enumerate(self.vocab)}
        self.unk, self.sot, self.eot = 1, len(self.vocab) - 2, len(self.vocab) - 1
        self.vocab_size, self.context_length = len(self.vocab), context_length

    def encode(self, text):
        """One string -> list of word ids (no SOT/EOT): lower case, runs of letters are words,
        every other non-space character is a word of its own."""
        words = re.findall(r"[a-z]+|[^\sa-z]", text.lower())
        return [self.encoder.get(w, self.unk) for w in words]

    def decode(self, ids):
        """Ids -> words joined by spaces, stopping at EOT."""
        words = []
        for i in map(int, ids):
            if i == self.eot:
                break
            if i not in (0, self.sot):
                words.append(self.vocab[i])
        return " ".join(words)


# ----------------------------------------------------------------------------------------------
# CLIP (OpenAI clip/model.py): text transformer and ViT image tower
# ----------------------------------------------------------------------------------------------

CLIP_CONFIGS = {
    "ViT-B/32": dict(embed_dim=512, context_length=77, vocab_size=49408, text_width=512,
                     text_heads=8, text_layers=12, image_resolution=224, vision_patch_size=32,
                     vision_width=768, vision_heads=12, vision_layers=12),
    "ViT-B/16": dict(embed_dim=512, context_length=77, vocab_size=49408, text_width=512,
                     text_heads=8, text_layers=12, image_resolution=224, vision_patch_size=16,
                     vision_width=768, vision_heads=12, vision_layers=12),
}


class CLIPLayerNorm(nn.LayerNorm):
    """LayerNorm (eps 1e-5) computed in float32 whatever the input dtype, as OpenAI's fp16 model."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float(), self.eps).to(x.dtype)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameters (the official layer).

    in_proj_weight (3D, D) stacks the q, k and v projections (rows 0:D, D:2D, 2D:3D); out_proj is
    a Linear. The official module runs on (L, N, D); we run batch-first (N, L, D) with the same
    weights and get the same numbers.
    """

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal=False):  # x (N, L, D)
        n, length, width = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(width, dim=-1)
        q, k, v = (t.view(n, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        # causal=True is the text tower's additive (L, L) mask, -inf strictly above the diagonal:
        # position i attends to positions <= i only.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (N, heads, L, D/heads)
        return self.out_proj(y.transpose(1, 2).reshape(n, length, width))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation CLIP was trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CLIPMLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class CLIPBlock(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = CLIPLayerNorm(width)
        self.attn = CLIPAttention(width, heads)
        self.ln_2 = CLIPLayerNorm(width)
        self.mlp = CLIPMLP(width)

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class CLIPTransformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(CLIPBlock(width, heads) for _ in range(layers))

    def forward(self, x, causal=False):
        for block in self.resblocks:
            x = block(x, causal)
        return x


class CLIPVisionTower(nn.Module):
    """ViT image tower (keys visual.*): patch conv, class token, transformer, class-token output."""

    def __init__(self, resolution, patch_size, width, layers, heads, embed_dim):
        super().__init__()
        self.resolution = resolution
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(
            torch.empty((resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = CLIPLayerNorm(width)
        self.transformer = CLIPTransformer(width, layers, heads)
        self.ln_post = CLIPLayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, embed_dim))

    def forward(self, x):  # x (B, 3, R, R), already CLIP-normalised
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+grid^2, W)
        x = self.transformer(self.ln_pre(x))  # no mask: every patch sees every patch
        return self.ln_post(x[:, 0]) @ self.proj  # the class token is the image embedding


class CLIP(nn.Module):
    """OpenAI CLIP (Radford et al. 2021) with the official key names: ViT-B/32 and ViT-B/16.

    clip = CLIP("ViT-B/32", pretrained=True)            # frozen, eval mode
    t = clip.encode_text(tok(["a photo of a cat"]))     # (N, 512), not normalised
    i = clip.encode_image(x)                            # x (B, 3, H, W) RGB in [0, 1] -> (B, 512)

    Text tower (150 keys with logit_scale): token + positional embedding -> 12 pre-LN blocks with a
    causal mask -> ln_final -> the feature at the EOT position (the largest id of each row) ->
    @ text_projection. Image tower (152 keys under visual.*): see CLIPVisionTower. encode_image
    first does CLIP's preprocessing on the tensor: bicubic resize of the shorter side to 224, centre
    crop, CLIP mean/std (preprocess=False skips it). OpenAI resizes a PIL image; we resize the
    tensor with antialiased bicubic and clamp to [0, 1], close to PIL but not bit-identical.

    vision=False builds the text tower only (its keys are the text keys of the file).
    CLIP.small(...) is a small randomly initialised text tower of the same design, to train from
    scratch; pretrained=False with keyword overrides (text_width, text_layers, ...) builds any size.
    """

    IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
    IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, name="ViT-B/32", pretrained=True, vision=True, **overrides):
        super().__init__()
        if name not in CLIP_CONFIGS:
            raise UserError(f"Unknown CLIP model {name!r}; choose {' or '.join(CLIP_CONFIGS)}.")
        if pretrained and overrides:
            raise ValueError(f"CLIP size overrides {sorted(overrides)} need pretrained=False")
        official = clip_state_dict(name, vision=vision) if pretrained else None  # files first
        # The official weights replace every parameter: build them as shapes only (meta device)
        # instead of drawing 151M random numbers first.
        with torch.device("meta") if pretrained else contextlib.nullcontext():
            self.build(name, vision, overrides)
        if pretrained:
            load_official(self, official, clip_converted_path(name), assign=True)
            for p in self.parameters():
                p.requires_grad_(False)
            self.eval()
        else:
            self.reset_parameters()

    def build(self, name, vision, overrides):
        cfg = {**CLIP_CONFIGS[name], **overrides}
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg["vocab_size"], cfg["text_width"])
        self.positional_embedding = nn.Parameter(
            torch.empty(cfg["context_length"], cfg["text_width"]))
        self.transformer = CLIPTransformer(cfg["text_width"], cfg["text_layers"], cfg["text_heads"])
        self.ln_final = CLIPLayerNorm(cfg["text_width"])
        self.text_projection = nn.Parameter(torch.empty(cfg["text_width"], cfg["embed_dim"]))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # a 0-d parameter
        self.visual = None
        if vision:
            self.visual = CLIPVisionTower(cfg["image_resolution"], cfg["vision_patch_size"],
                                          cfg["vision_width"], cfg["vision_layers"],
                                          cfg["vision_heads"], cfg["embed_dim"])

    @classmethod
    def small(cls, vocab_size, context_length=77, width=256, layers=4, heads=4, embed_dim=256):
        """A randomly initialised text-only CLIP of another size (e.g. for a byte-level tokenizer:
        vocab_size=CLIPTokenizer(bpe_path="").vocab_size)."""
        return cls(pretrained=False, vision=False, vocab_size=vocab_size,
                   context_length=context_length, text_width=width, text_layers=layers,
                   text_heads=heads, embed_dim=embed_dim)

    def reset_parameters(self):
        """OpenAI's initialisation (model.py initialize_parameters)."""
        width, layers = self.config["text_width"], self.config["text_layers"]
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)
        self._init_blocks(self.transformer, width, layers)
        if self.visual is not None:
            scale = self.config["vision_width"] ** -0.5
            for p in (self.visual.class_embedding, self.visual.positional_embedding,
                      self.visual.proj):
                nn.init.normal_(p, std=scale)
            self._init_blocks(self.visual.transformer, self.config["vision_width"],
                              self.config["vision_layers"])

    @staticmethod
    def _init_blocks(transformer, width, layers):
        for block in transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)

    def encode_text(self, ids):  # ids (N, L<=context) LongTensor from CLIPTokenizer -> (N, embed)
        n, length = ids.shape
        x = self.token_embedding(ids) + self.positional_embedding[:length]  # (N, L, width)
        x = self.ln_final(self.transformer(x, causal=True))
        # Pool at EOT: it is the largest id in each row (and, causally, it has read the whole text).
        x = x[torch.arange(n, device=ids.device), ids.argmax(dim=-1)]  # (N, width)
        return x @ self.text_projection

    def preprocess(self, x):
        """(B, 3, H, W) RGB in [0, 1] -> CLIP's input: shorter side resized (bicubic) to the
        resolution, centre crop, CLIP mean/std (as OpenAI's Resize, CenterCrop, Normalize)."""
        res = self.visual.resolution
        h, w = x.shape[-2:]
        if (h, w) != (res, res):
            size = (res, int(res * w / h)) if h <= w else (int(res * h / w), res)
            if size != (h, w):
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False,
                                  antialias=True).clamp(0, 1)
            top, left = int(round((size[0] - res) / 2)), int(round((size[1] - res) / 2))
            x = x[..., top:top + res, left:left + res]
        mean = torch.tensor(self.IMAGE_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.IMAGE_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode_image(self, x, preprocess=True):  # -> (B, embed)
        if self.visual is None:
            raise ValueError("this CLIP was built with vision=False")
        return self.visual(self.preprocess(x) if preprocess else x)

    def forward(self, image, ids):
        """Cosine similarities scaled by exp(logit_scale): (images x texts, texts x images)."""
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(ids), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()


def convert_clip_archive(archive_path, out_path):
    """OpenAI's TorchScript archive -> a plain float32 state_dict file (done once per model).

    The .pt files are TorchScript zips, which torch.load(weights_only=True) refuses; reading them
    runs torch.jit.load once, here. We keep its state_dict minus the three scalar attributes
    input_resolution, context_length and vocab_size (not parameters of the model), cast the fp16
    weights to float32, and write the result atomically. Later loads use weights_only=True.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load is deprecated; this is its last use
            scripted = torch.jit.load(archive_path, map_location="cpu")
    except Exception as err:
        raise UserError(f"{archive_path} is not a readable CLIP TorchScript archive; delete it so "
                        f"that it is downloaded again.") from err
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in scripted.state_dict().items()
             if k not in ("input_resolution", "context_length", "vocab_size")}
    tmp = f"{out_path}.{os.getpid()}.tmp"  # torchrun's processes may convert at once
    torch.save(state, tmp)
    os.replace(tmp, out_path)
    write_marker(out_path, "converted")


def clip_converted_path(name):
    """The converted weights of a CLIP model: <hub>/checkpoints/ViT-B-32.state_dict.pt."""
    archive_name = os.path.basename(urllib.parse.urlparse(CLIP_URLS[name]).path)  # ViT-B-32.pt
    return hub_checkpoint_path(archive_name.replace(".pt", ".state_dict.pt"))


def clip_state_dict(name, vision=True):
    """The official CLIP weights as a state_dict (downloads and converts on first use)."""
    converted = clip_converted_path(name)
    # Converted here from the hash-checked archive, or else (placed by hand, changed) made again.
    if not (os.path.isfile(converted) and has_marker(converted, "converted")):
        url = CLIP_URLS[name]
        sha256 = urllib.parse.urlparse(url).path.split("/")[-2]  # the URL names the full SHA-256
        convert_clip_archive(load_pretrained_file(url, sha256_prefix=sha256), converted)
    state = load_weights(converted)
    if not vision:
        state = {k: v for k, v in state.items() if not k.startswith("visual.")}
    return state


# ----------------------------------------------------------------------------------------------
# FID Inception (pytorch-fid's port of the TF FID graph, inception-2015-12-05)
# ----------------------------------------------------------------------------------------------

class InceptionConv(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, the TF value) -> ReLU; keys conv.*, bn.*."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)
        # Random init (pretrained=False only): keeps activations O(1) through 94 convs.
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def fid_avg_pool(x):
    # The TF graph's 3x3 average pool ignores the zero padding: count_include_pad=False
    # (torchvision's Inception counts it: one of pytorch-fid's patches).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b, 5c, 5d
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = InceptionConv(c_in, 64, 1)
        self.branch5x5_1 = InceptionConv(c_in, 48, 1)
        self.branch5x5_2 = InceptionConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = InceptionConv(c_in, 64, 1)
        self.branch3x3dbl_2 = InceptionConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = InceptionConv(96, 96, 3, padding=1)
        self.branch_pool = InceptionConv(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(fid_avg_pool(x))], dim=1)


class InceptionB(nn.Module):  # Mixed_6a: halves the resolution
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = InceptionConv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = InceptionConv(c_in, 64, 1)
        self.branch3x3dbl_2 = InceptionConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = InceptionConv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionC(nn.Module):  # Mixed_6b..6e: factorised 7x7 convs, c7 inner channels
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = InceptionConv(c_in, 192, 1)
        self.branch7x7_1 = InceptionConv(c_in, c7, 1)
        self.branch7x7_2 = InceptionConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = InceptionConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = InceptionConv(c_in, c7, 1)
        self.branch7x7dbl_2 = InceptionConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = InceptionConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = InceptionConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = InceptionConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = InceptionConv(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = x
        for i in range(1, 6):
            b7dbl = getattr(self, f"branch7x7dbl_{i}")(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(fid_avg_pool(x))], dim=1)


class InceptionD(nn.Module):  # Mixed_7a: halves the resolution
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = InceptionConv(c_in, 192, 1)
        self.branch3x3_2 = InceptionConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = InceptionConv(c_in, 192, 1)
        self.branch7x7x3_2 = InceptionConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = InceptionConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = InceptionConv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                          F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionE(nn.Module):  # Mixed_7b (pool "avg"), Mixed_7c (pool "max", as in the TF graph)
    def __init__(self, c_in, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = InceptionConv(c_in, 320, 1)
        self.branch3x3_1 = InceptionConv(c_in, 384, 1)
        self.branch3x3_2a = InceptionConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = InceptionConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = InceptionConv(c_in, 448, 1)
        self.branch3x3dbl_2 = InceptionConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = InceptionConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = InceptionConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = InceptionConv(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = fid_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
            self.branch_pool(pooled)], dim=1)


class FIDInception(FrozenNet):
    """The Inception-v3 of FID (pytorch-fid's FID weights, converted from TF inception-2015-12-05).

    inc = FIDInception(pretrained=True)
    feats = inc(x)        # x (B, 3, H, W) RGB in [0, 1] -> pool3 features (B, 2048)

    As pytorch-fid: bilinear resize to 299x299 (align_corners=False, no antialias), x -> 2x - 1,
    the blocks, global average pool. Key names are those of torchvision's Inception3 with 1008
    classes and no aux head (566 keys: 94 conv+BN units of 6 keys, fc.weight, fc.bias); fc is
    unused for FID but kept so the file loads strictly.
    """

    def __init__(self, pretrained=True):
        super().__init__()
        # pytorch-fid publishes no hash of this file: it is checked by the strict load alone.
        path = load_pretrained_file(FID_INCEPTION_URL) if pretrained else None
        self.Conv2d_1a_3x3 = InceptionConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = InceptionConv(32, 32, 3)
        self.Conv2d_2b_3x3 = InceptionConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = InceptionConv(64, 80, 1)
        self.Conv2d_4a_3x3 = InceptionConv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        if pretrained:
            load_official(self, load_weights(path), path)
        self.freeze()

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # the TF graph expects [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                                     # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                        # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                                     # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                   # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                                                 # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))    # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                   # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))                                            # pool3 (B, 2048)


@torch.no_grad()
def inception_features(inc, batches, device=None, progress=False):
    """pool3 features of a stream of image batches -> float32 array (N, 2048).

    `batches` yields (B, 3, H, W) tensors, float in [0, 1] or uint8 in [0, 255] (or tuples/lists
    whose first item is one), e.g. a DataLoader or a generator that samples a model batch by
    batch: only one batch of images is ever in memory (50k features take 400 MB). Runs in float32
    even under an outer autocast.
    """
    device = torch.device(device) if device is not None else next(inc.parameters()).device
    inc.eval()
    feats = []
    for batch in tqdm(batches, desc="inception features", disable=not progress):
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        scale = 1 / 255 if batch.dtype == torch.uint8 else 1.0
        with torch.autocast(device.type, enabled=False):
            feats.append(inc(batch.to(device, torch.float32) * scale).cpu().numpy())
    return np.concatenate(feats)


def fid_stats(feats):
    """Mean and covariance (N - 1 normalisation, as np.cov) of features (N, D), in float64.

    The covariance is accumulated in chunks, so a float32 (50000, 2048) array never gets a full
    float64 copy.
    """
    feats = feats.detach().cpu().numpy() if torch.is_tensor(feats) else np.asarray(feats)
    if feats.ndim != 2 or len(feats) < 2:
        raise UserError(f"FID needs at least 2 feature vectors per set; got shape {feats.shape}.")
    mu = feats.mean(axis=0, dtype=np.float64)
    sigma = np.zeros((feats.shape[1], feats.shape[1]))
    for start in range(0, len(feats), 4096):
        centred = feats[start:start + 4096].astype(np.float64) - mu
        sigma += centred.T @ centred
    return mu, sigma / (len(feats) - 1)


class RunningFIDStats:
    """FID statistics as running sums: add feature batches one by one, memory O(D^2) whatever the
    number of images (for streaming evaluation). Same values as fid_stats on all features at once
    (float64 sums; the covariance uses the N - 1 normalisation)."""

    def __init__(self):
        self.n, self.sum, self.outer = 0, None, None

    def add(self, feats):
        feats = feats.detach().cpu().numpy() if torch.is_tensor(feats) else np.asarray(feats)
        feats = feats.astype(np.float64)
        if self.sum is None:
            self.sum, self.outer = np.zeros(feats.shape[1]), np.zeros((feats.shape[1],) * 2)
        self.n += len(feats)
        self.sum += feats.sum(0)
        self.outer += feats.T @ feats

    def all_reduce(self, device):
        """Add the sums of every torchrun process into each one's (in place; float64). A process
        that got no batch takes part with zeros of the others' feature size."""
        dim = torch.tensor(0 if self.sum is None else len(self.sum), device=device)
        dist.all_reduce(dim, op=dist.ReduceOp.MAX)
        if self.sum is None:
            self.sum, self.outer = np.zeros(int(dim)), np.zeros((int(dim),) * 2)

        def total(array):
            t = torch.as_tensor(array, dtype=torch.float64).to(device)
            dist.all_reduce(t)
            return t.cpu().numpy()

        self.n = int(total(float(self.n)))
        self.sum, self.outer = total(self.sum), total(self.outer)

    def stats(self):
        if self.n < 2:
            raise UserError(f"FID needs at least 2 images per set; got {self.n}.")
        mu = self.sum / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def inception_stats(inc, batches, device=None, progress=False):
    """FID statistics (mu, sigma) of a stream of image batches (as inception_features takes them),
    keeping only running sums: peak memory is set by the batch, not by the number of images."""
    running = RunningFIDStats()
    for batch in batches:
        running.add(inception_features(inc, [batch], device, progress))
    return running.stats()


def save_fid_stats(path, mu, sigma):
    """pytorch-fid's statistics format: .npz with arrays `mu` and `sigma` (written atomically)."""
    with open(path + ".tmp", "wb") as f:
        np.savez_compressed(f, mu=mu, sigma=sigma)
    os.replace(path + ".tmp", path)


def load_fid_stats(path):
    try:
        with np.load(path) as f:
            return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"Could not read FID statistics from {path}: expected an .npz file with "
                        f"arrays 'mu' and 'sigma' (pytorch-fid's format).") from err


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr S1 + Tr S2 - 2 Tr sqrt(S1 S2), in float64, without scipy.

    S1 S2 has the eigenvalues of sqrt(S1) S2 sqrt(S1), which is symmetric positive semi-definite,
    so Tr sqrt(S1 S2) = sum of sqrt(eigenvalues of sqrt(S1) S2 sqrt(S1)): two `eigh` calls.
    Eigenvalues below D * eps * the largest are rounding noise (or the null space when a set has
    fewer samples than dimensions) and count as zero; a square root would blow them up.
    pytorch-fid computes scipy.linalg.sqrtm(S1 S2) instead: the same value up to rounding.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"FID statistics of different sizes: {mu1.shape} vs {mu2.shape}.")

    def clean(eigenvalues):
        tol = len(eigenvalues) * np.finfo(np.float64).eps * max(eigenvalues.max(), 0)
        return np.where(eigenvalues > tol, eigenvalues, 0.0)

    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(clean(w))) @ v.T  # sqrt(S1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(clean(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(a, b):
    """Frechet Inception Distance between two sets, each given as features (N, 2048) (array or
    tensor), as a (mu, sigma) tuple, or as the path of a saved .npz (save_fid_stats)."""

    def stats(x):
        if isinstance(x, (str, os.PathLike)):
            return load_fid_stats(x)
        if isinstance(x, tuple):
            return x
        return fid_stats(x)

    return frechet_distance(*stats(a), *stats(b))


# ----------------------------------------------------------------------------------------------
# LPIPS v0.1 (Zhang et al. 2018, richzhang/PerceptualSimilarity, `lpips` package)
# ----------------------------------------------------------------------------------------------

def alexnet_features():
    """torchvision AlexNet `features[:12]` (up to relu5), torchvision indices."""
    layers = [nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(),    # 0, 1 relu1
              nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),     # 2-4 relu2
              nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),    # 5-7 relu3
              nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),                        # 8, 9 relu4
              nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()]                        # 10, 11 relu5
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


LPIPS_NETS = {  # backbone file, its SHA-256 prefix, channels and indices of the five taps
    "alex": (ALEXNET_URL, "7be5be79", (64, 192, 384, 256, 256), (1, 4, 7, 9, 11)),
    "vgg": (VGG16_URL, "397923af", (64, 128, 256, 512, 512), (3, 8, 15, 22, 29)),  # VGG-16
}


class LPIPSLinear(nn.Module):
    """One learned layer weight: Dropout, then a 1x1 conv to one channel without bias (weights
    >= 0). The Dropout sits at index 0 so the key is lin<k>.model.1.weight, as in the files."""

    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPS(FrozenNet):
    """LPIPS v0.1: learned perceptual distance. x, y (B, 3, H, W) in [-1, 1] -> (B,).

    lp = LPIPS(net="alex", pretrained=True)   # "vgg" is VGG-16 (as in lpips), not VGG-19
    d = lp(x, y)                              # normalize=True takes [0, 1] inputs instead

    Per tap k (relu1..relu5 of AlexNet; relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of VGG-16):
    unit-normalise the features over channels (f / (|f| + 1e-10)), square the difference, weight
    the channels with lin_k (a 1x1 conv), average over space; sum over the five taps. The input is
    first shifted and scaled by lpips' ScalingLayer (an ImageNet normalisation for [-1, 1]).

    Keys: features.N.* under torchvision's indices (from torchvision's file) and
    lin0..lin4.model.1.weight (from lpips' v0.1 file): both load strictly into this module. (The
    lpips module's own names, net.sliceK.N.* and lins.K.*, differ; the files' names are these.)
    pretrained=False: random backbone, lin weights 1/C, so the metric's properties still hold.
    """

    def __init__(self, net="alex", pretrained=True):
        super().__init__()
        if net not in LPIPS_NETS:
            raise UserError(f"Unknown LPIPS backbone {net!r}; choose 'alex' or 'vgg'.")
        url, sha256, channels, self.taps = LPIPS_NETS[net]
        if pretrained:  # both files named at once when missing, before anything is built
            backbone_path, lin_path = pretrained_files(
                (url, None, sha256),
                (LPIPS_LIN_URL.format(net), f"lpips_v0.1_{net}.pth", LPIPS_LIN_SHA256[net]))
        self.features = alexnet_features() if net == "alex" else vgg_features((2, 2, 3, 3, 3))[:30]
        for k, c in enumerate(channels):
            lin = LPIPSLinear(c)
            nn.init.constant_(lin.model[1].weight, 1 / c)  # random-init stand-in: non-negative
            self.add_module(f"lin{k}", lin)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1),
                             persistent=False)
        if pretrained:
            state = {k: v for k, v in load_weights(backbone_path).items()
                     if k.startswith("features.")}
            state.update(load_weights(lin_path))
            load_official(self, state, f"{backbone_path} with {lin_path}")
        self.freeze()

    @property
    def lins(self):
        return [getattr(self, f"lin{k}") for k in range(len(self.taps))]

    def distance_maps(self, x, y, normalize=False):
        """Per-tap distance maps before the spatial mean: list of (B, 1, h_k, w_k)."""
        if normalize:  # [0, 1] -> [-1, 1]
            x, y = 2 * x - 1, 2 * y - 1
        h = (torch.cat([x, y]) - self.shift) / self.scale  # one backbone pass for both
        maps, tap = [], 0
        for i, layer in enumerate(self.features[:self.taps[-1] + 1]):
            h = layer(h)
            if i == self.taps[tap]:
                f = h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length per pixel
                fx, fy = f.chunk(2)
                maps.append(self.lins[tap]((fx - fy) ** 2))
                tap += 1
        return maps

    def forward(self, x, y, normalize=False, spatial=False):
        """(B,) distances; spatial=True gives the (B, 1, H, W) map (each tap's map bilinearly
        upsampled to the input size, then summed), as lpips' spatial=True."""
        maps = self.distance_maps(x, y, normalize)
        if spatial:
            return sum(F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False)
                       for m in maps)
        return sum(m.mean(dim=(2, 3)) for m in maps).flatten()


# ----------------------------------------------------------------------------------------------
# Diversity protocols built on LPIPS
# ----------------------------------------------------------------------------------------------

def diversity_pairs(n_samples, pairs="all", repeats=10, seed=0):
    """Which samples of one input are compared: a list of index pairs (i, j), the same for every
    input. "all": every i < j. "consecutive": (0, 1), (2, 3), ... "random": `repeats` pairs of
    distinct indices drawn with `seed`."""
    if n_samples < 2:
        raise UserError(f"LPIPS diversity needs at least 2 samples per input; got {n_samples}.")
    if pairs == "all":
        return [(i, j) for i in range(n_samples) for j in range(i + 1, n_samples)]
    if pairs == "consecutive":
        return [(i, i + 1) for i in range(0, n_samples - 1, 2)]
    if pairs == "random":
        rng = np.random.default_rng(seed)
        return [tuple(int(k) for k in rng.choice(n_samples, 2, replace=False))
                for _ in range(repeats)]
    raise ValueError(f"pairs must be 'all', 'consecutive' or 'random', not {pairs!r}")


@torch.no_grad()
def lpips_diversity(lpips_fn, samples, pairs="all", repeats=10, seed=0, batch_size=32,
                    device=None):
    """Mean LPIPS between samples generated for the same input (higher = more diverse).

    samples: (N_inputs, M, C, H, W) in [-1, 1], or an iterable of (M, C, H, W) tensors, one per
    input, so that only one input's samples are in memory. lpips_fn(x, y) -> (B,): an LPIPS, or
    any distance with that signature. For every input the LPIPS of each pair of diversity_pairs
    is computed and averaged; the result is the mean over inputs. The papers' protocols:

    - cIMLE (§5.2.6): 100 layouts, 40 pairs of samples each -> M = 80, pairs="consecutive".
    - PoE-GAN: two outputs per input -> M = 2 (either mode gives the one pair).
    - INADE (supp. §8): 10 groups of results over the test set (M = 10); LPIPS between 2 random
      groups, averaged over the set, repeated 10 times and averaged -> pairs="random",
      repeats=10 (the pair of groups is shared by all inputs, as with whole result folders).
    - pairs="all": every pair of the M samples (the most samples for the least variance).

    None of the papers names the LPIPS backbone: the caller chooses (our default is lpips'
    default, "alex"). A tensor's pairs of all inputs go through lpips_fn together, batch_size
    pairs per call (the same mean as one input at a time, in fewer calls).
    """
    def distances(images, index):  # lpips_fn of the pairs index (P, 2) of images, as float64
        images = images if device is None else images.to(device)
        return torch.cat([lpips_fn(images[c[:, 0]], images[c[:, 1]])
                          for c in index.split(batch_size)]).double()

    if torch.is_tensor(samples):
        n, m = samples.shape[:2]
        index = torch.tensor(diversity_pairs(m, pairs, repeats, seed))           # (P, 2)
        index = (index + m * torch.arange(n).view(n, 1, 1)).flatten(0, 1)        # into (N*M) rows
        return float(distances(samples.flatten(0, 1), index).view(n, -1).mean(1).mean())
    index, per_input = None, []
    for group in samples:  # (M, C, H, W)
        if index is None:
            m, index = len(group), torch.tensor(diversity_pairs(len(group), pairs, repeats, seed))
        if len(group) != m:  # the pairs are drawn once, for M samples
            raise ValueError(f"lpips_diversity: input {len(per_input)} has {len(group)} samples, "
                             f"the first had {m}")
        per_input.append(distances(group, index).mean())
    if not per_input:
        raise ValueError("lpips_diversity: no inputs")
    return float(torch.stack(per_input).mean())


