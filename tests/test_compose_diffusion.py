"""Tests of compose_diffusion.py: Eq. (10) and its special cases, the samplers against an exact
eps oracle, respacing, the ADM UNet's official key set and computation, training, resume, errors.

The ADM fixtures (sha256 of the ordered "key:shape" list, parameter counts, outputs under
deterministic weights) were computed once with guided-diffusion's own create_model() (the
guided_diffusion package of PyPI's guided-diffusion-sdk 1.0.0, a copy of openai/guided-diffusion)
and checked again against openai/guided-diffusion's unet.py itself (bit-identical outputs, strict
loads both ways); the tests need neither that code nor the network.
"""

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
import compose_diffusion as cd  # noqa: E402

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


def test_adm64_layout_spot_checks():
    with torch.device("meta"):
        state = cd.UNet(**cd.ADM_CONFIGS["adm64"]).state_dict()
    assert state["time_embed.0.weight"].shape == (768, 192)
    assert state["label_emb.weight"].shape == (1000, 768)
    assert "input_blocks.4.0.in_layers.2.weight" in state             # first down ResBlock
    assert "input_blocks.4.0.op.weight" not in state                  # resblock_updown: no op conv
    assert state["input_blocks.5.0.skip_connection.weight"].shape == (384, 192, 1, 1)
    assert state["input_blocks.5.1.qkv.weight"].shape == (1152, 384, 1)  # Conv1d qkv
    assert "output_blocks.3.2.in_layers.0.weight" in state            # first up ResBlock
    assert state["out.2.weight"].shape == (6, 192, 3, 3)


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
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    sched = cd.Schedule.make("cosine", 1000)
    cond = cd.condition_inputs(model, batch, 5)

    def fixed_loss():  # same t and noise before and after
        torch.manual_seed(123)
        with torch.no_grad():
            return cd.diffusion_loss(model, batch["image"], cond, sched).item()

    before = fixed_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(40):
        loss = cd.diffusion_loss(model, batch["image"], cd.condition_inputs(model, batch, 5), sched)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.7 * before


def test_hybrid_loss_trains_the_learned_variance():
    args = tiny_args(["--learn_sigma", "true"])
    model = cd.Trained(("map",), args, 5)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    loss = cd.diffusion_loss(model, x0, model.null_cond(4, "cpu"), cd.Schedule.make("linear", 1000))
    loss.backward()
    assert model.unet.out[2].weight.grad[3:].abs().sum() > 0      # the v channels get gradient


def test_resume_is_exact(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    common_flags = TINY + ["--ckpt_every", "2", "--sample_every", "100"]
    cd.main(common_flags + ["--iters", "4", "--out_dir", full])
    cd.main(common_flags + ["--iters", "2", "--out_dir", part])
    cd.main(common_flags + ["--iters", "4", "--out_dir", part, "--resume"])
    a = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert a["iter"] == b["iter"] == 4
    for name in ("model_label", "ema_caption", "model_caption"):
        for k in a["state"][name]:
            assert torch.equal(a["state"][name][k], b["state"][name][k]), (name, k)
    logs = [json.loads(line) for line in open(os.path.join(part, "log.jsonl"))]
    assert [r["iter"] for r in logs] == [1, 2, 3, 4]
    assert os.path.exists(os.path.join(full, "samples_000004.png"))


def test_dry_run_prints_exact_counts(capsys):
    cd.main(["--dry_run"])
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"]
    args = common.parse_args(cd.build_parser(), cd.PRESETS, "compose_diffusion", "shapes", [])
    assert counts == {n: common.count_params(m) for n, m in cd.build_experts(args, 5).items()}
    # the folder preset's class expert is ADM's ImageNet-64 trunk: the official count exactly
    cd.main(["--data", "folder", "--dry_run"])
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"]
    assert counts == {"class": cd.ADM_PARAMS["adm64"]}


def test_bad_input_is_one_sentence_and_exit_2(tmp_path):
    with pytest.raises(common.UserError, match="--experts"):
        cd.main(["--experts", "nope", "--dry_run"])
    with pytest.raises(common.UserError, match="no checkpoint"):
        cd.main(TINY + ["--eval", "--out_dir", str(tmp_path)])
    with pytest.raises(common.UserError, match="--size 24"):
        cd.load_dataset(tiny_args(["--size", "24"]), "train")
    r = subprocess.run([sys.executable, "compose_diffusion.py", "--dry_run", "--guidance", "1",
                        "--experts", "label,nope"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --experts label,nope")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_null_caption_rows_are_finite_and_independent_of_the_batch():
    # the official face model gates the embedding on the WHOLE batch's sum; ours is per row, and
    # an empty caption must not turn into NaN in eval mode (fully masked attention)
    torch.manual_seed(0)
    model = cd.Trained(("text",), tiny_args(), 5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero-initialised layers left
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([10, 500, 990])
    tokens = cd.hash_tokenize(["a red circle", "", "a blue square above a red circle"])
    with torch.no_grad():
        mixed = model(x, t, cond_tokens=tokens)
        alone = model(x[1:2], t[1:2], **model.null_cond(1, "cpu"))
        texted = model(x[:1], t[:1], cond_tokens=tokens[:1])
    assert torch.isfinite(mixed).all()
    assert torch.allclose(mixed[1:2], alone, atol=1e-5) and torch.allclose(mixed[:1], texted, atol=1e-5)
    assert not torch.allclose(texted, model(x[:1], t[:1], **model.null_cond(1, "cpu")), atol=1e-4)


def test_official_checkpoint_joins_the_composition_with_reliability_zero(tmp_path, monkeypatch):
    # a guided-diffusion state dict (official key names, class-conditional, linear schedule),
    # loaded strictly as a third expert beside the two trained ones
    flags = dict(SMALL["new_order"][0], image_size=16, attention_resolutions="8")
    monkeypatch.setitem(cd.ADM_CONFIGS, "tiny", flags)
    monkeypatch.setitem(cd.ADM_SCHEDULES, "tiny", "linear")
    path = str(tmp_path / "adm.pt")
    torch.save(cd.UNet(**flags).state_dict(), path)
    args = tiny_args(["--ckpt", path, "--ckpt_config", "tiny", "--ckpt_class", "3",
                      "--sample_steps", "10"])
    models = cd.build_experts(args, 5)
    setup = cd.Setup(args, models, cd.Schedule.make("cosine", 1000), 5, torch.device("cpu"))
    cd.load_official(args, setup, torch.device("cpu"))
    assert not setup.official.has_null
    ds = cd.load_dataset(args, "test")
    batch = cd.test_batch(ds, 2, "cpu")
    comp = setup.composed(batch, [2.0, 2.0], [0.5, 0.5])
    assert comp.a == [0.5, 0.5, 0.0] and len(comp.experts) == 3
    assert not np.allclose(comp.model_t[2], comp.ref.timestep_map)   # linear vs cosine: matched
    eps, _ = comp.eps_and_var(torch.randn(2, 3, 16, 16), 3)
    assert eps.shape == (2, 3, 16, 16) and torch.isfinite(eps).all()
    monkeypatch.setitem(cd.ADM_CONFIGS, "tiny", dict(flags, image_size=32))
    with pytest.raises(common.UserError, match="share z_t's shape"):
        cd.load_official(args, setup, torch.device("cpu"))
    torch.save({"junk": torch.zeros(1)}, path)
    monkeypatch.setitem(cd.ADM_CONFIGS, "tiny", flags)
    with pytest.raises(common.UserError, match="does not match"):
        cd.load_official(args, setup, torch.device("cpu"))


def test_eval_on_real_data_reports_fid_and_lpips_per_method(tmp_path, monkeypatch):
    # a folder of two classes -> a class expert; the pretrained nets are swapped for random ones
    # (no download), so the numbers are meaningless but the protocol runs end to end
    from PIL import Image
    rng = np.random.default_rng(0)
    for sub in ("cats", "dogs"):
        os.makedirs(tmp_path / "data" / sub)
        for k in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                tmp_path / "data" / sub / f"{k}.png")
    inception, lpips = common.FIDInception, common.LPIPS
    monkeypatch.setattr(common, "FIDInception", lambda pretrained: inception(False))
    monkeypatch.setattr(common, "LPIPS", lambda net, pretrained: lpips(net, False))
    flags = ["--data", "folder", "--data_dir", str(tmp_path / "data"), "--size", "32",
             "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
             "--attention_resolutions", "16", "--num_head_channels", "32", "--batch_size", "2",
             "--iters", "1", "--sample_steps", "2", "--eval_n", "5",
             "--out_dir", str(tmp_path / "run")]
    cd.main(flags)
    cd.main(flags + ["--eval"])
    result = json.load(open(tmp_path / "run" / "eval.json"))["results"]
    assert list(result) == ["class expert alone"]
    assert set(result["class expert alone"]) == {"lpips_to_gt", "fid"}
    assert all(math.isfinite(v) and v > 0 for v in result["class expert alone"].values())
    # the protocol itself: a sampler that returns each item's own ground truth scores FID 0 and
    # LPIPS 0 (same items, same pairing); the same images in another order keep FID 0 (up to the
    # float32 rounding of a 2048-d covariance of 5 images) but not LPIPS
    test = cd.load_dataset(common.parse_args(cd.build_parser(), cd.PRESETS, "compose_diffusion",
                                             "folder", flags + ["--eval"]), "test")
    for shift, lpips_zero in ((0, True), (1, False)):
        monkeypatch.setattr(cd, "generate", lambda args, comp, n, device, seed: cd.test_batch(
            test, n, device, (seed - 1000 + shift) % n)["image"])
        cd.main(flags + ["--eval"])
        got = json.load(open(tmp_path / "run" / "eval.json"))["results"]["class expert alone"]
        assert got["fid"] < 1e-3 * result["class expert alone"]["fid"]
        assert (got["lpips_to_gt"] == 0) == lpips_zero
