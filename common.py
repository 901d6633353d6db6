"""What the five method scripts share: the command line, the training plumbing, a few layers and
losses, and (further down) the pretrained networks and metrics.

Every method script is read top to bottom on its own; this file holds only what at least two of
them use, so that each script can stay about its paper. Map of this file:

    errors        UserError and the exit-2 wrapper (CONVENTIONS.md, "Bad input")
    command line  the flags all five scripts take, per-dataset presets, --dry_run output
    runtime       device / dtype / autocast, seeding, torchrun DDP, torch.compile
    data feeding  an endless, resumable batch stream over any map-style dataset
    checkpoints   atomic save, exact resume (models, EMA, optimisers, RNG), foreign-checkpoint check
    logging       JSONL log + tqdm bar with img/s, sample grids with label maps in a fixed palette
    layers        equalised-lr linear/conv, pixel norm, noise injection, AdaIN, spectral norm,
                  the multiscale PatchGAN discriminator
    losses        hinge and non-saturating GAN losses, R1, feature matching, Gaussian KLs,
                  the symmetric contrastive loss (PoE-GAN Eq. 10)
    pretrained    VGG-19, CLIP and its BPE tokenizer, FID Inception, LPIPS; FID and diversity metrics
"""

import argparse
import contextlib
import copy
import json
import math
import os
import random
import sys
import time

import numpy as np
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


def run_main(main):
    """Run `main()`; a UserError becomes one sentence on stderr and exit status 2, no traceback."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Command line: one contract for all five scripts (CONVENTIONS.md)
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
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
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
    return p


def parse_args(parser, presets, method, default_data, argv=None):
    """Parse the command line, then fill every flag left at None from the dataset's preset.

    `presets` maps a dataset name to a dict of flag values (the paper's settings); a flag given on
    the command line always wins. Returns the args namespace with `args.method` set.
    """
    args = parser.parse_args(argv)
    args.method = method
    args.data = args.data or default_data
    if args.data not in presets:
        raise UserError(f"{method}.py has no preset for --data {args.data}; "
                        f"choose one of: {', '.join(sorted(presets))}.")
    for key, value in presets[args.data].items():
        if not hasattr(args, key):
            raise KeyError(f"preset '{args.data}' sets unknown flag '{key}'")  # a bug, not input
        if getattr(args, key) is None:
            setattr(args, key, value)
    generic = dict(log_every=50, sample_every=500, ckpt_every=1000, num_workers=0)
    for key, value in generic.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.data_dir = args.data_dir or os.path.join("data", args.data)
    args.out_dir = args.out_dir or os.path.join("out", f"{method}-{args.data}")
    return args


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
        if args.device in ("auto", "cuda") and torch.cuda.is_available():
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


def prepare_model(model, rt, compile_model=False, ddp=True, **ddp_kwargs):
    """Move to the device, optionally compile, and wrap in DDP when running under torchrun."""
    model = model.to(rt.device)
    if compile_model:
        model = torch.compile(model)
    if ddp and rt.ddp:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)
    return model


def reduce_mean(value, rt):
    """Average a float over all processes (for logging); identity in a single process."""
    if not rt.ddp:
        return float(value)
    t = torch.tensor(float(value), device=rt.device)
    dist.all_reduce(t)
    return t.item() / rt.world_size


# ----------------------------------------------------------------------------------------------
# Data feeding: an endless, resumable stream of batches
# ----------------------------------------------------------------------------------------------

class ResumableBatches(torch.utils.data.Sampler):
    """Index lists for an endless run: epoch e is a permutation drawn from (seed, e).

    Batch number i of the run is a pure function of (seed, i), so `start_iter` resumes the
    stream exactly where a checkpoint left it. Under DDP each rank takes its own slice of every
    global batch, so the processes together see exactly what one process would.
    """

    def __init__(self, n_items, batch_size, seed, start_iter=0, rank=0, world_size=1):
        if n_items < batch_size:
            raise UserError(f"the dataset has {n_items} items, fewer than one batch of "
                            f"{batch_size}; lower --batch_size or add data.")
        self.n, self.batch, self.seed = n_items, batch_size, seed
        self.start, self.rank, self.world = start_iter, rank, world_size

    def __iter__(self):
        per_epoch = self.n // self.batch  # the last incomplete batch of an epoch is dropped
        i = self.start
        while True:
            epoch, k = divmod(i, per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))
            batch = perm[k * self.batch:(k + 1) * self.batch]
            share = self.batch // self.world
            yield batch[self.rank * share:(self.rank + 1) * share].tolist()
            i += 1


def batch_stream(dataset, batch_size, rt, seed, start_iter=0, num_workers=0):
    """Endless iterator of collated batches (dicts of tensors / lists), resumable at start_iter."""
    sampler = ResumableBatches(len(dataset), batch_size, seed, start_iter, rt.rank, rt.world_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers,
        pin_memory=rt.device.type == "cuda", persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed * 7919 + start_iter))
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
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, method, config, iteration, objects, extra=None):
    """Write {method, config, iter, state of every object, RNG} atomically.

    `objects` maps names to anything with state_dict(): networks (unwrapped), EMA, optimisers,
    schedulers, the grad scaler. The file is written to `path.tmp` and renamed over `path`, so an
    interrupted save leaves the previous checkpoint intact.
    """
    state = {"method": method, "config": dict(config), "iter": iteration, "rng": rng_state(),
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


def load_checkpoint(path, method, config=None, arch_keys=(), objects=None, restore_rng=True):
    """Load a checkpoint written by `save_checkpoint` into `objects`; return the whole dict.

    Refuses, with one sentence, a missing or unreadable file, a checkpoint of another method, and
    one whose architecture flags (`arch_keys` of `config`) differ from the ones asked for now.
    """
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train first (without --resume/--sample/--eval) "
                        f"or point --out_dir at the run folder.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, foreign or pickled with code objects
        raise UserError(f"{path} is not a readable checkpoint of this project ({type(err).__name__})."
                        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != method:
        other = ckpt.get("method") if isinstance(ckpt, dict) else None
        raise UserError(f"{path} was written by {other or 'something else'}, not {method}.py.")
    if config is not None:
        diff = [k for k in arch_keys if ckpt["config"].get(k) != config.get(k)]
        if diff:
            shown = ", ".join(f"--{k} {ckpt['config'].get(k)} (asked: {config.get(k)})"
                              for k in diff)
            raise UserError(f"{path} was trained with {shown}; pass the same flags to use it.")
    for name, obj in (objects or {}).items():
        target = unwrap(obj) if isinstance(obj, nn.Module) else obj
        target.load_state_dict(ckpt["state"][name])
    if restore_rng:
        set_rng_state(ckpt["rng"])
    return ckpt


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

class Logger:
    """One JSON object per log step in out_dir/log.jsonl, and a tqdm bar showing losses and img/s.

    On resume, lines past the resumed iteration (written after the checkpoint) are dropped, so
    the log reads as one uninterrupted run.
    """

    def __init__(self, out_dir, total_iters, start_iter=0, enabled=True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "log.jsonl")
        self.bar = tqdm(total=total_iters, initial=start_iter, disable=not enabled,
                        dynamic_ncols=True, smoothing=0.1)
        self.last_time, self.images = time.perf_counter(), 0
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        kept = []
        if start_iter > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line).get("iter", 0) <= start_iter]
        with open(self.path, "w") as f:
            f.writelines(kept)

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
        record = {"iter": iteration, **{k: round(float(v), 6) for k, v in scalars.items()},
                  "img_per_s": round(img_per_s, 2)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
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


class NoiseInjection(nn.Module):
    """x + weight_c * noise, one learned scale per channel, noise N(0, 1) shared over channels
    (StyleGAN §2, "B" in Fig. 1). Pass `noise` (B, 1, H, W) to fix it; the scales start at zero."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x, noise=None):
        if noise is None:
            noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3],
                                device=x.device, dtype=x.dtype)
        return x + self.weight * noise


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


def spectral_norm(module, enabled=True):
    """Spectral normalisation (Miyato et al. 2018) of a layer's weight, or the layer unchanged."""
    return nn.utils.parametrizations.spectral_norm(module) if enabled else module


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pixHD / SPADE `NLayerDiscriminator`): 4x4 convs, stride 2 then 1.

    Layers (n_layers = 4, ndf = 64): in->64 s2 (no norm) | 64->128 s2 | 128->256 s2 | 256->512 s1
    (spectral norm + InstanceNorm, no bias) | 512->1 s1. LeakyReLU(0.2) after all but the last.
    forward returns every layer's output (for feature matching); the last one is the logit map.
    """

    def __init__(self, in_ch, ndf=64, n_layers=4, use_sn=True):
        super().__init__()
        pad = 2  # SPADE: ceil((4 - 1) / 2)
        layers = [nn.Sequential(nn.Conv2d(in_ch, ndf, 4, 2, pad), nn.LeakyReLU(0.2))]
        ch = ndf
        for n in range(1, n_layers):
            out = min(ch * 2, 512)
            stride = 1 if n == n_layers - 1 else 2
            layers.append(nn.Sequential(
                spectral_norm(nn.Conv2d(ch, out, 4, stride, pad, bias=False), use_sn),
                nn.InstanceNorm2d(out, affine=False), nn.LeakyReLU(0.2)))
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, pad))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MultiscaleDiscriminator(nn.Module):
    """`num_d` PatchGANs on the input at full, 1/2, 1/4 ... resolution (pix2pixHD §3.2).

    Downsampling is avg-pool 3x3, stride 2, pad 1, count_include_pad=False (as SPADE).
    Returns a list (one per scale) of lists of layer outputs; [-1] of each is the logit map.
    """

    def __init__(self, in_ch, num_d=2, ndf=64, n_layers=4, use_sn=True):
        super().__init__()
        self.scales = nn.ModuleList(PatchDiscriminator(in_ch, ndf, n_layers, use_sn)
                                    for _ in range(num_d))

    def forward(self, x):
        outs = []
        for i, d in enumerate(self.scales):
            if i > 0:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            outs.append(d(x))
        return outs


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

def _logits(out):
    """The logit maps of a multiscale discriminator output, or a single logit tensor as a list."""
    if torch.is_tensor(out):
        return [out]
    return [scale[-1] if isinstance(scale, (list, tuple)) else scale for scale in out]


def hinge_d_loss(real_out, fake_out):
    """Hinge loss for D (Lim & Ye 2017): E[relu(1 - D(x))] + E[relu(1 + D(G(z)))], scales averaged."""
    real, fake = _logits(real_out), _logits(fake_out)
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake)) / len(real)


def hinge_g_loss(fake_out):
    """Hinge loss for G: -E[D(G(z))], averaged over scales."""
    fake = _logits(fake_out)
    return sum(-f.mean() for f in fake) / len(fake)


def ns_d_loss(real_out, fake_out):
    """Non-saturating GAN loss for D (Goodfellow et al. 2014): softplus(-D(x)) + softplus(D(G(z)))."""
    real, fake = _logits(real_out), _logits(fake_out)
    return sum(F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real, fake)) / len(real)


def ns_g_loss(fake_out):
    """Non-saturating GAN loss for G: softplus(-D(G(z))) = -log sigmoid(D(G(z)))."""
    fake = _logits(fake_out)
    return sum(F.softplus(-f).mean() for f in fake) / len(fake)


def r1_penalty(real_logits, real_inputs):
    """R1 (Mescheder et al. 2018): E ||grad_x D(x)||^2 on real data, summed over pixels.

    `real_inputs` must have requires_grad set before D is run; multiply by gamma / 2 outside.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def feature_matching_loss(real_out, fake_out):
    """pix2pixHD Eq. (4): L1 between D's intermediate features of real and fake, every layer but
    the logit, averaged over scales (the real features are constants)."""
    loss = 0.0
    for real_feats, fake_feats in zip(real_out, fake_out):
        for r, f in zip(real_feats[:-1], fake_feats[:-1]):
            loss = loss + F.l1_loss(f, r.detach())
    return loss / len(real_out)


def kl_diag_gaussians(mu_q, logvar_q, mu_p, logvar_p):
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) for diagonal Gaussians, elementwise (sum it yourself).

    = 0.5 * (logvar_p - logvar_q + (var_q + (mu_q - mu_p)^2) / var_p - 1)
    """
    return 0.5 * (logvar_p - logvar_q
                  + (logvar_q.exp() + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p) - 1)


def kl_standard_normal(mu, logvar):
    """KL(N(mu, var) || N(0, I)) elementwise: 0.5 * (mu^2 + var - 1 - logvar) (Kingma & Welling)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


def contrastive_loss(u, v, temperature):
    """Symmetric cross-entropy over a batch of pairs (PoE-GAN Eq. 10; CLIP's loss).

    L = -1/(2N) sum_i log softmax_j(cos(u_i, v_j)/tau)[i] - 1/(2N) sum_i log softmax_j(cos(u_j, v_i)/tau)[i]
    `temperature` is a float or a tensor; pass exp(-log_scale) of a learnable parameter to learn it.
    u, v: (N, D).
    """
    logits = F.normalize(u, dim=1) @ F.normalize(v, dim=1).t() / temperature  # (N, N)
    target = torch.arange(len(u), device=u.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


# ----------------------------------------------------------------------------------------------
# Pretrained networks and metrics: being written in pretrained_draft.py, merged here when done.
# ----------------------------------------------------------------------------------------------
try:
    from pretrained_draft import *  # noqa: F401,F403  (temporary, until the merge)
except ImportError:
    pass
