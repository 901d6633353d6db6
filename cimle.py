"""Conditional IMLE: Multimodal Image Synthesis with Conditional Implicit Maximum Likelihood
Estimation (Ke Li, Shichong Peng, Tianhao Zhang, Jitendra Malik; IJCV 2020, arXiv:2004.03590).
Two tasks: x8 super-resolution (SRIM, §5.1) and image synthesis from scene layouts (§5.2).

Idea: a conditional GAN pulls *every* sample towards the one ground truth, so its samples
collapse onto one mode. IMLE turns the direction around (§3.4-3.5): for every training pair
(x_i, y_i) draw m latent codes, find the generated sample T(x_i, z_ij) *nearest* to y_i, and
pull only that one towards y_i. Every real image thus has a sample near it (no mode is dropped),
while the other samples stay free to be different plausible outputs. Algorithm 1 alternates an
outer step (draw a subset S, search the nearest of m samples for each example) with L inner
steps of gradient descent on mini-batches of S with the selected codes held fixed. There is no
discriminator: the only loss is the distance L of §3.7 (pixels + VGG-19 features).

Map of this file:
    config and presets     Algorithm 1's |S|, m, L, |S~|, eta per dataset, with their sources;
                           check_args: every flag's range, before any data or model is built
    networks               RRDB super-resolution generator (§5.1.1, Fig. 4); cascaded refinement
                           network + noise encoder for layouts (§5.2.1)
    distance (§3.7)        weighted pixel + VGG-19 feature distances, masked for layouts (§5.2.4)
    select_latents         the nearest-sample search: chunked, no_grad, running argmin (exact)
    rarity (§5.2.4)        per-class KDE of mean colours, rarity scores, dataset and loss
                           rebalancing; cached beside the dataset
    Algorithm 1            the schedule of outer iterations (z = 0 pretraining rounds, IMLE
                           rounds), subset -> search -> L inner steps; the training loop
    several GPUs           torchrun: each rank searches its share of S (codes drawn per example,
                           so the same as one process's) and the selected codes are all-gathered;
                           the inner steps' |S~| = --batch_size is global, |S~| / world per rank
    sampling controls      many samples per input, latent interpolation, one latent on many inputs
    evaluation (streamed)  faithfulness-weighted variance (§5.1.5), LPIPS diversity (§5.2.6),
                           the shapes scores of data.py, summed input by input
    benchmark, dry run     training steps (common.bench_training) and select_latents vs the naive
                           search in one bench.json; parameter counts
    main

    python cimle.py                                   # layouts on built-in shapes, CPU ~5 min
    python cimle.py --pretrain_iters 1000             # the same network as z = 0 regression
    python cimle.py --task sr                         # x8 SR on shapes (stripes are ambiguous)
    python cimle.py --sample                          # grids from out/cimle-shapes/ckpt.pt
    python cimle.py --eval                            # metrics -> out/cimle-shapes/eval.json
    python cimle.py --bench 20                        # inner steps and the search -> bench.json
    python cimle.py --data folder --data_dir data/imagenet_cicada   # SRIM, paper scale
    python cimle.py --data gta5                       # layouts, paper scale (256x512)
    python cimle.py --data gta5 --dry_run             # parameter counts vs the official nets
    torchrun --nproc_per_node=2 cimle.py --data folder --data_dir data/imagenet_cicada  # |S~| 4
"""

import json
import math
import os
import time
import weakref

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from tqdm import tqdm

import common
import data

# ----------------------------------------------------------------------------------------------
# Config. Paper = Li et al. (IJCV); SRIM = niopeng/SRIM-pytorch; DISL = zth667/Diverse-Image-
# Synthesis-from-Semantic-Layout (both official).
# --iters counts inner steps (Algorithm 1's theta updates); K = iters / L outer iterations.
# ----------------------------------------------------------------------------------------------

SR_PAPER = dict(
    task="sr", size=256,      # §5.1.2: 256x256 targets from 32x32 inputs (x8)
    z_channels=5,             # §5.1.4: 5 noise channels, concatenated to the LR input (§5.1.1)
    nf=64, gc=128, n_blocks=24,  # SRIM config: 24 RRDBs, 64 features, growth 128 (ESRGAN 23/64/32)
    S=640, m=100, L=200_000,  # §5.1.4: |S| = 640, m = 100, L = 200,000
    batch_size=4,             # §5.1.4: |S~| = 4
    lr=1.5e-4,                # SRIM Adam 1.5e-4 (paper: eta = 1e-5, reached after 4 halvings)
    lr_milestones="200000,250000,350000,450000",  # SRIM x0.5 at 50k/100k/200k/300k IMLE steps,
    lr_gamma=0.5,             # shifted by the 150k pretraining steps
    pretrain_iters=150_000,   # §5.1.1: z = 0 pretraining; SRIM stage 1: 150k iterations
    bilinear_from=450_000,    # §5.1.1: nearest early, bilinear later (SRIM stage 3); when: ours
                              # (a fresh outer iteration starts there: see outer_schedule)
    iters=750_000,            # K = 3 IMLE outer iterations after pretraining (paper: K not given)
    n_train=1280,             # §5.1.4: 1,280 training images
    distance="vgg",           # §5.1.1, Eq. (1): l2 norms of pixels and VGG-19 relu5_4
    calibrate_examples=64,    # §3.7 weights from 64 examples of the first S (our choice)
    perturb=0.0, reject=0.0,  # off: official-code perturbation (0.1) / RS-IMLE rejection
    search_examples=1, search_chunk=25,  # our choice: 25 RRDB forwards per search chunk
    pretrained=1, n_eval=80, eval_samples=50,  # §5.1.6: 80 test images, 50 samples each
    sample_every=10_000, ckpt_every=10_000, log_every=100,
    # layout-only settings (unused here)
    crn_channels="", noise_channels=10, encoder_channels=100, noise_encoder=1,
    rebalance_data=0, rebalance_loss=0, rebalance_classes=5, rarity_min_images=67,
)
LAYOUT_PAPER = dict(
    task="layout", size=256,  # §5.2.5: 256x512 (height 256, the sets are 2:1)
    crn_channels="1024,1024,1024,1024,1024,512,512",  # DISL: 7 modules 4x8..256x512
    noise_channels=10,        # §5.2.5: z~ 256x512x10, z' 256x512x10
    encoder_channels=100,     # §5.2.5: intermediate layers of the noise encoder have 100 channels
    noise_encoder=1,          # §5.2.1 (0: Table 2's "w/o noise encoder", z~ fed to the CRN)
    S=400, m=10, L=10_000,    # §5.2.5: |S| = 400, m = 10, L = 10,000
    batch_size=1,             # §5.2.5: |S~| = 1
    lr=1e-4, lr_milestones="50000", lr_gamma=0.1,  # DISL: Adam 1e-4, then 1e-5 after 5 outer
    pretrain_iters=0, bilinear_from=0,              # iterations (paper: eta = 1e-5)
    iters=160_000,            # DISL: 16 outer iterations
    n_train=0,                # 0 = all (§5.2.5: 12,403 GTA-5 training images)
    distance="vgg",           # §5.2.1: l1 on conv1_2 .. conv5_2 (+ pixels, DISL)
    calibrate_examples=64,    # §3.7 weights from 64 examples of the first S (our choice)
    perturb=0.0, reject=0.0,
    search_examples=1, search_chunk=10,  # our choice: one example's m = 10 candidates at once
    rebalance_data=1, rebalance_loss=1,  # §5.2.4: both rebalancing schemes
    rebalance_classes=5,      # §5.2.4: the five classes of largest area
    rarity_min_images=67,     # DISL: classes in <= 67 images get no KDE of their own
    pretrained=1, n_eval=100, eval_samples=80,  # §5.2.6: 100 layouts x 40 pairs
    sample_every=5_000, ckpt_every=5_000, log_every=100,
    z_channels=5, nf=64, gc=128, n_blocks=24,  # SR-only settings (unused here)
)
CPU_LAYOUT = dict(            # our choice throughout: learns in minutes on 2 CPU cores
    LAYOUT_PAPER, size=32, crn_channels="48,48,32,32", encoder_channels=16,
    S=64, m=10, L=100, batch_size=16, lr=3e-3, lr_milestones="", lr_gamma=0.1, iters=1000,
    n_train=2000, distance="pixel", search_examples=64, search_chunk=10, pretrained=0,
    n_eval=100, eval_samples=20, sample_every=250, ckpt_every=250, log_every=25,
    rebalance_loss=0,         # shapes' flat grey background has a near-singular colour KDE, so
)                             # its rarity (~1e-2 vs ~1e5 for objects) would zero its loss weight
CPU_SR = dict(
    SR_PAPER, size=64, nf=16, gc=16, n_blocks=2, S=64, m=20, L=50, batch_size=8, lr=1e-3,
    lr_milestones="", pretrain_iters=300, bilinear_from=0, iters=1500, n_train=2000,
    distance="pixel", search_examples=64, search_chunk=10, pretrained=0, n_eval=50,
    eval_samples=20, sample_every=250, ckpt_every=250, log_every=25,
)
PRESETS = {
    "shapes": CPU_LAYOUT,     # --task sr switches to CPU_SR (see presets_for)
    "folder": SR_PAPER,       # an ImageNet synset at 256x256 (§5.1.2)
    "gta5": LAYOUT_PAPER,     # §5.2.2: the main layout set
    "cityscapes": dict(LAYOUT_PAPER),  # §5.2.2 compares it; same settings (our choice)
}
TASKS = {"shapes": ("layout", "sr"), "folder": ("sr",), "gta5": ("layout",),
         "cityscapes": ("layout",)}
ARCH_KEYS = ("task", "size", "z_channels", "nf", "gc", "n_blocks", "crn_channels",
             "noise_channels", "encoder_channels", "noise_encoder", "num_classes", "distance")
LAYOUT_VGG = ["conv1_2", "conv2_2", "conv3_2", "conv4_2", "conv5_2"]  # §5.2.1
REFERENCE_PARAMS = {"sr": {"G": 109.06e6}, "layout": {"G": 98.4e6, "E": 0.12e6}}  # official code


def build_parser():
    p = common.base_parser(__doc__.split("\n")[0])
    a = p.add_argument
    a("--task", default=None, choices=["sr", "layout"], help="super-resolution or layouts")
    a("--S", type=int, default=None, help="Algorithm 1 |S|: examples per outer iteration")
    a("--m", "--candidates", dest="m", type=int, default=None,
      help="Algorithm 1 m: latent codes drawn per example (under torchrun write --candidates: "
           "torchrun's own parser mistakes --m for one of its flags)")
    a("--L", type=int, default=None, help="Algorithm 1 L: inner steps per outer iteration")
    a("--lr", type=float, default=None, help="Adam learning rate (Algorithm 1's eta)")
    a("--lr_milestones", default=None, help="comma-separated iterations where lr *= lr_gamma")
    a("--lr_gamma", type=float, default=None)
    a("--pretrain_iters", type=int, default=None,
      help="first iterations with z = 0 (deterministic regression, §5.1.1); >= --iters: "
           "the whole run is the z = 0 baseline")
    a("--bilinear_from", type=int, default=None,
      help="SR: bilinear up-sampling from this iteration on, which starts a new outer iteration "
           "(0: nearest throughout)")
    a("--n_train", type=int, default=None, help="training examples used (0 = all)")
    a("--distance", default=None, choices=["pixel", "vgg", "official"],
      help="pixel: L1 of pixels only (no download); vgg: §3.7/§5 pixels + VGG-19 features; "
           "official: SRIM's 0.01 L1 pixels + L1 conv5_4 (SR only)")
    a("--calibrate_examples", type=int, default=None,
      help="§3.7 distance weights: examples of the first S (one code each) they are set from")
    a("--perturb", type=float, default=None, help="SRIM code: add perturb * N(0, I) to codes")
    a("--reject", type=float, default=None, help="RS-IMLE: skip candidates nearer than this")
    a("--search_examples", type=int, default=None, help="examples per search chunk")
    a("--search_chunk", type=int, default=None, help="candidates per example per search chunk")
    a("--z_channels", type=int, default=None, help="SR: latent channels at LR resolution")
    a("--nf", type=int, default=None, help="SR: RRDB feature channels")
    a("--gc", type=int, default=None, help="SR: RRDB growth channels")
    a("--n_blocks", type=int, default=None, help="SR: number of RRDBs")
    a("--crn_channels", default=None, help="layout: CRN widths, coarsest module first")
    a("--noise_channels", type=int, default=None, help="layout: channels of z~ and z'")
    a("--encoder_channels", type=int, default=None, help="layout: noise encoder width")
    a("--noise_encoder", type=int, default=None, choices=[0, 1],
      help="layout: 1 = z' = E(x, z~) (§5.2.1); 0 = z~ fed to the CRN (Table 2 ablation)")
    a("--rebalance_data", type=int, default=None, choices=[0, 1], help="§5.2.4 dataset rebalancing")
    a("--rebalance_loss", type=int, default=None, choices=[0, 1], help="§5.2.4 loss rebalancing")
    a("--rebalance_classes", type=int, default=None, help="classes of largest area that share S")
    a("--rarity_min_images", type=int, default=None,
      help="a class found in at most this many images gets no KDE: its pixels take the "
           "largest rarity of their image (DISL's guard: 67)")
    a("--pretrained", type=int, default=None, choices=[0, 1],
      help="1: pretrained VGG-19 / LPIPS (download once); 0: pixel stand-ins")
    a("--n_eval", type=int, default=None, help="test inputs for --eval")
    a("--eval_samples", type=int, default=None, help="samples per test input for --eval")
    a("--lpips_net", default="alex", choices=["alex", "vgg"],
      help="LPIPS backbone of --eval with --pretrained 1 (the paper does not name it)")
    a("--bench", type=int, default=None,
      help="time N inner steps (float32 eager, then --dtype/--compile) and select_latents "
           "against the naive search; writes bench.json (offline with --pretrained 0)")
    return p


def parse(argv=None):
    """common.parse_args with the preset of (--data, --task): shapes serves both tasks. Every
    flag is checked (check_args) before the run folder, any data or any model is touched."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    presets = dict(PRESETS)
    if known.task == "sr":
        presets["shapes"] = CPU_SR
    return common.parse_args(parser, presets, "cimle", "shapes", argv, check=check_args)


def check_batch_split(args):
    """Under torchrun, --batch_size (Algorithm 1's |S~|) is the global mini-batch of the inner
    steps and each process takes |S~| / world of it (DDP averages the gradients), while the
    search splits S itself. |S~| = 1 (the layout presets, §5.2.5) cannot be split: run it on one
    GPU. (common's generic split check comes after this one and would not say how to run it.)"""
    world = common.world_size()
    presets = dict(PRESETS, shapes=CPU_SR) if args.task == "sr" else PRESETS
    preset = presets.get(args.data, {}).get("batch_size")
    if world > 1 and args.batch_size % world:
        raise common.UserError(
            f"--batch_size {args.batch_size} (Algorithm 1's |S~|, the global mini-batch of the "
            f"inner steps) cannot be split over the {world} processes of this torchrun launch, "
            f"since each inner step is one gradient step on |S~| examples: run it on one GPU "
            f"(python cimle.py --data {args.data}), or pass a --batch_size that is a multiple of "
            f"{world} (which changes |S~| from the preset's {preset}).")


def check_args(args):
    """Every cIMLE flag that can be out of range, after the presets are filled: one sentence each
    (common.UserError, exit 2), before the run folder, any data or any model is touched."""
    require = common.require
    require(args.task in TASKS[args.data], f"--task {args.task} is not available on --data "
            f"{args.data}; it supports: {', '.join(TASKS[args.data])}.")
    common.at_least(args, 1, "S", "L", "search_examples", "search_chunk", "z_channels", "nf",
                    "gc", "n_blocks", "noise_channels", "encoder_channels", "rebalance_classes",
                    "n_eval", "calibrate_examples", "bench")
    require(args.m >= 1, f"--m (--candidates), the latent codes drawn per example, must be at "
                         f"least 1 (got {args.m}).")
    common.at_least(args, 0, "pretrain_iters", "bilinear_from", "n_train", "perturb", "reject",
                    "rarity_min_images")
    require(args.eval_samples >= 2, f"--eval_samples must be at least 2: the diversity of "
                                    f"§5.2.6 is measured within pairs of samples "
                                    f"(got {args.eval_samples}).")
    require(args.lr > 0 and math.isfinite(args.lr), f"--lr must be a positive number "
                                                    f"(got {args.lr}).")
    require(args.lr_gamma > 0 and math.isfinite(args.lr_gamma),
            f"--lr_gamma must be a positive number (got {args.lr_gamma}).")
    milestones = parse_ints(args.lr_milestones, "lr_milestones")
    require(all(v >= 1 for v in milestones), f"--lr_milestones must be iterations >= 1 "
                                             f"(got '{args.lr_milestones}').")
    require(args.batch_size <= args.S, f"--batch_size {args.batch_size} (|S~|) must not exceed "
                                       f"--S {args.S}, since mini-batches are drawn from S "
                                       f"(Algorithm 1).")
    require(not (args.task == "layout" and args.rebalance_data and args.S < args.rebalance_classes),
            f"--S {args.S} must be at least --rebalance_classes {args.rebalance_classes}: dataset "
            f"rebalancing (§5.2.4) gives every one of those classes its share of S "
            f"(or pass --rebalance_data 0).")
    require(args.distance != "official" or args.task == "sr",
            "--distance official is SRIM's distance; it exists for --task sr only.")
    require(args.distance == "pixel" or args.pretrained or args.bench,  # --bench: random VGG
            f"--distance {args.distance} needs the pretrained VGG-19: pass --pretrained 1, or use "
            f"--distance pixel.")
    require(args.size % 8 == 0, f"--size must be a multiple of 8 (got {args.size}).")
    if args.task == "layout":
        widths = parse_ints(args.crn_channels, "crn_channels")
        require(all(w >= 1 for w in widths), f"--crn_channels must be positive widths "
                                             f"(got '{args.crn_channels}').")
        require(widths and args.size % (4 * 2 ** (len(widths) - 1)) == 0,
                f"--crn_channels needs one width per module with the coarsest at 4 pixels high: "
                f"{len(widths)} modules do not fit --size {args.size}.")
    check_batch_split(args)


def parse_ints(text, flag):
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise common.UserError(f"--{flag} must be comma-separated integers "
                               f"(got '{text}').") from None


# ----------------------------------------------------------------------------------------------
# Super-resolution generator (§5.1.1, Fig. 4): ESRGAN's RRDB net with z concatenated to the input
# ----------------------------------------------------------------------------------------------

class DenseBlock(nn.Module):
    """Residual dense block (ESRGAN): 5 dense 3x3 convs, LReLU(0.2) after the first four,
    output scaled by 0.2 and added to the input."""

    def __init__(self, nf, gc):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, 1, 1)
                                   for i in range(5))
        for conv in self.convs:  # ESRGAN init: Kaiming normal x 0.1, zero bias (dense blocks)
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        feats = [x]
        for i, conv in enumerate(self.convs):
            out = conv(torch.cat(feats, 1))
            if i < 4:
                feats.append(F.leaky_relu(out, 0.2))
        return x + 0.2 * out


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, residual scaled by 0.2."""

    def __init__(self, nf, gc):
        super().__init__()
        self.blocks = nn.Sequential(*(DenseBlock(nf, gc) for _ in range(3)))

    def forward(self, x):
        return x + 0.2 * self.blocks(x)


class SRGenerator(nn.Module):
    """T(x, z): LR image x (B, 3, h, w) in [0, 1] and z (B, z_channels, h, w) -> (B, 3, 8h, 8w).

    §5.1.1: z is concatenated with x before the first layer; tanh output. The paper maps tanh to
    [0, 1]; we keep [-1, 1], the image convention of data.py (the same affine map).
    """

    def __init__(self, z_channels, nf, gc, n_blocks, in_channels=3):
        super().__init__()
        self.z_channels = z_channels
        self.upsample_mode = "nearest"  # §5.1.1: nearest early, bilinear later (set by training)
        self.fea_conv = nn.Conv2d(in_channels + z_channels, nf, 3, 1, 1)
        self.trunk = nn.Sequential(*(RRDB(nf, gc) for _ in range(n_blocks)))
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.up_convs = nn.ModuleList(nn.Conv2d(nf, nf, 3, 1, 1) for _ in range(3))  # x2 x2 x2
        self.hr_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.out_conv = nn.Conv2d(nf, in_channels, 3, 1, 1)
        # The outer convs keep PyTorch's default init (ESRGAN's RRDBNet); scaling them by 0.1 too
        # left our small CPU model predicting flat grey after 1,000 steps.
        with torch.no_grad():  # SRIM stage 2 widens the first conv with z weights ~ N(0, 0.03^2),
            self.fea_conv.weight[:, in_channels:].normal_(0.0, 0.03)  # so z starts as a nudge

    def latent_shape(self, cond):
        return (self.z_channels, cond.shape[-2], cond.shape[-1])

    def forward(self, cond, z):
        x = torch.cat([(cond + 1) / 2, z], dim=1)  # data.py's lowres is in [-1, 1]; SRIM: [0, 1]
        fea = self.fea_conv(x)
        fea = fea + self.trunk_conv(self.trunk(fea))  # long skip over the trunk
        for conv in self.up_convs:
            mode = dict(mode="bilinear", align_corners=False) \
                if self.upsample_mode == "bilinear" else dict(mode="nearest")
            fea = F.leaky_relu(conv(F.interpolate(fea, scale_factor=2, **mode)), 0.2)
        return torch.tanh(self.out_conv(F.leaky_relu(self.hr_conv(fea), 0.2)))


# ----------------------------------------------------------------------------------------------
# Layout generator (§5.2.1): cascaded refinement network (Chen & Koltun 2017) + noise encoder
# ----------------------------------------------------------------------------------------------

def conv_norm_act(cin, cout, k):
    """conv (no bias) -> layer norm over (C, H, W) with per-channel affine (slim's layer_norm,
    i.e. GroupNorm(1, C), DISL) -> LReLU(0.2)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.GroupNorm(1, cout),
                         nn.LeakyReLU(0.2))


class NoiseEncoder(nn.Module):
    """§5.2.1: a 3-layer conv net on [layout one-hot, z~] -> z' with as many channels as z~.
    DISL: conv3x3 -> LN -> LReLU, conv3x3 -> LN -> LReLU, conv1x1 (linear); trunc-normal 0.15."""

    def __init__(self, num_classes, noise_channels, width):
        super().__init__()
        self.net = nn.Sequential(conv_norm_act(num_classes + noise_channels, width, 3),
                                 conv_norm_act(width, width, 3),
                                 nn.Conv2d(width, noise_channels, 1))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=0.15, a=-0.3, b=0.3)

    def forward(self, layout, noise):
        return self.net(torch.cat([layout, noise], dim=1))


class CRN(nn.Module):
    """Refinement modules from 4 pixels high (module 0) to full resolution, each at twice the
    previous size. Module input: [previous features up x2 (bilinear, align_corners, DISL), layout
    area-resized, z' resized (bilinear)]; two conv3x3 -> LN -> LReLU; a linear 1x1 head -> RGB."""

    def __init__(self, num_classes, noise_channels, widths):
        super().__init__()
        cond = num_classes + noise_channels
        self.blocks = nn.ModuleList()
        prev = 0
        for width in widths:
            self.blocks.append(nn.Sequential(conv_norm_act(prev + cond, width, 3),
                                             conv_norm_act(width, width, 3)))
            prev = width
        self.head = nn.Conv2d(prev, 3, 1)  # linear output in [-1, 1] (DISL: no tanh)

    def forward(self, layout, noise):
        h_full, w_full = layout.shape[-2:]
        n = len(self.blocks)
        feat = None
        for k, block in enumerate(self.blocks):
            size = (h_full >> (n - 1 - k), w_full >> (n - 1 - k))
            lay = layout if k == n - 1 else F.interpolate(layout, size=size, mode="area")
            nz = noise if k == n - 1 else F.interpolate(noise, size=size, mode="bilinear",
                                                        align_corners=False)
            parts = [lay, nz]
            if feat is not None:
                parts.insert(0, F.interpolate(feat, size=size, mode="bilinear", align_corners=True))
            feat = block(torch.cat(parts, dim=1))
        return self.head(feat)


class LayoutGenerator(nn.Module):
    """T(x, z~) = CRN(x, E(x, z~)): label map (B, H, W) int -> image (B, 3, H, W).
    noise_encoder=False: T(x, z~) = CRN(x, z~), Table 2's "Ours w/o noise encoder"."""

    def __init__(self, num_classes, noise_channels, encoder_channels, widths, noise_encoder=True):
        super().__init__()
        self.num_classes, self.noise_channels = num_classes, noise_channels
        self.encoder = NoiseEncoder(num_classes, noise_channels, encoder_channels) \
            if noise_encoder else None
        self.crn = CRN(num_classes, noise_channels, widths)

    def latent_shape(self, cond):
        return (self.noise_channels, cond.shape[-2], cond.shape[-1])

    def forward(self, cond, z):
        layout = F.one_hot(cond, self.num_classes).permute(0, 3, 1, 2).float()  # (B, P, H, W)
        return self.crn(layout, z if self.encoder is None else self.encoder(layout, z))


def build_generator(args):
    if args.task == "sr":
        return SRGenerator(args.z_channels, args.nf, args.gc, args.n_blocks)
    return LayoutGenerator(args.num_classes, args.noise_channels, args.encoder_channels,
                           parse_ints(args.crn_channels, "crn_channels"), bool(args.noise_encoder))


# ----------------------------------------------------------------------------------------------
# Distance L (§3.7, Eq. 1): sum_i lambda_i || Phi_i(y~) - Phi_i(y) ||, per task (§5.1.1, §5.2.1)
# ----------------------------------------------------------------------------------------------

class Distance:
    """Per-example distances between generated images and targets, one tensor op per term.

    Terms: pixels, then VGG-19 layers, each a norm of the difference divided by the root of
    (l2) or by (l1) its number of elements (our normalisation, so that sizes do not matter).
    SR (§5.1.1, Eq. 1): l2 norms, i.e. root mean squares, of pixels and relu5_4 (a sum of norms,
    not of squared norms). SRIM code ("official"): 0.01 L1 pixels + L1 conv5_4.
    Layouts (§5.2.1, §5.2.4): L1 on pixels (DISL) and conv1_2..conv5_2, every term weighted by
    the normalised rarity mask resized to the term's resolution (area average).
    pixel (the CPU presets, both tasks): L1 of the pixels alone, weight 1.
    Weights (§3.7 "each term roughly of the same magnitude"): `calibrate` sets lambda_i =
    1 / mean of term i (see calibrate_distance for the examples it is measured on); the
    official SR weights are fixed. Targets are prepared once (`prepare`) and broadcast over
    each example's candidates.
    """

    def __init__(self, task, kind, device, vgg=None):
        self.task, self.kind = task, kind
        if kind == "pixel":
            self.layers = []
        elif task == "sr":
            self.layers = ["conv5_4"] if kind == "official" else ["relu5_4"]
        else:
            self.layers = list(LAYOUT_VGG)
        if self.layers and vgg is None:
            raise ValueError(f"--distance {kind} needs a VGG-19 (common.VGG19)")
        self.vgg = vgg if self.layers else None
        n = 1 + len(self.layers)
        self.weights = torch.tensor([0.01, 1.0] if kind == "official" else [1.0] * n,
                                    device=device)
        self.calibrated = kind != "vgg"
        self.l2 = task == "sr" and kind == "vgg"  # §5.1.1 l2 norms; else L1

    def features(self, images):
        feats = {"pixels": images}
        if self.vgg is not None:
            feats.update(self.vgg((images.float() + 1) / 2, self.layers))
        return feats

    @torch.no_grad()
    def prepare(self, target, mask=None):
        """Target features (E, ...) and the mask (E, 1, H, W) or None, computed once."""
        return {"feats": self.features(target), "mask": mask}

    def terms(self, fake, prepared):
        """(E * c, ...) candidates of E targets -> unweighted terms (E * c, n_terms)."""
        feats = self.features(fake)
        result = []
        for name, tgt in prepared["feats"].items():
            e = tgt.shape[0]
            fk = feats[name].float()
            fk = fk.view(e, -1, *fk.shape[1:])                  # (E, c, C, H, W)
            diff = fk - tgt.float().unsqueeze(1)
            diff = diff.pow(2) if self.l2 else diff.abs()
            mask = prepared["mask"]
            if mask is not None:                                # §5.2.4 loss rebalancing
                m = F.interpolate(mask, size=diff.shape[-2:], mode="area") \
                    if mask.shape[-2:] != diff.shape[-2:] else mask
                diff = diff * m.unsqueeze(1)                     # broadcast over c and channels
            term = diff.flatten(2).mean(2)                      # (E, c)
            if self.l2:  # Eq. (1): the norm itself (clamped: sqrt has no gradient at 0)
                term = term.clamp(min=1e-12).sqrt()
            result.append(term.reshape(-1))                     # (E * c,)
        return torch.stack(result, dim=1)

    def __call__(self, fake, prepared):
        return self.terms(fake, prepared) @ self.weights       # (E * c,)

    def calibrate(self, terms):
        """§3.7: lambda_i = 1 / mean(term_i) over terms (N, n_terms), so that every term starts
        at magnitude 1."""
        self.weights = 1.0 / terms.float().mean(0).clamp(min=1e-12).to(self.weights.device)
        self.calibrated = True


# ----------------------------------------------------------------------------------------------
# The nearest-sample search (Algorithm 1, inner "for i in S"): exact, chunked, memory flat in m
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def select_latents(generate, distance, cond, target, mask, m, draw, chunk, examples,
                   device, reject=0.0):
    """sigma(i) = argmin_j L(T(x_i, z_ij), y_i) over m codes per example, for all i in S.

    generate(cond, z) -> images; distance: a Distance (prepare + call); cond (N, ...),
    target (N, C, H, W), mask (N, 1, H, W) or None, on any device; draw(e0, e1, j0, j1) -> codes
    (e1 - e0, j1 - j0, *latent) of examples e0:e1, candidates j0:j1.
    Examples are processed `examples` at a time and candidates `chunk` at a time: one batched
    no-grad forward of examples * chunk samples, the distances reduced right away, and a running
    (min, argmin, code) kept per example. Nothing of size m is ever held, and the result is the
    brute-force argmin (first index among ties, as torch.argmin). reject > 0 (RS-IMLE, Vashist
    et al. 2024): candidates nearer than `reject` are skipped; an example whose candidates are all
    rejected keeps its plain nearest one (our choice).
    Returns index (N,) long, codes (N, *latent), distance (N,), all on `device`.
    """
    idx_out, z_out, d_out = [], [], []
    for e0 in range(0, cond.shape[0], examples):
        e1 = min(cond.shape[0], e0 + examples)
        c_blk = cond[e0:e1].to(device)
        prepared = distance.prepare(target[e0:e1].to(device),
                                    None if mask is None else mask[e0:e1].to(device))
        best = None  # per example: (distance, index, code), for accepted and for all candidates
        for j0 in range(0, m, chunk):
            j1 = min(m, j0 + chunk)
            z = draw(e0, e1, j0, j1)                                    # (E, c, *latent)
            images = generate(c_blk.repeat_interleave(j1 - j0, dim=0), z.flatten(0, 1))
            d = distance(images, prepared).view(e1 - e0, j1 - j0).float()  # (E, c)
            cands = [d] if reject <= 0 else [d.masked_fill(d < reject, float("inf")), d]
            best = [running_argmin(best and best[k], dk, z, j0) for k, dk in enumerate(cands)]
        d_best, i_best, z_best = best[0]
        if reject > 0:  # fall back to the plain nearest where every candidate was rejected
            keep = torch.isfinite(d_best)
            d_best = torch.where(keep, d_best, best[1][0])
            i_best = torch.where(keep, i_best, best[1][1])
            z_best = torch.where(keep.view(-1, *[1] * (z.dim() - 2)), z_best, best[1][2])
        idx_out.append(i_best)
        z_out.append(z_best)
        d_out.append(d_best)
    return torch.cat(idx_out), torch.cat(z_out), torch.cat(d_out)


def running_argmin(state, d, z, offset):
    """Merge one chunk's distances d (E, c) and codes z (E, c, ...) into (min, argmin, code).
    A strict '<' keeps the earlier chunk on ties, which is argmin's first-index rule."""
    d_min, j_min = d.min(dim=1)                                   # first minimum in the chunk
    z_min = z[torch.arange(d.shape[0], device=d.device), j_min]  # (E, *latent)
    if state is None:
        return d_min, j_min + offset, z_min
    d_old, j_old, z_old = state
    better = d_min < d_old
    shape = (-1,) + (1,) * (z_min.dim() - 1)
    return (torch.where(better, d_min, d_old), torch.where(better, j_min + offset, j_old),
            torch.where(better.view(shape), z_min, z_old))


# ----------------------------------------------------------------------------------------------
# Rarity (§5.2.4): per-class Gaussian KDE of the mean colours, scores, mask, dataset rebalancing
# ----------------------------------------------------------------------------------------------

def mean_colours(images, labels, num_classes):
    """c_k(p) (§5.2.4): mean RGB (0-255) of class p's pixels in image k, and presence.
    images (B, 3, H, W) in [-1, 1], labels (B, H, W) -> colours (B, P, 3) float64, present
    (B, P) bool, pixel counts (B, P)."""
    onehot = F.one_hot(labels, num_classes).double()                    # (B, H, W, P)
    rgb = (images.double() + 1) * 127.5                                 # 0-255 as DISL
    count = onehot.sum((1, 2))                                          # (B, P)
    colours = torch.einsum("bhwp,bchw->bpc", onehot, rgb) / count.clamp(min=1)[..., None]
    return colours, count > 0, count


def kde_density(points, queries, chunk=4096):
    """Gaussian KDE with Scott's bandwidth (scipy.stats.gaussian_kde's default): covariance of
    the points times n^(-2/(d+4)), density = mean_j N(q; p_j, cov). A ridge of 1e-6 (relative
    to the mean variance, plus 1e-9) keeps single points or flat colours finite: our choice."""
    n, d = points.shape
    cov = torch.cov(points.T).reshape(d, d) if n > 1 else torch.zeros(d, d, dtype=points.dtype)
    cov = cov * n ** (-2.0 / (d + 4))
    cov = cov + (1e-6 * cov.diagonal().mean().clamp(min=0) + 1e-9) * torch.eye(d, dtype=cov.dtype)
    chol = torch.linalg.cholesky(cov)
    white_p = torch.linalg.solve_triangular(chol, points.T, upper=False).T   # (n, d)
    norm = (2 * math.pi) ** (d / 2) * chol.diagonal().prod()
    out = []
    for q in queries.split(chunk):
        white_q = torch.linalg.solve_triangular(chol, q.T, upper=False).T
        out.append(torch.exp(-0.5 * torch.cdist(white_q, white_p).pow(2)).mean(1) / norm)
    return torch.cat(out)


def rarity_scores(colours, present, min_images=0):
    """R_p(k) = 1 / D_p(c_k(p)) where class p appears in image k, else 0 (§5.2.4).
    colours (N, P, 3), present (N, P) -> R (N, P) float64. One KDE per class (loop over P).

    A class found in <= min_images images has no KDE (a few points give a near-singular one whose
    density is huge, so its rarity would be ~0): where it appears it takes the largest score of
    the image's other classes, so the mask gives it full weight (1 where the image has no scored
    class). DISL skips such classes too (<= 67 images) but gives them 1 / (running maximum over
    the classes before it), which is ~0; we read that as a slip and follow the intent."""
    rarity = torch.zeros(present.shape, dtype=torch.float64)
    guarded = present.sum(0) <= min_images                                # (P,)
    for p in range(present.shape[1]):
        rows = present[:, p].nonzero().squeeze(1)
        if len(rows) and not guarded[p]:
            pts = colours[rows, p]
            rarity[rows, p] = 1.0 / kde_density(pts, pts).clamp(min=1e-300)
    largest = rarity.max(1).values                                       # (N,), 0: none scored
    fill = torch.where(largest > 0, largest, torch.ones_like(largest)).unsqueeze(1)
    return torch.where(present & guarded, fill, rarity)


def rarity_mask(labels, rarity_rows):
    """Normalised rarity mask (§5.2.4): M_ij = R_p(k) for the class p of pixel (i, j), divided by
    its maximum over the image, so entries lie in (0, 1]. labels (B, H, W), rarity_rows (B, P)
    -> (B, 1, H, W) float32."""
    m = torch.gather(rarity_rows, 1, labels.flatten(1)).view(labels.shape)
    return (m / m.flatten(1).max(1).values.clamp(min=1e-300).view(-1, 1, 1)).float().unsqueeze(1)


def rarity_cache_path(args, n):
    folder = args.out_dir if args.data == "shapes" else args.data_dir  # built-in: beside the run
    return os.path.join(folder, f"cimle_rarity_{args.data}_{args.size}_{n}_"
                                f"min{args.rarity_min_images}.pt")


def load_rarity(args, ds, n, rt=None):
    """Rarity scores R (n, P) and class areas (P,), computed once with a progress bar and cached
    beside the dataset (written atomically; under torchrun by rank 0 while the others wait)."""
    path = rarity_cache_path(args, n)
    if rt is not None and rt.ddp:
        if rt.is_main:
            load_rarity(args, ds, n)
        torch.distributed.barrier()
    if os.path.isfile(path):
        cached = torch.load(path, weights_only=True)
        if cached["R"].shape == (n, args.num_classes):
            return cached
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=64,
                                         num_workers=args.num_workers)
    colours, present, area = [], [], torch.zeros(args.num_classes, dtype=torch.float64)
    for batch in tqdm(loader, desc="rarity: mean colours per class", unit="batch"):
        c, p, count = mean_colours(batch["image"], batch["label"], args.num_classes)
        colours.append(c)
        present.append(p)
        area += count.sum(0)
    result = {"R": rarity_scores(torch.cat(colours), torch.cat(present), args.rarity_min_images),
              "area": area}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(result, path + ".tmp")
    os.replace(path + ".tmp", path)
    return result


def pick_subset(outer, n, args, rarity):
    """Algorithm 1 'Pick a random batch S'. Dataset rebalancing (§5.2.4): slot i of S belongs to
    the (i mod T)-th of the T classes of largest area, and draws an image with probability
    proportional to its rarity score for that class (with replacement, as DISL). Without it: a
    uniform subset without replacement. A pure function of (seed, outer), for exact resume."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + outer)
    if rarity is None or not args.rebalance_data:
        return torch.randperm(n, generator=gen)[:args.S]
    size = args.S  # with replacement: S may exceed n
    top = rarity["area"].argsort(descending=True)[:args.rebalance_classes]
    top = top[rarity["R"][:, top].sum(0) > 0]
    subset = torch.empty(size, dtype=torch.long)
    for t, p in enumerate(top.tolist()):
        count = len(range(t, size, len(top)))
        subset[t::len(top)] = torch.multinomial(rarity["R"][:, p], count, replacement=True,
                                                generator=gen)
    return subset


# ----------------------------------------------------------------------------------------------
# Algorithm 1: data of a subset, the outer step, the inner step, the training loop
# ----------------------------------------------------------------------------------------------

def load_data(args, split="train"):
    root = args.data_dir if args.data != "shapes" else None
    options = dict(stretch=True) if args.data == "folder" else {}  # §5.1.2: anisotropic scaling
    ds = data.get_dataset(args.data, root=root, split=split, size=args.size, **options)
    need = {"lowres", "image"} if args.task == "sr" else {"label", "image"}
    if not need <= ds.has:
        raise common.UserError(f"--task {args.task} needs {sorted(need)} items, and {args.data} "
                               f"gives only {sorted(ds.has)}.")
    if args.data == "folder" and not any(data.folder_split(d) == "test"
                                         for d in data.subfolders(root)):
        # §5.1.2: training and test images are disjoint. A folder without a test sub-folder
        # serves one set to both splits: its last --n_eval images are then the test split.
        held = min(args.n_eval, len(ds.records) // 2)
        if held:
            ds.records = ds.records[-held:] if split == "test" else ds.records[:-held]
    if args.task == "layout":
        args.num_classes = ds.num_classes
    return ds


def gather_items(ds, indices, args, rarity, outer=0):
    """The subset's inputs, targets and rarity masks, stacked on the CPU. The items' random
    choices (the folder set's flips) come from a stream seeded by (seed, outer), not from the
    global one: every rank, and a resumed run, holds the very targets the codes were chosen for."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, indices.tolist()),
                                         batch_size=64, num_workers=args.num_workers)
    cond, target = [], []
    with common.preserved_rng():
        torch.manual_seed(args.seed * 1_000_003 + outer + 499_979)
        for batch in loader:
            cond.append(batch["lowres"] if args.task == "sr" else batch["label"])
            target.append(batch["image"])
    cond, target = torch.cat(cond), torch.cat(target)
    mask = None
    if rarity is not None and args.rebalance_loss:
        mask = rarity_mask(cond, rarity["R"][indices])
    return cond, target, mask


def outer_schedule(it, args):
    """(number k = 1, 2, ... as Algorithm 1 counts, first step) of the outer iteration that step
    `it` belongs to; k seeds the subset S and the codes drawn for it.

    The run is cut into phases at pretrain_iters and at bilinear_from, and outer iterations
    restart at every cut. z = 0 pretraining (§5.1.1) runs in rounds of |S| / |S~| steps, each on
    a fresh subset S, so that it sweeps the whole training set as SRIM's stage 1 does (one S for
    all of it would never show the rest). IMLE outer iterations last L steps. The switch to
    bilinear up-sampling starts a fresh outer iteration, so no codes selected under one network
    train the other (SRIM's stage 3 was a new run with a new search)."""
    cuts = sorted({0} | {v for v in (args.pretrain_iters, args.bilinear_from) if v > 0})
    number = 1
    for start, end in zip(cuts, cuts[1:] + [math.inf]):
        length = max(1, args.S // args.batch_size) if start < args.pretrain_iters else args.L
        if it < end:
            k = (it - start) // length
            return number + k, start + k * length
        number += math.ceil((end - start) / length)


def new_outer(it, args):
    return outer_schedule(it, args)[1] == it


def outer_index(it, args):
    return outer_schedule(it, args)[0]


def code_stream(args, outer, example, device):
    """The random stream of example `example` of S in outer iteration `outer`: its m candidate
    codes are drawn from it in order. A function of (seed, outer, example) alone, so the codes,
    and hence the selected ones, are the same whatever the number of processes."""
    seed = ((args.seed * 1_000_003 + outer) * 1_000_033 + example) % 2 ** 63
    return torch.Generator(device).manual_seed(seed)


def outer_search(G, distance, items, outer, args, rt):
    """Algorithm 1 lines 4-8. Under torchrun each rank searches its share of S (examples r,
    r + W, ...) and the selected codes are all-gathered: every rank then holds sigma(i) for all
    of S, exactly the codes one process would have selected."""
    cond, target, mask = items
    latent = G.latent_shape(cond)
    share = torch.arange(rt.rank, len(cond), rt.world_size)
    streams = {}

    def draw(e0, e1, j0, j1):  # codes (e1 - e0, j1 - j0, *latent) of share[e0:e1]
        if j0 == 0:  # a new block of examples: fresh streams, the previous ones are done
            streams.clear()
            streams.update({e: code_stream(args, outer, int(share[e]), rt.device)
                            for e in range(e0, e1)})
        return torch.stack([torch.randn((j1 - j0, *latent), generator=streams[e],
                                        device=rt.device) for e in range(e0, e1)])

    with torch.no_grad(), rt.autocast():
        _, codes, dist = select_latents(G, distance, cond[share], target[share],
                                        None if mask is None else mask[share], args.m, draw,
                                        args.search_chunk, args.search_examples, rt.device,
                                        args.reject)
    codes, dist = codes.float(), dist.float()
    if rt.ddp:
        codes, dist = gather_shares(codes, len(cond), rt), gather_shares(dist, len(cond), rt)
    if args.perturb > 0:  # SRIM code: a small perturbation of every selected code
        gen = code_stream(args, outer, len(cond), rt.device)  # the stream after S's examples
        codes = codes + args.perturb * torch.randn(codes.shape, generator=gen, device=rt.device)
    return codes.cpu(), dist.mean().item()


@torch.no_grad()
def calibrate_distance(G, distance, items, outer, zero, args, rt):
    """§3.7 weights, set once at the run's first outer iteration: lambda_i = 1 / mean of term i
    over the first --calibrate_examples examples of S, one code each (the first of the example's
    own stream; z = 0 when the run starts with pretraining, so that pretraining and IMLE train
    one loss). The same examples on every rank, so every rank has the same weights; measured
    search_examples * search_chunk at a time, which sets the memory and not the weights."""
    cond, target, mask = items
    k, block = min(len(cond), args.calibrate_examples), args.search_examples * args.search_chunk
    terms = []
    with rt.autocast():
        for e0 in range(0, k, block):
            part = slice(e0, min(k, e0 + block))
            z = torch.stack([torch.randn(G.latent_shape(cond), device=rt.device,
                                         generator=code_stream(args, outer, i, rt.device))
                             for i in range(part.start, part.stop)])
            prepared = distance.prepare(target[part].to(rt.device),
                                        None if mask is None else mask[part].to(rt.device))
            fake = G(cond[part].to(rt.device), z.zero_() if zero else z)
            terms.append(distance.terms(fake, prepared))
    distance.calibrate(torch.cat(terms))


def gather_shares(x, n, rt):
    """Reassemble per-rank shares (rank r holds items r, r + W, ...) into the full (n, ...)."""
    per = math.ceil(n / rt.world_size)
    pad = torch.zeros((per - len(x), *x.shape[1:]), device=x.device, dtype=x.dtype)
    parts = [torch.empty((per, *x.shape[1:]), device=x.device, dtype=x.dtype)
             for _ in range(rt.world_size)]
    torch.distributed.all_gather(parts, torch.cat([x, pad]).contiguous())
    full = torch.stack(parts, dim=1).flatten(0, 1)  # interleave back to item order
    return full[:n]


def inner_step(G, distance, opt, sched, items, codes, it, args, rt):
    """Algorithm 1 lines 9-12: theta <- theta - eta grad sum_{i in S~} L(y~_i,sigma(i), y_i)/|S~|.
    The mini-batch is a pure function of (seed, it); under DDP each rank takes its slice."""
    cond, target, mask = items
    gen = torch.Generator().manual_seed(args.seed * 15_485_863 + it)
    pick = torch.randperm(len(cond), generator=gen)[:args.batch_size]
    share = args.batch_size // rt.world_size  # divisible: check_batch_split
    pick = pick[rt.rank * share:(rt.rank + 1) * share]
    z = codes[pick].to(rt.device)
    if it < args.pretrain_iters:
        z = torch.zeros_like(z)  # §5.1.1: deterministic pretraining with z = 0
    with rt.autocast():
        prepared = distance.prepare(target[pick].to(rt.device),
                                    None if mask is None else mask[pick].to(rt.device))
        loss = distance(G(cond[pick].to(rt.device), z), prepared).mean()
    opt.zero_grad(set_to_none=True)
    rt.scaler.scale(loss).backward()
    rt.scaler.step(opt)
    rt.scaler.update()
    sched.step()
    return loss.item()


def make_distance(args, device):
    vgg = None
    if args.distance != "pixel":  # --pretrained 0 only under --bench: the same cost, offline
        vgg = common.VGG19(pretrained=bool(args.pretrained)).to(device).eval()
        vgg.requires_grad_(False)
    return Distance(args.task, args.distance, device, vgg)


def make_optimiser(G, args):
    opt = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.9, 0.999))  # SRIM / DISL: Adam
    milestones = parse_ints(args.lr_milestones, "lr_milestones")
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, args.lr_gamma)


def train(args):
    rt = common.setup_runtime(args)
    ds = load_data(args)
    n = len(ds) if not args.n_train else min(args.n_train, len(ds))
    G = build_generator(args).to(rt.device)
    opt, sched = make_optimiser(G, args)
    distance = make_distance(args, rt.device)
    rarity = load_rarity(args, ds, n, rt) if args.task == "layout" and (
        args.rebalance_data or args.rebalance_loss) else None
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    objects = dict(G=G, opt=opt, sched=sched, scaler=rt.scaler)
    start, subset, codes, items = 0, None, None, None
    if args.resume:
        ck = common.load_checkpoint(ckpt_path, "cimle", vars(args), ARCH_KEYS, objects, rt=rt)
        start, extra = ck["iter"], ck["extra"]
        distance.weights = extra["distance_weights"].to(rt.device)
        distance.calibrated = bool(extra["calibrated"])
        if extra["subset"] is not None and not new_outer(start, args):
            subset, codes = extra["subset"], extra["codes"]
            items = gather_items(ds, subset, args, rarity, outer_index(start, args))
    Gw = common.prepare_model(G, rt, args.compile)
    log = common.Logger(args.out_dir, args.iters, start, rt.is_main)
    fixed = fixed_examples(ds, args)
    losses, search = [], {}
    with common.StopSignals() as signals:
        for it in range(start, args.iters):
            G.upsample_mode = "bilinear" if it >= args.bilinear_from > 0 else "nearest"
            if new_outer(it, args):  # Algorithm 1: pick S, then search sigma(i) for every i in S
                outer = outer_index(it, args)
                subset = pick_subset(outer, n, args, rarity)
                items = gather_items(ds, subset, args, rarity, outer)
                if not distance.calibrated:
                    calibrate_distance(G, distance, items, outer, it < args.pretrain_iters, args,
                                       rt)
                if it < args.pretrain_iters:
                    codes = torch.zeros(len(subset), *G.latent_shape(items[0]))
                else:
                    t0 = time.perf_counter()
                    G.eval()
                    codes, sel = outer_search(G, distance, items, outer, args, rt)
                    G.train()
                    search = dict(selected_distance=sel, search_s=time.perf_counter() - t0)
            losses.append(inner_step(Gw, distance, opt, sched, items, codes, it, args, rt))
            log.step(args.batch_size)
            done = it + 1
            if done % args.log_every == 0 or done == args.iters:
                log.log(done, loss=common.reduce_mean(np.mean(losses), rt),
                        lr=sched.get_last_lr()[0], **search)
                losses, search = [], {}
            if rt.is_main and (done % args.sample_every == 0 or done == args.iters):
                with common.preserved_rng():  # grids must not move the training RNG
                    G.eval()
                    samples_grid(G, fixed, args, rt.device,
                                 os.path.join(args.out_dir, f"samples_{done:06d}.png"), ds.palette
                                 if args.task == "layout" else None)
                    G.train()
            signals.end_of_step(rt, args, done, ckpt_path, lambda: common.save_checkpoint(
                ckpt_path, "cimle", args, done, objects, rt=rt,  # with the outer iteration's state
                extra=dict(subset=subset, codes=codes, distance_weights=distance.weights.cpu(),
                           calibrated=distance.calibrated)))
    log.close()


# ----------------------------------------------------------------------------------------------
# Sampling controls (--sample): many samples per input (Fig. 1, 19), latent interpolation
# (Fig. 11, 16), one latent on several layouts (Fig. 12)
# ----------------------------------------------------------------------------------------------

def fixed_examples(ds, args, n=4):
    items = [ds[i] for i in range(min(n, len(ds)))]
    cond = torch.stack([it["lowres"] if args.task == "sr" else it["label"] for it in items])
    return cond, torch.stack([it["image"] for it in items])


@torch.no_grad()
def generate_samples(G, cond, k, device, seed=0, zero=False):
    """k samples per input: (N, k, 3, H, W) on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    shape = G.latent_shape(cond)
    z = torch.randn((len(cond), k, *shape), generator=gen)
    if zero:
        z.zero_()
    out = []
    for i in range(len(cond)):
        out.append(G(cond[i:i + 1].to(device).repeat_interleave(k, 0), z[i].to(device)).cpu())
    return torch.stack(out).clamp(-1, 1)


@torch.no_grad()
def interpolate_latents(G, cond, za, zb, frames=8):
    """Fig. 11 / 16: one input cond (1, ...) decoded along the line from code za to code zb:
    (frames, 3, H, W) on the CPU, frame 0 at za, the last at zb."""
    t = torch.linspace(0, 1, frames, device=za.device).view(-1, *[1] * za.dim())
    z = (1 - t) * za + t * zb                                   # (frames, *latent)
    return G(cond.expand(frames, *cond.shape[1:]), z).clamp(-1, 1).cpu()


@torch.no_grad()
def one_latent_many_inputs(G, cond, z):
    """Fig. 12: the one code z applied to every input of cond (N, ...): (N, 3, H, W), CPU."""
    device = z.device
    return G(cond.to(device), z.expand(len(cond), *z.shape).contiguous()).clamp(-1, 1).cpu()


def samples_grid(G, fixed, args, device, path, palette, k=6):
    """Row per input: input, ground truth, z = 0 output, k samples."""
    cond, target = fixed
    samples = generate_samples(G, cond, k, device)
    zero = generate_samples(G, cond, 1, device, zero=True)
    rows = [[cond[i], target[i], zero[i, 0]] + list(samples[i])
            for i in range(len(cond))]
    common.save_grid(path, rows, palette)


@torch.no_grad()
def sample(args):
    device = common.pick_device(args.device)
    G, ds, _ = load_model(args, device)
    test = load_data(args, "test")
    out = args.out_dir
    palette = ds.palette if args.task == "layout" else None
    cond, target = fixed_examples(test, args, n=6)
    many = generate_samples(G, cond, 12, device, seed=1)  # Fig. 1 / 19: many samples per input
    common.save_grid(os.path.join(out, "many_samples.png"),
                     [[cond[i], target[i]] + list(many[i]) for i in range(len(cond))], palette)
    gen = torch.Generator().manual_seed(2)
    shape = G.latent_shape(cond)
    rows = []
    for i in range(min(3, len(cond))):  # Fig. 11 / 16: 8 frames from one code to another
        za, zb = torch.randn((2, *shape), generator=gen).to(device)
        rows.append([cond[i]] + list(interpolate_latents(G, cond[i:i + 1].to(device), za, zb)))
    common.save_grid(os.path.join(out, "interpolation.png"), rows, palette)
    rows = [[torch.zeros_like(target[0])] + [c for c in cond]]
    for _ in range(3):  # Fig. 12: one code on every input (style consistency)
        z = torch.randn(shape, generator=gen).to(device)
        rows.append([torch.zeros_like(target[0])] + list(one_latent_many_inputs(G, cond, z)))
    common.save_grid(os.path.join(out, "one_latent_many_inputs.png"), rows, palette)
    print(f"wrote many_samples.png, interpolation.png, one_latent_many_inputs.png into {out}")


def load_model(args, device):
    """The trained generator (its up-sampling mode as at the last step), the training set, and
    whether the run never left z = 0 pretraining (the regression baseline, sampled with z = 0)."""
    ds = load_data(args)
    G = build_generator(args).to(device)
    ck = common.load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), "cimle", vars(args),
                                ARCH_KEYS, {"G": G}, restore_rng=False)
    trained = ck["config"]
    G.upsample_mode = "bilinear" if ck["iter"] > trained["bilinear_from"] > 0 else "nearest"
    return G.eval(), ds, ck["iter"] <= trained["pretrain_iters"]


# ----------------------------------------------------------------------------------------------
# Evaluation (--eval)
# ----------------------------------------------------------------------------------------------

def faithfulness_weighted_variance(samples, truth, d, sigmas=(0.3, 0.2, 0.15)):
    """§5.1.5: M = sum_i sum_j w_ij d(y~_ij, ybar_j), w_ij = exp(-d(y~_ij, y_j) / (2 sigma^2)).

    samples (J, I, C, H, W): I samples for each of J inputs; truth (J, C, H, W); d(a, b) -> (N,)
    (LPIPS in the paper; the kernel takes the distance itself, not its square). ybar_j is the
    pixel mean of input j's samples. We report the mean over i and j (the paper's "average"; its
    normalisation is not stated: our choice). Returns {sigma: M}.
    """
    J, I = samples.shape[:2]
    flat = samples.flatten(0, 1)
    mean = samples.mean(1, keepdim=True).expand_as(samples).flatten(0, 1)
    to_mean = d(flat, mean).view(J, I)
    to_truth = d(flat, truth.unsqueeze(1).expand_as(samples).flatten(0, 1)).view(J, I)
    return {s: float((torch.exp(-to_truth / (2 * s * s)) * to_mean).mean()) for s in sigmas}


def make_metric_distance(args, device):
    """LPIPS (pretrained; --lpips_net alex, the package default, or vgg, which the authors'
    evaluation script passes; the paper does not say) or, without pretrained weights, mean
    absolute pixel difference / 2 as a stand-in (named so in eval.json)."""
    if args.pretrained:
        lp = common.LPIPS(net=args.lpips_net, pretrained=True).to(device).eval()
        return "lpips", lambda a, b: torch.cat([lp(x.to(device), y.to(device)).flatten().cpu()
                                                for x, y in zip(a.split(64), b.split(64))])
    return "pixel_l1", lambda a, b: (a - b).abs().flatten(1).mean(1) / 2


def eval_stream(G, test, n, k, args, device, zero_z=False):
    """Per test input, in order: (item, cond (1, ...), samples (k, 3, H, W), zero (3, H, W)) on
    the CPU, the k samples generated search_examples * search_chunk at a time (the no-grad
    forward size the search already uses). One input's samples are held at a time."""
    gen = torch.Generator().manual_seed(3)
    chunk = args.search_examples * args.search_chunk
    for i in range(n):
        item = test[i]
        cond = (item["lowres"] if args.task == "sr" else item["label"]).unsqueeze(0)
        z = torch.randn((k, *G.latent_shape(cond)), generator=gen)
        if zero_z:
            z.zero_()
        c = cond.to(device)
        samples = torch.cat([G(c.expand(len(zc), *c.shape[1:]), zc.to(device)).cpu()
                             for zc in z.split(chunk)]).clamp(-1, 1)
        zero = G(c, torch.zeros_like(z[:1]).to(device))[0].cpu().clamp(-1, 1)
        yield item, cond, samples, zero


class Sums:
    """Running sums and counts of named metrics: add(name, sum, count), mean(name)."""

    def __init__(self):
        self.total, self.count = {}, {}

    def add(self, name, value, count=1):
        self.total[name] = self.total.get(name, 0.0) + float(value)
        self.count[name] = self.count.get(name, 0) + count

    def mean(self, name):
        return self.total[name] / self.count[name] if self.count.get(name) else float("nan")


@torch.no_grad()
def evaluate(args):
    """The metrics of §5.1.5 and §5.2.6, streamed: each test input's k samples are generated,
    measured into running sums and dropped, so memory is set by one input's samples, not by
    --n_eval. The metric network (LPIPS) is loaded once."""
    device = common.pick_device(args.device)
    G, _, regression = load_model(args, device)  # the z = 0 baseline is sampled as trained
    test = load_data(args, "test")
    n, k = min(args.n_eval, len(test)), args.eval_samples
    name, d = make_metric_distance(args, device)
    sums = Sums()
    shapes = data.ShapesCimleScores() if args.data == "shapes" else None
    for item, cond, samples, zero in tqdm(eval_stream(G, test, n, k, args, device, regression),
                                          total=n, desc="eval", unit="input"):
        truth = item["image"].unsqueeze(0)
        # §5.2.6: k // 2 disjoint pairs of samples per input (40 pairs of 80 in the paper)
        sums.add("diversity", common.lpips_diversity(d, [samples], pairs="consecutive"))
        sums.add("to_truth", d(samples, truth.expand_as(samples)).sum(), k)
        sums.add("zero_to_truth", d(zero.unsqueeze(0), truth).sum())
        for sigma, value in faithfulness_weighted_variance(samples.unsqueeze(0), truth, d).items():
            sums.add(f"fwv_{sigma}", value)  # a mean over this input's k samples
        if args.task == "sr":  # consistency: the 8x box-downsampled output against the input
            sums.add("lr_l1", (F.avg_pool2d(samples, 8) - cond).abs().mean() / 2)
        if shapes is not None:
            shapes.add(samples, zero, item)
    result = {"task": args.task, "data": args.data, "n_inputs": n, "samples_per_input": k,
              "z": "zero (z = 0 regression baseline)" if regression else "N(0, I)",
              "metric_distance": name, f"diversity_{name}": sums.mean("diversity"),
              f"distance_to_truth_{name}": sums.mean("to_truth"),
              f"zero_z_distance_to_truth_{name}": sums.mean("zero_to_truth"),
              "faithfulness_weighted_variance": {
                  str(s): sums.mean(f"fwv_{s}") for s in (0.3, 0.2, 0.15)}}
    if name == "lpips":
        result["lpips_net"] = args.lpips_net
    if args.task == "sr":
        result["lr_consistency_l1"] = sums.mean("lr_l1")
    if shapes is not None:
        result.update(shapes.result())
    with open(os.path.join(args.out_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# Benchmark (--bench N): inner steps, and select_latents against materialise-all; dry run
# ----------------------------------------------------------------------------------------------

class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage created inside the block (CPU and GPU alike): every op's
    outputs are counted when created and released when their storage is freed."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.sizes = 0, 0, {}

    def _free(self, ptr):
        self.live -= self.sizes.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self.sizes:
                    self.sizes[ptr] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, ptr)
        return out


@torch.no_grad()
def select_latents_naive(generate, distance, cond, target, mask, m, draw, examples, device):
    """Baseline for the benchmark and the tests: materialise all m samples, then argmin."""
    idx_out, z_out = [], []
    for e0 in range(0, cond.shape[0], examples):
        e1 = min(cond.shape[0], e0 + examples)
        c_blk = cond[e0:e1].to(device)
        z = draw(e0, e1, 0, m)
        images = generate(c_blk.repeat_interleave(m, dim=0), z.flatten(0, 1))  # all E * m
        prepared = distance.prepare(target[e0:e1].to(device),
                                    None if mask is None else mask[e0:e1].to(device))
        d = distance(images, prepared).view(e1 - e0, m)
        j = d.argmin(dim=1)
        idx_out.append(j)
        z_out.append(z[torch.arange(e1 - e0, device=z.device), j])
    return torch.cat(idx_out), torch.cat(z_out)


def bench_inputs(args, n, device):
    """Random inputs, targets, rarity-like masks and codes of n examples at the preset's size,
    without dataset files."""
    if args.task == "layout":
        args.num_classes = preset_num_classes(args)
    h = args.size
    w = 2 * h if args.data in ("gta5", "cityscapes") else h
    gen = torch.Generator().manual_seed(0)
    if args.task == "sr":
        cond = torch.rand((n, 3, h // 8, w // 8), generator=gen) * 2 - 1
    else:
        cond = torch.randint(0, args.num_classes, (n, h, w), generator=gen)
    target = torch.rand((n, 3, h, w), generator=gen) * 2 - 1
    mask = torch.rand((n, 1, h, w), generator=gen) * 0.9 + 0.1 \
        if args.task == "layout" and args.rebalance_loss else None
    return cond, target, mask


def bench(args, reps=3):
    """--bench N: (1) N inner steps (Algorithm 1 lines 9-12: forward, distance, backward, Adam)
    on one fixed mini-batch through common.bench_training: float32 eager, then --dtype /
    --compile; (2) select_latents against select_latents_naive at |S| = --S, m = --m under
    --dtype. Writes both into --out_dir/bench.json. --pretrained 0 times a random-weight VGG-19
    (the same cost as the pretrained one), so it runs offline."""
    rt = common.setup_runtime(args)
    cond, target, mask = bench_inputs(args, args.S, torch.device("cpu"))
    codes = torch.randn((args.S, *build_generator(args).latent_shape(cond)),
                        generator=torch.Generator().manual_seed(1))

    def make_step(run, compile_model):
        G = build_generator(args).to(rt.device)
        Gw = common.prepare_model(G, run, compile_model, ddp=False)
        opt, sched = make_optimiser(G, args)
        distance = make_distance(args, rt.device)
        it = args.pretrain_iters  # an IMLE step (z used); a fixed it draws one fixed mini-batch
        return lambda: inner_step(Gw, distance, opt, sched, (cond, target, mask), codes, it,
                                  args, run)

    result = {"training": common.bench_training(args, rt, make_step),
              "search": bench_search(args, rt, (cond, target, mask), reps)}
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["search"]))
    return result


def bench_search(args, rt, items, reps):
    """select_latents vs select_latents_naive on the same codes, with this preset's generator.
    Time: the best of `reps` alternating runs (other load on the machine hits both alike); peak
    memory: a separate run (CUDA allocator stats, or PeakMemory on the CPU); overhead: the share
    of the search's time not spent in the bare generator forwards of the same chunks."""
    device = rt.device
    torch.manual_seed(args.seed)
    G = build_generator(args).to(device).eval()
    distance = make_distance(args, device)
    cond, target, mask = items
    table = torch.randn((args.S, args.m, *G.latent_shape(cond)),
                        generator=torch.Generator().manual_seed(0))  # on the CPU

    def draw(e0, e1, j0, j1):
        return table[e0:e1, j0:j1].to(device)

    E, chunk = args.search_examples, args.search_chunk

    def fast():
        with rt.autocast():
            return select_latents(G, distance, cond, target, mask, args.m, draw, chunk, E, device)

    def naive():
        with rt.autocast():
            return select_latents_naive(G, distance, cond, target, mask, args.m, draw, E, device)

    @torch.no_grad()
    def forwards_only():
        with rt.autocast():
            for e0 in range(0, args.S, E):
                e1 = min(args.S, e0 + E)
                c_blk = cond[e0:e1].to(device)
                for j0 in range(0, args.m, chunk):
                    j1 = min(args.m, j0 + chunk)
                    G(c_blk.repeat_interleave(j1 - j0, 0), draw(e0, e1, j0, j1).flatten(0, 1))

    def timed(fn):
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    def peak(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        with PeakMemory() as pm:
            fn()
        return pm.peak

    times = {"select_latents": [], "naive": [], "forwards_only": []}
    for _ in range(reps):
        chunked, t = timed(fast)
        times["select_latents"].append(t)
        naive_out, t = timed(naive)
        times["naive"].append(t)
        times["forwards_only"].append(timed(forwards_only)[1])
    best = {k: min(v) for k, v in times.items()}
    peaks = {"select_latents": peak(fast), "naive": peak(naive)}
    return {"device": str(device), "dtype": args.dtype, "task": args.task, "data": args.data,
            "S": args.S, "m": args.m, "chunk": chunk, "examples": E, "distance": args.distance,
            "same_indices": bool(torch.equal(chunked[0].cpu(), naive_out[0].cpu())),
            "time_s": {k: round(v, 3) for k, v in best.items()}, "peak_bytes": peaks,
            "time_ratio_naive_over_select": round(best["naive"] / best["select_latents"], 3),
            "peak_ratio_naive_over_select": round(peaks["naive"] /
                                                  max(peaks["select_latents"], 1), 3),
            "fraction_outside_generator": round(
                max(best["select_latents"] - best["forwards_only"], 0.0)
                / best["select_latents"], 4)}



def preset_num_classes(args):
    """Label classes of --data without reading it (--bench, --dry_run)."""
    return {"gta5": 20, "cityscapes": 35}.get(args.data, len(data.SHAPES_CLASSES))


def dry_run(args):
    """Parameter counts (no data touched, no memory: built on the meta device) against the
    official networks' sizes (counted from the official code)."""
    with torch.device("meta"):
        if args.task == "layout":
            args.num_classes = preset_num_classes(args)
            G = build_generator(args)
            nets = {"G": G.crn} if G.encoder is None else {"G": G.crn, "E": G.encoder}
        else:
            nets = {"G": build_generator(args)}
    for name, net in nets.items():
        ref = REFERENCE_PARAMS[args.task][name]
        count = common.count_params(net)
        print(f"{name}: {count:,} parameters; official network ~{ref / 1e6:.2f}M "
              f"(ratio {count / ref:.4f})")
    common.print_dry_run(nets)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse(argv)
    return common.dispatch(args, dry_run, bench, sample, evaluate, train)


if __name__ == "__main__":
    common.run_main(main)
