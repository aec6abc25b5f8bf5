"""L_NICL against a naive per-anchor reference that spells out docs/design.md §5, and hand examples."""

from __future__ import annotations

import math

import pytest
import torch

from pmmrec.objectives import nicl_loss


def naive_nicl_loss(text, image, items, tau=0.1, next_item_positives=True):
    """One anchor at a time, one candidate at a time, the rules written out literally."""
    batch, slots, _ = text.shape
    views = {0: torch.nn.functional.normalize(text, dim=-1), 1: torch.nn.functional.normalize(image, dim=-1)}
    terms = []
    for u in range(batch):
        for lpos in range(slots):
            if items[u, lpos] == 0:
                continue
            has_next = next_item_positives and lpos + 1 < slots and items[u, lpos + 1] != 0
            pos_items = {int(items[u, lpos])} | ({int(items[u, lpos + 1])} if has_next else set())
            for m in (0, 1):
                anchor = views[m][u, lpos]
                num, den = [], []
                for w in range(batch):
                    for k in range(slots):
                        if items[w, k] == 0:
                            continue
                        for mc in (0, 1):
                            if (w, k, mc) == (u, lpos, m):
                                continue
                            score = torch.exp(anchor @ views[mc][w, k] / tau)
                            if w == u:
                                if (k == lpos and mc != m) or (has_next and k == lpos + 1):
                                    num.append(score)
                                    den.append(score)
                            elif int(items[w, k]) not in pos_items:
                                den.append(score)
                terms.append(-torch.log(torch.stack(num).sum() / torch.stack(den).sum()))
    return torch.stack(terms).mean()


def random_batch(seed, batch=4, slots=5, dim=3, num_items=6, dtype=torch.float64):
    """Left-padded sequences over a tiny catalogue, so items repeat within and across users."""
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(1, num_items + 1, (batch, slots), generator=gen)
    for u in range(batch):
        real = int(torch.randint(0, slots + 1, (1,), generator=gen))  # 0..S real slots, all-padding rows too
        items[u, : slots - real] = 0
    text = torch.randn(batch, slots, dim, generator=gen, dtype=dtype)
    image = torch.randn(batch, slots, dim, generator=gen, dtype=dtype)
    return text, image, items


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("next_item_positives", [True, False])
def test_matches_naive_reference(seed, next_item_positives):
    text, image, items = random_batch(seed)
    if not bool((items != 0).any()):
        items[0, -1] = 1
    tau = 0.1 + 0.1 * seed
    got = nicl_loss(text, image, items, tau=tau, next_item_positives=next_item_positives)
    want = naive_nicl_loss(text, image, items, tau=tau, next_item_positives=next_item_positives)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_float32_matches_naive_reference():
    text, image, items = random_batch(11, batch=6, slots=7, dim=8, dtype=torch.float32)
    got = nicl_loss(text, image, items)
    want = naive_nicl_loss(text.double(), image.double(), items)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def _hand_example():
    # User 0 holds items [1, 2]; user 1 holds [pad, 3]. Vectors are deliberately not unit length.
    text = torch.tensor([[[1.0, 0.0], [3.0, 3.0]], [[5.0, 5.0], [0.0, -2.0]]])
    image = torch.tensor([[[0.0, 2.0], [-1.0, 0.0]], [[7.0, -1.0], [4.0, 0.0]]])
    items = torch.tensor([[1, 2], [0, 3]])
    return text, image, items


def _term(pos, neg, tau):
    # -log(sum over positives / sum over positives and negatives), from cosine similarities.
    num = sum(math.exp(s / tau) for s in pos)
    return -math.log(num / (num + sum(math.exp(s / tau) for s in neg)))


def test_hand_example_with_next_item_positives():
    text, image, items = _hand_example()
    tau, c = 0.5, 1 / math.sqrt(2)
    # Unit vectors: t00=(1,0) v00=(0,1) t01=(c,c) v01=(-1,0) t11=(0,-1) v11=(1,0).
    terms = [
        _term([0.0, c, -1.0], [0.0, 1.0], tau),  # t00: P = v00, t01, v01; N = t11, v11
        _term([0.0, c, 0.0], [-1.0, 0.0], tau),  # v00: P = t00, t01, v01; N = t11, v11
        _term([-c], [-c, c], tau),  # t01: no next item; P = v01; N = t11, v11 (t00, v00: same user, excluded)
        _term([-c], [0.0, -1.0], tau),  # v01: P = t01; N = t11, v11
        _term([0.0], [0.0, -1.0, -c, 0.0], tau),  # t11: P = v11; N = t00, v00, t01, v01
        _term([0.0], [1.0, 0.0, c, -1.0], tau),  # v11: P = t11; N = t00, v00, t01, v01
    ]
    got = nicl_loss(text, image, items, tau=tau)
    assert got.item() == pytest.approx(sum(terms) / 6, abs=1e-6)

    # The choice pinned down: the positives are summed inside the log, not averaged as SupCon's log-probs.
    num_t00 = [math.exp(s / tau) for s in (0.0, c, -1.0)]
    den_t00 = sum(num_t00) + math.exp(0.0) + math.exp(1.0 / tau)
    supcon_t00 = -sum(math.log(n / den_t00) for n in num_t00) / 3
    assert terms[0] != pytest.approx(supcon_t00, abs=1e-3)


def test_hand_example_without_next_item_positives():
    text, image, items = _hand_example()
    tau, c = 0.5, 1 / math.sqrt(2)
    terms = [
        _term([0.0], [0.0, 1.0], tau),  # t00: P = v00 only; t01, v01 are same-user slots, excluded
        _term([0.0], [-1.0, 0.0], tau),
        _term([-c], [-c, c], tau),
        _term([-c], [0.0, -1.0], tau),
        _term([0.0], [0.0, -1.0, -c, 0.0], tau),
        _term([0.0], [1.0, 0.0, c, -1.0], tau),
    ]
    got = nicl_loss(text, image, items, tau=tau, next_item_positives=False)
    assert got.item() == pytest.approx(sum(terms) / 6, abs=1e-6)


def test_false_negatives_are_excluded():
    # User 1 holds exactly user 0's items: every candidate of the other user is a false negative, so no anchor
    # has a negative and the loss is exactly 0 whatever the vectors.
    gen = torch.Generator().manual_seed(0)
    text, image = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    items = torch.tensor([[0, 4, 4], [4, 0, 4]])
    assert nicl_loss(text, image, items).item() == pytest.approx(0.0, abs=1e-6)


def test_padding_vectors_do_not_matter():
    text, image, items = random_batch(3)
    items[0, 0], items[1, -1] = 0, 2
    base = nicl_loss(text, image, items)
    pad = items == 0
    text2 = text.masked_fill(pad[..., None], 1e6)
    image2 = image.masked_fill(pad[..., None], -1e6)
    torch.testing.assert_close(nicl_loss(text2, image2, items), base)


def test_gradcheck():
    text, image, items = random_batch(5, batch=3, slots=3, dim=2)
    items[0, -1] = 1
    text.requires_grad_(True)
    image.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, v: nicl_loss(t, v, items, tau=0.3), (text, image))


@pytest.mark.parametrize("real_slots", [0, 1, 2])
def test_heavy_padding_is_finite_and_keeps_graph(real_slots):
    text = torch.randn(3, 6, 4, requires_grad=True)
    image = torch.randn(3, 6, 4, requires_grad=True)
    items = torch.zeros(3, 6, dtype=torch.long)
    items[0, 6 - real_slots:] = torch.arange(1, real_slots + 1)
    loss = nicl_loss(text, image, items, tau=0.01)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(text.grad).all() and torch.isfinite(image.grad).all()
    if real_slots == 0:
        assert loss.item() == 0.0


def test_large_logits_are_finite():
    # Tiny temperature and identical vectors everywhere: logits near 1/tau must not overflow into NaN.
    text = torch.ones(4, 5, 8, requires_grad=True)
    image = torch.ones(4, 5, 8, requires_grad=True)
    items = torch.arange(1, 21).reshape(4, 5)
    loss = nicl_loss(text, image, items, tau=1e-3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(text.grad).all()


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        nicl_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        nicl_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3))


def test_anchor_rows_keep_whole_sequences_within_max_slots():
    from pmmrec.objectives.nicl import anchor_rows

    items = torch.zeros(8, 6, dtype=torch.long)
    lengths = [6, 2, 5, 3, 6, 1, 4, 6]  # 33 valid slots, left-padded
    for row, n in enumerate(lengths):
        items[row, 6 - n:] = torch.arange(1, n + 1) + 10 * row
    assert anchor_rows(items, None) is None and anchor_rows(items, 33) is None  # all of them fit
    for seed in range(5):
        rows = anchor_rows(items, 12, torch.Generator().manual_seed(seed))
        assert len(set(rows.tolist())) == len(rows) and sum(lengths[r] for r in rows.tolist()) <= 12
        again = anchor_rows(items, 12, torch.Generator().manual_seed(seed))
        assert torch.equal(rows, again)  # the same seed draws the same rows
    drawn = {tuple(sorted(anchor_rows(items, 12, torch.Generator().manual_seed(s)).tolist())) for s in range(20)}
    assert len(drawn) > 1  # a random subset, not always the same one
    one = anchor_rows(items, 1, torch.Generator().manual_seed(0))
    assert len(one) == 1  # at least one sequence, even longer than max_slots


def test_nicl_term_uses_the_drawn_sequences_only():
    from types import SimpleNamespace

    from pmmrec.config.schema import ObjectivesConfig
    from pmmrec.objectives.nicl import anchor_rows, nicl_term

    gen = torch.Generator().manual_seed(0)
    batch_items = torch.randint(1, 30, (6, 5), generator=gen)  # (B, S), no padding: 30 slots
    unique, inverse = batch_items.unique(return_inverse=True)
    text, image = torch.randn(len(unique), 8, generator=gen), torch.randn(len(unique), 8, generator=gen)
    tokens = SimpleNamespace(pooled_text=lambda: text, pooled_image=lambda: image)
    heads = {"nicl_text": torch.nn.Identity(), "nicl_image": torch.nn.Identity()}
    batch = SimpleNamespace(items=batch_items, inverse=inverse)

    def term(max_slots):
        config = ObjectivesConfig()
        config.nicl.max_slots = max_slots
        out = SimpleNamespace(config=config, tokens=tokens, model=SimpleNamespace(heads=heads), noise_seed=3)
        return nicl_term(out, batch)

    full = nicl_loss(text[inverse], image[inverse], batch_items)
    assert torch.allclose(term(None), full) and torch.allclose(term(30), full)
    rows = anchor_rows(batch_items, 12, torch.Generator().manual_seed(3 + 1))
    assert len(rows) == 2
    expected = nicl_loss(text[inverse][rows], image[inverse][rows], batch_items[rows])
    assert torch.allclose(term(12), expected) and not torch.allclose(term(12), full)
