"""INADE: Diverse Semantic Image Synthesis via Probability Distribution Modeling
(Tan, Chai, Chen, Liao, Chu, Liu, Hua, Yu; CVPR 2021).

Idea: a SPADE-like generator whose every normalisation layer is INADE. Instead of one fixed
(gamma, beta) per semantic class, every class owns a *distribution* of modulation parameters,
gamma = a_gamma[class] * N_gamma[instance] + b_gamma[class] (Eq. 2), and every instance draws its
own noise sample, so two shirts of one picture can differ while both stay shirts. One noise tensor
per instance is shared by all 18 INADE layers and mapped to each layer's width by a learned linear
map (unified sampling, Eq. 3). A noise-remapping encoder reads the real image with instance-aware
convolutions, pools per instance (Eq. 4) and perturbs the noise, N~ = a~ N + b~ (Eq. 5); with a KL
term (Eq. 9) it is a VAE, so at test time plain N(0, 1) noise gives random instance styles and a
reference image gives exemplar styles.

Map of this file:
    config and presets       one preset per dataset; every value with its source; check_args
    inputs                   nearest resizing of id maps, D's condition (one-hot + instance edges)
    INADE layer              Eq. (1)-(3): batch norm, class distributions, per-instance noise
    generator                SPADE trunk with INADE residual blocks (supp. Fig. 8)
    noise-remapping encoder  instance-aware convs, instance average pooling (Eq. 4-5, supp. Fig. 7)
    discriminator + losses   multiscale PatchGAN, hinge (Eq. 6), FM (Eq. 7), VGG (Eq. 8), KL (Eq. 9)
    training step, sampler   Eq. (10); random styles (§3.3) and exemplar styles (§3.4)
    training loop            Adam (0, 0.9), TTUR, constant then linear decay; exact resume
    released weights         --init_from: the authors' best_net_G/E.pth, renamed into ours
    sampling controls        (a) random (b) one class (c) one instance (d) reference
                             (e) reconstruction (f) multi-part reference editing (Fig. 6a)
    evaluation               FID, LPIPS diversity, mCSD/mOCD, mISD/mOID, locality; streamed batch by
                             batch; on shapes the exact colour/mode scores (data.py's section)
    bench, dry run, main     --bench: training img/s and Table 3/4's P, FLOPs, T of G

    python inade.py                                    # built-in shapes, CPU, ~5 min
    python inade.py --sample                           # the six control grids from that run
    python inade.py --sample --edit_instances 2 1 --edit_mean_only    # Fig. 6a, mean style only
    python inade.py --eval                             # toy metrics (shapes) -> eval.json
    python inade.py --no_unified_sampling --out_dir out/inade-no-us    # Table 1 "w/o US"
    python inade.py --no_noise_remapping --out_dir out/inade-no-pnr    # Table 1 "w/o PNR"
    python inade.py --data deepfashion --dry_run       # 84.63M parameters, 42.xx G FLOPs (Table 3)
    python inade.py --data cityscapes --noise_nc 8 --dry_run     # 76.78M (Table 4)
    python inade.py --data deepfashion --sample \
        --init_from checkpoints/inade_deepfashion/best_net_G.pth   # the authors' weights
    python inade.py --data deepfashion --bench 20 --batch_size 1 --pretrained 0 --perceptual l1
                                                       # and G's time per image (Table 3's T)
    torchrun --nproc_per_node=8 inade.py --data deepfashion --dtype bfloat16   # paper scale
    python inade.py --data folder-pairs --data_dir data/deepfashion2 --num_classes 8 \
        --out_dir out/inade-deepfashion --eval --fid_real test     # DeepFashion2 (test only)
"""

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data

# ----------------------------------------------------------------------------------------------
# Config. paper = the INADE paper (main text §4.1, supplement §6-9); official = tzt101/INADE
# (the SPADE codebase it extends); "our choice" where both are silent.
# ----------------------------------------------------------------------------------------------

PAPER = dict(
    ngf=64,               # official: SPADE ngf 64 -> trunk widths 1024..64 (needed for Table 3)
    ndf=64,               # official: PatchGAN ndf 64
    nef=64,               # official: encoder width = ngf 64
    num_d=2,              # official: 2 discriminator scales
    z_dim=256,            # paper §4.1: "the input noise has 256 channels"
    noise_nc=64,          # paper §4.1: C0 = 64 (official default for DeepFashion is 8; Table 3
                          # needs 64, see the reference notes); --noise_nc 8 / 128 for Table 4
    lr_g=1e-4, lr_d=4e-4,  # paper §4.1 (TTUR); the encoder trains with G's rate (official)
    beta1=0.0, beta2=0.9,  # paper §4.1
    lambda_fm=10.0, lambda_rec=10.0, lambda_kl=0.05,  # paper supp. §6: lambda1, lambda2, lambda3
    perceptual="vgg",     # paper Eq. (8): VGG-19 relu4_1 + relu5_1, equal weights
    pretrained=1,         # pretrained VGG-19 / Inception / LPIPS (downloaded on first use)
    batch_size=16,        # our choice: the paper gives none (official default 1, SyncBN)
    num_up="normal",      # official: 5 up-samplings, 8x8 input map at 256x256
    aspect_ratio=1.0,
    log_every=100, sample_every=5000, ckpt_every=5000,  # our choice
    eval_n=100_000,       # every test layout (DeepFashion: 2,247), as the paper's test sets
)


def paper_preset(num_classes, n_train, **over):
    """Paper setting for one dataset; iters = 200 epochs (paper §4.1) at the preset batch. The
    official code's default is 50 epochs without decay (--niter 50 --niter_decay 0)."""
    cfg = dict(PAPER, num_classes=num_classes, size=256, **over)
    cfg["iters"] = 200 * n_train // cfg["batch_size"]
    return cfg


PRESETS = {
    # num_classes = one-hot channels L (dontcare included); n_train from paper supp. §7
    "deepfashion": paper_preset(8, 30_000),
    "cityscapes": paper_preset(35, 2_975, num_up="more", aspect_ratio=2.0),  # 256x512 (supp. §7)
    "ade20k": paper_preset(151, 20_210),           # 150 classes + dontcare (official)
    "celebamask-hq": paper_preset(19, 28_000),
    # DeepFashion2 (paper §4.1: two adjacent DeepFashion images side by side, real two-person
    # instance maps, test only) and custom paired data: DeepFashion's settings (256x256, 5
    # up-samplings, C0 = 64); L from the label files, or --num_classes (8 to sample or evaluate a
    # DeepFashion checkpoint); iters = 200 epochs of the folder's training images (set at start).
    "folder-pairs": dict(PAPER, num_classes=None, size=256, iters=None),
    # Built-in toy data, our choice throughout: small widths so it learns on 2 CPU cores in ~5 min.
    # No pretrained nets offline: the perceptual term of Eq. (8) becomes a pixel L1 distance.
    "shapes": dict(num_classes=None, size=32, ngf=8, ndf=16, nef=16, num_d=2, z_dim=32, noise_nc=16,
                   lr_g=4e-4, lr_d=8e-4, beta1=0.0, beta2=0.9, lambda_fm=10.0, lambda_rec=10.0,
                   lambda_kl=0.05, perceptual="l1", pretrained=0, batch_size=16,
                   num_up="normal", aspect_ratio=1.0, iters=1600, log_every=25,
                   sample_every=400, ckpt_every=400, eval_n=256),
}

# The generator the paper reports (Table 3, C0 = 64; Table 4, C0 = 8 / 128): parameters P (M),
# FLOPs (G) and inference time T (s, Titan XP) of one image.
PAPER_COST = {("deepfashion", 64): (84.63, 42.92, 0.026), ("cityscapes", 64): (77.39, 75.25, 0.048),
              ("ade20k", 64): (90.89, 42.19, 0.035), ("celebamask-hq", 64): (85.12, 42.18, 0.030),
              ("cityscapes", 8): (76.78, 75.23, 0.0482), ("cityscapes", 128): (78.10, 75.28, 0.0497),
              ("celebamask-hq", 8): (84.50, 42.16, 0.0295),
              ("celebamask-hq", 128): (85.82, 42.20, 0.0306)}

ARCH_KEYS = ("num_classes", "size", "ngf", "ndf", "nef", "num_d", "z_dim", "noise_nc", "num_up",
             "aspect_ratio", "no_unified_sampling")


def build_parser():
    p = common.base_parser("INADE: instance-adaptive denormalisation (Tan et al., CVPR 2021)")
    p.add_argument("--num_classes", type=int, default=None, help="one-hot classes L (from data)")
    p.add_argument("--ngf", type=int, default=None, help="generator base width")
    p.add_argument("--ndf", type=int, default=None, help="discriminator base width")
    p.add_argument("--num_d", type=int, default=None, help="discriminator scales")
    p.add_argument("--nef", type=int, default=None, help="noise-remapping encoder base width")
    p.add_argument("--z_dim", type=int, default=None, help="global input vector size")
    p.add_argument("--noise_nc", type=int, default=None, help="C0: channels of instance noise")
    p.add_argument("--num_up", default=None, choices=["normal", "more"],
                   help="5 or 6 up-samplings (SPADE); 'more' for Cityscapes' 256x512")
    p.add_argument("--aspect_ratio", type=float, default=None, help="width / height")
    p.add_argument("--lr_g", type=float, default=None)
    p.add_argument("--lr_d", type=float, default=None)
    p.add_argument("--beta1", type=float, default=None)
    p.add_argument("--beta2", type=float, default=None)
    p.add_argument("--lambda_fm", type=float, default=None, help="lambda1, feature matching")
    p.add_argument("--lambda_rec", type=float, default=None, help="lambda2, perceptual/pixel")
    p.add_argument("--lambda_kl", type=float, default=None, help="lambda3, KL")
    p.add_argument("--perceptual", default=None, choices=["vgg", "vgg_official", "l1", "off"],
                   help="Eq. (8) term: VGG relu4_1+relu5_1 equal weights (paper), official "
                        "weights 1/4 and 1, a pixel L1 (no download), or none")
    p.add_argument("--pretrained", type=int, default=None, choices=[0, 1],
                   help="1: pretrained VGG/Inception/LPIPS; 0: pixel distances, no downloads")
    p.add_argument("--eval_n", type=int, default=None,
                   help="the first N test layouts used by --eval (paper presets: all)")
    p.add_argument("--fid_real", default="train", choices=["train", "test"],
                   help="FID's real statistics: every training image (official code; the paper "
                        "says only 'real images') or the evaluated test images")
    p.add_argument("--fid_runs", type=int, default=10,
                   help="FID averaged over this many noise draws of every layout (paper §4.1: "
                        "10 runs), 1-10 (the 10 LPIPS groups)")
    p.add_argument("--sample_class", type=int, default=None, help="class for control (b)")
    p.add_argument("--sample_instance", type=int, default=None, help="instance id for (c)")
    p.add_argument("--target_index", type=int, default=0, help="test item for controls (b)-(e)")
    p.add_argument("--ref_index", type=int, default=1, help="test item used as reference (d)")
    p.add_argument("--ref_instance", type=int, default=None,
                   help="instance of the reference for (d); default its largest of the class")
    p.add_argument("--n_styles", type=int, default=6, help="columns per control grid")
    p.add_argument("--edit_instances", type=int, nargs="+", default=None,
                   help="(f) Fig. 6a: target instances given the reference's style, one more per "
                        "column; default every non-background instance whose class the "
                        "reference has, largest first (at most --n_styles)")
    p.add_argument("--edit_mean_only", action="store_true",
                   help="(f) carry the reference's mean style alone (N~ = b~ of Eq. 5, no "
                        "a~ N redraw)")
    p.add_argument("--no_unified_sampling", action="store_true",
                   help="Table 1 'w/o US': every INADE layer draws its own instance noise")
    p.add_argument("--no_noise_remapping", action="store_true",
                   help="Table 1 'w/o PNR': train with N(0, 1) noise, no encoder, no KL")
    p.add_argument("--bench", type=int, default=None,
                   help="time N training steps on a synthetic batch (fp32 eager vs --dtype/--compile)")
    return p


def check_args(args):
    """Every INADE flag in its range, before any data or model is built (one sentence each)."""
    require, at_least = common.require, common.at_least
    common.require_one_process_for_outputs(args)
    at_least(args, 1, "ngf", "ndf", "nef", "num_d", "z_dim", "noise_nc", "eval_n", "n_styles",
             "bench")
    at_least(args, 2, "num_classes")
    at_least(args, 0, "lambda_fm", "lambda_rec", "lambda_kl", "sample_class", "sample_instance",
             "target_index", "ref_index", "ref_instance")
    for k in args.edit_instances or ():
        require(k >= 0, f"--edit_instances must be instance ids of at least 0 (got {k}).")
    require(len(set(args.edit_instances or ())) == len(args.edit_instances or ()),
            f"--edit_instances names an instance twice (got {args.edit_instances}).")
    require(args.aspect_ratio > 0, f"--aspect_ratio must be positive (got {args.aspect_ratio}).")
    require(args.lr_g > 0 and args.lr_d > 0,
            f"--lr_g and --lr_d must be positive (got {args.lr_g}, {args.lr_d}).")
    require(0 <= args.beta1 < 1 and 0 <= args.beta2 < 1,
            f"--beta1 and --beta2 must be in [0, 1) (got {args.beta1}, {args.beta2}).")
    n_up = {"normal": 5, "more": 6}[args.num_up]   # the generator's up-samplings (supp. Fig. 8)
    H, W = gen_hw(args)
    require(H % 2 ** n_up == 0 and W % 2 ** n_up == 0,
            f"image size {H}x{W} must be divisible by {2 ** n_up} ({n_up} up-samplings, "
            f"--num_up {args.num_up}); set --size / --aspect_ratio.")
    per_process, uneven = divmod(args.batch_size, common.world_size())  # uneven: refused later
    first = (H // 2 ** n_up) * (W // 2 ** n_up)    # the generator's first map: 1x1 at 32x32
    require(per_process * first > 1 or uneven or args.sample or args.eval or args.dry_run,
            f"--batch_size {args.batch_size} gives each process 1 image, and at {H}x{W} the "
            f"generator's first feature map is 1x1: batch normalisation (Eq. 1) needs more than "
            f"one value per channel to train; use --batch_size {2 * common.world_size()} or a "
            f"larger --size.")
    require(not (args.perceptual.startswith("vgg") and not args.pretrained),
            f"--perceptual {args.perceptual} needs the pretrained VGG-19 (--pretrained 1); "
            f"without it use --perceptual l1 or off.")
    require(not (args.eval and args.pretrained and args.eval_n < 2),
            f"--eval_n must be at least 2 for FID (got {args.eval_n}).")
    require(1 <= args.fid_runs <= DIVERSITY_GROUPS,
            f"--fid_runs must be between 1 and {DIVERSITY_GROUPS} (got {args.fid_runs}).")


def gen_hw(args):
    """Output (H, W): --size is the height; Cityscapes is 256x512 (aspect 2)."""
    return args.size, int(round(args.size * args.aspect_ratio))


# ----------------------------------------------------------------------------------------------
# Inputs: label map m (B, H, W) and instance map p (B, H, W), contiguous ids 0..K-1 (§3)
# ----------------------------------------------------------------------------------------------

def resize_ids(ids, size):
    """Nearest resize of an integer map (B, H, W); equals resizing its one-hot (SPADE, §3.3)."""
    if tuple(ids.shape[-2:]) == tuple(size):
        return ids
    return F.interpolate(ids[:, None].float(), size=size, mode="nearest")[:, 0].long()


def d_condition(label, inst, num_classes):
    """D's semantic input: one-hot (L channels) + instance edge map (official), (B, L+1, H, W)."""
    onehot = F.one_hot(label, num_classes).permute(0, 3, 1, 2).float()
    return torch.cat([onehot, data.instance_edges(inst)[:, None].float()], 1)


def num_instances(inst):
    """K instance slots for a batch: max id + 1 (official)."""
    return int(inst.max()) + 1


# ----------------------------------------------------------------------------------------------
# INADE layer, Eq. (1)-(3)
# ----------------------------------------------------------------------------------------------

class INADE(nn.Module):
    """Instance-adaptive denormalisation of a (B, C, H, W) activation.

    Eq. (1): x_hat = (x - mu) / sigma (parameter-free batch norm; SyncBN under DDP),
             y = gamma * x_hat + beta  (no "1 + gamma", unlike SPADE).
    Eq. (2): gamma[px] = a_gamma[G(l_p)] * N^_gamma[l_p] + b_gamma[G(l_p)], beta likewise, where
             l_p is the pixel's instance and G(l_p) its class.
    Eq. (3): N^ = F(N), a linear map C0 -> C of the noise shared by all layers. The paper writes two
             maps F_gamma, F_beta; the official code has ONE map shared by the gamma and beta
             samples, and only that reproduces the parameter counts of Tables 3-4: we follow it.
    The class is looked up per pixel and the noise per instance, as in the official code, so an
    instance that crosses class borders takes each pixel's own class distribution.
    """

    def __init__(self, channels, num_classes, noise_nc):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        # a[..., 0] = a_gamma, a[..., 1] = a_beta; b likewise. Init a ~ U(0, 1), b = 0 (official).
        self.a = nn.Parameter(torch.rand(num_classes, channels, 2))
        self.b = nn.Parameter(torch.zeros(num_classes, channels, 2))
        self.fc_noise = nn.Linear(noise_nc, channels)

    def modulation(self, label, inst, noise):
        """gamma, beta (B, C, h, w) for a label and an instance map (B, h, w) and the instance
        noise (B, K, 2, C0) ([:, :, 0] for gamma, [:, :, 1] for beta), or (B, K, layers, 2, C0)
        with independent sampling per layer (the w/o US ablation: this layer takes its own)."""
        if noise.dim() == 5:
            noise = noise[:, :, self.index]
        mapped = self.fc_noise(noise)                                   # Eq. (3): (B, K, 2, C)
        onehot = F.one_hot(inst, noise.shape[1]).to(mapped.dtype)       # (B, h, w, K)
        noise_px = torch.einsum("bhwk,bksc->bschw", onehot, mapped)     # N^[l_p]: (B, 2, C, h, w)
        a = self.a[label].permute(0, 4, 3, 1, 2)                        # a[G(l_p)]: (B, 2, C, h, w)
        b = self.b[label].permute(0, 4, 3, 1, 2)
        gamma_beta = a * noise_px + b                                   # Eq. (2)
        return gamma_beta[:, 0], gamma_beta[:, 1]                       # (B, C, h, w) each

    def forward(self, x, label, inst, noise):
        size = x.shape[-2:]
        gamma, beta = self.modulation(resize_ids(label, size), resize_ids(inst, size), noise)
        return gamma * self.norm(x) + beta                              # Eq. (1)


def background_class(args):
    """The class that is no object, skipped where an object is picked (the grids' default
    instance, control (f)'s parts, the metrics' instances): 0 (background; Cityscapes'
    "unlabeled"), except on ADE20K, whose class 0 is wall: there it is the unlabelled pixels,
    "other (don't care)", the last class."""
    return args.num_classes - 1 if args.data == "ade20k" else 0


def instance_classes(label, inst, num_inst):
    """G(l_p): the semantic class of every instance slot, (B, K); 0 for an absent slot (the class
    of one of its pixels for an instance that crosses class borders). For picking instances."""
    cls = torch.zeros(len(inst), num_inst, dtype=torch.long, device=inst.device)
    return cls.scatter_(1, inst.flatten(1), label.flatten(1))


# ----------------------------------------------------------------------------------------------
# Generator (supplement Fig. 8; SPADE's trunk with INADE in place of SPADE)
# ----------------------------------------------------------------------------------------------

def init_weights(module):
    """Official init: xavier_normal (gain 0.02) for every Conv/Linear, bias 0. The INADE
    parameters a, b keep their own init (they are not Conv/Linear weights)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.xavier_normal_(w, gain=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def spectral_norm(module):
    """Spectral normalisation (Miyato et al., ICLR 2018) of a layer's weight (official: on every
    conv of G's ResBlks and of D but the first and last)."""
    return nn.utils.parametrizations.spectral_norm(module)


class INADEResBlock(nn.Module):
    """INADE ResBlk: [INADE -> LReLU -> conv3x3] x 2, plus a learned shortcut
    (INADE -> conv1x1, no bias, no activation) when widths differ. Convs carry spectral norm."""

    def __init__(self, fin, fout, num_classes, noise_nc):
        super().__init__()
        mid = min(fin, fout)
        sn = spectral_norm
        self.learned_shortcut = fin != fout
        self.norm_0 = INADE(fin, num_classes, noise_nc)
        self.conv_0 = sn(nn.Conv2d(fin, mid, 3, padding=1))
        self.norm_1 = INADE(mid, num_classes, noise_nc)
        self.conv_1 = sn(nn.Conv2d(mid, fout, 3, padding=1))
        if self.learned_shortcut:
            self.norm_s = INADE(fin, num_classes, noise_nc)
            self.conv_s = sn(nn.Conv2d(fin, fout, 1, bias=False))

    def forward(self, x, label, inst, noise):
        skip = self.conv_s(self.norm_s(x, label, inst, noise)) if self.learned_shortcut else x
        h = self.conv_0(F.leaky_relu(self.norm_0(x, label, inst, noise), 0.2))
        h = self.conv_1(F.leaky_relu(self.norm_1(h, label, inst, noise), 0.2))
        return skip + h


class Generator(nn.Module):
    """z (B, z_dim) -> fc -> (B, 16 ngf, sh, sw) -> 7 INADE ResBlks with nearest x2 up-sampling
    -> LReLU -> conv3x3 -> tanh. 18 INADE layers, all fed the same instance noise (unified
    sampling, §3.3), or each its own sample with unified_sampling=False (Table 1, "w/o US")."""

    def __init__(self, num_classes, height, width, ngf=64, z_dim=256, noise_nc=64,
                 num_up="normal", unified_sampling=True):
        super().__init__()
        n_up = {"normal": 5, "more": 6}[num_up]
        if width % 2 ** n_up or height % 2 ** n_up:
            raise common.UserError(f"image size {height}x{width} must be divisible by "
                                   f"{2 ** n_up} ({n_up} up-samplings, --num_up {num_up}).")
        self.num_up, self.z_dim, self.noise_nc = num_up, z_dim, noise_nc
        self.sh, self.sw = height // 2 ** n_up, width // 2 ** n_up
        self.fc = nn.Linear(z_dim, 16 * ngf * self.sh * self.sw)
        ch = [16 * ngf, 16 * ngf, 16 * ngf, 16 * ngf, 8 * ngf, 4 * ngf, 2 * ngf, ngf]
        names = ["head_0", "G_middle_0", "G_middle_1", "up_0", "up_1", "up_2", "up_3"]
        for name, fin, fout in zip(names, ch[:-1], ch[1:]):
            self.add_module(name, INADEResBlock(fin, fout, num_classes, noise_nc))
        self.conv_img = nn.Conv2d(ngf, 3, 3, padding=1)
        init_weights(self)
        self.unified_sampling = unified_sampling
        for i, layer in enumerate(self.inade_layers()):
            layer.index = i          # which noise sample the layer takes without unified sampling

    def noise_shape(self, n, num_inst):
        """(n, K, 2, C0), or (n, K, 18, 2, C0) with one sample per INADE layer (w/o US)."""
        layers = () if self.unified_sampling else (len(self.inade_layers()),)
        return (n, num_inst, *layers, 2, self.noise_nc)

    def forward(self, z, label, inst, noise):
        """z (B, z_dim) global vector (always random, official); label, inst (B, H, W) int;
        noise (B, K, 2, C0) as noise_shape: per instance, [..., 0, :] for gamma, [..., 1, :]
        for beta."""
        up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")
        cond = (label, inst, noise)
        x = self.fc(z).view(len(z), -1, self.sh, self.sw)
        x = up(self.head_0(x, *cond))
        x = self.G_middle_0(x, *cond)
        if self.num_up == "more":  # Cityscapes: one extra up-sampling here (supp. Fig. 8)
            x = up(x)
        x = self.G_middle_1(x, *cond)
        for block in (self.up_0, self.up_1, self.up_2, self.up_3):
            x = block(up(x), *cond)
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))

    def inade_layers(self):
        return [m for m in self.modules() if isinstance(m, INADE)]


# ----------------------------------------------------------------------------------------------
# Prior noise remapping encoder, §3.4 (supplement Fig. 7)
# ----------------------------------------------------------------------------------------------

class InstanceAwareConv2d(nn.Conv2d):
    """"Instance partial convolution": in each k x k window, neighbours of another instance than
    the window's centre are zeroed, so no information crosses instance borders in this conv. Like
    the official code (segmentation-aware conv) we do NOT renormalise by the number of valid
    pixels, as partial convolution would: the paper cites both; our choice. Zero padding counts
    as instance 0."""

    def forward(self, x, inst):
        """x (B, C, H, W), inst (B, H, W) at x's resolution -> (B, out, H', W')."""
        B, C, H, W = x.shape
        k, s, p = self.kernel_size[0], self.stride[0], self.padding[0]
        cols = F.unfold(x, k, padding=p, stride=s)                       # (B, C*k*k, L)
        ids = F.unfold(inst[:, None].to(x.dtype), k, padding=p, stride=s)  # (B, k*k, L)
        same = (ids == ids[:, k * k // 2:k * k // 2 + 1]).to(x.dtype)     # window centre's id
        cols = (cols.view(B, C, k * k, -1) * same[:, None]).view(B, C * k * k, -1)
        out = self.weight.view(self.out_channels, -1) @ cols + self.bias[:, None]
        return out.view(B, self.out_channels, (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1)


def instance_average_pool(feat, inst, num_inst):
    """Eq. (4): mean of feat (B, C, H, W) over each instance's pixels -> (B, K, C).
    An instance absent from a sample gets the zero vector (divisor 1, official)."""
    onehot = F.one_hot(inst, num_inst).to(feat.dtype)                    # (B, H, W, K)
    total = torch.einsum("bhwk,bchw->bkc", onehot, feat)
    count = onehot.sum((1, 2))[..., None].clamp(min=1)                   # (B, K, 1)
    return total / count


class NoiseEncoder(nn.Module):
    """U-Net on the reference image (official widths, ngf = 64): 4 stride-2 instance-aware convs,
    a middle conv, 3 up-sampling convs with skips, then the four heads (mu_gamma, logvar_gamma,
    mu_beta, logvar_beta), each an instance-aware conv to C0, followed by instance pooling.
    Every conv: InstanceAwareConv3x3 -> InstanceNorm (no affine) -> LReLU(0.2); no spectral norm.
    The four heads are computed as one conv with 4 C0 outputs: the same parameter count and maths,
    but xavier's std depends on fan_out, so they start smaller than four separate heads, and the
    official four weights must be concatenated to load. The encoder as a whole is not
    instance-isolated (official too): InstanceNorm's statistics and the bilinear up-sampling
    span the whole image, so one instance's pixels move the others' codes a little."""

    def __init__(self, noise_nc, nef=64):
        super().__init__()
        conv = lambda i, o, s=1: InstanceAwareConv2d(i, o, 3, stride=s, padding=1)
        self.layer1, self.layer2 = conv(3, nef, 2), conv(nef, 2 * nef, 2)
        self.layer3, self.layer4 = conv(2 * nef, 4 * nef, 2), conv(4 * nef, 8 * nef, 2)
        self.middle = conv(8 * nef, 4 * nef)
        self.up1, self.up2 = conv(8 * nef, 2 * nef), conv(4 * nef, nef)
        self.up3 = conv(2 * nef, nef)
        self.heads = conv(nef, 4 * noise_nc)
        self.noise_nc = noise_nc
        init_weights(self)

    def block(self, conv, x, inst):
        x = conv(x, resize_ids(inst, x.shape[-2:]))
        return F.leaky_relu(F.instance_norm(x), 0.2)

    def forward(self, image, inst, num_inst):
        """image (B, 3, H, W), inst (B, H, W) -> mu, logvar, each (B, K, 2, C0)."""
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)
        x1 = self.block(self.layer1, image, inst)                          # H/2
        x2 = self.block(self.layer2, x1, inst)                             # H/4
        x3 = self.block(self.layer3, x2, inst)                             # H/8
        x4 = self.block(self.layer4, x3, inst)                             # H/16
        y = up(self.block(self.middle, x4, inst))                          # H/8
        y = up(self.block(self.up1, torch.cat([y, x3], 1), inst))          # H/4
        y = up(self.block(self.up2, torch.cat([y, x2], 1), inst))          # H/2
        y = up(self.block(self.up3, torch.cat([y, x1], 1), inst))          # H
        maps = self.heads(y, inst)                                         # (B, 4 C0, H, W)
        # Eq. (4) pools the heads' maps; the scale head is log sigma^2 (official), so the
        # pooled scale exp(mean(logvar) / 2) is a geometric, not arithmetic, mean of a~'
        pooled = instance_average_pool(maps, inst, num_inst)               # Eq. (4): (B, K, 4 C0)
        mu_g, logvar_g, mu_b, logvar_b = pooled.float().chunk(4, dim=2)
        return torch.stack([mu_g, mu_b], 2), torch.stack([logvar_g, logvar_b], 2)


def remap_noise(mu, logvar):
    """Eq. (5): N~ = a~ * N + b~ with a~ = sigma = exp(logvar / 2), b~ = mu, N ~ N(0, 1)."""
    return torch.randn_like(mu) * torch.exp(0.5 * logvar) + mu


def kl_standard_normal(mu, logvar):
    """KL(N(mu, var) || N(0, 1)) elementwise: 0.5 (mu^2 + var - 1 - logvar) (Kingma & Welling)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)

def kl_loss(mu, logvar):
    """Eq. (9): 0.5 (KL_gamma + KL_beta), KL(N(mu, sigma^2) || N(0, 1)) summed over instances and
    C0 (official: SPADE's sum-reduced KLD) and averaged over the batch (official batch size is 1;
    a per-sample sum keeps lambda3 = 0.05 meaningful at larger batches: our choice).
    Empty instance slots have mu = logvar = 0 and contribute 0."""
    kl = kl_standard_normal(mu, logvar)                 # (B, K, 2, C0)
    return 0.5 * kl.sum((1, 3)).sum(1).mean()



# ----------------------------------------------------------------------------------------------
# Discriminator and losses (supplement §6)
# ----------------------------------------------------------------------------------------------

class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pixHD / SPADE `NLayerDiscriminator`, supp. Fig. 9): 4x4 convs.

    Layers (ndf = 64): in->64 s2 (no norm) | 64->128 s2 | 128->256 s2 | 256->512 s1 (spectral norm
    + InstanceNorm, no bias) | 512->1 s1. LeakyReLU(0.2) after all but the last. forward returns
    every layer's output (for feature matching, Eq. 7); the last one is the logit map."""

    def __init__(self, in_ch, ndf=64, n_layers=4):
        super().__init__()
        pad = 2  # SPADE: ceil((4 - 1) / 2)
        layers = [nn.Sequential(nn.Conv2d(in_ch, ndf, 4, 2, pad), nn.LeakyReLU(0.2))]
        ch = ndf
        for n in range(1, n_layers):
            out = min(ch * 2, 512)
            stride = 1 if n == n_layers - 1 else 2
            layers.append(nn.Sequential(
                spectral_norm(nn.Conv2d(ch, out, 4, stride, pad, bias=False)),
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
    Down-sampling: avg-pool 3x3, stride 2, pad 1, count_include_pad=False (SPADE).
    Returns one list of layer outputs per scale; [-1] of each is the logit map."""

    def __init__(self, in_ch, num_d=2, ndf=64, n_layers=4):
        super().__init__()
        self.scales = nn.ModuleList(PatchDiscriminator(in_ch, ndf, n_layers) for _ in range(num_d))
        init_weights(self)  # official: every network's convs, D's too (SPADE's create_network)

    def forward(self, x):
        outs = []
        for i, d in enumerate(self.scales):
            if i > 0:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            outs.append(d(x))
        return outs


def hinge_d_loss(real_logits, fake_logits):
    """Eq. (6), D side (hinge, Lim & Ye 2017): E[relu(1 - D(x))] + E[relu(1 + D(G(z)))], each a
    list of logit maps, one per scale; averaged over scales (official)."""
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean()
               for r, f in zip(real_logits, fake_logits)) / len(real_logits)


def hinge_g_loss(fake_logits):
    """Eq. (6), G side: -E[D(G(z))], averaged over scales."""
    return sum(-f.mean() for f in fake_logits) / len(fake_logits)

FM_LAYERS = (3,)   # Eq. (7) with S_D = 3 read 0-based: only D's 4th intermediate output (official)
VGG_LAYERS = ("relu4_1", "relu5_1")   # Eq. (8) with S_V = 3 (0-based) of relu1_1..relu5_1;
                                      # the paper's Eq. (8) prints S_D, a typo for S_V
VGG_WEIGHTS = {"vgg": (1.0, 1.0),     # paper: unweighted
               "vgg_official": (0.25, 1.0)}  # official [0, 0, 0, 1/4, 1]


def feature_matching(real_out, fake_out):
    """Eq. (7): L1 mean between D features of real and fake at FM_LAYERS, averaged over scales."""
    loss = 0.0
    for real_feats, fake_feats in zip(real_out, fake_out):
        for i in FM_LAYERS:
            loss = loss + F.l1_loss(fake_feats[i], real_feats[i].detach())
    return loss / len(real_out)


class ReconstructionLoss(nn.Module):
    """The lambda2 term. Eq. (8): sum over VGG layers of the L1 mean of feature differences, with
    a frozen VGG-19 fed [-1, 1] images without ImageNet normalisation (official). `l1` replaces
    it by a pixel L1 (our choice, for runs without the pretrained VGG: a random VGG's features
    carry no perceptual meaning)."""

    def __init__(self, kind, pretrained, weights=True):
        super().__init__()
        self.kind = kind
        if kind.startswith("vgg") and not pretrained:
            raise common.UserError(f"--perceptual {kind} needs the pretrained VGG-19 (--pretrained "
                                   f"1); without it use --perceptual l1 or off.")
        if kind.startswith("vgg"):  # weights=False: the same VGG-19 with random weights, for
            # counting FLOPs (the same cost, no download: training_flops)
            self.vgg = common.VGG19(pretrained=bool(pretrained) and weights, normalize=False)
            self.weights = VGG_WEIGHTS[kind]

    def forward(self, fake, real):
        if self.kind == "l1":
            return F.l1_loss(fake, real)
        if self.kind == "off":
            return fake.new_zeros(())
        fake_feats = self.vgg(fake, list(VGG_LAYERS))
        with torch.no_grad():  # the target's features need no graph
            real_feats = self.vgg(real, list(VGG_LAYERS))
        loss = 0.0
        for w, name in zip(self.weights, VGG_LAYERS):
            loss = loss + w * F.l1_loss(fake_feats[name].float(), real_feats[name].float())
        return loss


def build_models(args):
    H, W = gen_hw(args)
    G = Generator(args.num_classes, H, W, args.ngf, args.z_dim, args.noise_nc, args.num_up,
                  unified_sampling=not args.no_unified_sampling)
    E = NoiseEncoder(args.noise_nc, args.nef)
    D = MultiscaleDiscriminator(args.num_classes + 1 + 3, args.num_d, args.ndf)
    return G, E, D


# ----------------------------------------------------------------------------------------------
# The training step and the sampler (Eq. 10; random styles §3.3, exemplar styles §3.4)
# ----------------------------------------------------------------------------------------------

def random_noise(G, inst, n=None):
    """Random styles (§3.3): N(0, 1) noise for every instance slot of inst (B, H, W), for B (or
    n) outputs, shaped as G.noise_shape."""
    return torch.randn(G.noise_shape(len(inst) if n is None else n, num_instances(inst)),
                       device=inst.device)


def encoded_noise(G, mu, logvar, mean_only=False):
    """Exemplar styles: Eq. (5) from the encoder's (mu, logvar) (B, K, 2, C0), one sample shared
    by every layer, or one per layer without unified sampling. mean_only: the shift b~ = mu
    alone, no a~ N term (Fig. 6a's editing can carry the mean style; our flag)."""
    shape = G.noise_shape(*mu.shape[:2])
    if len(shape) == 5:
        mu, logvar = mu[:, :, None].expand(shape), logvar[:, :, None].expand(shape)
    return mu.clone() if mean_only else remap_noise(mu, logvar)


def generate(G, E, batch, z=None, noise=None, use_encoder=True):
    """One forward pass: noise from the encoder (Eq. 5) or N(0, 1); returns fake, mu, logvar.
    batch["num_instances"], when the training loop has put it there, is K counted on the host."""
    inst, label = batch["instance"], batch["label"]
    K = batch.get("num_instances") or num_instances(inst)
    mu = logvar = None
    if noise is None:
        if use_encoder:
            mu, logvar = E(batch["image"], inst, K)
            noise = encoded_noise(common.unwrap(G), mu, logvar)
        else:  # random styles: plain N(0, 1) noise per instance (§3.3)
            noise = torch.randn(common.unwrap(G).noise_shape(len(inst), K), device=inst.device)
    if z is None:
        z = torch.randn(len(inst), common.unwrap(G).z_dim, device=inst.device)
    return G(z, label, inst, noise), mu, logvar


def train_step(args, rt, G, E, D, rec_loss, opt_g, opt_d, batch):
    """One G(+E) step then one D step (official order); the D step reuses the generated batch
    (detached) instead of generating a second one (our choice: one G forward per iteration).
    Returns the losses as detached device tensors: no host sync here (the loop reads them on log
    steps only)."""
    real, label, inst = batch["image"], batch["label"], batch["instance"]
    cond = d_condition(label, inst, args.num_classes)
    D.requires_grad_(False)  # G step: no D weight gradients (nor their DDP all-reduce)
    with rt.autocast():  # w/o PNR (Table 1): N(0, 1) noise in training too, no encoder, no KL
        fake, mu, logvar = generate(G, E, batch, use_encoder=not args.no_noise_remapping)
        d_out = D(torch.cat([torch.cat([cond, fake], 1), torch.cat([cond, real], 1)]))
        fake_out = [[f.chunk(2)[0] for f in scale] for scale in d_out]
        real_out = [[f.chunk(2)[1] for f in scale] for scale in d_out]
        g_gan = hinge_g_loss([scale[-1] for scale in fake_out])            # Eq. (6), G side
        g_fm = feature_matching(real_out, fake_out)                        # Eq. (7)
        g_rec = rec_loss(fake.float(), real)                               # Eq. (8)
    g_kl = kl_loss(mu, logvar) if mu is not None else fake.new_zeros(())  # Eq. (9)
    g_loss = g_gan + args.lambda_fm * g_fm + args.lambda_rec * g_rec + args.lambda_kl * g_kl
    opt_g.zero_grad(set_to_none=True)
    rt.scaler.scale(g_loss).backward()                                     # Eq. (10), min over E, G
    rt.scaler.step(opt_g)

    D.requires_grad_(True)
    with rt.autocast():
        d_out = D(torch.cat([torch.cat([cond, fake.detach()], 1), torch.cat([cond, real], 1)]))
        fake_logit = [scale[-1].chunk(2)[0] for scale in d_out]
        real_logit = [scale[-1].chunk(2)[1] for scale in d_out]
        d_loss = hinge_d_loss(real_logit, fake_logit)                      # Eq. (6), D side
    opt_d.zero_grad(set_to_none=True)
    rt.scaler.scale(d_loss).backward()
    rt.scaler.step(opt_d)
    rt.scaler.update()
    return {k: v.detach().float() for k, v in
            dict(g_gan=g_gan, g_fm=g_fm, g_rec=g_rec, g_kl=g_kl, d_loss=d_loss).items()}


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------

def lr_factor(iters):
    """Paper §4.1: constant for the first half of training, then linearly to zero (200 epochs,
    decay after 100), counted in iterations here."""
    half = iters // 2
    return lambda it: 1.0 if it < half else max(0.0, (iters - it) / max(iters - half, 1))


def get_split(args, split):
    """data.get_dataset for --data; a folder-pairs set takes --num_classes when given (so that a
    DeepFashion checkpoint reads a folder whose labels miss some of its 8 classes)."""
    options = {}
    if args.data == "folder-pairs" and args.num_classes is not None:
        options["num_classes"] = args.num_classes
    return data.get_dataset(args.data, root=args.data_dir, split=split, size=args.size,
                            skip=data.OPTIONAL_KEYS, **options)  # image, label, instance only


def load_data(args, split):
    H, W = gen_hw(args)
    ds = get_split(args, split)
    if "instance" not in ds.has or "label" not in ds.has:
        raise common.UserError(f"INADE needs label and instance maps, but --data {args.data} "
                               f"provides only: {', '.join(sorted(ds.has))}.")
    if tuple(ds.size) != (H, W):
        raise common.UserError(f"--data {args.data} gives {ds.size[0]}x{ds.size[1]} images, but "
                               f"the generator makes {H}x{W}; set --size / --aspect_ratio.")
    return ds


def fill_num_classes(args, ds):
    if args.num_classes not in (None, ds.num_classes) and args.data != "shapes":
        raise common.UserError(f"--num_classes {args.num_classes} does not match the "
                               f"{ds.num_classes} classes of --data {args.data}.")
    args.num_classes = ds.num_classes


def test_set(args):
    """The test split: the layouts of --sample's grids and of --eval's protocol (§4.1)."""
    try:
        return get_split(args, "test")
    except common.UserError as err:
        raise common.UserError(f"--sample and --eval take their layouts from the test split of "
                               f"--data {args.data}, which could not be read: {err}") from None


def fixed_batch(args, device, train_ds, n=6):
    """The first n test layouts, shown in the training grids, and the dataset's label palette.
    Training does not need the test split: without one the grids show the first training
    layouts instead (a note says so)."""
    try:
        ds = test_set(args)
    except common.UserError as err:
        ds = train_ds
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"note: {err} The training grids show the first training layouts instead.")
    with common.preserved_rng():  # training items draw crops and flips: not from the run's RNG
        items = [ds[i] for i in range(min(n, len(ds)))]
    return common.to_device(torch.utils.data.default_collate(items), device), ds.palette


@torch.no_grad()
def training_grid(args, G, E, fixed, path):
    """Rows: label, real, reconstruction (encoder, Eq. 5), then random styles (N(0, 1) noise).
    The global RNG is restored afterwards, so a run that samples more often stays the same run."""
    G.eval(), E.eval()
    batch, palette = fixed
    with common.preserved_rng():
        rec, _, _ = generate(G, E, batch)
        rows = [list(batch["label"]), list(batch["image"]), list(rec)]
        for _ in range(3):
            rows.append(list(generate(G, E, batch, use_encoder=False)[0]))
    scale = max(1, 96 // args.size)
    common.save_grid(path, [[show(t, scale) for t in row] for row in rows], palette)
    G.train(), E.train()


def train(args):
    rt = common.setup_runtime(args)
    ds = load_data(args, "train")
    fill_num_classes(args, ds)
    if args.iters is None:  # folder-pairs: 200 epochs of its training images (paper §4.1)
        args.iters = max(1, 200 * len(ds) // args.batch_size)
    G, E, D = build_models(args)
    if rt.ddp and rt.device.type == "cuda":
        G = nn.SyncBatchNorm.convert_sync_batchnorm(G)  # paper supp. §6: synchronised BN
    G, E, D = G.to(rt.device), E.to(rt.device), D.to(rt.device)  # before optimiser state loads
    if args.init_from:
        # fine-tuning: G and E start from the released weights; D (never released), Adam's
        # moments and the learning-rate schedule start afresh (INADE keeps no EMA)
        load_official_weights(args, G, E)
    rec_loss = ReconstructionLoss(args.perceptual, args.pretrained).to(rt.device)
    GE = nn.ModuleDict(dict(G=G, E=E))  # the encoder joins G's optimiser (official)
    opt_g = torch.optim.Adam(GE.parameters(), lr=args.lr_g, betas=(args.beta1, args.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(args.beta1, args.beta2))
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_factor(args.iters))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_factor(args.iters))
    objects = dict(G=G, E=E, D=D, opt_g=opt_g, opt_d=opt_d, sched_g=sched_g, sched_d=sched_d,
                   scaler=rt.scaler)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    means = common.LossMeans(rt.device)  # the losses since the last log line
    start = 0
    if args.resume:
        start = common.load_checkpoint(ckpt_path, "inade", vars(args), ARCH_KEYS, objects,
                                       rt=rt, per_rank=dict(log_means=means))["iter"]
        for sched in (sched_g, sched_d):  # the saved lr is the old --iters' schedule's: this one's
            for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
                group["lr"] = base * sched.lr_lambdas[0](sched.last_epoch)
    G = common.prepare_model(G, rt, args.compile)
    E = common.prepare_model(E, rt, args.compile)
    D = common.prepare_model(D, rt, args.compile)
    stream = common.batch_stream(ds, args.batch_size, rt, args.seed, start, args.num_workers)
    fixed = fixed_batch(args, rt.device, ds)
    log = common.Logger(args.out_dir, args.iters, start, rt.is_main)
    G.train(), E.train(), D.train()
    with common.StopSignals() as signals:
        for it in range(start, args.iters):
            batch = next(stream)
            batch["num_instances"] = num_instances(batch["instance"])  # on the host: no sync
            batch = common.to_device(batch, rt.device)
            means.add(train_step(args, rt, G, E, D, rec_loss, opt_g, opt_d, batch))
            sched_g.step(), sched_d.step()
            log.step(args.batch_size)
            done = it + 1
            if done % args.log_every == 0 or done == args.iters:  # the mean since the last log
                log.log(done, **means.pop(rt), lr_g=sched_g.get_last_lr()[0])
            if rt.is_main and (done % args.sample_every == 0 or done == args.iters):
                training_grid(args, common.unwrap(G), common.unwrap(E), fixed,
                              os.path.join(args.out_dir, f"samples_{done:06d}.png"))
            signals.end_of_step(rt, args, done, ckpt_path, lambda: common.save_checkpoint(
                ckpt_path, "inade", args, done, objects, rt=rt, per_rank=dict(log_means=means)))
    log.close()


# ----------------------------------------------------------------------------------------------
# Official released weights (--init_from): the authors' best_net_G.pth and best_net_E.pth
# ----------------------------------------------------------------------------------------------
# tzt101/INADE releases, per dataset, the state dicts of its SPADEGenerator (with INADE layers,
# class ILADE) and of its instanceAdaptiveEncoder. The networks above compute the same functions;
# only some names differ, and our encoder computes the four heads as one conv.

# Generator key renames, official -> ours (regular expressions, tried in order; a key that none
# matches keeps its name: fc.*, conv_img.*, conv_k.bias, norm_k.fc_noise.*).
OFFICIAL_G_RENAMES = (
    # spectral norm: torch.nn.utils.spectral_norm (official) -> the parametrization (ours); the
    # same sigma = u.Wv from the stored u, v in eval mode. Training's power step updates v then u
    # there, u then v here: equal once u, v have converged, as in a trained file.
    (r"\.(conv_[01s])\.weight_orig$", r".\1.parametrizations.weight.original"),
    (r"\.(conv_[01s])\.weight_u$", r".\1.parametrizations.weight.0._u"),
    (r"\.(conv_[01s])\.weight_v$", r".\1.parametrizations.weight.0._v"),
    # INADE layer: the per-class tensors (L, c, 2) are the paper's a and b, [..., 0] gamma and
    # [..., 1] beta in both codes; the parameter-free batch norm (SyncBN there) keeps its stats
    (r"\.(norm_[01s])\.weight$", r".\1.a"),
    (r"\.(norm_[01s])\.bias$", r".\1.b"),
    (r"\.(norm_[01s])\.param_free_norm\.", r".\1.norm."),
)
# Encoder: four head convs there, one conv with 4 C0 outputs here, in our chunk order.
OFFICIAL_E_HEADS = ("scale_conv_mu", "scale_conv_var", "bias_conv_mu", "bias_conv_var")
OFFICIAL_G_KEY, OFFICIAL_E_KEY = "head_0.norm_0.fc_noise.weight", "scale_conv_mu.weight"
OFFICIAL_FILES = {"G": ("G",), "E": ("E", "IE")}  # best_net_<label>.pth; IE: older releases


def official_generator_state(official):
    """Our Generator's state dict from the official generator's (a pure renaming)."""
    import re
    ours = {}
    for key, tensor in official.items():
        for pattern, repl in OFFICIAL_G_RENAMES:
            key, hits = re.subn(pattern, repl, key)
            if hits:
                break
        ours[key] = tensor
    return ours


def official_encoder_state(official):
    """Our NoiseEncoder's state dict from the official encoder's: the four heads joined along
    the output channels (mu_gamma, logvar_gamma, mu_beta, logvar_beta), the rest as named."""
    ours = {k: v for k, v in official.items() if k.split(".")[0] not in OFFICIAL_E_HEADS}
    for part in ("weight", "bias"):
        ours[f"heads.{part}"] = torch.cat([official[f"{h}.{part}"] for h in OFFICIAL_E_HEADS])
    return ours


def read_official(path):
    """A released file's state dict (tensors only: weights_only=True) and which network it is,
    "G" or "E", recognised by its keys; one sentence for anything else."""
    import pickle
    try:
        state = common.load_weights(path)
    except common.UserError as err:
        if isinstance(err.__cause__, pickle.UnpicklingError):
            raise common.UserError(f"--init_from {path} needs Python code from its pickle to "
                                   f"load, which is never run (weights_only=True); the released "
                                   f"files hold plain tensors.") from None
        raise common.UserError(f"--init_from {path} is not a readable PyTorch weights file "
                               f"(best_net_G.pth or best_net_E.pth).") from None
    if isinstance(state, dict) and "method" in state and "state" in state:
        raise common.UserError(f"--init_from {path} is a checkpoint of this project's "
                               f"{state['method']}.py, not an official INADE file; load it with "
                               f"--out_dir (and --resume).")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise common.UserError(f"--init_from {path} is not a state dict of tensors.")
    if all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(".sketch_conv." in k for k in state):
        raise common.UserError(f"--init_from {path} was trained with the official --add_sketch "
                               f"option (an edge-map input), which inade.py does not implement.")
    if "head_0.norm_0.mlp_shared.0.weight" in state:
        raise common.UserError(f"--init_from {path} is a SPADE generator (SPADE layers), not "
                               f"INADE's.")
    kind = "G" if OFFICIAL_G_KEY in state else "E" if OFFICIAL_E_KEY in state else None
    if kind is None:
        raise common.UserError(f"--init_from {path} is not INADE's released generator or encoder "
                               f"(it has no {OFFICIAL_G_KEY} nor {OFFICIAL_E_KEY}).")
    return state, kind


def official_pair(path):
    """(G state, E state, G path, E path) of --init_from: either released file, the other being
    found beside it under the same prefix (best_net_G.pth with best_net_E.pth or _IE.pth)."""
    import re
    names = {"G": "generator", "E": "encoder"}
    state, kind = read_official(path)
    states, files = {kind: state}, {kind: path}
    match = re.fullmatch(r"(.*)_net_(G|E|IE)\.pth", os.path.basename(path))
    common.require(match is not None, f"--init_from {path} holds INADE's {names[kind]}; keep the "
                                      f"released names (best_net_G.pth, best_net_E.pth) so that "
                                      f"its partner is found beside it.")
    for other, labels in OFFICIAL_FILES.items():
        if other in states:
            continue
        candidates = [os.path.join(os.path.dirname(path), f"{match.group(1)}_net_{label}.pth")
                      for label in labels]
        file = next((p for p in candidates if os.path.isfile(p)), None)
        common.require(file is not None, f"--init_from needs the released generator and encoder "
                                         f"together; found no {' nor '.join(candidates)}.")
        states[other], is_kind = read_official(file)
        common.require(is_kind == other, f"--init_from: {file} holds INADE's {names[is_kind]}, "
                                         f"not its {names[other]}.")
        files[other] = file
    return states["G"], states["E"], files["G"], files["E"]


def official_flags(g, e, args):
    """The architecture flags the released tensors imply (shapes only). The first feature map
    (sh x sw cells) fixes --size, given --num_up and --aspect_ratio (the dataset's preset)."""
    n_up = {"normal": 5, "more": 6}[args.num_up]
    for state, key in ((g, "conv_img.weight"), (g, "fc.weight"), (g, "head_0.norm_0.weight"),
                       (e, "layer1.weight")):
        common.require(key in state, f"--init_from: the released files lack {key}; they are "
                                     f"incomplete or not INADE's.")
    ngf = g["conv_img.weight"].shape[1]
    cells = g["fc.weight"].shape[0] // (16 * ngf)
    sh = round((cells / args.aspect_ratio) ** 0.5)
    common.require(sh * round(sh * args.aspect_ratio) == cells,
                   f"--init_from: the released generator starts from {cells} cells, which no "
                   f"image of aspect {args.aspect_ratio} gives (--aspect_ratio, --num_up).")
    flags = dict(num_classes=g["head_0.norm_0.weight"].shape[0], ngf=ngf,
                 z_dim=g["fc.weight"].shape[1], noise_nc=g[OFFICIAL_G_KEY].shape[1],
                 nef=e["layer1.weight"].shape[0], size=sh * 2 ** n_up)
    common.require(e[OFFICIAL_E_KEY].shape[0] == flags["noise_nc"],
                   f"--init_from: the encoder's C0 ({e[OFFICIAL_E_KEY].shape[0]}) is not the "
                   f"generator's ({flags['noise_nc']}): the two files are not one release.")
    return flags


def apply_official_flags(args, given):
    """--init_from: set the flags the released files imply; refuse (one sentence) when --data or
    a flag given on the command line (`given`: the parsed command line, before the presets)
    contradicts them. Called before any data or model is built."""
    g, e, g_path, _ = official_pair(args.init_from)
    flags = official_flags(g, e, args)
    classes = {cfg["num_classes"]: name for name, cfg in PRESETS.items() if cfg["num_classes"]}
    want = PRESETS[args.data]["num_classes"] or args.num_classes or get_split(
        args, "train").num_classes       # built-in data or a folder: its own count
    L = flags["num_classes"]
    common.require(L == want, f"--init_from {g_path} is INADE's generator for {L} classes"
                   + (f" ({classes[L]})" if L in classes else "")
                   + f", but --data {args.data} has {want}"
                   + (f"; pass --data {classes[L]}." if L in classes else "."))
    common.require(not args.no_unified_sampling,
                   "--init_from: the released generator was trained with unified sampling (one "
                   "noise for all 18 layers); drop --no_unified_sampling.")
    clash = [f"--{k} {v} (asked: {getattr(given, k)})" for k, v in flags.items()
             if getattr(given, k) not in (None, v)]
    common.require(not clash, f"--init_from {g_path} was trained with {', '.join(clash)}; "
                              f"drop those flags or pass these values.")
    for k, v in flags.items():
        setattr(args, k, v)
    check_args(args)


def load_official_weights(args, G, E):
    """Strict load of the released generator and encoder into ours (after apply_official_flags)."""
    g, e, g_path, e_path = official_pair(args.init_from)
    common.load_official(G, official_generator_state(g), g_path)
    common.load_official(E, official_encoder_state(e), e_path)


# ----------------------------------------------------------------------------------------------
# Sampling controls (--sample): one grid each, label map first
# ----------------------------------------------------------------------------------------------

def item_batch(ds, index, device):
    if not 0 <= index < len(ds):
        raise common.UserError(f"test item {index} does not exist; the test split of this "
                               f"dataset has {len(ds)} items.")
    return common.to_device(torch.utils.data.default_collate([ds[index]]), device)


def pick_instance(inst, label, wanted=None, flag="--sample_instance", background=0):
    """An instance of a one-item batch: `wanted`, or the largest instance not of class
    `background` (background_class)."""
    ids, counts = inst[0].unique(return_counts=True)
    if wanted is not None:
        if wanted not in ids.tolist():
            raise common.UserError(f"{flag} {wanted} is not in that layout; its instance ids "
                                   f"are {ids.tolist()}.")
        return wanted
    cls = instance_classes(label, inst, num_instances(inst))[0]
    order = [int(ids[i]) for i in counts.argsort(descending=True)]
    objects = [i for i in order if cls[i] != background]
    return objects[0] if objects else order[0]


def show(tile, scale):
    """A grid tile enlarged (nearest) so that small toy images stay readable: an image (C, H, W),
    a label map (H, W) int, or a region mask (H, W) bool drawn white on black."""
    if tile.dtype == torch.bool:
        tile = tile[None].float() * 2 - 1
    if scale == 1:
        return tile
    big = F.interpolate((tile[None, None] if tile.dim() == 2 else tile[None]).float(),
                        scale_factor=scale, mode="nearest")
    return big[0, 0].long() if tile.dim() == 2 else big[0]


def reference_instance(args, label, inst, k, ref, wanted=None):
    """The instance of the reference item whose style target instance k takes: `wanted`
    (--ref_instance for control (d)), or the reference's largest instance of k's class."""
    k_cls = int(label[0][inst[0] == k][0])
    ids, counts = ref["instance"][0][ref["label"][0] == k_cls].unique(return_counts=True)
    if wanted is None and len(ids):
        return int(ids[counts.argmax()])
    if wanted is not None and wanted in ids.tolist():
        return wanted
    which = "an instance" if wanted is None else f"instance {wanted}"
    raise common.UserError(f"reference item {args.ref_index} has no {which} of class {k_cls} "
                           f"(the class of target instance {k}); its instances of that class "
                           f"are {ids.tolist()} (see --ref_index, --ref_instance, "
                           f"--edit_instances).")


def edit_parts(args, label, inst, ref):
    """Control (f)'s parts, in editing order: [(target instance, reference instance)].
    --edit_instances, or every non-background instance of the target whose class the reference
    has, largest first, at most --n_styles; each takes the reference's largest instance of its
    class."""
    if args.edit_instances is not None:
        targets = [pick_instance(inst, label, k, "--edit_instances") for k in args.edit_instances]
    else:
        ids, counts = inst[0].unique(return_counts=True)
        cls = instance_classes(label, inst, num_instances(inst))[0]
        ref_classes = set(ref["label"][0].unique().tolist())
        targets = [int(ids[i]) for i in counts.argsort(descending=True)
                   if cls[ids[i]] != background_class(args) and int(cls[ids[i]]) in ref_classes
                   ][:args.n_styles]
        if not targets:
            raise common.UserError(f"test items {args.target_index} and {args.ref_index} share no "
                                   f"non-background class, so control (f) has nothing to edit; "
                                   f"choose another --ref_index or name --edit_instances.")
    return [(k, reference_instance(args, label, inst, k, ref)) for k in targets]


@torch.no_grad()
def control_grids(args, G, E, ds, device, out_dir):
    """The six controls, one PNG each (label map first); returns the paths. Every choice is
    checked before the first grid is written."""
    n, scale = args.n_styles, max(1, 96 // args.size)
    tgt = item_batch(ds, args.target_index, device)
    ref = item_batch(ds, args.ref_index, device)
    label, inst = tgt["label"], tgt["instance"]
    k = pick_instance(inst, label, args.sample_instance,      # the instance of (c) and (d)
                      background=background_class(args))
    cls = int(label[0][inst[0] == k][0]) if args.sample_class is None else args.sample_class
    class_ids = inst[0][label[0] == cls].unique().tolist()     # the instances of (b)
    if not class_ids:
        raise common.UserError(f"--sample_class {cls} does not occur in test item "
                               f"{args.target_index}; its classes are {label.unique().tolist()}.")
    r = reference_instance(args, label, inst, k, ref, args.ref_instance)
    parts = edit_parts(args, label, inst, ref)                 # the parts of (f)

    rep = lambda t: t.expand(n, *t.shape[1:])            # one layout, n outputs
    z = torch.randn(1, G.z_dim, device=device)           # global vector kept in (b)-(d)
    base = random_noise(G, inst)                         # every instance's noise, kept in (b)-(d)
    paths = {}

    def save(name, rows):
        paths[name] = os.path.join(out_dir, f"sample_{name}.png")
        common.save_grid(paths[name], [[show(t, scale) for t in row] for row in rows], ds.palette)

    def own_style_rows(noise_of):
        rows = []
        for i in range(min(4, len(ds))):
            b = item_batch(ds, i, device)
            fakes = G(torch.randn(n, G.z_dim, device=device), rep(b["label"]),
                      rep(b["instance"]), noise_of(b))
            rows.append([b["label"][0], b["image"][0]] + list(fakes))
        return rows

    # (a) random styles: fresh z and fresh N(0, 1) noise for every instance (§3.3)
    save("random", own_style_rows(lambda b: random_noise(G, b["instance"], n)))

    def resample(ids):
        """n outputs in which only the instances `ids` draw new noise; z and the rest kept."""
        noise = rep(base).clone()
        noise[:, ids] = torch.randn(n, len(ids), *base.shape[2:], device=device)
        return list(G(rep(z), rep(label), rep(inst), noise))

    # (b) semantic level (Fig. 1 left): all instances of one class resampled together
    save("class", [[label[0], label[0] == cls] + resample(class_ids) for _ in range(2)])

    # (c) instance level (Fig. 1 right): one instance resampled, the others kept
    save("instance", [[label[0], inst[0] == k] + resample([k]) for _ in range(2)])

    # (d) reference-guided (Fig. 6a): instance k takes the encoded (mu, sigma) of instance r of
    # the reference (Eq. 5), separately for gamma and beta
    ref_mu, ref_logvar = E(ref["image"], ref["instance"], num_instances(ref["instance"]))
    noise = rep(base).clone()
    noise[:, k] = encoded_noise(G, rep(ref_mu[:, r:r + 1]), rep(ref_logvar[:, r:r + 1]))[:, 0]
    after = G(rep(z), rep(label), rep(inst), noise)
    save("reference", [[label[0], inst[0] == k, G(z, label, inst, base)[0], ref["image"][0],
                        ref["instance"][0] == r] + list(after)])

    # (e) reconstruction from the image's own style (encoder on the target itself, Eq. 5)
    def own_noise(b):
        mu, logvar = E(b["image"], b["instance"], num_instances(b["instance"]))
        return encoded_noise(G, rep(mu), rep(logvar))
    save("reconstruction", own_style_rows(own_noise))

    # (f) reference appearance editing (Fig. 6a): left to right, one more part of the target takes
    # its reference instance's style; every part keeps its one draw (or its mean) in later columns
    noise, columns = base.clone(), [base]
    for part, r in parts:
        noise[:, part] = encoded_noise(G, ref_mu[:, r:r + 1], ref_logvar[:, r:r + 1],
                                       args.edit_mean_only)[:, 0]
        columns.append(noise.clone())
    out = G(z.expand(len(columns), -1), label.expand(len(columns), -1, -1),
            inst.expand(len(columns), -1, -1), torch.cat(columns))
    used = torch.zeros_like(ref["instance"][0], dtype=torch.bool)
    for _, r in parts:
        used |= ref["instance"][0] == r
    masks = [inst[0] == part for part, _ in parts]
    save("edit", [[label[0], ref["image"][0]] + list(out),       # target, reference, before, edits
                  [ref["label"][0], used, torch.zeros_like(used)] + masks])
    return paths


def load_for_inference(args):
    rt = common.setup_runtime(args)
    ds = test_set(args)
    fill_num_classes(args, ds)
    G, E, _ = build_models(args)
    if args.init_from:  # the released weights instead of a run of ours; out_dir takes the outputs
        load_official_weights(args, G, E)
        ckpt = {"iter": None}
    else:
        ckpt = common.load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), "inade", vars(args),
                                      ARCH_KEYS, dict(G=G, E=E), restore_rng=False)
    common.seed_everything(args.seed)
    return rt, ds, G.to(rt.device).eval(), E.to(rt.device).eval(), ckpt


# ----------------------------------------------------------------------------------------------
# Evaluation (--eval)
# ----------------------------------------------------------------------------------------------

def pixel_distance(a, b):
    """Mean absolute RGB difference per image, (B,): the no-download stand-in for LPIPS."""
    return (a - b).abs().mean((1, 2, 3))


@torch.no_grad()
def masked_lpips(lpips, a, b, mask):
    """LPIPS between a and b (B, 3, H, W) in [-1, 1] inside and outside a region mask (B, H, W):
    (inside (B,), outside (B,)). Our definition (no official code exists for these metrics):
    each tap's distance map (before LPIPS's spatial mean) is averaged with weights given by the
    mask area-resized to that tap's resolution, and the five averages are summed, as LPIPS sums
    its taps. With a mask of ones, inside equals LPIPS(a, b); an empty region gives NaN."""
    mask = mask[:, None].float()
    inside = outside = 0
    for d in lpips.distance_maps(a, b):                                   # (B, 1, h, w) per tap
        m = F.adaptive_avg_pool2d(mask, d.shape[-2:])
        inside = inside + (d * m).sum((1, 2, 3)) / m.sum((1, 2, 3))
        outside = outside + (d * (1 - m)).sum((1, 2, 3)) / (1 - m).sum((1, 2, 3))
    return inside, outside


def masked_distance(dist_net, a, b, mask):
    """(inside, outside) distance per image for a region mask (B, H, W): masked LPIPS
    (masked_lpips: per-tap distance maps averaged under the area-resized mask, our
    definition) or, without pretrained nets, the masked mean absolute pixel difference."""
    if dist_net is not None:
        return masked_lpips(dist_net, a, b, mask)
    diff, m = (a - b).abs().mean(1), mask.float()
    return ((diff * m).sum((1, 2)) / m.sum((1, 2)).clamp(min=1),
            (diff * (1 - m)).sum((1, 2)) / (1 - m).sum((1, 2)).clamp(min=1))


def pick_objects(inst, label, generator, background=0):
    """One random instance per item not of class `background` (background_class); any instance
    if there is none."""
    K = num_instances(inst)
    onehot = F.one_hot(inst, K).sum((1, 2))                               # (B, K) areas
    cls = instance_classes(label, inst, K)
    score = torch.rand(onehot.shape, generator=generator).to(inst.device)
    score = torch.where((onehot > 0) & (cls != background), score + 1,
                        torch.where(onehot > 0, score, -1))
    return score.argmax(1)                                                 # (B,)


@torch.no_grad()
def resample_pair(G, batch, moved_ids):
    """Two outputs that differ only in the noise of the instances where moved_ids (B, K) is True;
    the global vector z and every other instance's noise are shared."""
    label, inst = batch["label"], batch["instance"]
    z = torch.randn(len(inst), G.z_dim, device=inst.device)
    noise = random_noise(G, inst)
    moved_ids = moved_ids.view(*moved_ids.shape, *[1] * (noise.dim() - 2))
    moved = torch.where(moved_ids, random_noise(G, inst), noise)
    return G(z, label, inst, noise), G(z, label, inst, moved)


def metric_networks(args, device):
    """LPIPS-AlexNet and the FID Inception, loaded once per --eval; (None, None) without
    pretrained nets (pixel distances, no FID)."""
    if not args.pretrained:
        return None, None
    return (common.LPIPS("alex", pretrained=True).to(device),
            common.FIDInception(pretrained=True).to(device))


DIVERSITY_GROUPS = 10   # supp. §8: 10 groups of random results per layout (FID's runs reuse them)


@torch.no_grad()
def training_fid_stats(args, inception, device):
    """FID's real statistics from every training image (the official code compares with
    training-set statistics), whole and unflipped (our choice), streamed; the random state is
    kept, so the evaluation draws the same noise whichever real set FID uses."""
    try:
        ds = load_data(args, "train")
    except common.UserError as err:
        raise common.UserError(f"FID compares with the training images (--fid_real train), which "
                               f"could not be read: {err} Use --fid_real test to compare with the "
                               f"test images.") from None
    ds.flip = False
    if getattr(ds, "preprocess", None) == "resize_and_crop":  # whole frames, as generated,
        ds.preprocess = "fixed"                               # not training's random crops
    loader = torch.utils.data.DataLoader(ds, batch_size=min(args.batch_size, 32))
    with common.preserved_rng():
        stats = common.inception_stats(inception, ((b["image"] + 1) / 2 for b in loader), device)
    return stats, len(ds)


@torch.no_grad()
def eval_batch(args, G, E, batch, dist_net, inception, pick_gen):
    """Every measure of one batch of test layouts, as per-layout numbers (B,) (and Inception
    features): the batch's samples are dropped when this returns."""
    label, inst = batch["label"], batch["instance"]
    K = num_instances(inst)
    out = {}
    # 10 groups of results with random noise (supp. §8): LPIPS between 2 random groups, the pair
    # of groups shared by all layouts, 10 times (common.lpips_diversity's "random" pairs)
    fakes = torch.stack([generate(G, E, batch, use_encoder=False)[0]
                         for _ in range(DIVERSITY_GROUPS)], 1)
    dist_fn = dist_net if dist_net is not None else pixel_distance
    out["diversity"] = torch.tensor([common.lpips_diversity(dist_fn, group[None], pairs="random",
                                                            repeats=10, seed=args.seed)
                                     for group in fakes])
    # FID: run r is group r, one sample per layout; the paper averages 10 runs (§4.1)
    if inception is not None:
        if args.fid_real == "test":
            out["feats_real"] = common.inception_features(inception, [(batch["image"] + 1) / 2])
        out["feats_fake"] = [common.inception_features(inception, [(fakes[:, r] + 1) / 2])
                             for r in range(args.fid_runs)]
    # instance level (mISD/mOID): resample one instance; class level (mCSD/mOCD): every instance
    # of its class (§4.2)
    k = pick_objects(inst, label, pick_gen, background_class(args))
    a, b = resample_pair(G, batch, F.one_hot(k, K).bool())               # moved ids (B, K)
    mask = inst == k[:, None, None]
    out["misd"], out["moid"] = masked_distance(dist_net, a, b, mask)
    out["change_in"], out["change_out"] = masked_distance(None, a, b, mask)
    cls = instance_classes(label, inst, K)
    k_cls = cls.gather(1, k[:, None])                                      # (B, 1)
    a, b = resample_pair(G, batch, cls == k_cls)
    out["mcsd"], out["mocd"] = masked_distance(dist_net, a, b, label == k_cls[:, :, None])
    if args.data == "shapes":
        out["shapes"] = data.shapes_style_scores(batch, {"real": batch["image"], "random": fakes[:, 0],
                                                          "recon": generate(G, E, batch)[0]})
    return out


@torch.no_grad()
def evaluate(args):
    """eval.json: quality (FID), diversity (LPIPS, supp. §8), semantic/instance-level control
    (mCSD/mOCD, mISD/mOID: §4.2, protocol in the README) and, on shapes, the exact toy metrics.
    Streams: each batch is generated, measured and dropped; only running sums (and, on shapes,
    a few numbers per object) are kept, so memory is set by --batch_size, not by --eval_n."""
    rt, ds, G, E, ckpt = load_for_inference(args)
    n = min(args.eval_n, len(ds))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)),
                                         batch_size=min(args.batch_size, 32))
    dist_net, inception = metric_networks(args, rt.device)
    pick_gen = torch.Generator().manual_seed(args.seed)
    sums, counts = {}, {}                      # nan-skipping running sums of per-layout numbers
    stats_real, stats_fake = common.RunningFIDStats(), [common.RunningFIDStats()
                                                        for _ in range(args.fid_runs)]
    if inception is not None and args.fid_real == "train":
        real_stats, n_real = training_fid_stats(args, inception, rt.device)
    shapes_rows = []
    for batch in loader:
        measured = eval_batch(args, G, E, common.to_device(batch, rt.device), dist_net,
                              inception, pick_gen)
        if inception is not None:
            if args.fid_real == "test":
                stats_real.add(measured.pop("feats_real"))
            for run, feats in zip(stats_fake, measured.pop("feats_fake")):
                run.add(feats)
        if "shapes" in measured:
            shapes_rows.append(measured.pop("shapes"))
        for key, values in measured.items():
            values = values.double().cpu()
            ok = ~values.isnan()              # an empty region (no pixel outside) has no distance
            sums[key] = sums.get(key, 0.0) + values[ok].sum().item()
            counts[key] = counts.get(key, 0) + int(ok.sum())
    mean = {k: sums[k] / counts[k] if counts[k] else float("nan") for k in sums}
    result = {
        "iter": ckpt["iter"], "layouts": n,
        "distance": "lpips-alex" if dist_net is not None else "pixel-l1 (no pretrained nets)",
        "lpips_diversity": mean["diversity"],
        "mISD": mean["misd"], "mOID": mean["moid"], "mCSD": mean["mcsd"], "mOCD": mean["mocd"],
        # the "Must show" locality: mean |change| inside the resampled instance / outside it
        "locality_ratio": mean["change_in"] / max(mean["change_out"], 1e-12),
    }
    if inception is not None:  # the mean over --fid_runs noise draws (paper §4.1)
        if args.fid_real == "test":
            real_stats, n_real = stats_real.stats(), n
        runs = [common.fid(real_stats, run.stats()) for run in stats_fake]
        result.update(fid=sum(runs) / len(runs), fid_runs=runs,
                      fid_real=f"{args.fid_real} ({n_real} images)")
    if shapes_rows:
        result["shapes"] = data.shapes_style_summary(shapes_rows)
    path = os.path.join(args.out_dir, "eval.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------
# Benchmark (--bench: training speed, Table 3/4 cost of G), dry run, main
# ----------------------------------------------------------------------------------------------

def dry_run(args):
    if args.num_classes is None:  # built-in data or a folder: ask the dataset for its count
        args.num_classes = get_split(args, "train").num_classes
    G, E, D = build_models(args)
    paper = PAPER_COST.get((args.data, args.noise_nc))
    flops, conv_linear = generator_flops(args, args.num_classes)   # one instance per class
    print(f"G forward, one image: {conv_linear / 2e9:.2f} G multiply-adds in convolutions and "
          f"linear maps, {(flops - conv_linear) / 2e9:.2f} G more in the instance gathers at "
          f"{args.num_classes} instances" + (f"; paper Table 3/4: P {paper[0]:.2f}M, FLOPs "
                                             f"{paper[1]:.2f} G" if paper else ""))
    if paper is not None:
        print(f"G {common.count_params(G) / 1e6:.2f}M parameters; paper Table 3/4: {paper[0]:.2f}M")
    H, W = gen_hw(args)
    nets = "G and D" if args.no_noise_remapping else "G, E and D"  # w/o PNR: no encoder
    print(f"training: {training_flops(args) / 1e9:,.1f} GFLOP per image of a training step "
          f"({nets} forward and backward; {H}x{W})")
    common.print_dry_run({"G": G, "E": E, "D": D})


def synthetic_batch(args, n, device):
    """A batch without dataset files for --bench: an 8x8 grid of cells, each its own instance of
    a random class (64 instances, about a Cityscapes scene's count), random pixels."""
    H, W = gen_hw(args)
    g = torch.Generator().manual_seed(0)
    cells = lambda t: F.interpolate(t[:, None].float(), size=(H, W), mode="nearest")[:, 0].long()
    label = cells(torch.randint(0, args.num_classes, (n, 8, 8), generator=g))
    inst = cells(torch.arange(64).view(1, 8, 8).expand(n, -1, -1))
    image = torch.rand(n, 3, H, W, generator=g) * 2 - 1
    return common.to_device(dict(image=image, label=label, instance=inst), device)


def bench_batch(args, device):
    """--bench's fixed batch of args.batch_size layouts: shapes' first training items (its real
    layouts, 1-4 objects; sets args.num_classes), otherwise synthetic_batch. K counted on the
    host, as the training loop does."""
    if args.data == "shapes":
        ds = load_data(args, "train")
        fill_num_classes(args, ds)
        batch = common.to_device(torch.utils.data.default_collate(
            [ds[i] for i in range(args.batch_size)]), device)
    else:
        batch = synthetic_batch(args, args.batch_size, device)
    batch["num_instances"] = num_instances(batch["instance"])
    return batch


def bench_step(args, run, batch, compile_model=None, weights=True):
    """Fresh networks, loss and optimisers on run.device (built there: under torch.device("meta")
    they hold no memory), and a no-argument step: one train_step on `batch`. weights=False: the
    perceptual VGG-19 with random weights (training_flops)."""
    G, E, D = [common.prepare_model(m, run, compile_model, ddp=False) for m in build_models(args)]
    rec = ReconstructionLoss(args.perceptual, args.pretrained, weights).to(run.device)
    opt_g = torch.optim.Adam(list(G.parameters()) + list(E.parameters()), args.lr_g,
                             betas=(args.beta1, args.beta2))
    opt_d = torch.optim.Adam(D.parameters(), args.lr_d, betas=(args.beta1, args.beta2))
    return lambda: train_step(args, run, G, E, D, rec, opt_g, opt_d, batch)


def training_flops(args):
    """common.count_flops of one training image: one train_step on --bench's batch (bench_batch,
    args.batch_size layouts) divided by its size: G and E forward, D on fakes and reals, the
    perceptual VGG-19 on both, the G(+E) backward, then D's forward and backward on the detached
    fakes. Element-wise work (the losses' arithmetic, Adam's update) is not counted. On
    shape-only tensors (meta device), so the paper presets count in seconds on a CPU; the frozen
    VGG-19 has random weights (the same cost, no download). --bench's gflops_per_img is the
    same count of a real step."""
    meta = torch.device("meta")
    batch = common.to_device(bench_batch(args, torch.device("cpu")), meta)
    with meta:
        step = bench_step(args, common.Runtime(meta, torch.float32), batch, weights=False)
    return common.count_flops(step) / args.batch_size


def bench(args):
    """--bench N: training steps on one fixed batch (bench_batch; common.bench_training: fp32
    eager, then the asked --dtype / --compile)."""
    rt = common.setup_runtime(args)
    batch = bench_batch(args, rt.device)

    def make_step(run, compile_model):
        return bench_step(args, run, batch, compile_model)

    result = {"training": common.bench_training(args, rt, make_step),
              "inference": inference_cost(args, rt, batch)}
    print(json.dumps(result["inference"]))
    return common.write_bench(args, result)


def generator_flops(args, num_inst):
    """FLOPs of one generator forward pass (one image, num_inst instances), counted by
    torch.utils.flop_counter on the meta device: shapes only, no weights, no compute. Returns
    (all, convolutions and linear maps only); 2 FLOPs per multiply-add. The paper's FLOPs column
    (Tables 3-4) matches the multiply-adds of the convolutions and linear maps (our reading: a
    per-module counter such as thop sees only those); the per-pixel instance gathers (einsum)
    grow with the number of instances."""
    from torch.utils.flop_counter import FlopCounterMode
    H, W = gen_hw(args)
    with torch.device("meta"):
        G = Generator(args.num_classes, H, W, args.ngf, args.z_dim, args.noise_nc, args.num_up,
                      unified_sampling=not args.no_unified_sampling).eval()
        ids = torch.zeros(1, H, W, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            G(torch.zeros(1, args.z_dim), ids, ids, torch.zeros(G.noise_shape(1, num_inst)))
    total = counter.get_total_flops()
    gathers = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "bmm" in str(op))
    return total, total - gathers


@torch.no_grad()
def inference_cost(args, rt, batch):
    """Table 3/4's P, FLOPs and T of the generator for the first layout of `batch` (random
    styles, eval mode, batch 1, float32): T is the mean time of args.bench forward passes."""
    import time
    G = build_models(args)[0].to(rt.device).eval()
    one = {k: v[:1] for k, v in batch.items() if torch.is_tensor(v)}
    for _ in range(2):   # warm-up (allocator, cudnn)
        generate(G, None, one, use_encoder=False)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.bench):
        generate(G, None, one, use_encoder=False)
    sync()
    seconds = (time.perf_counter() - t0) / args.bench
    K = num_instances(one["instance"])
    flops, conv_linear = generator_flops(args, K)
    out = {"G_params": common.count_params(G), "G_flops": flops, "G_flops_conv_linear": conv_linear,
           "G_gmacs_conv_linear": round(conv_linear / 2e9, 2), "G_seconds_per_image": round(seconds, 4),
           "instances": K}
    paper = PAPER_COST.get((args.data, args.noise_nc))
    if paper is not None:
        out["paper_P_M"], out["paper_flops_G"], out["paper_T_s"] = paper
    return out


def main(argv=None):
    args = common.parse_args(build_parser(), PRESETS, "inade", "shapes", argv, check=check_args)
    if args.init_from:  # the flags the released files imply, checked against those given
        apply_official_flags(args, build_parser().parse_args(argv))
    if args.dry_run:
        return dry_run(args)
    if args.bench:
        return bench(args)
    if args.sample:
        rt, ds, G, E, ckpt = load_for_inference(args)
        paths = control_grids(args, G, E, ds, rt.device, args.out_dir)
        print("\n".join(paths.values()))
        if not args.eval:
            return paths
    if args.eval:  # after the grids when both are asked for
        return evaluate(args)
    return train(args)


if __name__ == "__main__":
    common.run_main(main)
