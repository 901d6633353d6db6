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
                           network + noise encoder for layouts (§5.2.1); Table 2's "CRN" baseline
                           (K images per layout)
    distance (§3.7)        weighted pixel + VGG-19 feature distances, masked for layouts (§5.2.4);
                           the CRN baseline's class-wise hindsight loss
    select_latents         the nearest-sample search: chunked, no_grad, running argmin (exact)
    rarity (§5.2.4)        per-class KDE of mean colours, rarity scores, dataset and loss
                           rebalancing; cached beside the dataset
    Algorithm 1            the schedule of outer iterations (z = 0 pretraining rounds, IMLE
                           rounds), subset -> search -> L inner steps on S held on the device with
                           its targets' features; the training loop
    several GPUs           torchrun: each rank searches its share of S (codes drawn per example,
                           so the same as one process's) and the selected codes are all-gathered;
                           the inner steps' |S~| = --batch_size is global, |S~| / world per rank
    released weights       --init_from: SRIM's released generators (niopeng/SRIM-pytorch),
                           recognised by their keys, converted in memory, loaded strictly
    sampling controls      many samples per input, latent interpolation, one latent on many inputs
    evaluation (streamed)  faithfulness-weighted variance (§5.1.5), LPIPS diversity (§5.2.6),
                           the shapes scores of data.py, summed input by input
    benchmark, dry run     training steps (common.bench_training), one outer iteration (search vs
                           inner steps) and select_latents vs the naive search in one bench.json;
                           parameter counts
    main

    python cimle.py                                   # layouts on built-in shapes, CPU ~5 min
    python cimle.py --pretrain_iters 1000 --out_dir out/cimle-shapes-z0  # the same net, z = 0
    python cimle.py --baseline crn --rebalance_data 0 --out_dir out/cimle-crn  # Table 2's CRN
    python cimle.py --task sr --out_dir out/cimle-sr  # x8 SR on shapes (stripes are ambiguous)
    python cimle.py --sample                          # grids from out/cimle-shapes/ckpt.pt
    python cimle.py --eval                            # metrics -> out/cimle-shapes/eval.json
    python cimle.py --bench 20                        # inner steps and the search -> bench.json
    python cimle.py --data folder --data_dir data/imagenet_cicada   # SRIM, paper scale
    python cimle.py --data gta5                       # layouts, paper scale (256x512)
    python cimle.py --data gta5 --dry_run             # parameter counts vs the official nets
    python cimle.py --data folder --data_dir data/imagenet_cicada --sample \
        --init_from code_81_480000_G.pth          # the authors' released generator
    torchrun --nproc_per_node=2 cimle.py --data folder --data_dir data/imagenet_cicada  # |S~| 4
"""

import json
import math
import os
import pickle
import re
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
    pretrain_iters=150_000,   # §5.1.1: z = 0 pretraining; SRIM stage 1: 150k iterations (at lr
                              # 2e-4, batch 8, halved at 50k/100k, then a fresh Adam; here the
                              # IMLE stage's lr, batch and Adam throughout: our simplification)
    bilinear_from=450_000,    # §5.1.1: nearest early, bilinear later (SRIM stage 3); when: ours
                              # (a fresh outer iteration starts there: see outer_schedule)
    iters=750_000,            # IMLE outer iterations from 150k, 350k, 450k (bilinear), 650k
                              # (paper: K not given)
    n_train=1280,             # §5.1.4: 1,280 training images
    distance="vgg",           # §5.1.1, Eq. (1): l2 norms of pixels and VGG-19 relu5_4
    calibrate_examples=64,    # §3.7 weights from 64 examples of the first S (our choice)
    perturb=0.0, reject=0.0,  # off: official-code perturbation (0.1) / RS-IMLE rejection
    search_examples=1, search_chunk=0,  # our choice: candidates per chunk from free memory
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
    search_examples=1, search_chunk=0,  # our choice: candidates per chunk from free memory
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
             "noise_channels", "encoder_channels", "noise_encoder", "num_classes", "distance",
             "baseline", "crn_images", "layout_vgg")
# §5.2.1: "the activations" of conv1_2 .. conv5_2. DISL takes them from MatConvNet's VGG-19,
# after the ReLU and with average pooling (--layout_vgg matconvnet, the default); torchvision's
# names for those taps are relu*_2. --layout_vgg torchvision: the pre-ReLU, max-pooled ones.
LAYOUT_VGG = {"matconvnet": ["relu1_2", "relu2_2", "relu3_2", "relu4_2", "relu5_2"],
              "torchvision": ["conv1_2", "conv2_2", "conv3_2", "conv4_2", "conv5_2"]}
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
    a("--search_chunk", type=int, default=None,
      help="candidates per example per search chunk (0: from free GPU memory, all m where they "
           "fit; 10 on a CPU)")
    a("--search_dtype", default=None, choices=["float32", "bfloat16", "float16"],
      help="autocast dtype of the nearest-sample search (default: --dtype)")
    a("--z_channels", type=int, default=None, help="SR: latent channels at LR resolution")
    a("--nf", type=int, default=None, help="SR: RRDB feature channels")
    a("--gc", type=int, default=None, help="SR: RRDB growth channels")
    a("--n_blocks", type=int, default=None, help="SR: number of RRDBs")
    a("--crn_channels", default=None, help="layout: CRN widths, coarsest module first")
    a("--noise_channels", type=int, default=None, help="layout: channels of z~ and z'")
    a("--encoder_channels", type=int, default=None, help="layout: noise encoder width")
    a("--noise_encoder", type=int, default=None, choices=[0, 1],
      help="layout: 1 = z' = E(x, z~) (§5.2.1); 0 = z~ fed to the CRN (Table 2 ablation)")
    a("--baseline", default="none", choices=["none", "crn", "crn_noise"],
      help="layout, Table 2's baselines on our CRN: crn = Chen & Koltun's CRN with --crn_images "
           "images per layout and their class-wise hindsight loss (§5.2.3), no noise input; "
           "crn_noise = the CRN with a noise input trained with the plain loss on a fresh code "
           "every step, no search (with --noise_encoder 0: the noise goes to the CRN itself)")
    a("--crn_images", type=int, default=9, help="--baseline crn: images per layout (§5.2.3: 9)")
    a("--layout_vgg", default="matconvnet", choices=["matconvnet", "torchvision"],
      help="layout distance features: matconvnet = post-ReLU taps with average pooling (DISL's "
           "MatConvNet VGG-19); torchvision = pre-ReLU taps with max pooling")
    a("--reinit_encoder_at", type=int, default=0,
      help="layout: at this step re-initialise the noise encoder and restart Adam (DISL does so "
           "after outer iteration 5, i.e. 50000; not in the paper; 0: never)")
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
    a("--init_last_act", default=None, choices=["sigmoid", "tanh"],
      help="--init_from: the output activation the released file was trained with (default: "
           "sigmoid with z, as SRIM's stage-2 config; tanh without, as its stage-1 config)")
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
    if known.init_from and not known.resume:  # the file's widths replace the presets' (with
        presets = released_presets(known, presets)  # --resume, common refuses the pair)
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
    common.require_one_process_for_outputs(args)
    require(args.task in TASKS[args.data], f"--task {args.task} is not available on --data "
            f"{args.data}; it supports: {', '.join(TASKS[args.data])}.")
    common.at_least(args, 1, "S", "L", "search_examples", "z_channels", "nf",
                    "gc", "n_blocks", "noise_channels", "encoder_channels", "rebalance_classes",
                    "n_eval", "calibrate_examples", "bench", "crn_images")
    require(args.m >= 1, f"--m (--candidates), the latent codes drawn per example, must be at "
                         f"least 1 (got {args.m}).")
    common.at_least(args, 0, "pretrain_iters", "bilinear_from", "n_train", "perturb", "reject",
                    "rarity_min_images", "search_chunk", "reinit_encoder_at")
    require(args.baseline == "none" or args.task == "layout",
            f"--baseline {args.baseline} is one of Table 2's layout baselines; it exists for "
            f"--task layout only.")
    require(not args.reinit_encoder_at or (args.task == "layout" and args.noise_encoder
                                           and args.baseline == "none"),
            "--reinit_encoder_at re-initialises the noise encoder of --task layout; it needs "
            "--noise_encoder 1 and no --baseline.")
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
    area-resized, z' resized (bilinear)]; two conv3x3 -> LN -> LReLU; a linear 1x1 head -> RGB
    (3 * images channels: `images` RGB images per layout, Chen & Koltun's variant of §5.2.3;
    noise_channels = 0: no noise input)."""

    def __init__(self, num_classes, noise_channels, widths, images=1):
        super().__init__()
        cond = num_classes + noise_channels
        self.blocks = nn.ModuleList()
        prev = 0
        for width in widths:
            self.blocks.append(nn.Sequential(conv_norm_act(prev + cond, width, 3),
                                             conv_norm_act(width, width, 3)))
            prev = width
        self.head = nn.Conv2d(prev, 3 * images, 1)  # linear output in [-1, 1] (DISL: no tanh)

    def forward(self, layout, noise=None):
        h_full, w_full = layout.shape[-2:]
        n = len(self.blocks)
        feat = None
        for k, block in enumerate(self.blocks):
            size = (h_full >> (n - 1 - k), w_full >> (n - 1 - k))
            lay = layout if k == n - 1 else F.interpolate(layout, size=size, mode="area")
            parts = [lay]
            if noise is not None:
                parts.append(noise if k == n - 1 else F.interpolate(
                    noise, size=size, mode="bilinear", align_corners=False))
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


class MultiImageCRN(nn.Module):
    """Table 2's "CRN" (§5.2.3): Chen & Koltun's CRN (Photographic Image Synthesis with Cascaded
    Refinement Networks, ICCV 2017, arXiv:1707.09405, §3.5) that outputs K images per layout
    (K = 9 in the paper) from the layout alone, trained with their class-wise hindsight loss
    (Distance.hindsight). forward(cond, None): all K images (B, K, 3, H, W). forward(cond, z):
    one sample, image floor(K Phi(z)) for a code z (B, 1, 1, 1) ~ N(0, 1), i.e. one of the K
    uniformly, so that sampling and evaluation draw codes as they do for cIMLE."""

    def __init__(self, num_classes, widths, images):
        super().__init__()
        self.num_classes, self.images = num_classes, images
        self.crn = CRN(num_classes, 0, widths, images)

    def latent_shape(self, cond):
        return (1, 1, 1)

    def forward(self, cond, z=None):
        layout = F.one_hot(cond, self.num_classes).permute(0, 3, 1, 2).float()  # (B, P, H, W)
        out = self.crn(layout)
        out = out.view(out.shape[0], self.images, 3, *out.shape[-2:])         # (B, K, 3, H, W)
        if z is None:
            return out
        uniform = 0.5 * (1 + torch.erf(z.flatten(1)[:, 0].float() / math.sqrt(2)))  # Phi(z)
        pick = (uniform * self.images).long().clamp(0, self.images - 1)
        return out[torch.arange(len(out), device=out.device), pick]


def build_generator(args):
    if args.task == "sr":
        return SRGenerator(args.z_channels, args.nf, args.gc, args.n_blocks)
    if args.baseline == "crn":
        return MultiImageCRN(args.num_classes, parse_ints(args.crn_channels, "crn_channels"),
                             args.crn_images)
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
    not of squared norms). SRIM code ("official"): 0.01 L1 pixels (in [0, 1]) + L1 conv5_4.
    Layouts (§5.2.1, §5.2.4): L1 on pixels (DISL) and conv1_2..conv5_2 (LAYOUT_VGG[layout_vgg];
    the VGG's pooling must match: make_distance), every term weighted by the normalised rarity
    mask resized to the term's resolution (area average).
    pixel (the CPU presets, both tasks): L1 of the pixels alone, weight 1.
    Weights (§3.7 "each term roughly of the same magnitude"): `calibrate` sets lambda_i =
    1 / mean of term i (see calibrate_distance for the examples it is measured on); the
    official SR weights are fixed. Targets are prepared once (`prepare`) and broadcast over
    each example's candidates.
    """

    def __init__(self, task, kind, device, vgg=None, layout_vgg="matconvnet"):
        self.task, self.kind = task, kind
        if kind == "pixel":
            self.layers = []
        elif task == "sr":
            self.layers = ["conv5_4"] if kind == "official" else ["relu5_4"]
        else:
            self.layers = list(LAYOUT_VGG[layout_vgg])
        if self.layers and vgg is None:
            raise ValueError(f"--distance {kind} needs a VGG-19 (common.VGG19)")
        self.vgg = vgg if self.layers else None
        n = 1 + len(self.layers)
        # official: SRIM's 0.01 x L1 of pixels in [0, 1] is 0.005 x L1 of ours in [-1, 1]
        self.weights = torch.tensor([0.005, 1.0] if kind == "official" else [1.0] * n,
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

    def differences(self, fake, prepared):
        """Per term: |Phi_i(y~) - Phi_i(y)| (squared for l2), (E, c, C, h, w), for (E * c, ...)
        candidates of E targets."""
        feats = self.features(fake)
        for name, tgt in prepared["feats"].items():
            fk = feats[name].float()
            diff = fk.view(tgt.shape[0], -1, *fk.shape[1:]) - tgt.float().unsqueeze(1)
            yield diff.pow(2) if self.l2 else diff.abs()

    def terms(self, fake, prepared):
        """(E * c, ...) candidates of E targets -> unweighted terms (E * c, n_terms)."""
        result = []
        for diff in self.differences(fake, prepared):
            if prepared["mask"] is not None:                    # §5.2.4 loss rebalancing
                diff = diff * resized(prepared["mask"], diff.shape[-2:]).unsqueeze(1)
            term = diff.flatten(2).mean(2)                      # (E, c)
            if self.l2:  # Eq. (1): the norm itself (clamped: sqrt has no gradient at 0)
                term = term.clamp(min=1e-12).sqrt()
            result.append(term.reshape(-1))                     # (E * c,)
        return torch.stack(result, dim=1)

    def __call__(self, fake, prepared):
        return self.terms(fake, prepared) @ self.weights       # (E * c,)

    def hindsight(self, images, prepared, classes):
        """Chen & Koltun's class-wise hindsight loss (ICCV 2017, §3.5) for the "CRN" baseline:
        sum_p min_u sum_i lambda_i || L_p ∘ (Phi_i(y) - Phi_i(g_u(x))) ||_1 over the K images
        g_u, with L_p class p's pixels (area-resized to each term) times the rarity mask if any.
        images (E, K, 3, H, W), classes (E, P, H, W) one-hot -> (E,). With K = 1 it is the plain
        distance, as the classes split every term's mean."""
        per_class = 0
        for weight, diff in zip(self.weights, self.differences(images.flatten(0, 1), prepared)):
            c, h, w = diff.shape[-3:]
            where = resized(classes, (h, w))                    # (E, P, h, w)
            if prepared["mask"] is not None:
                where = where * resized(prepared["mask"], (h, w))
            per_class = per_class + weight * torch.einsum("ekhw,ephw->ekp", diff.sum(2),
                                                          where) / (c * h * w)
        return per_class.min(1).values.sum(1)                   # (E,)

    def calibrate(self, terms):
        """§3.7: lambda_i = 1 / mean(term_i) over terms (N, n_terms), so that every term starts
        at magnitude 1."""
        self.weights = 1.0 / terms.float().mean(0).clamp(min=1e-12).to(self.weights.device)
        self.calibrated = True


def resized(mask, size):
    """A mask (E, P, H, W) area-averaged to size (h, w), as DISL resizes masks to each layer."""
    return mask if mask.shape[-2:] == tuple(size) else F.interpolate(mask, size=size, mode="area")


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
    (B, P) bool, pixel counts (B, P). A blank image (one colour: GTA-5's frame 00009062) has
    no class, so it stays out of the rarity estimation (as in DISL) and its rarity is 0."""
    onehot = F.one_hot(labels, num_classes).double()                    # (B, H, W, P)
    rgb = (images.double() + 1) * 127.5                                 # 0-255 as DISL
    flat = images.flatten(1)
    blank = flat.amax(1) == flat.amin(1)                                # (B,)
    count = onehot.sum((1, 2)) * ~blank[:, None]                        # (B, P)
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
    """Beside the dataset, where every run on it finds the cache; in the run folder for the
    built-in set or for a dataset folder this process cannot write (a shared read-only copy)."""
    name = f"cimle_rarity_{args.data}_{args.size}_{n}_min{args.rarity_min_images}.pt"
    if args.data != "shapes":
        beside = os.path.join(args.data_dir, name)
        if os.path.isfile(beside) or os.access(args.data_dir, os.W_OK):
            return beside
    return os.path.join(args.out_dir, name)


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
                                         num_workers=args.num_workers,
                                         generator=torch.Generator().manual_seed(args.seed))
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
    unread = ("sketch",) if args.task == "sr" else ("sketch", "lowres")
    ds = data.get_dataset(args.data, root=root, split=split, size=args.size, skip=unread,
                          **options)
    need = {"lowres", "image"} if args.task == "sr" else {"label", "image"}
    if not need <= ds.has:
        raise common.UserError(f"--task {args.task} needs {sorted(need)} items, and {args.data} "
                               f"gives only {sorted(ds.has)}.")
    if args.data == "folder" and not any(data.folder_split(d) == "test"
                                         for d in data.subfolders(root)):
        # §5.1.2: training and test images are disjoint. A folder without a test sub-folder
        # serves one set to both splits: its last --n_eval images are then the test split.
        held = min(args.n_eval, len(ds.records) // 2)
        args.held_out = held  # saved with the run: its --resume, --sample, --eval must agree
        if held:
            ds.records = ds.records[-held:] if split == "test" else ds.records[:-held]
    if args.task == "layout":
        args.num_classes = ds.num_classes
    return ds


def require_same_split(args, saved):
    """A flat folder's test split is its last --n_eval images (load_data): a run's later commands
    must hold out the very images it held out, or test images would be trained on (or training
    images scored as unseen)."""
    held = saved.get("held_out")
    common.require(held is None or held == getattr(args, "held_out", None),
                   f"the run in {args.out_dir} held out the last {held} images of --data_dir "
                   f"{args.data_dir} as its test split (--n_eval {saved.get('n_eval')}); pass "
                   f"--n_eval {saved.get('n_eval')} so that training and test images stay apart.")


def gather_items(ds, indices, args, rarity, outer=0):
    """The subset's inputs, targets and rarity masks, stacked on the CPU. Each item's random
    choices (the folder set's flips) come from its own seed, a function of (seed, outer, slot in
    S), not from the global RNG nor a data worker's: every rank, every --num_workers and a resumed
    run hold the very targets the codes were chosen for."""
    base = args.seed * 1_000_003 + outer * 1_009 + 499_979
    keys = [(int(i), base * 65_537 + slot) for slot, i in enumerate(indices.tolist())]
    loader = torch.utils.data.DataLoader(common.SeededItems(ds), sampler=keys, batch_size=64,
                                         num_workers=args.num_workers,
                                         worker_init_fn=common.ignore_stop_signals,
                                         generator=torch.Generator().manual_seed(base))
    cond, target = [], []
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


def search_runtime(args, rt):
    """The runtime of the search: --search_dtype (default --dtype) for its no-grad forwards."""
    return common.Runtime(rt.device, getattr(torch, args.search_dtype or args.dtype))


def outer_search(G, distance, items, outer, args, rt, chunk=None):
    """Algorithm 1 lines 4-8. Under torchrun each rank searches its share of S (examples r,
    r + W, ...) and the selected codes are all-gathered: every rank then holds sigma(i) for all
    of S, exactly the codes one process would have selected. Each example's m codes are drawn at
    once from its own stream, so they do not depend on the chunking either (`chunk`, or
    --search_chunk, or search_chunk_size). Returns the codes (|S|, *latent) on the device and
    the mean selected distance (a 0-d tensor: no host sync)."""
    cond, target, mask = items
    latent = G.latent_shape(cond)
    share = torch.arange(rt.rank, len(cond), rt.world_size)
    block = {}

    def draw(e0, e1, j0, j1):  # codes (e1 - e0, j1 - j0, *latent) of share[e0:e1]
        if j0 == 0:  # a new block of examples: its codes, (E, m, *latent)
            block["z"] = torch.stack([torch.randn(
                (args.m, *latent), generator=code_stream(args, outer, int(share[e]), rt.device),
                device=rt.device) for e in range(e0, e1)])
        return block["z"][:, j0:j1]

    chunk = chunk or search_chunk_size(G, distance, items, args, rt)
    with torch.no_grad(), search_runtime(args, rt).autocast():
        _, codes, dist = select_latents(G, distance, cond[share], target[share],
                                        None if mask is None else mask[share], args.m, draw,
                                        chunk, args.search_examples, rt.device, args.reject)
    codes, dist = codes.float(), dist.float()
    if rt.ddp:
        codes, dist = gather_shares(codes, len(cond), rt), gather_shares(dist, len(cond), rt)
    if args.perturb > 0:  # SRIM code: a small perturbation of every selected code
        gen = code_stream(args, outer, len(cond), rt.device)  # the stream after S's examples
        codes = codes + args.perturb * torch.randn(codes.shape, generator=gen, device=rt.device)
    return codes, dist.mean()


def forward_batch(args):
    """Samples per no-grad forward outside the search (calibration, --eval): --search_examples
    x --search_chunk, with a chunk of min(m, 10) where it is chosen from free memory."""
    return args.search_examples * (args.search_chunk or min(args.m, 10))


def search_chunk_size(G, distance, items, args, rt, headroom=0.5):
    """--search_chunk, or when it is 0: on a GPU all m candidates per example where they fit in
    `headroom` of the free memory (our choice), measured by one probe forward of the first
    --search_examples examples, one candidate each; elsewhere 10 (our choice: memory is rarely
    the limit on a CPU, and larger batches are no faster there)."""
    if args.search_chunk:
        return args.search_chunk
    if rt.device.type != "cuda":
        return min(args.m, 10)
    cond, target, mask = items
    e = min(args.search_examples, len(cond))
    probe = lambda e0, e1, j0, j1: torch.randn(  # noqa: E731
        (e1 - e0, j1 - j0, *G.latent_shape(cond)), device=rt.device)
    torch.cuda.synchronize(rt.device)
    torch.cuda.reset_peak_memory_stats(rt.device)
    base = torch.cuda.memory_allocated(rt.device)
    with torch.no_grad(), search_runtime(args, rt).autocast():
        select_latents(G, distance, cond[:e], target[:e], None if mask is None else mask[:e], 1,
                       probe, 1, e, rt.device)
    per_candidate = max(torch.cuda.max_memory_allocated(rt.device) - base, 1) / e
    free, _ = torch.cuda.mem_get_info(rt.device)
    free += torch.cuda.memory_reserved(rt.device) - torch.cuda.memory_allocated(rt.device)
    return int(max(1, min(args.m, headroom * free // (per_candidate * args.search_examples))))


@torch.no_grad()
def calibrate_distance(G, distance, items, outer, zero, args, rt):
    """§3.7 weights, set once at the run's first outer iteration: lambda_i = 1 / mean of term i
    over the first --calibrate_examples examples of S, one code each (the first of the example's
    own stream; z = 0 when the run starts with pretraining, so that pretraining and IMLE train
    one loss). The same examples on every rank, so every rank has the same weights; measured
    forward_batch(args) at a time, which sets the memory and not the weights."""
    cond, target, mask = items
    k, block = min(len(cond), args.calibrate_examples), forward_batch(args)
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


def inner_step(G, distance, opt, sched, items, codes, it, args, rt, cache=None):
    """Algorithm 1 lines 9-12: theta <- theta - eta grad sum_{i in S~} L(y~_i,sigma(i), y_i)/|S~|.
    The mini-batch is a pure function of (seed, it); under DDP each rank takes its slice.
    items and codes live on the device for the whole outer iteration (codes None: z = 0), and
    `cache` (prepare_subset) holds the targets' features, so a step copies nothing to the device
    but |S~| indices and reads no value back (the loss is returned as a 0-d tensor).
    --baseline crn: the hindsight loss over all K images; crn_noise: a fresh code every step."""
    cond, target, mask = items
    gen = torch.Generator().manual_seed(args.seed * 15_485_863 + it)
    pick = torch.randperm(len(cond), generator=gen)[:args.batch_size]
    share = args.batch_size // rt.world_size  # divisible: check_batch_split
    rows = slice(rt.rank * share, (rt.rank + 1) * share)
    pick = pick[rows].to(cond.device, non_blocking=True)
    if args.baseline == "crn":
        z = None  # all K images of each layout
    elif args.baseline == "crn_noise":  # CRN + noise: the plain loss on a fresh draw, no search
        latent = common.unwrap(G).latent_shape(cond)
        z = torch.randn((args.batch_size, *latent), device=rt.device, generator=torch.Generator(
            rt.device).manual_seed(args.seed * 15_485_863 + it))[rows]  # one process's codes
    elif codes is None or it < args.pretrain_iters:  # §5.1.1: pretraining with z = 0
        latent = codes.shape[1:] if codes is not None else common.unwrap(G).latent_shape(cond)
        z = torch.zeros((share, *latent), device=rt.device)
    else:
        z = codes[pick].to(rt.device)
    with rt.autocast():
        if cache is None:
            prepared = distance.prepare(target[pick].to(rt.device),
                                        None if mask is None else mask[pick].to(rt.device))
        else:
            prepared = {"feats": {k: v[pick] for k, v in cache["feats"].items()},
                        "mask": None if cache["mask"] is None else cache["mask"][pick]}
        loss = example_losses(G, distance, cond[pick].to(rt.device), z, prepared, args).mean()
    opt.zero_grad(set_to_none=True)
    rt.scaler.scale(loss).backward()
    rt.scaler.step(opt)
    rt.scaler.update()
    sched.step()
    return loss.detach()


def example_losses(G, distance, x, z, prepared, args):
    """The inner step's loss of each example: L(T(x, z), y), or for --baseline crn Chen &
    Koltun's hindsight loss over the K images of each layout (z unused)."""
    if args.baseline == "crn":
        classes = F.one_hot(x, args.num_classes).permute(0, 3, 1, 2).float()
        return distance.hindsight(G(x, None), prepared, classes)
    return distance(G(x, z), prepared)


def training_flops(args):
    """common.count_flops of one training image of an inner step (example_losses forward and
    backward; the optimiser's element-wise update is not counted), on shape-only tensors (meta
    device), so the paper presets count in seconds on a CPU. The target's features are not
    counted: they are computed once per outer iteration (prepare_subset), as in --bench's timed
    step. A random-weight VGG-19 costs what the pretrained one does."""
    meta = torch.device("meta")
    cond, target, mask = to_device(bench_inputs(args, 1, torch.device("cpu")), meta)
    with meta:
        G = build_generator(args)
        distance = make_distance(args, meta, pretrained=False)
    z = torch.zeros((1, *G.latent_shape(cond)), device=meta)  # a code's shape, so its cost
    prepared = distance.prepare(target, mask)
    return common.count_flops(
        lambda: example_losses(G, distance, cond, z, prepared, args).mean().backward())


@torch.no_grad()
def prepare_subset(distance, items, args, rt, budget=None):
    """The targets' features of all of S (Distance.prepare, under the training autocast), once
    per outer iteration, forward_batch(args) targets at a time, for the inner steps to index
    (the same loss as preparing each mini-batch). None where they would not fit: over `budget`
    bytes, by default a quarter of the free GPU memory or 4 GiB on a CPU (our choice); the steps
    then prepare their own."""
    cond, target, mask = items
    if budget is None:
        budget = torch.cuda.mem_get_info(rt.device)[0] / 4 if rt.device.type == "cuda" \
            else 4 * 2 ** 30
    block, parts = forward_batch(args), []
    with rt.autocast():
        for i in range(0, len(target), block):
            parts.append(distance.prepare(target[i:i + block])["feats"])
            if i == 0:  # the first block gives the bytes per target
                size = sum(v[0].numel() * v.element_size() for v in parts[0].values())
                if size * len(target) > budget:
                    return None
    return {"feats": {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, "mask": mask}


def reinit_encoder(G, opt, it, args):
    """DISL's restart after outer iteration 5 (--reinit_encoder_at; not in the paper): the noise
    encoder takes a fresh initialisation (seeded by (seed, it), so every rank and a resumed run
    agree) and Adam's moments restart for every weight; the CRN keeps its weights."""
    with common.preserved_rng():
        torch.manual_seed(args.seed * 1_000_003 + it + 7_919)
        fresh = NoiseEncoder(args.num_classes, args.noise_channels, args.encoder_channels)
    common.unwrap(G).encoder.load_state_dict(fresh.state_dict())
    opt.state.clear()


def to_device(items, device):
    return tuple(None if x is None else x.to(device) for x in items)


def make_distance(args, device, pretrained=None):
    """The run's Distance; pretrained (default --pretrained) False: a random-weight VGG-19 (the
    same cost, offline: --bench, training_flops)."""
    vgg = None
    if args.distance != "pixel":
        pretrained = bool(args.pretrained) if pretrained is None else pretrained
        # layouts: DISL's MatConvNet VGG-19 average-pools (torchvision's weights either way)
        pool = "avg" if args.task == "layout" and args.layout_vgg == "matconvnet" else "max"
        vgg = common.VGG19(pretrained=pretrained, pool=pool).to(device).eval()
        vgg.requires_grad_(False)
    return Distance(args.task, args.distance, device, vgg, args.layout_vgg)


def make_optimiser(G, args):
    opt = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.9, 0.999))  # SRIM / DISL: Adam
    milestones = parse_ints(args.lr_milestones, "lr_milestones")
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, args.lr_gamma)


def train(args):
    rt = common.setup_runtime(args)
    ds = load_data(args)
    n = len(ds) if not args.n_train else min(args.n_train, len(ds))
    common.require(n >= args.batch_size, f"{n} training images cannot fill a mini-batch of "
                                         f"--batch_size {args.batch_size} (|S~|); give more "
                                         f"images or a smaller --batch_size.")
    G = build_generator(args).to(rt.device)
    if args.init_from:  # fine-tuning: Adam and its schedule start afresh
        load_released(G, args)
    opt, sched = make_optimiser(G, args)
    distance = make_distance(args, rt.device)
    rarity = load_rarity(args, ds, n, rt) if args.task == "layout" and (
        args.rebalance_data or args.rebalance_loss) else None
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    objects = dict(G=G, opt=opt, sched=sched, scaler=rt.scaler)
    start, subset, codes, items, cache = 0, None, None, None, None
    means, search = common.LossMeans(rt.device), {}  # the loss and the search since the last log
    if args.resume:
        ck = common.load_checkpoint(ckpt_path, "cimle", vars(args), ARCH_KEYS, objects, rt=rt,
                                    per_rank=dict(log_means=means))
        require_same_split(args, ck["config"])
        start, extra = ck["iter"], ck["extra"]
        search = extra.get("search", {})
        distance.weights = extra["distance_weights"].to(rt.device)
        distance.calibrated = bool(extra["calibrated"])
        if extra["subset"] is not None and not new_outer(start, args):
            subset, codes = extra["subset"], extra["codes"]
            codes = None if codes is None else codes.to(rt.device)
            items = to_device(gather_items(ds, subset, args, rarity, outer_index(start, args)),
                              rt.device)
            cache = prepare_subset(distance, items, args, rt)
    Gw = common.prepare_model(G, rt, args.compile)
    log = common.Logger(args.out_dir, args.iters, start, rt.is_main)
    fixed = fixed_examples(ds, args)
    chunk = None
    with common.StopSignals() as signals:
        for it in range(start, args.iters):
            G.upsample_mode = "bilinear" if it >= args.bilinear_from > 0 else "nearest"
            if it == args.reinit_encoder_at > 0:
                reinit_encoder(G, opt, it, args)
            if new_outer(it, args):  # Algorithm 1: pick S, then search sigma(i) for every i in S
                outer = outer_index(it, args)
                subset = pick_subset(outer, n, args, rarity)
                items = to_device(gather_items(ds, subset, args, rarity, outer), rt.device)
                if not distance.calibrated:
                    calibrate_distance(G, distance, items, outer, it < args.pretrain_iters, args,
                                       rt)
                cache = prepare_subset(distance, items, args, rt)
                codes = None  # z = 0 (pretraining) or, for the baselines, not searched
                if it >= args.pretrain_iters and args.baseline == "none":
                    t0 = time.perf_counter()
                    G.eval()
                    chunk = chunk or search_chunk_size(G, distance, items, args, rt)
                    codes, sel = outer_search(G, distance, items, outer, args, rt, chunk)
                    G.train()
                    search = dict(selected_distance=sel.item(), search_s=time.perf_counter() - t0)
            means.add(dict(loss=inner_step(Gw, distance, opt, sched, items, codes, it, args, rt,
                                           cache)))
            log.step(args.batch_size)
            done = it + 1
            if done % args.log_every == 0 or done == args.iters:
                log.log(done, **means.pop(rt), lr=sched.get_last_lr()[0], **search)
                search = {}
            if rt.is_main and (done % args.sample_every == 0 or done == args.iters):
                with common.preserved_rng():  # grids must not move the training RNG
                    G.eval()
                    samples_grid(G, fixed, args, rt.device,
                                 os.path.join(args.out_dir, f"samples_{done:06d}.png"), ds.palette
                                 if args.task == "layout" else None)
                    G.train()
            signals.end_of_step(rt, args, done, ckpt_path, lambda: common.save_checkpoint(
                ckpt_path, "cimle", args, done, objects, rt=rt,  # with the outer iteration's state
                per_rank=dict(log_means=means), extra=dict(
                    subset=subset, codes=None if codes is None else codes.cpu(), search=search,
                    distance_weights=distance.weights.cpu(), calibrated=distance.calibrated)))
    log.close()


# ----------------------------------------------------------------------------------------------
# Official released weights (--init_from): SRIM's x8 RRDB generators (niopeng/SRIM-pytorch)
# ----------------------------------------------------------------------------------------------
# The released files are plain state_dicts of one flat nn.Sequential `model`: 0 the first conv,
# 1 the trunk as a shortcut block (sub.0 .. sub.{nb-1} the RRDBs, sub.{nb} the trunk conv), then
# [Upsample, conv, LReLU] x 3 (convs at 3, 6, 9), 11 the HR conv, 13 the output conv. Two kinds:
# with z (IMRRDBNet, first conv (nf, 3 + z, 3, 3): code_81_480000_G.pth, SRIM stage 2) and z-free
# (RRDBNet, (nf, 3, 3, 3): blank_72_150000_G.pth, the z = 0 pretraining of stage 1).
# The layout half's released model is a TensorFlow 1 checkpoint: not read here.

SRIM_OUTER_CONVS = {"model.0": "fea_conv", "model.3": "up_convs.0", "model.6": "up_convs.1",
                    "model.9": "up_convs.2", "model.11": "hr_conv", "model.13": "out_conv"}
SRIM_TOP_LEVEL = {"0", "1", "3", "6", "9", "11", "13"}  # x8: three up-sampling convs
SRIM_NEW_CODE_STD = 0.03  # load_partial_network_concat: new z weights ~ N(0, 0.03^2)
# The output activation of the config that wrote each kind: train_srim_cicada_x8.json (stage 2,
# with z) says sigmoid; train_vanilla_cicada_x8.json (stage 1, z-free) says tanh.
SRIM_LAST_ACT = {True: "sigmoid", False: "tanh"}
LAYOUT_RELEASE = ("the layout half's released model (zth667/Diverse-Image-Synthesis-from-"
                  "Semantic-Layout) is a TensorFlow 1 checkpoint, which cimle.py does not read")


def srim_key_map(n_blocks):
    """Official key prefix -> ours (a weight and a bias under each)."""
    names = dict(SRIM_OUTER_CONVS)
    names[f"model.1.sub.{n_blocks}"] = "trunk_conv"
    for b in range(n_blocks):
        for r in range(3):
            for c in range(5):
                theirs = f"model.1.sub.{b}.RDB{r + 1}.conv{c + 1}.0"
                names[theirs] = f"trunk.{b}.blocks.{r}.convs.{c}"
    return names


def srim_architecture(official, source):
    """The flags a released state_dict implies, from its shapes: nf, gc, n_blocks, and z_channels
    (None for the z-free net). One sentence for anything that is not SRIM's x8 generator."""
    if not isinstance(official, dict) or not all(torch.is_tensor(v) for v in official.values()):
        if isinstance(official, dict) and "method" in official and "config" in official:
            raise common.UserError(f"{source} is a checkpoint of this project ({official['method']}"
                                   f".py), not released weights: pass its folder as --out_dir "
                                   f"(and --resume to train on) instead of --init_from.")
        raise common.UserError(f"{source} is not a state_dict of tensors; --init_from expects a "
                               f"released SRIM generator (niopeng/SRIM-pytorch, *_G.pth).")
    keys = list(official)
    if any(k.startswith("c_conv_0.") for k in keys):
        raise common.UserError(f"{source} is the legacy Caffe-style SRIM of niopeng/SRIM-pytorch "
                               f"(c_conv_* keys); cimle.py implements its RRDB generator only.")
    if "model.0.weight" not in official or "model.1.sub.0.RDB1.conv1.0.weight" not in official:
        raise common.UserError(f"{source} is not a released SRIM generator (niopeng/SRIM-pytorch): "
                               f"it has no model.0.weight / model.1.sub.0.RDB1.conv1.0.weight "
                               f"(its first keys: {', '.join(keys[:3])}).")
    top = {k.split(".")[1] for k in keys}
    if top != SRIM_TOP_LEVEL:
        after = ", ".join(sorted(top - {"0", "1"}, key=lambda v: (len(v), v)))
        raise common.UserError(f"{source} is an RRDB generator with layers model.{{{after}}} "
                               f"after the trunk, not SRIM's x8 model.{{3, 6, 9, 11, 13}} (an x4 "
                               f"ESRGAN, say).")
    first, out = official["model.0.weight"], official["model.13.weight"]
    n_blocks = len({k.split(".")[3] for k in keys if k.startswith("model.1.sub.") and ".RDB" in k})
    common.require(out.shape[0] == 3 and first.shape[1] >= 3,
                   f"{source} maps {first.shape[1]} input to {out.shape[0]} output channels; "
                   f"SRIM's generator maps RGB (+ z) to RGB.")
    return dict(nf=first.shape[0], gc=official["model.1.sub.0.RDB1.conv1.0.weight"].shape[0],
                n_blocks=n_blocks, z_channels=first.shape[1] - 3 or None)


def convert_srim(official, last_act="tanh", new_code_weights=None):
    """A released SRIM state_dict -> SRGenerator's (pure: the inputs are not modified).

    last_act: the output activation the file was trained with. Ours is tanh to [-1, 1]; since
    sigmoid(a) = (1 + tanh(a / 2)) / 2, a sigmoid net is ours with its output conv halved.
    new_code_weights (nf, z, 3, 3): for the z-free net, the first conv's z columns, appended after
    the RGB ones as load_partial_network_concat does.
    """
    n_blocks = srim_architecture(official, "the state_dict")["n_blocks"]
    ours = {}
    for theirs, mine in srim_key_map(n_blocks).items():
        for kind in ("weight", "bias"):
            ours[f"{mine}.{kind}"] = official[f"{theirs}.{kind}"].float()
    if new_code_weights is not None:
        ours["fea_conv.weight"] = torch.cat([ours["fea_conv.weight"], new_code_weights.float()], 1)
    if last_act == "sigmoid":
        ours["out_conv.weight"] = ours["out_conv.weight"] / 2
        ours["out_conv.bias"] = ours["out_conv.bias"] / 2
    return ours


def read_released(path):
    """torch.load with weights_only=True (no pickle code runs), each failure one sentence."""
    common.require(os.path.isfile(path), f"--init_from {path}: no such file.")
    try:
        return common.load_weights(path)
    except common.UserError as err:
        cause = err.__cause__
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(cause))
        if isinstance(cause, pickle.UnpicklingError) and needs:
            raise common.UserError(
                f"{path} needs Python pickle code to load (it refers to {needs.group(1)}), which "
                f"--init_from does not run (weights_only=True); the released SRIM files are plain "
                f"state_dicts of tensors.") from None
        raise common.UserError(f"{path} cannot be read by torch.load ({type(cause).__name__}); "
                               f"--init_from expects a released SRIM generator *_G.pth, and "
                               f"{LAYOUT_RELEASE}.") from None


def released_presets(known, presets):
    """parse(): --init_from sets --nf, --gc, --n_blocks (and --z_channels for a file with z) from
    the file, in place of the preset's; a flag given that contradicts the file is refused."""
    data = known.data or "shapes"
    common.require(known.task in (None, "sr") and "sr" in TASKS.get(data, ("sr",)),
                   f"--init_from takes SRIM's x8 super-resolution generators (--data folder, or "
                   f"--data shapes --task sr); {LAYOUT_RELEASE}.")
    arch = srim_architecture(read_released(known.init_from), known.init_from)
    if arch["z_channels"] is None:  # z-free: the z width is ours to choose (SRIM: 5)
        del arch["z_channels"]
    clash = [f"--{k} {getattr(known, k)}" for k, v in arch.items()
             if getattr(known, k) is not None and getattr(known, k) != v]
    common.require(not clash, f"{known.init_from} holds a generator with "
                              f"{' '.join(f'--{k} {v}' for k, v in arch.items())}, which "
                              f"contradicts {', '.join(clash)}: leave those flags out.")
    sr = dict(presets, shapes=CPU_SR)
    return {name: dict(preset, **arch) if preset["task"] == "sr" else preset
            for name, preset in sr.items()}


def load_released(G, args):
    """Load --init_from into G (strictly, converted in memory); True for the z-free net, whose
    new z columns are drawn as SRIM does, from --seed. Up-sampling stays nearest, as trained."""
    official = read_released(args.init_from)
    arch = srim_architecture(official, args.init_from)
    z_free = arch["z_channels"] is None
    new_code = None
    if z_free:
        gen = torch.Generator().manual_seed(args.seed)
        new_code = SRIM_NEW_CODE_STD * torch.randn((arch["nf"], args.z_channels, 3, 3),
                                                   generator=gen)
    last_act = args.init_last_act or SRIM_LAST_ACT[not z_free]
    common.load_official(G, convert_srim(official, last_act, new_code), args.init_from)
    G.upsample_mode = "nearest"
    return z_free


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
    G, ds, regression = load_model(args, device)
    test = load_data(args, "test")
    out = args.out_dir
    palette = ds.palette if args.task == "layout" else None
    cond, target = fixed_examples(test, args, n=6)
    # Fig. 1 / 19: many samples per input (the z = 0 baseline: as trained, all codes zero)
    many = generate_samples(G, cond, 12, device, seed=1, zero=regression)
    common.save_grid(os.path.join(out, "many_samples.png"),
                     [[cond[i], target[i]] + list(many[i]) for i in range(len(cond))], palette)
    gen = torch.Generator().manual_seed(2)
    shape = G.latent_shape(cond)

    def codes(*size):  # the z = 0 baseline: zero codes, as it was trained
        z = torch.randn(size, generator=gen)
        return (torch.zeros_like(z) if regression else z).to(device)

    rows = []
    for i in range(min(3, len(cond))):  # Fig. 11 / 16: 8 frames from one code to another
        za, zb = codes(2, *shape)
        rows.append([cond[i]] + list(interpolate_latents(G, cond[i:i + 1].to(device), za, zb)))
    common.save_grid(os.path.join(out, "interpolation.png"), rows, palette)
    rows = [[torch.zeros_like(target[0])] + [c for c in cond]]
    for _ in range(3):  # Fig. 12: one code on every input (style consistency)
        z = codes(*shape)
        rows.append([torch.zeros_like(target[0])] + list(one_latent_many_inputs(G, cond, z)))
    common.save_grid(os.path.join(out, "one_latent_many_inputs.png"), rows, palette)
    print(f"wrote many_samples.png, interpolation.png, one_latent_many_inputs.png into {out}")


def load_model(args, device):
    """The trained generator (its up-sampling mode as at the last step), the training set, and
    whether the run never left z = 0 pretraining (the regression baseline, sampled with z = 0)."""
    ds = load_data(args)
    G = build_generator(args).to(device)
    if args.init_from:  # the authors' weights instead of ckpt.pt; out_dir only gets the outputs
        return G.eval(), ds, load_released(G, args)  # the z-free net: the z = 0 baseline
    ck = common.load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), "cimle", vars(args),
                                ARCH_KEYS, {"G": G}, restore_rng=False)
    trained = ck["config"]
    require_same_split(args, trained)
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
    the CPU, the k samples generated forward_batch(args) at a time. One input's samples are held
    at a time."""
    gen = torch.Generator().manual_seed(3)
    chunk = forward_batch(args)
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
    path = os.path.join(args.out_dir, "eval.json")
    with open(path + ".tmp", "w") as f:  # written whole, then renamed: never half a file
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
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
    --compile; (2) one outer iteration as training runs it (bench_outer); (3) select_latents
    against select_latents_naive at |S| = --S, m = --m under --search_dtype. Writes all three
    into --out_dir/bench.json. --pretrained 0 times a random-weight VGG-19 (the same cost as the
    pretrained one), so it runs offline."""
    rt = common.setup_runtime(args)
    items = to_device(bench_inputs(args, args.S, torch.device("cpu")), rt.device)
    codes = torch.randn((args.S, *build_generator(args).latent_shape(items[0])),
                        generator=torch.Generator().manual_seed(1)).to(rt.device)

    def make_step(run, compile_model):
        G = build_generator(args).to(rt.device)
        Gw = common.prepare_model(G, run, compile_model, ddp=False)
        opt, sched = make_optimiser(G, args)
        distance = make_distance(args, rt.device)
        cache = prepare_subset(distance, items, args, run)
        it = args.pretrain_iters  # an IMLE step (z used); a fixed it draws one fixed mini-batch
        return lambda: inner_step(Gw, distance, opt, sched, items, codes, it, args, run, cache)

    result = {"training": common.bench_training(args, rt, make_step),
              "outer_iteration": bench_outer(args, rt, items),
              "search": bench_search(args, rt, items, reps)}
    common.write_bench(args, result)
    print(json.dumps(result["outer_iteration"]))
    print(json.dumps(result["search"]))
    return result


def bench_outer(args, rt, items):
    """One outer iteration of Algorithm 1 as train() runs it, under --dtype / --search_dtype:
    the search over |S| = --S (outer_search, chunk from --search_chunk or free memory), the
    targets' features for the steps (prepare_subset), then min(N, L) inner steps; with N < L the
    steps' time is scaled to L. Reports the seconds and the share of each part."""
    device = rt.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(args.seed)
    G = build_generator(args).to(device)
    opt, sched = make_optimiser(G, args)
    distance = make_distance(args, device)
    steps = min(args.bench, args.L)
    seconds = {}
    for warm in (True, False):  # one untimed round first (allocator, autotuning)
        sync()
        t0 = time.perf_counter()
        G.eval()
        chunk = search_chunk_size(G, distance, items, args, rt)
        codes, _ = outer_search(G, distance, items, 1, args, rt, chunk)
        G.train()
        sync()
        t1 = time.perf_counter()
        cache = prepare_subset(distance, items, args, rt)
        sync()
        t2 = time.perf_counter()
        for it in range(args.pretrain_iters, args.pretrain_iters + (1 if warm else steps)):
            inner_step(G, distance, opt, sched, items, codes, it, args, rt, cache)
        sync()
        t3 = time.perf_counter()
        seconds = {"search": t1 - t0, "prepare_targets": t2 - t1, "inner_steps": (t3 - t2)
                   * args.L / (1 if warm else steps)}
    total = sum(seconds.values())
    return {"device": str(device), "dtype": args.dtype, "search_dtype": args.search_dtype
            or args.dtype, "S": args.S, "m": args.m, "L": args.L, "chunk": chunk,
            "inner_steps_timed": steps, "targets_cached": cache is not None,
            "ms_per_inner_step": round(1000 * seconds["inner_steps"] / args.L, 2),
            "seconds": {k: round(v, 3) for k, v in seconds.items()}, "outer_s": round(total, 3),
            "share": {k: round(v / total, 4) for k, v in seconds.items()}}


def bench_search(args, rt, items, reps):
    """select_latents vs select_latents_naive on the same codes, with this preset's generator,
    under --search_dtype.
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

    E, search_rt = args.search_examples, search_runtime(args, rt)
    chunk = search_chunk_size(G, distance, items, args, rt)

    def fast():
        with search_rt.autocast():
            return select_latents(G, distance, cond, target, mask, args.m, draw, chunk, E, device)

    def naive():
        with search_rt.autocast():
            return select_latents_naive(G, distance, cond, target, mask, args.m, draw, E, device)

    @torch.no_grad()
    def forwards_only():
        with search_rt.autocast():
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
    return {"device": str(device), "dtype": str(search_rt.dtype).split(".")[-1], "task": args.task,
            "data": args.data, "S": args.S, "m": args.m, "chunk": chunk, "examples": E,
            "distance": args.distance,
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
            nets = {"G": G.crn}
            if getattr(G, "encoder", None) is not None:  # not in the "CRN" baselines
                nets["E"] = G.encoder
        else:
            nets = {"G": build_generator(args)}
    for name, net in nets.items():
        ref = REFERENCE_PARAMS[args.task][name]
        count = common.count_params(net)
        print(f"{name}: {count:,} parameters; official network ~{ref / 1e6:.2f}M "
              f"(ratio {count / ref:.4f})")
    print(f"training: {training_flops(args) / 1e9:,.1f} GFLOP per image of an inner step "
          f"(forward and backward; --size {args.size}, --distance {args.distance})")
    common.print_dry_run(nets)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse(argv)
    return common.dispatch(args, dry_run, bench, sample, evaluate, train)


if __name__ == "__main__":
    common.run_main(main)
