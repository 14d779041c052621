"""Model-level tests for pipeline.mil.models (M2OTCA, ablations, baselines, Sinkhorn, grouping)."""

from __future__ import annotations

import pytest
import torch

from pipeline.mil.bag_arrays import assign_groups as assign_groups_np
from pipeline.mil.models import MODEL_NAMES, ModelConfig, create_model
from pipeline.mil.models.diagnostics import cross_attention_stats, plan_stats, weight_stats
from pipeline.mil.models.layers import group_centroids
from pipeline.mil.models.ot import prototype_cost, sinkhorn, spatial_cost

MAGS = ("20x", "10x", "5x")
IN_DIMS = {"20x": 24, "10x": 16, "5x": 12}
N_CLASSES = 3
M = 6
TILES_PER_REGION = {"20x": 4, "10x": 2, "5x": 1}  # at most, per region
PER_SIDE = {"20x": 4, "10x": 2, "5x": 1}  # grid cells per region side (nested grid)


def assign_groups(region_20x: torch.Tensor, regions: dict[str, torch.Tensor], m: int) -> dict[str, torch.Tensor]:
    """The loader's group assignment (pipeline.mil.bags), as tensors for the models."""
    return {t: torch.from_numpy(g) for t, g in assign_groups_np(region_20x, regions, m).items()}


def small_cfg(**kw) -> ModelConfig:
    base = dict(d=32, attn_dim=16, n_groups=M, dropout=0.25)
    base.update(kw)
    return ModelConfig(**base)


REGION_PX = 1024.0  # level-0 side of a region (one 5x tile) in the test bags
REGION_COLS = 5


def tile_centres(regions: torch.Tensor, per_side: int) -> torch.Tensor:
    """(N, 2) level-0 centres of the tiles of `regions` (a region's k-th tile at its k-th cell)."""
    side = REGION_PX / per_side
    rank = torch.zeros_like(regions)
    for r in regions.unique():  # k-th tile of its region
        idx = (regions == r).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx))
    ry, rx = regions // REGION_COLS, regions % REGION_COLS
    cy, cx = rank // per_side, rank % per_side
    return torch.stack([rx * REGION_PX + (cx + 0.5) * side, ry * REGION_PX + (cy + 0.5) * side], 1).float()


def make_bag(n_regions: int, seed: int, m: int = M, full: bool = False) -> dict:
    """One unpadded bag: per magnification feats (N_t, D_t), group (N_t,), xy (N_t, 2) centres.
    `full`: every region has all its tiles at every magnification."""
    gen = torch.Generator().manual_seed(seed)
    regions = {}
    for t in MAGS:
        # variable tiles per region (0 allowed below 20x) so counts are uneven
        k = torch.randint(0, TILES_PER_REGION[t] + 1, (n_regions,), generator=gen)
        if t == "20x" or full:
            k = k.clamp_min(1) if not full else torch.full_like(k, TILES_PER_REGION[t])
        regions[t] = torch.arange(n_regions).repeat_interleave(k)
    groups = assign_groups(regions["20x"], regions, m)
    return {
        "feats": {t: torch.randn(len(regions[t]), IN_DIMS[t], generator=gen) for t in MAGS},
        "group": groups,
        "xy": {t: tile_centres(regions[t], PER_SIDE[t]) for t in MAGS},
    }


def collate(bags: list[dict], pad_extra: int = 0) -> dict:
    """Pad bags to a batch; ``pad_extra`` adds padding beyond the longest bag."""
    batch = {"feats": {}, "mask": {}, "group": {}, "xy": {}}
    for t in MAGS:
        n = max(b["group"][t].numel() for b in bags) + pad_extra
        feats = torch.zeros(len(bags), n, IN_DIMS[t])
        mask = torch.zeros(len(bags), n, dtype=torch.bool)
        group = torch.full((len(bags), n), -1, dtype=torch.long)
        xy = torch.full((len(bags), n, 2), 5e5)  # padding garbage must not matter
        for i, b in enumerate(bags):
            k = b["group"][t].numel()
            feats[i, :k], mask[i, :k], group[i, :k] = b["feats"][t], True, b["group"][t]
            xy[i, :k] = b["xy"][t]
            feats[i, k:] = 7.0  # padding garbage must not matter
        batch["feats"][t], batch["mask"][t], batch["group"][t], batch["xy"][t] = feats, mask, group, xy
    return batch


@pytest.fixture(scope="module")
def batch() -> dict:
    return collate([make_bag(12, seed=1), make_bag(7, seed=2), make_bag(3, seed=3)])


def build(name: str, seed: int = 0, **cfg_kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, IN_DIMS, N_CLASSES, small_cfg(**cfg_kw))


# ---------------------------------------------------------------- factory and config


def test_model_names_and_unknown():
    for name in (
        "m2otca",
        "m2otca_a",
        "m2otca_b",
        "m2otca_c",
        "abmil_20x",
        "abmil_10x",
        "abmil_5x",
        "abmil_3",
    ):
        assert name in MODEL_NAMES
    with pytest.raises(ValueError, match="unknown model"):
        create_model("nope", IN_DIMS, 2)


def test_config_from_dict():
    cfg = ModelConfig.from_dict({"d": 64, "dropout": None, "sinkhorn_eps": 0.05})
    assert cfg.d == 64 and cfg.dropout == ModelConfig().dropout and cfg.sinkhorn_eps == 0.05
    with pytest.raises(ValueError, match="unknown model config key"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="grad_class"):
        ModelConfig.from_dict({"grad_class": "oracle"})
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()
    assert ModelConfig.from_dict({"sinkhorn_tol": "1e-4"}).sinkhorn_tol == 1e-4  # YAML 1.1
    with pytest.raises(ValueError, match="n_groups"):
        ModelConfig.from_dict({"n_groups": 0})


# ---------------------------------------------------------------- every model


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_train_step_shapes_and_all_parameters_get_gradient(name, batch):
    model = build(name).train()
    labels = torch.tensor([0, 2, 1])
    out = model(batch, labels)
    bsz = 3
    assert out["logits"].shape == (bsz, N_CLASSES)
    assert torch.isfinite(out["logits"]).all()
    assert out["branch_logits"]
    for y in out["branch_logits"].values():
        assert y.shape == (bsz, N_CLASSES) and torch.isfinite(y).all()
    for t, att in out["tile_attention"].items():
        mask = batch["mask"][t]
        assert att.shape == mask.shape and torch.isfinite(att).all()
        assert (att[~mask] == 0).all()
        torch.testing.assert_close(att.sum(1), torch.ones(bsz), atol=1e-5, rtol=0)
    for att in out["proto_attention"].values():
        assert att.shape == (bsz, M) and torch.isfinite(att).all()
    loss = torch.nn.functional.cross_entropy(out["logits"], labels) + out.get("aux_loss", 0)
    loss.backward()
    no_grad = [
        n
        for n, p in model.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
    ]
    assert not no_grad, f"parameters without (finite, non-zero) gradient: {no_grad}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_eval_under_inference_mode(name, batch):
    model = build(name).eval()
    with torch.no_grad():
        ref = model(batch)["logits"]
    with torch.inference_mode():
        # inputs created inside inference mode are inference tensors: the hard case
        inf_batch = {k: {t: v.clone() for t, v in d.items()} for k, d in batch.items()}
        out = model(inf_batch)
        assert inf_batch["feats"]["20x"].is_inference()
    assert torch.isfinite(out["logits"]).all()
    torch.testing.assert_close(out["logits"], ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_padding_invariance(name):
    bags = [make_bag(9, seed=11), make_bag(14, seed=12)]
    model = build(name).eval()
    with torch.no_grad():
        alone = model(collate(bags[:1]))
        padded = model(collate(bags, pad_extra=5))
    torch.testing.assert_close(padded["logits"][:1], alone["logits"], atol=1e-5, rtol=0)
    for t, att in alone["tile_attention"].items():
        n = att.shape[1]
        torch.testing.assert_close(padded["tile_attention"][t][:1, :n], att, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["m2otca", "abmil_3"])
def test_fixed_seed_reproduces(name, batch):
    outs = []
    for _ in range(2):
        model = build(name, seed=5).train()
        torch.manual_seed(123)  # dropout
        outs.append(model(batch, torch.tensor([0, 1, 2]))["logits"])
    assert torch.equal(outs[0], outs[1])


def test_aux_loss_only_for_clam_and_branch_supervised_m2otca_in_training(batch):
    labels = torch.tensor([0, 2, 1])
    supervised = {"clam_sb_3", "m2otca", "m2otca_a", "m2otca_b", "m2otca_c"}  # branch_loss > 0
    for name in MODEL_NAMES:
        model = build(name).train()
        has_aux = "aux_loss" in model(batch, labels)
        assert has_aux == (name in supervised), name
        assert "aux_loss" not in model(batch)
        with torch.no_grad():
            assert "aux_loss" not in model.eval()(batch, labels)
    out = build("clam_sb_3").train()(batch, labels)
    assert out["aux_loss"].dim() == 0 and out["aux_loss"] > 0
    assert "aux_loss" not in build("m2otca", branch_loss=0.0).train()(batch, labels)
    torch.manual_seed(0)
    out = build("m2otca", dropout=0.0, branch_loss=0.7).train()(batch, labels)
    ce = torch.stack([torch.nn.functional.cross_entropy(y, labels) for y in out["branch_logits"].values()])
    torch.testing.assert_close(out["aux_loss"], 0.7 * ce.mean())


def test_clam_sb_3_state_dict_is_abmil_3_plus_instance_classifiers():
    clam, abmil = build("clam_sb_3").state_dict(), build("abmil_3").state_dict()
    extra = {f"branches.{t}.instance.{p}" for t in MAGS for p in ("weight", "bias")}
    assert set(clam) == set(abmil) | extra


# ---------------------------------------------------------------- M2OTCA specifics


def test_empty_groups_are_masked():
    bag = make_bag(2, seed=4)  # 2 regions < m = 6 groups: most groups empty
    assert bag["group"]["20x"].unique().numel() < M
    model = build("m2otca").eval()
    with torch.no_grad():
        out = model(collate([bag]))
    assert torch.isfinite(out["logits"]).all()
    used = torch.zeros(M, dtype=torch.bool)
    used[bag["group"]["20x"]] = True
    assert (out["proto_attention"]["20x"][0, ~used] == 0).all()
    torch.testing.assert_close(out["proto_attention"]["20x"].sum(), torch.tensor(1.0))


def _truncate(bag: dict, t: str, n: int) -> None:
    for k in ("feats", "group", "xy"):
        bag[k][t] = bag[k][t][:n]


M2OTCA_FAMILY = ("m2otca", "m2otca_paper", "m2otca_b", "m2otca_c")


@pytest.mark.parametrize("cost", ["spatial", "feature", "feature+spatial"])
def test_bags_without_low_magnification_tiles_or_with_one_group(cost):
    bags = [make_bag(8, seed=21), make_bag(5, seed=22), make_bag(6, seed=23), make_bag(1, seed=24)]
    _truncate(bags[1], "5x", 0)  # no 5x tile
    _truncate(bags[1], "10x", 0)  # nor 10x
    keep = bags[2]["group"]["5x"] == bags[2]["group"]["5x"][0]  # one valid 5x group
    for k in ("feats", "group", "xy"):
        bags[2][k]["5x"] = bags[2][k]["5x"][keep]
    # bags[3]: one region, a single valid group at every magnification
    for name in M2OTCA_FAMILY:
        model = build(name, ot_cost=cost).train()
        out = model(collate(bags), torch.tensor([0, 1, 2, 1]))
        assert torch.isfinite(out["logits"]).all(), name
        out["logits"].sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        with torch.inference_mode():
            ev = model.eval()(collate(bags))
        assert torch.isfinite(ev["logits"]).all(), name
        for t, att in ev["tile_attention"].items():
            assert torch.isfinite(att).all(), (name, t)
        for k, v in cross_attention_stats(ev).items():
            assert torch.isfinite(v[[0, 2]]).all(), (name, k, v)
            assert k.startswith("gw_") or torch.isnan(v[1]), (name, k)  # no plan without columns


def test_group_index_out_of_range_fails(batch):
    bad = {k: dict(v) for k, v in batch.items()}
    bad["group"]["10x"] = batch["group"]["10x"].clamp_min(0) + M
    with pytest.raises(ValueError, match="n_groups"):
        build("m2otca")(bad)


def test_grad_weights_never_all_zero(batch):
    model = build("m2otca", dropout=0.0).eval()
    head = model.e2["20x"]
    with torch.no_grad():
        head.attn.w.weight.zero_()  # uniform attention: dy_c/dP_u = a_u * W_c
        head.classifier.weight.fill_(-1.0)  # every class row has a negative mean
    # the raw Grad-CAM weights would all be zero here
    p1, valid, _, _ = model.e1["20x"](
        batch["feats"]["20x"], batch["mask"]["20x"], batch["group"]["20x"]
    )
    leaf = p1.detach().requires_grad_(True)
    logits, _, _ = head(leaf, valid)
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), leaf)
    assert (torch.relu(grad.mean(-1)) == 0).all()

    with torch.inference_mode():
        out = model(batch)
    w = out["grad_weights"]
    assert (w[valid] > 0).all() and (w[~valid] == 0).all()
    torch.testing.assert_close(w.sum(1), valid.sum(1).float())
    for t in ("10x", "5x"):  # low-magnification branches still see their prototypes
        assert not torch.allclose(
            out["branch_logits"][t], model.e2[t].classifier.bias.expand(3, -1)
        )


def test_grad_weights_normalised(batch):
    model = build("m2otca").eval()
    with torch.no_grad():
        out = model(batch)
    w = out["grad_weights"]
    p1, valid, _, _ = model.e1["20x"](
        batch["feats"]["20x"], batch["mask"]["20x"], batch["group"]["20x"]
    )
    assert (w >= 0).all() and (w[~valid] == 0).all()
    torch.testing.assert_close(w.sum(1), valid.sum(1).float())


def test_grad_class_label_only_in_training(batch, monkeypatch):
    model = build("m2otca", grad_class="label")
    seen = []
    orig = model.grad_weights

    def spy(p1, valid, target):
        seen.append(target.clone())
        return orig(p1, valid, target)

    monkeypatch.setattr(model, "grad_weights", spy)
    labels = torch.tensor([2, 2, 2])
    model.train()(batch, labels)
    assert torch.equal(seen[-1], labels)
    model.eval()
    with torch.no_grad():
        out = model(batch, labels)
    assert torch.equal(seen[-1], out["branch_logits"]["20x"].argmax(-1))


def test_ablations_differ(batch):
    outs = {}
    for name in ("m2otca", "m2otca_a", "m2otca_b", "m2otca_c"):
        with torch.no_grad():
            outs[name] = build(name, dropout=0.0).eval()(batch)["logits"]
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)
    assert "grad_weights" not in build("m2otca_c").eval()(batch)


# ---------------------------------------------------------------- Sinkhorn


def _masks(bsz: int, n: int, k: int, gen: torch.Generator):
    rows = torch.rand(bsz, n, generator=gen) > 0.3
    cols = torch.rand(bsz, k, generator=gen) > 0.3
    rows[:, 0] = cols[:, 0] = True
    return rows, cols


def test_sinkhorn_marginals_within_tolerance():
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(4, 9, 7, generator=gen)
    rows, cols = _masks(4, 9, 7, gen)
    tol = 1e-4
    plan, info = sinkhorn(cost, rows, cols, eps=0.1, max_iter=500, tol=tol, return_info=True)
    assert info["n_iter"] < 500
    a = rows.float() / rows.sum(1, keepdim=True)
    b = cols.float() / cols.sum(1, keepdim=True)
    torch.testing.assert_close(plan.sum(2), a, atol=1e-6, rtol=0)
    assert (torch.linalg.vector_norm(plan.sum(1) - b, dim=1) < tol).all()
    pair = rows.unsqueeze(2) & cols.unsqueeze(1)
    assert (plan[~pair] == 0).all()


def test_sinkhorn_matches_pot_on_random_costs():
    ot = pytest.importorskip("ot")
    gen = torch.Generator().manual_seed(1)
    for n, k, eps in ((5, 5, 0.1), (8, 6, 0.05), (30, 30, 0.1)):
        cost = torch.rand(n, k, generator=gen, dtype=torch.float64)
        a = torch.full((n,), 1.0 / n, dtype=torch.float64)
        b = torch.full((k,), 1.0 / k, dtype=torch.float64)
        ref = torch.as_tensor(
            ot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), eps, numItermax=10_000, stopThr=1e-12)
        )
        plan = sinkhorn(cost, eps=eps, max_iter=10_000, tol=1e-12)
        torch.testing.assert_close(plan, ref, atol=1e-9, rtol=1e-6)


def test_sinkhorn_masked_bag_equals_pot_on_valid_subset():
    ot = pytest.importorskip("ot")
    gen = torch.Generator().manual_seed(2)
    cost = torch.rand(3, 8, 8, generator=gen, dtype=torch.float64)
    rows, cols = _masks(3, 8, 8, gen)
    batched = sinkhorn(cost, rows, cols, eps=0.1, max_iter=10_000, tol=1e-12)
    for i in range(3):
        sub = cost[i][rows[i]][:, cols[i]]
        a = torch.full((sub.shape[0],), 1.0 / sub.shape[0], dtype=torch.float64)
        b = torch.full((sub.shape[1],), 1.0 / sub.shape[1], dtype=torch.float64)
        ref = torch.as_tensor(
            ot.sinkhorn(a.numpy(), b.numpy(), sub.numpy(), 0.1, numItermax=10_000, stopThr=1e-12)
        )
        torch.testing.assert_close(batched[i][rows[i]][:, cols[i]], ref, atol=1e-9, rtol=1e-6)


def test_sinkhorn_bags_independent_and_differentiable():
    gen = torch.Generator().manual_seed(3)
    cost = torch.rand(3, 6, 6, generator=gen)
    cost[1] *= 0.01  # near-uniform bag converges at once, the others need more iterations
    batched = sinkhorn(cost, eps=0.1)
    for i in range(3):
        torch.testing.assert_close(batched[i], sinkhorn(cost[i], eps=0.1), atol=1e-7, rtol=0)
    c = cost.clone().requires_grad_(True)
    (sinkhorn(c, eps=0.1) * torch.randn(3, 6, 6, generator=gen)).sum().backward()
    assert torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0


def test_prototype_cost_scaled_to_unit_interval():
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    rows, cols = _masks(2, 5, 5, gen)
    c = prototype_cost(x, y, rows, cols)
    pair = rows.unsqueeze(2) & cols.unsqueeze(1)
    assert (c >= 0).all() and (c <= 1).all() and (c[~pair] == 0).all()
    torch.testing.assert_close(c.amax(dim=(1, 2)), torch.ones(2))
    torch.testing.assert_close(
        c[0, 0, 0], torch.dist(x[0, 0], y[0, 0]) / torch.cdist(x[0][rows[0]], y[0][cols[0]]).max()
    )


# ---------------------------------------------------------------- grouping


def test_grouping_same_boundaries_and_balanced():
    gen = torch.Generator().manual_seed(5)
    n_regions, m = 200, 10
    sizes20 = torch.randint(1, 9, (n_regions,), generator=gen)
    r20 = torch.arange(n_regions).repeat_interleave(sizes20)
    r10 = torch.arange(n_regions).repeat_interleave(
        torch.randint(0, 3, (n_regions,), generator=gen)
    )
    r5 = torch.arange(n_regions)
    groups = assign_groups(r20, {"20x": r20, "10x": r10, "5x": r5}, m)
    region_group = groups["5x"]  # every region has exactly one 5x tile
    for t, r in (("20x", r20), ("10x", r10)):
        assert torch.equal(groups[t], region_group[r])  # same region -> same group everywhere
    assert (region_group.diff() >= 0).all()  # groups are runs of consecutive regions
    counts = torch.bincount(groups["20x"], minlength=m)
    assert (counts > 0).all()
    target = r20.numel() / m
    assert (counts - target).abs().max() <= sizes20.max()


def test_grouping_region_without_20x_tile_joins_preceding_group():
    r20 = torch.tensor([0, 0, 2, 2, 4, 4, 6, 6])
    r10 = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    g = assign_groups(r20, {"20x": r20, "10x": r10}, 4)
    assert torch.equal(g["20x"], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert torch.equal(g["10x"], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))


def test_grouping_fewer_regions_than_groups():
    r20 = torch.tensor([3, 3, 3, 8, 8])
    g = assign_groups(r20, {"20x": r20, "5x": torch.tensor([3, 8])}, 30)
    assert g["20x"].min() >= 0 and g["20x"].max() < 30
    assert g["20x"].unique().numel() == 2  # two regions -> two non-empty groups, the rest empty
    assert torch.equal(g["5x"], g["20x"][[0, 3]])
    none = torch.empty(0, dtype=torch.long)
    empty = assign_groups(none, {"20x": none, "5x": torch.tensor([1, 2])}, 5)
    assert empty["20x"].numel() == 0 and (empty["5x"] == 0).all()


def test_sinkhorn_implicit_gradient_matches_unrolled_and_gradcheck():
    gen = torch.Generator().manual_seed(6)
    cost = torch.rand(2, 6, 5, generator=gen, dtype=torch.float64)
    rows, cols = _masks(2, 6, 5, gen)
    weight = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64)
    grads = []
    for implicit in (True, False):
        c = cost.clone().requires_grad_(True)
        plan = sinkhorn(c, rows, cols, eps=0.1, max_iter=5000, tol=1e-12, implicit=implicit)
        (plan * weight).sum().backward()
        grads.append(c.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradcheck(
        lambda c: sinkhorn(c, rows, cols, eps=0.1, max_iter=5000, tol=1e-13),
        (cost.clone().requires_grad_(True),),
        atol=1e-6,
    )


# ---------------------------------------------------------------- TransMIL specifics


def _transmil_reference(branch, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TransMIL's own per-bag forward (unbatched, no masks, three PPEG convolutions).

    feats (L, D), L >= 1 -> logits (C,), tile attention (L,); eval mode.
    """
    import math

    h = branch.proj(feats[None])  # (1, L, d)
    n_tiles, d = h.shape[1], h.shape[2]
    s = math.ceil(math.sqrt(n_tiles))
    h = torch.cat([h, h[:, : s * s - n_tiles]], dim=1)  # TransMIL's squaring
    x = torch.cat([branch.cls_token, h], dim=1)  # (1, 1 + s*s, d)

    def layer(lyr, x):
        q, k, v = lyr.qkv(lyr.norm(x)).chunk(3, dim=-1)

        def split(t):
            return t.view(1, -1, 8, d // 8).transpose(1, 2)

        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // 8), dim=-1)
        return x + lyr.out((att @ split(v)).transpose(1, 2).reshape(1, -1, d)), att

    x, _ = layer(branch.layer1, x)
    g = x[:, 1:].transpose(1, 2).reshape(1, d, s, s)
    p = branch.ppeg
    g = g + p.proj7(g) + p.proj5(g) + p.proj3(g)
    x = torch.cat([x[:, :1], g.flatten(2).transpose(1, 2)], dim=1)
    x, att = layer(branch.layer2, x)
    logits = branch.classifier(branch.norm(x)[0, 0])
    a = att[0, :, 0, 1:].mean(0)  # (s*s,)
    a = a / a.sum()
    tile = a[:n_tiles].clone()
    tile[: s * s - n_tiles] += a[n_tiles:]
    return logits, tile


def test_transmil_matches_per_bag_reference():
    torch.manual_seed(0)
    model = create_model("transmil_3", IN_DIMS, N_CLASSES, small_cfg()).eval()
    branch = model.branches["20x"]
    with torch.no_grad():  # fit the standardisation so it is not the identity
        branch.proj.norm.running_mean.normal_()
        branch.proj.norm.running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(7)
    sizes = [1, 2, 3, 5, 9, 10, 17]
    n = max(sizes) + 3
    feats = torch.full((len(sizes), n, IN_DIMS["20x"]), 7.0)
    mask = torch.zeros(len(sizes), n, dtype=torch.bool)
    for b, k in enumerate(sizes):
        rows = torch.randperm(n, generator=gen)[:k].sort().values  # real rows anywhere
        mask[b, rows] = True
        feats[b, rows] = torch.randn(k, IN_DIMS["20x"], generator=gen)
    with torch.no_grad():
        logits, att = branch.branch(feats, mask)
        for b in range(len(sizes)):
            ref_logits, ref_att = _transmil_reference(branch, feats[b, mask[b]])
            torch.testing.assert_close(logits[b], ref_logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(att[b, mask[b]], ref_att, atol=1e-6, rtol=0)
    assert (att[~mask] == 0).all()
    torch.testing.assert_close(att.sum(1), torch.ones(len(sizes)), atol=1e-5, rtol=0)


def test_transmil_single_tile_and_empty_magnification():
    bags = [make_bag(8, seed=31), make_bag(1, seed=32), make_bag(4, seed=33)]
    for t in ("10x", "5x"):  # bag 1: one 20x tile and nothing below; bag 2: nothing at 5x
        _truncate(bags[1], t, 0)
    _truncate(bags[1], "20x", 1)
    _truncate(bags[2], "5x", 0)
    batch = collate(bags)
    labels = torch.tensor([0, 1, 2])
    for name in ("abmil_3", "transmil_3"):  # same convention as ABMIL_3
        model = build(name).train()
        out = model(batch, labels)
        assert torch.isfinite(out["logits"]).all(), name
        out["logits"].sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        att = out["tile_attention"]
        torch.testing.assert_close(att["20x"][1], torch.eye(1, att["20x"].shape[1])[0])
        assert (att["10x"][1] == 0).all() and (att["5x"][1:] == 0).all()
        torch.testing.assert_close(att["10x"].sum(1), torch.tensor([1.0, 0.0, 1.0]))

    # a magnification with no tile in the whole batch: (B, 0, D) inputs
    empty = {k: dict(v) for k, v in collate(bags[1:2]).items()}
    model = build("transmil_3").eval()
    with torch.inference_mode():
        out = model(empty)
    assert empty["feats"]["5x"].shape[1] == 0
    assert torch.isfinite(out["logits"]).all() and out["tile_attention"]["5x"].shape == (1, 0)
    # padding the single-tile bag with more masked rows changes nothing
    with torch.no_grad():
        torch.testing.assert_close(
            model(collate(bags[1:2], pad_extra=7))["logits"], model(empty)["logits"]
        )


def test_transmil_ppeg_is_three_depthwise_convs_plus_identity():
    torch.manual_seed(1)
    model = create_model("transmil_3", IN_DIMS, N_CLASSES, small_cfg())
    p = model.branches["10x"].ppeg
    g = torch.randn(2, 32, 6, 6)
    torch.testing.assert_close(p(g), g + p.proj7(g) + p.proj5(g) + p.proj3(g))
    with pytest.raises(ValueError, match="divisible by 8"):
        create_model("transmil_3", IN_DIMS, N_CLASSES, small_cfg(d=36))


# ---------------------------------------------------------------- aligned cross-attention


def test_group_centroids_exact_at_slide_scale():
    xy = torch.tensor([[[1e5 + 0.5, 2e5 + 0.5], [1e5 + 1.5, 2e5 + 2.5], [3.0, 4.0], [9.0, 9.0]]])
    group = torch.tensor([[0, 0, 2, -1]])
    valid = torch.tensor([[True, True, True, False]])
    c = group_centroids(xy, group, valid, 3)
    torch.testing.assert_close(c[0], torch.tensor([[1e5 + 1.0, 2e5 + 1.5], [0.0, 0.0], [3.0, 4.0]]))


def test_spatial_cost_in_group_spacings():
    grid = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]).unsqueeze(0)  # (1, 4, 2)
    rows = torch.tensor([[True, True, True, True]])
    cols = torch.tensor([[True, True, False, True]])
    c = spatial_cost(grid * 700.0, grid * 700.0, rows, cols)
    torch.testing.assert_close(c, spatial_cost(grid, grid, rows, cols))  # scale-free
    assert (torch.diagonal(c[0])[cols[0]] == 0).all()  # aligned pairs cost nothing
    assert c[0, 0, 1] == pytest.approx(1.0) and c[0, 1, 3] == pytest.approx(2.0)  # one spacing: 1
    assert (c[0, :, 2] == 0).all()  # invalid column: 0, masked
    one = spatial_cost(grid[:, :1], grid, rows[:, :1], cols)  # a single valid row: spacing 1 px
    assert torch.isfinite(one).all()


def test_spatial_plan_keeps_tissue_aligned_paper_plan_does_not():
    """Group u is the same tissue at every magnification: the default plan puts its mass on
    (u, u); the paper's feature cost spreads it over the bag (the issue's diagnosis)."""
    batch = collate([make_bag(n, seed=40 + n, full=True) for n in (12, 9, 15)])
    outs = {}
    for name in ("m2otca", "m2otca_paper"):
        with torch.no_grad():
            outs[name] = cross_attention_stats(build(name, dropout=0.0).eval()(batch))
    assert (outs["m2otca"]["ot_aligned_5x"] > 0.95).all()
    assert (outs["m2otca"]["ot_support_5x"] < 1.3).all()
    assert (outs["m2otca_paper"]["ot_aligned_5x"] < 0.7).all()
    assert (outs["m2otca_paper"]["ot_support_5x"] > 1.5).all()


def test_spatial_cost_needs_tile_centres(batch):
    no_xy = {k: v for k, v in batch.items() if k != "xy"}
    with pytest.raises(ValueError, match="ot_cost='spatial' needs the tiles' level-0 centres"):
        build("m2otca")(no_xy)
    assert torch.isfinite(build("m2otca_paper").eval()(no_xy)["logits"]).all()  # feature cost: no need


@pytest.mark.parametrize("weighting", ["input", "mean"])
@pytest.mark.parametrize("target", ["positive", "predicted"])
def test_grad_weights_are_the_documented_gradient_read_out(batch, weighting, target):
    model = build("m2otca", dropout=0.0, grad_weighting=weighting, grad_class=target).eval()
    with torch.no_grad():
        out = model(batch)
    p1, valid, _, _ = model.e1["20x"](batch["feats"]["20x"], batch["mask"]["20x"], batch["group"]["20x"])
    leaf = p1.detach().requires_grad_(True)
    logits, _, _ = model.e2["20x"](leaf, valid)
    if target == "positive":  # log-odds of the classes after the first
        score = torch.logsumexp(logits[:, 1:], -1) - logits[:, 0]
    else:
        score = logits.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    (g,) = torch.autograd.grad(score.sum(), leaf)
    raw = (g * leaf).sum(-1) if weighting == "input" else g.mean(-1)
    w = torch.relu(raw) * valid
    w = torch.where(w.sum(1, keepdim=True) > 0, w * valid.sum(1, keepdim=True) / w.sum(1, keepdim=True),
                    valid.float())
    torch.testing.assert_close(out["grad_weights"], w, atol=1e-5, rtol=1e-5)


def test_diagnostic_read_outs_of_known_plans_and_weights():
    n = 5
    uniform = torch.full((1, n, n), 1.0 / (n * n))
    identity = torch.eye(n).unsqueeze(0) / n
    a, s = plan_stats(torch.cat([uniform, identity]))
    torch.testing.assert_close(a, torch.tensor([1 / n, 1.0]))
    torch.testing.assert_close(s, torch.tensor([float(n), 1.0]))
    masked = torch.zeros(1, n, n)
    masked[0, :2, :2] = 0.25  # two valid groups, uniform between them
    a, s = plan_stats(masked)
    assert a.item() == pytest.approx(0.5) and s.item() == pytest.approx(2.0)
    w = torch.tensor([[1.0] * 10 + [0.0] * 2, [5.0, 5.0] + [0.0] * 8 + [0.0, 0.0]])  # sums 10: 10 valid
    peak, top = weight_stats(w)
    torch.testing.assert_close(peak, torch.tensor([1.0, 5.0]))
    torch.testing.assert_close(top, torch.tensor([0.1, 0.5]))


def test_model_config_errors_name_the_key_and_the_allowed_values():
    for bad, msg in (({"ot_cost": "euclid"}, r"ot_cost must be one of \('spatial', 'feature\+spatial', 'feature'\)"),
                     ({"grad_weighting": 3}, "grad_weighting must be one of"),
                     ({"grad_class": "oracle"}, "grad_class must be one of"),
                     ({"ot_spatial_weight": -1}, "ot_spatial_weight must be >= 0"),
                     ({"ot_spatial_weight": "x"}, "ot_spatial_weight must be a number"),
                     ({"n_groups": 2.5}, "n_groups must be a positive int")):
        with pytest.raises(ValueError, match=msg) as err:
            ModelConfig.from_dict(bad)
        assert "\n" not in str(err.value)


def test_workflow_schema_lists_every_model_config_field_with_its_default_and_choices():
    import dataclasses
    from pathlib import Path

    import yaml

    from pipeline.mil.models import MODEL_NAMES
    from pipeline.mil.models import config as mc

    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    props = schema["properties"]["training"]["properties"]["model"]["properties"]
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    assert set(props) == set(fields)
    for name, default in fields.items():
        assert props[name]["default"] == default, name
    choices = {"ot_cost": mc.OT_COSTS, "grad_weighting": mc.GRAD_WEIGHTINGS, "grad_class": mc.GRAD_CLASSES,
               "grad_apply": mc.GRAD_APPLY}
    for name, allowed in choices.items():
        assert tuple(props[name]["enum"]) == allowed, name
    assert tuple(schema["properties"]["models"]["items"]["enum"]) == MODEL_NAMES


def test_attention_prior_reweights_and_never_empties_a_bag():
    from pipeline.mil.models.layers import AttentionHead

    torch.manual_seed(0)
    head = AttentionHead(8, 4, 2)
    h, mask = torch.randn(2, 5, 8), torch.tensor([[True] * 5, [True, True, True, False, False]])
    _, plain, _ = head(h, mask)
    _, same, _ = head(h, mask, torch.ones(2, 5))
    torch.testing.assert_close(same, plain)
    prior = torch.tensor([[2.0, 0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 5.0, 5.0]])  # bag 1: zero on real items
    _, att, _ = head(h, mask, prior)
    assert att[0, 1] == 0
    assert (att[0, 0] / att[0, 2]).item() == pytest.approx((2 * plain[0, 0] / plain[0, 2]).item(), rel=1e-5)
    torch.testing.assert_close(att[1], plain[1])  # an all-zero prior on the real items is ignored
    torch.testing.assert_close(att.sum(1), torch.ones(2))


OPTIONS = [
    {"ot_cost": "feature"},
    {"ot_cost": "feature+spatial", "ot_spatial_weight": 0.3},
    {"grad_weighting": "mean"},
    {"grad_class": "predicted"},
    {"grad_class": "label"},
    {"grad_apply": "scale"},
    {"grad_floor": 0.0},
    {"grad_apply": "scale", "grad_floor": 1.0},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_cross_attention_option_trains_pads_and_infers(opts, batch):
    """Each option is held to the same contract as the models: a gradient on every parameter,
    outputs unchanged by padding, the same logits under inference_mode."""
    model = build("m2otca", **opts).train()
    out = model(batch, torch.tensor([0, 2, 1]))
    torch.nn.functional.cross_entropy(out["logits"], torch.tensor([0, 2, 1])).backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad
    model.eval()
    bags = [make_bag(9, seed=11), make_bag(14, seed=12)]
    with torch.no_grad():
        alone = model(collate(bags[:1]))["logits"]
        padded = model(collate(bags, pad_extra=5))["logits"]
        ref = model(batch)["logits"]
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=0)
    with torch.inference_mode():
        inf = model({k: {t: v.clone() for t, v in d.items()} for k, d in batch.items()})["logits"]
    torch.testing.assert_close(inf, ref, atol=1e-6, rtol=0)
