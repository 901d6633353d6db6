"""Tests of compose_diffusion.py: Eq. (10) and its special cases, the samplers against an exact
eps oracle, respacing, the ADM UNet's official key set and computation, training, resume, errors;
streamed evaluation; the paper's path: experts trained in separate runs on separate datasets
(face presets, CLIP text expert) composed at sampling from their checkpoints, under torchrun,
with random-weight stand-ins for CLIP, Inception and LPIPS at the torch-hub cache paths.

The ADM fixtures (sha256 of the ordered "key:shape" list, parameter counts, outputs under
deterministic weights) were computed once with guided-diffusion's own create_model() (the
guided_diffusion package of PyPI's guided-diffusion-sdk 1.0.0, a copy of openai/guided-diffusion)
and checked again against openai/guided-diffusion's unet.py itself (bit-identical outputs, strict
loads both ways); the tests need neither that code nor the network.
"""

import gzip
import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import types
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
import compose_diffusion as cd  # noqa: E402

from test_data import fake_celebamask, fake_mm_celeba  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Eq. (10) and its special cases
# ---------------------------------------------------------------------------------------------

def rand_eps(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 4, 4, generator=g) for _ in range(n)]


def test_compose_eps_is_eq10_by_hand():
    cond, null = rand_eps(3, 0), rand_eps(3, 1)
    a, w = [0.2, 0.5, 0.3], [1.5, 2.0, 4.0]
    by_hand = (1.5 * cond[0] + 2.0 * cond[1] + 4.0 * cond[2]
               - (1.5 + 2.0 + 4.0 - 1) * (0.2 * null[0] + 0.5 * null[1] + 0.3 * null[2]))
    assert torch.allclose(cd.compose_eps(cond, null, a, w), by_hand, atol=1e-6)
    # the coefficients sum to one: identical predictions compose to themselves
    same = torch.randn(2, 3, 4, 4)
    assert torch.allclose(cd.compose_eps([same] * 3, [same] * 3, a, w), same, atol=1e-5)


def test_one_expert_is_classifier_free_guidance_exactly():
    (c,), (u,) = rand_eps(1, 2), rand_eps(1, 3)
    for s in (0.0, 1.0, 2.5, 7.0):
        cfg = (1 + s) * c - s * u                                    # Eq. (11)
        assert torch.equal(cd.compose_eps([c], [u], [1.0], [1 + s]), cfg)


def test_w_one_and_uniform_a_is_corrected_eq8():
    n = 3
    cond, null = rand_eps(n, 4), rand_eps(n, 5)
    a = [1 / n] * n
    reliable = sum(aj * e for aj, e in zip(a, null))
    # Eq. (8) with its inner sum from j = 1 (the printed j = i is a typo; supp. Eq. 18)
    eq8 = reliable + sum(cond[i] - reliable for i in range(n))
    assert torch.allclose(cd.compose_eps(cond, null, a, [1.0] * n), eq8, atol=1e-6)
    # and the printed j = i reading differs, so the test can tell them apart
    typo = reliable + sum(cond[i] - sum(a[j] * null[j] for j in range(i, n)) for i in range(n))
    assert not torch.allclose(typo, eq8, atol=1e-3)


@pytest.mark.parametrize("a,w,words", [([0.7, 0.7], [1, 1], "sum to 1"),
                                       ([1.2, -0.2], [1, 1], "non-negative"),
                                       ([0.5, 0.5], [0.5, 2], "at least 1")])
def test_invalid_reliability_or_guidance_is_one_sentence(a, w, words):
    with pytest.raises(common.UserError, match=words):
        cd.compose_eps(rand_eps(2), rand_eps(2), a, w)


# ---------------------------------------------------------------------------------------------
# Schedules and respacing
# ---------------------------------------------------------------------------------------------

def test_schedules_match_adm_formulas():
    lin = cd.make_betas("linear", 1000)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    assert cd.make_betas("linear", 4000)[-1] == pytest.approx(0.02 / 4)
    cos = cd.Schedule.make("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cos.abar[499] == pytest.approx(f(500) / f(0), rel=1e-9)
    assert cos.betas.max() <= 0.999


def test_respacing_keeps_original_timestep_indices():
    assert cd.space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    kept = cd.space_timesteps(300, "10,15,20")  # ADM docstring example: 3 sections of 100
    assert [sum(lo <= k < lo + 100 for k in kept) for lo in (0, 100, 200)] == [10, 15, 20]
    assert kept[0] == 0 and kept[9] == 99 and kept[10] == 100 and kept[-1] == 299
    full = cd.Schedule.make("linear", 1000)
    ref = cd.sampler_schedule(full, "50")
    assert np.allclose(ref.abar, full.abar[ref.timestep_map])       # same noise levels
    seen = []

    class Recorder(nn.Module):
        def forward(self, x, t):
            seen.append(t.tolist())
            return torch.zeros_like(x)

        def null_cond(self, b, device):
            return {}

    comp = cd.Composition([cd.Expert("rec", Recorder(), full)], [(0, {})], [1.0], [1.0], ref)
    cd.sample(comp.eps_and_var, ref, (2, 3, 2, 2))
    assert [s[0] for s in seen] == list(ref.timestep_map[::-1])   # original indices, descending
    assert all(len(set(s)) == 1 for s in seen)


# ---------------------------------------------------------------------------------------------
# Samplers with an exact eps for Gaussian data x0 ~ N(mu, s^2 I):
#   E[eps | z_t] = sqrt(1 - abar) (z_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)
# ---------------------------------------------------------------------------------------------

class GaussianOracle(nn.Module):
    """Exact eps of Gaussian data at ORIGINAL timestep t (fractional t interpolates in log abar),
    so a sampler that handed it respaced indices would land on the wrong distribution."""

    def __init__(self, sched, mu, s):
        super().__init__()
        self.log_abar, self.mu, self.s = np.log(sched.abar), mu, s

    def forward(self, x, t):
        ab = np.exp(np.interp(t.double().cpu().numpy(), np.arange(len(self.log_abar)),
                              self.log_abar))
        ab = torch.as_tensor(ab, dtype=torch.float32).view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.s ** 2 + 1 - ab)

    def null_cond(self, b, device):
        return {}


# Both are exact only as steps -> inf: DDPM's fixed-small variance (beta_tilde) gives a std 1.4%
# low at 1000 steps; DDIM (first order) 1.8% low at 250 linear steps (8.5% at 50).
@pytest.mark.parametrize("sampler,steps,schedule", [("ddpm", "1000", "linear"),
                                                    ("ddim", "250", "linear"),
                                                    ("ddim", "ddim250", "cosine")])
def test_samplers_recover_gaussian_mean_and_variance(sampler, steps, schedule):
    mu, s = 0.4, 0.3
    full = cd.Schedule.make(schedule, 1000)
    ref = cd.sampler_schedule(full, steps)
    comp = cd.Composition([cd.Expert("oracle", GaussianOracle(full, mu, s), full)], [(0, {})],
                          [1.0], [1.0], ref)
    x = cd.sample(comp.eps_and_var, ref, (4096, 3, 2, 2), sampler, clip=False,
                  generator=torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(s, rel=0.03)


def test_schedule_matching_composes_models_on_other_schedules():
    # supp. §7.2: a cosine-schedule expert inside a linear-schedule sampler gets matched noise
    # levels; the oracle is exact only if it is asked at the right abar.
    mu, s = -0.2, 0.5
    lin, cos = cd.Schedule.make("linear", 1000), cd.Schedule.make("cosine", 1000)
    ref = cd.sampler_schedule(lin, "250")
    comp = cd.Composition([cd.Expert("cos", GaussianOracle(cos, mu, s), cos)], [(0, {})],
                          [1.0], [1.0], ref)
    assert not np.allclose(comp.model_t[0], ref.timestep_map)  # really matched, not copied
    x = cd.sample(comp.eps_and_var, ref, (4096, 3, 2, 2), "ddim", clip=False,
                  generator=torch.Generator().manual_seed(1))
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(s, rel=0.03)
    # an expert that never saw high noise levels (first half of a chain) is refused
    short = cd.Schedule(lin.betas[:400])
    with pytest.raises(common.UserError, match="noise schedule cannot reach"):
        cd.Composition([cd.Expert("short", GaussianOracle(short, mu, s), short)], [(0, {})],
                       [1.0], [1.0], ref)


# ---------------------------------------------------------------------------------------------
# Composition batching: one forward per model per step, cond and null rows together
# ---------------------------------------------------------------------------------------------

class Counting(nn.Module):
    def __init__(self, offset):
        super().__init__()
        self.offset, self.calls = offset, []

    def forward(self, x, t, cond_vec=None):
        self.calls.append(x.shape[0])
        return torch.tanh(x) * 0.1 + self.offset * cond_vec[:, :1, None, None]

    def null_cond(self, b, device):
        return {"cond_vec": torch.zeros(b, 2)}


def test_one_forward_per_model_per_step_equals_unbatched_eq10():
    full = cd.Schedule.make("linear", 1000)
    ref = cd.sampler_schedule(full, "5")
    m1, m2 = Counting(1.0), Counting(-2.0)
    b = 3
    c1, c2, c3 = ({"cond_vec": torch.full((b, 2), v)} for v in (0.5, 1.5, -1.0))
    # expert 0 serves two conditions (one model, several conditions in one batch)
    comp = cd.Composition([cd.Expert("a", m1, full), cd.Expert("b", m2, full)],
                          [(0, c1), (0, c3), (1, c2)], [2.0, 1.5, 3.0], [0.25, 0.75], ref)
    x = torch.randn(b, 3, 2, 2)
    eps, _ = comp.eps_and_var(x, 2)
    assert m1.calls == [3 * b] and m2.calls == [2 * b]               # one call each
    t = torch.full((b,), int(ref.timestep_map[2]))
    by_hand = cd.compose_eps([m1(x, t, **c1), m1(x, t, **c3), m2(x, t, **c2)],
                             [m1(x, t, **m1.null_cond(b, None)), m2(x, t, **m2.null_cond(b, None))],
                             [0.25, 0.75], [2.0, 1.5, 3.0])
    assert torch.allclose(eps, by_hand, atol=1e-6)
    # reliability 0 for a model: its null is never computed (models without null training)
    m1.calls.clear(), m2.calls.clear()
    cd.Composition([cd.Expert("a", m1, full), cd.Expert("b", m2, full, has_null=False)],
                   [(0, c1), (1, c2)], [2.0, 2.0], [1.0, 0.0], ref).eps_and_var(x, 0)
    assert m1.calls == [2 * b] and m2.calls == [b]
    with pytest.raises(common.UserError, match="never trained with a null"):
        cd.Composition([cd.Expert("a", m1, full), cd.Expert("b", m2, full, has_null=False)],
                       [(0, c1), (1, c2)], [2.0, 2.0], [0.5, 0.5], ref)


def test_the_learned_variance_is_that_of_the_first_condition():
    """A learn_sigma model serving two conditions returns one v block per condition: the
    sampler's variance is the first condition's (as the official code takes the first row's),
    also when the second expert learns sigma and the first does not."""
    full = cd.Schedule.make("linear", 1000)
    ref = cd.sampler_schedule(full, "5")

    class Sigma(nn.Module):
        learn_sigma = True

        def forward(self, x, t, cond_vec=None):
            v = cond_vec[:, :1, None, None].expand_as(x)              # v = the condition's value
            return torch.cat([torch.zeros_like(x), v], 1)

        def null_cond(self, b, device):
            return {"cond_vec": torch.zeros(b, 2)}

    b, x = 2, torch.randn(2, 3, 2, 2)
    first, second = ({"cond_vec": torch.full((b, 2), v)} for v in (0.5, -0.25))
    _, v = cd.Composition([cd.Expert("s", Sigma(), full)], [(0, first), (0, second)],
                          [2.0, 2.0], [1.0], ref).eps_and_var(x, 1)
    assert torch.equal(v, torch.full_like(x, 0.5))
    _, v = cd.Composition([cd.Expert("plain", Counting(1.0), full), cd.Expert("s", Sigma(), full)],
                          [(0, first), (1, second)], [2.0, 2.0], [0.5, 0.5], ref
                          ).eps_and_var(x, 1)
    assert v is None                                  # the first condition's expert fixes it


# ---------------------------------------------------------------------------------------------
# ADM UNet: official key set, parameter counts, computation
# ---------------------------------------------------------------------------------------------

ADM_FIXTURES = {  # name: (tensors, parameters, sha256 of the official "key:shape" lines)
    "adm64": (541, 295_904_454, "a48a5b95ed98ae0f354c70c4846a4fa6be18582a651982fa00bbfe18f539e72d"),
    "adm128": (493, 421_529_606, "f1123836c80c9c01cd28c9f066edc60f23a3c756e45026656951c74bf0d49f8f"),
    "adm256": (567, 553_838_086, "a578ceeaaa7287ec5892766ca3260fdb5ce01320a8aec17bc993e2724e445afc"),
    "adm256-uncond": (566, 552_814_086,
                      "7851a44e799b06acd518dc9daf8a6d4d9e66b26f2d0b42dee136945b8958bc67"),
}
SMALL = {  # flags, tensors, params, sha256, official eps: sum, abs-sum, [0,0,5,7], [1,-1,30,2]
    "new_order": (dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                       attention_resolutions="16,8", num_head_channels=32, learn_sigma=True,
                       class_cond=True, use_scale_shift_norm=True, resblock_updown=True,
                       use_new_attention_order=True),
                  145, 956_358, "41c6c8b0f7c5af39c1c552daa7abbb57e1823b68e3eed566aea95731c09191df",
                  (218.278152, 341.933105, -0.024852, 0.042362)),
    "legacy": (dict(image_size=32, num_channels=32, num_res_blocks=2, channel_mult="1,2",
                    attention_resolutions="16", num_heads=2, learn_sigma=False, class_cond=False,
                    use_scale_shift_norm=False, resblock_updown=False,
                    use_new_attention_order=False),
               184, 1_002_883, "12f47c9d9f9543ecfd25ee77dd64f1ed6f598487b6a1455d5af163166b452723",
               (263.447510, 263.447510, 0.034407, 0.046705)),
}


def key_digest(state):
    return hashlib.sha256("\n".join(f"{k}:{tuple(v.shape)}" for k, v in state.items())
                          .encode()).hexdigest()


@pytest.mark.parametrize("name", list(ADM_FIXTURES))
def test_official_adm_configs_have_the_official_keys_and_counts(name):
    tensors, params, digest = ADM_FIXTURES[name]
    with torch.device("meta"):
        model = cd.UNet(**cd.ADM_CONFIGS[name])
    state = model.state_dict()
    assert len(state) == tensors and common.count_params(model) == params == cd.ADM_PARAMS[name]
    assert key_digest(state) == digest


def deterministic_weights(model):
    with torch.no_grad():
        for k, (key, v) in enumerate(model.state_dict().items()):
            n = v.numel()
            v.copy_((0.05 * torch.sin(0.37 * torch.arange(n, dtype=torch.float64) + k))
                    .reshape(v.shape).float())


@pytest.mark.parametrize("name", list(SMALL))
def test_small_adm_loads_strictly_and_computes_the_official_eps(name):
    flags, tensors, params, digest, expected = SMALL[name]
    model = cd.UNet(**flags)
    state = model.state_dict()
    assert len(state) == tensors and common.count_params(model) == params
    assert key_digest(state) == digest
    fresh = cd.UNet(**flags)
    fresh.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    deterministic_weights(model)
    model.eval()
    x = torch.sin(0.11 * torch.arange(2 * 3 * 32 * 32, dtype=torch.float64)).reshape(2, 3, 32, 32)
    kw = {"y": torch.tensor([7, 912])} if flags["class_cond"] else {}
    with torch.no_grad():
        out = model(x.float(), torch.tensor([3, 731]), **kw)
    got = (out.sum().item(), out.abs().sum().item(), out[0, 0, 5, 7].item(), out[1, -1, 30, 2].item())
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_our_condition_inputs_leave_the_adm_keys_alone_and_null_means_absent():
    flags = dict(SMALL["new_order"][0])
    plain = cd.UNet(**flags)
    ext = cd.UNet(**flags, map_channels=4, cond_dim=8)
    extra = set(ext.state_dict()) - set(plain.state_dict())
    assert extra == {"cond_proj.weight", "cond_proj.bias"}
    assert ext.state_dict()["input_blocks.0.0.weight"].shape == (32, 7, 3, 3)
    # a null label / zero vector adds nothing: same eps as with the condition inputs absent
    deterministic_weights(ext)
    ext.eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 500])
    with torch.no_grad():
        a = ext(x, t, **ext.null_cond(2, "cpu"))
        b = ext(x, t)
        c = ext(x, t, y=torch.tensor([3, -1]), cond_vec=torch.randn(2, 8))
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ---------------------------------------------------------------------------------------------
# Training, resume, command line
# ---------------------------------------------------------------------------------------------

TINY = ["--size", "16", "--num_channels", "32", "--batch_size", "4", "--sample_steps", "2",
        "--experts", "label,caption", "--log_every", "1", "--eval_n", "4"]


def tiny_args(extra=()):
    return common.parse_args(cd.build_parser(), cd.PRESETS, "compose_diffusion", "shapes",
                             TINY + list(extra))


def test_training_steps_lower_the_denoising_loss():
    torch.manual_seed(0)
    args = tiny_args()
    model = cd.Trained(("map", "text"), args, 5)
    ds = cd.load_dataset(args, "train")
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    sched = cd.Schedule.make("cosine", 1000)
    cond = cd.condition_inputs(model, batch)

    def fixed_loss():  # same t and noise before and after
        torch.manual_seed(123)
        with torch.no_grad():
            return cd.diffusion_loss(model, batch["image"], cond, sched).item()

    before = fixed_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(10):
        loss = cd.diffusion_loss(model, batch["image"], cd.condition_inputs(model, batch), sched)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.7 * before


class FixedOutput(nn.Module):
    """A "model" whose output is a given tensor (eps, and v when learn_sigma), for losses by hand."""

    def __init__(self, out):
        super().__init__()
        self.out = nn.Parameter(out.clone())
        self.seen = []

    def forward(self, x, t, **cond):
        self.seen.append((x.clone(), t.clone(), cond))
        return self.out


def test_diffusion_loss_is_l_simple_plus_the_scaled_vlb_by_hand():
    sched = cd.Schedule.make("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 3, 2, 2, generator=g) * 2 - 1
    noise, t = torch.randn(3, 3, 2, 2, generator=g), torch.tensor([0, 10, 700])
    eps, v = torch.randn(3, 3, 2, 2, generator=g), torch.rand(3, 3, 2, 2, generator=g) * 2 - 1
    # L_simple alone (no variance channels): the model sees z_t of DDPM Eq. 4
    plain = FixedOutput(eps)
    loss = cd.diffusion_loss(plain, x0, {}, sched, t, noise)
    ab = torch.tensor(sched.abar[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    assert torch.allclose(plain.seen[0][0], x_t, atol=1e-6)
    assert plain.seen[0][1].tolist() == [0, 10, 700]
    assert loss.item() == pytest.approx(((eps - noise) ** 2).mean().item(), rel=1e-6)
    # hybrid: + L_vlb (KL to the true posterior, bits; the discretised NLL at t = 0) * T / 1000
    hybrid = FixedOutput(torch.cat([eps, v], 1))
    loss = cd.diffusion_loss(hybrid, x0, {}, sched, t, noise)
    d = lambda a: torch.tensor(a[t.numpy()], dtype=torch.float64).view(-1, 1, 1, 1)  # noqa: E731
    x0d, x_td, epsd, vd = x0.double(), x_t.double(), eps.double(), v.double()
    x0_hat = (x_td - (1 - d(sched.abar)).sqrt() * epsd) / d(sched.abar).sqrt()
    c1, c2 = d(sched.post_coef1), d(sched.post_coef2)
    mean, true_mean = c1 * x0_hat + c2 * x_td, c1 * x0d + c2 * x_td
    logvar = (vd + 1) / 2 * d(np.log(sched.betas)) + (1 - vd) / 2 * d(sched.post_logvar)
    true_logvar = d(sched.post_logvar)
    kl = 0.5 * (-1 + logvar - true_logvar + (true_logvar - logvar).exp()
                + (true_mean - mean) ** 2 * (-logvar).exp())
    nll = cd.discretized_gaussian_nll(x0d, mean, 0.5 * logvar)
    per_item = torch.stack([nll[0].mean(), kl[1].mean(), kl[2].mean()]) / math.log(2)
    expected = ((eps - noise) ** 2).mean().item() + per_item.mean().item() * 1000 / 1000
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # the mean is frozen in L_vlb: eps gets the gradient of L_simple only
    loss.backward()
    assert torch.allclose(hybrid.out.grad[:, :3], 2 * (eps - noise) / eps.numel(), atol=1e-7)
    assert hybrid.out.grad[:, 3:].abs().sum() > 0
    # T / 1000 scaling: the first 500 steps of the same chain weigh the same L_vlb by one half
    half = cd.Schedule(sched.betas[:500])
    t2, mse = torch.tensor([0, 10, 400]), ((eps - noise) ** 2).mean().item()
    vb = [cd.diffusion_loss(FixedOutput(torch.cat([eps, v], 1)), x0, {}, s, t2, noise).item() - mse
          for s in (sched, half)]
    assert vb[0] > 0.01 and vb[1] == pytest.approx(vb[0] / 2, rel=1e-5)


def test_discretized_nll_is_the_bin_probability():
    mean, log_scale = torch.tensor([0.1]), torch.tensor([math.log(0.2)])
    x = torch.tensor([0.0])
    normal = torch.distributions.Normal(0.1, 0.2)
    p = normal.cdf(x + 1 / 255) - normal.cdf(x - 1 / 255)
    assert cd.discretized_gaussian_nll(x, mean, log_scale).item() == pytest.approx(
        -math.log(p.item()), rel=2e-3)   # tanh approximation of the CDF
    edge, low = torch.tensor([-1.0]), torch.distributions.Normal(-0.9, 0.2)
    assert cd.discretized_gaussian_nll(edge, torch.tensor([-0.9]), log_scale).item() == \
        pytest.approx(-math.log(low.cdf(edge + 1 / 255).item()), rel=2e-3)  # bin 0 from -inf


def test_resume_is_exact(tmp_path, monkeypatch):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    common_flags = TINY + ["--ckpt_every", "2", "--sample_every", "100", "--ema_decay", "0.25",
                           "--batch_size", "2"]
    decays, update = [], common.EMA.update
    monkeypatch.setattr(common.EMA, "update", lambda self, model, decay=None: (
        decays.append(decay), update(self, model, decay)))
    cd.main(common_flags + ["--iters", "3", "--out_dir", full])
    # every expert's EMA after each of its steps, warm-up min(decay, (1 + it) / (10 + it))
    assert decays == pytest.approx([d for d in (0.1, 2 / 11, 0.25) for _ in range(2)])
    cd.main(common_flags + ["--iters", "1", "--out_dir", part])
    cd.main(common_flags + ["--iters", "3", "--out_dir", part, "--resume"])
    a = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert a["iter"] == b["iter"] == 3
    for name in ("model_label", "ema_caption", "model_caption"):
        for k in a["state"][name]:
            assert torch.equal(a["state"][name][k], b["state"][name][k]), (name, k)
    logs = [json.loads(line) for line in open(os.path.join(part, "log.jsonl"))]
    assert [r["iter"] for r in logs] == [1, 2, 3]
    # the config holds what was trained, not how this command ran
    assert b["config"]["experts"] == "label,caption" and b["config"]["size"] == 16
    assert not set(common.RUN_MODE_FLAGS) & set(b["config"])

    assert os.path.exists(os.path.join(full, "samples_000003.png"))


def test_a_signal_on_a_sampling_step_still_writes_that_steps_grid(tmp_path, monkeypatch):
    """The grid of a --sample_every step comes before the stop: a resume starts after it."""
    out = str(tmp_path / "run")
    step = cd.train_step

    def signalled(args, rt, index, *rest):
        if index == 1:                          # the second expert's step, iteration 1
            signal.raise_signal(signal.SIGTERM)
        return step(args, rt, index, *rest)

    monkeypatch.setattr(cd, "train_step", signalled)
    with pytest.raises(common.Stopped):
        cd.main(TINY + ["--iters", "5", "--sample_every", "1", "--out_dir", out])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter"] == 1
    assert os.path.exists(os.path.join(out, "samples_000001.png"))


def test_dry_run_prints_exact_counts(capsys):
    cd.main(["--dry_run"])
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"]
    args = common.parse_args(cd.build_parser(), cd.PRESETS, "compose_diffusion", "shapes", [])
    assert counts == {n: common.count_params(m) for n, m in cd.build_experts(args, 5).items()}
    # the folder preset's class expert is ADM's ImageNet-64 trunk: the official count exactly
    cd.main(["--data", "folder", "--dry_run"])
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"]
    assert counts == {"class": cd.ADM_PARAMS["adm64"]}


def test_dry_run_flops_on_shapes_only_equal_a_real_training_step(capsys):
    args = tiny_args([])
    with torch.device("meta"):
        meta = cd.build_experts(args, 5)
    real = cd.build_experts(args, 5)
    assert cd.training_flops(args, meta["label"]) == cd.training_flops(args, real["label"]) > 0
    # the tiny text tower's attention may take another kernel on shapes only: within 1 %
    flops = [cd.training_flops(args, m["caption"]) for m in (meta, real)]
    assert abs(flops[0] - flops[1]) < 0.01 * flops[1]
    cd.main(["--dry_run"])
    lines = capsys.readouterr().out.strip().splitlines()
    expected = cd.training_flops(args, real["label"]) / 1e9
    assert lines[0] == (f"expert label: one training image costs {expected:,.1f} GFLOP (forward "
                        f"and backward, convolutions and matrix multiplies)")


def test_bad_input_is_one_sentence_and_exit_2(tmp_path):
    with pytest.raises(common.UserError, match="--experts"):
        cd.main(["--experts", "nope", "--dry_run"])
    with pytest.raises(common.UserError, match="no checkpoint"):
        cd.main(TINY + ["--eval", "--out_dir", str(tmp_path)])
    with pytest.raises(common.UserError, match="--size 24"):
        cd.load_dataset(tiny_args(["--size", "24"]), "train")
    r = subprocess.run([sys.executable, "compose_diffusion.py", "--dry_run", "--sample_steps",
                        "abc"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --sample_steps abc must")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_null_caption_rows_are_finite_and_independent_of_the_batch():
    # the official face model gates the embedding on the WHOLE batch's sum; ours is per row: a
    # row of padding only (the null caption) gives the zero vector, whatever the other rows
    torch.manual_seed(0)
    model = cd.Trained(("text",), tiny_args(), 5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero-initialised layers left
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([10, 500, 990])
    tokens = model.text.tokens(["a red circle", "", "a blue square above a red circle"])
    tokens[1] = 0  # the null caption
    vec = model.text(tokens)
    assert vec[1].abs().sum() == 0 and torch.allclose(vec[[0, 2]].norm(dim=1), torch.ones(2))
    with torch.no_grad():
        mixed = model(x, t, cond_tokens=tokens)
        alone = model(x[1:2], t[1:2], **model.null_cond(1, "cpu"))
        texted = model(x[:1], t[:1], cond_tokens=tokens[:1])
    assert torch.isfinite(mixed).all()
    assert torch.allclose(mixed[1:2], alone, atol=1e-5) and torch.allclose(mixed[:1], texted, atol=1e-5)
    assert not torch.allclose(texted, model(x[:1], t[:1], **model.null_cond(1, "cpu")), atol=1e-4)


def test_official_checkpoint_joins_the_composition_with_its_own_weight_and_reliability(
        tmp_path, monkeypatch):
    # a guided-diffusion state dict (official key names, class-conditional), loaded strictly as a
    # third expert beside the two trained ones, with its own w and a (one per composed expert)
    flags = dict(SMALL["new_order"][0], image_size=16, attention_resolutions="8")
    monkeypatch.setitem(cd.ADM_CONFIGS, "tiny", flags)
    monkeypatch.setitem(cd.ADM_SCHEDULES, "tiny", "linear")
    path = str(tmp_path / "adm.pt")
    torch.manual_seed(0)
    adm = cd.UNet(**flags)
    with torch.no_grad():  # no zero-initialised output layer: eps depends on the class
        for p in adm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(adm.state_dict(), path)
    args = tiny_args(["--ckpt", path, "--ckpt_config", "tiny", "--ckpt_class", "3",
                      "--sample_steps", "10", "--guidance", "2"])
    models = cd.build_experts(args, 5)
    setup = cd.Setup(args, models, cd.Schedule.make("cosine", 1000), torch.device("cpu"))
    cd.load_official(args, setup, torch.device("cpu"))
    assert not setup.official.has_null
    assert setup.weights() == ([2.0] * 3, [0.5, 0.5, 0.0], 1.0)  # "uniform": experts with a null
    ds = cd.load_dataset(args, "test")
    batch = cd.test_batch(ds, 2, "cpu")
    comp = setup.composed(batch, [2.0, 2.0, 2.0], [0.5, 0.5, 0.0])
    assert len(comp.experts) == 3
    assert not np.allclose(comp.model_t[2], comp.ref.timestep_map)   # linear vs cosine: matched
    eps, _ = comp.eps_and_var(torch.randn(2, 3, 16, 16), 3)
    assert eps.shape == (2, 3, 16, 16) and torch.isfinite(eps).all()
    with pytest.raises(common.UserError, match="--ckpt_null_class"):
        setup.composed(batch, [2.0, 2.0, 2.0], [0.5, 0.0, 0.5])
    # Fig. 6's "class model as null": a stand-in null class (official: 0), a = 1 on the ADM
    # model and its own w = 5, on the experts' schedule: Eq. (10) by hand
    monkeypatch.setitem(cd.ADM_SCHEDULES, "tiny", "cosine")
    null_args = tiny_args(["--ckpt", path, "--ckpt_config", "tiny", "--ckpt_class", "3",
                           "--sample_steps", "10", "--ckpt_null_class", "0",
                           "--guidance", "2,2,5", "--reliability", "0,0,1"])
    cd.load_official(null_args, setup, torch.device("cpu"))
    setup.args = null_args
    w, a, low = setup.weights()
    assert (w, a) == ([2.0, 2.0, 5.0], [0.0, 0.0, 1.0])
    x, i = torch.randn(2, 3, 16, 16), 3
    eps, _ = setup.composed(batch, w, a, low).eps_and_var(x, i)
    t = torch.full((2,), int(setup.ref.timestep_map[i]))
    with torch.no_grad():
        by_hand = (2 * models["label"](x, t, **setup.cond("label", batch))[:, :3]
                   + 2 * models["caption"](x, t, **setup.cond("caption", batch))[:, :3]
                   + 5 * setup.official.model(x, t, y=torch.full((2,), 3))[:, :3]
                   - 8 * setup.official.model(x, t, y=torch.zeros(2, dtype=torch.long))[:, :3])
    assert torch.allclose(eps, by_hand, rtol=1e-4, atol=1e-4) and by_hand.abs().mean() > 0.01
    monkeypatch.setitem(cd.ADM_CONFIGS, "tiny", dict(flags, image_size=32))
    with pytest.raises(common.UserError, match="share z_t's shape"):
        cd.check_args(args)
    monkeypatch.setitem(cd.ADM_CONFIGS, "tiny", flags)
    # another model's file (other widths: the sizes differ, the keys are the same) and junk
    torch.save(cd.UNet(**dict(flags, num_channels=64)).state_dict(), path)
    with pytest.raises(common.UserError, match=r"0 missing, 0 unexpected and \d+ differently "
                                               r"shaped tensors; time_embed.0.weight is \(256, 64\), "
                                               r"--ckpt_config tiny wants \(128, 32\)"):
        cd.load_official(args, setup, torch.device("cpu"))
    torch.save({"junk": torch.zeros(1)}, path)
    with pytest.raises(common.UserError, match="does not match"):
        cd.load_official(args, setup, torch.device("cpu"))


class PooledPixels(nn.Module):
    """A stand-in feature network for FID's protocol: 4x4 average-pooled pixels (48 features,
    scaled up so that FID's 3 rounded decimals show them). A random Inception would spend most
    of a test's time in its forwards and FID's 2048-d matrix square roots."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(100.0))  # inception_features reads the device

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) * self.scale


def test_eval_on_real_data_reports_fid_lpips_and_ssim_per_method(tmp_path, monkeypatch):
    # a folder of two classes -> a class expert; random metric networks (built once, as --eval
    # does), so the numbers are meaningless but the protocol runs end to end over two batches
    from PIL import Image
    rng = np.random.default_rng(0)
    for sub in ("cats", "dogs"):
        os.makedirs(tmp_path / "data" / sub)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                tmp_path / "data" / sub / f"{k}.png")
    inception, lpips = PooledPixels(), common.LPIPS("alex", False)
    built = []
    monkeypatch.setattr(common, "FIDInception", lambda pretrained: built.append(1) or inception)
    monkeypatch.setattr(common, "LPIPS", lambda net, pretrained: lpips)
    args = common.parse_args(cd.build_parser(), cd.PRESETS, "compose_diffusion", "folder",
                             ["--data", "folder", "--data_dir", str(tmp_path / "data"),
                              "--out_dir", str(tmp_path / "run"), "--size", "32", "--eval"]
                             + SHRINK[:-6] + ["--eval_n", "2", "--batch_size", "1"])
    setup = cd.Setup(args, cd.build_experts(args, 1, 2), cd.Schedule.make("cosine", 1000),
                     torch.device("cpu"))
    os.makedirs(args.out_dir)
    one = common.Runtime(torch.device("cpu"), torch.float32)  # one process
    result = cd.evaluate(args, setup, one)["results"]
    assert list(result) == ["class expert alone"] and built == [1]
    assert set(result["class expert alone"]) == {"lpips_to_gt", "ssim_to_gt", "fid"}
    assert all(math.isfinite(v) and v > 0 for v in result["class expert alone"].values())
    # the protocol itself: a sampler that returns each item's own ground truth scores FID 0,
    # LPIPS 0 and SSIM 1 (same items, same pairing); the same images paired with the wrong items
    # keep FID 0 (up to rounding) but not LPIPS or SSIM
    test = cd.load_dataset(args, "test")
    for shift, paired in ((0, True), (1, False)):
        monkeypatch.setattr(cd, "generate", lambda args, comp, n, device, seed: cd.test_batch(
            test, n, device, (seed - 1000 + shift) % 2)["image"])  # batches of 1 of 2 items
        got = cd.evaluate(args, setup, one)["results"]["class expert alone"]
        assert abs(got["fid"]) <= 0.01 < result["class expert alone"]["fid"]
        assert (got["lpips_to_gt"] == 0) == paired and (got["ssim_to_gt"] == 1) == paired


def test_eval_streams_so_memory_is_set_by_the_batch_not_the_items(tmp_path, monkeypatch):
    # every generated batch is dropped before the next one is made: at most one batch of images
    # is alive, whatever --eval_n (a list of all samples would hold eval_n)
    import weakref
    run = str(tmp_path / "run")
    cd.main(TINY + ["--iters", "1", "--out_dir", run, "--sample_every", "100"])
    alive, peak, made = {}, [0], [0]
    generate = cd.generate

    def tracked(args, comp, n, device, seed):
        images = generate(args, comp, n, device, seed)
        alive[id(images)] = n
        weakref.finalize(images, alive.pop, id(images))
        peak[0], made[0] = max(peak[0], sum(alive.values())), made[0] + n
        return images

    monkeypatch.setattr(cd, "generate", tracked)
    cd.main(TINY + ["--out_dir", run, "--eval", "--eval_n", "16"])
    assert made[0] == 3 * 16 and peak[0] == 4  # 3 methods x 16 items, batches of 4


# ---------------------------------------------------------------------------------------------
# Sampling controls, condition dropout, samplers' variance, the shapes metrics, bench
# ---------------------------------------------------------------------------------------------

def record_compositions(monkeypatch):
    """cd.generate replaced by a recorder of (guidance, reliability, expert names, seed) that
    returns images made from the seed only."""
    calls = []

    def fake(args, comp, n, device, seed):
        calls.append((list(comp.w), list(comp.a), [e.name for e in comp.experts], seed,
                      [sorted(c) for _, c in comp.conditions]))
        return torch.full((n, 3, args.size, args.size), float(seed) / 10)
    monkeypatch.setattr(cd, "generate", fake)
    return calls


def test_sample_grids_and_sweeps_compose_what_the_flags_say(tmp_path, monkeypatch):
    args = tiny_args(["--guidance", "2,3", "--reliability", "0.25,0.75", "--out_dir",
                      str(tmp_path)])
    setup = cd.Setup(args, cd.build_experts(args, 5), cd.Schedule.make("cosine", 1000),
                     torch.device("cpu"))
    test = cd.load_dataset(args, "test")
    calls = record_compositions(monkeypatch)
    cd.sample_grids(args, setup, test, str(tmp_path / "experts.png"))
    # each expert alone with its own w_i (Eq. 11: a = 1), then Eq. (10) with the flags' w and a
    assert [c[:4] for c in calls] == [([2.0], [1.0], ["label"], 1), ([3.0], [1.0], ["caption"], 1),
                                      ([2.0, 3.0], [0.25, 0.75], ["label", "caption"], 1)]
    assert calls[2][4] == [["cond_map"], ["cond_tokens"]]   # each expert on its own condition
    calls.clear()
    cd.sweep_grids(args, setup, test)
    # Fig. 6: the reliability moves from the first expert to the last, w fixed; then w for all
    # experts, a fixed; the same z_T (seed 2) in every row
    assert [c[1] for c in calls[:5]] == [[1.0, 0.0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75],
                                         [0.0, 1.0]]
    assert all(c[0] == [2.0, 3.0] for c in calls[:5])
    assert [c[0] for c in calls[5:]] == [[g, g] for g in (1.0, 2.0, 3.0, 5.0)]
    assert all(c[1] == [0.25, 0.75] for c in calls[5:]) and {c[3] for c in calls} == {2}
    # the sweep's rows are its conditions and the generated rows, the conditions those of items
    # n.. of the test set (the main grid shows items 0..)
    lines = open(tmp_path / "sweeps.txt").read().splitlines()
    batch = cd.test_batch(test, 4, "cpu", 4)
    assert lines[2:] == [f"{k}: {c}" for k, c in enumerate(batch["caption"])]


def test_generate_draws_z_T_from_the_seed_and_the_sampler_flags_reach_the_sampler(monkeypatch):
    args = tiny_args(["--sample_steps", "3", "--sampler", "ddpm"])
    model = cd.Trained(("map",), args, 5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sched = cd.Schedule.make("cosine", 1000)
    ref = cd.sampler_schedule(sched, "3")
    comp = cd.Composition([cd.Expert("m", model, sched)], [(0, model.null_cond(2, "cpu"))],
                          [1.0], [1.0], ref)
    out = {}
    for variance in ("small", "large"):
        args.fixed_variance = variance
        out[variance] = cd.generate(args, comp, 2, "cpu", 5)
    assert torch.equal(out["small"], cd.generate(tiny_args(["--sample_steps", "3", "--sampler",
                                                            "ddpm"]), comp, 2, "cpu", 5))
    assert not torch.allclose(out["small"], out["large"], atol=1e-3)
    assert not torch.allclose(out["small"], cd.generate(args, comp, 2, "cpu", 6), atol=1e-3)
    args.sampler, args.eta = "ddim", 0.0
    assert torch.equal(cd.generate(args, comp, 2, "cpu", 5), cd.generate(args, comp, 2, "cpu", 5))


def test_ddpm_step_variance_fixed_small_large_and_learned():
    ref = cd.sampler_schedule(cd.Schedule.make("linear", 1000), "10")
    x, eps, noise, i = torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), 5
    mean = cd.ddpm_step(ref, x, i, eps, noise=torch.zeros_like(noise))
    std = lambda **k: (cd.ddpm_step(ref, x, i, eps, noise=noise, **k) - mean).item()  # noqa
    assert std() == pytest.approx(math.sqrt(ref.post_var[i]), rel=1e-5)        # beta_tilde
    assert std(variance="large") == pytest.approx(math.sqrt(ref.betas[i]), rel=1e-5)
    # learned (Improved DDPM Eq. 15): v = 1 is beta, v = -1 beta_tilde
    assert std(v=torch.ones(1, 1, 1, 1)) == pytest.approx(math.sqrt(ref.betas[i]), rel=1e-5)
    assert std(v=-torch.ones(1, 1, 1, 1)) == pytest.approx(math.sqrt(ref.post_var[i]), rel=1e-5)
    assert ref.betas[i] > 1.1 * ref.post_var[i]
    # the presets: fixed-small on shapes (our choice), ADM's fixed-large on the face data
    assert tiny_args().fixed_variance == "small"
    face = common.parse_args(cd.build_parser(), cd.PRESETS, "compose_diffusion", "shapes",
                             ["--data", "mm-celeba-hq", "--dry_run"])
    assert face.fixed_variance == "large"


def test_ddim_step_by_hand_with_eta():
    ref = cd.sampler_schedule(cd.Schedule.make("cosine", 1000), "10")
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(2, 3, 2, 2, generator=g) * 0.3 for _ in range(3))
    i, eta = 5, 0.5
    ab, prev = ref.abar[i], ref.abar_prev[i]
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    sigma = eta * math.sqrt((1 - prev) / (1 - ab) * (1 - ab / prev))       # DDIM Eq. 16
    by_hand = math.sqrt(prev) * x0 + math.sqrt(1 - prev - sigma ** 2) * eps + sigma * noise
    got = cd.ddim_step(ref, x, i, eps, eta, clip=False, noise=noise)
    assert torch.allclose(got, by_hand, atol=1e-6) and sigma > 0.01
    # clip=True (ADM's clip_denoised): x0 clamped to [-1, 1] and eps re-derived from it
    x0c = x0.clamp(-1, 1)
    epsc = (x - math.sqrt(ab) * x0c) / math.sqrt(1 - ab)
    clipped = math.sqrt(prev) * x0c + math.sqrt(1 - prev - sigma ** 2) * epsc + sigma * noise
    assert (x0.abs() > 1).any()
    assert torch.allclose(cd.ddim_step(ref, x, i, eps, eta, noise=noise), clipped, atol=1e-6)


def test_clip_text_expert_trains_on_the_image_embedding_and_samples_on_the_text():
    # supp. §7.3 (Eq. 20): CLIP image embedding of the training image, text embedding at sampling
    class FakeClip:
        def image(self, images):
            return torch.full((len(images), cd.CLIP_DIM), 1.0)

        def text(self, captions, truncate=False):
            return torch.full((len(captions), cd.CLIP_DIM), 2.0)

    args = tiny_args(["--experts", "caption", "--text_encoder", "clip", "--p_uncond", "0"])
    expert = cd.Trained(("text",), args, 5)
    recorder = FixedOutput(torch.zeros(2, 3, 16, 16))
    batch = {"text": {"image": torch.zeros(2, 3, 16, 16), "caption": ["a", "b"]}}
    rt = common.Runtime(torch.device("cpu"), torch.float32)
    cd.train_step(args, rt, 0, recorder, expert, batch, cd.Schedule.make("cosine", 1000),
                  FakeClip(), 0)
    assert recorder.seen[0][2]["cond_vec"].unique().tolist() == [1.0]          # image
    setup = cd.Setup(args, {"caption": expert}, cd.Schedule.make("cosine", 1000),
                     torch.device("cpu"), FakeClip())
    assert setup.cond("caption", batch["text"])["cond_vec"].unique().tolist() == [2.0]  # text
    no_caption = {"image": torch.zeros(2, 3, 16, 16)}  # a dataset without captions: the image
    assert setup.cond("caption", no_caption)["cond_vec"].unique().tolist() == [1.0]


def test_condition_dropout_nulls_each_condition_independently_with_p_uncond():
    cond = {"cond_map": torch.ones(4, 2, 3, 3), "y": torch.tensor([3, 3, 3, 3]),
            "cond_tokens": torch.full((4, 5), 7), "cond_vec": None}
    uniform = torch.tensor([[0.1, 0.9, 0.1], [0.9, 0.1, 0.9], [0.9, 0.9, 0.9], [0.1, 0.1, 0.1]])
    out = cd.drop_conditions(dict(cond), 0.5, uniform)
    assert out["cond_map"].flatten(1).mean(1).tolist() == [0, 1, 1, 0]       # column 0
    assert out["y"].tolist() == [3, -1, 3, -1]                               # column 1: null = -1
    assert out["cond_tokens"].sum(1).tolist() == [0, 35, 35, 0]              # column 2
    assert out["cond_vec"] is None
    # --p_uncond reaches the training step: p = 1 trains the null condition only
    args = tiny_args(["--experts", "label"])
    model = cd.Trained(("map",), args, 5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ds = cd.load_dataset(args, "train")
    batch = {"map": torch.utils.data.default_collate([ds[i] for i in range(4)])}
    sched, rt = cd.Schedule.make("cosine", 1000), common.Runtime(torch.device("cpu"), torch.float32)
    losses = {}
    for p in (0.0, 1.0):
        args.p_uncond = p
        losses[p] = cd.train_step(args, rt, 0, model, model, batch, sched, None, 0).item()
    t, noise, _ = cd.step_randomness(args, 0, 0, 4, (3, 16, 16))
    null = cd.diffusion_loss(model, batch["map"]["image"], model.null_cond(4, "cpu"), sched, t,
                             noise).item()
    assert losses[1.0] == pytest.approx(null, rel=1e-6) and losses[0.0] != pytest.approx(null)


def test_sampler_encodes_constant_conditions_once_and_gets_the_same_eps():
    torch.manual_seed(0)
    args = tiny_args()
    model = cd.Trained(("text",), args, 5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sched = cd.Schedule.make("cosine", 1000)
    ref = cd.sampler_schedule(sched, "4")
    cond = {"cond_tokens": model.text.tokens(["a red circle", "a blue square"])}
    comp = cd.Composition([cd.Expert("c", model, sched)], [(0, cond)], [3.0], [1.0], ref)
    calls = []
    model.text.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        eps = [comp.eps_and_var(x, i)[0] for i in (3, 2, 1)]
        t = torch.full((2,), int(ref.timestep_map[1]))
        by_hand = 3 * model(x, t, **cond)[:, :3] - 2 * model(x, t, **model.null_cond(2, "cpu"))[:, :3]
    assert len(calls) == 1 + 2       # once for the sampling run, then twice by hand
    assert torch.allclose(eps[2], by_hand, atol=1e-5)


def test_schedule_quantities_reach_the_device_once_as_float32(monkeypatch):
    sched = cd.Schedule.make("linear", 1000)
    model = FixedOutput(torch.zeros(2, 6, 4, 4))
    x0, t = torch.zeros(2, 3, 4, 4), torch.tensor([1, 2])
    cd.diffusion_loss(model, x0, {}, sched, t, torch.ones_like(x0))
    assert {k for k, _ in sched.device_buffers} == {"sqrt_abar", "sqrt_one_minus_abar",
                                                    "post_coef1", "post_coef2", "post_logvar",
                                                    "log_betas"}
    assert all(b.dtype == torch.float32 for b in sched.device_buffers.values())
    monkeypatch.setattr(torch, "as_tensor", lambda *a, **k: pytest.fail("copied again"))
    cd.diffusion_loss(model, x0, {}, sched, t, torch.ones_like(x0))
    got = cd.gather(sched, "sqrt_abar", t, x0)
    assert got.shape == (2, 1, 1, 1) and got.flatten().tolist() == pytest.approx(
        np.sqrt(sched.abar[[1, 2]]).tolist(), rel=1e-6)


def test_caption_metric_scores_noise_and_other_captions_near_zero():
    import data
    ds = cd.load_dataset(tiny_args(), "test")
    batch = cd.test_batch(ds, 64, "cpu")
    caps = batch["caption"]
    truth = data.shapes_caption_above_chance(batch["image"], caps)
    other = data.shapes_caption_above_chance(batch["image"], caps[1:] + caps[:1])
    noise = data.shapes_caption_above_chance(
        torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1, caps)
    flat = data.shapes_caption_above_chance(torch.zeros(64, 3, 16, 16), caps)
    assert truth["colour"] > 0.6 and truth["object"] > 0.35 and truth["shape"] > 0.15
    for k in ("colour", "shape", "object"):
        assert abs(other[k]) < 0.1 and abs(noise[k]) < 0.1 and flat[k] == 0, (k, other, noise)
    # the composition scores: the ground truth satisfies the map and the caption, noise neither
    gt = data.shapes_composition_scores(batch["image"], batch)
    assert gt["layout"] > 0.85 and gt["both"] == gt["layout"] and gt["layout_iou"] > 0.7
    assert gt["caption_colour"] == truth["colour"]
    noisy = data.shapes_composition_scores(torch.rand(64, 3, 16, 16) * 2 - 1, batch)
    assert noisy["both"] < 0.05 and noisy["layout_iou"] < 0.2
    # a layout that keeps each object's class but not the colour the caption names
    shifted = dict(batch, inst_mode=(batch["inst_mode"] + 1) % 2)
    assert data.shapes_composition_scores(batch["image"], shifted)["both"] < 0.05


def test_skin_and_hair_experts_read_their_region_of_the_face_parsing_map():
    import data
    args = tiny_args(["--experts", "hair"])
    ids = torch.zeros(2, 16, 16, dtype=torch.long)
    ids[:, :4] = 13                      # hair (CelebAMask-HQ ids)
    ids[:, 6:12, 4:12] = 1               # skin
    ids[:, 8, 6] = 2                     # nose: neither skin nor hair
    batch = {"label": ids, "sketch": torch.ones(2, 1, 16, 16)}
    hair = cd.Trained(("hair",), args, 19)
    skin = cd.Trained(("skin",), args, 19)
    assert hair.unet.input_blocks[0][0].in_channels == 3 + 1
    assert torch.equal(cd.condition_inputs(hair, batch)["cond_map"], (ids == 13).float()[:, None])
    assert torch.equal(cd.condition_inputs(skin, batch)["cond_map"], (ids == 1).float()[:, None])
    # several spatial conditions stack in SPATIAL's order; an inactive one is zeros
    both = cd.Trained(("skin", "hair", "sketch"), args, 19)
    maps = cd.condition_inputs(both, batch, active={"hair", "sketch"})["cond_map"]
    assert maps.shape == (2, 3, 16, 16) and maps[:, 0].sum() == 0
    assert torch.equal(maps[:, 1], (ids == 13).float()) and maps[:, 2].min() == 1
    # only face parsing maps have those regions
    with pytest.raises(common.UserError, match="face parsing maps"):
        cd.build_experts(args, 5, 0, {"image", "label"}, data.SHAPES_CLASSES)
    assert set(cd.build_experts(args, 19, 0, {"image", "label"}, data.CELEBAMASK_CLASSES)) == \
        {"hair"}
    # the paper's face experts in the presets (hair on CelebA-HQ; all four on MM-CelebA-HQ) and
    # the in-one-run halves: hair (CelebA-HQ's role) and sketch even, skin and text odd
    assert cd.PRESETS["celebamask-hq"]["experts"] == "hair"
    assert cd.PRESETS["mm-celeba-hq"]["experts"] == "hair,skin,caption,sketch"
    four = cd.build_experts(tiny_args(["--experts", "hair,skin,caption,sketch"]), 19)
    halves = cd.expert_datasets(list(range(6)), four)
    assert [list(halves[c]) for c in ("hair", "sketch", "skin", "text")] == \
        [[0, 2, 4], [0, 2, 4], [1, 3, 5], [1, 3, 5]]
    assert "label, skin, hair, caption, sketch, class, joint" in " ".join(
        cd.build_parser().format_help().split())


def test_official_literals_and_the_named_compositions():
    ow = cd.official_weights
    assert ow(["sketch"]) == ([1.0], [1.0])
    assert ow(["skin", "hair"]) == ([1.0, 1.0], [0.5, 0.5])
    assert ow(["skin", "hair", "text"])[0] == [1.0, 1.0, 1.25]            # - 2.25 eps_null
    assert ow(["hair", "sketch"]) == ([1.2, 0.6], [1.0, 0.0])               # - 0.8 eps_null
    assert ow(["skin", "text", "sketch"])[0] == [1.2, 1.2, 0.6]             # - 2.0 eps_null
    w, a = ow(["skin", "hair", "text", "sketch"])
    assert w == [1.0, 1.0, 1.25, 0.6] and sum(w) - 1 == pytest.approx(2.85)
    assert a == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])                    # face model's null
    assert ow(["class", "text"]) == ([5.0, 5.0], [5 / 9, 4 / 9])
    assert ow(["text", "class"]) == ([5.0, 5.0], [4 / 9, 5 / 9])
    with pytest.raises(common.UserError, match="official weights exist"):
        ow(["map", "text"])
    # w = 0.6 is below Eq. (10)'s w_i >= 1: allowed for the official literals only
    assert cd.composition_weights("official", "official", ["hair", "sketch"], [True, True]) == \
        ([1.2, 0.6], [1.0, 0.0], 0.0)
    with pytest.raises(common.UserError, match="at least 1"):
        cd.composition_weights("1.2,0.6", "1,0", ["hair", "sketch"], [True, True])
    # "uniform": 1/N over the experts that have a null prediction
    assert cd.composition_weights("2", "uniform", ["map", "text", "class"],
                                  [True, True, False])[1] == [0.5, 0.5, 0.0]
    # a named composition fills the flags the command line leaves open
    args = common.parse_args(cd.build_parser(), cd.PRESETS, "compose_diffusion", "shapes",
                             cd.with_composition(TINY + ["--composition", "official-scenes",
                                                         "--sample_steps", "5",
                                                         "--experts", "class,caption"]),
                             check=cd.check_args)
    assert (args.guidance, args.reliability, args.sampler, args.eta) == \
        ("official", "official", "ddim", 0.0)
    assert (args.sample_steps, args.noise_schedule, args.ckpt_null_class) == ("5", "cosine", 0)
    faces = cd.with_composition(["--composition", "official-faces"])
    assert faces[faces.index("--sample_steps") + 1] == "100"
    assert faces[faces.index("--noise_schedule") + 1] == "linear"
    assert cd.PRESETS["folder"]["guidance"] == "5"                          # scenes: w_i = 5
    # the literals reach the composition that --sample and --eval build (w = 0.6 included)
    args = tiny_args(["--experts", "hair,sketch", "--guidance", "official",
                      "--reliability", "official"])
    setup = cd.Setup(args, cd.build_experts(args, 5), cd.Schedule.make("cosine", 1000),
                     torch.device("cpu"))
    batch = cd.test_batch(cd.load_dataset(args, "test"), 2, "cpu")
    methods, _, _ = cd.eval_methods(setup)
    comp = methods["composition (Eq. 10)"](batch)
    assert (comp.w, comp.a) == ([1.2, 0.6], [1.0, 0.0]) and setup.alone_weights() == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# The released Unite and Conquer face and sketch models (--init_from)
# ---------------------------------------------------------------------------------------------
# Facts generated once with the release's own face_utils/unet.py and unet_sketch.py
# (Nithin-GK/UniteandConquer): the state_dict keys and shapes of the face model (SuperResModel)
# at a small config (32 px, 32 channels, mult (1, 2), 1 res block, attention at rate 2, 32-channel
# heads, scale-shift, resblock up/down, 6 outputs); the sketch model has the same keys without
# input_blocks_convert.* and *.cond_emb_layers.*. Then the outputs of both under deterministic
# weights (one generator seeded 0, uniform(-0.1, 0.1) per tensor in key order) on inputs from a
# generator seeded 1: x (3, 3, 32, 32), then the face maps (3, 6, 32, 32) and one unit text
# embedding for row 1 (rows 0 and 2 zero), or the sketch (3, 3, 32, 32); t = 999, 500, 3. Values:
# out[:, :, 5, 7] (rows, channels), and the mean |out|.
RELEASE_SMALL = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                     attention_resolutions="16", num_head_channels=32, learn_sigma=True,
                     class_cond=False, use_scale_shift_norm=True, resblock_updown=True,
                     dropout=0.0)
RELEASE_OUT = {
    "face, text in row 1": ([-0.05895, 0.01276, -0.07335, -0.06654, 0.10644, 0.01867, -0.01077,
                             0.04901, -0.02467, -0.072, 0.06195, 0.01924, -0.05565, 0.04079,
                             -0.01022, -0.07953, 0.08829, -0.02732], 0.054245),
    "face, no text": ([-0.05775, 0.02533, -0.06479, -0.07064, 0.09789, 0.01137, 0.00077, 0.04324,
                       -0.02038, -0.07399, 0.06178, 0.02005, -0.05285, 0.03945, -0.01544,
                       -0.08582, 0.07714, -0.03516], 0.05415),
    "sketch": ([0.09689, -0.0365, -0.00558, -0.00045, 0.06068, 0.02972, 0.06958, 0.06135,
                0.05783, 0.02281, 0.04819, 0.05551, 0.10781, 0.01549, 0.03457, -0.01395,
                0.04527, 0.02946], 0.044523),
}
RELEASE_FACE_KEYS = """
time_embed.0.weight 128x32
time_embed.0.bias 128
time_embed.2.weight 128x128
time_embed.2.bias 128
input_blocks_convert.weight 3x6x3x3
input_blocks_convert.bias 3
input_blocks.0.0.weight 32x6x3x3
input_blocks.0.0.bias 32
input_blocks.1.0.in_layers.0.weight 32
input_blocks.1.0.in_layers.0.bias 32
input_blocks.1.0.in_layers.2.weight 32x32x3x3
input_blocks.1.0.in_layers.2.bias 32
input_blocks.1.0.emb_layers.1.weight 64x128
input_blocks.1.0.emb_layers.1.bias 64
input_blocks.1.0.cond_emb_layers.1.weight 64x512
input_blocks.1.0.cond_emb_layers.1.bias 64
input_blocks.1.0.out_layers.0.weight 32
input_blocks.1.0.out_layers.0.bias 32
input_blocks.1.0.out_layers.3.weight 32x32x3x3
input_blocks.1.0.out_layers.3.bias 32
input_blocks.2.0.in_layers.0.weight 32
input_blocks.2.0.in_layers.0.bias 32
input_blocks.2.0.in_layers.2.weight 32x32x3x3
input_blocks.2.0.in_layers.2.bias 32
input_blocks.2.0.emb_layers.1.weight 64x128
input_blocks.2.0.emb_layers.1.bias 64
input_blocks.2.0.cond_emb_layers.1.weight 64x512
input_blocks.2.0.cond_emb_layers.1.bias 64
input_blocks.2.0.out_layers.0.weight 32
input_blocks.2.0.out_layers.0.bias 32
input_blocks.2.0.out_layers.3.weight 32x32x3x3
input_blocks.2.0.out_layers.3.bias 32
input_blocks.3.0.in_layers.0.weight 32
input_blocks.3.0.in_layers.0.bias 32
input_blocks.3.0.in_layers.2.weight 64x32x3x3
input_blocks.3.0.in_layers.2.bias 64
input_blocks.3.0.emb_layers.1.weight 128x128
input_blocks.3.0.emb_layers.1.bias 128
input_blocks.3.0.cond_emb_layers.1.weight 128x512
input_blocks.3.0.cond_emb_layers.1.bias 128
input_blocks.3.0.out_layers.0.weight 64
input_blocks.3.0.out_layers.0.bias 64
input_blocks.3.0.out_layers.3.weight 64x64x3x3
input_blocks.3.0.out_layers.3.bias 64
input_blocks.3.0.skip_connection.weight 64x32x1x1
input_blocks.3.0.skip_connection.bias 64
input_blocks.3.1.norm.weight 64
input_blocks.3.1.norm.bias 64
input_blocks.3.1.qkv.weight 192x64x1
input_blocks.3.1.qkv.bias 192
input_blocks.3.1.proj_out.weight 64x64x1
input_blocks.3.1.proj_out.bias 64
middle_block.0.in_layers.0.weight 64
middle_block.0.in_layers.0.bias 64
middle_block.0.in_layers.2.weight 64x64x3x3
middle_block.0.in_layers.2.bias 64
middle_block.0.emb_layers.1.weight 128x128
middle_block.0.emb_layers.1.bias 128
middle_block.0.cond_emb_layers.1.weight 128x512
middle_block.0.cond_emb_layers.1.bias 128
middle_block.0.out_layers.0.weight 64
middle_block.0.out_layers.0.bias 64
middle_block.0.out_layers.3.weight 64x64x3x3
middle_block.0.out_layers.3.bias 64
middle_block.1.norm.weight 64
middle_block.1.norm.bias 64
middle_block.1.qkv.weight 192x64x1
middle_block.1.qkv.bias 192
middle_block.1.proj_out.weight 64x64x1
middle_block.1.proj_out.bias 64
middle_block.2.in_layers.0.weight 64
middle_block.2.in_layers.0.bias 64
middle_block.2.in_layers.2.weight 64x64x3x3
middle_block.2.in_layers.2.bias 64
middle_block.2.emb_layers.1.weight 128x128
middle_block.2.emb_layers.1.bias 128
middle_block.2.cond_emb_layers.1.weight 128x512
middle_block.2.cond_emb_layers.1.bias 128
middle_block.2.out_layers.0.weight 64
middle_block.2.out_layers.0.bias 64
middle_block.2.out_layers.3.weight 64x64x3x3
middle_block.2.out_layers.3.bias 64
output_blocks.0.0.in_layers.0.weight 128
output_blocks.0.0.in_layers.0.bias 128
output_blocks.0.0.in_layers.2.weight 64x128x3x3
output_blocks.0.0.in_layers.2.bias 64
output_blocks.0.0.emb_layers.1.weight 128x128
output_blocks.0.0.emb_layers.1.bias 128
output_blocks.0.0.cond_emb_layers.1.weight 128x512
output_blocks.0.0.cond_emb_layers.1.bias 128
output_blocks.0.0.out_layers.0.weight 64
output_blocks.0.0.out_layers.0.bias 64
output_blocks.0.0.out_layers.3.weight 64x64x3x3
output_blocks.0.0.out_layers.3.bias 64
output_blocks.0.0.skip_connection.weight 64x128x1x1
output_blocks.0.0.skip_connection.bias 64
output_blocks.0.1.norm.weight 64
output_blocks.0.1.norm.bias 64
output_blocks.0.1.qkv.weight 192x64x1
output_blocks.0.1.qkv.bias 192
output_blocks.0.1.proj_out.weight 64x64x1
output_blocks.0.1.proj_out.bias 64
output_blocks.1.0.in_layers.0.weight 96
output_blocks.1.0.in_layers.0.bias 96
output_blocks.1.0.in_layers.2.weight 64x96x3x3
output_blocks.1.0.in_layers.2.bias 64
output_blocks.1.0.emb_layers.1.weight 128x128
output_blocks.1.0.emb_layers.1.bias 128
output_blocks.1.0.cond_emb_layers.1.weight 128x512
output_blocks.1.0.cond_emb_layers.1.bias 128
output_blocks.1.0.out_layers.0.weight 64
output_blocks.1.0.out_layers.0.bias 64
output_blocks.1.0.out_layers.3.weight 64x64x3x3
output_blocks.1.0.out_layers.3.bias 64
output_blocks.1.0.skip_connection.weight 64x96x1x1
output_blocks.1.0.skip_connection.bias 64
output_blocks.1.1.norm.weight 64
output_blocks.1.1.norm.bias 64
output_blocks.1.1.qkv.weight 192x64x1
output_blocks.1.1.qkv.bias 192
output_blocks.1.1.proj_out.weight 64x64x1
output_blocks.1.1.proj_out.bias 64
output_blocks.1.2.in_layers.0.weight 64
output_blocks.1.2.in_layers.0.bias 64
output_blocks.1.2.in_layers.2.weight 64x64x3x3
output_blocks.1.2.in_layers.2.bias 64
output_blocks.1.2.emb_layers.1.weight 128x128
output_blocks.1.2.emb_layers.1.bias 128
output_blocks.1.2.cond_emb_layers.1.weight 128x512
output_blocks.1.2.cond_emb_layers.1.bias 128
output_blocks.1.2.out_layers.0.weight 64
output_blocks.1.2.out_layers.0.bias 64
output_blocks.1.2.out_layers.3.weight 64x64x3x3
output_blocks.1.2.out_layers.3.bias 64
output_blocks.2.0.in_layers.0.weight 96
output_blocks.2.0.in_layers.0.bias 96
output_blocks.2.0.in_layers.2.weight 32x96x3x3
output_blocks.2.0.in_layers.2.bias 32
output_blocks.2.0.emb_layers.1.weight 64x128
output_blocks.2.0.emb_layers.1.bias 64
output_blocks.2.0.cond_emb_layers.1.weight 64x512
output_blocks.2.0.cond_emb_layers.1.bias 64
output_blocks.2.0.out_layers.0.weight 32
output_blocks.2.0.out_layers.0.bias 32
output_blocks.2.0.out_layers.3.weight 32x32x3x3
output_blocks.2.0.out_layers.3.bias 32
output_blocks.2.0.skip_connection.weight 32x96x1x1
output_blocks.2.0.skip_connection.bias 32
output_blocks.3.0.in_layers.0.weight 64
output_blocks.3.0.in_layers.0.bias 64
output_blocks.3.0.in_layers.2.weight 32x64x3x3
output_blocks.3.0.in_layers.2.bias 32
output_blocks.3.0.emb_layers.1.weight 64x128
output_blocks.3.0.emb_layers.1.bias 64
output_blocks.3.0.cond_emb_layers.1.weight 64x512
output_blocks.3.0.cond_emb_layers.1.bias 64
output_blocks.3.0.out_layers.0.weight 32
output_blocks.3.0.out_layers.0.bias 32
output_blocks.3.0.out_layers.3.weight 32x32x3x3
output_blocks.3.0.out_layers.3.bias 32
output_blocks.3.0.skip_connection.weight 32x64x1x1
output_blocks.3.0.skip_connection.bias 32
out.0.weight 32
out.0.bias 32
out.2.weight 6x32x3x3
out.2.bias 6
"""


def release_unet(kind, **overrides):
    flags = cd.RELEASE_FLAGS[kind]
    extra = {k: flags[k] for k in ("map_channels", "convert_map", "block_cond_dim") if k in flags}
    return cd.UNet(**{**RELEASE_SMALL, **extra, **overrides}).eval()


def test_released_unets_have_the_official_keys_and_compute_its_outputs():
    face_keys = [line.split() for line in RELEASE_FACE_KEYS.strip().splitlines()]
    sketch_keys = [k for k in face_keys if not k[0].startswith("input_blocks_convert.")
                   and ".cond_emb_layers." not in k[0]]
    for kind, keys in (("face", face_keys), ("sketch", sketch_keys)):
        net = release_unet(kind)
        ours = [[k, "x".join(map(str, v.shape))] for k, v in net.state_dict().items()]
        assert ours == keys, kind  # names, order and shapes
        g = torch.Generator().manual_seed(0)
        net.load_state_dict({k: torch.rand(v.shape, generator=g) * 0.2 - 0.1
                             for k, v in net.state_dict().items()}, strict=True)
        g = torch.Generator().manual_seed(1)
        x, t = torch.randn(3, 3, 32, 32, generator=g), torch.tensor([999, 500, 3])
        with torch.no_grad():
            if kind == "face":
                maps = torch.randn(3, 6, 32, 32, generator=g)
                emb = torch.zeros(3, 512)
                emb[1] = torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0)
                outs = {"face, text in row 1": net(x, t, cond_map=maps, cond_vec=emb),
                        "face, no text": net(x, t, cond_map=maps, cond_vec=torch.zeros(3, 512))}
            else:
                outs = {"sketch": net(x, t, cond_map=torch.randn(3, 3, 32, 32, generator=g))}
        for name, out in outs.items():
            values, mean_abs = RELEASE_OUT[name]
            assert torch.allclose(out[:, :, 5, 7].flatten(), torch.tensor(values), atol=2e-5), name
            assert abs(out.abs().mean().item() - mean_abs) < 2e-6, name


def test_released_face_model_modulates_twice_where_the_batch_has_a_text_row():
    """The official ResBlock by hand: GN(GN(h)(1 + s_t) + b_t)(1 + s_e) + b_e with one GroupNorm,
    for every row as soon as one row carries an embedding; the time modulation alone otherwise."""
    torch.manual_seed(0)
    block = cd.ResBlock(32, 16, 0.0, 32, True, cond_dim=8).eval()
    for p in block.parameters():
        nn.init.normal_(p, std=0.3)
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    vec = torch.zeros(2, 8)
    vec[0] = 1.0
    norm, rest = block.out_layers[0], block.out_layers[1:]
    h = block.in_layers(x)
    s_t, b_t = block.emb_layers(emb)[:, :, None, None].chunk(2, 1)
    once = norm(h) * (1 + s_t) + b_t
    s_e, b_e = block.cond_emb_layers(vec)[:, :, None, None].chunk(2, 1)
    twice = norm(once) * (1 + s_e) + b_e       # row 1 (zero embedding): the bias alone
    with torch.no_grad():
        gated = block(x, emb, (vec, vec.sum() != 0))
        off = block(x, emb, (torch.zeros(2, 8), torch.tensor(False)))
        assert torch.allclose(gated, x + rest(twice), atol=1e-5)
        assert torch.allclose(off, x + rest(once), atol=1e-5)
        # the gate is the batch's: row 1 alone (no embedding in the batch) is unmodulated
        alone = block(x[1:], emb[1:], (vec[1:], vec[1:].sum() != 0))
        assert torch.allclose(alone, off[1:], atol=1e-5) and not torch.allclose(alone, gated[1:])


def test_released_full_size_models_have_the_official_counts(capsys):
    for kind, tensors in (("face", 652), ("sketch", 566)):
        with torch.device("meta"):
            net = cd.UNet(**cd.RELEASE_FLAGS[kind])
        state = net.state_dict()
        assert len(state) == tensors and \
            sum(v.numel() for v in state.values()) == cd.RELEASE_PARAMS[kind]
    assert cd.RELEASE_PARAMS == {"face": 330_924_267, "sketch": 311_027_910}  # the release's
    # --dry_run --init_from prints them without reading the file
    path = os.path.join(ROOT, "README.md")  # any existing file: a dry run reads nothing
    cd.main(["--dry_run", "--init_from", path])
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"]
    assert counts["released face"] == 330_924_267 and counts["released sketch"] == 311_027_910


TINY_RELEASE = dict(cd.RELEASE_TRUNK, num_channels=32, num_res_blocks=1,
                    channel_mult="1,1,1,1", attention_resolutions="2", num_head_channels=32,
                    use_fp16=False)   # attention where the image is 1/8 wide (and in the middle)


def tiny_release(monkeypatch, folder, kinds=("face", "sketch"), size=256):
    """Released files of a small trunk (256 px as the release, or `size`: 64 to save time) with
    random weights, at their released names in `folder`; RELEASE_FLAGS (and RELEASE_ARGS' size)
    point at that trunk. Returns the face file path."""
    trunk = dict(TINY_RELEASE, image_size=size)
    monkeypatch.setattr(cd, "RELEASE_FLAGS", {
        "face": dict(trunk, map_channels=6, convert_map=True, block_cond_dim=512),
        "sketch": dict(trunk, map_channels=3)})
    monkeypatch.setattr(cd, "RELEASE_ARGS", dict(cd.RELEASE_ARGS, size=size))
    torch.manual_seed(0)
    for kind in kinds:
        net = cd.UNet(**cd.RELEASE_FLAGS[kind])
        for p in net.parameters():  # no zero-initialised output: every path matters
            nn.init.normal_(p, std=0.05)
        torch.save(net.state_dict(), os.path.join(folder, cd.RELEASE_FILES[kind]))
    return os.path.join(folder, cd.RELEASE_FILES["face"])


class StubFarl:
    """FaRL's text tower stand-in: one fixed unit vector per caption."""

    def __init__(self, path, device):
        self.vec = torch.nn.functional.normalize(torch.randn(
            512, generator=torch.Generator().manual_seed(5)), dim=0)

    def __call__(self, captions):
        return self.vec.expand(len(captions), 512)


def grey_png(path, rows):
    from PIL import Image
    img = np.zeros((256, 256), np.uint8)
    img[rows] = 255
    Image.fromarray(img).save(path)
    return str(path)


@pytest.mark.parametrize("given", ["skin,hair,sketch", "skin,hair,text"])
def test_released_models_compose_as_the_official_test_code(tmp_path, monkeypatch, given):
    """One face-model forward on the rows [skin | hair | text | null] (a text row turns the
    second modulation on for all), one sketch-model forward, and the release's literals:
    two + sketch 1.2, 1.2, 0.6, -2.0; face + hair + text 1, 1, 1.25, -2.25."""
    face_path = tiny_release(monkeypatch, tmp_path, size=64)
    monkeypatch.setattr(cd, "FarlText", StubFarl)   # its file is recognised, its tower stubbed
    torch.save({"state_dict": {"token_embedding.weight": torch.zeros(1)}},
               tmp_path / cd.RELEASE_FILES["farl"])
    files = {"skin_map": grey_png(tmp_path / "skin.png", slice(60, 200)),
             "hair_map": grey_png(tmp_path / "hair.png", slice(0, 60)),
             "sketch": grey_png(tmp_path / "sketch.png", slice(100, 102))}
    flags = {"skin": ["--skin_map", files["skin_map"]], "hair": ["--hair_map", files["hair_map"]],
             "sketch": ["--sketch", files["sketch"]], "text": ["--text", "she has blonde hair"]}
    argv = ["--sample", "--init_from", face_path, "--composition", "official-faces",
            "--sample_steps", "2", "--batch_size", "1", "--size", "64",
            "--out_dir", str(tmp_path / "out")]
    argv += [a for c in given.split(",") for a in flags[c]]
    args = common.parse_args(cd.build_parser(), cd.PRESETS, "compose_diffusion", "shapes",
                             cd.with_composition(argv), check=cd.check_args)
    assert (args.data, args.sampler, args.eta) == ("mm-celeba-hq", "ddim", 0)
    assert (args.noise_schedule, args.diffusion_steps) == ("linear", 1000)
    models, scheds = cd.load_release(args, torch.device("cpu"))
    assert set(models) == ({"face", "sketch"} if "sketch" in given else {"face"})
    setup = cd.Setup(args, models, scheds, torch.device("cpu"), given=cd.release_conditions(args))
    batch = cd.command_line_conditions(args, 1, "cpu")
    w, a, low = setup.weights()
    comp = setup.composed(batch, w, a, low)
    hw = (args.size, args.size)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(3))
    step = comp.ref.num_steps - 1
    t = torch.full((1,), int(comp.ref.timestep_map[step]))
    with torch.no_grad():
        eps, _ = comp.eps_and_var(x, step)
        # by hand, as diff_test.py: maps in [-1, 1] x 3 channels, zeros where not carried
        skin = 2 * batch["skin"].expand(1, 3, *hw) - 1
        hair = 2 * batch["hair"].expand(1, 3, *hw) - 1
        zero = torch.zeros_like(skin)
        text = StubFarl(None, None)(["x"]) if "text" in given else torch.zeros(1, 512)
        rows = [(skin, zero, 0 * text), (zero, hair, 0 * text)]
        rows += [(zero, zero, text)] if "text" in given else []
        rows += [(zero, zero, 0 * text)]                      # the null row
        maps = torch.cat([torch.cat(r[:2], 1) for r in rows])
        vecs = torch.cat([r[2] for r in rows])
        out = models["face"].unet(x.repeat(len(rows), 1, 1, 1), t.repeat(len(rows)),
                                  cond_map=maps, cond_vec=vecs)[:, :3]
        if "sketch" in given:
            sk = models["sketch"].unet(x, t, cond_map=2 * batch["sketch"].expand(1, 3, *hw)
                                       - 1)[:, :3]
            by_hand = 1.2 * out[0] + 1.2 * out[1] + 0.6 * sk[0] - 2.0 * out[2]
        else:
            by_hand = out[0] + out[1] + 1.25 * out[2] - 2.25 * out[3]
    assert torch.allclose(eps[0], by_hand, atol=1e-5)
    assert (w, a) == (([1.2, 1.2, 0.6], [1.0, 0.0]) if "sketch" in given else
                      ([1.0, 1.0, 1.25], [1.0]))
    # the paper's a_i = 1/N over the experts with a null: the face model's rows share a = 1, the
    # sketch model (never trained with a null) gets 0
    args.guidance, args.reliability = "1", "uniform"
    assert setup.weights()[1] == ([1.0, 0.0] if "sketch" in given else [1.0])
    if "text" in given:
        return
    # the command itself: grids of each condition alone and of the composition
    cd.main(argv)
    rows_txt = (tmp_path / "out" / "experts.txt").read_text()
    assert "face:skin expert alone" in rows_txt and "composition (Eq. 10)" in rows_txt
    assert (tmp_path / "out" / "experts.png").exists()


def test_released_models_evaluate_the_skin_and_hair_maps_as_tables_1_2(tmp_path, monkeypatch):
    """--eval composes the test set's skin and hair maps of one image (§4.1: "the semantic labels
    of hair as well as skin from the same image"); --sample alone shows all four conditions."""
    face_path = tiny_release(monkeypatch, tmp_path, kinds=("face",), size=64)
    parse = lambda *flags: common.parse_args(  # noqa: E731
        cd.build_parser(), cd.PRESETS, "compose_diffusion", "shapes",
        cd.with_composition(["--init_from", face_path, "--size", "64",
                             "--out_dir", str(tmp_path / "o"), *flags]), check=cd.check_args)
    assert cd.release_conditions(parse("--eval")) == ["skin", "hair"]
    assert cd.release_conditions(parse("--sample", "--eval")) == ["skin", "hair"]
    assert cd.release_paths(parse("--eval")) == {"face": face_path}   # no FaRL, no sketch model
    sample = parse("--eval")
    sample.sample, sample.eval = True, False   # (its check would look for FaRL's file)
    assert cd.release_conditions(sample) == ["skin", "hair", "text", "sketch"]


def test_a_condition_the_test_set_lacks_is_named_before_sampling():
    """An expert reading a key the test set's items do not have (a dataset without its mask/
    folder): one sentence naming it and the flag that types it; a typed condition, or a CLIP text
    expert (the image embedding, supp. §7.3), needs none."""
    args = tiny_args()                                    # label and caption (tiny text) experts
    models = cd.build_experts(args, 5)
    test = types.SimpleNamespace(has={"image", "caption"})
    with pytest.raises(common.UserError, match="expert label reads 'label' items, which the "
                                               "test set of --data shapes does not have; add "
                                               "them to the dataset or give --label_map."):
        cd.check_test_set_keys(args, models, test)
    args.label_map = "typed.png"
    cd.check_test_set_keys(args, models, test)
    test.has = {"image", "label"}
    with pytest.raises(common.UserError, match="expert caption reads 'caption' items"):
        cd.check_test_set_keys(args, models, test)
    clip_args = tiny_args(["--text_encoder", "clip"])
    clip_args.label_map = "typed.png"
    cd.check_test_set_keys(clip_args, {"caption": types.SimpleNamespace(
        conditions=("text",), clip_text=True)}, test)


def test_the_released_sketch_model_samples_alone(tmp_path, monkeypatch):
    """No face model, no null anywhere: the sketch model's plain conditional prediction (as the
    release's sketch-only case), under the paper's uniform reliability."""
    tiny_release(monkeypatch, tmp_path, kinds=("sketch",), size=64)
    cd.main(["--sample", "--init_from", str(tmp_path / cd.RELEASE_FILES["sketch"]), "--sketch",
             grey_png(tmp_path / "s.png", slice(100, 108)), "--sample_steps", "2",
             "--batch_size", "1", "--size", "64", "--out_dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "experts.txt").read_text().startswith(
        "rows: sketch | sketch expert alone\n")


def test_farl_weights_replace_the_clip_text_tower_tensors_they_hold(tmp_path, monkeypatch,
                                                                   in_hub):
    small = common.CLIP.small(49408, 77, width=64, layers=2, heads=4, embed_dim=512)
    monkeypatch.setattr(common, "CLIP", lambda *a, **k: small)
    ours = small.state_dict()
    farl = {k: torch.full_like(v, 0.5) for k, v in ours.items() if k.startswith("transformer.")}
    farl["visual.conv1.weight"] = torch.zeros(768, 3, 16, 16)  # the image tower: never used
    farl["token_embedding.weight"] = ours["token_embedding.weight"] + 1
    path = tmp_path / cd.RELEASE_FILES["farl"]
    torch.save({"state_dict": farl}, path)
    before = {k: v.clone() for k, v in ours.items()}
    text = cd.FarlText(str(path), "cpu")
    after = text.model.state_dict()
    for k in ours:
        expected = farl[k] if k in farl else before[k]
        assert torch.equal(after[k], expected), k
    emb = text(["a face", "she has blonde hair"])
    assert emb.shape == (2, 512) and torch.allclose(emb.norm(dim=-1), torch.ones(2))


def test_released_files_are_recognised_by_their_keys_and_anything_else_refused(tmp_path):
    face = release_unet("face").state_dict()
    sketch = release_unet("sketch").state_dict()
    adm = cd.UNet(**RELEASE_SMALL).state_dict()
    cases = {"face.pt": (face, "face"), "sketch.pt": (sketch, "sketch"),
             "farl.pth": ({"state_dict": {"token_embedding.weight": torch.zeros(2, 2)}}, "farl"),
             "farl_bare.pth": ({"token_embedding.weight": torch.zeros(2, 2)}, "farl")}
    for name, (state, kind) in cases.items():
        torch.save(state, tmp_path / name)
        assert cd.read_release(str(tmp_path / name))[1] == kind
        # the same in torch's legacy (non-zip) format, which cannot be memory-mapped
        torch.save(state, tmp_path / f"legacy_{name}", _use_new_zipfile_serialization=False)
        assert cd.read_release(str(tmp_path / f"legacy_{name}"))[1] == kind
    refused = {"adm.pt": (adm, "guided-diffusion"),
               "vit.pth": ({"state_dict": {"visual.conv1.weight": torch.zeros(1)}}, "CLIP text"),
               "other.pt": ({"fc.weight": torch.zeros(1)}, "not a released Unite and Conquer"),
               "glide.pt": ({**adm, "token_embedding.weight": torch.zeros(1)}, "GLIDE"),
               "list.pt": ([torch.zeros(1)], "not a state dict")}
    for name, (state, words) in refused.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(common.UserError, match=words):
            cd.read_release(str(tmp_path / name))
    import argparse
    torch.save({"args": argparse.Namespace(lr=1)}, tmp_path / "code.pt")  # pickled Python code
    with pytest.raises(common.UserError, match="never run"):
        cd.read_release(str(tmp_path / "code.pt"))


@pytest.mark.parametrize("extra, words", [
    ([], "training from them is not implemented"),
    (["--sample", "--data", "shapes"], "not a face set"),
    (["--sample", "--size", "128"], "--size 256"),
    (["--sample", "--sketch", "SKETCH"], "need model_sketch.pt"),
    (["--sample", "--text", "a face"], "need FaRL-Base-Patch16"),
    (["--sample", "--expert_ckpt", "X"], "without it"),
    (["--sample", "OTHER"], "G.pth is not a released Unite and Conquer file"),
])
def test_init_from_refuses_what_it_cannot_serve_in_one_sentence(tmp_path, monkeypatch, extra,
                                                                words):
    face_path = tiny_release(monkeypatch, tmp_path, kinds=("face",))
    sketch = grey_png(tmp_path / "s.png", slice(0, 2))
    other = tmp_path / "G.pth"
    torch.save({"w": torch.zeros(1)}, other)
    argv = ["--init_from", str(other) if "OTHER" in extra else face_path,
            "--out_dir", str(tmp_path / "o")] + \
        [sketch if a == "SKETCH" else a for a in extra if a != "OTHER"]
    with pytest.raises(common.UserError, match=words):
        common.parse_args(cd.build_parser(), cd.PRESETS, "compose_diffusion", "shapes",
                          cd.with_composition(argv), check=cd.check_args)
    assert not (tmp_path / "o").exists()  # refused before the run folder is made


def test_ssim_is_wang_et_al_2004_on_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=g)
    assert torch.allclose(cd.ssim(x, x), torch.ones(2), atol=1e-6)
    # constant images: contrast and structure terms are C2 / C2, the luminance term remains
    c1 = 0.01 ** 2
    a, b = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.7)
    assert cd.ssim(a, b).item() == pytest.approx((2 * .2 * .7 + c1) / (.2 ** 2 + .7 ** 2 + c1),
                                                 rel=1e-5)
    # one 11 x 11 window (an 11 x 11 image): Eq. (13) with Gaussian-weighted statistics by hand
    u, v = (torch.rand(1, 1, 11, 11, generator=g, dtype=torch.float64) for _ in range(2))
    k = np.arange(11) - 5
    wgt = np.exp(-k ** 2 / (2 * 1.5 ** 2))
    wgt = np.outer(wgt, wgt) / np.outer(wgt, wgt).sum()
    un, vn = u[0, 0].numpy(), v[0, 0].numpy()
    mu, mv = (wgt * un).sum(), (wgt * vn).sum()
    su, sv = (wgt * (un - mu) ** 2).sum(), (wgt * (vn - mv) ** 2).sum()
    cov = (wgt * (un - mu) * (vn - mv)).sum()
    c2 = 0.03 ** 2
    want = (2 * mu * mv + c1) * (2 * cov + c2) / ((mu ** 2 + mv ** 2 + c1) * (su + sv + c2))
    assert cd.ssim(u.float(), v.float()).item() == pytest.approx(want, abs=1e-5)
    assert abs(want) < 0.5 and cd.ssim(u, 1 - u).item() < 0   # unrelated / inverted images


def test_clip_score_is_the_cosine_of_the_clip_embeddings():
    torch.manual_seed(0)
    tokenizer = common.CLIPTokenizer(bpe_path="", context_length=16)
    model = common.CLIP("ViT-B/32", pretrained=False, vision=True, embed_dim=16,
                        context_length=16, vocab_size=tokenizer.vocab_size, text_width=32,
                        text_heads=2, text_layers=1, image_resolution=32, vision_patch_size=16,
                        vision_width=32, vision_heads=2, vision_layers=1).eval()
    clip = cd.ClipText.__new__(cd.ClipText)  # a tiny random CLIP in place of ViT-B/32
    clip.model, clip.tokenizer, clip.device, clip.last = model, tokenizer, "cpu", (None, None)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    captions = ["a red circle", "a blue square"]
    with torch.no_grad():
        want = torch.nn.functional.cosine_similarity(
            model.encode_image((images + 1) / 2), model.encode_text(tokenizer(captions)), dim=1)
    score = cd.clip_score(clip, images, captions)
    assert torch.allclose(score, want, atol=1e-5) and score.abs().max() < 1
    clip.text = lambda c, truncate=False: clip.image(images)                 # identical: 1
    assert torch.allclose(cd.clip_score(clip, images, captions), torch.ones(2), atol=1e-5)
    clip.text = lambda c, truncate=False: -clip.image(images)                # opposite: -1
    assert torch.allclose(cd.clip_score(clip, images, captions), -torch.ones(2), atol=1e-5)


def test_a_training_step_reads_nothing_back_from_the_device(monkeypatch):
    # a host read (item, int(), bool(), tolist, numpy) waits for the GPU: none in a step's loss,
    # backward and EMA update (losses are read at log steps only)
    args = tiny_args(["--experts", "label,caption,hair"])
    experts = cd.build_experts(args, 5)
    ds = cd.load_dataset(args, "train")
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    batches = {"map": batch, "text": batch, "hair": batch}
    rt = common.Runtime(torch.device("cpu"), torch.float32)
    sched = cd.Schedule.make("cosine", 1000)
    emas = {n: common.EMA(e, 0.9) for n, e in experts.items()}
    cd.train_step(args, rt, 0, experts["label"], experts["label"], batches, sched, None, 0)

    def host_read(*a, **k):
        raise AssertionError("a host read in a training step")
    for name in ("item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for index, (n, e) in enumerate(experts.items()):
        loss = cd.train_step(args, rt, index, e, e, batches, sched, None, 1)
        loss.backward()
        emas[n].update(e, 0.9)
    monkeypatch.undo()
    assert loss.item() > 0


def test_bench_times_training_steps_and_sampling_in_one_json(tmp_path, capsys):
    out = str(tmp_path / "bench")
    cd.main(TINY + ["--bench", "1", "--out_dir", out])   # label and caption experts
    result = json.load(open(os.path.join(out, "bench.json")))
    rows = result["training"]["bench"]
    assert [r["dtype"] for r in rows] == ["float32"] and rows[0]["img_per_s"] > 0
    assert result["training"]["batch_size"] == 4
    assert set(result["sampling"]["results"]) == {"N=2", "N=3"}
    ratios = result["sampling"]["results"]["N=2"]
    assert ratios["bare_forwards"]["ratio_to_bare"] == 1.0
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))
    # the FLOPs the bench counted on its training step (both experts, each its own image) are
    # the sum of what --dry_run counts per expert (text tower included)
    args = tiny_args()
    per_expert = [cd.training_flops(args, e) for e in cd.build_experts(args, 5).values()]
    assert abs(result["training"]["gflops_per_img"] - sum(per_expert) / 1e9) < \
        1e-3 * sum(per_expert) / 1e9
    with pytest.raises(common.UserError, match="--bench must be at least 1"):
        cd.main(TINY + ["--bench", "0", "--out_dir", out])


# ---------------------------------------------------------------------------------------------
# The paper's path: face presets with the CLIP text expert, separate runs composed at sampling.
# Random-weight stand-ins for the pretrained files sit at the torch-hub cache paths.
# ---------------------------------------------------------------------------------------------

def stand_in_state(module_fn, seed=0):
    """A random state dict of module_fn()'s shapes whose tensors are all views of ONE random
    storage of 2^20 floats (overlapping rows for larger tensors): files of a few MB that load
    strictly into ViT-B/32 CLIP (151M parameters), Inception or AlexNet."""
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in module_fn().state_dict().items()}
    pool = torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed)) * 0.02
    positive = pool.abs() + 0.5  # BatchNorm variances
    state = {}
    for k, (shape, dtype) in shapes.items():
        src = positive if "running_var" in k else pool
        if not dtype.is_floating_point:
            state[k] = torch.zeros(shape, dtype=dtype)
        elif math.prod(shape) <= len(src):
            state[k] = src[:math.prod(shape)].view(shape)
        else:
            inner = math.prod(shape[1:])
            step = (len(src) - inner) // (shape[0] - 1)
            strides = [1]
            for d in reversed(shape[2:]):
                strides.insert(0, strides[0] * d)
            state[k] = src.as_strided(shape, (step, *strides))
    return state


def place_pretrained_stand_ins(hub):
    """CLIP ViT-B/32 (converted file) with a tiny BPE vocabulary, the FID Inception and LPIPS-alex,
    each marked as hash-checked as test_common's place_stand_in does."""
    ckpt = hub / "checkpoints"
    os.makedirs(ckpt, exist_ok=True)
    torch.hub.set_dir(str(hub))
    clip = common.clip_converted_path("ViT-B/32")
    torch.save(stand_in_state(lambda: common.CLIP("ViT-B/32", pretrained=False)), clip)
    common.write_marker(clip, "converted")
    bpe = str(ckpt / "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(bpe, "wt") as f:
        f.write("#version: 0.2\nf a\nc e\ns m\n")
    common.write_marker(bpe, common.CLIP_BPE_SHA256)
    torch.save(stand_in_state(lambda: common.FIDInception(pretrained=False), 1),
               common.hub_checkpoint_path(os.path.basename(common.FID_INCEPTION_URL)))
    lpips = stand_in_state(lambda: common.LPIPS("alex", pretrained=False), 2)
    for name, keep, tag in (("alexnet-owt-7be5be79.pth", "features.", "7be5be79"),
                            ("lpips_v0.1_alex.pth", "lin", common.LPIPS_LIN_SHA256["alex"])):
        torch.save({k: v.abs() for k, v in lpips.items() if k.startswith(keep)}, ckpt / name)
        common.write_marker(str(ckpt / name), tag)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    path = tmp_path_factory.mktemp("torch_home") / "hub"  # TORCH_HOME/hub, as torch.hub reads
    # Undone after the module as it was: set_dir cannot unset, and a pinned default would hide
    # the TORCH_HOME that later tests set.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "_hub_dir", str(path))
        place_pretrained_stand_ins(path)
        yield path


@pytest.fixture
def in_hub(hub, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setenv("TORCH_HOME", str(hub.parent))  # subprocesses: <TORCH_HOME>/hub
    return hub


def fake_faces(root, n_train=4):
    """MM-CelebA-HQ in its official layout (test_data's fake, its two training ids repeated to
    n_train), and CelebAMask-HQ beside it."""
    fake_mm_celeba(str(root / "mm"), np.random.default_rng(0))
    mm = root / "mm"
    ids = [str(k) for k in range(10, 10 + n_train)]
    for k, new in enumerate(ids):
        old = str(k % 2)
        for folder, ext in (("image", ".jpg"), ("mask", ".png"), ("sketch", ".png")):
            shutil.copy(mm / folder / (old + ext), mm / folder / (new + ext))
        captions = mm / "text" / "celeba-caption"
        shutil.copy(captions / f"{old}.txt", captions / f"{new}.txt")
    with open(mm / "train/filenames.pickle", "wb") as f:
        pickle.dump(ids, f, protocol=2)
    fake_celebamask(str(root / "cmhq"), np.random.default_rng(1))
    return str(mm), str(root / "cmhq")


# The face presets' structure, widths shrunk by flags (the CPU budget)
SHRINK = ["--num_channels", "32", "--channel_mult", "1,2", "--num_res_blocks", "1",
          "--attention_resolutions", "16", "--num_head_channels", "32", "--sample_steps", "2",
          "--device", "cpu", "--log_every", "1", "--eval_n", "2", "--batch_size", "2"]


def test_one_expert_trains_on_the_whole_dataset_several_on_the_in_one_run_halves():
    ds = list(range(7))
    one = cd.build_experts(tiny_args(["--experts", "label"]), 5)
    assert cd.expert_datasets(ds, one) == {"map": ds}
    two = cd.expert_datasets(ds, cd.build_experts(tiny_args(), 5))
    assert [two["map"][k] for k in range(len(two["map"]))] == [0, 2, 4, 6]
    assert [two["text"][k] for k in range(len(two["text"]))] == [1, 3, 5]


@pytest.fixture(scope="module")
def separate_runs(hub, tmp_path_factory):
    """The paper's set-up (§4.1): a hair-map expert trained on CelebAMask-HQ and a CLIP text
    expert trained on MM-CelebA-HQ, each in its own run (face presets, widths shrunk)."""
    root = tmp_path_factory.mktemp("faces")
    mm, cmhq = fake_faces(root, 2)
    # lr 1e-2: one step moves the zero-initialised output layers far enough for eps to differ
    small = ["--size", "32", "--iters", "1", "--lr", "1e-2"] + SHRINK
    label, caption = str(root / "hair"), str(root / "caption")
    cd.main(["--data", "celebamask-hq", "--data_dir", cmhq, "--out_dir", label] + small)
    cd.main(["--data", "mm-celeba-hq", "--experts", "caption", "--data_dir", mm,
             "--out_dir", caption] + small)
    return {"mm": mm, "root": root, "hair": os.path.join(label, "ckpt.pt"),
            "caption": os.path.join(caption, "ckpt.pt")}


def sampling_args(runs, out, extra=()):
    return common.parse_args(cd.build_parser(), cd.PRESETS, "compose_diffusion", "shapes",
                             ["--data", "mm-celeba-hq", "--data_dir", runs["mm"], "--out_dir", out,
                              "--sample", "--expert_ckpt", runs["hair"], runs["caption"]]
                             + SHRINK + list(extra), check=cd.check_args)


def test_experts_of_separate_runs_compose_exactly_as_in_one_run(separate_runs, tmp_path):
    # Eq. (10) needs each expert's eps(z_t, x_i) and eps(z_t, null) only: two checkpoints of
    # separate runs (other datasets) give the eps of the same two networks composed in one run
    w, a = [2.0, 3.0], [0.3, 0.7]
    flags = ["--guidance", "2,3", "--reliability", "0.3,0.7"]
    args = sampling_args(separate_runs, str(tmp_path / "c"), flags)
    assert args.size == 32
    models, scheds = cd.load_experts(args)
    assert list(models) == ["hair", "caption"] and models["caption"].clip_text
    clip = cd.ClipText(torch.device("cpu"), vision=False)
    setup = cd.Setup(args, models, scheds, torch.device("cpu"), clip)
    batch = cd.test_batch(cd.load_dataset(args, "test"), 2, "cpu")
    x, i = torch.randn(2, 3, 32, 32), 1
    eps, _ = setup.composed(batch, w, a).eps_and_var(x, i)
    # the same networks as one in-one-run checkpoint (both experts, one run folder)
    one = str(tmp_path / "one")
    os.makedirs(one)
    la, ca = (torch.load(separate_runs[k], weights_only=True) for k in ("hair", "caption"))
    joint_args = common.parse_args(cd.build_parser(), cd.PRESETS, "compose_diffusion",
                                   "shapes", ["--data", "mm-celeba-hq", "--data_dir",
                                              separate_runs["mm"], "--out_dir", one, "--sample",
                                              "--size", "32", "--experts", "hair,caption"]
                                   + SHRINK + flags)
    torch.save({"method": "compose_diffusion", "config": vars(joint_args), "iter": 1,
                "state": {"ema_hair": la["state"]["ema_hair"],
                          "ema_caption": ca["state"]["ema_caption"]},
                "extra": la["extra"]}, os.path.join(one, "ckpt.pt"))
    models1, scheds1 = cd.load_experts(joint_args)
    setup1 = cd.Setup(joint_args, models1, scheds1, torch.device("cpu"), clip)
    eps1, _ = setup1.composed(batch, w, a).eps_and_var(x, i)
    # and Eq. (10) by hand from the two networks
    t = torch.full((2,), int(setup.ref.timestep_map[i]))
    m1, m2 = models["hair"], models["caption"]
    with torch.no_grad():
        by_hand = (2 * m1(x, t, **setup.cond("hair", batch))[:, :3]
                   + 3 * m2(x, t, **setup.cond("caption", batch))[:, :3]
                   - 4 * (0.3 * m1(x, t, **m1.null_cond(2, "cpu"))[:, :3]
                          + 0.7 * m2(x, t, **m2.null_cond(2, "cpu"))[:, :3]))
    assert torch.allclose(eps, eps1, atol=1e-6) and torch.allclose(eps, by_hand, atol=1e-5)
    assert eps.abs().mean() > 0.01
    assert not torch.allclose(eps, m1(x, t, **setup.cond("hair", batch))[:, :3], atol=1e-3)
    # two runs may train the same kind of expert: both compose, the second renamed
    again = sampling_args(separate_runs, str(tmp_path / "d"))
    again.expert_ckpt = [separate_runs["hair"], separate_runs["hair"], separate_runs["caption"]]
    assert list(cd.load_experts(again)[0]) == ["hair", "hair@2", "caption"]


def test_face_eval_of_separate_runs_reports_the_face_and_caption_metrics(
        separate_runs, tmp_path, in_hub, monkeypatch):
    # Tables 1-2 (FID, LPIPS, SSIM to the ground truth) and Table 3's CLIP score on captioned
    # faces, for each expert alone and their composition (stand-in CLIP and LPIPS weights)
    inception = PooledPixels()
    monkeypatch.setattr(common, "FIDInception", lambda pretrained: inception)
    out = str(tmp_path / "eval")
    cd.main(["--data", "mm-celeba-hq", "--data_dir", separate_runs["mm"], "--out_dir", out,
             "--eval", "--expert_ckpt", separate_runs["hair"], separate_runs["caption"]] + SHRINK)
    result = json.load(open(os.path.join(out, "eval.json")))["results"]
    assert list(result) == ["hair expert alone", "caption expert alone", "composition (Eq. 10)"]
    for r in result.values():
        assert set(r) == {"fid", "lpips_to_gt", "ssim_to_gt", "clip_score"}
        assert all(math.isfinite(v) for v in r.values()) and -1 <= r["clip_score"] <= 1
        assert -1 <= r["ssim_to_gt"] < 1 and r["lpips_to_gt"] > 0


def test_separate_runs_sample_with_test_set_or_typed_conditions_and_clip_only_for_text(
        separate_runs, tmp_path, monkeypatch):
    # label maps (and ground truth) from the test set, the caption typed on the command line
    out = str(tmp_path / "c")
    cd.main(["--data", "mm-celeba-hq", "--data_dir", separate_runs["mm"], "--out_dir", out,
             "--sample", "--expert_ckpt", separate_runs["hair"], separate_runs["caption"],
             "--guidance", "1,2", "--text", "a smiling woman with blond hair"] + SHRINK)
    lines = open(os.path.join(out, "experts.txt")).read().splitlines()
    assert lines[0] == ("rows: label map | ground truth | hair expert alone | caption expert "
                        "alone | composition (Eq. 10)")
    assert lines[1:] == [f"{k}: a smiling woman with blond hair" for k in range(2)]
    assert os.path.exists(os.path.join(out, "reliability.png"))
    # every condition typed: no test set is read; a hair-map expert alone never builds CLIP
    from PIL import Image
    ids = np.zeros((32, 32), np.uint8)
    ids[8:24, 8:24] = 13
    Image.fromarray(ids).save(tmp_path / "map.png")
    monkeypatch.setattr(cd, "load_dataset", lambda *a: pytest.fail("read the test set"))
    monkeypatch.setattr(cd, "ClipText", lambda device: pytest.fail("built CLIP"))
    typed = str(tmp_path / "typed")
    cd.main(["--out_dir", typed, "--sample", "--expert_ckpt", separate_runs["hair"],
             "--label_map", str(tmp_path / "map.png")] + SHRINK)
    assert open(os.path.join(typed, "experts.txt")).read() == \
        "rows: label map | hair expert alone\n"


def test_typed_conditions_become_the_tensors_the_experts_read(tmp_path):
    from PIL import Image
    ids = np.zeros((8, 8), np.uint8)
    ids[:, 4:] = 3
    Image.fromarray(ids).save(tmp_path / "map.png")
    lines = np.full((8, 8), 255, np.uint8)
    lines[2] = 0
    Image.fromarray(lines).save(tmp_path / "sketch.png")
    args = tiny_args(["--text", "a red circle", "--label_map", str(tmp_path / "map.png"),
                      "--sketch", str(tmp_path / "sketch.png"), "--class_id", "4",
                      "--size", "16"])
    cond = cd.command_line_conditions(args, 3, "cpu")
    assert cond["caption"] == ["a red circle"] * 3 and cond["class"].tolist() == [4, 4, 4]
    assert cond["label"].shape == (3, 16, 16) and cond["label"][0, 0].tolist() == [0] * 8 + [3] * 8
    # the line (dark on white) becomes white on black, its grey values kept (bicubic x2) ...
    assert cond["sketch"].shape == (3, 1, 16, 16)
    column = cond["sketch"][0, 0, :, 0]
    assert column.min() >= 0 and column.max() <= 1 and (column[4:6] > 0.8).all()
    assert 0 < column[3] < 0.5 and column[:3].tolist() == [0, 0, 0]
    expert = cd.Trained(("map", "sketch"), args, 5)
    inputs = cd.condition_inputs(expert, cond)
    assert inputs["cond_map"].shape == (3, 6, 16, 16) and inputs["cond_map"][0, 3, 0, 15] == 1
    # ... and a trained sketch expert reads the line thresholded, as its training sketches
    assert inputs["cond_map"][0, 5, :, 0].tolist() == [0] * 4 + [1] * 2 + [0] * 10  # row 2 of 8
    small = cd.Trained(("map",), args, 3)   # a map expert of 3 classes cannot read class id 3
    with pytest.raises(common.UserError, match="knows 3 classes"):
        cd.condition_inputs(small, cond)


def test_compiled_training_step_gives_the_eager_loss_and_gradients(tmp_path, monkeypatch):
    torch.manual_seed(0)
    one_level = ["--channel_mult", "1", "--attention_resolutions", "16"]  # the least to compile
    args = tiny_args(one_level)
    model = cd.Trained(("map",), args, 5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero-initialised layer left
    rt = common.Runtime(torch.device("cpu"), torch.float32)
    compiled = common.prepare_model(model, rt, "aot_eager")  # what train() does with --compile
    ds = cd.load_dataset(args, "train")
    batch = {"map": torch.utils.data.default_collate([ds[i] for i in range(4)])}
    sched = cd.Schedule.make("cosine", 1000)

    def step(net):  # one training step's loss (same t, noise, null draws) and gradients
        model.zero_grad()
        loss = cd.train_step(args, rt, 0, net, model, batch, sched, None, 0)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    (eager, eager_grads), (comp, comp_grads) = step(model), step(compiled)
    assert comp == pytest.approx(eager, rel=1e-5) and eager > 0.1
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(eager_grads, comp_grads))
    # and training compiles every expert with the backend asked for
    seen = []
    monkeypatch.setattr(torch, "compile", lambda m, backend: seen.append(backend) or m)
    cd.main(TINY + ["--iters", "1", "--out_dir", str(tmp_path / "run"), "--sample_every", "100",
                    "--compile", "aot_eager", "--batch_size", "2", "--sample_steps", "1"]
            + one_level)
    assert seen == ["aot_eager", "aot_eager"]


def fake_run(path, **config):
    """A checkpoint with a run's flags only: all check_args reads of an --expert_ckpt."""
    torch.save({"method": "compose_diffusion", "config": dict(dict(
        size=16, experts="label", diffusion_steps=1000), **config), "extra": {}}, path)
    return str(path)


BAD_FLAGS = [  # flags, the sentence's words
    (["--sample_steps", "abc"], "--sample_steps abc must be a step count"),
    (["--sample_steps", "0"], "cannot keep 0 steps"),
    (["--sample_steps", "ddim0"], "cannot take exactly 0"),
    (["--eval_n", "0"], "--eval_n must be at least 1"),
    (["--guidance", "2,2,2"], "--guidance 2,2,2 needs 1 or 2"),
    (["--guidance", "x"], "--guidance x must be numbers"),
    (["--guidance", "0.5"], "at least 1"),
    (["--reliability", "0.5,0.3"], "sum to 1"),
    (["--reliability", "1,0,0"], "--reliability 1,0,0 needs 1 or 2"),
    (["--lr", "0"], "--lr must be positive"),
    (["--ema_decay", "1.5"], "--ema_decay must be below 1"),
    (["--p_uncond", "-0.1"], "--p_uncond must be at least 0"),
    (["--eta", "-1"], "--eta must be at least 0"),
    (["--num_channels", "48"], "multiple of 32"),
    (["--channel_mult", "1,x"], "must be numbers separated by commas"),
    (["--experts", "label,nope"], "--experts label,nope must list"),
    (["--class_id", "-1"], "--class_id must be at least 0"),
    (["--ckpt", "{adm}", "--size", "64", "--reliability", "0.2,0.3,0.5"], "never learnt"),
    (["--ckpt", "{adm}", "--size", "64", "--guidance", "2,2"], "--guidance 2,2 needs 1 or 3"),
    (["--ckpt", "missing.pt"], "--ckpt missing.pt does not exist"),
    (["--ckpt", "{adm}", "--size", "32"], "adm64 makes 64 px images and the experts 32 px"),
    (["--ckpt", "{adm}", "--size", "64", "--ckpt_class", "1000"],
     r"--ckpt_class must be an ImageNet class id, 0..999 \(got 1000\)"),
    (["--num_head_channels", "-1", "--num_heads", "3"], r"attention widths 64 must each be a multiple of --num_heads 3"),
    (["--num_head_channels", "24"], "multiple of --num_head_channels 24"),
    (["--guidance", "official"], "official weights exist for the face experts"),
    (["--eval", "--text", "hi"], "--eval measures on the test set's conditions"),
    (["--sample", "--label_map", "missing.png"], "--label_map missing.png does not exist"),
    (["--expert_ckpt", "{a}"], "--expert_ckpt composes finished runs with --sample"),
    (["--sample", "--expert_ckpt", "nope.pt"], "--expert_ckpt nope.pt does not exist"),
    (["--sample", "--expert_ckpt", "{other}"], "was written by inade, not compose_diffusion"),
    (["--sample", "--expert_ckpt", "{a}", "{big}"], r"sizes \[16, 32\]; composed experts"),
    (["--sample", "--expert_ckpt", "{a}", "{b}", "--guidance", "1,2,3"], "needs 1 or 2"),
    (["--sample", "--expert_ckpt", "{a}", "{b}", "--reliability", "1"], "sum to 1"),
    (["--sample", "--expert_ckpt", "{a}", "{b}", "--sample_steps", "2000"],
     "cannot keep 2000 steps"),
]


@pytest.mark.parametrize("flags,words", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_each_bad_flag_is_one_sentence_before_anything_is_built(flags, words, tmp_path,
                                                                monkeypatch):
    runs = {"a": fake_run(tmp_path / "a.pt"), "b": fake_run(tmp_path / "b.pt", experts="caption"),
            "big": fake_run(tmp_path / "big.pt", size=32), "other": str(tmp_path / "other.pt"),
            "adm": str(tmp_path / "adm.pt")}
    torch.save({"method": "inade", "config": {}}, runs["other"])
    open(runs["adm"], "wb").close()   # flags are checked before the file is read
    monkeypatch.setattr(cd, "load_dataset", lambda *a: pytest.fail("built data first"))
    monkeypatch.setattr(cd, "build_experts", lambda *a, **k: pytest.fail("built a model first"))
    argv = [f.format(**runs) for f in flags] + ["--out_dir", str(tmp_path / "run")]
    with pytest.raises(common.UserError, match=words) as err:
        cd.main(argv)
    assert "\n" not in str(err.value) and str(err.value).endswith(".")


def test_a_composition_of_other_runs_keeps_out_of_a_run_folder(tmp_path, monkeypatch):
    """--sample / --eval --expert_ckpt write grids and eval.json: into a folder holding a
    training run they would replace that run's own (as --init_from would)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"a day of training")
    monkeypatch.setattr(cd, "load_dataset", lambda *a: pytest.fail("built data first"))
    with pytest.raises(common.UserError, match=r"holds a training run .*--expert_ckpt another"):
        cd.main(["--sample", "--expert_ckpt", fake_run(tmp_path / "a.pt"), "--out_dir", str(run)])
    assert [p.name for p in run.iterdir()] == ["ckpt.pt"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_port", str(free_port()), "compose_diffusion.py"] + argv,
                         capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def test_eval_under_torchrun_deals_out_the_batches_and_equals_one_process(tmp_path):
    """--eval on shapes, 3 batches of 2 items: one process takes batches 0 and 2, the other
    batch 1; their added sums give one process's numbers."""
    run = str(tmp_path / "run")
    cd.main(TINY + ["--iters", "1", "--out_dir", run, "--sample_every", "100"])
    flags = TINY + ["--out_dir", run, "--eval", "--eval_n", "6", "--batch_size", "2"]
    cd.main(flags)
    one = json.load(open(os.path.join(run, "eval.json")))
    os.remove(os.path.join(run, "eval.json"))
    torchrun(flags)
    two = json.load(open(os.path.join(run, "eval.json")))
    assert two["n"] == one["n"] == 6 and set(two["results"]) == set(one["results"])
    for method, scores in one["results"].items():
        assert two["results"][method] == pytest.approx(scores, abs=1e-4), method


def test_face_preset_under_torchrun_equals_one_process_then_resumes(tmp_path):
    """The face preset (hair-map + text experts, in-one-run halves) at 32x32, widths shrunk, the
    small text tower (CLIP's path is tested in the separate runs above): one step under torchrun
    (each rank half the global batch of 2) gives one process's losses on the whole batch, and
    --resume its second."""
    mm, _ = fake_faces(tmp_path, 4)
    # attention at 16x16 (the preset's 32/16/8 at 256 px); the preset's lr 1e-5: Adam's first
    # steps normalise near-zero gradients, so a larger lr would magnify the all-reduce's rounding
    face = ["--data", "mm-celeba-hq", "--data_dir", mm, "--experts", "hair,caption",
            "--text_encoder", "tiny"] + SHRINK + ["--size", "32", "--sample_steps", "1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    cd.main(face + ["--iters", "2", "--out_dir", one])            # one process, whole batch
    torchrun(face + ["--iters", "1", "--out_dir", two])            # each rank half of it
    cd.main(face + ["--iters", "2", "--out_dir", two, "--resume"])

    def losses(out):
        return [[r["loss_hair"], r["loss_caption"]] for r in map(json.loads, open(
            os.path.join(out, "log.jsonl")))]

    assert len({tuple(v) for v in losses(one)}) == 2
    assert np.allclose(losses(two), losses(one), rtol=1e-4, atol=1e-6), (losses(two), losses(one))
    # the grids at the end of training (rank 0) and after --resume
    rows = open(os.path.join(two, "samples_000001.txt")).read()
    assert rows.startswith("rows: label map | ground truth | hair expert alone | caption expert "
                           "alone | composition (Eq. 10)\n0: face ")
    assert os.path.getsize(os.path.join(two, "samples_000002.png")) > 0


def test_the_last_ddpm_step_adds_no_noise():
    """DDPM Alg. 2: z = 0 at t = 1; the last step returns the posterior mean."""
    ref = cd.Schedule.make("linear", 1000)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a = cd.ddpm_step(ref, x, 0, eps, noise=torch.randn(2, 3, 4, 4))
    b = cd.ddpm_step(ref, x, 0, eps, noise=torch.randn(2, 3, 4, 4))
    x0, _ = cd.predict_x0(ref, x, 0, eps, True)
    assert torch.equal(a, b)
    assert torch.allclose(a, ref.post_coef1[0] * x0 + ref.post_coef2[0] * x)


def test_match_timesteps_interpolates_in_log_abar():
    """An expert on the cosine schedule asked at the linear chain's noise levels: the fractional
    timestep lies between the two expert steps that bracket the level, linearly in log abar."""
    cos, lin = cd.Schedule.make("cosine", 1000), cd.Schedule.make("linear", 1000)
    t = cd.match_timesteps(cos, lin, tol=1.0)
    for i in (5, 100, 500, 900):
        target = lin.abar[i]
        k = int(np.searchsorted(-cos.abar, -target)) - 1     # cos.abar[k] >= target > [k + 1]
        assert cos.abar[k] >= target > cos.abar[k + 1]
        frac = (np.log(cos.abar[k]) - np.log(target)) / (np.log(cos.abar[k]) -
                                                         np.log(cos.abar[k + 1]))
        assert abs(t[i] - (k + frac)) < 1e-9, i
