"""PoE-GAN: Multimodal Conditional Image Synthesis with Product-of-Experts GANs
(Huang, Mallya, Wang, Liu; ECCV 2022; arXiv 2112.05130). No official code exists.

Idea: one generator for every subset of the input modalities (text, segmentation, sketch, style
reference), the empty set included. Each modality y_i is an "expert" q(z|y_i), a Gaussian over the
latent code; the conditional latent is the product of the prior and the experts that are present,
p(z|Y) ~ p(z) prod q(z|y_i) (Eq. 1-4): a missing modality is simply a missing factor. The latent is
hierarchical, z = (z^0, z^1 .. z^N): a global vector z^0 (Global PoE-Net, Fig. 4a) mapped to a style
w, and one feature map z^k per decoder resolution (Local PoE-Net, Fig. 4b) whose prior comes from
the previous layer and whose experts come from the segmentation and sketch encoders' skip
features. LG-AdaIN (Eq. 5) modulates the decoder with w (global) and z^k (local). A multiscale
multimodal projection discriminator (Eq. 7) scores the image against every present modality; a KL
from each single-modality conditional to the prior (Eq. 9), contrastive losses (Eq. 10-13) and
modality dropout keep the samples diverse and every subset usable.

Map of this file (the method first, in the paper's order; then the programme around it):
    config and presets        hyperparameters per dataset, each with its source; check_args
    product of experts        Eq. (4) in log-variance form, presence mask, theta*tanh limiter,
                              the KL of one expert's conditional to the prior (Eq. 9's terms)
    encoders (§3.3)           seg/sketch CNNs with input skips, residual style net, text tower
    generator (§3.2-3.3)      Global PoE-Net -> w, decoder blocks with Local PoE-Net + LG-AdaIN
    discriminator (§3.4)      multiscale multimodal projection discriminator (Eq. 7, Fig. 5c):
                              seg/sketch projected as maps at every scale, text/style as vectors
    losses (§3.5)             KL (Eq. 9, all its reductions in kl_loss), contrastive (Eq. 10-13)
    training step             modality dropout, G step, D step with lazy R1 (Eq. 14)
    training loop             data, G EMA, grids, atomic checkpoints, exact resume, torchrun;
                              losses logged as means over each log interval (no per-step sync)
    sampling controls         the Fig. 1 grid: every modality subset, several samples each
    evaluation                streamed batch by batch: FID (running sums) and LPIPS diversity per
                              subset; exact toy metrics on shapes (data.shapes_modality_counts)
    benchmark, main

Table 3 (MM-CelebA-HQ ablations) as switches: (a) --fusion concat, (b) --no_kl,
(c) --no_modality_dropout, (d) --discriminator concat, (e) --lambda_cx 0 (no image contrastive
loss, Eq. 11), (f) --lambda_cy 0 (no conditional contrastive loss, Eq. 12-13), (g) the default.
Supplement stabilisers not implemented: the +-256 clamp of conv/FC outputs and anti-aliased
resampling (bilinear up, average-pool down here); FID is pytorch-fid's Inception, not Clean-FID.

    python poe_gan.py                              # built-in shapes, 4 modalities, CPU
    python poe_gan.py --sample                     # Fig. 1 grid from out/poe_gan-shapes/ckpt.pt
    python poe_gan.py --eval                       # per-subset metrics -> eval.json
    python poe_gan.py --discriminator concat --out_dir out/poe-d  # Table 3 row (d) (see above)
    python poe_gan.py --data mm-celeba-hq          # paper scale, 256x256, text + seg + sketch
    torchrun --nproc_per_node=8 poe_gan.py --data coco-stuff   # --batch_size is the global batch
    python poe_gan.py --data coco-stuff --dry_run  # parameter counts
    python poe_gan.py --data mm-celeba-hq --bench 16 --dtype bfloat16  # img/s, memory
"""

import contextlib
import itertools
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data

# ----------------------------------------------------------------------------------------------
# Config. "paper" = the main text; "supp" = Supplement B values as a secondary summary of it gives
# them (no official code exists); "our choice" where nothing survives.
# ----------------------------------------------------------------------------------------------

MODALITIES = ("text", "seg", "sketch", "style")       # the paper's four (§3)
SPATIAL = ("seg", "sketch")                           # only these have skips / local experts (§3.3)
ITEM_KEY = {"text": "caption", "seg": "label", "sketch": "sketch", "style": "style"}
THETA_PRIOR, THETA_EXPERT = 1.0, 10.0   # supp: logvar limited by theta*tanh(logvar/theta)
GRAD_CLIP = 10.0                        # supp: gradient-norm clip 10
SMALL_TEXT = dict(context_length=64, layers=2, heads=4)  # the CPU text tower: our choice

PAPER = dict(             # MM-CelebA-HQ 256x256 (Table 3) unless a dataset overrides
    size=256,
    ch_base=16384, ch_max=512,   # decoder/D channels min(ch_max, ch_base/res): our choice (supp
                                 # gives only the 1024 landscape model: base 32 ch, max 1024)
    z_base=2048, z_max=32,       # z^k channels min(z_max, z_base/res): supp (base 2 ch, max 32)
    feat_dim=512, z0_dim=512, w_dim=512,  # supp: w 512, text MLP width 512; z^0 width: our choice
    text_width=0,                # 0 = frozen pretrained CLIP ViT-B/32 text tower (paper §3.3)
    batch_size=64,               # our choice (supp: 768 for landscape 1024)
    lr=0.004,                    # supp: Adam lr 0.004, betas (0, 0.99)
    r1_gamma=0.2, r1_every=16,   # supp: lazy R1 every 16; gamma unknown: our choice (StyleGAN2-ADA
                                 # heuristic 0.0002 res^2 / batch)
    ema_decay=0.999,             # supp: EMA of G (ports: 0.999)
    w_text=0.05, w_seg=0.1, w_sketch=1.0, w_style=0.01,  # supp: omega_i (landscape config)
    lambda_cx=3.0, lambda_cy=0.3, tau=0.3,  # supp: lambda1 3, lambda2 0.3; tau 0.3 (fixed, ports)
    dropout_p=0.5,               # supp: modality dropout p 0.5; per sample: our choice
    kl_warmup=0,                 # iterations of linear KL warm-up (NVAE's); 0 = off, as the paper
    kl_locations="mean",         # Eq. (9): local KL averaged over locations (omega^k): our choice
    cx_features="vgg",           # paper Eq. (11): pretrained VGG (relu5_1, pooled: supp)
    pretrained=1, iters=400_000, eval_n=5000,  # iters: our choice (supp gives hours, not steps)
    sample_every=5000, ckpt_every=5000, log_every=100,
)
CPU = dict(               # our choice throughout: what learns in minutes on 2 CPU cores
    size=32, ch_base=512, ch_max=32, z_base=64, z_max=8, feat_dim=64, z0_dim=32, w_dim=64,
    text_width=64,        # a small CLIP-shaped text tower trained with the model, on the words of
                          # the shapes captions (WordTokenizer; no download)
    batch_size=8, lr=0.002, r1_gamma=1.0, r1_every=16, ema_decay=0.99,
    w_text=0.05, w_seg=0.1, w_style=0.01, lambda_cx=3.0, lambda_cy=0.3, tau=0.3,  # supp
    w_sketch=0.1,         # supp gives 1 (landscape 1024 config). On shapes the sketch is nearly the
                          # label map's outline, and at 10x seg's weight the KL switched the sketch
                          # expert off at this budget (sketch alone vs unconditional, seeds 0 / 1:
                          # sketch F1 0.419 vs 0.419, 0.481 vs 0.478); seg's 0.1 keeps it on
                          # (0.452 vs 0.446, 0.472 vs 0.422; foreground agreement 0.707 vs 0.677,
                          # 0.751 vs 0.668): our choice
    dropout_p=0.5, kl_warmup=0, kl_locations="mean", pretrained=0, iters=1000, eval_n=256,
    cx_features="random+pixels",  # offline stand-in for pooled VGG features (see image_features)
    sample_every=250, ckpt_every=250, log_every=25,
)
PRESETS = {
    "shapes": dict(CPU),
    "mm-celeba-hq": dict(PAPER),                                   # Tables 1, 3 (256 here)
    "coco-stuff": dict(PAPER),                                     # Table 2 (256x256)
}
# What each dataset provides, for --dry_run without touching files (checked against data.py).
DATA_INFO = {
    "mm-celeba-hq": dict(num_classes=19, channels=3, modalities=("text", "seg", "sketch")),
    "coco-stuff": dict(num_classes=183, channels=3, modalities=("text", "seg", "sketch")),
}
# What a checkpoint must match (load_checkpoint names the first that differs); "data" because
# another dataset has other classes and modalities, so other encoder shapes.
ARCH_KEYS = ("data", "size", "ch_base", "ch_max", "z_base", "z_max", "feat_dim", "z0_dim",
             "w_dim", "text_width", "fusion", "pretrained")
# (--discriminator is none: G, all that --sample and --eval load, is the same for either D; a
# --resume with the other D is refused by D's tensor names.)


def build_parser():
    p = common.base_parser(__doc__.split("\n")[0])
    p.add_argument("--fusion", default="poe", choices=["poe", "concat"],
                   help="poe: product of experts; concat: Table 3 row (a) baseline")
    p.add_argument("--no_kl", action="store_true", help="drop the KL loss (Table 3 row (b))")
    p.add_argument("--discriminator", default="mmpd", choices=["mmpd", "concat"],
                   help="mmpd: Eq. (7) projections; concat: Table 3 row (d), inputs concatenated")
    p.add_argument("--no_modality_dropout", action="store_true",
                   help="train with every modality present (Table 3 row (c))")
    p.add_argument("--kl_locations", default=None, choices=["mean", "sum"],
                   help="Eq. (9) over the r_k x r_k locations of a local z^k (see kl_loss)")
    for name in ("ch_base", "ch_max", "z_base", "z_max", "feat_dim", "z0_dim", "w_dim",
                 "text_width", "r1_every", "eval_n", "kl_warmup"):
        p.add_argument(f"--{name}", type=int, default=None)
    for name in ("lr", "r1_gamma", "ema_decay", "w_text", "w_seg", "w_sketch", "w_style",
                 "lambda_cx", "lambda_cy", "tau", "dropout_p"):
        p.add_argument(f"--{name}", type=float, default=None)
    p.add_argument("--cx_features", default=None,
                   choices=["vgg", "pixels", "random", "random+pixels"],
                   help="features of the image contrastive loss (see image_features): pooled VGG-19 "
                        "relu5_1, the image at 8x8, pooled fixed random conv features, or both")
    p.add_argument("--pretrained", type=int, default=None, choices=[0, 1],
                   help="1: frozen CLIP text tower, VGG, Inception, LPIPS (download once)")
    p.add_argument("--bench", type=int, default=None,
                   help="time N training steps on one batch (fp32 eager vs --dtype/--compile), "
                        "write bench.json")
    return p


def check_args(args):
    """Every flag of this script that can be out of range, checked before any data or model is
    built (common.parse_args calls this after the generic checks): one sentence each, exit 2."""
    require, at_least = common.require, common.at_least
    common.require_one_process_for_outputs(args, sharded_eval=True)  # --eval deals batches out
    require(args.size >= 8 and args.size & (args.size - 1) == 0,
            f"--size must be a power of two >= 8 (got {args.size}).")
    if args.data not in DATA_INFO:    # a built-in set (no files): data.py's size rule, now
        dataset_info(args)
    at_least(args, 1, "ch_base", "ch_max", "z_base", "z_max", "feat_dim", "z0_dim", "w_dim",
             "r1_every", "eval_n", "bench")
    at_least(args, 0, "text_width", "kl_warmup")
    require(args.ch_base >= args.size,
            f"--ch_base must be at least --size {args.size} (channels at resolution r are "
            f"min(ch_max, ch_base / r); got {args.ch_base}, which leaves none at {args.size}²).")
    heads = SMALL_TEXT["heads"]
    require(args.text_width % heads == 0,
            f"--text_width must be a multiple of the small text tower's {heads} heads "
            f"(got {args.text_width}).")
    for flag in ("lr", "tau"):
        value = getattr(args, flag)
        require(math.isfinite(value) and value > 0, f"--{flag} must be a finite number > 0 "
                                                     f"(got {value}).")
    for flag in ("r1_gamma", "w_text", "w_seg", "w_sketch", "w_style", "lambda_cx", "lambda_cy"):
        value = getattr(args, flag)
        require(math.isfinite(value) and value >= 0, f"--{flag} must be a finite number >= 0 "
                                                      f"(got {value}).")
    require(0 <= args.ema_decay <= 1, f"--ema_decay must be in [0, 1] (got {args.ema_decay}).")
    require(0 <= args.dropout_p < 1, f"--dropout_p must be in [0, 1) (got {args.dropout_p}).")
    require(not (args.pretrained and args.text_width),
            "--pretrained 1 uses the frozen CLIP text tower; pass --text_width 0 with it (or "
            "--pretrained 0 for the small tower).")
    require(args.pretrained or args.text_width,
            "--text_width 0 means the pretrained CLIP text tower; pass --pretrained 1 or a width "
            "for the small tower, e.g. 64.")
    require(not (args.eval and args.pretrained and args.eval_n < 2),
            f"--eval_n must be at least 2 with --pretrained 1: FID needs two images per set "
            f"(got {args.eval_n}).")
    require(not (args.eval and args.pretrained and args.size < 32),
            f"--eval with --pretrained 1 needs --size 32 or more: LPIPS-AlexNet's pooling leaves "
            f"nothing of a {args.size}x{args.size} image (got --size {args.size}).")
    # Eq. (11) on a random VGG-19 is at chance: it would only cost its forward pass
    require(not (common.training_run(args) and args.cx_features == "vgg" and not args.pretrained
                 and args.lambda_cx > 0),
            "--cx_features vgg with --pretrained 0 would train the image contrastive loss "
            "(Eq. 11) on a randomly initialised VGG-19; pass --pretrained 1 --text_width 0, an "
            "offline stand-in (--cx_features random+pixels) or --lambda_cx 0.")
    # Eq. (10)-(13) contrast each sample with the others of its batch (on its own rank): a batch
    # of one has no negatives and masked_contrastive returns 0 for every contrastive loss.
    per_rank = args.batch_size // common.world_size()
    require(not ((common.training_run(args) or args.bench) and per_rank < 2
                 and (args.lambda_cx > 0 or args.lambda_cy > 0)),
            f"--batch_size {args.batch_size} gives {per_rank} image per process, but the "
            f"contrastive losses (Eq. 10-13) need at least 2 per process to have negatives; "
            f"use a batch of at least {2 * common.world_size()} (or --lambda_cx 0 --lambda_cy 0).")


def channels_at(res, args):
    return min(args.ch_max, args.ch_base // res)


def z_channels_at(res, args):
    return max(1, min(args.z_max, args.z_base // res))


def resolutions(args):
    """r_1 = 4, r_{k+1} = 2 r_k, r_N = image size (§3.2)."""
    return [4 * 2 ** k for k in range(int(math.log2(args.size // 4)) + 1)]


# ----------------------------------------------------------------------------------------------
# Product of experts (§3.1-3.2)
# ----------------------------------------------------------------------------------------------

def limit_logvar(logvar, theta):
    """supp: the log-variance is softly limited to (-theta, theta) by theta * tanh(logvar / theta)."""
    return theta * torch.tanh(logvar / theta)


def product_of_experts(mu, logvar, mask):
    """Eq. (4): the product of Gaussian experts N(mu_i, var_i), i = 0 (the prior) .. M.

    mu, logvar: (B, E, ...) stacked experts; mask: (B, E), 1 where expert i is present for sample
    b (the prior, column 0, must be present). The paper's Eq. (4) prints 1 / sum(1/sigma_i^2) as
    sigma; that is the VARIANCE. We implement
        precision = sum_i m_i / var_i,   mu = sum_i (m_i / var_i) mu_i / precision,   var = 1 / precision
    in log-variance form: logvar = -logsumexp_i(-logvar_i), and the weights m_i / var_i / precision
    are a softmax over the present experts of -logvar_i (stable for extreme variances; an absent
    expert gets weight exactly 0, whatever its numbers).
    """
    present = mask.bool().reshape(mask.shape + (1,) * (mu.dim() - 2))    # (B, E, 1, ...)
    neg_logvar = torch.where(present, -logvar, torch.full_like(logvar, -float("inf")))
    weights = torch.softmax(neg_logvar, dim=1)                           # (B, E, ...)
    mu_out = (weights * torch.where(present, mu, torch.zeros_like(mu))).sum(1)
    logvar_out = -torch.logsumexp(neg_logvar, dim=1)
    return mu_out, logvar_out


def kl_diag_gaussians(mu_q, logvar_q, mu_p, logvar_p):
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) of diagonal Gaussians, elementwise:
    0.5 * (logvar_p - logvar_q + (var_q + (mu_q - mu_p)^2) / var_p - 1)."""
    return 0.5 * (logvar_p - logvar_q
                  + (logvar_q.exp() + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p) - 1)


def conditional_kl(mu0, logvar0, mu_i, logvar_i):
    """KL(p(z | y_i) || p(z)) elementwise, p(z | y_i) being the product of the prior and expert i
    alone (Eq. 3 with Y = {y_i}): the quantity Eq. (9) weighs and sums."""
    ones = torch.ones(mu0.shape[0], 2, device=mu0.device)
    mu_c, logvar_c = product_of_experts(torch.stack([mu0, mu_i], 1),
                                        torch.stack([logvar0, logvar_i], 1), ones)
    return kl_diag_gaussians(mu_c, logvar_c, mu0, logvar0)


def share_of_noise(draw, shape, share=(0, 1), generator=None, **kw):
    """`draw` (torch.randn or torch.rand) of `shape` for this process's rows of the global batch.

    share = (rank, world size). In training every process draws the noise of the whole global
    batch from the same generator state (train_step seeds it from --seed and the iteration) and
    keeps its own rows, the rows of the data it holds (common.batch_stream deals contiguous
    slices): a run draws the same numbers whatever the number of processes. One process, share
    (0, 1): a plain draw (from the global RNG when generator is None: sampling, evaluation)."""
    rank, world = share
    rows = shape[0]
    full = draw((rows * world,) + tuple(shape[1:]), generator=generator, **kw)
    return full[rank * rows:(rank + 1) * rows]


def sample_gaussian(mu, logvar, randn=None):
    """Reparameterised sample z = mu + exp(logvar / 2) * eps (std = exp(logvar / 2)); eps from
    randn(shape, device, dtype) (Generator.randn) or the global RNG."""
    eps = torch.randn_like(mu) if randn is None else randn(mu.shape, mu.device, mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


# ----------------------------------------------------------------------------------------------
# Modality encoders (§3.3; depths and widths of Supplement B are lost: our choice)
# ----------------------------------------------------------------------------------------------

def lrelu(x):
    return F.leaky_relu(x, 0.2)


def conv3(cin, cout, stride=1):
    return common.EqualConv2d(cin, cout, 3, stride, 1)


def conv1(cin, cout):
    return common.EqualConv2d(cin, cout, 1)


class SpatialEncoder(nn.Module):
    """Segmentation (one-hot) or sketch encoder: a CNN with input skip connections (§3.3).

    The input is average-pooled to every resolution and a 1x1 embedding of it is added to the
    stride-2 conv output there, so fine input detail reaches every scale. Returns the feature
    vector (B, feat_dim) and the skip features {res: (B, C_res, res, res)}.
    In G the vector feeds the global expert (Fig. 4a) and the skips the local experts (Fig. 4b).
    In D (as D_{y_i}, Eq. 7 and Fig. 5c) only the maps are used, projected onto the image features
    at each scale; D's spatial encoders are built with feat_dim=None: no vector (None), no layer.
    """

    def __init__(self, in_ch, args, feat_dim):
        super().__init__()
        res = resolutions(args)[::-1]                                    # size .. 4
        self.stem = conv3(in_ch, channels_at(res[0], args))
        self.down = nn.ModuleList(conv3(channels_at(r, args), channels_at(r // 2, args), 2)
                                  for r in res[:-1])
        self.input_skip = nn.ModuleList(conv1(in_ch, channels_at(r // 2, args)) for r in res[:-1])
        self.to_vec = (common.EqualLinear(channels_at(4, args) * 16, feat_dim) if feat_dim
                       else None)

    def forward(self, y):
        h = lrelu(self.stem(y))
        skips = {h.shape[-1]: h}
        for down, embed in zip(self.down, self.input_skip):
            y = F.avg_pool2d(y, 2)
            h = lrelu(down(h) + embed(y))
            skips[h.shape[-1]] = h
        return (self.to_vec(h.flatten(1)) if self.to_vec is not None else None), skips


class ResDown(nn.Module):
    """Residual block that halves the resolution: (skip(pool x) + pool(conv(conv x))) / sqrt 2."""

    def __init__(self, cin, cout, norm=False):
        super().__init__()
        self.norm1 = nn.InstanceNorm2d(cin) if norm else nn.Identity()
        self.norm2 = nn.InstanceNorm2d(cin) if norm else nn.Identity()
        self.conv1, self.conv2 = conv3(cin, cin), conv3(cin, cout)
        self.skip = conv1(cin, cout)

    def forward(self, x):
        h = self.conv1(lrelu(self.norm1(x)))
        h = F.avg_pool2d(self.conv2(lrelu(self.norm2(h))), 2)
        return (self.skip(F.avg_pool2d(x, 2)) + h) / math.sqrt(2)


class StyleEncoder(nn.Module):
    """Style reference encoder: a residual network with InstanceNorm; each block's output mean and
    std are concatenated into the style code (supp), then one linear layer to feat_dim."""

    def __init__(self, in_ch, args, feat_dim):
        super().__init__()
        res = resolutions(args)[::-1]
        self.stem = conv3(in_ch, channels_at(res[0], args))
        self.blocks = nn.ModuleList(ResDown(channels_at(r, args), channels_at(r // 2, args), True)
                                    for r in res[:-1])
        stats = 2 * sum(channels_at(r // 2, args) for r in res[:-1])
        self.to_vec = common.EqualLinear(stats, feat_dim)

    def forward(self, x):
        h, stats = self.stem(x), []
        for block in self.blocks:
            h = block(h)
            stats += [h.mean((2, 3)), h.flatten(2).std(2)]
        return self.to_vec(torch.cat(stats, 1))


def mlp(dims):
    """EqualLinear + LReLU stack (the last layer linear)."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(common.EqualLinear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


def byte_tokenizer():
    """CLIP's tokenizer with no BPE merges: byte-level, 514 ids, nothing to download."""
    return common.CLIPTokenizer(bpe_path="", context_length=SMALL_TEXT["context_length"])


def text_tokenizer(args):
    """The small tower's tokenizer: shapes captions' words on the built-in set (23 ids), CLIP's
    byte-level tokens elsewhere (real captions have an open vocabulary). Measured: on byte-level
    tokens the tower, trained from scratch with the GAN, had not learned the colour words in
    1,000 iterations; with one id per word it only has to learn what each id means."""
    if args.data == "shapes":
        return common.WordTokenizer(data.shapes_caption_vocabulary(), SMALL_TEXT["context_length"])
    return byte_tokenizer()


class TextEncoder(nn.Module):
    """Text -> feature vector: CLIP text features -> 4-layer MLP of width feat_dim (supp: frozen
    CLIP text encoder + 4-layer MLP of width 512). With --pretrained 1 the features come from the
    frozen ViT-B/32 text tower, computed once outside (Conditioner); offline (text_width > 0) this
    module owns a small randomly initialised CLIP-shaped text tower, trained with the network, on
    the words of the shapes captions (WordTokenizer) or, on other data, on byte-level tokens (our
    stand-in: it knows no language beyond the captions it is trained on)."""

    def __init__(self, args, feat_dim):
        super().__init__()
        self.tower = None
        if args.text_width:
            self.tower = common.CLIP.small(text_tokenizer(args).vocab_size, width=args.text_width,
                                           embed_dim=args.text_width, **SMALL_TEXT)
            self.tower.logit_scale.requires_grad_(False)                 # unused here
        self.mlp = mlp([args.text_width or 512] + [feat_dim] * 4)        # CLIP ViT-B/32: 512

    def forward(self, text):        # byte tokens (B, L) for the small tower, CLIP features (B, 512)
        return self.mlp(self.tower.encode_text(text) if self.tower is not None else text)


def make_encoders(args, num_classes, channels, modalities, feat_dim, spatial_vectors=True):
    """One encoder per modality; spatial_vectors=False (D) builds seg/sketch without a vector."""
    enc = nn.ModuleDict()
    spatial_dim = feat_dim if spatial_vectors else None
    if "text" in modalities:
        enc["text"] = TextEncoder(args, feat_dim)
    if "seg" in modalities:
        enc["seg"] = SpatialEncoder(num_classes, args, spatial_dim)
    if "sketch" in modalities:
        enc["sketch"] = SpatialEncoder(1, args, spatial_dim)
    if "style" in modalities:
        enc["style"] = StyleEncoder(channels, args, feat_dim)
    return enc


def encode_all(encoders, cond):
    """Feature vectors {name: (B, feat)} and spatial skips {name: {res: map}} of every modality
    (D's seg/sketch encoders give maps only: no entry in vecs)."""
    vecs, skips = {}, {}
    for name, enc in encoders.items():
        out = enc(cond[name])
        if name in SPATIAL:
            vec, skips[name] = out
            if vec is not None:
                vecs[name] = vec
        else:
            vecs[name] = out
    return vecs, skips


# ----------------------------------------------------------------------------------------------
# Generator (§3.2-3.3, Figs. 3-4)
# ----------------------------------------------------------------------------------------------

class LGAdaIN(nn.Module):
    """Eq. (5): LG-AdaIN(h, z, w) = gamma_w * (gamma_z * (h - mu(h)) / sigma(h) + beta_z) + beta_w.

    mu, sigma: channel-wise instance statistics; gamma_w, beta_w vectors from w (initialised to 1,
    0); gamma_z = 1 + conv(z), beta_z = conv(z) maps from z^k (SPADE's 1 + gamma: our choice).
    The z^k conv keeps its ordinary N(0, 1) equalised-lr init (as SPADE's). It must not start at
    zero: then z^k has no effect on the image, the GAN gives the local experts no gradient, and the
    KL (Eq. 9), which acts from the first step, switches the seg/sketch experts off (log-variance
    +2.5..+8 vs the prior's -0.9: 0.1-4% of the precision) long before the zero weights have
    grown (equalised lr: an Adam step moves the effective weight by lr / sqrt(9 c_k)); the
    experts never recover.
    """

    def __init__(self, channels, w_dim, z_ch):
        super().__init__()
        self.global_affine = common.EqualLinear(w_dim, 2 * channels)
        with torch.no_grad():
            self.global_affine.bias[:channels] = 1.0
        self.local_affine = conv3(z_ch, 2 * channels)

    def forward(self, h, z, w):
        gamma_w, beta_w = self.global_affine(w)[:, :, None, None].chunk(2, 1)   # (B, C, 1, 1)
        gamma_z, beta_z = self.local_affine(z).chunk(2, 1)                       # (B, C, H, W)
        normed = F.instance_norm(h, eps=1e-5)
        return gamma_w * ((1 + gamma_z) * normed + beta_z) + beta_w


class GaussianHead(nn.Module):
    """(mu, logvar) of a z^k map from features: 1x1 conv to a hidden width, 3x3, 1x1 to 2 c_k
    (a shortened form of the ports' 1x1-3x3-3x3-1x1 head; Supplement B's is lost: our choice),
    logvar limited by theta * tanh(. / theta)."""

    def __init__(self, cin, z_ch, theta, hidden):
        super().__init__()
        self.net = nn.Sequential(conv1(cin, hidden), nn.LeakyReLU(0.2), conv3(hidden, hidden),
                                 nn.LeakyReLU(0.2), conv1(hidden, 2 * z_ch))
        self.theta = theta

    def forward(self, x):
        mu, logvar = self.net(x).chunk(2, 1)
        return mu, limit_logvar(logvar, self.theta)


class DecoderBlock(nn.Module):
    """Fig. 4b: Local PoE-Net samples z^k, LG-AdaIN modulates the residual branch.

    Prior p(z^k|z^<k) from the previous layer's output h; experts q(z^k|z^<k, y_i) from
    concat(h, skip_i) for i in {seg, sketch} only (§3.3). With --fusion concat (Table 3 row (a))
    z^k is instead a conv of concat(h, skips zeroed when absent, noise): no experts, no KL.
    """

    def __init__(self, cin, cout, res, args, skip_ch, spatial):
        super().__init__()
        self.res, self.spatial, self.fusion = res, spatial, args.fusion
        z_ch = self.z_ch = z_channels_at(res, args)
        if args.fusion == "poe":
            hidden = max(cin // 4, 8)
            self.prior = GaussianHead(cin, z_ch, THETA_PRIOR, hidden)
            self.experts = nn.ModuleDict({s: GaussianHead(cin + skip_ch, z_ch, THETA_EXPERT,
                                                          hidden) for s in spatial})
        else:
            self.fuse = conv3(cin + skip_ch * len(spatial) + z_ch, z_ch)
        self.conv1, self.conv2 = conv3(cin, cout), conv3(cout, cout)
        self.norm1, self.norm2 = LGAdaIN(cout, args.w_dim, z_ch), LGAdaIN(cout, args.w_dim, z_ch)
        self.shortcut = conv1(cin, cout)

    def local_latent(self, h, skips, mask, randn):
        """z^k (B, c_k, r, r) and {modality: elementwise KL (B, c_k, r, r)} of Eq. (9), reduced
        by kl_loss (empty for concat)."""
        if self.fusion == "concat":
            parts = [h] + [skips[s][self.res] * mask[s][:, None, None, None] for s in self.spatial]
            noise = randn((h.shape[0], self.z_ch, self.res, self.res), h.device, h.dtype)
            return self.fuse(torch.cat(parts + [noise], 1)), {}
        mu0, lv0 = self.prior(h)
        mus, lvs, present = [mu0], [lv0], [torch.ones(h.shape[0], device=h.device)]
        for s in self.spatial:
            mu, lv = self.experts[s](torch.cat([h, skips[s][self.res]], 1))
            mus.append(mu), lvs.append(lv), present.append(mask[s])
        mu, lv = product_of_experts(torch.stack(mus, 1), torch.stack(lvs, 1),
                                    torch.stack(present, 1))
        # Eq. (9)'s KL(p(z^k | z^<k, y_i) || p(z^k | z^<k)) of each spatial modality, per element
        kls = {s: conditional_kl(mu0, lv0, mus[i], lvs[i]) for i, s in enumerate(self.spatial, 1)}
        return sample_gaussian(mu, lv, randn), kls

    def forward(self, h, w, skips, mask, randn):
        if self.res > 4:
            h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
        z, kls = self.local_latent(h, skips, mask, randn)
        x = lrelu(self.norm1(self.conv1(h), z, w))
        x = lrelu(self.norm2(self.conv2(x), z, w))
        return (self.shortcut(h) + x) / math.sqrt(2), kls


class Generator(nn.Module):
    """Encoders -> Global PoE-Net (z^0 -> w) -> constant -> decoder blocks 4 .. size -> image."""

    def __init__(self, args, num_classes, channels, modalities):
        super().__init__()
        self.modalities, self.fusion = tuple(modalities), args.fusion
        self.spatial = tuple(s for s in SPATIAL if s in modalities)
        self.encoders = make_encoders(args, num_classes, channels, modalities, args.feat_dim)
        if args.fusion == "poe":    # Fig. 4a: one MLP per modality -> (mu_i^0, logvar_i^0)
            self.global_experts = nn.ModuleDict({m: mlp([args.feat_dim, args.feat_dim,
                                                         2 * args.z0_dim]) for m in modalities})
        else:                       # row (a): concatenated embeddings (zero when absent) + noise
            self.global_fuse = mlp([args.feat_dim * len(modalities) + args.z0_dim,
                                    args.z0_dim, args.z0_dim])
        self.mapping = nn.Sequential(common.PixelNorm(), mlp([args.z0_dim, args.w_dim,
                                                              args.w_dim]))   # z^0 -> w (supp: 2 FC)
        res = resolutions(args)
        self.const = nn.Parameter(torch.randn(1, channels_at(4, args), 4, 4))
        self.first = conv3(channels_at(4, args), channels_at(4, args))  # footnote 4: conv on const
        self.blocks = nn.ModuleList()
        for r in res:
            cin = channels_at(max(r // 2, 4), args)
            self.blocks.append(DecoderBlock(cin, channels_at(r, args), r, args,
                                            channels_at(r, args), self.spatial))
        self.to_rgb = conv3(channels_at(res[-1], args), channels)
        self.z0_dim = args.z0_dim
        # Where the latents' noise comes from (share_of_noise): the global RNG, in one process,
        # unless train() sets a generator and this process's (rank, world size).
        self.noise, self.share = None, (0, 1)

    def global_posterior(self, vecs, mask, batch, device):
        """Fig. 4a: (mu, logvar) of p(z^0 | Y), the product of p(z^0) = N(0, I) and the present
        modalities' experts, and the KL of each single-modality conditional to the prior
        {modality: (B, z0_dim)}, per element."""
        zeros = torch.zeros(batch, self.z0_dim, device=device)
        mus, lvs, present, kls = [zeros], [zeros], [torch.ones(batch, device=device)], {}
        for m in self.modalities:
            mu, lv = self.global_experts[m](vecs[m]).chunk(2, 1)
            lv = limit_logvar(lv, THETA_EXPERT)
            mus.append(mu), lvs.append(lv), present.append(mask[m])
            kls[m] = conditional_kl(zeros, zeros, mu, lv)          # Eq. (9), k = 0: (B, z0_dim)
        mu, lv = product_of_experts(torch.stack(mus, 1), torch.stack(lvs, 1),
                                    torch.stack(present, 1))
        return mu, lv, kls

    def global_latent(self, vecs, mask, batch, device):
        """z^0 (B, z0_dim) and the global KL terms."""
        if self.fusion == "concat":
            parts = [vecs[m] * mask[m][:, None] for m in self.modalities]
            noise = self.randn((batch, self.z0_dim), device, torch.float32)
            return self.global_fuse(torch.cat(parts + [noise], 1)), {}
        mu, lv, kls = self.global_posterior(vecs, mask, batch, device)
        return sample_gaussian(mu, lv, self.randn), kls

    def randn(self, shape, device, dtype):
        """The latents' noise: this process's rows of the global batch's (share_of_noise)."""
        return share_of_noise(torch.randn, shape, self.share, self.noise, device=device,
                              dtype=dtype)

    def forward(self, cond, mask):
        """cond: {modality: input tensor}; mask: (B, len(modalities)) presence, 1 = given.
        Returns the image (B, C, H, W) and the KL terms of Eq. (9), per element:
        [(modality, level k, (B, z0_dim) at k = 0 or (B, c_k, r_k, r_k))], reduced by kl_loss."""
        batch, device = mask.shape[0], mask.device
        masks = {m: mask[:, i].float() for i, m in enumerate(self.modalities)}
        vecs, skips = encode_all(self.encoders, cond)
        z0, kl0 = self.global_latent(vecs, masks, batch, device)
        w = self.mapping(z0)
        kls = [(m, 0, v) for m, v in kl0.items()]
        h = lrelu(self.first(self.const.expand(batch, -1, -1, -1)))
        for k, block in enumerate(self.blocks, 1):
            h, kl = block(h, w, skips, masks, self.randn)
            kls += [(m, k, v) for m, v in kl.items()]
        return torch.tanh(self.to_rgb(h)), kls


# ----------------------------------------------------------------------------------------------
# Multiscale multimodal projection discriminator (§3.4, Eq. 7, Fig. 5c)
# ----------------------------------------------------------------------------------------------

class Discriminator(nn.Module):
    """f(x, Y) = Linear(D_x(x)) + sum_{y_i in Y} D_{y_i}(y_i)^T D_x(x)   (Eq. 7)

    at every resolution of the image encoder (size/2 .. 4) for the spatial modalities (a logit per
    location) and once more on the global image embedding for text and style (a vector each).
    forward returns the list of logit maps (per scale (B, 1, r, r), global (B, 1)) and the global
    embeddings {"image": D_x, "text": D_text} for the conditional contrastive loss (Eq. 12-13)
    (and "maps", the image features D_x at each scale).

    Text and style are vectors with no layout, so (§3.4, Fig. 5b) they are projected on the one
    global image embedding; only the spatial modalities get the multiscale projection (Fig. 5c).
    The loss averages the logits over locations, then over resolutions (common.ns_*_loss), as
    §3.4 says. At each scale the linear term reads lrelu(h) and the projection the block output h
    itself (our choice: the paper gives no D_x detail beyond Eq. 7).

    --discriminator concat (Table 3 row (d), "w/o MMPD"): no projection; the image and every given
    input enter together, the label map and sketch concatenated to the image (zero when absent),
    the text and style vectors to the global image embedding (zero when absent) before its
    linear logit. The per-scale unconditional logits stay, so only the conditioning differs.
    """

    def __init__(self, args, num_classes, channels, modalities):
        super().__init__()
        self.modalities = tuple(modalities)
        self.spatial = tuple(s for s in SPATIAL if s in modalities)
        self.vector_mods = tuple(m for m in modalities if m not in SPATIAL)
        self.concat = args.discriminator == "concat"
        res = resolutions(args)[::-1]                                    # size .. 4
        self.scales = res[1:]                                            # size/2 .. 4
        cin = channels
        if self.concat:     # row (d): one-hot label map and sketch stacked on the image
            cin += (num_classes if "seg" in modalities else 0) + ("sketch" in modalities)
        self.from_rgb = conv3(cin, channels_at(res[0], args))
        self.blocks = nn.ModuleList(ResDown(channels_at(r, args), channels_at(r // 2, args))
                                    for r in res[:-1])
        self.uncond = nn.ModuleList(conv1(channels_at(r, args), 1) for r in self.scales)
        emb = args.feat_dim
        self.to_emb = common.EqualLinear(channels_at(4, args) * 16, emb)
        self.uncond_global = common.EqualLinear(emb * (1 + len(self.vector_mods) * self.concat), 1)
        # D_{y_i}: its own encoders. Fig. 5c: seg and sketch are encoded into feature maps (the
        # image's channel counts at each scale) and projected there only; they have no vector
        # (a global one would feed no term of Eq. 7). Text and style give vectors (Fig. 5b).
        self.encoders = make_encoders(args, num_classes, channels,
                                      self.vector_mods if self.concat else modalities, emb,
                                      spatial_vectors=False)

    def encode(self, cond):
        """D_{y_i}(y_i) of every modality: reusable for the real and the fake images."""
        return encode_all(self.encoders, cond)

    def forward(self, x, cond, mask, encoded=None):
        masks = {m: mask[:, i].float() for i, m in enumerate(self.modalities)}
        vecs, skips = encoded if encoded is not None else self.encode(cond)
        if self.concat:                                                  # row (d)
            x = torch.cat([x] + [cond[s] * masks[s][:, None, None, None] for s in self.spatial], 1)
        h, logits, feats = self.from_rgb(x), [], []
        for block, uncond in zip(self.blocks, self.uncond):
            h = block(h)
            feats.append(h)
            f = uncond(lrelu(h))                                         # (B, 1, r, r)
            for s in () if self.concat else self.spatial:                # Eq. (7) per location
                f = f + masks[s][:, None, None, None] * (skips[s][h.shape[-1]] * h).sum(1, True)
            logits.append(f)
        image_emb = self.to_emb(lrelu(h).flatten(1))                     # D_x(x), (B, emb)
        if self.concat:                                                  # row (d)
            given = [vecs[m] * masks[m][:, None] for m in self.vector_mods]
            logits.append(self.uncond_global(torch.cat([image_emb] + given, 1)))
        else:                                                            # Eq. (7), global
            f = self.uncond_global(image_emb)                            # (B, 1)
            for m in self.vector_mods:
                f = f + masks[m][:, None] * (vecs[m] * image_emb).sum(1, True)
            logits.append(f)
        return logits, {"image": image_emb, "text": vecs.get("text"), "maps": feats}


# ----------------------------------------------------------------------------------------------
# Losses (§3.5)
# ----------------------------------------------------------------------------------------------

def kl_loss(kls, mask, modalities, args):
    """Eq. (9): L_KL = sum_{y_i in Y} omega_i sum_k omega^k E[KL(p(z^k | z^<k, y_i) || p(z^k | z^<k))],
    p(z^k | z^<k, y_i) being the product of the prior and expert i alone (conditional_kl). Our copy
    of Eq. (9) is cut off; this is the text's definition. kls: G's elementwise terms.

    The reductions, the whole of Eq. (9) in one place (the supplement's omega^k is lost):
      channels    summed: the KL of the vector z^k at one location (all of z^0 at k = 0);
      locations   of a local z^k: averaged (--kl_locations mean, both presets: omega^k = 1/r_k^2
                  relative to the map's full KL, so a level does not weigh more as r_k grows; one
                  z^k element of the 256^2 level then weighs 1/65,536 of a z^0 element) or summed
                  (sum: omega^k = 1, the KL of the whole map); our choice;
      levels      omega^k = 1 otherwise; modalities omega_i (--w_text, --w_seg, ...);
      batch       averaged over all samples, a sample counting 0 where y_i is not given (the
                  sum runs over the present modalities).
    The expectation over z^<k uses the z^<k of the current forward pass (whose subset contains
    y_i), not a pass with y_i alone: our choice, one pass instead of M + 1."""
    weight = {"text": args.w_text, "seg": args.w_seg, "sketch": args.w_sketch,
              "style": args.w_style}
    total = torch.zeros((), device=mask.device)
    for name, level, kl in kls:
        per_sample = kl.sum(1)                                        # channels: (B,) or (B, r, r)
        if level > 0:
            per_sample = (per_sample.mean((1, 2)) if args.kl_locations == "mean"
                          else per_sample.sum((1, 2)))                # locations
        present = mask[:, modalities.index(name)].float()
        total = total + weight[name] * (per_sample * present).mean()  # Eq. (9)
    return total


class RandomConvFeatures(nn.Module):
    """Offline stand-in for the pooled VGG features of Eq. (11) (our choice; no pretrained VGG on
    the CPU preset): a fixed two-layer conv net with seeded random weights (never trained), its
    ReLU features average-pooled over all locations as the VGG relu5_1 features are (supp). They
    say what is drawn (colours, edges, stripes), not where."""

    def __init__(self, channels, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w1 = torch.randn(32, channels, 3, 3, generator=g) / math.sqrt(9 * channels)
        w2 = torch.randn(64, 32, 3, 3, generator=g) / math.sqrt(9 * 32)      # (out, in, 3, 3)
        self.register_buffer("w1", w1)
        self.register_buffer("w2", w2)

    def forward(self, x):                                                # (B, C, H, W) in [-1, 1]
        h = F.relu(F.conv2d(x, self.w1, padding=1))
        h = F.relu(F.conv2d(F.avg_pool2d(h, 2), self.w2, padding=1))
        return h.mean((2, 3))                                            # (B, 64)


def image_features(x, net, kind):
    """E_vgg for Eq. (11), by --cx_features (net: make_image_net's):
      vgg            VGG-19 relu5_1, global-average pooled (supp)
      pixels         the image average-pooled to 8x8 (says where the colours are)
      random         RandomConvFeatures (what is drawn, not where)
      random+pixels  both, each part unit length, so the cosine of Eq. (10) is the mean of the two
    The three offline ones are our stand-ins and know nothing of semantics. Measured on shapes
    (1,000 iterations, two seeds): "pixels" alone, for a modality that gives no layout (style, text), makes the faint
    average of all layouts the contrastive optimum (style alone gave faint haze); "random" alone
    leaves the label map and sketch to the GAN loss, which at the CPU budget did not learn them on
    one of two seeds; "random+pixels" is the CPU preset's."""
    if kind == "vgg":
        return net((x + 1) / 2, ["relu5_1"])["relu5_1"].mean((2, 3))
    parts = []
    if kind in ("random", "random+pixels"):
        parts.append(net(x))
    if kind in ("pixels", "random+pixels"):
        parts.append(F.adaptive_avg_pool2d(x, 8).flatten(1))
    return parts[0] if len(parts) == 1 else torch.cat([F.normalize(p, dim=1) for p in parts], 1)


def contrastive_loss(u, v, tau):
    """Eq. (10): symmetric cross-entropy over a batch of pairs (CLIP's loss), u, v (N, D):
    -1/(2N) sum_i [log softmax_j(cos(u_i, v_j) / tau)_i + log softmax_j(cos(u_j, v_i) / tau)_i]."""
    logits = F.normalize(u, dim=1) @ F.normalize(v, dim=1).t() / tau          # (N, N)
    target = torch.arange(len(u), device=u.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def masked_contrastive(u, v, keep, tau):
    """Eq. (10) over the pairs with keep = True; 0 with fewer than two. contrastive_loss of the
    kept pairs, without a host sync (no `if keep.sum() < 2`, no u[keep]): the other pairs leave
    both softmaxes (logit = the smallest float, whose exp is exactly 0) and the means. A single
    kept pair is its own only candidate: loss exactly 0."""
    keep = keep.bool()
    pair = keep[:, None] & keep[None, :]
    logits = F.normalize(u, dim=1) @ F.normalize(v, dim=1).t() / tau              # (N, N)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # as cross_entropy's
    logits = logits.masked_fill(~pair, torch.finfo(logits.dtype).min)
    log_p = logits.log_softmax(1).diagonal() + logits.log_softmax(0).diagonal()   # u->v, v->u
    weight = keep.float()
    return -0.5 * (log_p * weight).sum() / weight.sum().clamp(min=1)


def r1_score(logits):
    """One scalar per sample: logits averaged over locations, then over resolutions."""
    return torch.stack([f.flatten(1).mean(1) for f in logits], 0).mean(0)


# ----------------------------------------------------------------------------------------------
# Training step (§3.5, Eq. 14)
# ----------------------------------------------------------------------------------------------

def dropout_mask(batch, n_modalities, p, device, share=(0, 1), generator=None):
    """Modality dropout (§3.5): each modality of each sample dropped with probability p (per
    sample: our choice; the paper says only "randomly dropping out some input modalities")."""
    draw = share_of_noise(torch.rand, (batch, n_modalities), share, generator, device=device)
    return (draw >= p).float()


def as_float32(encoded):
    """D's encodings of the conditions (vectors, maps), in float32 (for R1)."""
    vecs, skips = encoded
    return ({m: v.float() for m, v in vecs.items()},
            {m: {r: f.float() for r, f in maps.items()} for m, maps in skips.items()})


def train_step(G, D, opt_g, opt_d, real, cond, it, args, rt, image_net):
    """One iteration (Eq. 14): the fakes are drawn once (as pix2pixHD), G steps against the current
    D (whose weights get no gradient), then D steps on the same fakes, detached. Returns the
    logged losses as 0-dim tensors on the device: no host sync in the step (nothing is read)."""
    g, d = common.unwrap(G), common.unwrap(D)
    mods = g.modalities
    B = real.shape[0]
    p = 0.0 if args.no_modality_dropout else args.dropout_p
    if g.noise is not None:   # train(): this step's noise, a function of (--seed, it) alone
        g.noise.manual_seed(args.seed * 1_000_003 + it)
    mask = dropout_mask(B, len(mods), p, rt.device, g.share, g.noise)
    has_text = mask[:, mods.index("text")] if "text" in mods else torch.zeros(B, device=rt.device)
    zero = torch.zeros((), device=rt.device)

    # --- G: L^G = L^G_GAN + L_KL + lambda1 L_cx + lambda2 L^G_cy
    trainable_d = [q for q in d.parameters() if q.requires_grad]   # what was frozen stays so
    for param in trainable_d:
        param.requires_grad_(False)
    with rt.autocast():
        fake, kls = G(cond, mask)
        encoded = d.encode(cond)
        fake_logits, fake_emb = D(fake, cond, mask, encoded)
        loss_g = common.ns_g_loss(fake_logits)
        kl = zero if args.no_kl or args.fusion == "concat" else kl_loss(kls, mask, mods, args)
        if args.kl_warmup:   # optional NVAE-style warm-up (our addition, off in every preset)
            kl = kl * min(1.0, it / args.kl_warmup)
        any_given = mask.sum(1) > 0     # the real image is a positive only if something was given
        cx = zero if not args.lambda_cx else masked_contrastive(          # Eq. (11)
            image_features(real, image_net, args.cx_features),
            image_features(fake, image_net, args.cx_features), any_given, args.tau)
        cy_g = (masked_contrastive(fake_emb["image"], fake_emb["text"], has_text, args.tau)
                if "text" in mods else zero)                                # Eq. (13)
    total_g = loss_g + kl + args.lambda_cx * cx + args.lambda_cy * cy_g     # Eq. (14), G
    opt_g.zero_grad(set_to_none=True)
    rt.scaler.scale(total_g).backward()
    rt.scaler.unscale_(opt_g)
    nn.utils.clip_grad_norm_(G.parameters(), GRAD_CLIP)
    rt.scaler.step(opt_g)
    for param in trainable_d:
        param.requires_grad_(True)

    # --- D: L^D = L^D_GAN + lambda2 L^D_cy (+ lambda3 L_GP every r1_every steps, lazy)
    with rt.autocast():
        encoded = d.encode(cond)
        real_logits, real_emb = D(real, cond, mask, encoded)
        fake_logits, _ = D(fake.detach(), cond, mask, encoded)
        loss_d = common.ns_d_loss(real_logits, fake_logits)
        cy_d = (masked_contrastive(real_emb["image"], real_emb["text"], has_text, args.tau)
                if "text" in mods else zero)                                # Eq. (12)
    total_d = loss_d + args.lambda_cy * cy_d                                # Eq. (14), D
    r1 = zero
    if args.r1_gamma > 0 and it % args.r1_every == 0:
        real_r1 = real.detach().float().requires_grad_(True)
        # Eager and float32 on purpose. Eager: the R1 gradient is differentiated again (double
        # backward), which torch.compile cannot do, so it runs on the plain module d even under
        # --compile (under DDP its gradients still reach d's parameters in this backward). Float32
        # even under --dtype bfloat16: R1's double backward through bf16 convolutions took 4.5x
        # the float32 time on an H200 (cuDNN; measured with ummgan.py's R1).
        # (no autocast to switch off where the device has none: training_flops' meta device)
        with torch.autocast(rt.device.type, enabled=False) \
                if torch.amp.is_autocast_available(rt.device.type) else contextlib.nullcontext():
            logits, _ = d(real_r1, cond, mask, as_float32(encoded))
            r1 = common.r1_penalty(r1_score(logits).float(), real_r1)
        total_d = total_d + args.r1_gamma / 2 * r1 * args.r1_every      # lazy: scaled by interval
    opt_d.zero_grad(set_to_none=True)
    rt.scaler.scale(total_d).backward()
    rt.scaler.unscale_(opt_d)
    nn.utils.clip_grad_norm_(D.parameters(), GRAD_CLIP)
    rt.scaler.step(opt_d)
    rt.scaler.update()
    stats = dict(loss_d=loss_d, loss_g=loss_g, kl=kl, cx=cx, cy_d=cy_d, cy_g=cy_g, r1=r1)
    return {k: v.detach() for k, v in stats.items()}    # tensors: read at log steps only


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------

def dataset_info(args):
    if args.data in DATA_INFO:
        return DATA_INFO[args.data]
    ds = data.get_dataset(args.data, split="train", size=args.size)    # built-in: no files
    return dict(num_classes=ds.num_classes, channels=ds.channels,
                modalities=tuple(m for m in MODALITIES if ITEM_KEY[m] in ds.has))


def build(args, info=None):
    info = info or dataset_info(args)
    mods = info["modalities"]
    G = Generator(args, info["num_classes"], info["channels"], mods)
    D = Discriminator(args, info["num_classes"], info["channels"], mods)
    return G, D


class Conditioner:
    """Turns a batch into the networks' inputs: one-hot labels, sketches, style images and text
    (byte tokens for the small towers, frozen CLIP features otherwise)."""

    def __init__(self, args, info, device, weights=True):
        self.modalities, self.num_classes, self.device = info["modalities"], info["num_classes"], device
        self.clip, self.tokenizer = None, None
        if "text" in self.modalities:
            if args.pretrained:   # weights=False: same tower, random weights (--bench, offline)
                self.clip = common.CLIP("ViT-B/32", pretrained=weights, vision=False).to(device)
                self.tokenizer = common.CLIPTokenizer(bpe_path=None if weights else "")
            else:
                self.tokenizer = text_tokenizer(args)

    @torch.no_grad()
    def text(self, captions):
        ids = self.tokenizer(list(captions), truncate=True)
        # The towers are causal and pool at EOT (the largest id of a row): the padding after the
        # longest row's EOT is never read, so it is cut (CLIP's 77 tokens: ~5x less work).
        ids = ids[:, :int(ids.argmax(1).max()) + 1].to(self.device)
        return ids if self.clip is None else self.clip.encode_text(ids).float()

    def __call__(self, batch):
        cond = {}
        for m in self.modalities:
            value = batch[ITEM_KEY[m]]
            if m == "text":
                cond[m] = self.text(value)
            elif m == "seg":
                label = value.long()    # checked where it is: on the host in training (no sync)
                if label.min() < 0 or label.max() >= self.num_classes:
                    raise common.UserError(f"label values must lie in [0, {self.num_classes - 1}]"
                                           f" (found {int(label.min())}..{int(label.max())}).")
                label = label.to(self.device, non_blocking=True)
                cond[m] = F.one_hot(label, self.num_classes).permute(0, 3, 1, 2).float()
            else:
                cond[m] = value.to(self.device, non_blocking=True).float()
        return cond


def load_data(args, split="train"):
    root = None if args.data == "shapes" else args.data_dir
    ds = data.get_dataset(args.data, root=root, split=split, size=args.size)
    mods = tuple(m for m in MODALITIES if ITEM_KEY[m] in ds.has)
    expected = dataset_info(args)
    if mods != tuple(expected["modalities"]) or ds.num_classes != expected["num_classes"]:
        raise common.UserError(f"{args.data} provides modalities {mods} with {ds.num_classes} "
                               f"classes, but poe_gan.py expects {expected['modalities']} with "
                               f"{expected['num_classes']}.")
    return ds


def make_image_net(args, device, weights=True):
    """The network behind image_features: VGG-19 (--cx_features vgg), the fixed random conv net
    (random, random+pixels) or none (pixels, or --lambda_cx 0: Eq. (11) is not computed)."""
    if args.cx_features == "pixels" or not args.lambda_cx:
        return None
    if args.cx_features == "vgg":
        return common.VGG19(pretrained=bool(args.pretrained) and weights).to(device).eval() \
            .requires_grad_(False)
    return RandomConvFeatures(dataset_info(args)["channels"]).to(device)


def train(args):
    rt = common.setup_runtime(args)
    ds = load_data(args)
    info = dataset_info(args)
    G, D = build(args, info)
    G, D = G.to(rt.device), D.to(rt.device)  # before --resume loads Adam's state onto their device
    ema = common.EMA(G, args.ema_decay)
    # The training noise (latents, modality dropout) comes from its own generator, reseeded at
    # every step from (--seed, iteration), and each process keeps its rows of the global batch's
    # draw: the same noise for every number of processes, whatever the data loading drew from the
    # global RNG, and after --resume. (The EMA copy samples its grids from the global RNG.)
    G.noise, G.share = torch.Generator(rt.device), (rt.rank, rt.world_size)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.0, 0.99))
    objects = dict(G=G, D=D, ema=ema, opt_g=opt_g, opt_d=opt_d, scaler=rt.scaler)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    start = 0
    means = common.LossMeans(rt.device)  # the losses since the last log line
    if args.resume:
        start = common.load_checkpoint(ckpt_path, "poe_gan", vars(args), ARCH_KEYS,
                                       objects, rt=rt, per_rank=dict(log_means=means))["iter"]
    ema.model.to(rt.device)
    Gt = common.prepare_model(G, rt, args.compile)
    Dt = common.prepare_model(D, rt, args.compile)
    image_net = make_image_net(args, rt.device)
    cond_of = Conditioner(args, info, rt.device)
    stream = common.batch_stream(ds, args.batch_size, rt, args.seed, start, args.num_workers)
    one_process = common.Runtime(rt.device, rt.dtype)     # the grids' inputs: rank 0's alone
    with common.preserved_rng():    # grids must not move the training RNG (resume)
        fixed = next(iter(common.batch_stream(ds, min(4, len(ds)), one_process, args.seed + 1)))
    log = common.Logger(args.out_dir, args.iters, start, rt.is_main)
    with common.StopSignals() as signals:
        for it in range(start, args.iters):
            batch = next(stream)                 # on the host: Conditioner checks labels there
            real = batch["image"].to(rt.device, non_blocking=True)
            stats = train_step(Gt, Dt, opt_g, opt_d, real, cond_of(batch), it, args, rt, image_net)
            means.add(stats)
            ema.update(G)
            done = it + 1
            log.step(args.batch_size)
            if done % args.log_every == 0 or done == args.iters:
                log.log(done, **means.pop(rt))
            if rt.is_main and (done % args.sample_every == 0 or done == args.iters):
                with common.preserved_rng():
                    subset_grid(ema.model, fixed, cond_of, ds,
                                os.path.join(args.out_dir, f"samples_{done:06d}.png"))
            signals.end_of_step(rt, args, done, ckpt_path, lambda: common.save_checkpoint(
                ckpt_path, "poe_gan", args, done, objects, rt=rt, per_rank=dict(log_means=means)))
    log.close()


# ----------------------------------------------------------------------------------------------
# Sampling controls: the Fig. 1 grid
# ----------------------------------------------------------------------------------------------

def all_subsets(modalities):
    """Every subset of the modalities, the empty set first, then by size: [(), ('text',), ...]."""
    return [s for k in range(len(modalities) + 1) for s in itertools.combinations(modalities, k)]


def subset_mask(subset, modalities, batch, device):
    return torch.tensor([[float(m in subset) for m in modalities]] * batch, device=device)


def caption_tile(text, size):
    """The caption drawn on a white tile (PIL's built-in font), as an image in [-1, 1]."""
    from PIL import Image, ImageDraw
    scale = 4 if size < 64 else 1
    canvas = Image.new("RGB", (size * scale, size * scale), "white")
    draw, words, lines = ImageDraw.Draw(canvas), text.split(), [""]
    for word in words:
        if len(lines[-1]) + len(word) + 1 > size * scale // 6:
            lines.append("")
        lines[-1] = (lines[-1] + " " + word).strip()
    for i, line in enumerate(lines):
        draw.text((2, 2 + 11 * i), line, fill="black")
    arr = torch.from_numpy(np.array(canvas.resize((size, size) if scale == 1 else
                                                    (size * 2, size * 2)))).permute(2, 0, 1)
    return arr.float() / 127.5 - 1


@torch.no_grad()
def subset_grid(G, batch, cond_of, ds, path, n_inputs=2, n_samples=4):
    """Fig. 1: for each input, one row per modality subset (the empty set included): the given
    inputs (blank where withheld) followed by n_samples samples."""
    G.eval()
    device = next(G.parameters()).device
    mods, rows = G.modalities, []
    size = batch["image"].shape[-1]
    blank = torch.ones(3, size, size)
    for j in range(min(n_inputs, len(batch["image"]))):
        one = {k: (v[j:j + 1].repeat(n_samples, *[1] * (v.dim() - 1)) if torch.is_tensor(v)
                   else [v[j]] * n_samples) for k, v in batch.items()}
        cond = cond_of(one)
        shown = {"text": caption_tile(batch["caption"][j], size) if "text" in mods else None,
                 "seg": batch["label"][j].cpu() if "seg" in mods else None,
                 "sketch": batch["sketch"][j].cpu() * 2 - 1 if "sketch" in mods else None,
                 "style": batch["style"][j].cpu() if "style" in mods else None}
        rows.append([batch["image"][j].cpu()] + [blank] * (len(mods) + n_samples))
        for subset in all_subsets(mods):
            x, _ = G(cond, subset_mask(subset, mods, n_samples, device))
            rows.append([blank] + [shown[m] if m in subset else blank for m in mods]
                        + list(x.cpu()))
    common.save_grid(path, rows, palette=ds.palette)
    return rows


def load_generator(args, info, rt):
    """The EMA generator of out_dir/ckpt.pt, on the device, in eval mode (--sample, --eval)."""
    G, _ = build(args, info)
    ema = common.EMA(G)
    common.load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), "poe_gan", vars(args),
                           ARCH_KEYS, {"ema": ema}, restore_rng=False)
    return ema.model.to(rt.device).eval()


def sample(args):
    """--sample: two Fig. 1 grids (two test inputs each, every subset, six samples per row)."""
    rt = common.setup_runtime(args)
    info = dataset_info(args)
    G = load_generator(args, info, rt)
    ds = load_data(args, split="test")
    batch = next(iter(common.batch_stream(ds, min(4, len(ds)), rt, args.seed + 2)))
    cond_of = Conditioner(args, info, rt.device)
    for j in range((len(batch["image"]) + 1) // 2):       # a test split of 1-3 items: fewer grids
        one = {k: v[j * 2:(j + 1) * 2] for k, v in batch.items()}
        path = os.path.join(args.out_dir, f"subsets_{j}.png")
        subset_grid(G, one, cond_of, ds, path, n_inputs=2, n_samples=6)
        print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------
# Evaluation: per modality subset (Tables 1-4 layout)
# ----------------------------------------------------------------------------------------------

def pixel_diversity(a, b):
    """Mean absolute pixel difference of two samples per input (offline LPIPS stand-in)."""
    return (a - b).abs().flatten(1).mean(1)


class SubsetScores:
    """Everything --eval measures for one set of images (one modality subset, or the real test
    images), as running sums over batches: diversity of the two samples per input (LPIPS, or the
    pixel stand-in offline), Inception statistics for FID (pretrained), the shapes toy counts.
    `all_reduce` adds the sums of every torchrun rank together."""

    def __init__(self, args, nets):
        self.lpips, self.inception = nets
        self.diversity = torch.zeros(2, dtype=torch.float64)          # (sum, number of inputs)
        self.fid_stats = None
        if self.inception is not None:
            self.fid_stats = common.RunningFIDStats()
        self.toy = data.shapes_modality_zero_counts() if args.data == "shapes" else None

    def add(self, images, batch, second=None):
        """images (B, C, H, W) in [-1, 1] made for the items of `batch`; second: another sample
        for the same inputs (diversity), None for the real images."""
        if second is not None:
            distance = self.lpips if self.lpips is not None else pixel_diversity
            mean = common.lpips_diversity(distance, torch.stack([images, second], 1))
            self.diversity += torch.tensor([mean * len(images), len(images)], dtype=torch.float64)
        if self.fid_stats is not None:
            self.fid_stats.add(common.inception_features(self.inception, [(images + 1) / 2]))
        if self.toy is not None:
            counts = data.shapes_modality_counts(images, batch)
            self.toy = {k: v + self.toy[k] for k, v in counts.items()}

    def all_reduce(self, device):
        """Every rank's sums, added together (in place)."""
        def total(t):
            t = t.to(device)
            torch.distributed.all_reduce(t)
            return t.cpu()

        self.diversity = total(self.diversity)
        if self.toy is not None:
            self.toy = {k: total(v) for k, v in self.toy.items()}
        if self.fid_stats is not None:
            self.fid_stats.all_reduce(device)

    def scores(self, real=None):
        """The metrics of this set; FID against `real` (the real images' SubsetScores)."""
        m = {}
        if self.diversity[1] > 0:
            name = "lpips_diversity" if self.lpips is not None else "pixel_diversity"
            m[name] = float(self.diversity[0] / self.diversity[1])
        if self.fid_stats is not None and real is not None:
            m["fid"] = common.frechet_distance(*real.fid_stats.stats(), *self.fid_stats.stats())
        if self.toy is not None:
            m.update(data.shapes_modality_scores(self.toy))
        return m


def metric_nets(args, device):
    """LPIPS-AlexNet (diversity; the backbone is our choice, the paper names none) and the FID
    Inception (pytorch-fid's network), loaded once per --eval; none offline (--pretrained 0)."""
    if not args.pretrained:
        return None, None
    return (common.LPIPS(net="alex", pretrained=True).to(device),
            common.FIDInception(pretrained=True).to(device))


@torch.no_grad()
def evaluate(args):
    """Per modality subset: two samples per test input, scored by FID and LPIPS diversity
    (pretrained nets) or pixel diversity, plus the shapes toy metrics; the real images are scored
    too (the FID reference, and the toy metrics' ceiling).

    Streams: one batch of test items at a time (--batch_size per process) is loaded, conditioned,
    and sampled for every subset; only running sums are kept (SubsetScores), so memory is set by
    the batch, not by --eval_n. Every subset of a batch starts from the same seed, so subsets
    differ by their inputs only. Under torchrun the batches are dealt out to the ranks and their
    sums added; rank 0 writes eval.json."""
    rt = common.setup_runtime(args)
    info = dataset_info(args)
    G = load_generator(args, info, rt)
    ds = load_data(args, split="test")
    cond_of = Conditioner(args, info, rt.device)
    nets = metric_nets(args, rt.device)
    n, bs, mods = min(args.eval_n, len(ds)), args.batch_size // rt.world_size, G.modalities
    subsets = all_subsets(mods)
    names = ["real"] + ["+".join(subset) or "uncond" for subset in subsets]
    scores = {name: SubsetScores(args, nets) for name in names}
    starts = list(range(0, n, bs))
    for b in range(rt.rank, len(starts), rt.world_size):
        items = range(starts[b], min(starts[b] + bs, n))
        batch = torch.utils.data.default_collate([ds[i] for i in items])
        cond = cond_of(common.to_device(batch, rt.device))
        scores["real"].add(batch["image"].to(rt.device), batch)
        for name, subset in zip(names[1:], subsets):
            torch.manual_seed(args.seed * 1_000_003 + b)
            mask = subset_mask(subset, mods, len(items), rt.device)
            fake, fake2 = (G(cond, mask)[0] for _ in range(2))
            scores[name].add(fake, batch, fake2)
            del fake, fake2                     # before the next subset's pair is drawn
        del cond
    if rt.ddp:
        for sums in scores.values():
            sums.all_reduce(rt.device)
    if not rt.is_main:
        return
    results = {name: scores[name].scores(scores["real"]) for name in names[1:]}
    if args.data == "shapes":
        results = {"real": scores["real"].scores(), **results}
    for name in names[1:]:
        print(name, json.dumps({k: round(v, 4) for k, v in results[name].items()}))
    out = os.path.join(args.out_dir, "eval.json")
    with open(out + ".tmp", "w") as f:
        json.dump({"n": n, "subsets": results}, f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")


# ----------------------------------------------------------------------------------------------
# Benchmark: --bench N
# ----------------------------------------------------------------------------------------------

def bench_batch(args, info):
    """--bench's fixed batch of args.batch_size items, on the host: shapes' own items; for the
    paper sets a synthetic batch of their shapes (random label cells, sketch = their edges, one
    caption repeated)."""
    B, S = args.batch_size, args.size
    if args.data == "shapes":
        ds = load_data(args)
        return torch.utils.data.default_collate([ds[i % len(ds)] for i in range(B)])
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(0, info["num_classes"], (B, 1, 8, 8), generator=g).float()
    label = F.interpolate(cells, size=(S, S), mode="nearest")[:, 0].long()
    return dict(image=torch.rand(B, 3, S, S, generator=g) * 2 - 1, label=label,
                sketch=data.instance_edges(label)[:, None].float(),
                caption=["This woman has wavy black hair and is smiling."] * B)


def bench_step(args, info, run, real, cond, image_net, compile_model=None, start=0):
    """Fresh G, D and optimisers on run.device (built there: under torch.device("meta") they hold
    no memory), and a no-argument step: one train_step on the fixed batch, at iterations start,
    start + 1, ... (lazy R1 runs where --r1_every divides the iteration)."""
    G, D = (common.prepare_model(m, run, compile_model, ddp=False) for m in build(args, info))
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.0, 0.99))
    counter = itertools.count(start)
    return lambda: train_step(G, D, opt_g, opt_d, real, cond, next(counter), args, run, image_net)


# The iteration whose FLOPs --bench counts: common.bench_training counts the step after its three
# warm-up steps (iterations 0-2), so no lazy R1 step unless --r1_every divides 3.
COUNTED_ITER = 3


def training_flops(args):
    """common.count_flops of one training image: one train_step (iteration COUNTED_ITER, as
    --bench counts it: no lazy R1 step at the presets' --r1_every 16) on --bench's batch
    (bench_batch, args.batch_size items) divided by its size: G forward, the Eq. (11) image
    features of reals and fakes, D on fakes for G's loss, G's backward, then D on reals and
    fakes, D's backward. The conditions are prepared before the step, as in --bench and
    training, so the frozen CLIP text tower is not counted (the small trained text tower is, in
    G and D). Element-wise work (losses, Adam's update, gradient clipping) is not counted. On
    shape-only tensors (meta device), so the paper presets count in seconds on a CPU; the frozen
    networks have random weights (the same cost, no download). --bench's gflops_per_img is the
    same count of a real step, except that on a CPU it misses the small text tower's attention
    (the fused CPU attention kernel has no FLOP formula); here attention counts as the matrix
    multiplies of its math path."""
    meta, info = torch.device("meta"), dataset_info(args)
    batch = bench_batch(args, info)
    with meta:  # the networks, shape-only
        cond_of = Conditioner(args, info, meta, weights=False)
        image_net = make_image_net(args, meta, weights=False)
    cond = cond_of(batch)  # labels checked and captions tokenised on the host, then to meta
    run = common.Runtime(meta, torch.float32)
    with meta:
        step = bench_step(args, info, run, batch["image"].to(meta), cond, image_net,
                          start=COUNTED_ITER)
    return common.count_flops(step) / args.batch_size


def bench(args):
    """--bench N: training steps on one fixed batch (bench_batch; common.bench_training), the
    frozen networks at random weights (no download)."""
    rt = common.setup_runtime(args)
    info = dataset_info(args)
    batch = common.to_device(bench_batch(args, info), rt.device)
    cond = Conditioner(args, info, rt.device, weights=False)(batch)
    image_net = make_image_net(args, rt.device, weights=False)

    def make_step(run, compile_model):
        # iterations 0, 1, ...: bench_training counts iteration COUNTED_ITER
        return bench_step(args, info, run, batch["image"], cond, image_net, compile_model)

    return common.write_bench(args, {"training": common.bench_training(args, rt, make_step)})


def main(argv=None):
    args = common.parse_args(build_parser(), PRESETS, "poe_gan", "shapes", argv,
                             check=check_args, no_released_weights="the authors of PoE-GAN "
                             "released no trained networks.")
    if args.dry_run:
        G, D = build(args)
        nets = {"G": G, "D": D}
        clip = args.pretrained and "text" in dataset_info(args)["modalities"]
        if clip:
            print("text: frozen CLIP ViT-B/32 text tower, not counted in G or D")
        r1 = args.r1_gamma > 0 and COUNTED_ITER % args.r1_every == 0
        print(f"training: {training_flops(args) / 1e9:,.1f} GFLOP per image of a training step "
              f"(G and D forward and backward, iteration {COUNTED_ITER}: "
              + ("with" if r1 else "no") + " lazy R1" + ("; CLIP not counted" if clip else "")
              + f"; {args.size}x{args.size}, batch {args.batch_size})")
        common.print_dry_run(nets)
        return
    if args.bench:
        return bench(args)
    if args.sample:
        grids = sample(args)
        if not args.eval:
            return grids
    if args.eval:  # after the grids when both are asked for
        return evaluate(args)
    train(args)


if __name__ == "__main__":
    common.run_main(main)
