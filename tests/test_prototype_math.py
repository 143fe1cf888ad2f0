"""The reference mathematics (`proto_segformer/prototype_math.py`): each function against a slow, obviously correct
per-class (or per-pixel) reference held here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from rounding import ulp_noise

from proto_segformer.prototype_math import (
    PLAN_TIE_TOLERANCE,
    SIMILARITY_TIE_TOLERANCE,
    argmax_with_ties,
    average_across_processes,
    class_logits,
    class_scores,
    cluster_prototypes,
    l2_normalize,
    momentum_update,
    normalize_class_scores,
    own_class_similarities,
    ppc_loss,
    ppd_loss,
    prototype_similarities,
    random_unit_prototypes,
    similarity_tie_tolerance,
    sinkhorn_assignments,
    sinkhorn_knopp,
)

# ----------------------------------------------------------------------------------------------------------------
# Slow references: one class, one pixel or one prototype at a time, straight from docs/method.md.


def reference_sinkhorn_one_class(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    q = torch.exp(scores.double() / epsilon)
    q = q / q.sum()
    n, m = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=0, keepdim=True) / m
        q = q / q.sum(dim=1, keepdim=True) / n
    return q


def reference_argmax_with_ties(plan, similarities, log_tolerance, similarity_tolerance) -> torch.Tensor:
    """One row at a time: candidates within the plan tolerance of the row's max, the most similar of them, similarity
    ties (within the tolerance) to the lowest index."""
    out = []
    for q, s in zip(plan.tolist(), similarities.tolist()):
        candidates = [m for m in range(len(q)) if q[m] >= max(q) * math.exp(-log_tolerance)]
        best = max(s[m] for m in candidates)
        out.append(min(m for m in candidates if s[m] >= best - similarity_tolerance))
    return torch.tensor(out, dtype=torch.long)


def reference_assignments(scores, classes, epsilon=0.05, iterations=3) -> torch.Tensor:
    """Sinkhorn assignments class by class: float64 plan, then the tie rule with the tolerances of `scores.dtype`."""
    tolerance = similarity_tie_tolerance(scores.dtype)
    out = torch.empty(len(classes), dtype=torch.long)
    for k in classes.unique():
        rows = classes == k
        plan = reference_sinkhorn_one_class(scores[rows].double(), epsilon, iterations)
        log_tolerance = max(tolerance / epsilon, PLAN_TIE_TOLERANCE)
        out[rows] = reference_argmax_with_ties(plan, scores[rows].double(), log_tolerance, tolerance)
    return out


def reference_momentum_update(prototypes, embeddings, classes, assignments, correct, momentum):
    out = prototypes.clone()
    num_classes, num_prototypes, _ = prototypes.shape
    for k in range(num_classes):
        for m in range(num_prototypes):
            rows = [i for i in range(len(classes)) if classes[i] == k and assignments[i] == m and correct[i]]
            if not rows:
                continue
            f = embeddings[rows].sum(0)
            f = f / f.norm()
            p = momentum * prototypes[k, m] + (1 - momentum) * f
            out[k, m] = p / p.norm()
    return out


def random_unit(*shape, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return l2_normalize(torch.randn(*shape, generator=generator, dtype=dtype))


# ----------------------------------------------------------------------------------------------------------------


def test_l2_normalize_and_random_prototypes_are_unit():
    prototypes = random_unit_prototypes(7, 3, 16, generator=torch.Generator().manual_seed(1))
    assert prototypes.shape == (7, 3, 16)
    torch.testing.assert_close(prototypes.norm(dim=-1), torch.ones(7, 3))
    assert torch.equal(l2_normalize(torch.zeros(2, 4)), torch.zeros(2, 4))


@pytest.mark.parametrize("iterations", [0, 1, 3, 10])
def test_sinkhorn_matches_per_class_reference(iterations):
    torch.manual_seed(0)
    num_classes, num_prototypes = 6, 4
    classes = torch.tensor([0, 0, 0, 2, 2, 5, 5, 5, 5, 5, 0, 2, 3])  # classes 1 and 4 absent, 3 has one pixel
    scores = torch.rand(len(classes), num_prototypes) * 2 - 1
    plan = sinkhorn_knopp(scores, classes, num_classes, epsilon=0.05, iterations=iterations)
    assert plan.dtype == torch.float32
    for k in classes.unique():
        rows = classes == k
        expected = reference_sinkhorn_one_class(scores[rows], 0.05, iterations)
        torch.testing.assert_close(plan[rows].double(), expected, rtol=1e-4, atol=1e-9)
        if iterations:
            torch.testing.assert_close(
                plan[rows].sum(1).double(), torch.full((int(rows.sum()),), 1 / rows.sum()).double()
            )


def test_sinkhorn_marginals_converge_to_equipartition():
    torch.manual_seed(1)
    classes = torch.randint(0, 3, (600,))
    scores = torch.rand(600, 5) * 2 - 1
    plan = sinkhorn_knopp(scores, classes, 3, epsilon=0.05, iterations=200)
    for k in range(3):
        rows = classes == k
        torch.testing.assert_close(plan[rows].sum(0), torch.full((5,), 1 / 5), atol=2e-3, rtol=0)
        torch.testing.assert_close(plan[rows].sum(1), torch.full((int(rows.sum()),), 1 / rows.sum().item()))


def test_sinkhorn_spreads_pixels_that_all_prefer_one_prototype():
    # Without equipartition every pixel would take prototype 0; with it, the 4 prototypes share the 400 pixels.
    torch.manual_seed(2)
    scores = torch.zeros(400, 4)
    scores[:, 0] = 0.9
    scores[:, 1:] = torch.rand(400, 3) * 0.5
    assignments = sinkhorn_assignments(scores, torch.zeros(400, dtype=torch.long), 1, 0.05, 3)
    counts = torch.bincount(assignments, minlength=4)
    assert (counts > 50).all(), counts
    assert not torch.equal(assignments, scores.argmax(1))


def test_sinkhorn_assignments_are_the_plan_argmax_and_deterministic():
    torch.manual_seed(3)
    classes = torch.randint(0, 4, (50,))
    scores = torch.rand(50, 3)
    a1 = sinkhorn_assignments(scores, classes, 4)
    a2 = sinkhorn_assignments(scores, classes, 4)
    assert torch.equal(a1, a2)
    plan = sinkhorn_knopp(scores, classes, 4)
    top2 = plan.topk(2, dim=1).values
    clear = top2[:, 1] < top2[:, 0] * (1 - 1e-3)  # rows whose maximum is not a tie: the plain argmax
    assert clear.sum() > 40 and torch.equal(a1[clear], plan.argmax(1)[clear])
    assert torch.equal(a1, reference_assignments(scores, classes))
    assert sinkhorn_assignments(scores[:0], classes[:0], 4).shape == (0,)


def test_sinkhorn_runs_in_float32_under_bfloat16_autocast():
    # exp(1 / 0.05) = 4.9e8 overflows float16; bfloat16 would lose the plan's precision.
    torch.manual_seed(4)
    classes = torch.randint(0, 3, (64,))
    scores = (torch.rand(64, 4) * 2 - 1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = sinkhorn_knopp(scores, classes, 3)
    assert plan.dtype == torch.float32 and torch.isfinite(plan).all()
    half_plan = sinkhorn_knopp(torch.ones(8, 2, dtype=torch.float16), torch.zeros(8, dtype=torch.long), 1)
    assert half_plan.dtype == torch.float32 and torch.isfinite(half_plan).all()


def test_sinkhorn_float64_stays_float64():
    plan = sinkhorn_knopp(torch.rand(10, 3, dtype=torch.float64), torch.zeros(10, dtype=torch.long), 1)
    assert plan.dtype == torch.float64


# ----------------------------------------------------------------------------------------------------------------
# Ties in the plan: the same assignment whatever the last bits of rounding (docs/method.md, training step 1)


def test_argmax_with_ties_follows_the_rule_row_by_row():
    generator = torch.Generator().manual_seed(20)
    plan = torch.rand(400, 6, generator=generator, dtype=torch.float64)
    similarities = torch.rand(400, 6, generator=generator, dtype=torch.float64) * 2 - 1
    plan[:100] = 1 / 6  # uniform rows
    plan[100:200, 2] = plan[100:200, 4] = 2.0  # two equal maxima
    plan[200:250, 1] = plan[200:250, 3] = plan[200:250, 5] = 3.0
    similarities[200:250, 3] = similarities[200:250, 1]  # and equal similarities: the lower index
    plan[250:300] = 0.0  # every entry underflowed: a uniform row
    for log_tolerance, similarity_tolerance in ((1e-12, 1e-12), (2e-4, 1e-5), (0.3, 0.05)):
        noisy = ulp_noise(plan, seed=21)
        got = argmax_with_ties(noisy, ulp_noise(similarities, seed=22), log_tolerance, similarity_tolerance)
        expected = reference_argmax_with_ties(plan, similarities, log_tolerance, similarity_tolerance)
        assert got.dtype == torch.long
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    uniform = argmax_with_ties(ulp_noise(plan[:100], seed=23), similarities[:100], 2e-4, 1e-5)
    torch.testing.assert_close(uniform, similarities[:100].argmax(1), rtol=0, atol=0)
    assert (argmax_with_ties(ulp_noise(plan[200:250], seed=24), similarities[200:250], 2e-4, 1e-5) != 3).all()
    nan_rows = torch.full((2, 3), float("nan"))
    assert argmax_with_ties(nan_rows, torch.zeros(2, 3), 2e-4, 1e-5).tolist() == [0, 0]


def tie_cases(dtype: torch.dtype, seed: int = 25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Own-class similarities (N, M = 6) of classes whose plan rows tie, next to ordinary ones.

    Class 0: 40 distinct pixels (ordinary); 1-4: one pixel each; 5: 3 pixels (fewer than M: a pixel takes its whole
    1/M share of each prototype it dominates, so several entries of its row are equal up to rounding); 6: 5 copies of
    one pixel; 7: 30 copies of one pixel (more than M, still uniform rows); 8: 40 distinct pixels whose prototypes 1
    and 4 are the same vector, 9: 2 pixels with prototypes 0 and 2 the same vector.
    """
    generator = torch.Generator().manual_seed(seed)
    counts = [40, 1, 1, 1, 1, 3, 5, 30, 40, 2]
    classes = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    dim = 16
    prototypes = random_unit(len(counts), 6, dim, seed=seed, dtype=torch.float64)
    prototypes[8, 4] = prototypes[8, 1]
    prototypes[9, 2] = prototypes[9, 0]
    pixels = random_unit(len(classes), dim, seed=seed + 1, dtype=torch.float64)
    pixels = l2_normalize(pixels + 0.8 * prototypes[classes, torch.randint(0, 6, (len(classes),), generator=generator)])
    first = int((classes == 5).nonzero()[0])
    pixels[first + 1] = -pixels[first]  # opposite pixels: each dominates several prototypes
    pixels[classes == 6] = pixels[classes == 6][0]
    pixels[classes == 7] = pixels[classes == 7][0]
    own = own_class_similarities(pixels, classes, prototypes)
    groups = {
        "lone": torch.isin(classes, torch.tensor([1, 2, 3, 4])),
        "fewer": classes == 5,
        "copies": torch.isin(classes, torch.tensor([6, 7])),
        "duplicated": classes == 8,
        "duplicated_fewer": classes == 9,
    }
    return own.to(dtype), classes, prototypes, groups


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sinkhorn_assignment_ties_go_to_the_most_similar_prototype(dtype):
    own, classes, _, groups = tie_cases(dtype)
    assignments = sinkhorn_assignments(own, classes, 10)
    torch.testing.assert_close(assignments, reference_assignments(own, classes), rtol=0, atol=0)
    nearest = own.float().argmax(1)
    # A lone pixel, or a class of copies of one pixel: a uniform plan row, the nearest prototype.
    for group in ("lone", "copies"):
        assert torch.equal(assignments[groups[group]], nearest[groups[group]]), (group, assignments, nearest)
    plan = sinkhorn_knopp(own, classes, 10)
    uniform = plan[groups["lone"] | groups["copies"]]
    assert (uniform.amax(1) / uniform.amin(1) - 1).max() < 1e-6  # the rows do tie (so rounding decided before)
    # Duplicated prototypes: the plan cannot tell them apart, the first one takes the pixels.
    assert (assignments[groups["duplicated"]] != 4).all() and (assignments[groups["duplicated"]] == 1).any()
    assert (assignments[groups["duplicated_fewer"]] != 2).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sinkhorn_assignments_do_not_change_with_last_bit_rounding(dtype):
    # Another CPU (or code path) computes the similarities with other rounding: a few ulps of the compute dtype
    # (float32 for half precision, which the matmul accumulates in before it rounds once).
    own, classes, _, _ = tie_cases(torch.float64)
    compute = torch.float32 if dtype == torch.bfloat16 else dtype
    expected = sinkhorn_assignments(own.to(compute).to(dtype), classes, 10)
    for seed in range(10):
        noisy = ulp_noise(own.to(compute), seed=seed).to(dtype)
        got = sinkhorn_assignments(noisy, classes, 10)
        assert torch.equal(got, expected), (seed, (got != expected).nonzero().squeeze(1).tolist())
    # Identical pixels or prototypes that come out a few ulps apart still tie.
    for seed in range(10):
        noisy = ulp_noise(own.to(compute), seed=100 + seed, ulps=16).to(dtype)
        got = sinkhorn_assignments(noisy, classes, 10)
        assert torch.equal(got, expected), (seed, (got != expected).nonzero().squeeze(1).tolist())


def test_sinkhorn_float32_sums_stay_exact_for_large_classes():
    # 300000 copies of one pixel: float32 sums drift (3e-3 relative, sequentially), which broke the uniform rows.
    own = (torch.rand(1, 10, generator=torch.Generator().manual_seed(26)) * 2 - 1).expand(300_000, 10)
    classes = torch.zeros(300_000, dtype=torch.long)
    plan = sinkhorn_knopp(own, classes, 1)
    assert (plan.amax(1) / plan.amin(1) - 1).max() < 1e-6
    assert (sinkhorn_assignments(own, classes, 1) == own[0].argmax()).all()


def test_tie_tolerances_are_far_above_the_rounding_of_two_code_paths():
    # Similarities by two kernels (and against float64): an order of magnitude below the similarity tolerance.
    for dim in (16, 768):
        embeddings = random_unit(2000, dim, seed=27)
        prototypes = random_unit(40, 6, dim, seed=28)
        classes = torch.randint(0, 40, (2000,), generator=torch.Generator().manual_seed(29))
        by_bmm = own_class_similarities(embeddings, classes, prototypes)
        by_mm = prototype_similarities(embeddings, prototypes)[torch.arange(2000), classes]
        exact = own_class_similarities(embeddings.double(), classes, prototypes.double())
        for similarities in (by_bmm, by_mm):
            assert (similarities.double() - exact).abs().max() < SIMILARITY_TIE_TOLERANCE / 10
        # The float32 plan against the float64 one (of the same rounded scores), as log(Q): below the plan tolerance
        for epsilon in (0.05, 1.0):
            tolerance = max(SIMILARITY_TIE_TOLERANCE / epsilon, PLAN_TIE_TOLERANCE)
            plan = sinkhorn_knopp(by_mm, classes, 40, epsilon)
            wide = sinkhorn_knopp(by_mm.double(), classes, 40, epsilon)
            assert (plan.double().log() - wide.log()).abs().max() < tolerance / 4
    assert similarity_tie_tolerance(torch.float64) == SIMILARITY_TIE_TOLERANCE  # float64 assigns as float32 does


def test_prototype_similarities_and_class_scores_match_loops():
    torch.manual_seed(5)
    embeddings = l2_normalize(torch.randn(2, 8, 3, 5), dim=1)
    prototypes = random_unit(6, 3, 8)
    scores = class_scores(embeddings, prototypes)
    assert scores.shape == (2, 6, 3, 5)
    for b in range(2):
        for y in range(3):
            for x in range(5):
                e = embeddings[b, :, y, x]
                for k in range(6):
                    expected = max(float(e @ prototypes[k, m]) for m in range(3))
                    assert math.isclose(float(scores[b, k, y, x]), expected, abs_tol=1e-5)
    pixels = embeddings.permute(0, 2, 3, 1).reshape(-1, 8)
    sims = prototype_similarities(pixels, prototypes)
    torch.testing.assert_close(sims, torch.einsum("nd,kmd->nkm", pixels, prototypes))


@pytest.mark.parametrize("chunk_size", [1, 7, 30, 10**9])
def test_class_scores_chunking_does_not_change_results(chunk_size):
    torch.manual_seed(6)
    embeddings = l2_normalize(torch.randn(1, 8, 4, 4), dim=1)
    prototypes = random_unit(11, 3, 8)
    torch.testing.assert_close(class_scores(embeddings, prototypes, chunk_size), class_scores(embeddings, prototypes))


def test_normalize_class_scores_is_affine_free_layernorm_and_keeps_argmax():
    torch.manual_seed(7)
    scores = torch.rand(2, 5, 3, 3)
    out = normalize_class_scores(scores, dim=1)
    mean = scores.mean(1, keepdim=True)
    var = scores.var(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(out, (scores - mean) / torch.sqrt(var + 1e-5))
    assert torch.equal(out.argmax(1), scores.argmax(1))


def test_class_logits_are_the_layer_norm_or_a_temperature_along_the_class_axis():
    scores = torch.rand(4, 6, 5, generator=torch.Generator().manual_seed(12))
    assert torch.equal(class_logits(scores, 1), normalize_class_scores(scores, dim=1))
    assert torch.equal(class_logits(scores, -1, "layer_norm"), normalize_class_scores(scores, dim=-1))
    assert torch.equal(class_logits(scores, 1, "temperature", temperature=0.5), scores / 0.5)


def test_ppc_loss_matches_per_pixel_reference():
    torch.manual_seed(8)
    sims = torch.rand(9, 4, 3) * 2 - 1
    targets = torch.randint(0, 12, (9,))
    expected = sum(-torch.log_softmax(sims[i].reshape(-1) / 0.1, 0)[targets[i]] for i in range(9)) / 9
    torch.testing.assert_close(ppc_loss(sims, targets, 0.1), expected)
    torch.testing.assert_close(ppc_loss(sims.reshape(9, 12), targets, 0.1), expected)
    empty = ppc_loss(sims[:0], targets[:0], 0.1)
    assert empty.item() == 0.0


def test_ppd_loss_matches_reference_and_handles_empty():
    s = torch.tensor([1.0, 0.5, -1.0])
    torch.testing.assert_close(ppd_loss(s), torch.tensor((0 + 0.25 + 4) / 3))
    assert ppd_loss(s[:0]).item() == 0.0


def test_momentum_update_matches_reference_and_leaves_others_unchanged():
    torch.manual_seed(9)
    num_classes, num_prototypes, dim = 5, 3, 8
    prototypes = random_unit(num_classes, num_prototypes, dim)
    embeddings = random_unit(40, dim, seed=1)
    classes = torch.randint(0, 3, (40,))  # classes 3 and 4 absent
    assignments = torch.randint(0, num_prototypes, (40,))
    correct = torch.rand(40) > 0.3
    targets = classes * num_prototypes + assignments
    updated = momentum_update(prototypes, embeddings[correct], targets[correct], momentum=0.9)
    expected = reference_momentum_update(prototypes, embeddings, classes, assignments, correct, 0.9)
    torch.testing.assert_close(updated, expected)
    assert torch.equal(updated[3:], prototypes[3:])  # absent classes: bit-identical
    torch.testing.assert_close(updated.norm(dim=-1), torch.ones(num_classes, num_prototypes))
    assert not torch.equal(updated, prototypes)
    assert torch.equal(prototypes, random_unit(num_classes, num_prototypes, dim))  # input untouched


def test_momentum_update_with_momentum_one_or_no_pixels_is_identity():
    prototypes = random_unit(3, 2, 4)
    embeddings = random_unit(5, 4, seed=2)
    targets = torch.tensor([0, 1, 2, 3, 4])
    torch.testing.assert_close(momentum_update(prototypes, embeddings, targets, momentum=1.0), prototypes)
    assert torch.equal(momentum_update(prototypes, embeddings[:0], targets[:0]), prototypes)


def test_momentum_update_leaves_out_non_finite_embeddings():
    prototypes = random_unit(3, 2, 4)
    embeddings = random_unit(6, 4, seed=5)
    targets = torch.tensor([0, 0, 1, 3, 3, 5])
    poisoned = embeddings.clone()
    poisoned[1, 2] = float("nan")  # prototype 0 keeps one finite embedding
    poisoned[2] = float("inf")  # prototype 1 has only this one: unchanged
    updated = momentum_update(prototypes, poisoned, targets, momentum=0.9)
    keep = torch.tensor([True, False, False, True, True, True])
    expected = momentum_update(prototypes, embeddings[keep], targets[keep], momentum=0.9)
    assert torch.isfinite(updated).all()
    torch.testing.assert_close(updated, expected)
    assert torch.equal(updated.view(6, 4)[1], prototypes.view(6, 4)[1])
    assert not torch.equal(updated.view(6, 4)[0], prototypes.view(6, 4)[0])


def test_own_class_similarities_gathers_the_pixels_class():
    prototypes = random_unit(4, 3, 6)
    embeddings = random_unit(10, 6, seed=3)
    classes = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3, 3])
    expected = torch.stack([prototypes[c] @ e for e, c in zip(embeddings, classes)])
    torch.testing.assert_close(own_class_similarities(embeddings, classes, prototypes, chunk_pixels=3), expected)


def test_cluster_prototypes_recovers_modes_and_flags_absent_classes():
    torch.manual_seed(10)
    modes = random_unit(3, 2, 8, seed=4)
    classes = torch.randint(0, 3, (1500,))
    which = torch.randint(0, 2, (1500,))
    embeddings = l2_normalize(modes[classes, which] + 0.05 * torch.randn(1500, 8))
    centers, present = cluster_prototypes(embeddings, classes, 4, 2, generator=torch.Generator().manual_seed(0))
    assert present.tolist() == [True, True, True, False]
    best = (centers[:3] @ modes.transpose(1, 2)).amax(-1)  # each found center is close to one true mode
    assert (best > 0.99).all(), best
    # both modes of each class are found (not two centers on one mode)
    covered = (modes @ centers[:3].transpose(1, 2)).amax(-1)
    assert (covered > 0.99).all(), covered
    assert torch.equal(centers[3], torch.zeros(2, 8))


def test_average_across_processes_is_identity_without_a_process_group():
    prototypes = random_unit(3, 2, 4)
    assert average_across_processes(prototypes) is prototypes


def test_functions_are_vectorised_over_classes_at_large_k():
    # K = 847 (ADE20K-Full): the same code path, no per-class loop; check it stays exact against references.
    torch.manual_seed(11)
    num_classes, num_prototypes, dim = 847, 2, 8
    prototypes = random_unit(num_classes, num_prototypes, dim)
    classes = torch.randint(0, num_classes, (2000,))
    embeddings = random_unit(2000, dim, seed=5)
    own = own_class_similarities(embeddings, classes, prototypes)
    assignments = sinkhorn_assignments(own, classes, num_classes)
    torch.testing.assert_close(assignments, reference_assignments(own, classes), rtol=0, atol=0)
    targets = classes * num_prototypes + assignments
    sims = prototype_similarities(embeddings, prototypes)
    torch.testing.assert_close(ppc_loss(sims, targets, 0.1), F.cross_entropy(sims.reshape(2000, -1) / 0.1, targets))


# ----------------------------------------------------------------------------------------------------------------
# Masks over all pixels (the traced training head): the same values as passing the masked pixels only.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_with_a_mask_equals_sinkhorn_of_the_masked_pixels(dtype):
    generator = torch.Generator().manual_seed(21)
    own = torch.rand(300, 5, generator=generator, dtype=dtype) * 2 - 1
    classes = torch.randint(0, 7, (300,), generator=generator)
    classes[classes == 6] = 0  # class 6 absent
    mask = torch.rand(300, generator=generator) > 0.3
    mask[classes == 5] = False  # class 5 present but fully masked out: counts in no class
    own[~mask] = torch.where(torch.rand(int((~mask).sum()), 5, generator=generator) > 0.5, 9.0, -9.0).to(dtype)
    plan = sinkhorn_knopp(own, classes, 7, mask=mask)
    expected = sinkhorn_knopp(own[mask], classes[mask], 7)
    torch.testing.assert_close(plan[mask], expected, atol=0, rtol=4 * torch.finfo(dtype).eps)
    assert torch.equal(plan[~mask], torch.zeros_like(plan[~mask]))
    assigned = sinkhorn_assignments(own, classes, 7, mask=mask)
    assert torch.equal(assigned[mask], sinkhorn_assignments(own[mask], classes[mask], 7))
    assert torch.equal(assigned[mask], reference_assignments(own[mask], classes[mask]))
    assert ((assigned >= 0) & (assigned < 5)).all()


def test_ppc_and_ppd_losses_with_a_mask_average_over_the_masked_pixels():
    generator = torch.Generator().manual_seed(22)
    sims = torch.rand(40, 4, 3, generator=generator, dtype=torch.float64) * 2 - 1
    targets = torch.randint(0, 12, (40,), generator=generator)
    mask = torch.rand(40, generator=generator) > 0.4
    sims[~mask] = float("nan")  # what the other pixels hold never reaches the loss
    torch.testing.assert_close(ppc_loss(sims, targets, 0.1, mask=mask), ppc_loss(sims[mask], targets[mask], 0.1))
    assigned = sims[:, 0, 0]
    torch.testing.assert_close(ppd_loss(assigned, mask=mask), ppd_loss(assigned[mask]))
    nothing = torch.zeros(40, dtype=torch.bool)
    assert ppc_loss(sims, targets, 0.1, mask=nothing).item() == 0.0
    assert ppd_loss(assigned, mask=nothing).item() == 0.0


def test_momentum_update_with_a_mask_equals_the_update_from_the_masked_pixels():
    prototypes = random_unit(5, 3, 8)
    embeddings = random_unit(60, 8, seed=23)
    generator = torch.Generator().manual_seed(24)
    targets = torch.randint(0, 12, (60,), generator=generator)  # classes 4 and 5 never targeted
    mask = torch.rand(60, generator=generator) > 0.5
    embeddings[~mask & (targets == 0)] = float("nan")  # left out by the mask, not by the finiteness check
    updated = momentum_update(prototypes, embeddings, targets, momentum=0.9, mask=mask)
    expected = momentum_update(prototypes, embeddings[mask], targets[mask], momentum=0.9)
    torch.testing.assert_close(updated, expected, atol=1e-7, rtol=0)
    untouched = torch.ones(15, dtype=torch.bool)
    untouched[targets[mask]] = False
    assert torch.equal(updated.view(15, 8)[untouched], prototypes.view(15, 8)[untouched])
    assert untouched[targets[~mask]].any()  # some prototypes only masked-out pixels target stay unchanged
