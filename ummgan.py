"""uMM-GAN / sMM-GAN: Unsupervised Multi-modal Styled Content Generation
(Sendik, Lischinski, Cohen-Or; ACM TOG 39(4), 2020; arXiv 2001.03640), on a StyleGAN generator.

Idea: StyleGAN starts every image from ONE learned 4x4 root constant and reaches every mode of the
data only by bending it with AdaIN styles and noise. uMM-GAN learns K root constants C_1..C_K and
feeds the generator their mixture sum_k w_R[k] C_k, where the mixing weights w_R = softmax(FC(.))
come from a branch of the same mapping network that makes the style w (§3, §4). The constants
become templates of the modes (letters 'A'/'B', cats/dogs, car poses), found without labels, and
the mode (w_R) is disentangled from the style (w). K = 1 is exactly StyleGAN. sMM-GAN is the
supervised variant: a one-hot w_M selects one constant and the discriminator gains a K-way
classifier (Fig. 5 top).

Map of this file:
    config and presets          hyperparameters per dataset, each with its source; flag checks
    StyleGAN layers             blur, noise injection, styled conv (AdaIN + noise), mbstd
    mapping network (+ w_R)     8 FC, lr x0.01, pixel norm; the w_R branch and softmax (§4)
    generator                   K root constants, mixing layer R / multiplexer, truncation
    discriminator               progressive from_rgb, minibatch stddev, sMM K-way classifier
    progressive schedule        (resolution step, fade-in alpha) as a pure function of iteration
    losses and one train step   non-saturating + R1 (our choice), sMM classifier loss, mixing
    training loop               data, build, EMA of G, grids, checkpoints, exact resume
    sampling controls           mode x style grid (Fig. 7), modes with w_avg (Fig. 10), mixing
    evaluation                  Jaccard of width densities (Fig. 6; data.hshape_*), FID (§4),
                                letters: pixel nearest neighbours (data.LettersNearest)
    dry run, bench, main        --sample / --eval take the architecture from the checkpoint

    python ummgan.py                                  # built-in hshape, uMM-GAN K=3, CPU ~5 min
    python ummgan.py --K 1 --out_dir out/stylegan-hshape  # the same with plain StyleGAN (K = 1)
    python ummgan.py --data letters --K 2             # letters 'A'/'B': modes become letters
    python ummgan.py --data letters --K 2 --mode smm --out_dir out/smm-letters  # supervised
    python ummgan.py --data letters --chars ABC --K 3 --out_dir out/letters-abc  # Table 1
    python ummgan.py --sample                         # control grids from out/ummgan-hshape/ckpt.pt
    python ummgan.py --eval                           # Jaccard index (hshape) / FID -> eval.json
    python ummgan.py --data folder --data_dir data/cats_dogs --K 2   # paper scale, 128x128
    python ummgan.py --data folder --dry_run --K 4    # parameter counts, added params vs K = 1
    python ummgan.py --data folder --bench 20 --dtype bfloat16  # img/s, memory at 128x128
"""

import contextlib
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data

# ----------------------------------------------------------------------------------------------
# Config. Paper = Sendik et al.; rosi = rosinality/style-based-gan-pytorch, the StyleGAN code the
# paper extends (§4); "our choice" where neither says. The built-in sets are scaled to a CPU.
# ----------------------------------------------------------------------------------------------

MAPPING_LAYERS = 8        # StyleGAN / rosi: 8 FC layers in the mapping network
MBSTD_GROUP = 4           # minibatch stddev group size (StyleGAN official)

PAPER = dict(             # 128x128 natural images (§4), StyleGAN widths (rosi)
    K=2, mode="umm", size=128, style_dim=512, max_channels=512, channel_base=16384,
    batch_size=32,        # rosi default batch
    lr=0.001,             # rosi: Adam lr 0.001, betas (0, 0.99)
    mapping_lr_mul=0.01,  # StyleGAN / rosi: mapping network at 0.01x learning rate
    r1_gamma=10.0,        # rosi --loss r1: R1 weight 10 (every step); our choice of loss
    mixing_prob=0.9,      # StyleGAN §3.1 (p = 0.9); rosi has it behind --mixing, off by default
    ema_decay=0.999,      # rosi g_running
    cls_weight=1.0,       # sMM classifier loss weight: our choice (paper silent)
    progressive=1, init_size=8,                 # rosi --init_size 8; paper: progressive growing
    phase_iters=37_500,   # rosi: 600k images fade-in + 600k stable per resolution at batch 32
    iters=200_000,        # paper §4: 200,000 iterations
    psi=0.7,              # truncation (paper uses it, value unknown): rosi's 0.7
    eval_n=5000,          # paper §4: FID on 5,000 real vs 5,000 generated
    pretrained=1,         # FID with the pretrained Inception
    sample_every=2000, ckpt_every=5000, log_every=100, chars=None,
    # §4: w_R's mapping network is w's "except the penultimate fully connected layer, which is
    # followed by a softmax": the first 6 FCs are shared, a FC(512 -> K) takes the place of the
    # 7th, then the softmax (8th FC not used for w_R). Our reading; 7 = share 7, replace the 8th.
    branch_after=6,
    head_lr_mul=None,     # the w_R head is part of the mapping network: its lr_mul (our reading)
    # §4's two ablations, off in the paper's model: w_R from a mapping network of its own (no
    # shared FCs), and w_R from a z of its own (through the shared trunk unless both are on).
    separate_mapping=0, separate_z=0,
    train_fraction=1.0,   # Fig. 8 "half dataset": train on a fixed random share of the images
)
CPU = dict(               # our choice throughout: what learns in minutes on 2 CPU cores
    K=3, mode="umm", size=32, style_dim=64, max_channels=32, channel_base=512,
    batch_size=32, lr=0.002, mapping_lr_mul=0.1, r1_gamma=1.0, mixing_prob=0.9,
    ema_decay=0.99, cls_weight=1.0, progressive=1, init_size=8, phase_iters=200,
    iters=1000, psi=1.0, eval_n=5000, pretrained=0,
    sample_every=250, ckpt_every=250, log_every=25, chars=None, branch_after=6, head_lr_mul=None,
    separate_mapping=0, separate_z=0, train_fraction=1.0,
)
PRESETS = {
    # Fig. 6 (paper: K = 3, 10,000 samples). No style mixing here (our choice): the image mean is
    # set by the last AdaIN's bias alone (see Generator.synthesis), so with mixing it comes from
    # z2 while the layout comes from z, and G learns to keep w1 + w2 constant (README, Fig. 6).
    "hshape": dict(CPU, mixing_prob=0.0),
    "letters": dict(CPU, K=2, chars="AB"),       # Fig. 7/8 letters 'A'/'B' (paper: 64x64 grey)
    "folder": dict(PAPER),                       # Cats & Dogs (K=2), Cars (K=4), LSUN (K=16)
}
ARCH_KEYS = ("K", "mode", "size", "style_dim", "max_channels", "channel_base", "channels",
             "mapping_lr_mul", "branch_after", "head_lr_mul", "separate_mapping", "separate_z")
# (lr_mul is an architecture key: it scales the stored weights)
# What --sample / --eval / --resume read from the checkpoint unless the command line gives them:
# the data, the architecture and the growing schedule (which fixes the resolution at the saved
# iteration); --resume also the training share of the data (--eval measures the whole set).
RUN_KEYS = ("data", "data_dir", "chars", "K", "mode", "size", "style_dim", "max_channels",
            "channel_base", "mapping_lr_mul", "branch_after", "head_lr_mul", "separate_mapping",
            "separate_z", "progressive", "init_size", "phase_iters")


def build_parser():
    p = common.base_parser(__doc__.split("\n")[0])
    p.add_argument("--K", type=int, default=None, help="number of root constants (1 = StyleGAN)")
    p.add_argument("--mode", default=None, choices=["umm", "smm"],
                   help="umm: unsupervised softmax mixing; smm: one-hot by label + D classifier")
    p.add_argument("--style_dim", type=int, default=None, help="width of z, w and mapping FCs")
    p.add_argument("--max_channels", type=int, default=None, help="channels at 4x4 .. (cap)")
    p.add_argument("--channel_base", type=int, default=None, help="channels = base / resolution")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--mapping_lr_mul", type=float, default=None)
    p.add_argument("--branch_after", type=int, default=None,
                   help="w_R leaves the mapping network after this many shared FCs (1-7)")
    p.add_argument("--head_lr_mul", type=float, default=None,
                   help="lr multiplier of the w_R head (default: --mapping_lr_mul)")
    p.add_argument("--separate_mapping", type=int, default=None, choices=[0, 1],
                   help="§4 ablation: w_R from a mapping network of its own (no shared FCs)")
    p.add_argument("--separate_z", type=int, default=None, choices=[0, 1],
                   help="§4 ablation: w_R from a second, independent z")
    p.add_argument("--train_fraction", type=float, default=None,
                   help="train on this share of the training images (Fig. 8: 0.5)")
    p.add_argument("--r1_gamma", type=float, default=None)
    p.add_argument("--mixing_prob", type=float, default=None, help="style mixing probability")
    p.add_argument("--ema_decay", type=float, default=None)
    p.add_argument("--cls_weight", type=float, default=None, help="sMM classifier loss weight")
    p.add_argument("--progressive", type=int, default=None, choices=[0, 1],
                   help="1: progressive growing with fade-in; 0: train at --size from the start")
    p.add_argument("--init_size", type=int, default=None, help="first resolution when growing")
    p.add_argument("--phase_iters", type=int, default=None,
                   help="iterations per resolution: first half fade-in, second half stable")
    p.add_argument("--psi", type=float, default=None, help="truncation psi for grids (1 = off)")
    p.add_argument("--eval_n", type=int, default=None, help="images per side for --eval")
    p.add_argument("--pretrained", type=int, default=None, choices=[0, 1],
                   help="FID with the pretrained Inception (downloads once)")
    p.add_argument("--bench", type=int, default=None,
                   help="time N training steps at --size (fp32 eager vs --dtype/--compile), "
                        "write bench.json")
    p.add_argument("--chars", default=None,
                   help="letters: the characters, e.g. AB (Fig. 7), ABC, or all (the 62 of Fig. 9)")
    return p


def channels_at(res, args):
    return min(args.max_channels, args.channel_base // res)


def z_dim(args):
    """Width of the latent z: twice style_dim with --separate_z (z for w, z_R for w_R)."""
    return args.style_dim * (2 if args.separate_z else 1)


def check_args(args):
    """Every uMM-GAN flag in its range, before any data or model is built (one sentence each)."""
    require, at_least = common.require, common.at_least
    common.require_one_process_for_outputs(args)
    at_least(args, 1, "K", "style_dim", "max_channels", "channel_base", "bench")
    require(args.size >= 8 and args.size & (args.size - 1) == 0,
            f"--size must be a power of two >= 8 (got {args.size}).")
    require(args.channel_base >= args.size, f"--channel_base {args.channel_base} leaves no channel "
            f"at {args.size}x{args.size} (channels = channel_base / resolution); give at least "
            f"--channel_base {args.size}.")
    if args.progressive:
        require(8 <= args.init_size <= args.size and args.init_size & (args.init_size - 1) == 0,
                f"--init_size must be a power of two between 8 and --size {args.size} "
                f"(got {args.init_size}).")
    at_least(args, 2, "phase_iters", "eval_n")
    require(args.lr > 0 and args.mapping_lr_mul > 0,
            f"--lr and --mapping_lr_mul must be positive (got {args.lr}, {args.mapping_lr_mul}).")
    require(args.head_lr_mul is None or args.head_lr_mul > 0,
            f"--head_lr_mul must be positive (got {args.head_lr_mul}).")
    require(1 <= args.branch_after < MAPPING_LAYERS, f"--branch_after must be between 1 and "
            f"{MAPPING_LAYERS - 1} (got {args.branch_after}).")
    require(not (args.separate_mapping or args.separate_z) or (args.mode == "umm" and args.K > 1),
            "--separate_mapping and --separate_z change uMM-GAN's w_R branch, which needs "
            "--mode umm and --K 2 or more.")
    require(0 < args.train_fraction <= 1, f"--train_fraction must be in (0, 1] "
                                          f"(got {args.train_fraction}).")
    at_least(args, 0, "r1_gamma", "cls_weight")
    require(0 <= args.mixing_prob <= 1, f"--mixing_prob is a probability in [0, 1] "
                                        f"(got {args.mixing_prob}).")
    require(0 <= args.ema_decay < 1, f"--ema_decay must be in [0, 1) (got {args.ema_decay}).")
    require(args.data == "letters" or args.chars is None,
            f"--chars chooses the characters of --data letters, not of --data {args.data}.")


# ----------------------------------------------------------------------------------------------
# StyleGAN layers (Karras et al. 2019, Fig. 1b): equalised lr from common, blur, styled conv
# ----------------------------------------------------------------------------------------------

class Blur(nn.Module):
    """Low-pass [1, 2, 1] x [1, 2, 1] / 16 after up-sampling and before down-sampling (StyleGAN)."""

    def __init__(self, channels):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16
        self.register_buffer("kernel", k.expand(channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x):
        return F.conv2d(x, self.kernel, padding=1, groups=x.shape[1])


class NoiseInjection(nn.Module):
    """x + scale_c * noise: one learned scale per channel, N(0, 1) noise shared over channels
    (StyleGAN §2, "B" in Fig. 1b). The scales start at zero and are plain parameters, as in the
    official StyleGAN (rosi equal-lr's them, which makes them ~sqrt(C/2) times slower)."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x, noise=None):
        if noise is None:  # (B, 1, H, W): a fresh draw per image and layer
            noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3],
                                device=x.device, dtype=x.dtype)
        return x + self.weight * noise


class StyledLayer(nn.Module):
    """conv 3x3 (optional) -> noise -> LReLU -> AdaIN(w): one "A"+"B" unit of StyleGAN Fig. 1b.

    Every layer draws its own noise (rosi feeds both layers of a block the same tensor: a quirk we
    do not copy). `noise_off` feeds zeros (Fig. 10's mode rendering). Up-sampling is nearest + conv
    at every resolution (rosi fuses a transposed conv from 128 px on: same parameters).
    """

    def __init__(self, in_ch, out_ch, style_dim, conv=True, upsample=False):
        super().__init__()
        self.upsample = upsample
        self.conv = EqualConv(in_ch, out_ch) if conv else None
        self.blur = Blur(out_ch) if upsample else None
        self.noise = NoiseInjection(out_ch)
        self.adain = common.AdaIN(out_ch, style_dim)  # StyleGAN Eq. (1); its affine has gain 1

    def forward(self, x, w, noise_off=False):
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.conv is not None:
            x = self.conv(x)
        if self.blur is not None:
            x = self.blur(x)
        x = self.noise(x, torch.zeros_like(x[:, :1]) if noise_off else None)
        return self.adain(lrelu(x), w)


def lrelu(x):
    """LReLU(0.2) times sqrt(2): the He gain of StyleGAN's equalised layers (official code and
    rosi scale weights by sqrt(2 / fan_in); common.EqualLinear/EqualConv2d use 1 / sqrt(fan_in),
    so the gain goes here, as StyleGAN2 does). Keeps the 8-layer mapping from shrinking w.
    Layers not followed by a LReLU (AdaIN's affine, to_rgb, D's output) keep gain 1, as the
    official StyleGAN does (rosi: sqrt(2) everywhere)."""
    return F.leaky_relu(x, 0.2) * math.sqrt(2)


class LReLU(nn.Module):
    def forward(self, x):
        return lrelu(x)


def EqualConv(in_ch, out_ch, kernel=3):
    return common.EqualConv2d(in_ch, out_ch, kernel, padding=kernel // 2)


def minibatch_stddev(x):
    """ProGAN §3 / StyleGAN: append the std over groups of samples, averaged, as one feature map."""
    b, c, h, w = x.shape
    g = min(MBSTD_GROUP, b)
    while b % g:
        g -= 1
    y = x.view(g, b // g, c, h, w)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B/g,)
    y = y.repeat(g).view(b, 1, 1, 1).expand(b, 1, h, w)
    return torch.cat([x, y], dim=1)


# ----------------------------------------------------------------------------------------------
# Mapping network z -> (w, w_R) (StyleGAN §2; uMM-GAN §3-4, Fig. 5 bottom)
# ----------------------------------------------------------------------------------------------

class MappingNetwork(nn.Module):
    """Pixel norm, then 8 x (FC + LReLU 0.2) at lr x`lr_mul`. With `mix_k` > 1 a second head
    FC(style_dim -> K) + softmax leaves the trunk after `branch_after` layers and gives w_R (§4);
    it is the only mapping parameter uMM-GAN adds (style_dim * K weights + K biases, which we keep
    as rosi's EqualLinear has them; the paper's count 512 K omits them). The head learns at
    `head_lr_mul` (None: the mapping's lr_mul, as a layer of the mapping network).
    §4's ablations: `separate` gives w_R its own `branch_after` FCs in place of the shared ones
    ("separating the two mapping networks"), and a `z_R` passed to forward feeds the w_R path
    instead of z ("two separate z vectors").
    """

    def __init__(self, dim, mix_k, lr_mul, branch_after=6, head_lr_mul=None, separate=False):
        super().__init__()
        self.norm = common.PixelNorm()
        self.layers = nn.ModuleList(common.EqualLinear(dim, dim, lr_mul=lr_mul)
                                    for _ in range(MAPPING_LAYERS))
        self.branch_after = branch_after
        head_lr_mul = lr_mul if head_lr_mul is None else head_lr_mul
        self.mix_head = (common.EqualLinear(dim, mix_k, lr_mul=head_lr_mul) if mix_k > 1
                         else None)
        self.mix_layers = (nn.ModuleList(common.EqualLinear(dim, dim, lr_mul=lr_mul)
                                         for _ in range(branch_after))
                           if separate and mix_k > 1 else None)

    def forward(self, z, z_R=None):
        h = self.norm(z)
        mix = None
        if self.mix_head is not None and (self.mix_layers is not None or z_R is not None):
            mix = self.mix_path(z if z_R is None else z_R)
        for i, layer in enumerate(self.layers):
            if i == self.branch_after and self.mix_head is not None and mix is None:
                mix = torch.softmax(self.mix_head(h), dim=1)  # w_R (B, K), rows sum to 1
            h = lrelu(layer(h))
        return h, mix  # w (B, D), w_R (B, K) or None

    def mix_path(self, z):
        """w_R computed apart from w (the ablations): pixel norm, the first `branch_after` FCs
        (the shared ones, or w_R's own), the head and the softmax."""
        h = self.norm(z)
        for layer in (self.mix_layers if self.mix_layers is not None
                      else self.layers[:self.branch_after]):
            h = lrelu(layer(h))
        return torch.softmax(self.mix_head(h), dim=1)


# ----------------------------------------------------------------------------------------------
# Generator: K root constants -> mixing layer R (uMM) or multiplexer (sMM) -> StyleGAN synthesis
# ----------------------------------------------------------------------------------------------

class Generator(nn.Module):
    def __init__(self, args, img_channels):
        super().__init__()
        self.K, self.mode, self.style_dim = args.K, args.mode, args.style_dim
        self.separate_z, self.z_dim = bool(args.separate_z), z_dim(args)
        self.max_step = int(math.log2(args.size)) - 2  # step s renders 4 * 2^s pixels
        umm_branch = args.K if args.mode == "umm" else 1  # K = 1: no branch, exactly StyleGAN
        self.mapping = MappingNetwork(args.style_dim, umm_branch, args.mapping_lr_mul,
                                      args.branch_after, args.head_lr_mul,
                                      bool(args.separate_mapping))
        c4 = channels_at(4, args)
        self.constants = nn.Parameter(torch.randn(args.K, c4, 4, 4))  # C_1..C_K (§3)
        layers, rgb = [], []
        for s in range(self.max_step + 1):
            res, c_out = 4 * 2 ** s, channels_at(4 * 2 ** s, args)
            c_in = c4 if s == 0 else channels_at(res // 2, args)
            if s == 0:  # const -> noise -> AdaIN, then conv 3x3 -> noise -> AdaIN
                layers += [StyledLayer(c4, c4, args.style_dim, conv=False)]
            else:       # up x2 -> conv 3x3 -> blur -> noise -> AdaIN, conv 3x3 -> noise -> AdaIN
                layers += [StyledLayer(c_in, c_out, args.style_dim, upsample=True)]
            layers += [StyledLayer(c_out, c_out, args.style_dim)]
            rgb.append(common.EqualConv2d(c_out, img_channels, 1))  # to_rgb per resolution
        self.layers, self.to_rgb = nn.ModuleList(layers), nn.ModuleList(rgb)
        self.n_styles = len(layers)  # 2 AdaIN per resolution

    def root(self, mix):
        """Mixing layer R: sum_k w_R[k] C_k (uMM, Fig. 5 bottom); a one-hot w_R is the
        multiplexer of sMM (Fig. 5 top). mix (B, K) -> (B, C, 4, 4)."""
        return torch.einsum("bk,kchw->bchw", mix, self.constants)

    def mix_weights(self, w_R, modes, batch, device):
        if modes is not None:  # sMM multiplexer, or a one-hot w_R for a uMM mode rendering
            return F.one_hot(modes, self.K).float()
        if w_R is None:        # K = 1 (or sMM without a mode): the single constant
            if self.K > 1:
                raise ValueError("sMM-GAN needs the modes w_M of the samples")
            return torch.ones(batch, 1, device=device)
        return w_R

    def synthesis(self, styles, mix, step, alpha=1.0, noise_off=False):
        """styles (B, n_styles, D), mix (B, K) -> image at 4 * 2^step pixels. While alpha < 1 the
        new resolution fades in over the up-sampled previous one (ProGAN §3, rosi)."""
        x = self.root(mix)
        prev = None
        for s in range(step + 1):
            if s == step and alpha < 1 and s > 0:
                prev = x
            x = self.layers[2 * s](x, styles[:, 2 * s], noise_off)
            x = self.layers[2 * s + 1](x, styles[:, 2 * s + 1], noise_off)
        # The image is a 1x1 conv of the last AdaIN's output, whose spatial mean per channel is
        # exactly that AdaIN's bias: the image mean is a linear function of the last style alone.
        img = self.to_rgb[step](x)
        if prev is not None:
            skip = F.interpolate(self.to_rgb[step - 1](prev), scale_factor=2, mode="nearest")
            img = torch.lerp(skip, img, alpha)
        return img

    def map(self, z):
        """z (B, z_dim) -> (w, w_R). With --separate_z, z holds (z for w, z_R for w_R) side by
        side, so every caller draws one z of z_dim, as the paper's ablation feeds two."""
        if self.separate_z:
            z, z_R = z.chunk(2, dim=1)
            return self.mapping(z, z_R)
        return self.mapping(z)

    def forward(self, z, step=None, alpha=1.0, z2=None, crossover=None, modes=None, psi=1.0,
                w_avg=None, noise_off=False):
        """z (B, z_dim) -> image. z2 + crossover: style mixing (layers >= crossover take w(z2));
        modes (B,) long: one-hot w_R (sMM's w_M, or a chosen uMM mode); psi < 1 truncates w
        toward w_avg (w_R is left as it is: our choice)."""
        step = self.max_step if step is None else step
        w, w_R = self.map(z)
        mix = self.mix_weights(w_R, modes, z.shape[0], z.device)
        ws = [w] * self.n_styles
        if z2 is not None:
            w2 = self.map(z2)[0]
            ws = [w if i < crossover else w2 for i in range(self.n_styles)]
        styles = torch.stack(ws, dim=1)  # (B, n_styles, D)
        if psi != 1.0:
            styles = torch.lerp(w_avg.view(1, 1, -1), styles, psi)  # w_avg + psi (w - w_avg)
        return self.synthesis(styles, mix, step, alpha, noise_off)

    @torch.no_grad()
    def mean_style(self, n=10_000, seed=0):
        """w_avg: mean of w over n random z (paper §4 'Learnt modes': 10,000)."""
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.z_dim, generator=gen).to(self.constants.device)
        return torch.cat([self.map(c)[0] for c in z.split(1000)]).mean(0)


# ----------------------------------------------------------------------------------------------
# Discriminator (StyleGAN/ProGAN): from_rgb per resolution, conv blocks, minibatch stddev
# ----------------------------------------------------------------------------------------------

class Discriminator(nn.Module):
    """Returns (logit (B,), class logits (B, K) or None). The sMM K-way classifier shares all of
    D and adds one head on its last features (AC-GAN style; head position our choice)."""

    def __init__(self, args, img_channels):
        super().__init__()
        self.max_step = int(math.log2(args.size)) - 2
        rgb, blocks = [], []
        for s in range(self.max_step + 1):
            res = 4 * 2 ** s
            c = channels_at(res, args)
            rgb.append(common.EqualConv2d(img_channels, c, 1))
            if s > 0:  # conv 3x3 -> blur -> conv 3x3 -> avg-pool /2 (LReLU before the pool,
                       # where rosi and official pool first: same parameters, our order)
                blocks.append(nn.Sequential(
                    EqualConv(c, c), LReLU(), Blur(c),
                    EqualConv(c, channels_at(res // 2, args)), LReLU(),
                    nn.AvgPool2d(2)))
        self.from_rgb, self.blocks = nn.ModuleList(rgb), nn.ModuleList(blocks)
        c4 = channels_at(4, args)
        self.final = nn.Sequential(EqualConv(c4 + 1, c4), LReLU(),
                                   common.EqualConv2d(c4, c4, 4), LReLU(),
                                   nn.Flatten())
        self.out = common.EqualLinear(c4, 1)
        self.classifier = common.EqualLinear(c4, args.K) if args.mode == "smm" else None

    def forward(self, x, step=None, alpha=1.0):
        step = self.max_step if step is None else step
        h = lrelu(self.from_rgb[step](x))
        for s in range(step, 0, -1):
            h = self.blocks[s - 1](h)
            if s == step and alpha < 1:  # fade-in: blend with the down-sampled lower path
                skip = lrelu(self.from_rgb[s - 1](F.avg_pool2d(x, 2)))
                h = torch.lerp(skip, h, alpha)
        feat = self.final(minibatch_stddev(h))  # (B, C)
        cls = self.classifier(feat) if self.classifier is not None else None
        return self.out(feat).squeeze(1), cls


# ----------------------------------------------------------------------------------------------
# Progressive growing (ProGAN; paper §4 trains "in a progressively growing manner")
# ----------------------------------------------------------------------------------------------

def schedule(iteration, args):
    """(step, alpha) at an iteration: start at init_size; each further resolution fades in over
    phase_iters / 2 iterations, then trains stable for phase_iters / 2. A pure function of the
    iteration, so --resume lands on the same resolution and alpha."""
    max_step = int(math.log2(args.size)) - 2
    if not args.progressive:
        return max_step, 1.0
    first = int(math.log2(args.init_size)) - 2
    phase, within = divmod(iteration, args.phase_iters)
    step = min(first + phase, max_step)
    if phase == 0 or first + phase > max_step:
        return step, 1.0
    return step, min(1.0, within / (args.phase_iters / 2))


def resize_real(images, step):
    res = 4 * 2 ** step
    return images if images.shape[-1] == res else F.interpolate(images, size=(res, res),
                                                                mode="area")


# ----------------------------------------------------------------------------------------------
# Losses (non-saturating + R1: rosi's `--loss r1`, our choice over its WGAN-GP default)
# ----------------------------------------------------------------------------------------------

def smm_class_loss(class_logits, modes):
    """sMM-GAN (§3): cross-entropy of D's K-way classifier against the mode (D: the real label;
    G: the requested w_M), AC-GAN style. The paper gives no formula: our reading."""
    return F.cross_entropy(class_logits, modes)


def sample_styles_args(step, batch, args, device, gen=None):
    """Random z, and with probability mixing_prob a second z and a crossover layer (StyleGAN
    §3.1), drawn among the layers active at this step (2 per resolution), as StyleGAN and rosi
    do: a crossover above them would make the mixing a no-op."""
    z = torch.randn(batch, z_dim(args), device=device, generator=gen)
    # The mixing draw is on the CPU generator (no device sync), as rosi's random.random().
    if torch.rand((), generator=gen).item() < args.mixing_prob:
        z2 = torch.randn(batch, z_dim(args), device=device, generator=gen)
        active = 2 * (step + 1)
        return dict(z=z, z2=z2, crossover=int(torch.randint(1, active, (), generator=gen)))
    return dict(z=z)


def train_step(G, D, opt_g, opt_d, real, labels, it, args, rt):
    """One D step then one G step (n_critic 1, rosi). Returns the logged scalars, the losses as
    tensors on the device: nothing in the step waits for the device (the caller reads them on
    log steps only)."""
    step, alpha = schedule(it, args)
    d = common.unwrap(D)
    B = real.shape[0]
    real = resize_real(real, step).detach()  # a leaf of our own: the caller's batch is untouched
    smm = args.mode == "smm"
    modes = torch.randint(0, args.K, (B,), device=rt.device) if smm else None

    # --- D: softplus(D(G(z))) + softplus(-D(x)) + gamma/2 E||grad D(x)||^2 (+ classifier on real)
    with torch.no_grad(), rt.autocast():
        fake = G(step=step, alpha=alpha, modes=modes,
                 **sample_styles_args(step, B, args, rt.device))
    real.requires_grad_(args.r1_gamma > 0)
    # With R1 on, D sees the real images in float32 even under --dtype bfloat16: R1's double
    # backward through bf16 convolutions took 4.5x the float32 time on an H200 (cuDNN; README).
    with rt.autocast() if args.r1_gamma == 0 else contextlib.nullcontext():
        real_logit, real_cls = D(real, step, alpha)
    with rt.autocast():
        fake_logit, _ = D(fake.detach(), step, alpha)
        loss_d = common.ns_d_loss(real_logit, fake_logit)
        cls_d = smm_class_loss(real_cls, labels) if smm else torch.zeros(())
    r1 = common.r1_penalty(real_logit.float(), real) if args.r1_gamma > 0 else torch.zeros(())
    total_d = loss_d + args.r1_gamma / 2 * r1 + args.cls_weight * cls_d
    opt_d.zero_grad(set_to_none=True)
    # Gradients for D's weights only: R1 already took its gradient w.r.t. the real images (inside
    # r1_penalty), so none is computed or accumulated into the batch here.
    rt.scaler.scale(total_d).backward(inputs=[p for p in D.parameters() if p.requires_grad])
    rt.scaler.step(opt_d)

    # --- G: softplus(-D(G(z))) (+ classifier: the image must be of the requested mode w_M)
    d.requires_grad_(False)  # D's weights get no gradient here (only its input does)
    with rt.autocast():
        fake = G(step=step, alpha=alpha, modes=modes,
                 **sample_styles_args(step, B, args, rt.device))
        fake_logit, fake_cls = D(fake, step, alpha)
        loss_g = common.ns_g_loss(fake_logit)
        cls_g = smm_class_loss(fake_cls, modes) if smm else torch.zeros(())
    opt_g.zero_grad(set_to_none=True)
    rt.scaler.scale(loss_g + args.cls_weight * cls_g).backward()
    rt.scaler.step(opt_g)
    rt.scaler.update()
    d.requires_grad_(True)
    losses = dict(loss_d=loss_d, loss_g=loss_g, r1=r1, cls_d=cls_d, cls_g=cls_g)
    return {**{k: v.detach() for k, v in losses.items()}, "res": 4 * 2 ** step, "alpha": alpha}


# ----------------------------------------------------------------------------------------------
# Building the networks, optimisers and data (training, --sample, --eval, --bench)
# ----------------------------------------------------------------------------------------------

def compile_d(args):
    """--compile's backend for D: R1 differentiates D's input gradient (a double backward), which
    torch.compile cannot do, so with R1 on D stays eager and only G is compiled."""
    return args.compile if args.r1_gamma == 0 else None


def load_data(args, split="train", training=False):
    """The dataset; for training, --train_fraction of it (Fig. 8's half dataset: a fixed random
    subset, the same for every seed; our choice). --eval measures against the whole set."""
    options = {"letters": args.chars} if args.data == "letters" and args.chars is not None else {}
    root = args.data_dir if args.data == "folder" else None
    ds = data.get_dataset(args.data, root=root, split=split, size=args.size,
                          skip=data.OPTIONAL_KEYS, **options)  # images (and classes) only
    if training and args.train_fraction < 1:
        keep = max(1, round(args.train_fraction * len(ds)))
        index = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:keep]
        ds = Subset(ds, index.sort().values.tolist())
    if args.mode == "smm":
        if "class" not in ds.has:
            raise common.UserError(f"--mode smm needs a class label per image, and the "
                                   f"{args.data} data has none; use --mode umm.")
        n = len(ds.class_names)  # the multiplexer picks one constant per class (Fig. 5 top)
        if n != args.K:
            raise common.UserError(f"--mode smm needs one constant per class: --K {n} for the "
                                   f"{n} classes of --data {args.data} (got --K {args.K}).")
    return ds


class Subset(torch.utils.data.Subset):
    """A share of a dataset that keeps its attributes (class names, what items hold)."""

    def __getattr__(self, name):
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def image_channels(args):
    """Channels of the images without touching data (for --dry_run)."""
    return 3 if args.data == "folder" else 1


def optimizers(G, D, args):
    """Adam (0, 0.99) for both (rosi). The mapping network's x0.01 rate lives in its EqualLinear
    (stored weights scaled at run time), so one learning rate serves every parameter."""
    return (torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.0, 0.99)),
            torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.0, 0.99)))


def build(args, device="cpu"):
    c = image_channels(args)
    args.channels = c
    return Generator(args, c).to(device), Discriminator(args, c).to(device)


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def mode_style_grid(G, step, args, device, n_styles=8, alpha=1.0, psi=1.0, w_avg=None,
                    seed=1234):
    """Fig. 7: row k = one-hot w_R on mode k, column j = one fixed style w(z_j). For K = 1 the
    one row is plain samples. Noise is fixed per column so only the mode changes down a column."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_styles, G.z_dim, generator=gen).to(device)
    rows = []
    for k in range(G.K):
        with common.preserved_rng():  # every generator, CUDA too, is given back afterwards
            torch.manual_seed(seed)  # the same noise maps in every row (reseeds every device)
            modes = torch.full((n_styles,), k, dtype=torch.long, device=device)
            img = G(z, step, alpha, modes=modes if G.K > 1 else None, psi=psi, w_avg=w_avg)
        rows.append(list(resize_to(img, args.size)))
    return rows


def resize_to(img, size):
    return img if img.shape[-1] == size else F.interpolate(img, size=(size, size), mode="nearest")


@torch.no_grad()
def random_row(G, step, alpha, args, device, n=8, seed=99):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, G.z_dim, generator=gen).to(device)
    modes = torch.randint(0, G.K, (n,), generator=gen).to(device) if args.mode == "smm" else None
    return list(resize_to(G(z, step, alpha, modes=modes), args.size))


def train(args):
    rt = common.setup_runtime(args)
    ds = load_data(args, training=True)
    G, D = build(args, rt.device)
    ema = common.EMA(G, args.ema_decay)
    opt_g, opt_d = optimizers(G, D, args)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    objects = dict(G=G, D=D, G_ema=ema, opt_g=opt_g, opt_d=opt_d, scaler=rt.scaler)
    start = 0
    if args.resume:
        ck = common.load_checkpoint(ckpt_path, "ummgan", vars(args), ARCH_KEYS, objects, rt=rt)
        start = ck["iter"]
    G = common.prepare_model(G, rt, args.compile, find_unused_parameters=True)
    D = common.prepare_model(D, rt, compile_d(args), find_unused_parameters=True)
    batches = common.batch_stream(ds, args.batch_size, rt, args.seed, start, args.num_workers)
    log = common.Logger(args.out_dir, args.iters, start, rt.is_main)
    with common.StopSignals() as signals:
        for it in range(start, args.iters):
            batch = common.to_device(next(batches), rt.device)
            labels = batch.get("class")
            scalars = train_step(G, D, opt_g, opt_d, batch["image"], labels, it, args, rt)
            ema.update(G)
            log.step(args.batch_size)
            done = it + 1
            if done % args.log_every == 0 or done == args.iters:
                log.log(done, **{k: common.reduce_mean(v, rt) for k, v in scalars.items()})
            if rt.is_main and (done % args.sample_every == 0 or done == args.iters):
                step, alpha = schedule(it, args)
                with common.preserved_rng():  # grids must not move the training RNG
                    rows = mode_style_grid(ema.model, step, args, rt.device, alpha=alpha)
                    rows.append(random_row(ema.model, step, alpha, args, rt.device))
                common.save_grid(os.path.join(args.out_dir, f"samples_{done:06d}.png"), rows)
            signals.end_of_step(rt, args, done, ckpt_path, lambda: common.save_checkpoint(
                ckpt_path, "ummgan", args, done, objects, rt=rt))  # on schedule or on a signal
    log.close()


# ----------------------------------------------------------------------------------------------
# Sampling controls (--sample)
# ----------------------------------------------------------------------------------------------

def load_ema(args, device):
    G, _ = build(args, device)
    # The EMA is saved as the state of its model: it loads straight into a Generator.
    ck = common.load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), "ummgan", vars(args),
                                ARCH_KEYS, {"G_ema": G}, restore_rng=False)
    G.eval()
    step, alpha = schedule(ck["iter"] - 1, args)
    common.seed_everything(args.seed)  # the same grids (noise inputs) on every call
    return G, step, alpha


@torch.no_grad()
def sample(args):
    device = common.pick_device(args.device)
    G, step, alpha = load_ema(args, device)
    w_avg = G.mean_style()
    out = args.out_dir
    # Fig. 7: mode x style (rows: one-hot w_R, columns: fixed w), truncated by --psi.
    rows = mode_style_grid(G, step, args, device, alpha=alpha, psi=args.psi, w_avg=w_avg)
    common.save_grid(os.path.join(out, "mode_style.png"), rows)
    img = mode_renders(G, step, alpha, w_avg)
    common.save_grid(os.path.join(out, "modes.png"), [list(resize_to(img, args.size))])
    top, left, mixed = style_mixing_grid(G, step, alpha, args, w_avg)
    grid = [[torch.ones_like(top[0])] + list(top)]
    grid += [[left[b]] + list(mixed[b]) for b in range(len(left))]
    common.save_grid(os.path.join(out, "style_mixing.png"),
                     [list(resize_to(torch.stack(row), args.size)) for row in grid])
    info = {"step": step, "alpha": alpha, "psi": args.psi, **mode_usage(G, device)}
    print(json.dumps(info))
    print(f"wrote mode_style.png, modes.png, style_mixing.png into {out}")


@torch.no_grad()
def mode_renders(G, step, alpha, w_avg):
    """Fig. 10 / Fig. 3: each constant rendered with w = w_avg and the noise inputs off.
    Returns (K, C, H, W)."""
    modes = torch.arange(G.K, device=w_avg.device) if G.K > 1 else None
    z0 = torch.zeros(G.K, G.z_dim, device=w_avg.device)  # psi = 0: w is w_avg for every z
    return G(z0, step, alpha, modes=modes, psi=0.0, w_avg=w_avg, noise_off=True)


@torch.no_grad()
def style_mixing_grid(G, step, alpha, args, w_avg, n_top=5, n_left=4, seed=7):
    """StyleGAN Fig. 3 / paper Fig. 4: the coarse styles (4x4 and 8x8 layers) and w_R from the
    top row, the remaining styles from the left column. Returns top (n_top, C, H, W), left
    (n_left, C, H, W) and mixed (n_left, n_top, C, H, W), all truncated by --psi."""
    gen = torch.Generator().manual_seed(seed)
    za = torch.randn(n_top, G.z_dim, generator=gen).to(w_avg.device)
    zb = torch.randn(n_left, G.z_dim, generator=gen).to(w_avg.device)
    kw = dict(psi=args.psi, w_avg=w_avg)
    top = G(za, step, alpha, modes=_smm(G, n_top, args), **kw)
    left = G(zb, step, alpha, modes=_smm(G, n_left, args), **kw)
    cut = min(4, G.n_styles - 1)  # coarse = the 4x4 and 8x8 styles
    mixed = torch.stack([G(za, step, alpha, z2=zb[b:b + 1].expand(n_top, -1), crossover=cut,
                           modes=_smm(G, n_top, args), **kw) for b in range(n_left)])
    return top, left, mixed


@torch.no_grad()
def mode_usage(G, device, n=10_000, seed=0):
    """uMM-GAN: how often each constant dominates w_R over n random z, the mean w_R and its mean
    largest entry (1 = every z picks one constant outright). {} without a w_R branch."""
    if G.mapping.mix_head is None:
        return {}
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    w_R = G.map(z)[1]
    return {"mode_usage_argmax": torch.bincount(w_R.argmax(1), minlength=G.K).div(n).tolist(),
            "mean_w_R": w_R.mean(0).tolist(), "mean_max_w_R": w_R.max(1).values.mean().item()}


def _smm(G, n, args):
    """sMM-GAN always needs a mode: the grids that are not about modes use mode 0."""
    return torch.zeros(n, dtype=torch.long, device=G.constants.device) \
        if args.mode == "smm" else None


# ----------------------------------------------------------------------------------------------
# Evaluation (--eval): H-shape Jaccard index (Fig. 6), per-mode densities, FID (§4)
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def fake_batches(G, n, step, alpha, args, device, modes=None, seed=0):
    """n generated images, --batch_size at a time (EMA G, no truncation): all of one mode, or
    (sMM) a random mode each, or (uMM) w_R from the mapping network."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, n, args.batch_size):
        b = min(args.batch_size, n - i)
        z = torch.randn(b, G.z_dim, generator=gen).to(device)
        m = None
        if modes is not None:
            m = torch.full((b,), modes, dtype=torch.long, device=device)
        elif args.mode == "smm":
            m = torch.randint(0, G.K, (b,), generator=gen).to(device)
        yield resize_to(G(z, step, alpha, modes=m), args.size).clamp(-1, 1)


def real_batches(ds, n, batch_size):
    """min(n, len(ds)) real images at evenly spaced indices of the dataset, a batch at a time."""
    index = torch.linspace(0, len(ds) - 1, min(n, len(ds))).long()
    for chunk in index.split(batch_size):
        yield torch.stack([ds[i]["image"] for i in chunk.tolist()])


@torch.no_grad()
def measure_batch(images, args, inception):
    """One batch's measures: H widths (B, 2) on hshape, Inception pool3 features (B, 2048)."""
    widths = data.hshape_measure(images.cpu()) if args.data == "hshape" else None
    feats = None
    if inception is not None:
        with torch.autocast(images.device.type, enabled=False):
            feats = inception(to_rgb01(images.float()).to(next(inception.parameters()).device))
    return widths, feats


def measure(batches, args, inception, nearest=None):
    """Streams a set through measure_batch: (widths (N, 2) or None, running FID statistics or
    None), and into `nearest` (letters: data.LettersNearest). Only two numbers per image and
    running sums are kept."""
    widths, stats = [], common.RunningFIDStats() if inception is not None else None
    for images in batches:
        w, feats = measure_batch(images, args, inception)
        if w is not None:
            widths.append(w)
        if feats is not None:
            stats.add(feats)
        if nearest is not None:
            nearest.add(images)
    return (torch.cat(widths) if widths else None), stats


LETTERS_REFERENCE = 1000  # real glyphs the letters scores compare with (our choice)


def letters_scorers(ds):
    """Two data.LettersNearest against the first LETTERS_REFERENCE training glyphs (classes in
    turn, so balanced): one for the generated images, one for real test images (the ceiling)."""
    items = [ds[i] for i in range(min(LETTERS_REFERENCE, len(ds)))]
    ref = torch.stack([item["image"] for item in items])
    classes = torch.stack([item["class"] for item in items])
    return [data.LettersNearest(ref, classes, len(ds.class_names)) for _ in range(2)]


@torch.no_grad()
def evaluate(args):
    """eval.json: on hshape the Jaccard index of the width densities (Fig. 6); FID (§4) with the
    pretrained Inception. Streams: images are generated (or read), measured and dropped
    --batch_size at a time, so memory is set by the batch, not by --eval_n."""
    device = common.pick_device(args.device)
    G, step, alpha = load_ema(args, device)
    ds = load_data(args)
    n_real = min(args.eval_n, len(ds))  # the paper's 5,000 real: all of a smaller training set
    if n_real < args.eval_n:
        print(f"--eval: the training set has {len(ds)} images; FID compares all of them with "
              f"{args.eval_n} generated ones.")
    n = args.eval_n
    inception = common.FIDInception(pretrained=True).to(device) if args.pretrained else None
    nearest = letters_scorers(ds) if args.data == "letters" else [None, None]
    real_w, real_stats = measure(real_batches(ds, n_real, args.batch_size), args, inception)
    fake_w, fake_stats = measure(fake_batches(G, n, step, alpha, args, device), args, inception,
                                 nearest[0])
    result = {"iter_step": step, "n_real": n_real, "n_generated": n, "K": args.K,
              "mode": args.mode}
    if args.data == "letters":  # Table 1 / Fig. 8 without Inception: pixel nearest neighbours
        measure(real_batches(load_data(args, "test"), n, args.batch_size), args, None,
                nearest[1])
        result["letters"] = {"generated": nearest[0].report(), "real_test": nearest[1].report()}
    if args.data == "hshape":  # widths read back from the pixels, in the paper's units 0..40
        test_w = measure(real_batches(load_data(args, "test"), n_real, args.batch_size), args,
                         None)[0]
        result.update(data.hshape_report(real_w, fake_w, test_w))
        tiles = [data.hshape_density_image(real_w), data.hshape_density_image(fake_w)]
        if G.K > 1:  # Fig. 6 middle row: the density of each constant alone (one-hot w_R)
            for k in range(G.K):
                wk = measure(fake_batches(G, max(1, n // G.K), step, alpha, args, device, modes=k,
                                          seed=k + 1), args, None)[0]
                tiles.append(data.hshape_density_image(wk))
        common.save_grid(os.path.join(args.out_dir, "densities.png"), [tiles])
    result.update(mode_usage(G, device))
    result["fid"] = (common.fid(real_stats.stats(), fake_stats.stats())
                     if inception is not None else None)   # None: needs --pretrained 1
    path = os.path.join(args.out_dir, "eval.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print(json.dumps(result))


def to_rgb01(x):
    x = (x + 1) / 2
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def dry_run(args):
    """Parameter counts, and what uMM-GAN adds over StyleGAN (K = 1) at the same widths (§4)."""
    G, D = build(args)
    base_args = type(args)(**{**vars(args), "K": 1, "mode": "umm"})  # StyleGAN
    G1, D1 = build(base_args)
    added = common.count_params(G) - common.count_params(G1)
    c4, d = channels_at(4, args), args.style_dim
    if args.mode == "umm":
        paper = d * args.K + 4 * 4 * c4 * (args.K - 1) if args.K > 1 else 0
        print(f"uMM-GAN K={args.K}: G adds {added} parameters over StyleGAN (K=1); paper §4 "
              f"{d}*K + 4*4*{c4}*(K-1) = {paper}, plus K={args.K if args.K > 1 else 0} biases "
              f"of the w_R head -> {paper + (args.K if args.K > 1 else 0)}")
    else:
        print(f"sMM-GAN K={args.K}: G adds {added} (constants 4*4*{c4}*(K-1)), D adds "
              f"{common.count_params(D) - common.count_params(D1)} (K-way classifier)")
    print(f"training: {training_flops(args) / 1e9:,.1f} GFLOP per image of a training step "
          f"(D with R1, then G; forward and backward; {args.size}², batch {args.batch_size})")
    common.print_dry_run({"G": G, "D": D})


def training_flops(args):
    """common.count_flops of train_step per image, as --bench counts it (the full --size, alpha
    1, --batch_size images; R1 when --r1_gamma > 0), on shape-only tensors (meta device): the
    paper preset counts in seconds on a CPU. Element-wise work is not counted. A step that
    draws style mixing (probability --mixing_prob) also maps a second z: one more pass of the
    mapping network, under 0.01 % of the paper preset's step."""
    meta = torch.device("meta")
    full = type(args)(**{**vars(args), "progressive": 0})  # as --bench: the final resolution
    with meta:
        G, D = build(full, meta)
    opt_g, opt_d = optimizers(G, D, full)
    images = torch.zeros(full.batch_size, full.channels, full.size, full.size, device=meta)
    labels = torch.zeros(full.batch_size, dtype=torch.long, device=meta)
    run = common.Runtime(meta, torch.float32)
    flops = common.count_flops(lambda: train_step(G, D, opt_g, opt_d, images, labels, 0, full, run))
    return flops / full.batch_size


def bench(args):
    """--bench N: training steps at the full --size (no growing) on one fixed batch of random
    images (the built-in sets: their own images), via common.bench_training."""
    rt = common.setup_runtime(args)
    args.progressive = 0                      # time the final resolution, alpha = 1
    if args.data == "folder":
        images = torch.rand(args.batch_size, image_channels(args), args.size, args.size) * 2 - 1
        labels = torch.randint(0, args.K, (args.batch_size,))
    else:
        ds = load_data(args)
        batch = torch.utils.data.default_collate([ds[i] for i in range(args.batch_size)])
        images, labels = batch["image"], batch.get("class")
    images = images.to(rt.device)
    labels = None if labels is None else labels.to(rt.device)

    def make_step(run, compile_model):
        G, D = build(args)
        G = common.prepare_model(G, run, compile_model, ddp=False)
        D = common.prepare_model(D, run, compile_model and compile_d(args), ddp=False)
        opt_g, opt_d = optimizers(G, D, args)
        return lambda: train_step(G, D, opt_g, opt_d, images, labels, 0, args, run)

    return common.write_bench(args, {"training": common.bench_training(args, rt, make_step)})


def flags_from_checkpoint(args, argv):
    """--sample / --eval / --resume use the run as it was trained: every RUN_KEYS flag (and for
    --resume --train_fraction) missing from the command line is taken from the checkpoint's
    config, one given with another value is refused (--data_dir may move), then the command line
    is parsed and checked again."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        return args  # load_ema / --resume name the missing checkpoint
    saved = common.load_checkpoint(path, "ummgan", restore_rng=False)["config"]
    given = vars(build_parser().parse_args(argv))
    extra = []
    for key in RUN_KEYS + (("train_fraction",) if args.resume else ()):
        if saved.get(key) is None:
            continue
        if given[key] is None:
            extra += [f"--{key}", str(saved[key])]
        else:
            common.require(key == "data_dir" or given[key] == saved[key],
                           f"{path} was trained with --{key} {saved[key]} (asked: {given[key]}); "
                           f"pass the same flags to use it.")
    return common.parse_args(build_parser(), PRESETS, "ummgan", "hshape", argv + extra,
                             check=check_args, no_released_weights=NO_RELEASED_WEIGHTS)


NO_RELEASED_WEIGHTS = "the authors of uMM-GAN released no trained networks."


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = common.parse_args(build_parser(), PRESETS, "ummgan", "hshape", argv, check=check_args,
                             no_released_weights=NO_RELEASED_WEIGHTS)
    if args.sample or args.eval or args.resume:
        args = flags_from_checkpoint(args, argv)
    return common.dispatch(args, dry_run, bench, sample, evaluate, train)


if __name__ == "__main__":
    common.run_main(main)
