"""The pure sampler: greedy, top-k, top-p, seeds, penalties, the distribution at temperature T."""

from __future__ import annotations

import pytest
import torch

from model.sampling import SamplingBatch, apply_logit_bias, apply_penalties, sample, top_k_top_p_mask


def batch(B, temperature=1.0, top_k=0, top_p=1.0, generators=None, **kw) -> SamplingBatch:
    return SamplingBatch(temperature=[temperature] * B, top_k=[top_k] * B, top_p=[top_p] * B,
                         generators=generators or [None] * B, **kw)


def test_temperature_zero_and_top_k_one_are_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, batch(5, temperature=0.0)).token_ids, logits.argmax(-1))
    torch.manual_seed(1)
    assert torch.equal(sample(logits, batch(5, temperature=1.5, top_k=1)).token_ids, logits.argmax(-1))


def test_top_k_never_leaves_the_top_k():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 50, generator=g)
    top = logits.topk(5, dim=-1).indices
    for i in range(200):
        out = sample(logits, batch(4, temperature=2.0, top_k=5, generators=[torch.Generator().manual_seed(i)] * 4))
        assert all(out.token_ids[r].item() in top[r].tolist() for r in range(4))


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = top_k_top_p_mask(logits, torch.tensor([0]), torch.tensor([0.8]))
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    kept = top_k_top_p_mask(logits, torch.tensor([0]), torch.tensor([0.81]))
    assert torch.isfinite(kept).tolist() == [[True, True, True, False]]
    kept = top_k_top_p_mask(logits, torch.tensor([0]), torch.tensor([0.1]))
    assert torch.isfinite(kept).tolist() == [[True, False, False, False]]  # the top token always stays
    kept = top_k_top_p_mask(logits, torch.tensor([3]), torch.tensor([0.99]))
    assert torch.isfinite(kept).tolist() == [[True, True, True, False]]


def test_same_seed_same_tokens_different_seed_differs():
    logits = torch.zeros(1, 1000)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample(logits, batch(1, generators=[g])).token_ids.item() for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_seeded_row_is_independent_of_batch_neighbours():
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(3))
    alone = sample(logits[1:2], batch(1, generators=[torch.Generator().manual_seed(5)])).token_ids
    torch.manual_seed(0)
    together = sample(logits, batch(3, generators=[None, torch.Generator().manual_seed(5), None])).token_ids
    assert together[1] == alone[0]


def test_empirical_distribution_matches_softmax_over_t_chi_square():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    T = 0.7
    n = 20000
    rows = logits.expand(n, -1).contiguous()
    out = sample(rows, SamplingBatch(temperature=[T] * n, top_k=[0] * n, top_p=[1.0] * n, generators=[None] * n))
    counts = torch.bincount(out.token_ids, minlength=6).double()
    expected = torch.softmax(logits.double() / T, -1) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # 5 degrees of freedom: P(chi2 > 20.5) = 0.001
    assert chi2 < 20.5, f"chi-square {chi2:.2f}; counts {counts.tolist()}, expected {expected.tolist()}"


def test_padded_vocab_rows_are_never_sampled():
    logits = torch.zeros(2, 10)
    logits[:, 8:] = 100.0  # padding rows with huge logits
    for temperature in (0.0, 1.0):
        out = sample(logits, batch(2, temperature=temperature), vocab_limit=8)
        assert (out.token_ids < 8).all()


def test_logprobs_come_from_the_unmodified_distribution():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(4))
    out = sample(logits, batch(2, temperature=0.5, top_k=3, num_logprobs=4, want_logprobs=True))
    table = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, table.gather(-1, out.token_ids[:, None])[:, 0])
    ref_lp, ref_ids = table.topk(4, dim=-1)
    assert torch.equal(out.top_ids, ref_ids) and torch.allclose(out.top_logprobs, ref_lp)


def test_penalties_follow_openai_semantics():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    got = apply_penalties(logits, counts, torch.tensor([0.5]), torch.tensor([0.25]))
    assert got.tolist() == [[0.0, -0.75, -1.25, 0.0]]
    # a strong frequency penalty moves greedy off the repeated token
    logits = torch.tensor([[1.0, 0.9]])
    out = sample(logits, batch(1, temperature=0.0, presence_penalty=[0.0], frequency_penalty=[1.0],
                               output_counts=torch.tensor([[1.0, 0.0]])))
    assert out.token_ids.item() == 1
    assert out.logprobs is None  # not asked for


def test_logit_bias_adds_per_row_and_leaves_logprobs_unbiased():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 1.0, 3.0]])
    got = apply_logit_bias(logits, [((3, 5.0), (0, -1.5)), ()])
    assert got.tolist() == [[0.5, 1.0, 0.0, 4.0], [0.0, 0.5, 1.0, 3.0]]
    assert logits[0, 3].item() == -1.0  # the caller's logits are not written
    # +100 forces an id under sampling too, -100 bans one from greedy; logprobs stay the model's
    for seed in range(20):
        out = sample(logits.clone(), batch(2, temperature=1.0, generators=[torch.Generator().manual_seed(seed)] * 2,
                                           logit_bias=[((2, 100.0),), ((3, -100.0),)], want_logprobs=True))
        assert out.token_ids[0].item() == 2 and out.token_ids[1].item() != 3
        assert torch.allclose(out.logprobs, logits.log_softmax(-1).gather(-1, out.token_ids[:, None])[:, 0])
    greedy = sample(logits.clone(), batch(2, temperature=0.0, logit_bias=[(), ((3, -100.0),)]))
    assert greedy.token_ids.tolist() == [0, 2]


def reference_top_k_top_p(logits, top_k, top_p):
    """The cut by a full sort of every row, position by position (the definition)."""
    out = torch.full_like(logits, float("-inf"))
    for r in range(logits.shape[0]):
        values, order = logits[r].double().sort(descending=True)
        k = min(top_k[r], logits.shape[1]) if top_k[r] > 0 else logits.shape[1]
        probs = torch.softmax(values[:k], -1)
        keep = (probs.cumsum(-1) - probs) < top_p[r] if top_p[r] < 1 else torch.ones(k, dtype=torch.bool)
        keep[0] = True
        out[r, order[:k][keep]] = logits[r, order[:k][keep]]
    return out


def test_windowed_top_k_top_p_equals_the_full_sort():
    """The CPU cut looks for each nucleus in a growing top-K window: it must cut exactly where sorting
    whole rows does, for nuclei inside the first window, past it (flat rows), and mixed batches."""
    check_cut_against_full_sort("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cut_on_gpu_equals_the_full_sort():
    """On CUDA: top-k-only batches take the window (host-known K), batches with a nucleus sort whole
    rows, and per-row values on the device always sort; all cut where the definition does."""
    check_cut_against_full_sort("cuda")


def check_cut_against_full_sort(device):
    g = torch.Generator().manual_seed(9)
    for trial in range(30):
        V = (50, 1000, 3000)[trial % 3]
        scale = (0.05, 1.0, 4.0)[trial % 3 if trial < 15 else (trial + 1) % 3]  # flat rows need big nuclei
        logits = torch.randn(4, V, generator=g) * scale
        top_k = [int(torch.randint(0, V + 5, (1,), generator=g)) if trial % 2 else 0 for _ in range(4)]
        top_p = [float(torch.rand(1, generator=g)) if (trial + r) % 3 else 1.0 for r in range(4)]
        if trial % 5 == 4:
            top_p = [1.0] * 4  # top-k alone (or no cut at all)
        want = reference_top_k_top_p(logits, top_k, top_p)
        x = logits.to(device)
        for args in ((top_k, top_p), (torch.tensor(top_k, device=device), torch.tensor(top_p, device=device))):
            got = top_k_top_p_mask(x, *args).cpu()
            assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (trial, top_k, top_p)
            assert torch.equal(got[torch.isfinite(got)], logits[torch.isfinite(want)])


def test_top_p_samples_follow_the_renormalized_nucleus_chi_square():
    torch.manual_seed(1)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0]).log_softmax(-1)
    n = 20000
    rows = logits.expand(n, -1).contiguous()
    out = sample(rows, batch(n, temperature=1.0, top_p=0.8))
    probs = logits.double().exp()
    keep = (probs.cumsum(-1) - probs) < 0.8  # the nucleus: 3 tokens here
    assert keep.tolist() == [True, True, True, False, False, False]
    counts = torch.bincount(out.token_ids, minlength=6).double()
    assert counts[~keep].sum() == 0
    expected = probs[keep] / probs[keep].sum() * n
    chi2 = ((counts[keep] - expected) ** 2 / expected).sum().item()
    assert chi2 < 13.8, f"chi-square {chi2:.2f} (2 degrees of freedom: P > 13.8 = 0.001); {counts.tolist()}"


def test_mixed_rows_greedy_and_per_row_temperatures_chi_square():
    """A batch mixing greedy rows and two temperatures: greedy rows take the argmax, and each sampled
    row follows softmax(logits / its own T)."""
    torch.manual_seed(2)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 30000
    temps = [(0.0, 0.7, 2.0)[i % 3] for i in range(n)]
    out = sample(logits.expand(n, -1).contiguous(),
                 SamplingBatch(temperature=temps, top_k=[0] * n, top_p=[1.0] * n, generators=[None] * n)).token_ids
    assert (out[0::3] == 0).all()  # greedy rows
    for offset, T in ((1, 0.7), (2, 2.0)):
        counts = torch.bincount(out[offset::3], minlength=6).double()
        expected = torch.softmax(logits.double() / T, -1) * (n // 3)
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 20.5, f"T={T}: chi-square {chi2:.2f}; counts {counts.tolist()}, expected {expected.tolist()}"
