"""Unite and Conquer: Cross Dataset Multimodal Synthesis using Diffusion Models
(Nair, Bandara, Patel; CVPR 2023; arXiv 2212.00793).

Idea: train (or download) one conditional diffusion model per condition, each on its own dataset
with only its own condition, and combine them at sampling time only. Under a product-of-experts
reading of p(z | x_1..x_N) (§3.2, Eq. 4-5), every sampling step adds the experts' conditional
noise predictions and subtracts a *reliable* unconditional estimate, a mixture of the experts'
null-condition predictions weighted by reliabilities a_j (sum a_j = 1):

    eps_c = sum_i w_i eps_i(z_t, x_i) - (sum_i w_i - 1) * sum_j a_j eps_j(z_t, null)   (Eq. 10)

With one expert this is classifier-free guidance (Eq. 11). The composed eps then drives an
ordinary DDPM or DDIM step. Nothing is retrained to add a condition: a new expert joins the sum.

Map of this file (the paper's order: diffusion, composition, sampling, then the networks):
    config and presets    ADM (guided-diffusion) configurations, the experts (label map, the
                          paper's skin and hair maps, caption, sketch, class), one preset per
                          dataset, named compositions (the official literals), check_args
    diffusion             linear/cosine schedules, respacing, eps-prediction loss (+ L_vlb when
                          learn_sigma)
    composition           compose_eps (Eq. 10), the official literals and --guidance /
                          --reliability per expert, one batched forward per model per step, schedule
                          matching for models with different noise schedules (our reading of
                          supp. §7.2)
    samplers              ancestral DDPM (Eq. 9; fixed-small, fixed-large or learned variance)
                          and DDIM on respaced steps with original timestep indices
    ADM UNet              guided-diffusion's UNetModel: same flags, modules, state_dict keys and
                          computation (official checkpoints load strictly), plus optional
                          condition inputs (concatenated maps, an embedding vector)
    text conditions       small CLIP-shaped text tower trained with its expert (offline); CLIP
                          image/text embeddings (§7.3)
    experts and data      a run trains the experts of --experts: ONE expert on the whole dataset
                          (the paper's set-up: one run per expert and dataset, §4.1); several on
                          the even/odd halves of one dataset (the in-one-run experiment);
                          classifier-free null-condition dropout
    training loop         the run's experts side by side; each step's randomness drawn for the
                          global batch (torchrun = one process), EMA, atomic checkpoints, resume
    sampling              the experts of this run, or of several runs composed with
                          --expert_ckpt (each rebuilt with its own run's flags); conditions from
                          the test set or typed (--text, --label_map, --sketch, --class_id);
                          grids: each expert alone, composition, reliability sweep (Fig. 6),
                          guidance sweep
    released models       --init_from: the authors' face model (skin map, hair map, FaRL text)
                          and sketch model, recognised by their keys, loaded strictly, composed
                          as their test code composes them
    evaluation            toy metrics on shapes (data.shapes_composition_scores, incl. the
                          Table 4 ablation); SSIM (Wang et al. 2004); FID, LPIPS and CLIP score
                          on real data, streamed
    dry run, benchmark    parameter counts; --bench N: training steps and the sampling step
    main

    python compose_diffusion.py                 # built-in shapes: label-map expert on one half,
                                                # caption expert on the other half, CPU ~5 min
    python compose_diffusion.py --sample        # grids from out/compose_diffusion-shapes/ckpt.pt
    python compose_diffusion.py --eval          # toy metrics -> eval.json
    python compose_diffusion.py --bench 20      # 20 training steps and a sampling step timed
    python compose_diffusion.py --data mm-celeba-hq --dry_run   # the paper's face UNet (256 px)

    # the paper's path: one expert per run and dataset, composed at sampling only (§3.2, §4.1):
    # hair maps on CelebA-HQ; skin maps, text (CLIP image embedding in training, §7.3), sketches
    torchrun --nproc_per_node=8 compose_diffusion.py --data celebamask-hq --out_dir out/cd-hair
    torchrun --nproc_per_node=8 compose_diffusion.py --data mm-celeba-hq --experts skin \
        --out_dir out/cd-skin                   # the same with caption, sketch
    python compose_diffusion.py --eval --expert_ckpt out/cd-hair/ckpt.pt out/cd-skin/ckpt.pt \
        --data mm-celeba-hq --out_dir out/cd-maps       # Tables 1-2: FID, LPIPS, SSIM
    python compose_diffusion.py --sample --expert_ckpt out/cd-hair/ckpt.pt out/cd-skin/ckpt.pt \
        out/cd-text/ckpt.pt out/cd-sketch/ckpt.pt --data mm-celeba-hq \
        --text "A person with black hair" --out_dir out/cd-four   # Figs. 28-32 (+ --composition
                                                                  # official-faces: the release's)
    python compose_diffusion.py --sample --ckpt 64x64_diffusion.pt --ckpt_config adm64 \
        --ckpt_class 291 --data folder ...      # an official ADM checkpoint as one more expert
    python compose_diffusion.py --sample --init_from weights/model_latest.pt --skin_map face.jpg \
        --hair_map hair.jpg --sketch sketch.jpg --text "She has blonde hair"  # the released models
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint

import common
import data

# ----------------------------------------------------------------------------------------------
# Config. "paper" = Nair et al.; "official" = the authors' release (Nithin-GK/UniteandConquer);
# "ADM" = openai/guided-diffusion (Dhariwal & Nichol 2021), whose UNet and diffusion both use.
# ----------------------------------------------------------------------------------------------

# guided-diffusion's create_model() flags for the official checkpoints (guided-diffusion README).
ADM_CONFIGS = {
    "adm64": dict(image_size=64, num_channels=192, num_res_blocks=3, channel_mult="",
                  attention_resolutions="32,16,8", num_head_channels=64, learn_sigma=True,
                  class_cond=True, use_scale_shift_norm=True, resblock_updown=True,
                  use_new_attention_order=True, dropout=0.1, use_fp16=True),
    "adm128": dict(image_size=128, num_channels=256, num_res_blocks=2, channel_mult="",
                   attention_resolutions="32,16,8", num_heads=4, learn_sigma=True,
                   class_cond=True, use_scale_shift_norm=True, resblock_updown=True, use_fp16=True),
    "adm256": dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult="",
                   attention_resolutions="32,16,8", num_head_channels=64, learn_sigma=True,
                   class_cond=True, use_scale_shift_norm=True, resblock_updown=True, use_fp16=True),
    "adm256-uncond": dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult="",
                          attention_resolutions="32,16,8", num_head_channels=64, learn_sigma=True,
                          class_cond=False, use_scale_shift_norm=True, resblock_updown=True,
                          use_fp16=True),
}
ADM_NUM_CLASSES = 1000  # ImageNet; class_cond models embed one vector per class
ADM_SCHEDULES = {"adm64": "cosine", "adm128": "linear", "adm256": "linear",
                 "adm256-uncond": "linear"}  # ADM README; all 1000 steps

# Exact parameter counts of guided-diffusion's create_model() for these flags (counted with the
# guided-diffusion code itself; the reference rounds them to 295.9M / 421.5M / 553.8M / 552.8M).
ADM_PARAMS = {"adm64": 295_904_454, "adm128": 421_529_606, "adm256": 553_838_086,
              "adm256-uncond": 552_814_086}

# The experts and the conditions each one takes. Spatial conditions are concatenated to z_t
# (official face model), in the order of SPATIAL: "map" = the one-hot label map (all classes);
# "skin" and "hair" = the paper's face experts (§4.1, Fig. 1b, Tables 1-2): the binary skin or
# hair region of the face parsing map (FACE_PARTS; the official maps are a face parser's soft
# skin / hair probabilities, ours the dataset's hard CelebAMask-HQ labels); "sketch" = an edge
# map (supp. §7.5: Canny edges). "text" = caption embedding added to the time embedding, which
# every ResBlock's adaptive group norm reads (§7.3: "adaptive group normalization"); "class" =
# a class label (ADM). "joint" = one model trained on both datasets alternately, for the Table 4
# ablation (sampled "as usual": both conditions in one forward pass).
EXPERT_CONDITIONS = {"label": ("map",), "skin": ("skin",), "hair": ("hair",),
                     "caption": ("text",), "sketch": ("sketch",), "class": ("class",),
                     "joint": ("map", "text")}
SPATIAL = ("map", "skin", "hair", "sketch")
FACE_PARTS = {"skin": data.CELEBAMASK_CLASSES.index("skin"),   # id 1 (CelebAMask-HQ g_mask.py)
              "hair": data.CELEBAMASK_CLASSES.index("hair")}   # id 13
# The in-one-run experiment (several experts in one run): which half of the training set stands
# in for each condition's dataset. Paper §4.1: hair maps from CelebA-HQ, skin maps and text from
# FFHQ, so hair takes the even items, skin and text the odd ones; label maps and sketches the
# even, class labels the odd (our choice). The paper trains separate runs on CelebA-HQ and FFHQ,
# which --expert_ckpt composes. A run of one expert trains it on the whole set.
IN_ONE_RUN_HALF = {"map": 0, "hair": 0, "sketch": 0, "skin": 1, "text": 1, "class": 1}
NEEDS_KEY = {"map": "label", "skin": "label", "hair": "label", "sketch": "sketch",
             "text": "caption", "class": "class"}

PRESETS = {
    # Built-in data, scaled to a 2-core CPU: all "our choice" except where marked.
    "shapes": dict(size=16, iters=500, batch_size=32, lr=5e-4, ema_decay=0.995,
                   num_channels=32, num_res_blocks=1, channel_mult="1,2",
                   attention_resolutions="8", num_heads=4, num_head_channels=32,
                   dropout=0.0, learn_sigma=False, noise_schedule="cosine",  # cosine: ADM-64
                   diffusion_steps=1000,                     # paper/official: 1000 steps
                   p_uncond=0.2,                             # CFG paper (Ho & Salimans): 0.1-0.2
                   experts="label,caption", text_encoder="tiny",
                   sampler="ddim", sample_steps=25,
                   eta=1.0,  # eta = 0 amplifies the eps errors of a 500-iteration CPU model
                   fixed_variance="small",  # --sampler ddpm: beta_tilde (ADM's default: large)
                   guidance="3", reliability="uniform",  # w = 3: best of 1, 2, 3 (eval)
                   log_every=50, sample_every=250, ckpt_every=250, eval_n=256),
    # Paper §4.1 faces: the four face experts of Figs. 28-32 (hair map, skin map, text, sketch;
    # in one run: IN_ONE_RUN_HALF), official face UNet trunk: 256 px, 192 ch,
    # mult (1,1,2,2,4,4), 2 res blocks, attention 32/16/8 with 64-ch heads (legacy order),
    # scale-shift, resblock up/down, dropout 0, 6 output channels; linear schedule, 1000 steps;
    # AdamW lr 1e-5, batch 8, EMA 0.9999, 100k iterations (official training script); DDIM 100
    # steps (official); a_i = 1/N, w_i = 1 (paper §4.1). Text: CLIP image embedding at training,
    # text embedding at sampling (supp. §7.3; the paper uses FaRL, a CLIP ViT-B/16 fine-tune).
    "mm-celeba-hq": dict(size=256, iters=100_000, batch_size=8, lr=1e-5, ema_decay=0.9999,
                         num_channels=192, num_res_blocks=2, channel_mult="1,1,2,2,4,4",
                         attention_resolutions="32,16,8", num_heads=4, num_head_channels=64,
                         dropout=0.0, learn_sigma=True, noise_schedule="linear",
                         diffusion_steps=1000, p_uncond=0.125, experts="hair,skin,caption,sketch",
                         text_encoder="clip", sampler="ddim", sample_steps=100, eta=0.0,
                         fixed_variance="large",  # ADM's default (used where sigma is not learned)
                         guidance="1", reliability="uniform",
                         log_every=100, sample_every=5000, ckpt_every=5000, eval_n=3000),
}
# Paper §4.1: the hair-map expert is trained on CelebA-HQ (the skin map and text on FFHQ).
PRESETS["celebamask-hq"] = dict(PRESETS["mm-celeba-hq"], experts="hair")
# Generic scenes (§4.2, Table 3): a class-conditional expert on a folder of class sub-folders,
# ADM's ImageNet-64 trunk (flags from the ADM README; lr 3e-4, EMA 0.9999 from the ADM paper;
# batch and iterations our choice); w_i = 5 (paper §4.2), a = 1/N (Table 3 sweeps {0, .5, 1}).
PRESETS["folder"] = dict(PRESETS["mm-celeba-hq"], size=64, num_channels=192, num_res_blocks=3,
                         channel_mult="1,2,3,4", dropout=0.1, noise_schedule="cosine", lr=3e-4,
                         batch_size=256, iters=200_000, experts="class", guidance="5",
                         text_encoder="tiny")
# Named compositions, --composition NAME: flags that a command line's own flags override. The
# official release's literals (official_weights) with its sampler: DDIM, eta 0, 100 respaced
# steps; faces on the face model's linear schedule of 1000 steps, scenes on ADM-64's cosine one
# with class 0 as the class model's null.
COMPOSITIONS = {
    "official-faces": dict(guidance="official", reliability="official", sampler="ddim",
                           sample_steps="100", eta=0.0, noise_schedule="linear",
                           diffusion_steps=1000),
    "official-scenes": dict(guidance="official", reliability="official", sampler="ddim",
                            sample_steps="100", eta=0.0, noise_schedule="cosine",
                            diffusion_steps=1000, ckpt_null_class=0),
}

# Flags that fix the architecture and schedule: a checkpoint is refused when they differ.
ARCH_KEYS = ("size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions",
             "num_heads", "num_head_channels", "learn_sigma", "noise_schedule",
             "diffusion_steps", "experts", "text_encoder")

SMALL_TEXT = dict(width=64, embed_dim=64, layers=2, heads=4)  # tiny text tower: our choice
CLIP_DIM = 512                                     # CLIP ViT-B/32 joint embedding width


def check_args(args):
    """Every flag of this script that can be out of range, before any data or model is built
    (one sentence each). With --expert_ckpt the runs' own flags are read (mmap, no tensors) and
    the image size is theirs."""
    req = common.require
    common.require_one_process_for_outputs(args, sharded_eval=True)
    common.at_least(args, 1, "num_channels", "num_res_blocks", "diffusion_steps", "eval_n",
                    "num_heads", "bench")
    common.at_least(args, 0, "eta", "dropout", "p_uncond", "class_id", "ckpt_class",
                    "ckpt_null_class")
    req(args.lr is None or args.lr > 0, f"--lr must be positive (got {args.lr}).")
    for flag in ("ema_decay", "p_uncond", "dropout"):
        value = getattr(args, flag)
        req(value is None or value < 1, f"--{flag} must be below 1 (got {value}).")
    req(args.num_head_channels is None or args.num_head_channels == -1 or
        args.num_head_channels >= 1, f"--num_head_channels must be -1 (use --num_heads) or at "
                                     f"least 1 (got {args.num_head_channels}).")
    names = [n for n in (args.experts or "").split(",") if n]
    req(names and all(n in EXPERT_CONDITIONS for n in names),
        f"--experts {args.experts} must list some of {', '.join(EXPERT_CONDITIONS)}, separated "
        f"by commas.")
    try:
        mult = parse_mult(args.channel_mult, args.size)
        [int(r) for r in str(args.attention_resolutions).split(",") if r]
    except ValueError:
        raise common.UserError(f"--channel_mult {args.channel_mult} and --attention_resolutions "
                               f"{args.attention_resolutions} must be numbers separated by "
                               f"commas.") from None
    req(all(int(m * args.num_channels) % 32 == 0 for m in mult),
        f"--num_channels {args.num_channels} times each --channel_mult must be a multiple of 32 "
        f"(GroupNorm with 32 groups).")
    if not (args.init_from or args.expert_ckpt):  # those bring their networks' own widths
        rates = {args.size // int(r) for r in str(args.attention_resolutions).split(",") if r}
        widths = {int(m * args.num_channels) for level, m in enumerate(mult) if 2 ** level in rates}
        widths.add(int(mult[-1] * args.num_channels))          # the middle block attends too
        per_head = args.num_head_channels not in (None, -1)
        split = args.num_head_channels if per_head else args.num_heads
        req(all(w % split == 0 for w in widths),
            f"the attention widths {', '.join(map(str, sorted(widths)))} must each be a multiple "
            f"of --{'num_head_channels' if per_head else 'num_heads'} {split} (equal heads).")
    typed = [f for f in CLI_CONDITIONS if getattr(args, f) not in (None, "")]
    if args.init_from:
        check_release_args(args)
        steps = args.diffusion_steps
        kinds = release_conditions(args)
        has_null = [c != "sketch" for c in kinds]  # the sketch model never learnt a null
    elif args.expert_ckpt:
        req(args.sample or args.eval, "--expert_ckpt composes finished runs with --sample or "
                                      "--eval; a training run trains --experts.")
        runs = runs_flags(args)
        args.size = runs[0]["size"]
        steps = runs[0]["diffusion_steps"]
        names = [n for r in runs for n in composed_names(r["experts"])]
    else:
        steps = args.diffusion_steps
        names = composed_names(args.experts)
    if args.ckpt:
        req(os.path.isfile(args.ckpt), f"--ckpt {args.ckpt} does not exist; give a "
                                       f"guided-diffusion checkpoint file.")
        adm = ADM_CONFIGS[args.ckpt_config]
        req(adm["image_size"] == args.size, f"--ckpt_config {args.ckpt_config} makes "
                                            f"{adm['image_size']} px images and the experts "
                                            f"{args.size} px; composed models must share z_t's "
                                            f"shape (paper §6).")
        for flag in ("ckpt_class", "ckpt_null_class"):
            value = getattr(args, flag)
            req(value is None or value < ADM_NUM_CLASSES, f"--{flag} must be an ImageNet class "
                                                          f"id, 0..{ADM_NUM_CLASSES - 1} (got "
                                                          f"{value}).")
    req(not (typed and args.eval), f"--eval measures on the test set's conditions; give "
                                   f"--{typed[0] if typed else ''} with --sample.")
    for flag in ("label_map", "sketch", "skin_map", "hair_map"):
        path = getattr(args, flag)
        req(path is None or os.path.isfile(path), f"--{flag} {path} does not exist; give an "
                                                  f"image file.")
    try:
        space_timesteps(steps, str(args.sample_steps))
    except ValueError:
        raise common.UserError(f"--sample_steps {args.sample_steps} must be a step count (25), "
                               f"ddimN (ddim25) or per-section counts (10,15,20), each 1.."
                               f"{steps}.") from None
    if not args.init_from:
        # one w and one a per composed expert: the trained ones, then --ckpt's ADM model
        kinds = [EXPERT_CONDITIONS[n][0] for n in names] + (["class"] if args.ckpt else [])
        has_null = [True] * len(names) + ([args.ckpt_null_class is not None] if args.ckpt
                                          else [])
    if kinds:
        w, a, _ = composition_weights(args.guidance, args.reliability, kinds, has_null)
        req(all(h or aj == 0 or sum(w) == 1 for h, aj in zip(has_null, a)),
            f"--reliability {args.reliability} gives the released sketch model a null, which it "
            f"never learnt; give it 0." if args.init_from else
            f"--reliability {args.reliability} gives the --ckpt model a null, which ADM never "
            f"learnt; give it 0 or a stand-in null class with --ckpt_null_class (official: 0).")
    else:  # a run of the joint model alone guides it with one weight
        check_weights([1.0], parse_floats(args.guidance, 1, "guidance"))


# ----------------------------------------------------------------------------------------------
# Diffusion: schedules, respacing, the training loss (DDPM, Ho et al. 2020; ADM / Improved DDPM)
# ----------------------------------------------------------------------------------------------

def make_betas(schedule, steps):
    """Linear: beta from 1e-4 to 0.02, scaled by 1000/steps (ADM). Cosine (Nichol & Dhariwal):
    abar(t) = cos^2((t/T + 0.008)/1.008 * pi/2), beta_t = 1 - abar(t+1)/abar(t) capped at 0.999."""
    if schedule == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    if schedule == "cosine":
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999)
                         for i in range(steps)], dtype=np.float64)
    raise common.UserError(f"unknown --noise_schedule {schedule}; expected linear or cosine.")


def space_timesteps(num_steps, spec):
    """ADM respacing: "ddimN" keeps every (num_steps // N)-th step from 0; "N" or "N1,N2,..."
    splits [0, num_steps) into equal sections and keeps N_k evenly spaced steps of each."""
    if isinstance(spec, str) and spec.startswith("ddim"):
        n = int(spec[4:])
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == n:
                return sorted(range(0, num_steps, stride))
        raise common.UserError(f"cannot take exactly {n} evenly strided steps of {num_steps}.")
    counts = [int(c) for c in str(spec).split(",")]
    size, extra = divmod(num_steps, len(counts))
    kept, start = [], 0
    for k, count in enumerate(counts):
        section = size + (1 if k < extra else 0)
        if not 1 <= count <= section:
            raise common.UserError(f"cannot keep {count} steps of a section of {section}; "
                                   f"--sample_steps must be 1..{num_steps}.")
        stride, pos = (section - 1) / (count - 1) if count > 1 else 1, 0.0
        for _ in range(count):  # accumulated float stride, rounded: ADM's exact index choice
            kept.append(start + round(pos))
            pos += stride
        start += section
    return sorted(set(kept))


class Schedule:
    """The quantities of one (possibly respaced) chain, float64 as ADM. `timestep_map[i]` is the
    original index of step i: models always see original timesteps."""

    def __init__(self, betas, timestep_map=None):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.num_steps = len(self.betas)
        self.timestep_map = np.arange(self.num_steps) if timestep_map is None else \
            np.asarray(timestep_map)
        alphas = 1.0 - self.betas
        self.abar = np.cumprod(alphas)
        self.abar_prev = np.append(1.0, self.abar[:-1])
        # q(z_{t-1} | z_t, x_0) = N(coef1 x_0 + coef2 z_t, beta_tilde) (DDPM Eq. 6-7)
        self.post_var = self.betas * (1 - self.abar_prev) / (1 - self.abar)
        # log of beta_tilde with its first (zero) value replaced by the second (ADM); a chain
        # of one step ends at its first step, whose variance is never used
        first = self.post_var[1] if self.num_steps > 1 else self.betas[0]
        self.post_logvar = np.log(np.append(first, self.post_var[1:]))
        self.post_coef1 = self.betas * np.sqrt(self.abar_prev) / (1 - self.abar)
        self.post_coef2 = (1 - self.abar_prev) * np.sqrt(alphas) / (1 - self.abar)
        # ADM's "fixed large" variance: beta_t, with beta_tilde at the first step
        self.large_logvar = np.log(np.append(first, self.betas[1:]))
        self.sqrt_abar, self.sqrt_one_minus_abar = np.sqrt(self.abar), np.sqrt(1 - self.abar)
        self.log_betas = np.log(self.betas)
        self.device_buffers = {}  # (name, device) -> float32 tensor, filled by gather

    @classmethod
    def make(cls, schedule, steps):
        return cls(make_betas(schedule, steps))

    def respaced(self, spec):
        """ADM respacing: keep steps `use`, recompute beta_i = 1 - abar_i / abar_prev_kept."""
        use = space_timesteps(self.num_steps, spec)
        betas, last = [], 1.0
        for i in use:
            betas.append(1 - self.abar[i] / last)
            last = self.abar[i]
        return Schedule(betas, self.timestep_map[use])


def gather(sched, name, t, x):
    """sched.<name>[t] as float32 broadcastable to x (B, ...). Each quantity is copied to the
    device once per schedule (float32: MPS has no float64), so no step waits on the host."""
    key = (name, x.device)
    if key not in sched.device_buffers:
        sched.device_buffers[key] = torch.as_tensor(getattr(sched, name), dtype=torch.float32,
                                                    device=x.device)
    return sched.device_buffers[key][t].reshape(-1, *([1] * (x.dim() - 1)))


def q_sample(sched, x0, t, noise):
    """Forward process (DDPM Eq. 4): z_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    return (gather(sched, "sqrt_abar", t, x0) * x0
            + gather(sched, "sqrt_one_minus_abar", t, x0) * noise)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_nll(x, mean, log_scale):
    """-log P(x) of 8-bit data in [-1, 1] under a Gaussian integrated over each bin (DDPM §3.3)."""
    def cdf(v):  # tanh approximation of the standard normal CDF
        return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
    inv = torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv * (x - mean + 1 / 255)), cdf(inv * (x - mean - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    logp = torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
    return -logp


def learned_logvar(sched, v, t, x):
    """Improved DDPM Eq. 15: log sigma^2 = frac log beta + (1 - frac) log beta_tilde, frac=(v+1)/2."""
    min_log, max_log = gather(sched, "post_logvar", t, x), gather(sched, "log_betas", t, x)
    frac = (v + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def diffusion_loss(model, x0, cond, sched, t=None, noise=None):
    """eps-prediction MSE (DDPM Eq. 14, "L_simple"); with learn_sigma, ADM's hybrid loss adds
    L_vlb for the variance with the mean frozen (Improved DDPM §3.1), scaled by T/1000.
    t (B,) and noise like x0 are drawn here unless given (training draws them per global batch)."""
    b = x0.shape[0]
    t = torch.randint(0, sched.num_steps, (b,), device=x0.device) if t is None else t
    noise = torch.randn_like(x0) if noise is None else noise
    x_t = q_sample(sched, x0, t, noise)
    out = model(x_t, t, **cond)
    eps = out[:, :x0.shape[1]]
    mse = (eps.float() - noise).pow(2).mean()
    if out.shape[1] == x0.shape[1]:
        return mse
    v = out[:, x0.shape[1]:].float()
    x0_hat = (x_t - gather(sched, "sqrt_one_minus_abar", t, x0) * eps.detach().float()) / \
        gather(sched, "sqrt_abar", t, x0)
    coef1, coef2 = gather(sched, "post_coef1", t, x0), gather(sched, "post_coef2", t, x0)
    mean, true_mean = coef1 * x0_hat + coef2 * x_t, coef1 * x0 + coef2 * x_t
    logvar = learned_logvar(sched, v, t, x0)
    true_logvar = gather(sched, "post_logvar", t, x0)
    kl = normal_kl(true_mean, true_logvar, mean, logvar).flatten(1).mean(1)
    nll = discretized_gaussian_nll(x0, mean, 0.5 * logvar).flatten(1).mean(1)
    vb = torch.where(t == 0, nll, kl) / math.log(2.0)  # bits per dimension
    return mse + vb.mean() * sched.num_steps / 1000.0


# ----------------------------------------------------------------------------------------------
# Composition (§3.2)
# ----------------------------------------------------------------------------------------------

def check_weights(a, w, low=1.0):
    """Reliabilities a_j >= 0 summing to 1 (§3.2, Eq. 5) and guidance weights w_i >= 1 (Eq. 10).
    low < 1 only for the official release's literals (a sketch weight of 0.6)."""
    a, w = [float(v) for v in a], [float(v) for v in w]
    if not a or any(v < 0 for v in a) or abs(sum(a) - 1) > 1e-6:
        raise common.UserError(f"reliabilities {a} must be non-negative and sum to 1 "
                               f"(Eq. 5), one per expert.")
    if not w or any(v < low for v in w):
        raise common.UserError(f"guidance weights {w} must each be at least {low:g} (Eq. 10), "
                               f"one per condition.")
    return a, w


def official_weights(kinds):
    """The official release's literals (w, a) for composed experts whose conditions are `kinds`.
    Faces (test_multimodal_face.py): skin, hair and text are rows of ONE face model, which alone
    gives the null (a = 1 shared here by its stand-ins, 0 for the sketch model); w: 1 each, text
    1.25 when skin, hair and text are all given; 1.2 each beside a sketch when at most two are;
    the sketch 0.6 (below Eq. 10's w_i >= 1). A single face modality gets w = 1 (the release
    returns eps = 0 there, a bug). Scenes (ImageNet class + text): w = 5, 5; a = 5/9, 4/9."""
    if sorted(kinds) == ["class", "text"]:
        return [5.0, 5.0], [5 / 9 if k == "class" else 4 / 9 for k in kinds]
    face = [k for k in kinds if k in ("skin", "hair", "text")]
    if not kinds or len(face) + kinds.count("sketch") != len(kinds) or kinds.count("sketch") > 1:
        raise common.UserError(f"official weights exist for the face experts (skin, hair, "
                               f"caption, sketch) and for class + caption; not for {kinds}.")
    sketch = "sketch" in kinds
    if sketch and 0 < len(face) < 3:
        w = {"skin": 1.2, "hair": 1.2, "text": 1.2, "sketch": 0.6}
    else:
        w = {"skin": 1.0, "hair": 1.0, "text": 1.25 if len(face) == 3 else 1.0,
             "sketch": 0.6 if face else 1.0}
    a = [1 / len(face) if k in face else 0.0 for k in kinds] if face else [1.0]
    return [w[k] for k in kinds], a


def composition_weights(guidance, reliability, kinds, has_null):
    """--guidance / --reliability for experts with conditions `kinds` (one each, in order):
    numbers (one, or one per expert), "uniform" reliability (1/N over the experts that have a
    null prediction, paper §4.1) or "official" (official_weights). Returns (w, a, the lowest
    w allowed)."""
    n = len(kinds)
    if guidance == "official":
        w = official_weights(kinds)[0]
    else:
        w = parse_floats(guidance, n, "guidance")
    if reliability == "official":
        a = official_weights(kinds)[1]
    elif reliability == "uniform" and any(has_null):
        a = [1.0 / sum(has_null) if h else 0.0 for h in has_null]
    elif reliability == "uniform":  # no null at all: usable only where sum(w) = 1 (no null used)
        a = [1.0 / n] * n
    else:
        a = parse_floats(reliability, n, "reliability")
    low = 0.0 if guidance == "official" else 1.0
    a, w = check_weights(a, w, low)
    return w, a, low


def compose_eps(eps_cond, eps_null, a, w, low=1.0):
    """Eq. (10): eps_c = sum_i w_i eps_i(z_t, x_i) - (sum_i w_i - 1) sum_j a_j eps_j(z_t, null).

    eps_cond: N conditional predictions (list or (N, B, ...) tensor), one per condition i;
    eps_null: M null predictions, one per expert j (M = N in the paper; one expert may carry
    several conditions); a: M reliabilities, sum 1; w: N weights >= 1. The coefficients sum to 1.

    The printed Eq. (8) (the w_i = 1 case) runs its inner sum from j = i; supp. Eq. (18) and
    Eq. (10) run it from j = 1, which is what the product-of-experts derivation (Eq. 6) gives, so
    Eq. (8) is read as sum_i eps_i(x_i) - (N - 1) sum_j a_j eps_j(null). N = 1, a = 1, w = 1 + s
    is classifier-free guidance (Eq. 11): (1 + s) eps(c) - s eps(null). Experts with a_j = 0
    (e.g. ADM checkpoints, never trained with a null label) may pass None as their null.
    """
    a, w = check_weights(a, w, low)
    if len(eps_cond) != len(w) or len(eps_null) != len(a):
        raise common.UserError(f"{len(eps_cond)} conditional predictions need {len(eps_cond)} "
                               f"guidance weights (got {len(w)}) and {len(eps_null)} null "
                               f"predictions {len(eps_null)} reliabilities (got {len(a)}).")
    out = sum(wi * e for wi, e in zip(w, eps_cond))
    if sum(w) != 1:
        null = sum(aj * e for aj, e in zip(a, eps_null) if aj != 0)
        out = out - (sum(w) - 1) * null
    return out


class Expert:
    """One diffusion model at sampling time: the network, its own full noise schedule, and
    whether its null prediction is usable (trained with condition dropout)."""

    def __init__(self, name, model, sched, has_null=True, null_class=None):
        self.name, self.model, self.sched = name, model, sched
        self.has_null = has_null or null_class is not None
        self.null_class = null_class  # an ADM model's stand-in null (official: class 0)
        self.learn_sigma = getattr(model, "learn_sigma", False)

    def null_cond(self, batch, device):
        if self.null_class is not None:
            return {"y": torch.full((batch,), self.null_class, dtype=torch.long, device=device)}
        return self.model.null_cond(batch, device)


def match_timesteps(expert_sched, ref, tol=0.01):
    """Our reading of supp. §7.2 (which only sketches combining eps and stepping each model on
    its own schedule): a model with another variance schedule is asked at the noise level of the
    sampler's step, not at its index. For each step of the reference chain `ref`, the
    (fractional) timestep of `expert_sched` with the same abar, interpolated in log abar.
    Both chains are variance preserving, so the same z_t and the same eps parameterisation serve
    both. Refused when the expert never saw a noise level within `tol` (signal or noise scale)."""
    own = np.log(expert_sched.abar)                        # decreasing in t
    target = ref.abar                                      # abar of every kept step
    t = np.interp(-np.log(target), -own, np.arange(len(own)))  # clamps at both ends
    reached = np.exp(np.interp(t, np.arange(len(own)), own))
    gap = np.maximum(np.abs(np.sqrt(reached) - np.sqrt(target)),
                     np.abs(np.sqrt(1 - reached) - np.sqrt(1 - target)))
    if gap.max() > tol:
        raise common.UserError(f"an expert's noise schedule cannot reach the sampler's noise "
                               f"levels (signal or noise scale off by {gap.max():.3f} > {tol}); "
                               f"compose models whose schedules cover the same range.")
    return t


class Composition:
    """What one sampling run composes: experts, conditions (expert index, condition kwargs of
    B rows), a guidance weight w_i per condition and a reliability a_j per expert (Eq. 10).

    Per step every expert runs ONE forward pass on its rows stacked in a batch: one block of B
    rows per condition it serves and, only where its null is used (a_j > 0, sum w != 1), one
    null block. Models on another noise schedule get matched timesteps (our reading of supp.
    §7.2, not the paper's: match_timesteps); models see
    original timestep indices, never respaced ones.
    """

    def __init__(self, experts, conditions, w, a, ref, low=1.0):
        self.experts, self.conditions, self.ref, self.low = experts, conditions, ref, low
        self.a, self.w = check_weights(a, w, low)
        if len(self.a) != len(experts) or len(self.w) != len(conditions):
            raise common.UserError(f"{len(experts)} experts need {len(experts)} reliabilities "
                                   f"(got {len(self.a)}) and {len(conditions)} conditions need "
                                   f"{len(conditions)} guidance weights (got {len(self.w)}).")
        self.need_null = [aj > 0 and sum(self.w) != 1 for aj in self.a]
        for e, need in zip(experts, self.need_null):
            if need and not e.has_null:
                raise common.UserError(f"expert {e.name} was never trained with a null "
                                       f"condition; give it reliability 0 (or, for --ckpt, a "
                                       f"stand-in null class with --ckpt_null_class).")
        self.model_t = [ref.timestep_map.astype(np.float64) if same_schedule(e.sched, ref)
                        else match_timesteps(e.sched, ref) for e in experts]
        self.same = [same_schedule(e.sched, ref) for e in experts]
        self.stacked = {}  # expert index -> its stacked condition inputs (see inputs)

    def eps_and_var(self, x, i):
        """Composed eps (Eq. 10) at sampler step i, and the variance output v of the first
        condition's expert when it learns sigma on the sampler's schedule (the official code
        also takes the first row's variance), else None (fixed variance)."""
        b, c = x.shape[0], x.shape[1]
        eps_cond, eps_null, v = [None] * len(self.conditions), [None] * len(self.experts), None
        for j, e in enumerate(self.experts):
            rows = [k for k, (ej, _) in enumerate(self.conditions) if ej == j]
            n = len(rows) + self.need_null[j]
            if n == 0:
                continue
            t = self.model_t[j][i]
            t = torch.full((n * b,), t, device=x.device,
                           dtype=torch.long if float(t).is_integer() else torch.float32)
            out = e.model(x.repeat(n, 1, 1, 1), t, **self.inputs(j, rows, b, x.device)).float()
            chunks = out.chunk(n)
            for k, chunk in zip(rows, chunks):
                eps_cond[k] = chunk[:, :c]
                if k == 0 and e.learn_sigma and self.same[j]:
                    v = chunk[:, c:]
            if self.need_null[j]:
                eps_null[j] = chunks[-1][:, :c]
        return compose_eps(eps_cond, eps_null, self.a, self.w, self.low), v


    def inputs(self, j, rows, b, device):
        """Expert j's condition blocks (its conditions, then its null) stacked along the batch,
        and text already encoded: built at the first step, reused by every step (they never
        change during a sampling run)."""
        if j not in self.stacked:
            e = self.experts[j]
            conds = [self.conditions[k][1] for k in rows]
            if self.need_null[j]:
                conds.append(e.null_cond(b, device))
            stacked = cat_conds(conds)
            encode = getattr(e.model, "encode", None)
            self.stacked[j] = encode(stacked) if encode is not None else stacked
        return self.stacked[j]


def same_schedule(sched, ref):
    return len(sched.abar) == len(ref.full_abar) and np.allclose(sched.abar, ref.full_abar)


def cat_conds(conds):
    """Stack per-block condition dicts along the batch; a map given as None means zeros."""
    out = {}
    for key in conds[0]:
        parts = [c[key] for c in conds]
        like = next((p for p in parts if p is not None), None)
        out[key] = None if like is None else \
            torch.cat([p if p is not None else torch.zeros_like(like) for p in parts])
    return out


# ----------------------------------------------------------------------------------------------
# Samplers. The composed eps replaces a single model's eps before the update (official code);
# x_0 is clipped to [-1, 1] and eps re-derived from it, as ADM does.
# ----------------------------------------------------------------------------------------------

def sampler_schedule(full, spec):
    """The respaced chain a sampler walks, remembering the full abar (for schedule matching)."""
    ref = full.respaced(spec)
    ref.full_abar = full.abar
    return ref


def predict_x0(ref, x, i, eps, clip):
    x0 = (x - math.sqrt(1 - ref.abar[i]) * eps) / math.sqrt(ref.abar[i])
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x - math.sqrt(ref.abar[i]) * x0) / math.sqrt(1 - ref.abar[i])
    return x0, eps


def ddpm_step(ref, x, i, eps, v=None, clip=True, noise=None, variance="small"):
    """Ancestral step (DDPM Alg. 2 via the posterior mean of x_0): z_{t-1} = coef1 x0 + coef2 z_t
    + sigma_t eta. Eq. (9) of the paper writes sigma_t^2 * eta; the Gaussian reverse step adds the
    standard deviation sigma_t = sqrt(var), which we use. var: learned (Improved DDPM Eq. 15) when
    v is given, else fixed: "small" = beta_tilde_t (our default on shapes), "large" = beta_t with
    beta_tilde_1 at the first step (ADM's default for models without learned variance)."""
    x0, _ = predict_x0(ref, x, i, eps, clip)
    mean = ref.post_coef1[i] * x0 + ref.post_coef2[i] * x
    if i == 0:
        return mean
    if v is not None:
        logvar = learned_logvar(ref, v, torch.full((x.shape[0],), i, device=x.device), x)
    else:
        fixed = ref.post_logvar if variance == "small" else ref.large_logvar
        logvar = torch.full_like(x[:1], float(fixed[i]))
    noise = torch.randn_like(x) if noise is None else noise
    return mean + torch.exp(0.5 * logvar) * noise


def ddim_step(ref, x, i, eps, eta=0.0, clip=True, noise=None):
    """DDIM (Song et al. 2021, Eq. 12): z_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps
    + s eta, s = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev)."""
    x0, eps = predict_x0(ref, x, i, eps, clip)
    ab, ab_prev = ref.abar[i], ref.abar_prev[i]
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
    out = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
    if sigma > 0 and i > 0:
        out = out + sigma * (torch.randn_like(x) if noise is None else noise)
    return out


@torch.no_grad()
def sample(eps_fn, ref, shape, sampler="ddim", eta=0.0, clip=True, x_T=None, generator=None,
           device="cpu", variance="small"):
    """Walk the respaced chain `ref` from z_T ~ N(0, I). eps_fn(x, i) -> (eps, v or None)."""
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.clone()
    for i in reversed(range(ref.num_steps)):
        eps, v = eps_fn(x, i)
        noise = torch.randn(shape, generator=generator, device=device)
        if sampler == "ddim":
            x = ddim_step(ref, x, i, eps, eta, clip, noise)
        else:
            x = ddpm_step(ref, x, i, eps, v, clip, noise, variance)
    return x


# ----------------------------------------------------------------------------------------------
# ADM UNet (guided-diffusion unet.py), rewritten. Module names and order reproduce the official
# state_dict keys, e.g. input_blocks.4.0.in_layers.2.weight; gaps in indices are the SiLU /
# Dropout positions that hold no parameters.
# ----------------------------------------------------------------------------------------------

def timestep_embedding(t, dim, max_period=10000):
    """ADM's sinusoid: [cos(t f_k), sin(t f_k)], f_k = exp(-ln(10000) k / half). t may be fractional
    (schedule matching hands a model non-integer timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                            device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first, as ADM
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups, eps 1e-5) computed in float32 (ADM's `normalization`)."""

    def __init__(self, channels):
        super().__init__(32, channels)

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def zero_module(module):
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    """Stride-2 3x3 conv (`op`) or, without a conv, 2x2 average pooling."""

    def __init__(self, channels, use_conv):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else \
            nn.AvgPool2d(2)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2, then an optional 3x3 conv (`conv`)."""

    def __init__(self, channels, use_conv):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    """GN -> SiLU -> [up/down] -> conv; AdaGN: GN(h) * (1 + scale) + shift from the embedding
    (use_scale_shift_norm) or h + emb; SiLU -> dropout -> zero-init conv; plus the skip.

    cond_dim > 0 only for the released Unite and Conquer face model: its `cond_emb_layers`
    (SiLU -> Linear(cond_dim -> 2 C_out)) modulate a second time, see UNet."""

    def __init__(self, channels, emb_channels, dropout, out_channels, use_scale_shift_norm,
                 up=False, down=False, use_checkpoint=False, cond_dim=0):
        super().__init__()
        if cond_dim and not use_scale_shift_norm:
            raise ValueError("the face model's second modulation needs use_scale_shift_norm")
        self.use_scale_shift_norm, self.use_checkpoint = use_scale_shift_norm, use_checkpoint
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm
                                 else out_channels))
        if cond_dim:
            self.cond_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else \
            nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb, cond=None):
        if self.use_checkpoint and self.training:
            return checkpoint(self._forward, x, emb, cond, use_reentrant=False)
        return self._forward(x, emb, cond)

    def _forward(self, x, emb, cond=None):
        if self.updown:  # resample between the norm/SiLU and the conv, on h and on the skip
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)  # scale first, then shift
            h = self.out_layers[0](h) * (1 + scale) + shift
            if cond is not None:  # the released face model: the same GroupNorm again, then
                vec, gate = cond  # the embedding's scale and shift, where the batch has one
                scale2, shift2 = self.cond_emb_layers(vec).type(h.dtype)[:, :, None, None] \
                    .chunk(2, dim=1)
                h = torch.where(gate, self.out_layers[0](h) * (1 + scale2) + shift2, h)
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over pixels: GN -> qkv (Conv1d) -> multi-head attention -> zero-init proj.

    Legacy order (ADM-128/256, the face model) splits heads before q/k/v: qkv is read as
    (B*H, 3*d, T); the new order (ADM-64) chunks q, k, v first, then splits heads. q and k are
    each scaled by d^(-1/4); the softmax runs in float32.
    """

    def __init__(self, channels, num_heads, num_head_channels, use_new_attention_order,
                 use_checkpoint=False):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.new_order, self.use_checkpoint = use_new_attention_order, use_checkpoint
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        if self.use_checkpoint and self.training:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x):
        b, c, hgt, wid = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))                       # (B, 3C, T)
        heads, d, t = self.num_heads, c // self.num_heads, x.shape[-1]
        if self.new_order:
            q, k, v = (z.reshape(b * heads, d, t) for z in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * heads, 3 * d, t).split(d, dim=1)
        scale = 1 / math.sqrt(math.sqrt(d))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)   # (B*H, T, T)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, t)
        return (x + self.proj_out(a)).reshape(b, c, hgt, wid)


class TimestepEmbedSequential(nn.Sequential):
    """nn.Sequential whose ResBlocks also receive the embedding (and the face model's `cond`)."""

    def forward(self, x, emb, cond=None):
        for layer in self:
            x = layer(x, emb, cond) if isinstance(layer, ResBlock) else layer(x)
        return x


def parse_mult(channel_mult, image_size):
    """create_model(): "" picks ADM's per-resolution default; else "1,2,2" or a tuple."""
    if channel_mult in ("", None):
        table = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                 64: (1, 2, 3, 4)}
        if image_size not in table:
            raise common.UserError(f"channel_mult must be given for image_size {image_size}; "
                                   f"ADM has defaults only for {sorted(table)}.")
        return table[image_size]
    if isinstance(channel_mult, str):
        return tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
    return tuple(channel_mult)


class UNet(nn.Module):
    """guided-diffusion's UNetModel built from create_model()'s flags: UNet(**adm_flags).

    Our additions, absent by default so the official key set is unchanged: `map_channels`
    (a spatial condition concatenated to z_t: input conv takes in_channels + map_channels),
    `cond_dim` (a condition vector projected by `cond_proj` and added to the time embedding) and
    `num_classes` (ADM fixes 1000). Null conditions: label -1 adds no class embedding (ADM has no
    null label), an all-zero map, an all-zero vector (its projection is skipped, row by row).
    `use_fp16` runs the torso under float16 autocast on CUDA (ADM converts the torso weights;
    GroupNorm and softmax stay float32 in both). `use_checkpoint`: gradient checkpointing.

    Two more, only to load the released Unite and Conquer face model (its `SuperResModel`):
    `convert_map` squeezes the 6-channel map slot (skin map | hair map) to 3 channels with
    `input_blocks_convert` (3x3 conv, float32) before the concatenation, and `block_cond_dim`
    gives every ResBlock `cond_emb_layers` for the FaRL embedding (cond_vec), which then skips
    the time embedding. The official forward normalises a second time in every ResBlock:
    h = GN(GN(h)(1 + s_t) + b_t)(1 + s_e) + b_e with the same GroupNorm, but only when the sum of
    the WHOLE batch's embeddings is nonzero (`th.sum(cond_emb) != 0`): one text row turns the
    second modulation on for every row, rows with a zero embedding then get its bias alone. We
    compute that batch-global gate as a tensor (no wait for the GPU) and reproduce it exactly;
    it is not a design to copy.
    """

    def __init__(self, image_size=64, num_channels=128, num_res_blocks=2, channel_mult="",
                 attention_resolutions="16,8", num_heads=4, num_head_channels=-1,
                 num_heads_upsample=-1, learn_sigma=False, class_cond=False,
                 use_scale_shift_norm=True, resblock_updown=False, use_new_attention_order=False,
                 dropout=0.0, use_checkpoint=False, use_fp16=False, in_channels=3,
                 num_classes=1000, map_channels=0, cond_dim=0, convert_map=False,
                 block_cond_dim=0):
        super().__init__()
        mult = parse_mult(channel_mult, image_size)
        if isinstance(attention_resolutions, str):
            attention_resolutions = [int(r) for r in attention_resolutions.split(",") if r]
        attention_ds = {image_size // int(r) for r in attention_resolutions}  # feature res -> rate
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        C, emb_dim = num_channels, 4 * num_channels
        self.model_channels, self.in_channels, self.map_channels = C, in_channels, map_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma, self.use_fp16, self.cond_dim = learn_sigma, use_fp16, cond_dim
        self.num_classes = num_classes if class_cond else None
        self.block_cond_dim = block_cond_dim

        def res(ch_in, ch_out, **kw):
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm,
                            use_checkpoint=use_checkpoint, cond_dim=block_cond_dim, **kw)

        def attn(ch, heads):
            return AttentionBlock(ch, heads, num_head_channels, use_new_attention_order,
                                  use_checkpoint)

        self.time_embed = nn.Sequential(nn.Linear(C, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(self.num_classes, emb_dim)
        if cond_dim:
            self.cond_proj = nn.Linear(cond_dim, emb_dim)
        ch = int(mult[0] * C)
        if convert_map:  # the face model: map slot -> 3 channels (defined first, as there)
            self.input_blocks_convert = nn.Conv2d(map_channels, 3, 3, padding=1)
        input_maps = 3 if convert_map else map_channels
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(
            nn.Conv2d(in_channels + input_maps, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(m * C))]
                ch = int(m * C)
                if ds in attention_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(mult) - 1:  # every level but the last ends with a downsample
                self.input_blocks.append(TimestepEmbedSequential(
                    res(ch, ch, down=True) if resblock_updown else Downsample(ch, True)))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, m in list(enumerate(mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(C * m))]  # input: current + skip width
                ch = int(C * m)
                if ds in attention_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == num_res_blocks:  # the last block of a level upsamples
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(int(mult[0] * C), self.out_channels, 3,
                                                       padding=1)))

    def null_cond(self, batch, device):
        """The fully null condition of `batch` rows, in this model's keyword arguments."""
        cond = {}
        if self.num_classes is not None:
            cond["y"] = torch.full((batch,), -1, dtype=torch.long, device=device)
        if self.map_channels:
            cond["cond_map"] = None  # zeros, built in forward at the input's size
        if self.cond_dim or self.block_cond_dim:
            cond["cond_vec"] = torch.zeros(batch, self.cond_dim or self.block_cond_dim,
                                           device=device)
        return cond

    def forward(self, x, timesteps, y=None, cond_map=None, cond_vec=None):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None and y is not None:
            keep = (y >= 0).to(emb.dtype)[:, None]
            emb = emb + self.label_emb(y.clamp(min=0)) * keep
        if self.cond_dim and cond_vec is not None:
            keep = (cond_vec.abs().sum(1) > 0).to(emb.dtype)[:, None]
            emb = emb + self.cond_proj(cond_vec) * keep
        cond = None
        if self.block_cond_dim:  # the face model's embedding and its batch-global gate
            vec = cond_vec.float() if cond_vec is not None else \
                x.new_zeros(x.shape[0], self.block_cond_dim)
            cond = (vec, vec.sum() != 0)
        if self.map_channels:
            if cond_map is None:
                cond_map = x.new_zeros(x.shape[0], self.map_channels, *x.shape[2:])
            cond_map = cond_map.to(x.dtype)
            if hasattr(self, "input_blocks_convert"):
                cond_map = self.input_blocks_convert(cond_map)
            x = torch.cat([x, cond_map], dim=1)
        fp16 = self.use_fp16 and x.is_cuda
        with torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
            skips, h = [], x
            for block in self.input_blocks:
                h = block(h, emb, cond)
                skips.append(h)
            h = self.middle_block(h, emb, cond)
            for block in self.output_blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, cond)
        return self.out(h.float() if fp16 else h)


def unet_flags(args, map_channels=0, cond_dim=0, num_classes=0):
    """create_model() flags from the command line, plus our condition inputs."""
    return dict(image_size=args.size, num_channels=args.num_channels,
                num_res_blocks=args.num_res_blocks, channel_mult=args.channel_mult,
                attention_resolutions=args.attention_resolutions, num_heads=args.num_heads,
                num_head_channels=args.num_head_channels, learn_sigma=args.learn_sigma,
                dropout=args.dropout, use_scale_shift_norm=True, resblock_updown=True,
                map_channels=map_channels, cond_dim=cond_dim, class_cond=num_classes > 0,
                num_classes=num_classes or 1000)


# ----------------------------------------------------------------------------------------------
# Text conditions. Without a download (the built-in data, our choice): a small CLIP-shaped text
# tower trained with its expert by the diffusion loss, on one id per word of the built-in captions
# or on CLIP's byte-level tokens elsewhere. Real data: CLIP, image embedding at training and text
# embedding at sampling (supp. §7.3, Eq. 20), so no captions are needed for training.
# ----------------------------------------------------------------------------------------------

def text_tokenizer(data_name):
    """The small tower's tokenizer: the closed word vocabulary of the shapes captions (data.py
    lists it), CLIP's byte-level tokens on other data (real captions have an open vocabulary)."""
    if data_name == "shapes":
        return common.WordTokenizer(data.shapes_caption_vocabulary(), 24)
    return common.CLIPTokenizer(bpe_path="", context_length=77)


class SmallText(nn.Module):
    """Tokens (B, L) -> L2-normalised embedding (B, SMALL_TEXT["embed_dim"]). A row of padding
    only (what null_cond and condition dropout give) is the null caption: a zero vector, which no
    real caption maps to."""

    def __init__(self, data_name):
        super().__init__()
        self.tokenizer = text_tokenizer(data_name)
        self.tower = common.CLIP.small(self.tokenizer.vocab_size, self.tokenizer.context_length,
                                       **SMALL_TEXT)
        self.tower.logit_scale.requires_grad_(False)  # CLIP's contrastive temperature: unused

    def tokens(self, captions):
        return self.tokenizer(captions, truncate=True)

    def forward(self, tokens):
        has_text = (tokens > 0).any(1, keepdim=True)
        return torch.where(has_text, F.normalize(self.tower.encode_text(tokens), dim=-1), 0.0)


class ClipText:
    """Supp. §7.3: CLIP image embedding of the training image, CLIP text embedding at sampling,
    both L2-normalised. Frozen; pretrained weights from common.CLIP (download on first use)."""

    def __init__(self, device, vision=True):  # sampling with captions needs the text tower only
        self.model = common.CLIP("ViT-B/32", pretrained=True, vision=vision).to(device).eval()
        self.tokenizer = common.CLIPTokenizer()
        self.device, self.last = device, (None, None)

    @torch.no_grad()
    def image(self, images):  # images in [-1, 1]; encode_image resizes and normalises as CLIP
        return F.normalize(self.model.encode_image(((images + 1) / 2).clamp(0, 1)).float(), dim=-1)

    @torch.no_grad()
    def text(self, captions, truncate=False):  # the last batch is kept: asked once per grid row
        if self.last[0] != list(captions):
            tokens = self.tokenizer(captions, truncate=truncate).to(self.device)
            embedding = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            self.last = (list(captions), embedding)
        return self.last[1]


# ----------------------------------------------------------------------------------------------
# Experts and data (§4.1). The paper trains each expert in its own run on its own dataset (hair
# maps on CelebA-HQ, skin maps on FFHQ, text on FFHQ) and composes them only at sampling: here
# one run trains the experts named by --experts, and --sample/--eval --expert_ckpt composes the
# experts of several such runs. A run with ONE expert trains it on the whole dataset. A run with
# several experts is the in-one-run experiment: the training set is split into its even and odd
# items, two disjoint halves that stand in for two datasets (IN_ONE_RUN_HALF).
# ----------------------------------------------------------------------------------------------

class Half(torch.utils.data.Dataset):
    """Items 2k + offset of a dataset: the in-one-run experiment's two disjoint "datasets"."""

    def __init__(self, dataset, offset):
        self.dataset, self.offset = dataset, offset

    def __len__(self):
        return (len(self.dataset) - self.offset + 1) // 2

    def __getitem__(self, k):
        return self.dataset[2 * k + self.offset]


def expert_datasets(train_set, experts):
    """Condition -> the items that teach it. One expert (or one condition): the whole training set.
    Several: each condition its half of the in-one-run split (the joint model of the Table 4
    ablation reads both halves, alternately)."""
    sources = sorted({c for e in experts.values() for c in e.conditions})
    if len(sources) == 1:
        return {sources[0]: train_set}
    return {c: Half(train_set, IN_ONE_RUN_HALF[c]) for c in sources}


class Pooled(torch.utils.data.Dataset):
    """A built-in dataset drawn at 32 px and average-pooled by `factor` (our choice, for the CPU
    budget: data.py draws shapes at 32 px and up). Maps take each block's majority id. Items
    are pure functions of the index, so they are kept after the first draw (keys we use only)."""

    KEYS = ("image", "label", "instance", "sketch", "caption", "class", "inst_class", "inst_mode",
            "inst_valid")

    def __init__(self, dataset, factor):
        self.dataset, self.factor, self.cache = dataset, factor, {}
        for key in ("num_classes", "channels", "has", "class_names", "palette"):
            setattr(self, key, getattr(dataset, key))
        self.size = tuple(s // factor for s in dataset.size)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index in self.cache:
            return dict(self.cache[index])
        item = {k: v for k, v in self.dataset[index].items() if k in self.KEYS}
        f = self.factor
        item["image"] = F.avg_pool2d(item["image"][None], f)[0]
        if "sketch" in item:  # an edge survives pooling
            item["sketch"] = F.max_pool2d(item["sketch"][None], f)[0]
        for key in ("label", "instance"):
            ids = item[key]
            votes = F.avg_pool2d(F.one_hot(ids, int(ids.max()) + 1).permute(2, 0, 1)[None].float(), f)
            item[key] = votes[0].argmax(0)
        self.cache[index] = item
        return dict(item)


def load_dataset(args, split):
    if args.data in ("shapes", "hshape", "letters") and args.size < 32:
        factor = 32 // args.size
        if factor * args.size != 32 or factor & (factor - 1):
            raise common.UserError(f"--size {args.size} must be 32 or more, or 16 or 8 for the "
                                   f"built-in data (drawn at 32 px, then pooled).")
        return Pooled(data.get_dataset(args.data, args.data_dir, split, 32), factor)
    return data.get_dataset(args.data, args.data_dir, split, args.size, skip=("lowres",))


class Trained(nn.Module):
    """A trained expert: its UNet and, for captions with the tiny encoder, its text encoder (run
    inside forward, so DDP syncs its gradients too). It remembers what its conditions look like
    (label classes, image classes, size), so that experts of other runs can be composed."""

    def __init__(self, conditions, args, num_labels, num_classes=0):
        super().__init__()
        self.conditions, self.size = conditions, args.size
        self.num_labels = num_labels if "map" in conditions else 0
        self.num_classes = num_classes if "class" in conditions else 0
        self.tiny_text = "text" in conditions and args.text_encoder == "tiny"
        self.clip_text = "text" in conditions and args.text_encoder == "clip"
        cond_dim = 0
        if "text" in conditions:
            cond_dim = SMALL_TEXT["embed_dim"] if self.tiny_text else CLIP_DIM
        if self.tiny_text:
            self.text = SmallText(args.data)
        map_ch = sum(self.num_labels if c == "map" else 1 for c in SPATIAL if c in conditions)
        self.unet = UNet(**unet_flags(args, map_ch, cond_dim, self.num_classes))
        self.learn_sigma = self.unet.learn_sigma

    def forward(self, x, t, cond_tokens=None, **cond):
        return self.unet(x, t, **self.encode(dict(cond, cond_tokens=cond_tokens)))

    def encode(self, cond):
        """Text tokens (B, L) -> cond_vec (B, 64) for the tiny text tower (padding-only rows, the
        null caption, give zeros); the sampler encodes its constant conditions once."""
        cond = dict(cond)
        tokens = cond.pop("cond_tokens", None)
        if self.tiny_text and tokens is not None:
            cond["cond_vec"] = self.text(tokens)
        return cond

    def null_cond(self, batch, device):
        cond = self.unet.null_cond(batch, device)
        if self.tiny_text:
            del cond["cond_vec"]
            cond["cond_tokens"] = torch.zeros(batch, self.text.tokenizer.context_length,
                                              dtype=torch.long, device=device)
        return cond


def rows_of(batch):
    """The number of rows of a condition batch (a dict of tensors and caption lists)."""
    return len(next(iter(batch.values())))


def condition_inputs(expert, batch, clip=None, active=None, text_from="caption", validate=True):
    """Keyword arguments of an expert for a batch. Conditions of the expert not in `active` are
    null: zero map channels (one-hot label map, skin / hair region, edge sketch), label -1, zero
    caption. Captions are tokens for the tiny encoder or a CLIP vector; text_from "image" takes
    the CLIP image embedding of the batch's image instead (supp. §7.3, Eq. 20: the training
    condition). validate: check label and class ids (sampling; training skips it: no host sync)."""
    active = set(expert.conditions if active is None else active)
    n, device = rows_of(batch), next(expert.parameters()).device
    hw = (expert.size, expert.size)
    cond = expert.null_cond(n, device)
    maps = []
    for c in (c for c in SPATIAL if c in expert.conditions):  # channels in SPATIAL's order
        if c not in active:
            maps.append(torch.zeros(n, expert.num_labels if c == "map" else 1, *hw,
                                    device=device))
        elif c == "map":
            label = batch["label"]
            top = expert.num_labels - 1
            if validate:  # the training set's ids are checked by data.py (and a check syncs)
                common.require(int(label.max()) <= top,
                               f"a label map holds class id {int(label.max())}, but the "
                               f"label-map expert knows {expert.num_labels} classes (0..{top}).")
            maps.append(F.one_hot(label, expert.num_labels).permute(0, 3, 1, 2).float())
        elif c in FACE_PARTS and c in batch:  # a typed skin or hair map (--skin_map, ...)
            maps.append(batch[c].float())
        elif c in FACE_PARTS:  # the skin or hair region of the parsing map, (B, 1, H, W)
            maps.append((batch["label"] == FACE_PARTS[c]).float()[:, None])
        else:  # lines in {0, 1} (a typed sketch keeps its grey values: thresholded here)
            maps.append((batch["sketch"] >= 0.5).float())
    if maps and active & set(SPATIAL):
        cond["cond_map"] = torch.cat(maps, dim=1)
    if "class" in expert.conditions and "class" in active:
        if validate:
            common.require(int(batch["class"].max()) < expert.num_classes,
                           f"class id {int(batch['class'].max())} is out of range for the class "
                           f"expert's {expert.num_classes} classes.")
        cond["y"] = batch["class"].long()
    if "text" in expert.conditions and "text" in active and text_from is not None:
        if expert.tiny_text:
            tokens = expert.text.tokens(batch["caption"])
            tokens = tokens.pin_memory() if device.type == "cuda" else tokens
            cond["cond_tokens"] = tokens.to(device, non_blocking=True)  # no wait for the GPU
        else:
            cond["cond_vec"] = clip.image(batch["image"]) if text_from == "image" else \
                clip.text(batch["caption"])
    return cond


def drop_conditions(cond, p, uniform):
    """Classifier-free training (Ho & Salimans): each condition is nulled per example with
    probability p, independently (so the joint model also sees every partial combination).
    uniform (B, >= number of conditions): the random draws, one column per condition."""
    for k, (key, value) in enumerate(cond.items()):
        if value is None:
            continue
        drop = uniform[:, k] < p
        if key == "y":
            cond[key] = torch.where(drop, torch.full_like(value, -1), value)
        else:
            cond[key] = value * (~drop).to(value.dtype).reshape(-1, *([1] * (value.dim() - 1)))
    return cond


def build_experts(args, num_labels, num_classes=0, has=None, label_names=None):
    """The experts named by --experts; `has` (the dataset's keys) and `label_names` (its label
    classes: skin and hair experts read face parsing maps) are checked when given."""
    names = [n for n in args.experts.split(",") if n]
    for n in names:
        for c in EXPERT_CONDITIONS[n]:
            if has is not None and NEEDS_KEY[c] not in has and \
                    not (c == "text" and args.text_encoder == "clip"):
                raise common.UserError(f"expert {n} needs '{NEEDS_KEY[c]}' items, which "
                                       f"--data {args.data} does not provide.")
            if c in FACE_PARTS and label_names is not None:
                common.require(list(label_names) == data.CELEBAMASK_CLASSES,
                               f"expert {n} reads the {c} region of face parsing maps "
                               f"(CelebAMask-HQ's 19 classes); --data {args.data} has other "
                               f"labels.")
    return {n: Trained(EXPERT_CONDITIONS[n], args, num_labels, num_classes) for n in names}


def needs_clip(models):
    """CLIP is built only when an expert reads text through it (not for maps, sketches, classes
    or the tiny text encoder)."""
    return any(getattr(m, "clip_text", False) for m in models.values())


# ----------------------------------------------------------------------------------------------
# Training: the run's experts side by side in one loop, each on its own data
# ----------------------------------------------------------------------------------------------

def step_randomness(args, it, expert_index, global_batch, shape, num_conditions=8,
                    device="cpu"):
    """Timesteps, noise and null-condition draws of one expert's training step for the GLOBAL
    batch, from a generator seeded by (seed, iteration, expert). Each rank takes its rows, so
    torchrun with N processes computes exactly the losses of one process on the whole batch,
    and --resume needs no random state (our choice). Drawn on the device: no host-to-device
    copy, which would wait for the GPU, in a training step."""
    gen = torch.Generator(device).manual_seed((args.seed * 1_000_003 + it) * 31 + expert_index)
    t = torch.randint(0, args.diffusion_steps, (global_batch,), generator=gen, device=device)
    noise = torch.randn((global_batch, *shape), generator=gen, device=device)
    uniform = torch.rand((global_batch, num_conditions), generator=gen, device=device)
    return t, noise, uniform


def train_step(args, rt, index, model, expert, batch, sched, clip, it):
    """The loss of one expert on this rank's rows of one global batch (forward only)."""
    conds = expert.conditions
    # The joint model (Table 4 ablation) alternates datasets across iterations (§4.1).
    source = conds[it % len(conds)]
    x0 = batch[source]["image"]
    local = x0.shape[0]
    rows = slice(rt.rank * local, (rt.rank + 1) * local)
    t, noise, uniform = (v[rows] for v in step_randomness(
        args, it, index, local * rt.world_size, x0.shape[1:], device=rt.device))
    with rt.autocast():
        # supp. §7.3: a CLIP text expert trains on the CLIP image embedding of its image
        text_from = "image" if expert.clip_text else "caption"
        cond = condition_inputs(expert, batch[source], clip, {source}, text_from, validate=False)
        cond = drop_conditions(cond, args.p_uncond, uniform)
        return diffusion_loss(model, x0, cond, sched, t, noise)


def optimise(rt, model, opt, loss):
    """One AdamW step of one expert (one GradScaler shared by the experts: a no-op unless fp16)."""
    opt.zero_grad(set_to_none=True)
    rt.scaler.scale(loss).backward()
    rt.scaler.unscale_(opt)
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # our choice (lucidrains, nanoGPT)
    rt.scaler.step(opt)
    rt.scaler.update()


def train(args):
    rt = common.setup_runtime(args)
    train_set = load_dataset(args, "train")
    num_labels, num_classes = train_set.num_classes, len(train_set.class_names)
    experts = build_experts(args, num_labels, num_classes, train_set.has, train_set.class_names)
    datasets = expert_datasets(train_set, experts)
    clip = ClipText(rt.device) if needs_clip(experts) else None
    sched = Schedule.make(args.noise_schedule, args.diffusion_steps)
    models = {n: common.prepare_model(e, rt, args.compile) for n, e in experts.items()}
    opts = {n: torch.optim.AdamW(e.parameters(), lr=args.lr, weight_decay=0.0)
            for n, e in experts.items()}
    emas = {n: common.EMA(e, args.ema_decay) for n, e in experts.items()}
    objects = {**{f"model_{n}": e for n, e in experts.items()},
               **{f"ema_{n}": m for n, m in emas.items()},
               **{f"opt_{n}": o for n, o in opts.items()}, "scaler": rt.scaler}
    # what --expert_ckpt needs to rebuild these experts in another run's sampler
    facts = {"num_labels": num_labels, "num_classes": num_classes}
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    start = 0
    if args.resume:
        start = common.load_checkpoint(ckpt_path, "compose_diffusion", vars(args), ARCH_KEYS,
                                       objects, rt=rt)["iter"]
    streams = {k: common.batch_stream(d, args.batch_size, rt, args.seed + s, start,
                                      args.num_workers)
               for s, (k, d) in enumerate(datasets.items())}
    logger = common.Logger(args.out_dir, args.iters, start, rt.is_main)
    with common.StopSignals() as signals:
        for it in range(start, args.iters):
            batch = {k: common.to_device(next(s), rt.device) for k, s in streams.items()}
            losses = {}
            for index, (n, model) in enumerate(models.items()):
                loss = train_step(args, rt, index, model, experts[n], batch, sched, clip, it)
                optimise(rt, model, opts[n], loss)
                emas[n].update(model, min(args.ema_decay, (1 + it) / (10 + it)))  # warm-up: our choice
                losses[f"loss_{n}"] = loss.detach()  # read at log steps only (no sync)
            logger.step(args.batch_size)
            done = it + 1
            if done % args.log_every == 0 or done == args.iters:  # every rank: an all-reduce
                logger.log(done, **{k: common.reduce_mean(v.item(), rt) for k, v in losses.items()})
            if rt.is_main and (done % args.sample_every == 0 or done == args.iters):
                setup = Setup(args, {n: m.model for n, m in emas.items()}, sched, rt.device, clip)
                test = load_dataset(args, "test") if args.data == "shapes" else train_set
                with common.preserved_rng():
                    sample_grids(args, setup, test, os.path.join(
                        args.out_dir, f"samples_{done:06d}.png"), quick=True)
            signals.end_of_step(rt, args, done, ckpt_path, lambda: common.save_checkpoint(
                ckpt_path, "compose_diffusion", args, done, objects, extra=facts, rt=rt))
    logger.close()
    return {n: m.model for n, m in emas.items()}, sched, train_set

# ----------------------------------------------------------------------------------------------
# Sampling: the experts of this run, or of several runs (--expert_ckpt), and their conditions
# ----------------------------------------------------------------------------------------------

def parse_floats(text, n, flag):
    """--guidance / --reliability: 1 value (for every expert), N comma-separated values (one per
    composed expert, in order), or "uniform" (1/N, paper §4.1)."""
    if text == "uniform":
        return [1.0 / n] * n
    try:
        values = [float(v) for v in str(text).split(",") if v != ""]
    except ValueError:
        raise common.UserError(f"--{flag} {text} must be numbers separated by commas.") from None
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise common.UserError(f"--{flag} {text} needs 1 or {n} comma-separated values, one per "
                               f"composed expert.")
    return values


def read_run(path, flag="--expert_ckpt"):
    """(flags, facts) of a compose_diffusion.py checkpoint, read without loading its tensors
    (mmap), so that flags can be checked before anything is built."""
    common.require(os.path.isfile(path), f"{flag} {path} does not exist; give the ckpt.pt of a "
                                         f"finished compose_diffusion.py run.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise common.UserError(f"{flag} {path} is not a readable checkpoint of this project "
                               f"({type(err).__name__}).") from None
    method = ckpt.get("method") if isinstance(ckpt, dict) else None
    common.require(method == "compose_diffusion", f"{flag} {path} was written by "
                                                  f"{method or 'something else'}, not "
                                                  f"compose_diffusion.py.")
    return ckpt["config"], ckpt.get("extra", {})


def composed_names(experts):
    """The experts a run contributes to a composition: all but the joint ablation model."""
    return [n for n in experts.split(",") if n and n != "joint"]


def load_experts(args):
    """--sample / --eval: name -> Trained (EMA weights) and name -> its noise schedule.

    Without --expert_ckpt: this run's experts (out_dir/ckpt.pt, the flags given now). With it:
    the experts of each checkpoint, each rebuilt with the flags ITS run was trained with (other
    datasets, widths, schedules), in the order given. Composing them is Eq. (10) exactly as for
    the experts of one run: a sampler only ever needs eps_i(z_t, x_i) and eps_j(z_t, null) of
    each expert, whichever run trained it (§3.2)."""
    if not args.expert_ckpt:
        path = os.path.join(args.out_dir, "ckpt.pt")
        common.require(os.path.isfile(path), f"no checkpoint at {path}; train first, point "
                                             f"--out_dir at the run folder, or compose other runs "
                                             f"with --expert_ckpt.")
        runs = [(path, vars(args), read_run(path, "the run's checkpoint")[1])]
    else:
        runs = [(p, *read_run(p)) for p in args.expert_ckpt]
    models, scheds = {}, {}
    for k, (path, flags, facts) in enumerate(runs):
        run = argparse.Namespace(**flags)
        if not args.expert_ckpt:  # this run: labels and classes from its test set if unsaved
            facts = facts or facts_of(load_dataset(args, "test"))
        built = build_experts(run, facts["num_labels"], facts["num_classes"])
        common.load_checkpoint(path, "compose_diffusion", flags, ARCH_KEYS,
                               {f"ema_{n}": m for n, m in built.items()}, restore_rng=False)
        for n, m in built.items():
            if args.expert_ckpt and n == "joint":
                continue
            key = n if n not in models else f"{n}@{k + 1}"  # two runs may train the same kind
            models[key], scheds[key] = m, Schedule.make(run.noise_schedule, run.diffusion_steps)
    return models, scheds


def facts_of(dataset):
    return {"num_labels": dataset.num_classes, "num_classes": len(dataset.class_names)}


def runs_flags(args):
    """--expert_ckpt: the image size, schedule and steps the composed runs share decide the
    sampler; every run must make images of one size (z_t's shape, paper §6)."""
    flags = [read_run(p)[0] for p in args.expert_ckpt]
    sizes = sorted({f["size"] for f in flags})
    common.require(len(sizes) == 1, f"--expert_ckpt runs make images of sizes {sizes}; composed "
                                    f"experts must share z_t's shape (paper §6).")
    return flags


def generate(args, comp, n, device, seed):
    """Images from one Composition with the configured sampler; fixed z_T per seed, so rows of a
    sweep share their noise (as Fig. 6)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_T = torch.randn(n, 3, args.size, args.size, generator=gen).to(device)
    return sample(comp.eps_and_var, comp.ref, x_T.shape, args.sampler, args.eta,
                  x_T=x_T, generator=torch.Generator(device=device).manual_seed(seed + 1),
                  device=device, variance=args.fixed_variance)


class Setup:
    """The experts as sampling Experts (each with its own noise schedule), the sampler's chain
    (the first expert's schedule respaced by --sample_steps), CLIP, and condition builders.

    `parts`: the conditions Eq. (10) composes, (expert name, condition), one per trained expert;
    a released model serves each of its conditions in `given` (--init_from), its rows sharing
    its one null prediction."""

    def __init__(self, args, models, scheds, device, clip=None, given=None):
        self.args, self.device, self.clip = args, device, clip
        self.models = {n: m.to(device).eval() for n, m in models.items()}
        scheds = scheds if isinstance(scheds, dict) else {n: scheds for n in models}
        self.experts = {n: Expert(n, m, scheds[n], has_null=getattr(m, "has_null", True))
                        for n, m in self.models.items()}
        self.ref = sampler_schedule(scheds[next(iter(models))], str(args.sample_steps))
        self.names = [n for n in self.models if n != "joint"]  # the experts composed
        self.parts = [(n, c) for n in self.names for c in self.serves(n, given)]
        self.official = None

    def serves(self, name, given):
        """The conditions a network composes: a trained expert its own (the first: the joint
        model, never composed, has two), a released model those of `given` it knows."""
        model = self.models[name]
        if isinstance(model, Released):
            return [c for c in model.conditions if c in given]
        return model.conditions[:1]

    def label(self, part):
        """A part's name in grids and eval.json: the expert's, or model:condition for a released
        model that serves several conditions."""
        name, c = part
        return f"{name}:{c}" if len(self.models[name].conditions) > 1 and \
            isinstance(self.models[name], Released) else name

    def cond(self, name, batch, active=None):
        # supp. §7.3: CLIP text experts sample with the text embedding of a caption; where there
        # is none (a dataset without captions, no --text), with the image embedding of the item
        model = self.models[name]
        if isinstance(model, Released):
            return model.inputs(batch, set(model.conditions if active is None else active))
        text_from = "caption"
        if model.clip_text and "caption" not in batch:
            common.require("image" in batch, f"expert {name} reads text: pass --text \"...\".")
            text_from = "image"
        return condition_inputs(model, batch, self.clip, active, text_from)

    def alone(self, part, batch, w):
        """One condition with classifier-free guidance (Eq. 11 = Eq. 10 with N = 1)."""
        name, c = part
        return Composition([self.experts[name]], [(0, self.cond(name, batch, {c}))], [w], [1.0],
                           self.ref)

    def expert_names(self):
        """The networks of `parts`, in order, each once."""
        return list(dict.fromkeys(n for n, _ in self.parts))

    def composed_experts(self):
        """The networks Eq. (10) composes: every trained one but the joint model (or the
        released ones), then --ckpt's."""
        return [self.experts[n] for n in self.expert_names()] + \
            ([self.official] if self.official is not None else [])

    def weights(self):
        """(w per part, a per network of composed_experts(), lowest w) of --guidance /
        --reliability, both given one value per part (--ckpt's model last). Parts of one
        released model share its null prediction, so their reliabilities add up (the sum over
        j of Eq. 10 with equal eps_j)."""
        if not self.composed_experts():  # the joint model alone: one weight
            return parse_floats(self.args.guidance.replace("official", "1"), 1, "guidance"), \
                [1.0], 1.0
        kinds = [c for _, c in self.parts] + (["class"] if self.official is not None else [])
        has_null = [self.experts[n].has_null for n, _ in self.parts] + \
            ([self.official.has_null] if self.official is not None else [])
        w, a_parts, low = composition_weights(self.args.guidance, self.args.reliability, kinds,
                                              has_null)
        owners = [n for n, _ in self.parts] + (["--ckpt"] if self.official is not None else [])
        a = [sum(aj for o, aj in zip(owners, a_parts) if o == n)
             for n in dict.fromkeys(owners)]
        return w, a, low

    def alone_weights(self):
        """w of each part sampled alone: its --guidance value (1 under "official": one face
        modality alone is its plain conditional model there)."""
        if self.args.guidance == "official":
            return [1.0] * len(self.parts)
        return parse_floats(self.args.guidance, len(self.parts) + (self.official is not None),
                            "guidance")[:len(self.parts)]

    def composed(self, batch, w, a, low=1.0):
        """Every part on its own condition (Eq. 10), one w per part and one a per network of
        composed_experts(): with --ckpt, the official ADM model is the last, conditioned on
        --ckpt_class. A network's rows go through it as one batch (and, where used, its null)."""
        experts, names = self.composed_experts(), self.expert_names()
        conds = [(names.index(n), self.cond(n, batch, {c})) for n, c in self.parts]
        if self.official is not None:
            y = torch.full((rows_of(batch),), self.args.ckpt_class, device=self.device)
            conds.append((len(experts) - 1, {"y": y}))
        return Composition(experts, conds, w, a, self.ref, low)

    def joint_usual(self, batch, w):
        """Table 4 ablation: the jointly trained model given both conditions in one forward pass,
        guided against its fully null prediction (regular sampling)."""
        return Composition([self.experts["joint"]], [(0, self.cond("joint", batch))], [w], [1.0],
                           self.ref)

    def joint_composed(self, batch, w, a_unused=None):
        """The same single model, its two conditions composed as two rows (Fig. 5 / Fig. 27)."""
        conds = [(0, self.cond("joint", batch, {"map"})), (0, self.cond("joint", batch, {"text"}))]
        return Composition([self.experts["joint"]], conds, w, [1.0], self.ref)


def load_official(args, setup, device):
    """--ckpt: an official guided-diffusion checkpoint as one more expert (strict load)."""
    flags = ADM_CONFIGS[args.ckpt_config]   # flags, file and size checked by check_args
    try:
        state = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    except Exception as err:
        raise common.UserError(f"{args.ckpt} is not a readable guided-diffusion checkpoint "
                               f"({type(err).__name__}).") from None
    model = UNet(**flags)
    ours = model.state_dict()
    missing, unexpected = ours.keys() - state.keys(), state.keys() - ours.keys()
    other = [k for k in ours if k in state and ours[k].shape != state[k].shape]
    if missing or unexpected or other:
        shapes = (f"; {other[0]} is {tuple(state[other[0]].shape)}, --ckpt_config "
                  f"{args.ckpt_config} wants {tuple(ours[other[0]].shape)}" if other else "")
        raise common.UserError(f"{args.ckpt} does not match --ckpt_config {args.ckpt_config}: "
                               f"{len(missing)} missing, {len(unexpected)} unexpected and "
                               f"{len(other)} differently shaped tensors{shapes}.")
    model.load_state_dict(state)
    sched = Schedule.make(ADM_SCHEDULES[args.ckpt_config], 1000)
    # ADM never saw a null label: its null is absent (reliability 0) or, as in the official
    # scene code, the prediction for a stand-in class (--ckpt_null_class; official: 0, tench)
    setup.official = Expert("adm", model.to(device).eval(), sched, has_null=False,
                            null_class=args.ckpt_null_class)


def test_batch(dataset, n, device, offset=0):
    """Items offset .. offset + n - 1 as one batch (wrapping around a dataset smaller than that)."""
    items = [dataset[(offset + k) % len(dataset)] for k in range(n)]
    batch = torch.utils.data.default_collate(items)
    return common.to_device(batch, device)


# Conditions typed at sampling time: flag -> the batch key it fills
CLI_CONDITIONS = {"text": "caption", "label_map": "label", "sketch": "sketch", "class_id": "class",
                  "skin_map": "skin", "hair_map": "hair"}


def read_png(path, what, mode):
    try:
        with Image.open(path) as img:
            img.load()
            return img if mode is None else img.convert(mode)
    except (OSError, ValueError) as err:
        raise common.UserError(f"--{what} {path} is not a readable image "
                               f"({type(err).__name__}).") from None


def grey(path, flag, hw):
    """An image file as (1, H, W) grey values in [0, 1], resized to hw (bicubic, as PIL's
    default in the release's preprocess_image)."""
    img = read_png(path, flag, "L").resize(hw[::-1], Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, np.float32) / 255)[None].clamp(0, 1)


def command_line_conditions(args, n, device):
    """--text, --label_map (a PNG of class ids, mode L or P), --sketch (an image of lines, dark
    on white or white on black: the minority side is the line, as data.py reads sketches; its
    grey values kept for the released sketch model, thresholded for trained experts),
    --skin_map / --hair_map (a grey image, white = the region, as the release's face_map and
    hair_map), --class_id: n identical rows each."""
    cond, hw = {}, (args.size, args.size)
    if args.text is not None:
        cond["caption"] = [args.text] * n
    if args.label_map:
        img = read_png(args.label_map, "label_map", None)
        common.require(img.mode in ("L", "P"), f"--label_map {args.label_map} is a {img.mode} "
                                               f"image; a label map holds class ids (mode L or P).")
        ids = torch.from_numpy(np.array(img.resize(hw[::-1], Image.NEAREST), dtype=np.int64))
        cond["label"] = ids.expand(n, *hw).to(device)
    if args.sketch:
        lines = grey(args.sketch, "sketch", hw)
        lines = 1 - lines if lines.mean() > 0.5 else lines
        cond["sketch"] = lines.expand(n, 1, *hw).to(device)
    for flag in ("skin_map", "hair_map"):
        if getattr(args, flag):
            cond[CLI_CONDITIONS[flag]] = grey(getattr(args, flag), flag, hw).expand(
                n, 1, *hw).to(device)
    if args.class_id is not None:
        cond["class"] = torch.full((n,), args.class_id, dtype=torch.long, device=device)
    return cond


def needs_test_set(args, models):
    """The test set is read unless every condition the experts need was typed (--sample); the
    released models take the typed conditions alone, the test set's when none is typed."""
    typed = {CLI_CONDITIONS[f] for f in CLI_CONDITIONS if getattr(args, f) not in (None, "")}
    if args.init_from:
        return args.eval or not typed
    wanted = {c if c in typed and c in FACE_PARTS else NEEDS_KEY[c]
              for m in models.values() for c in m.conditions}
    return args.eval or not wanted <= typed


def check_test_set_keys(args, models, test):
    """Every condition the experts read from the test set (not typed) is in its items: one
    sentence naming the missing one, before any sampling (a CLIP text expert falls back to the
    image embedding, supp. §7.3)."""
    typed = {CLI_CONDITIONS[f] for f in CLI_CONDITIONS if getattr(args, f) not in (None, "")}
    flag = {key: f for f, key in CLI_CONDITIONS.items()}
    for name, model in models.items():
        conditions = model.conditions
        if isinstance(model, Released):
            conditions = [c for c in release_conditions(args) if c in conditions]
        for c in conditions:
            key = c if c in FACE_PARTS and c in typed else NEEDS_KEY[c]
            image_instead = c == "text" and getattr(model, "clip_text", False)
            if key in typed or key in test.has or image_instead:
                continue
            hint = ("--eval measures on the dataset's own, so add them to it" if args.eval else
                    f"add them to the dataset or give --{flag[key]}")
            raise common.UserError(f"expert {name} reads '{key}' items, which the test set of "
                                   f"--data {args.data} does not have; {hint}.")


def sampling_batch(args, setup, test, n, offset):
    """n rows of conditions: items offset.. of the test set (with their ground truth), with each
    condition typed on the command line in place of the test set's."""
    batch = test_batch(test, n, setup.device, offset) if test is not None else {}
    batch.update(command_line_conditions(args, n, setup.device))
    return batch


def condition_rows(setup, test, batch):
    """The grid's first rows (the conditions and the ground truth) and a palette for maps."""
    rows, titles = [], []
    read = {NEEDS_KEY[c] for m in setup.models.values() for c in m.conditions} | {"image"}
    read |= {c for m in setup.models.values() for c in m.conditions if c in batch}
    for key, title in (("label", "label map"), ("skin", "skin map"), ("hair", "hair map"),
                       ("sketch", "sketch"), ("image", "ground truth")):
        if key in batch and key in read:
            tiles = batch[key].cpu()
            if key in ("skin", "hair"):
                tiles = 2 * tiles - 1                      # the region white on black
            rows.append(list(1 - 2 * tiles if key == "sketch" else tiles))  # edges dark on white
            titles.append(title)
    classes = max([m.num_labels for m in setup.models.values()] + [2])
    palette = test.palette if test is not None else data.label_palette(classes)
    return rows, titles, palette


def sample_grids(args, setup, test, path, quick=False):
    """Rows: the conditions (label map, sketch) | ground truth | each expert alone (classifier-
    free guidance) | their composition (| joint model, usual sampling). Captions go to a .txt
    file beside the PNG."""
    n, device = min(8, args.batch_size), setup.device  # one batch at most
    batch = sampling_batch(args, setup, test, n, 0)
    w, a, low = setup.weights()
    rows, titles, palette = condition_rows(setup, test, batch)
    for part, w_alone in zip(setup.parts, setup.alone_weights()):
        rows.append(list(generate(args, setup.alone(part, batch, w_alone), n, device, 1).cpu()))
        titles.append(f"{setup.label(part)} expert alone")
    if len(setup.parts) + (setup.official is not None) > 1:
        rows.append(list(generate(args, setup.composed(batch, w, a, low), n, device, 1).cpu()))
        titles.append("composition (Eq. 10)")
    if "joint" in setup.experts and not quick:
        rows.append(list(generate(args, setup.joint_usual(batch, w[0]), n, device, 1).cpu()))
        titles.append("joint model, usual sampling")
    common.save_grid(path, rows, palette=palette)
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
        f.write("rows: " + " | ".join(titles) + "\n")
        f.writelines(f"{k}: {c}\n" for k, c in enumerate(batch.get("caption", [])))


def sweep_grids(args, setup, test):
    """Fig. 6: reliability moved from the first expert with a null prediction (a = 1) to the
    last one (a = 1; with --ckpt and --ckpt_null_class: the class model as null, Fig. 6's top
    row), rows; and a guidance sweep w in {1, 2, 3, 5} for all experts, rows. Same z_T in every
    row."""
    experts, device = setup.composed_experts(), setup.device
    n, k = min(8, args.batch_size), len(experts)
    nulls = [j for j, e in enumerate(experts) if e.has_null]
    if k < 2 or len(nulls) < 2:
        return
    first, last = experts[nulls[0]].name, experts[nulls[-1]].name
    batch = sampling_batch(args, setup, test, n, n)
    w, a_given, low = setup.weights()
    head, titles, palette = condition_rows(setup, test, batch)
    rows = list(head)
    for r in (0.0, 0.25, 0.5, 0.75, 1.0):
        a = [0.0] * k
        a[nulls[0]], a[nulls[-1]] = 1 - r, r
        rows.append(list(generate(args, setup.composed(batch, w, a, low), n, device, 2).cpu()))
    common.save_grid(os.path.join(args.out_dir, "reliability.png"), rows, palette=palette)
    rows = list(head)
    for g in (1.0, 2.0, 3.0, 5.0):
        rows.append(list(generate(args, setup.composed(batch, [g] * len(w), a_given), n, device,
                                  2).cpu()))
    common.save_grid(os.path.join(args.out_dir, "guidance.png"), rows, palette=palette)
    with open(os.path.join(args.out_dir, "sweeps.txt"), "w") as f:
        f.write(f"reliability.png rows: {' | '.join(titles)} | a_{last} = 0, .25, "
                f".5, .75, 1 (a_{first} = 1 - that)\n"
                f"guidance.png rows: {' | '.join(titles)} | w = 1, 2, 3, 5 (every expert)\n")
        f.writelines(f"{j}: {c}\n" for j, c in enumerate(batch.get("caption", [])))



# ----------------------------------------------------------------------------------------------
# Released Unite and Conquer models (--init_from): the authors' face model (skin map, hair map,
# FaRL text) and sketch model, composed as their test_multimodal_face.py composes them. Facts
# from Nithin-GK/UniteandConquer (face_utils/unet.py, unet_sketch.py, script_util.py,
# diff_test.py); the files are downloaded by hand (README) and found beside each other under
# their released names.
# ----------------------------------------------------------------------------------------------

RELEASE_FILES = {"face": "model_latest.pt", "sketch": "model_sketch.pt",
                 "farl": "FaRL-Base-Patch16-LAIONFace20M-ep64.pth"}
# The trunk both UNets share (script_util.py): 256 px, 192 ch, mult (1,1,2,2,4,4), 2 res
# blocks, attention at 32/16/8 px with 64-channel heads (legacy order), scale-shift, resblock
# up/down, learned variance, no class embedding, dropout 0, float16 torso.
RELEASE_TRUNK = dict(image_size=256, num_channels=192, num_res_blocks=2,
                     channel_mult="1,1,2,2,4,4", attention_resolutions="32,16,8",
                     num_head_channels=64, learn_sigma=True, class_cond=False,
                     use_scale_shift_norm=True, resblock_updown=True, dropout=0.0, use_fp16=True)
RELEASE_FLAGS = {
    # z_t | input_blocks_convert(skin map | hair map), the FaRL embedding in every ResBlock
    "face": dict(RELEASE_TRUNK, map_channels=6, convert_map=True, block_cond_dim=CLIP_DIM),
    "sketch": dict(RELEASE_TRUNK, map_channels=3),             # z_t | the sketch, 3 channels
}
RELEASE_PARAMS = {"face": 330_924_267, "sketch": 311_027_910}  # counted with the official code
RELEASE_CONDITIONS = {"face": ("skin", "hair", "text"), "sketch": ("sketch",)}
# --init_from's flags (the face models' schedule: linear, 1000 steps; 256 px); the sampler's
# are the paper's unless --composition official-faces is given.
RELEASE_ARGS = dict(size=256, noise_schedule="linear", diffusion_steps=1000)


def release_conditions(args):
    """The conditions a run with the released models composes, in the official row order: the
    ones typed (--skin_map, --hair_map, --text, --sketch); otherwise the test set's: with --eval
    the skin and hair maps of one image (Tables 1-2: "the semantic labels of hair as well as skin
    from the same image", §4.1), for --sample alone all four."""
    typed = {"skin": args.skin_map, "hair": args.hair_map, "text": args.text,
             "sketch": args.sketch}
    given = [c for c, v in typed.items() if v not in (None, "")]
    return given or (["skin", "hair"] if args.eval else list(typed))


def read_release(path):
    """A released file's contents (tensors only: weights_only=True, memory-mapped) and its kind,
    "face", "sketch" or "farl", recognised by its keys; one sentence for anything else."""
    import pickle
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # files in the legacy (non-zip) format cannot be mapped
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise common.UserError(f"--init_from {path} needs Python code from its pickle to load, "
                               f"which is never run (weights_only=True); if you trust the file, "
                               f"save its tensors once (torch.save(torch.load(path, "
                               f"weights_only=False)['state_dict'], new_path)) and give that.") \
            from None
    except Exception as err:
        raise common.UserError(f"--init_from {path} is not a readable PyTorch weights file "
                               f"({type(err).__name__}).") from None
    if isinstance(state, dict) and "method" in state and "state" in state:
        raise common.UserError(f"--init_from {path} is a checkpoint of this project's "
                               f"{state['method']}.py; compose such runs with --expert_ckpt.")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        if "token_embedding.weight" in state["state_dict"]:
            return state, "farl"
        raise common.UserError(f"--init_from {path} holds a 'state_dict' without a CLIP text "
                               f"tower; expected FaRL's {RELEASE_FILES['farl']}.")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise common.UserError(f"--init_from {path} is not a state dict of tensors.")
    first = state.get("input_blocks.0.0.weight")
    if "token_embedding.weight" in state and first is None:  # FaRL's tensors saved bare
        return {"state_dict": state}, "farl"
    if "token_embedding.weight" in state:
        raise common.UserError(f"--init_from {path} is a GLIDE model (base.pt / upsample.pt), a "
                               f"network family compose_diffusion.py does not implement (README).")
    if "input_blocks_convert.weight" in state:
        return state, "face"
    if first is not None and first.shape[1] == 6 and "label_emb.weight" not in state:
        return state, "sketch"
    if first is not None and first.shape[1] == 3:
        raise common.UserError(f"--init_from {path} is a guided-diffusion (ADM) model; compose "
                               f"it with --ckpt and --ckpt_config.")
    raise common.UserError(f"--init_from {path} is not a released Unite and Conquer file "
                           f"({', '.join(RELEASE_FILES.values())}).")


def release_paths(args):
    """kind -> path of the released files a run needs: --init_from names one of them, the others
    are found beside it under their released names. The face model is needed for skin, hair or
    text, FaRL for text, the sketch model for a sketch."""
    _, kind = read_release(args.init_from)
    folder = os.path.dirname(args.init_from)
    paths = {k: os.path.join(folder, name) for k, name in RELEASE_FILES.items()}
    paths[kind] = args.init_from
    conditions = release_conditions(args)
    needed = {"face"} if set(conditions) & {"skin", "hair", "text"} else set()
    needed |= {"farl"} if "text" in conditions else set()
    needed |= {"sketch"} if "sketch" in conditions else set()
    for k in sorted(needed):
        common.require(os.path.isfile(paths[k]), f"--init_from: the {', '.join(conditions)} "
                                                 f"condition(s) need {RELEASE_FILES[k]}, not "
                                                 f"found beside {args.init_from} ({paths[k]}).")
        if k != kind:
            common.require(read_release(paths[k])[1] == k, f"--init_from: {paths[k]} is not "
                                                           f"the released {k} file.")
    return {k: paths[k] for k in sorted(needed)}


def check_release_args(args):
    """--init_from: sampling and evaluation of the released face models, at their own settings;
    one sentence for a command it cannot serve. Files are recognised here, before anything is
    built."""
    req = common.require
    req(args.sample or args.eval or args.dry_run,
        "--init_from samples (--sample) and evaluates (--eval) the released Unite and Conquer "
        "models; training from them is not implemented (the release's training code cannot run: "
        "see the README).")
    req(not (args.expert_ckpt or args.ckpt), "--init_from composes the released face models; "
                                             "give --expert_ckpt / --ckpt without it.")
    req(args.data in ("mm-celeba-hq", "celebamask-hq"),
        f"--init_from: the released models make faces; --data {args.data} is not a face set "
        f"(mm-celeba-hq or celebamask-hq).")
    for key, value in RELEASE_ARGS.items():
        req(getattr(args, key) == value, f"--init_from: the released models take "
                                         f"--{key} {value} (got {getattr(args, key)}).")
    if not args.dry_run:
        release_paths(args)


class FarlText:
    """The release's text encoder: OpenAI CLIP ViT-B/16's text tower with FaRL's weights on top
    (FaRL: Zheng et al., "General Facial Representation Learning in a Visual-Linguistic Manner",
    CVPR 2022, arXiv 2112.03109). As the official non-strict load, every text-tower tensor the
    file's `state_dict` holds replaces CLIP's (its image tower is never used). L2-normalised
    embedding of the caption; the release computes it in float16 on CUDA, we in float32."""

    def __init__(self, path, device):
        self.model = common.CLIP("ViT-B/16", pretrained=True, vision=False)
        ours = self.model.state_dict()
        farl = {k: v for k, v in read_release(path)[0]["state_dict"].items() if k in ours}
        common.require(farl, f"--init_from: {path} holds no CLIP text-tower tensor.")
        try:
            self.model.load_state_dict({k: v.float() for k, v in farl.items()}, strict=False)
        except RuntimeError as err:
            raise common.UserError(f"--init_from: {path} does not fit CLIP ViT-B/16's text tower "
                                   f"({str(err).splitlines()[-1].strip()[:200]}).") from None
        print(f"FaRL text tower: {len(farl)} of {len(ours)} tensors from {path}")
        self.model.to(device).eval()
        self.tokenizer, self.device = common.CLIPTokenizer(), device

    @torch.no_grad()
    def __call__(self, captions):
        tokens = self.tokenizer(captions).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


class Released(nn.Module):
    """A released UNet as a composable expert: its conditions and the inputs the official test
    code builds for them (diff_test.py).

    face: map slot = skin map | hair map, each a grey image as 3 equal channels in [-1, 1] (the
    release's face_map / hair_map JPEGs: white region on black), zeros where the row does not
    carry it; FaRL embedding of the caption, zeros where not carried. The official test code
    passes the maps in that order; its training code wrote hair first (compose_diffusion.md:
    "unconfirmed"): we follow the test code, which made the paper's figures. sketch: the sketch
    as 3 channels in [-1, 1], white lines on black."""

    num_labels = num_classes = 0
    tiny_text = clip_text = False

    def __init__(self, kind, text=None):
        super().__init__()
        self.kind, self.conditions = kind, RELEASE_CONDITIONS[kind]
        self.size = RELEASE_FLAGS[kind]["image_size"]
        self.unet = UNet(**RELEASE_FLAGS[kind])
        self.learn_sigma, self.text = True, text  # text: FarlText (frozen, not a submodule)
        self.has_null = kind == "face"  # the sketch model never learnt a null (official a = 0)

    def forward(self, x, t, **cond):
        return self.unet(x, t, **cond)

    def null_cond(self, batch, device):
        return self.unet.null_cond(batch, device)

    def inputs(self, batch, active):
        n, device = rows_of(batch), next(self.parameters()).device
        cond = self.null_cond(n, device)
        hw = (self.size, self.size)

        def signed(c):  # (B, 1, H, W) in [0, 1] -> (B, 3, H, W) in [-1, 1]
            m = batch[c] if c in batch else (batch["label"] == FACE_PARTS[c]).float()[:, None]
            return (2 * m.float() - 1).expand(n, 3, *hw)
        if self.kind == "sketch":
            cond["cond_map"] = signed("sketch")
            return cond
        zeros = torch.zeros(n, 3, *hw, device=device)
        if active & {"skin", "hair"}:
            cond["cond_map"] = torch.cat([signed(c) if c in active else zeros
                                          for c in ("skin", "hair")], dim=1)
        if "text" in active:
            cond["cond_vec"] = self.text(batch["caption"])
        return cond


def load_release(args, device):
    """The released models a run needs (strict loads), each with the face models' schedule."""
    paths = release_paths(args)
    text = FarlText(paths["farl"], device) if "farl" in paths else None
    models = {}
    for kind in ("face", "sketch"):
        if kind in paths:
            with torch.device("meta"):  # shapes only: the file's tensors become the parameters
                model = Released(kind, text)
            state = {k: v.float() for k, v in read_release(paths[kind])[0].items()}
            common.load_official(model.unet, state, paths[kind], assign=True)
            models[kind] = model
    sched = Schedule.make(RELEASE_ARGS["noise_schedule"], RELEASE_ARGS["diffusion_steps"])
    return models, {k: sched for k in models}


# ----------------------------------------------------------------------------------------------
# Evaluation: toy metrics on shapes (data.py); FID, LPIPS and CLIP score on real data
# ----------------------------------------------------------------------------------------------

def ssim(x, y, data_range=1.0, window=11, sigma=1.5, k1=0.01, k2=0.03):
    """SSIM (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004, Eq. 13) of images x, y (B, C, H, W)
    in [0, data_range] -> (B,): the mean over channels and over every position of an 11 x 11
    Gaussian window (sigma 1.5, normalised) lying inside the image, with
    SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
    C1 = (k1 L)^2, C2 = (k2 L)^2 (the paper's constants). Colour: per RGB channel, averaged (the
    paper defines it on grey images; our choice, as skimage's channel_axis). Images smaller
    than the window use a window of their size (our choice)."""
    c, size = x.shape[1], min(window, x.shape[-2], x.shape[-1])
    # float64: E[x^2] - mu^2 in float32 loses ~1e-7, a 1e-4 error against C2 (MPS: float32)
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    k = torch.arange(size, dtype=dtype, device=x.device) - (size - 1) / 2
    g = torch.exp(-k ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size)    # (C, 1, size, size)

    def mean(v):  # the Gaussian-weighted local mean of every channel, valid positions only
        return F.conv2d(v, kernel, groups=c)

    x, y = x.to(dtype), y.to(dtype)
    mu_x, mu_y = mean(x), mean(y)
    var_x, var_y = mean(x * x) - mu_x ** 2, mean(y * y) - mu_y ** 2
    cov = mean(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / \
        ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))   # Wang et al. Eq. (13)
    return index.mean((1, 2, 3)).float()                       # mean SSIM, their Eq. (17)


def clip_score(clip, images, captions):
    """Table 3's CLIP score of each image (B, 3, H, W) in [-1, 1] and its caption: the cosine of
    their CLIP embeddings (the paper's "average clip distance between the image embeddings and
    the embeddings of the input text prompt"; its values, 0.28-0.32, are raw cosines) -> (B,)."""
    return (clip.image(images) * clip.text(captions, truncate=True)).sum(1)


def eval_methods(setup):
    """What --eval compares: each expert alone (classifier-free guidance), their composition
    (Eq. 10) and, when a joint model was trained, the Table 4 ablation (both conditions in one
    forward pass) and the same model's conditions composed."""
    w, a, low = setup.weights()
    methods = {f"{setup.label(p)} expert alone": (lambda b, p=p, wp=wp: setup.alone(p, b, wp))
               for p, wp in zip(setup.parts, setup.alone_weights())}
    if len(setup.parts) + (setup.official is not None) > 1:
        methods["composition (Eq. 10)"] = lambda b: setup.composed(b, w, a, low)
    if "joint" in setup.experts:
        methods["joint model, usual sampling (Table 4 ablation)"] = \
            lambda b: setup.joint_usual(b, w[0])
        methods["joint model, composed sampling"] = lambda b: setup.joint_composed(b, (w * 2)[:2])
    return methods, w, a


@torch.no_grad()
def evaluate(args, setup, rt):
    """shapes: exact toy metrics (data.shapes_composition_scores) and SSIM to the ground truth.
    Real data: FID between the eval_n test images and the samples for their conditions
    (pytorch-fid Inception), LPIPS-alex and SSIM of each sample to its ground truth (the paper's
    Tables 1-2 protocol) and, where the test set has captions, the CLIP score of each sample and
    its caption (Table 3). Tables 1-2's mIoU and F1 compare a face parser's maps of the samples
    with the input maps, and Table 3's NIQE and ImageNet accuracy need their own networks and
    fitted statistics: none of them is here (README).
    Weights download on first use. Every method samples the same test items with the same seeds
    (--seed shifts them all: a second sampling seed).

    Streams: items are generated, measured and dropped --batch_size at a time; FID keeps running
    sums (common.RunningFIDStats), so memory is set by the batch, not by --eval_n. Inception and
    LPIPS are loaded once, the real statistics computed once for all methods. Under torchrun the
    batches are dealt out to the processes and their sums added: a batch's seed depends on its
    first item only, so the numbers do not depend on the number of processes."""
    test, device = load_dataset(args, "test"), setup.device
    n_items = min(args.eval_n, len(test))
    methods, w, a = eval_methods(setup)
    shapes, chunk, results, t0 = args.data == "shapes", args.batch_size, {}, time.perf_counter()
    spans = [(s, min(chunk, n_items - s)) for s in range(0, n_items, chunk)]
    spans = spans[rt.rank::rt.world_size]  # this process's batches
    if not shapes:
        inception = common.FIDInception(pretrained=True).to(device)
        lpips = common.LPIPS(net="alex", pretrained=True).to(device)
        captions = "caption" in test.has
        clip = ClipText(device) if captions else None  # Table 3's CLIP score
        real = common.RunningFIDStats()
        for start, n in spans:
            real.add(common.inception_features(
                inception, [(test_batch(test, n, device, start)["image"] + 1) / 2]))
        if rt.ddp:
            real.all_reduce(device)
        real = real.stats()
    for name, make in methods.items():
        sums, fake = {}, common.RunningFIDStats()
        for start, n in spans:
            batch = test_batch(test, n, device, offset=start)
            seed = 1000 + start + 100_003 * args.seed
            images = generate(args, make(batch), n, device, seed).clamp_(-1, 1)
            # Tables 1-2: SSIM of each sample to its ground truth
            scores = {"ssim_to_gt": float(ssim((images + 1) / 2, (batch["image"] + 1) / 2).mean())}
            if shapes:
                scores.update(data.shapes_composition_scores(images.cpu(),
                                                             common.to_device(batch, "cpu")))
            else:
                fake.add(common.inception_features(inception, [(images + 1) / 2]))
                scores["lpips_to_gt"] = float(lpips(images, batch["image"]).mean())
                if captions:
                    scores["clip_score"] = float(clip_score(clip, images, batch["caption"]).mean())
            for k, v in scores.items():
                sums[k] = sums.get(k, 0.0) + v * n
            del batch, images  # nothing of this batch outlives it
        sums = common.sum_over_ranks(sums, rt)
        results[name] = {k: round(v / n_items, 4) for k, v in sums.items()}
        if not shapes:
            if rt.ddp:
                fake.all_reduce(device)
            results[name]["fid"] = round(common.frechet_distance(*real, *fake.stats()), 3)
        if rt.is_main:
            print(f"{name:50s} " + " ".join(f"{k}={v:.3f}" for k, v in results[name].items()))
    out = {"n": n_items, "experts": setup.names, "guidance": w, "reliability": a,
           "sampler": args.sampler, "sample_steps": args.sample_steps,
           "seconds": round(time.perf_counter() - t0, 1), "results": results}
    if rt.is_main:
        path = os.path.join(args.out_dir, "eval.json")
        with open(path + ".tmp", "w") as f:
            json.dump(out, f, indent=2)
        os.replace(path + ".tmp", path)
    return out


def sample_and_evaluate(args):
    """--sample and/or --eval: the experts of this run or of --expert_ckpt, CLIP only when an
    expert reads text through it, the official ADM expert with --ckpt."""
    rt = common.setup_runtime(args)
    if args.init_from:  # the released face models, each serving the conditions asked
        models, scheds = load_release(args, rt.device)
    else:
        models, scheds = load_experts(args)
    test = load_dataset(args, "test") if needs_test_set(args, models) else None
    if test is not None:
        check_test_set_keys(args, models, test)
    captions = args.text is not None or (test is not None and "caption" in test.has)
    clip = ClipText(rt.device, vision=not captions) if needs_clip(models) else None
    setup = Setup(args, models, scheds, rt.device, clip,
                  given=release_conditions(args) if args.init_from else None)
    if args.ckpt:
        load_official(args, setup, rt.device)
    os.makedirs(args.out_dir, exist_ok=True)  # a composition of other runs: a new folder
    if args.sample:
        sample_grids(args, setup, test, os.path.join(args.out_dir, "experts.png"))
        sweep_grids(args, setup, test)
    if args.eval:
        evaluate(args, setup, rt)


# ----------------------------------------------------------------------------------------------
# Dry run and benchmark: --bench N times N training steps (common.bench_training) and the
# sampling step (composition vs separate samplers vs bare forwards, ratios in one run): bench.json
# ----------------------------------------------------------------------------------------------

def dry_run(args):
    """Parameter counts of the run's experts (and of --ckpt's ADM model) and the FLOPs of one
    training image of each expert, nothing read; built as shapes only (meta device), so a
    300M-parameter count takes no memory or time."""
    with torch.device("meta"):
        nets = build_experts(args, 5 if args.data == "shapes" else 19, 1000)  # 1000: ImageNet
        if not args.init_from:
            for name, expert in nets.items():
                gflops = training_flops(args, expert) / 1e9
                print(f"expert {name}: one training image costs {gflops:,.1f} GFLOP (forward "
                      f"and backward, convolutions and matrix multiplies)")
        else:  # the released models instead (their files are not read)
            nets = {f"released {k}": UNet(**flags) for k, flags in RELEASE_FLAGS.items()}
        if args.ckpt:
            nets[args.ckpt_config] = UNet(**ADM_CONFIGS.get(args.ckpt_config, {}))
    common.print_dry_run(nets)


def training_flops(args, expert):
    """common.count_flops of one training image of a (meta-device) expert: its diffusion loss
    with every condition given, forward and backward. A CLIP text expert's embedding is given
    (the frozen CLIP image tower that makes it in training is not counted); a tiny text tower
    trains with its expert and is counted, here on the null caption's tokens (a caption's
    shapes, so its cost)."""
    size, device = args.size, next(expert.parameters()).device
    x0 = torch.zeros(1, 3, size, size, device=device)
    batch = {"image": x0, "label": torch.zeros(1, size, size, dtype=torch.long, device=device),
             "sketch": torch.zeros(1, 1, size, size, device=device),
             "class": torch.zeros(1, dtype=torch.long, device=device)}
    cond = condition_inputs(expert, batch, text_from=None, validate=False)
    if expert.clip_text:
        cond["cond_vec"] = torch.zeros(1, CLIP_DIM, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    sched = Schedule.make(args.noise_schedule, args.diffusion_steps)
    return common.count_flops(lambda: diffusion_loss(expert, x0, cond, sched, t,
                                                     torch.zeros_like(x0)).backward())


def bench(args):
    """--bench N: N training steps of the run's experts on one fixed batch of the training set
    (fp32 eager first, then the asked --dtype / --compile), then N rounds of bench_sampling; one
    bench.json."""
    rt = common.setup_runtime(args)
    train_set = load_dataset(args, "train")
    facts = facts_of(train_set)
    batch = test_batch(train_set, args.batch_size, rt.device)
    text = args.text_encoder == "clip" and "caption" in args.experts
    clip = ClipText(rt.device) if text else None
    sched = Schedule.make(args.noise_schedule, args.diffusion_steps)

    def make_step(run, compile_model):
        experts = build_experts(args, facts["num_labels"], facts["num_classes"], train_set.has,
                                train_set.class_names)
        models = {n: common.prepare_model(e, run, compile_model, ddp=False)
                  for n, e in experts.items()}
        opts = {n: torch.optim.AdamW(e.parameters(), lr=args.lr, weight_decay=0.0)
                for n, e in experts.items()}
        sources = {c: batch for e in experts.values() for c in e.conditions}

        def step():
            for index, (n, model) in enumerate(models.items()):
                loss = train_step(args, run, index, model, experts[n], sources, sched, clip, 0)
                optimise(run, model, opts[n], loss)
        return step

    out = {"training": common.bench_training(args, rt, make_step),
           "sampling": bench_sampling(args, rt, rounds=args.bench)}
    return common.write_bench(args, out)


@torch.no_grad()
def bench_sampling(args, rt, n_experts=(2, 3), batch=8, rounds=10):
    """Per step, N experts with their own condition each: (a) Eq. 10 composition, one forward per
    model on 2B rows (cond + null); (b) N separate classifier-free-guided samplers, each its own
    step; (c) the composition without row batching (2N forwards of B rows); (d) the bare
    forwards of (a), no sampler. Untrained label-map experts of the preset's shape."""
    sched = Schedule.make(args.noise_schedule, args.diffusion_steps)
    ref = sampler_schedule(sched, str(args.sample_steps))
    step = min(5, ref.num_steps - 1)  # a step inside the chain (any will do)
    num_labels = 5
    results = {}
    for n in n_experts:
        models = [Trained(("map",), args, num_labels).to(rt.device).eval() for _ in range(n)]
        experts = [Expert(f"e{k}", m, sched) for k, m in enumerate(models)]
        lab = torch.randint(0, num_labels, (batch, args.size, args.size), device=rt.device)
        cond = {"cond_map": F.one_hot(lab, num_labels).permute(0, 3, 1, 2).float()}
        x = torch.randn(batch, 3, args.size, args.size, device=rt.device)
        comp = Composition(experts, [(k, cond) for k in range(n)], [2.0] * n, [1 / n] * n, ref)
        cfgs = [Composition([e], [(0, cond)], [2.0], [1.0], ref) for e in experts]

        def composed():
            eps, _ = comp.eps_and_var(x, step)
            return ddim_step(ref, x, step, eps)

        def separate():
            return [ddim_step(ref, x, step, c.eps_and_var(x, step)[0]) for c in cfgs]

        def unbatched():
            t = torch.full((batch,), int(ref.timestep_map[step]), device=rt.device)
            eps = [m(x, t, **cond)[:, :3] for m in models]
            null = [m(x, t, **m.null_cond(batch, rt.device))[:, :3] for m in models]
            return ddim_step(ref, x, step, compose_eps(eps, null, [1 / n] * n, [2.0] * n))

        def bare():
            t = torch.full((2 * batch,), int(ref.timestep_map[step]), device=rt.device)
            both = cat_conds([cond, models[0].null_cond(batch, rt.device)])
            return [m(x.repeat(2, 1, 1, 1), t, **both) for m in models]

        fns = {"bare_forwards": bare, "composition": composed,
               "separate_cfg_samplers": separate, "unbatched_composition": unbatched}
        runs = {name: [] for name in fns}
        for name, fn in fns.items():
            fn()  # warm-up
        for _ in range(rounds):  # interleaved rounds, median: robust to a busy machine
            for name, fn in fns.items():
                if rt.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if rt.device.type == "cuda":
                    torch.cuda.synchronize()
                runs[name].append((time.perf_counter() - t0) * 1000)
        timings = {name: float(np.median(v)) for name, v in runs.items()}
        base = timings["bare_forwards"]
        results[f"N={n}"] = {k: {"ms_per_step": round(v, 2), "ratio_to_bare": round(v / base, 3)}
                             for k, v in timings.items()}
        print(f"N={n}: " + ", ".join(f"{k} {v:.1f} ms ({v / base:.2f}x)"
                                     for k, v in timings.items()))
    return {"device": str(rt.device), "threads": torch.get_num_threads(), "batch": batch,
            "size": args.size, "num_channels": args.num_channels, "results": results}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def build_parser():
    p = common.base_parser(__doc__.split("\n")[0])
    g = p.add_argument_group("compose_diffusion")
    # ADM create_model() flags (same names)
    g.add_argument("--num_channels", type=int, default=None)
    g.add_argument("--num_res_blocks", type=int, default=None)
    g.add_argument("--channel_mult", default=None, help='e.g. "1,2,2"; "" = ADM default for size')
    g.add_argument("--attention_resolutions", default=None, help='feature sizes, e.g. "32,16,8"')
    g.add_argument("--num_heads", type=int, default=None)
    g.add_argument("--num_head_channels", type=int, default=None, help="-1: use num_heads")
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--learn_sigma", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
    g.add_argument("--noise_schedule", default=None, choices=["linear", "cosine"])
    g.add_argument("--diffusion_steps", type=int, default=None)
    # training
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--ema_decay", type=float, default=None)
    g.add_argument("--p_uncond", type=float, default=None, help="null-condition dropout per cond")
    g.add_argument("--experts", default=None,
                   help=f"experts this run trains, comma list of {', '.join(EXPERT_CONDITIONS)}; "
                        f"one expert: the whole dataset; several: even/odd halves (in-one-run)")
    g.add_argument("--text_encoder", default=None, choices=["tiny", "clip"])
    # sampling and composition
    g.add_argument("--expert_ckpt", nargs="+", default=None, metavar="CKPT",
                   help="--sample/--eval: compose the experts of these runs' ckpt.pt files "
                        "(trained separately, on other datasets) instead of out_dir's")
    g.add_argument("--sampler", default=None, choices=["ddim", "ddpm"])
    g.add_argument("--sample_steps", default=None, help='respacing: "25", "ddim25", "10,15"')
    g.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    g.add_argument("--fixed_variance", default=None, choices=["small", "large"],
                   help="DDPM steps of models without learned variance: small = beta_tilde_t, "
                        "large = beta_t (ADM's default)")
    g.add_argument("--composition", default=None, choices=list(COMPOSITIONS),
                   help="a named composition: the official release's weights and sampler")
    g.add_argument("--guidance", default=None,
                   help="w_i >= 1 (Eq. 10): one value, or one per composed expert in order "
                        "(--ckpt's model last); \"official\": the official release's literals")
    g.add_argument("--reliability", default=None,
                   help='a_j >= 0, sum 1 (Eq. 5): one per composed expert; "uniform" = 1/N '
                        'over the experts with a null; "official": the release\'s literals')
    g.add_argument("--text", default=None, help="caption for the text experts (--sample)")
    g.add_argument("--label_map", default=None, help="PNG of class ids for label-map experts")
    g.add_argument("--sketch", default=None, help="image of lines for sketch experts")
    g.add_argument("--skin_map", default=None,
                   help="grey image, white = skin region, for skin experts (the released "
                        "face model's face_map)")
    g.add_argument("--hair_map", default=None, help="grey image, white = hair, for hair experts")
    g.add_argument("--class_id", type=int, default=None, help="class for class experts")
    g.add_argument("--eval_n", type=int, default=None, help="test items per method for --eval")
    g.add_argument("--ckpt", default=None, help="an official guided-diffusion checkpoint to compose")
    g.add_argument("--ckpt_config", default="adm64", choices=list(ADM_CONFIGS),
                   help="its guided-diffusion flags")
    g.add_argument("--ckpt_class", type=int, default=0, help="ImageNet class for --ckpt")
    g.add_argument("--ckpt_null_class", type=int, default=None,
                   help="--ckpt's null prediction: this class (official scene code: 0); "
                        "default none (the model's reliability must be 0)")
    g.add_argument("--bench", type=int, default=None, metavar="N",
                   help="time N training steps and the sampling step, write bench.json")
    return p


def with_composition(argv):
    """--composition NAME: its flags (COMPOSITIONS) appended where the command line has none;
    --init_from (the released face models) without --data: --data mm-celeba-hq."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = build_parser().parse_args(argv)
    if given.init_from and given.data is None:
        argv += ["--data", "mm-celeba-hq"]
    name = given.composition
    if name is not None:
        for key, value in COMPOSITIONS[name].items():
            if getattr(given, key) is None:
                argv += [f"--{key}", str(value)]
    return argv


def main(argv=None):
    args = common.parse_args(build_parser(), PRESETS, "compose_diffusion", "shapes",
                             with_composition(argv), check=check_args)
    if args.dry_run:
        dry_run(args)
    elif args.bench:
        bench(args)
    elif args.sample or args.eval:
        sample_and_evaluate(args)
    else:
        train(args)


if __name__ == "__main__":
    common.run_main(main)
