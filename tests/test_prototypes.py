"""Each prototype function against a slow, obviously correct per-class (or per-pixel) reference held here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from proto_segformer.prototypes import (
    average_across_processes,
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
    sinkhorn_assignments,
    sinkhorn_knopp,
)

# ----------------------------------------------------------------------------------------------------------------
# Slow references: one class, one pixel or one prototype at a time, straight from PROTOSEG.md.


def reference_sinkhorn_one_class(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    q = torch.exp(scores.double() / epsilon)
    q = q / q.sum()
    n, m = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=0, keepdim=True) / m
        q = q / q.sum(dim=1, keepdim=True) / n
    return q


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


def test_sinkhorn_assignments_are_plan_argmax_and_deterministic():
    torch.manual_seed(3)
    classes = torch.randint(0, 4, (50,))
    scores = torch.rand(50, 3)
    a1 = sinkhorn_assignments(scores, classes, 4)
    a2 = sinkhorn_assignments(scores, classes, 4)
    assert torch.equal(a1, a2)
    assert torch.equal(a1, sinkhorn_knopp(scores, classes, 4).argmax(1))
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
    for k in classes.unique()[:20]:
        rows = classes == k
        expected = reference_sinkhorn_one_class(own[rows], 0.05, 3).argmax(1)
        assert torch.equal(assignments[rows], expected)
    targets = classes * num_prototypes + assignments
    sims = prototype_similarities(embeddings, prototypes)
    torch.testing.assert_close(ppc_loss(sims, targets, 0.1), F.cross_entropy(sims.reshape(2000, -1) / 0.1, targets))
